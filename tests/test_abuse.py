"""Abuse tests, quick form (the long form with figures is ``python bench/abuse.py``): the real Serve
app with two keys (alice, bob) and tight quotas.

* schemathesis against the app's own OpenAPI with alice's key: no 5xx, no undocumented status or
  content type, no response that violates its schema (every operation, 4 cases each, ~10-20 s);
* owner isolation across every endpoint and WebSocket (bob against alice's session: 404, nothing
  delivered; no key: 401 / close 4401);
* quotas and caps: sessions per owner, open WebSockets per owner and in all, unauthenticated
  sockets, expensive research calls in parallel.
"""

from __future__ import annotations

import os
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import abuse  # noqa: E402

pytestmark = pytest.mark.ray
PORT = int(os.environ.get("DNC_SERVE_TEST_PORT", "8123"))


@pytest.fixture(scope="module")
def keyed(ray_cluster):
    from conftest import remove_app, serve_on

    keys = abuse.make_keys()
    tmp = tempfile.mkdtemp(prefix="dnc-abuse-test-")
    args = abuse.app_args(os.path.join(tmp, "storage"), abuse.write_keys_file(os.path.join(tmp, "keys"), keys),
                          max_sessions_per_owner=12, namespace="bwr-dnc-abuse-test")
    serve_on(PORT)  # Serve on PORT (kept from the previous Serve module when it listens there)
    try:
        yield abuse.start_server(PORT, args), keys, args
    finally:
        remove_app(args, "dnc-abuse")


def test_owner_isolation_every_endpoint_and_websocket(keyed):
    base, keys, _ = keyed
    rows = abuse.isolation_matrix(base, keys)
    bad = [r for r in rows if not r["ok"]]
    assert not bad, bad
    assert len(rows) >= 45  # every surface was tried
    cases = " ".join(r["case"] for r in rows)
    for surface in ("/v1/generate", "/v1/completions", "/v1/chat/completions", "/v1/states", "compact",
                    "/research/state-clustering", "/ws/live", "/ws/research", "training-steps"):
        assert surface in cases, surface


def test_quotas_and_caps(keyed):
    base, keys, args = keyed
    q = abuse.quota_figures(base, keys, args, unauth_sockets=6, parallel_research=3)
    s, w, r = q["sessions"], q["websockets"], q["research"]
    assert s["refused"] == {"after": 12, "status": 429, "code": "session_quota"}, s
    assert s["listed"] == 12 and s["list_pages"] == 4  # limit 3 a page
    assert s["other_owner_create_status"] == 201  # the quota is per owner
    assert w["opened_by_one_owner"] == 3 and w["refused_close_code"] == 4429, w
    assert set(w["unauthenticated_close_codes"]) <= {"4401", "4429"}, w
    assert sum(w["unauthenticated_close_codes"].values()) == 6 and w["unauthenticated_all_closed_s"] < 12
    assert r["statuses"].get("200", 0) >= 1 and r["statuses"].get("429", 0) >= 1, r
    assert set(r["statuses"]) <= {"200", "429"} and r["over_context_cap_status"] == 422


def test_compaction_mid_segment_then_use(keyed):
    """A session compacted mid-segment (as the memory manager does) keeps working (was a 500)."""
    base, keys, _ = keyed
    a = abuse.client(base, keys["alice"])
    r = a.post("/v1/generate", json={"prompt": "0" * 24, "max_new_tokens": 32, "state_id": "mid-seg", "seed": 0})
    assert r.status_code == 200, r.text
    c = a.post("/v1/state/mid-seg/compact", json={})
    assert c.status_code == 200 and c.json()["moved"]["compressed"] > 0, c.text
    assert a.post("/research/analyze-text", json={"text": "00", "state_id": "mid-seg"}).status_code == 200
    assert a.post("/v1/generate", json={"prompt": "1", "max_new_tokens": 4, "state_id": "mid-seg"}).status_code == 200
    a.delete("/v1/state/mid-seg")


def test_schemathesis_no_5xx_no_schema_violation(keyed):
    """One pass of the examples, fuzzing (positive and negative) and stateful phases, 4 cases per
    operation (161 cases in all with seed 1; 3 gave 111, close to the floor of 100), with no time
    budget: a budget makes schemathesis repeat fuzzing until it is spent, so the old 90 s budget
    always took 90 s and its case count fell with the machine's load (83 cases on a loaded 2-core
    box). The coverage phase (boundary values and unexpected methods of every operation: 1,480
    cases, ~150 s on that box) runs in the long form, ``bench/abuse.py``."""
    base, keys, _ = keyed
    with abuse.client(base, keys["alice"]) as a:
        schema = a.get("/openapi.json").json()
    n_ops = sum(m in ("get", "post", "put", "patch", "delete") for ops in schema["paths"].values() for m in ops)
    out = abuse.run_schemathesis(base, keys["alice"], max_examples=4, workers=2, seed=1,
                                 phases="examples,fuzzing,stateful")
    s = out["summary"]
    assert n_ops >= 20 and s["operations"] == n_ops, (n_ops, out["output_tail"])   # every operation
    assert {k: s["phases"].get(k) for k in ("examples", "fuzzing", "stateful")} == dict.fromkeys(
        ("examples", "fuzzing", "stateful"), "success"), s["phases"]
    assert s["cases"] >= 100, s
    assert s["unique_failures"] == 0 and not s["failures_by_check"] and not s["errors"], out["output_tail"]
    assert out["exit_code"] == 0, out["output_tail"]
