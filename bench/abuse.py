"""Abuse tests of the serving API with API keys on: fuzzing, owner isolation, quotas and caps.

Starts the real Serve app (tiny untrained model) on a local Ray cluster with two keys (alice, bob)
and small quotas, then measures:

* **schemathesis** against the app's own OpenAPI (``/openapi.json``) with alice's key: every
  operation, ``--max-examples`` cases each; failures of the checks no 5xx, status code, content
  type, response headers and response schema conformance;
* **isolation**: every endpoint and WebSocket, as bob, against alice's session and training run
  (404 / nothing delivered), and without a key (401 / close 4401);
* **quotas**: sessions per owner (429 beyond, listing in pages), open WebSockets per owner and in
  all (close 4429), unauthenticated WebSockets (closed 4401 after the 5 s auth window), expensive
  research calls in parallel per owner (429 beyond the concurrency cap).

    python bench/abuse.py                      # ~5-10 min on 2 CPUs
    python bench/abuse.py --max-examples 20 --sessions-cap 50 --quick

Writes JSON (argv, commit, device) to bench/results/abuse-<time>.json and prints markdown tables.
The quick form of the same checks runs in ``make test`` (tests/test_abuse.py).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any, Callable

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
from common import HelpFormatter, provenance, write_json  # noqa: E402
# sockets held open across calls (the caps) are closed by hand, not by `with`
warnings.filterwarnings("ignore", message="connect\\(\\) must be used as a context manager")

TEXT = "The cat sat on the mat. The dog ate the bone. Where did the cat sit? On the mat. " * 2
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_headers_conformance,response_schema_conformance")
TITLE = "Abuse tests with API keys (`bench/abuse.py`)"
WHAT = ("schemathesis against the app's own OpenAPI with keys (no 5xx, no schema violation), the "
        "owner-isolation matrix over every endpoint and WebSocket with two keys, and the quotas.")
STATE_RESEARCH = ("analyze-text", "gradient-analysis", "state-evolution", "attention-analysis",
                  "information-flow", "explain-decision", "state-clustering")


# ------------------------------------------------------------------------------ server
def make_keys(owners: tuple[str, ...] = ("alice", "bob")) -> dict[str, str]:
    return {o: secrets.token_urlsafe(24) for o in owners}


def write_keys_file(path: str, keys: dict[str, str]) -> str:
    with open(path, "w") as f:
        f.write("# owner:key\n" + "".join(f"{o}:{k}\n" for o, k in keys.items()))
    return path


def app_args(storage: str, keys_file: str, **overrides) -> dict[str, Any]:
    """A small server with keys and tight quotas, so every cap is reached within seconds."""
    args = {"storage": storage, "api_keys_file": keys_file, "bank_shards": 2, "max_new_tokens": 32,
            "max_prompt_tokens": 2048, "max_research_tokens": 1024, "max_research_context_tokens": 2048,
            "max_research_new_tokens": 32, "max_sessions_per_owner": 20, "max_ws_per_owner": 3,
            "max_ws_total": 8, "research_concurrency_per_owner": 1, "live_interval_s": 0.5,
            "allowed_origins": ["http://allowed.example"]}
    return {**args, **overrides}


def start_server(port: int, args: dict[str, Any], timeout_s: float = 180.0) -> str:
    """Deploy the app on 127.0.0.1:port (Ray must be initialized); returns the base URL."""
    from serve.app import run_app

    return run_app(args, port, name="dnc-abuse", timeout_s=timeout_s)


def client(base: str, key: str | None, **headers) -> httpx.Client:
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.Client(base_url=base, headers=headers, timeout=120)


def ws_url(base: str, path: str) -> str:
    return base.replace("http://", "ws://") + path


def ws_connect(base: str, path: str, key: str | None = None, origin: str | None = None):
    from websockets.sync.client import connect

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return connect(ws_url(base, path), open_timeout=30, additional_headers=headers, origin=origin)


def ws_close_code(ws, timeout: float = 10.0) -> int | None:
    """Read until the server closes ``ws``; its close code (None if it stays open)."""
    from websockets.exceptions import ConnectionClosed

    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ws.recv(timeout=max(0.05, deadline - time.monotonic()))
    except TimeoutError:
        return None
    except ConnectionClosed as e:
        return e.rcvd.code if e.rcvd else None
    return None


# ------------------------------------------------------------------------------ isolation
def isolation_matrix(base: str, keys: dict[str, str]) -> list[dict[str, Any]]:
    """bob against alice's session ``iso-a`` and training run ``iso-run-a``, on every surface;
    rows ``{case, expect, got, ok}``. Ends by checking alice's session is unchanged."""
    A = client(base, keys["alice"])
    B = client(base, keys["bob"], **{"X-Owner": "alice"})  # claiming alice's name must not help
    anon = client(base, None, **{"X-Owner": "alice"})
    rows: list[dict[str, Any]] = []

    def row(case: str, expect: Any, got: Any, ok: bool | None = None) -> None:
        rows.append({"case": case, "expect": expect, "got": got, "ok": (got == expect) if ok is None else ok})

    r = A.post("/v1/generate", json={"prompt": TEXT, "max_new_tokens": 4, "state_id": "iso-a", "seed": 1})
    assert r.status_code == 200, r.text
    before = A.get("/v1/state/iso-a").json()
    A.post("/research/training-step", json={"run_id": "iso-run-a", "step": 1, "loss": 2.5}).raise_for_status()

    sid = {"state_id": "iso-a"}
    http_cases: list[tuple[str, Callable[[httpx.Client], httpx.Response]]] = [
        ("GET /v1/state/{id}", lambda c: c.get("/v1/state/iso-a", params={"owner": "alice"})),
        ("DELETE /v1/state/{id}", lambda c: c.delete("/v1/state/iso-a")),
        ("POST /v1/state/{id}/compact", lambda c: c.post("/v1/state/iso-a/compact", json={"owner": "alice"})),
        ("POST /v1/states (taken id)", lambda c: c.post("/v1/states", json={**sid, "owner": "alice"})),
        ("POST /v1/generate", lambda c: c.post("/v1/generate", json={"prompt": "hi", **sid, "owner": "alice"})),
        ("POST /v1/generate stream", lambda c: c.post("/v1/generate", json={"prompt": "hi", **sid, "stream": True})),
        ("POST /v1/completions", lambda c: c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2,
                                                                          "user": "alice", **sid})),
        ("POST /v1/chat/completions", lambda c: c.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "user": "alice", **sid})),
    ]
    for name in STATE_RESEARCH:
        body = {**sid, "owner": "alice"} if name == "state-clustering" else {"text": "On the mat.", **sid, "owner": "alice"}
        http_cases.append((f"POST /research/{name}", lambda c, n=name, b=body: c.post(f"/research/{n}", json=b)))
    for case, call in http_cases:
        row(f"bob: {case}", 404, call(B).status_code)
    listed = [s["state_id"] for s in B.get("/v1/states", params={"owner": "alice"}).json()["states"]]
    row("bob: GET /v1/states lists iso-a", False, "iso-a" in listed)
    steps = B.get("/research/training-steps", params={"run_id": "iso-run-a"}).json()["count"]
    row("bob: GET /research/training-steps of alice's run", 0, steps)
    runs = B.get("/research/metrics").json()["training"]
    row("bob: GET /research/metrics shows alice's run", False, "iso-run-a" in runs)

    # without a key: 401 everywhere but /health (and the docs)
    no_key = [("GET", "/v1/states"), ("GET", "/v1/state/iso-a"), ("POST", "/v1/generate"), ("POST", "/v1/states"),
              ("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
              ("GET", "/model/stats"), ("GET", "/research/metrics"), ("POST", "/research/training-step"),
              ("GET", "/research/training-steps"), ("GET", "/research/efficiency-metrics")]
    no_key += [("POST", f"/research/{n}") for n in STATE_RESEARCH]
    for method, path in no_key:
        row(f"no key: {method} {path}", 401, anon.request(method, path, json={} if method == "POST" else None).status_code)
    wrong = client(base, "x" * 32)
    row("wrong key: GET /v1/states", 401, wrong.get("/v1/states").status_code)
    row("no key: GET /health", 200, anon.get("/health").status_code)

    rows += _ws_isolation(base, keys, A)
    after = A.get("/v1/state/iso-a").json()
    row("alice's session: only her own later turn was added (seq)", before["seq"] + 1, after["seq"])
    return rows


def _ws_isolation(base: str, keys: dict[str, str], A: httpx.Client) -> list[dict[str, Any]]:
    rows = []
    with ws_connect(base, "/ws/research", keys["bob"]) as ws:
        ws.send(json.dumps({"id": 1, "endpoint": "analyze-text",
                            "params": {"text": "On the mat.", "state_id": "iso-a", "owner": "alice"}}))
        got = json.loads(ws.recv(timeout=60)).get("status")
    rows.append({"case": "bob: /ws/research on alice's session", "expect": 404, "got": got, "ok": got == 404})
    for path in ("/ws/live", "/ws/research"):
        with ws_connect(base, path) as ws:  # first message with a wrong key
            ws.send(json.dumps({"type": "auth", "key": "y" * 32}))
            code = ws_close_code(ws)
        rows.append({"case": f"wrong key (first message): {path}", "expect": 4401, "got": code, "ok": code == 4401})
        with ws_connect(base, path, origin="http://evil.example") as ws:
            code = ws_close_code(ws)
        rows.append({"case": f"foreign Origin: {path}", "expect": 4403, "got": code, "ok": code == 4403})

    # /ws/live: bob (header) and alice (first message) while alice generates and trains
    with ws_connect(base, "/ws/live", keys["bob"]) as bob, ws_connect(base, "/ws/live") as alice:
        alice.send(json.dumps({"type": "auth", "key": keys["alice"]}))
        ok = json.loads(alice.recv(timeout=10))
        A.post("/v1/generate", json={"prompt": "Live. ", "max_new_tokens": 3, "state_id": "iso-a"}).raise_for_status()
        A.post("/research/training-step", json={"run_id": "iso-run-a", "step": 2, "loss": 2.4}).raise_for_status()
        seen_alice = _collect(alice, lambda e: e.get("type") == "generation" and e.get("state_id") == "iso-a", 20)
        seen_bob = _collect(bob, lambda e: False, 3)
    leaked = [e for e in seen_bob if e.get("owner") == "alice" or e.get("state_id") == "iso-a"
              or e.get("run_id") == "iso-run-a"]
    rows.append({"case": "alice: /ws/live auth by first message", "expect": True, "got": ok.get("ok"),
                 "ok": ok.get("ok") is True and ok.get("owner") == "alice"})
    rows.append({"case": "alice: /ws/live gets her generation", "expect": True,
                 "got": any(e.get("type") == "generation" for e in seen_alice),
                 "ok": any(e.get("type") == "generation" for e in seen_alice)})
    rows.append({"case": "bob: /ws/live events of alice", "expect": 0, "got": len(leaked), "ok": not leaked})
    rows.append({"case": "bob: /ws/live gets global metrics", "expect": True,
                 "got": any(e.get("type") == "metrics" for e in seen_bob),
                 "ok": any(e.get("type") == "metrics" for e in seen_bob)})
    return rows


def _collect(ws, stop: Callable[[dict], bool], seconds: float) -> list[dict[str, Any]]:
    out, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            ev = json.loads(ws.recv(timeout=max(0.05, deadline - time.monotonic())))
        except TimeoutError:
            break
        out.append(ev)
        if stop(ev):
            break
    return out


# ------------------------------------------------------------------------------ quotas
def quota_figures(base: str, keys: dict[str, str], args: dict[str, Any], unauth_sockets: int = 20,
                  parallel_research: int = 4) -> dict[str, Any]:
    A, B = client(base, keys["alice"]), client(base, keys["bob"])
    cap = args["max_sessions_per_owner"]
    existing = len(_all_states(A))
    t0, created, refused = time.perf_counter(), 0, None
    for i in range(cap + 5):
        r = A.post("/v1/states", json={"state_id": f"quota-{i}"})
        if r.status_code == 201:
            created += 1
        else:
            refused = {"after": existing + created, "status": r.status_code, "code": r.json()["error"]["code"]}
            break
    create_s = time.perf_counter() - t0
    pages = _pages(A, limit=max(1, cap // 4))
    bob_ok = B.post("/v1/states", json={"state_id": "quota-bob"}).status_code
    sessions = {"cap": cap, "created": created, "held_before": existing, "refused": refused,
                "create_per_s": created / create_s if create_s else None, "list_pages": len(pages),
                "listed": sum(len(p) for p in pages), "other_owner_create_status": bob_ok}

    ws = _ws_caps(base, keys, args, unauth_sockets)
    research = _research_concurrency(A, args, parallel_research)
    for i in range(created):
        A.delete(f"/v1/state/quota-{i}")
    B.delete("/v1/state/quota-bob")
    return {"sessions": sessions, "websockets": ws, "research": research}


def _all_states(c: httpx.Client) -> list[str]:
    return [s for page in _pages(c, 1000) for s in page]


def _pages(c: httpx.Client, limit: int) -> list[list[str]]:
    pages, after = [], None
    while True:
        body = c.get("/v1/states", params={"limit": limit, **({"after": after} if after else {})}).json()
        pages.append([s["state_id"] for s in body["states"]])
        if not body["has_more"]:
            return pages
        after = body["next_after"]


def _ws_caps(base: str, keys: dict[str, str], args: dict[str, Any], unauth: int) -> dict[str, Any]:
    per_owner, total = args["max_ws_per_owner"], args["max_ws_total"]
    opened, refused_code = [], None
    for _ in range(per_owner + 2):
        ws = ws_connect(base, "/ws/live", keys["alice"])
        first = None
        try:
            first = json.loads(ws.recv(timeout=10))
        except Exception:
            pass
        if first and first.get("type") == "hello":
            opened.append(ws)
        else:
            refused_code = ws_close_code(ws, 2) or (ws.close_code if hasattr(ws, "close_code") else None)
            ws.close()
            break
    for ws in opened:
        ws.close()
    time.sleep(0.5)
    # sockets that never authenticate: closed after the 5 s window, and they count against the total
    t0 = time.perf_counter()
    pending = [ws_connect(base, "/ws/live") for _ in range(unauth)]
    with cf.ThreadPoolExecutor(16) as ex:
        codes = list(ex.map(lambda w: ws_close_code(w, 15), pending))
    closed_s = time.perf_counter() - t0
    for w in pending:
        w.close()
    return {"per_owner_cap": per_owner, "total_cap": total, "opened_by_one_owner": len(opened),
            "refused_close_code": refused_code, "unauthenticated": unauth,
            "unauthenticated_close_codes": {str(c): codes.count(c) for c in sorted(set(codes), key=str)},
            "unauthenticated_all_closed_s": closed_s}


def _research_concurrency(A: httpx.Client, args: dict[str, Any], n: int) -> dict[str, Any]:
    params = {"context_tokens": args["max_research_context_tokens"], "new_tokens": args["max_research_new_tokens"]}
    with cf.ThreadPoolExecutor(n) as ex:
        statuses = list(ex.map(lambda _: A.get("/research/efficiency-metrics", params=params).status_code, range(n)))
    over = A.get("/research/efficiency-metrics", params={"context_tokens": args["max_research_context_tokens"] + 1})
    return {"parallel": n, "concurrency_cap": args["research_concurrency_per_owner"],
            "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))},
            "over_context_cap_status": over.status_code}


# ------------------------------------------------------------------------------ schemathesis
def run_schemathesis(base: str, key: str, max_examples: int, max_time_s: float | None = None,
                     workers: int = 2, seed: int = 0, phases: str | None = None) -> dict[str, Any]:
    """``st run`` against ``base/openapi.json`` with ``key``; a summary from its JSON report.

    With ``max_time_s`` schemathesis repeats fuzzing until the budget is spent (the run lasts that
    long); without it, one pass of ``max_examples`` cases per operation. ``phases``: a comma list of
    examples, coverage, fuzzing, stateful (None: all four)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.json")
        cmd = [os.path.join(os.path.dirname(sys.executable), "st"), "run", f"{base}/openapi.json",
               "-H", f"Authorization: Bearer {key}", "--checks", CHECKS, "--max-examples", str(max_examples),
               "--workers", str(workers), "--seed", str(seed), "--request-timeout", "120",
               "--report", "json", "--report-json-path", report, "--warnings", "off", "--no-color"]
        if max_time_s:
            cmd += ["--max-time", str(int(max_time_s))]
        if phases:
            cmd += ["--phases", phases]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=(max_time_s or 1800) + 300,
                              cwd=tmp)  # its .schemathesis/ cache goes with the temp dir
        elapsed = time.perf_counter() - t0
        data = json.load(open(report)) if os.path.exists(report) else {}
    out = proc.stdout + proc.stderr
    return {"exit_code": proc.returncode, "seconds": elapsed, "max_examples": max_examples, "phases": phases,
            "summary": summarize_report(data), "output_tail": out[-4000:].replace(key, "***")}


def summarize_report(data: dict[str, Any]) -> dict[str, Any]:
    """Cases, operations and failures by check from schemathesis' JSON report (format of 4.32)."""
    failures: dict[str, int] = {}
    for f in data.get("failures", []):
        name = next((str(f[k]) for k in ("code", "check", "title", "name") if isinstance(f, dict) and k in f),
                    json.dumps(f)[:80])
        failures[name] = failures.get(name, 0) + 1
    accepted = rejected = 0
    for phases in (data.get("valid_rates") or {}).values():
        for counts in phases.values():
            accepted += counts.get("accepted", 0)
            rejected += counts.get("rejected", 0)
    cases = data.get("test_cases", {})
    return {"cases": cases.get("generated", 0), "cases_with_failures": cases.get("with_failures"),
            "unique_failures": cases.get("unique_failures"), "errored": cases.get("errored"),
            "operations": (data.get("operations") or {}).get("tested"), "failures_by_check": failures,
            "errors": [str(e)[:300] for e in data.get("errors", [])][:10],
            "phases": {k: v.get("status") for k, v in (data.get("phases") or {}).items()},
            "valid_cases_accepted": accepted, "valid_cases_rejected": rejected,
            "stop_reason": data.get("stop_reason")}


# ------------------------------------------------------------------------------ report
def render(result: dict[str, Any]) -> str:
    """Markdown of one result: where it ran, then the schemathesis, isolation and quota tables (the
    body of its entry in ``bench/README.md``; the ``.md`` file adds a heading)."""
    lines = [f"Device: CPU, {result.get('cpus')} cores; commit {result.get('commit') or 'unknown'}", ""]
    st = result.get("schemathesis")
    if st:
        s = st["summary"]
        lines += ["| schemathesis | value |", "|---|---|", f"| operations tested | {s['operations']} |",
                  f"| cases generated | {s['cases']} |", f"| max examples per operation | {st['max_examples']} |",
                  f"| phases | {', '.join(f'{k}: {v}' for k, v in s['phases'].items())} |",
                  f"| unique failures | {s['unique_failures']} {json.dumps(s['failures_by_check'])} |",
                  f"| errors | {len(s['errors'])} |", f"| stop reason | {s['stop_reason']} |",
                  f"| exit code | {st['exit_code']} |", f"| seconds | {st['seconds']:.0f} |", ""]
    iso = result.get("isolation")
    if iso:
        bad = [r for r in iso if not r["ok"]]
        lines += [f"Isolation: {len(iso) - len(bad)}/{len(iso)} cases as expected.", "",
                  "| case | expected | got | ok |", "|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['expect']} | {r['got']} | {'yes' if r['ok'] else '**NO**'} |" for r in iso]
        lines.append("")
    q = result.get("quotas")
    if q:
        s, w, r = q["sessions"], q["websockets"], q["research"]
        lines += ["| quota | figure |", "|---|---|",
                  f"| sessions per owner (cap {s['cap']}) | created {s['created']} (+{s['held_before']} held), "
                  f"then {s['refused']} |",
                  f"| session creation rate | {s['create_per_s']:.0f}/s |",
                  f"| listing | {s['listed']} sessions in {s['list_pages']} pages |",
                  f"| another owner meanwhile | {s['other_owner_create_status']} |",
                  f"| WebSockets of one owner (cap {w['per_owner_cap']}) | {w['opened_by_one_owner']} open, "
                  f"then close {w['refused_close_code']} |",
                  f"| {w['unauthenticated']} unauthenticated WebSockets | close codes "
                  f"{w['unauthenticated_close_codes']}, all closed in {w['unauthenticated_all_closed_s']:.1f} s |",
                  f"| {r['parallel']} parallel expensive research calls (cap {r['concurrency_cap']}) | {r['statuses']} |",
                  f"| research context over the cap | {r['over_context_cap_status']} |", ""]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--port", type=int, default=8126, help="port of the server this script starts")
    p.add_argument("--max-examples", type=int, default=100, help="schemathesis cases per operation")
    p.add_argument("--max-time", type=float, default=420.0, help="schemathesis time budget (s)")
    p.add_argument("--workers", type=int, default=2, help="schemathesis concurrent workers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sessions-cap", type=int, default=200, help="max_sessions_per_owner of the server")
    p.add_argument("--unauth-sockets", type=int, default=40, help="unauthenticated WebSockets to open")
    p.add_argument("--skip", nargs="*", default=[], choices=["schemathesis", "isolation", "quotas"])
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/abuse-<time>.json)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    import ray

    from serve.app import teardown

    keys = make_keys()
    tmp = tempfile.mkdtemp(prefix="dnc-abuse-")
    args = app_args(os.path.join(tmp, "storage"), write_keys_file(os.path.join(tmp, "keys"), keys),
                    max_sessions_per_owner=a.sessions_cap)
    ray.init(num_cpus=a.num_cpus, include_dashboard=False, log_to_driver=False)
    t0 = time.time()
    result: dict[str, Any] = {**provenance("abuse", argv),
                              "server": {k: v for k, v in args.items() if k not in ("storage", "api_keys_file")}}
    try:
        base = start_server(a.port, args)
        if "isolation" not in a.skip:
            result["isolation"] = isolation_matrix(base, keys)
        if "quotas" not in a.skip:
            result["quotas"] = quota_figures(base, keys, args, a.unauth_sockets)
        if "schemathesis" not in a.skip:
            result["schemathesis"] = run_schemathesis(base, keys["alice"], a.max_examples, a.max_time, a.workers, a.seed)
    finally:
        teardown(args)
        ray.shutdown()
    result["seconds"] = time.time() - t0
    out = a.out or os.path.join(ROOT, "bench", "results", f"abuse-{time.strftime('%Y%m%d-%H%M%S')}.json")
    write_json(out, result)
    md = "## Abuse tests (keys on)\n\n" + render(result)
    with open(out[:-5] + ".md", "w") as f:
        f.write(md + "\n")
    print(md)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
