"""bench/serve_load.py end to end, the way the lead runs it: one command that starts a local Ray
cluster and the Serve app, drives plain, streamed and chat clients (two client processes), runs
the in-process baseline, and writes its JSON and table. The server and the baseline run in
bfloat16 (``--dtype``, the serving dtype on GPUs), so the served bfloat16 path, chat sessions
included, runs here on the CPU too."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PORT = os.environ.get("DNC_SERVE_TEST_PORT", "8127")


@pytest.mark.ray
@pytest.mark.slow
def test_serve_load_one_command(tmp_path):
    out = tmp_path / "serve_load.json"
    argv = ["--port", PORT, "--num-cpus", "2", "--clients", "1", "3", "--requests", "6", "--max-new-tokens", "5",
            "--modes", "plain", "stream", "chat", "--turns", "2", "--client-procs", "2", "--prometheus", "--paired", "3",
            "--dtype", "bfloat16", "--server-set", "stream_events_per_s=1000", "--out", str(out)]
    # the cluster it starts exports metrics every 2 s, not 10 s, so --prometheus waits 4 s, not 12 s
    # (the series checked below are counters and histograms, all exported at 2 s)
    env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "RAY_metrics_report_interval_ms": "2000"}
    run = subprocess.run([sys.executable, "bench/serve_load.py", *argv], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(out.read_text())
    env = res["env"]
    assert res["benchmark"] == "serve_load" and env["argv"] == argv and env["torch"] == torch.__version__
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from report import git_commit

    assert env["command"].startswith("python bench/serve_load.py --port") and env["cpu"]
    assert env["commit"] == git_commit() and env["ray"] and env["python"]
    assert res["device"] == (env["gpu"] or env["cpu"])
    # the dtype asked for, as the server reports it (/model/stats), the baseline's and the started app's
    assert res["dtype"] == res["in_process"]["dtype"] == res["server_args"]["dtype"] == "bfloat16"
    assert res["server_args"]["stream_events_per_s"] == 1000  # --server-set reached the started app
    assert res["markdown"].startswith("Weights and session states in bfloat16 (in-process baseline: bfloat16).")
    rows = {(r["mode"], r["clients"]): r for r in res["results"]}
    assert set(rows) == {(m, c) for m in ("plain", "stream", "chat") for c in (1, 3)}
    for (mode, clients), r in rows.items():
        want = clients * 2 if mode == "chat" else 6
        assert r["requests"] == r["ok"] == want and r["errors"] == {}, r
        # every token the clients counted was made by the server during the measured requests
        assert r["server"]["requests"] == want and r["server"]["tokens"] == r["tokens"], r
        assert want <= r["tokens"] <= 5 * want and r["tokens_per_s"] > 0
        assert r["server"]["session_turns"] == (want if mode == "chat" else 0), r
        assert 0 < r["ttft_ms_p50"] <= r["latency_ms_p50"] <= r["latency_ms_p99"]
        if mode != "plain":  # client-side inter-token gaps from SSE arrival times
            assert r["ttft_at"] == "client" and r["itl_mean_ms_p50"] is not None and r["itl_ms_p50"] >= 0
    assert rows[("stream", 3)]["server_mean_batch"] > 1  # three streams at once decode together
    # the server's timeline of every measured request, split into stages (bench/serve_timeline.py)
    for (mode, clients), r in rows.items():
        line, gen = r["timeline"], r["generator"]
        assert line["latency"]["n"] == r["ok"] and ("ttft" in line) == (mode != "plain"), (mode, line)
        shares = [v["share_p50"] for k, v in line["latency"].items() if k != "n"]
        assert all(-0.5 < x < 1.0 for x in shares) and line["latency"]["decode"]["p50_ms"] > 0
        assert (line["latency"]["session"]["p50_ms"] > 0) == (mode == "chat")
        assert 0 < gen["stepping_fraction"] <= gen["busy_fraction"] < 1.5 and gen["steps_per_s"] > 0, gen
        assert gen["mean_rows_per_call"] == pytest.approx(r["server_mean_batch"])
    assert "Where the client latency goes" in res["markdown"] and "Where the client TTFT goes" in res["markdown"]
    # the CPU each kind of Serve process spent on a level's measured requests, read inside the actors
    for (mode, clients), r in rows.items():
        cpu = r["cpu"]
        assert set(cpu["seconds"]) == {"proxy", "ingress", "generator"} and min(cpu["seconds"].values()) > 0, cpu
        assert cpu["ms_per_request"]["ingress"] == pytest.approx(cpu["seconds"]["ingress"] * 1e3 / r["ok"])
        assert cpu["ms_per_token"]["generator"] == pytest.approx(cpu["seconds"]["generator"] * 1e3 / r["tokens"])
        if mode == "plain":
            assert cpu["events"] is None and cpu["ms_per_event"] is None
        else:  # every streamed request got at least its first event and its `done`
            assert r["ok"] <= cpu["events"] <= r["tokens"] + r["ok"], cpu
    assert "| stream | 3 | 6 |" in res["markdown"].split("CPU of Serve's processes")[1]
    base = res["in_process"]
    assert base["requests"] == 6 and 0 < base["ttft_ms_p50"] < base["latency_ms_p50"]
    assert set(base["batched"]) == {"1", "3"} and all(b["tokens"] <= b["rows"] * 5 for b in base["batched"].values())
    assert "| stream | 3 | 6 | 0 |" in res["markdown"] and "in-process, BatchDecoder" in run.stdout
    assert [t["target"] for t in res["targets"]] == ["served vs in-process at 1 client, p50 latency added ms"]
    # the server's Prometheus series over the whole run: every measured and warm-up request
    prom = res["prometheus"]["series"]
    generations = sum(r["requests"] + r["clients"] for r in rows.values())  # one warm-up request per client
    assert prom["ray_dnc_generations_total"] == generations
    assert prom["ray_dnc_time_to_first_token_ms"]["count"] == generations
    warmups = sum(r["clients"] for r in rows.values())  # at least one token each
    assert prom["ray_dnc_generated_tokens_total"] >= sum(r["tokens"] for r in rows.values()) + warmups
    assert prom["ray_dnc_http_requests_total"] >= generations + 2 * len(rows)  # + /model/stats before, after
    assert prom["ray_dnc_durable_bytes_per_turn"]["count"] == rows[("chat", 1)]["requests"] + rows[("chat", 3)]["requests"]
    # paired at one client: served and in-process back to back, the same greedy tokens each time
    for mode in ("plain", "stream"):
        p = res["paired"][mode]
        assert p["pairs"] == len(p["rows"]) == 3 and p["same_tokens"], p
        assert all(r["served_tokens"] == r["in_process_tokens"] >= 1 for r in p["rows"]), p
        diffs = sorted(r["served_ms"] - r["in_process_ms"] for r in p["rows"])
        assert p["added_ms_p50"] == diffs[1] and 0 < p["served_ms_p50"] and 0 < p["in_process_ms_p50"]
    plain = res["paired"]["plain"]
    assert all(0 < r["generator_ms"] <= r["served_ms"] for r in plain["rows"])  # the Generator's time is inside
    assert "| paired, 1 client | pairs |" in res["markdown"]


REFUSALS = [
    (["--server-set", "nope=1"], "expected KEY=VALUE with KEY an AppArgs field"),
    (["--server-set", "stream_events_per_s"], "expected KEY=VALUE"),
    (["--server-set", "stream_events_per_s=-1"], "stream_events_per_s: Input should be greater than or equal to 0"),
    # session 12 lost a GPU run's JSON: --tag won and --out, the folder that came back, was ignored
    (["--tag", "x", "--out", "/tmp/x.json"], "give --tag (bench/results/<tag>.json) or --out (a JSON path), not both"),
]


@pytest.fixture(scope="module")
def refusals() -> dict[tuple[str, ...], dict]:
    """Every REFUSALS command line run by one interpreter (tests/script_runner.py, each as if alone):
    one torch import, not four. Keyed by the arguments."""
    argvs = [["bench/serve_load.py", *args] for args, _ in REFUSALS]
    run = subprocess.run([sys.executable, "tests/script_runner.py", json.dumps(argvs)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return {tuple(r["argv"][1:]): r for r in json.loads(run.stdout)}


@pytest.mark.parametrize("args, message", REFUSALS)
def test_serve_load_refuses_bad_arguments_before_starting_anything(args, message, refusals):
    r = refusals[tuple(args)]
    assert r["code"] != 0 and message in r["stderr"], r["stderr"][-2000:]
