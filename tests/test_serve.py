"""The real Serve app on a real local Ray cluster, through real HTTP and WebSocket clients.

One app for the module (port 8123, as every Serve module: conftest.serve_on), on the tiny untrained model,
with a memory budget so small that every idle session is offloaded to storage (so every session
request also exercises restore). Serve and the app's detached actors are removed at module end so
other Ray tests get the CPUs back.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import math
import os
import time

import httpx
import pytest
from conftest import serve_app

pytestmark = pytest.mark.ray

PORT = int(os.environ.get("DNC_SERVE_TEST_PORT", "8123"))
BASE = f"http://127.0.0.1:{PORT}"
WS = f"ws://127.0.0.1:{PORT}"
TEXT = "The cat sat on the mat. The dog ate the bone. Where did the cat sit? On the mat. " * 2


@pytest.fixture(scope="module")
def app_args(tmp_path_factory):
    return {"storage": str(tmp_path_factory.mktemp("serve-storage")), "memory_budget_mb": 0.05,
            "manager_interval_s": 0.5, "auto_compact": False, "max_new_tokens": 64, "max_prompt_tokens": 2048,
            "max_research_tokens": 1024, "live_interval_s": 0.5, "bank_shards": 2}


@pytest.fixture(scope="module")
def server(ray_cluster, app_args):
    yield from serve_app(app_args, PORT, "dnc-test")



def _gen(client, sid=None, prompt="Hello there. ", n=6, owner=None, **kw):
    headers = {"X-Owner": owner} if owner else {}
    r = client.post("/v1/generate", json={"prompt": prompt, "max_new_tokens": n, "state_id": sid,
                                          "temperature": 0.7, "seed": 1, **kw}, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def _err(r, status: int, *needles: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    msg = body["error"]["message"]
    assert "Traceback" not in r.text
    for n in needles:
        assert n in msg, (n, msg)
    return msg


# ------------------------------------------------------------------------------ service
def test_root_health_stats_docs(client):
    info = client.get("/", headers={"Accept": "application/json"}).json()
    assert info["name"] == "BWR-DNC" and "/v1/generate" in info["endpoints"]
    r = client.get("/", headers={"Accept": "text/html"}, follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"].endswith("/ui/")
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["logits_finite"] and h["forward_ms"] > 0 and h["shards_alive"] == 2
    s = client.get("/model/stats").json()
    assert s["params"] > 100_000 and s["config"]["segment_len"] == 32 and len(s["weights_digest"]) == 16
    assert s["bank_capacity_slots"] == 224
    assert client.get("/docs").status_code == 200
    r = client.get("/redoc", follow_redirects=False)  # ReDoc is not shipped: pointed at Swagger UI
    assert r.status_code == 308 and r.headers["location"].endswith("/docs")
    assert "/v1/chat/completions" in client.get("/openapi.json").json()["paths"]
    if os.path.exists(os.path.join(os.path.dirname(__file__), "..", "ui", "index.html")):
        ui = client.get("/ui/")
        assert ui.status_code == 200 and "<html" in ui.text.lower()


# ------------------------------------------------------------------------------ generation
def test_generate_plain_batched_and_seeded(client):
    out = _gen(client, n=8, temperature=0.0)
    assert out["tokens"] == 8 and len(out["token_ids"]) == 8 and out["finish_reason"] == "length"
    assert out["timing"]["tokens_per_s"] > 0 and out["state"] is None
    # concurrent sessionless requests are batched (same prompt length -> one decode batch)
    with cf.ThreadPoolExecutor(6) as ex:
        outs = list(ex.map(lambda _: _gen(client, n=8, temperature=0.0), range(6)))
    assert all(o["token_ids"] == out["token_ids"] for o in outs)  # greedy: batching changes nothing
    stats = client.get("/model/stats").json()["serving"]["generator"]
    assert stats["max_batch"] >= 2, stats
    # a seed makes sampling reproducible
    a, b = _gen(client, n=10, temperature=1.0, seed=7), _gen(client, n=10, temperature=1.0, seed=7)
    assert a["token_ids"] == b["token_ids"]


def _sse(client, path, body, headers=None):
    events = []
    with client.stream("POST", path, json=body, headers=headers or {}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[6:]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_generate_streamed_with_session(client):
    events = _sse(client, "/v1/generate", {"prompt": "Stream me. ", "max_new_tokens": 7, "stream": True,
                                           "state_id": "stream-1", "seed": 3})
    tokens = [e for e in events if e["type"] == "token"]
    done = events[-1]
    assert done["type"] == "done" and done["done"] and done["tokens"] == 7
    assert [t["token_id"] for t in tokens if t["token_id"] is not None] == done["token_ids"]
    assert "".join(t["token"] for t in tokens) == done["text"]
    assert done["state"]["seq"] == 1 and done["state"]["tokens_seen"] == len("Stream me. ") + 7


def test_stop_sequences_end_generation(client):
    out = _gen(client, "stop-a", prompt="abc", n=60, temperature=1.0, seed=11)
    text = out["text"]
    stop = next((text[i:i + 1] for i in range(5, len(text)) if text[i:i + 1].isprintable() and text[i] != "\ufffd"), None)
    if stop is None:
        pytest.skip("sampled text has no printable character to stop at")
    again = _gen(client, "stop-b", prompt="abc", n=60, temperature=1.0, seed=11, stop=[stop])
    assert again["finish_reason"] == "stop" and stop not in again["text"]
    assert text.startswith(again["text"])
    # the session's memory holds exactly the prompt and the tokens up to the stop
    assert again["state"]["tokens_seen"] == 3 + again["tokens"] < 3 + out["tokens"]


# ------------------------------------------------------------------------------ OpenAI
def test_openai_client_completions_and_chat(server):
    import openai

    oa = openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0, timeout=60)
    c = oa.completions.create(model="bwr-dnc", prompt="Once upon a time", max_tokens=6, temperature=0, seed=1)
    assert c.object == "text_completion" and c.usage.completion_tokens == 6 and c.choices[0].finish_reason == "length"
    chunks = list(oa.completions.create(model="bwr-dnc", prompt="Once upon a time", max_tokens=6, temperature=0,
                                        stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    chat = oa.chat.completions.create(model="bwr-dnc", messages=[{"role": "system", "content": "Be brief."},
                                                                 {"role": "user", "content": "Hi!"}],
                                      max_tokens=5, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.prompt_tokens > 5
    stream = oa.chat.completions.create(model="bwr-dnc", messages=[{"role": "user", "content": "Hi!"}],
                                        max_tokens=5, temperature=0, stream=True)
    parts = [ch.choices[0].delta.content or "" for ch in stream if ch.choices]
    assert isinstance("".join(parts), str)
    # a session through the extension field
    oa.completions.create(model="bwr-dnc", prompt="remember", max_tokens=3, extra_body={"state_id": "oa-sess"})
    assert oa.models.list().data[0].id == "bwr-dnc"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        oa.completions.create(model="bwr-dnc", prompt="x", max_tokens=1000)
    assert "max_tokens must be <= 64" in str(e.value)


# ------------------------------------------------------------------------------ states
def test_state_create_read_compact_delete(client):
    r = client.post("/v1/states", json={"state_id": "crud-1"}, headers={"X-Owner": "alice"})
    assert r.status_code == 201 and r.json()["seq"] == 0
    for k in range(3):  # > 4 segments of text so L0 holds slots to compact
        out = _gen(client, "crud-1", prompt=TEXT, n=4, owner="alice")
    assert out["state"]["seq"] == 3 and out["state"]["turns"] == 3
    info = client.get("/v1/state/crud-1", headers={"X-Owner": "alice"}).json()
    assert [t["kind"] for t in info["history"]] == ["create", "generate", "generate", "generate"]
    assert info["history"][1]["prompt_tokens"] == len(TEXT) and info["levels"][0]["slots"] > 0
    listed = client.get("/v1/states", headers={"X-Owner": "alice"}).json()
    assert "crud-1" in [s["state_id"] for s in listed["states"]]
    # other owners neither see nor read it
    assert "crud-1" not in [s["state_id"] for s in client.get("/v1/states", headers={"X-Owner": "bob"}).json()["states"]]
    _err(client.get("/v1/state/crud-1", headers={"X-Owner": "bob"}), 404, "not found")
    # ... nor learn that it exists (404 like a missing session, not 409 "taken")
    _err(client.post("/v1/generate", json={"prompt": "hi", "state_id": "crud-1"}, headers={"X-Owner": "bob"}),
         404, "not found")
    _err(client.post("/v1/states", json={"state_id": "crud-1"}, headers={"X-Owner": "bob"}), 404, "not available")
    c = client.post("/v1/state/crud-1/compact", json={"merge": True}, headers={"X-Owner": "alice"})
    assert c.status_code == 200, c.text
    c = c.json()
    assert c["moved"]["compressed"] > 0
    assert c["levels_after"][0]["slots"] < c["levels_before"][0]["slots"] and c["levels_after"][1]["slots"] > 0
    assert c["state"]["seq"] == 4
    d = client.delete("/v1/state/crud-1", headers={"X-Owner": "alice"})
    assert d.json() == {"state_id": "crud-1", "deleted": True}
    _err(client.get("/v1/state/crud-1", headers={"X-Owner": "alice"}), 404)


def test_offloaded_session_comes_back_intact(client):
    out = _gen(client, "offload-1", prompt=TEXT, n=5)
    # a turn logs its tokens (issue 14): the shard holds a full state only after a snapshot or a
    # change that is not tokens, such as a compaction; that full state is what it offloads
    comp = client.post("/v1/state/offload-1/compact", json={"merge": False})
    assert comp.status_code == 200, comp.text
    info = client.get("/v1/state/offload-1").json()
    assert info["offloaded"], "the 50 kB budget should have moved the idle bank to storage"
    assert info["digest"] == comp.json()["state"]["digest"] and info["seq"] == 2
    # reading it restores it; the bytes are checked against the digest on restore
    ana = client.post("/research/analyze-text", json={"text": "On the mat.", "state_id": "offload-1"})
    assert ana.status_code == 200, ana.text
    out2 = _gen(client, "offload-1", prompt="More. ", n=3)
    assert out2["state"]["seq"] == 3
    assert out2["state"]["tokens_seen"] == out["state"]["tokens_seen"] + len("More. ") + 3


def test_bank_survives_shard_kill(client, app_args):
    import ray

    from serve.app import AppArgs
    from serve.sessions import shard_index

    cfg = AppArgs(**app_args).bank_config()
    sids = [s for s in (f"kill-{i}" for i in range(40)) if shard_index(s, cfg.num_shards) == 0][:4]
    acked = {}
    for sid in sids[:2]:
        for _ in range(2):
            acked[sid] = _gen(client, sid, prompt="Remember this. ", n=3)["state"]
    actor = ray.get_actor(cfg.actor_name(0), namespace=cfg.namespace)
    pid = ray.get(actor.ping.remote())["pid"]

    # requests in flight while the shard dies: each one acknowledged must be stored
    with cf.ThreadPoolExecutor(4) as ex:
        futs = {ex.submit(lambda s: client.post("/v1/generate", json={"prompt": "In flight. ", "max_new_tokens": 4,
                                                                      "state_id": s}), sid): sid for sid in sids}
        time.sleep(0.05)
        ray.kill(actor, no_restart=False)
        results = {futs[f]: f.result() for f in futs}
    for sid, r in results.items():
        assert r.status_code in (200, 409, 503), r.text
        if r.status_code == 200:
            acked[sid] = r.json()["state"]
    assert ray.get(actor.ping.remote())["pid"] != pid, "the shard actor should have been restarted"
    for sid, st in acked.items():
        info = client.get(f"/v1/state/{sid}").json()
        assert (info["seq"], info["digest"], info["tokens_seen"]) == (st["seq"], st["digest"], st["tokens_seen"]), sid
    out = _gen(client, sids[0], prompt="After. ", n=2)
    assert out["state"]["seq"] == acked[sids[0]]["seq"] + 1


# ------------------------------------------------------------------------------ bad input
def test_bad_inputs_are_4xx_and_harmless(client):
    before = _gen(client, "guarded", n=3)["state"]
    cases = [
        (client.post("/v1/generate", json={"prompt": "x", "state_id": "bad id!"}), 422, "state_id must match"),
        (client.get("/v1/state/bad%20id"), 422, "state_id must match"),
        (client.get("/v1/state/nope-404"), 404, "not found"),
        (client.post("/v1/generate", json={"prompt": "x", "state_id": "nope-404", "create_state": False}), 404, "not found"),
        (client.post("/v1/state/nope-404/compact", json={}), 404, "not found"),
        (client.delete("/v1/state/nope-404"), 404, "not found"),
        (client.post("/v1/generate", json={"prompt": "x", "state_id": "guarded", "max_new_tokens": 65}), 422, "<= 64"),
        (client.post("/v1/generate", json={"prompt": "x", "state_id": "guarded", "max_new_tokens": "lots"}), 422, "max_new_tokens"),
        (client.post("/v1/generate", json={"prompt": "x", "state_id": "guarded", "temperature": -1}), 422, "temperature"),
        (client.post("/v1/generate", json={"prompt": "x" * 3000, "state_id": "guarded"}), 422, "max_prompt_tokens"),
        (client.post("/v1/generate", json={"prompt": "x", "state_id": "guarded", "tempreature": 1}), 422, "unknown field"),
        (client.post("/v1/generate", json={"state_id": "guarded"}), 422, "prompt: field required"),
        (client.post("/v1/generate", content=b"{not json", headers={"Content-Type": "application/json"}), 422, ""),
        (client.post("/v1/generate", json={"prompt": "x"}, headers={"X-Owner": "no spaces allowed"}), 422, "owner"),
        (client.post("/research/analyze-text", json={"text": "ab" * 600}), 422, "max_research_tokens"),
        (client.post("/research/explain-decision", json={"text": "abc", "position": 99}), 422, "position"),
        (client.post("/research/state-clustering", json={"k": 3}), 422, "exactly one of state_id or text"),
        (client.post("/research/training-step", json={"step": -1}), 422, "step"),
        (client.post("/research/training-step", json={"step": 1, "loss": "high"}), 422, "not a number"),
        (client.get("/v1/nothing-here"), 404, "no such endpoint"),
    ]
    for r, status, needle in cases:
        _err(r, status, needle)
    # a stream that cannot start is a plain 4xx, not an error inside a 200 stream
    _err(client.post("/v1/generate", json={"prompt": "x", "state_id": "nope-404", "create_state": False,
                                           "stream": True}), 404, "not found")
    after = client.get("/v1/state/guarded").json()
    assert (after["seq"], after["digest"]) == (before["seq"], before["digest"])


# ------------------------------------------------------------------------------ research
def test_research_endpoints_real_values(client):
    _gen(client, "research-1", prompt=TEXT, n=4)
    a = client.post("/research/analyze-text", json={"text": TEXT}).json()
    assert len(a["tokens"]) == len(a["loss"]) == len(TEXT) and a["loss"][0] is None
    assert all(math.isfinite(x) and x > 0 for x in a["loss"][1:])
    assert a["mean_loss"] > 1.0 and len(a["memory_read_mass"]) == len(TEXT)
    assert any(sum(row) > 0 for row in a["memory_read_mass"][40:])  # memory read after the first segment
    assert a["memory_reads"][0]["top_slots"][-1], "top memory slots of the last token"

    g = client.post("/research/gradient-analysis", json={"text": TEXT[:80]}).json()
    names = {layer["name"] for layer in g["layers"]}
    assert {"blocks.0", "blocks.1", "embed"} <= names and g["total_grad_norm"] > 0
    assert all(math.isfinite(layer["grad_norm"]) for layer in g["layers"])

    ev = client.post("/research/state-evolution", json={"text": TEXT}).json()
    assert len(ev["steps"]) == math.ceil(len(TEXT) / 32)
    slots = [sum(lv["slots"] for lv in s["levels"]) for s in ev["steps"]]
    assert slots[-1] > slots[0] and ev["steps"][-1]["tokens_seen"] == len(TEXT)

    at = client.post("/research/attention-analysis", json={"text": TEXT, "max_matrix": 16}).json()
    mem = [lay["memory"] for lay in at["layers"] if lay["memory"]][0]
    assert 0 < sum(mem["level_mass"].values()) <= 1.0 + 1e-6
    local = at["layers"][0]["local"]
    assert len(local["matrix"]) == 16 and all(h["entropy"] > 0 for h in local["heads"])

    eff = client.get("/research/efficiency-metrics", params={"context_tokens": 128, "new_tokens": 8}).json()
    assert eff["decode_tokens_per_s"] > 0 and eff["bank_bytes"] > 0
    assert eff["baseline_kv_cache_bytes"] == 2 * 2 * eff["context_tokens"] * 128 * 4

    cl = client.post("/research/state-clustering", json={"state_id": "research-1", "k": 3}).json()
    assert cl["n_points"] == sum(lv["slots"] for lv in cl["bank_levels"]) and cl["n_points"] >= 3
    assert len(cl["points"]) == cl["n_points"] and set(cl["labels"]) <= {0, 1, 2}
    assert len(set(map(tuple, cl["points"]))) > 1

    fl = client.post("/research/information-flow", json={"text": TEXT}).json()
    memory_layer = [lay for lay in fl["layers"] if lay["has_memory"]][0]
    assert 0 < memory_layer["memory_share"] < 1 and fl["layers"][0]["memory_share"] == 0

    ex = client.post("/research/explain-decision", json={"text": TEXT, "target": "e", "top_k": 4}).json()
    assert ex["target"]["text"] == "e" and len(ex["input_attribution"]) == 4
    assert len(ex["memory_attribution"]) == 4 and all("ablation_delta" in s for s in ex["memory_attribution"])
    assert any(s["ablation_delta"] != 0 for s in ex["memory_attribution"])

    m = client.get("/research/metrics").json()
    assert math.isfinite(m["model"]["loss"]) and m["bank"]["sessions"] >= 1 and m["generator"]["requests"] > 0


# ------------------------------------------------------------------------------ websockets
def test_ws_live_slow_subscriber_does_not_block(client):
    from websockets.sync.client import connect

    with connect(f"{WS}/ws/live", open_timeout=30) as slow, connect(f"{WS}/ws/live", open_timeout=30) as fast:
        assert json.loads(fast.recv(timeout=10))["type"] == "hello"
        # `slow` never reads; events keep flowing to `fast`
        for k in range(3):
            r = client.post("/research/training-step", json={"run_id": "ws-test", "step": k, "loss": 3.0 - k / 10})
            assert r.json()["stored"]
        _gen(client, "ws-sess", n=3)
        seen_steps, seen_gen, seen_metrics = set(), False, False
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (seen_steps == {0, 1, 2} and seen_gen and seen_metrics):
            ev = json.loads(fast.recv(timeout=max(0.1, deadline - time.monotonic())))
            if ev["type"] == "training_step" and ev["run_id"] == "ws-test" and not ev.get("backlog"):
                seen_steps.add(ev["step"])
                assert ev["metrics"]["loss"] == pytest.approx(3.0 - ev["step"] / 10)
            seen_gen |= ev["type"] == "generation" and ev.get("state_id") == "ws-sess"
            seen_metrics |= ev["type"] == "metrics"
        assert seen_steps == {0, 1, 2} and seen_gen and seen_metrics
    steps = client.get("/research/training-steps", params={"run_id": "ws-test"}).json()["steps"]
    assert [s["step"] for s in steps] == [0, 1, 2]


def test_ws_research_request_response(client):
    from websockets.sync.client import connect

    with connect(f"{WS}/ws/research", open_timeout=30) as ws:
        ws.send(json.dumps({"id": 1, "endpoint": "information-flow", "params": {"text": TEXT[:64]}}))
        r = json.loads(ws.recv(timeout=60))
        assert r["id"] == 1 and r["ok"] and len(r["result"]["layers"]) == 2
        ws.send(json.dumps({"id": 2, "endpoint": "no-such-thing", "params": {}}))
        r = json.loads(ws.recv(timeout=30))
        assert r["id"] == 2 and not r["ok"] and "unknown endpoint" in r["error"]["message"]
        ws.send(json.dumps({"id": 3, "endpoint": "analyze-text", "params": {"text": 5}}))
        r = json.loads(ws.recv(timeout=30))
        assert not r["ok"] and r["status"] == 422 and "text" in r["error"]["message"]
        ws.send("not json")
        assert not json.loads(ws.recv(timeout=30))["ok"]


# ------------------------------------------------------------------------------ docs (browser)
@pytest.mark.browser
def test_docs_render_offline(server):
    """/docs renders every operation from assets the app serves itself (and /redoc lands there): the
    browser may reach nothing but this server (any other request is recorded and aborted)."""
    chromium = "/usr/bin/chromium"
    if not os.path.exists(chromium):
        pytest.skip(f"{chromium} missing: run `make browser-deps` (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    n_ops = sum(len(methods) for methods in httpx.get(f"{server}/openapi.json").json()["paths"].values())
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--headless=new", "--no-sandbox",
                                                                    "--disable-gpu", "--no-first-run"])
        ctx = browser.new_context()
        outside: list[str] = []

        def only_this_server(route):
            url = route.request.url
            if url.startswith((server, "data:", "blob:")):
                route.continue_()
            else:
                outside.append(url)
                route.abort()
        ctx.route("**/*", only_this_server)
        page = ctx.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{server}/docs")
        page.wait_for_selector(".opblock", timeout=30_000)
        assert page.locator(".opblock").count() == n_ops
        assert page.locator(".opblock-summary-path", has_text="/v1/chat/completions").count() == 1
        assert page.locator(".btn.authorize").count() == 1  # the Bearer scheme: keys can be tried here
        page.goto(f"{server}/redoc")
        page.wait_for_selector(".opblock", timeout=30_000)
        assert page.url == f"{server}/docs" and page.locator(".opblock").count() == n_ops
        browser.close()
    assert not outside, f"the docs pages asked for outside resources: {outside}"
    assert not errors, errors


def test_an_app_refuses_a_proxy_mode_the_running_cluster_lacks(server, app_args):
    """Ray reads the proxy mode when the cluster starts (serve/proxy_mode.py): asking the running
    Serve for the other mode is a one-line error that says how to start it, not a server that
    silently runs the wrong front. The running mode, or none, builds."""
    from serve.app import build_app
    from serve.proxy_mode import ProxyModeError, cluster_mode

    running, _ = cluster_mode()
    other = "python" if running == "haproxy" else "haproxy"
    with pytest.raises(ProxyModeError, match=f"proxy={other} .* running Serve uses proxy={running}") as e:
        build_app({**app_args, "proxy": other})
    assert "ray start" in str(e.value) and "\n" not in str(e.value)
    build_app({**app_args, "proxy": running})
    build_app(app_args)
