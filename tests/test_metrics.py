"""Serving metrics (serve/metrics.py): real HTTP requests against the real Serve app on a real local
Ray cluster, then a scrape of the node's Prometheus endpoint (``ray.nodes()[0]["MetricsExportPort"]``)
that must show every series with values that follow from those requests. The scheduler's JSON-view
figures are checked in-process on the tiny model.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import httpx
import pytest

from serve.metrics import parse_prometheus, summarize_scrape

PORT = int(os.environ.get("DNC_SERVE_TEST_PORT", "8123"))  # conftest.SERVE_PORT: one Serve for every module
BASE = f"http://127.0.0.1:{PORT}"
APP = "dnc-metrics-test"


def series(samples, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    """Samples of ``name`` from this test's app whose labels include ``labels``."""
    return [(lab, v) for n, lab, v in samples
            if n == name and lab.get("application") == APP and all(lab.get(k) == x for k, x in labels.items())]


def total(samples, name: str, **labels: str) -> float:
    return sum(v for _, v in series(samples, name, **labels))


def bucket(samples, name: str, le: float, **labels: str) -> float:
    """Observations <= ``le`` (summed over replicas)."""
    return sum(v for lab, v in series(samples, name + "_bucket", **labels) if float(lab["le"]) == le)


# ------------------------------------------------------------------------------ in-process
def test_recording_never_fails_outside_ray():
    """The hooks are called on request paths: zero or odd values must not raise (Ray's counters
    reject 0), and they work in a process that never started Ray."""
    from serve.metrics import ServeMetrics, record_durable_bytes, route_label, set_resident_sessions

    m = ServeMetrics()
    m.record_tokens(0)
    m.record_tokens(5)
    m.record_decode_steps([], [])
    m.record_decode_steps([3, 1], [2.5])
    m.record_generation("sessionless", None)
    m.record_ttft(0.0, "session")
    m.set_queue(0, 0)
    m.record_http("/v1/generate", "POST", 200, 1.5)
    record_durable_bytes(0)
    record_durable_bytes(12345)
    set_resident_sessions(-1)
    assert route_label({}) == "unmatched"
    assert route_label({"root_path": "/ui", "app_root_path": ""}) == "/ui"


def test_scrape_summary_quantiles_from_buckets():
    text = "\n".join([
        "# TYPE ray_dnc_x_ms histogram",
        'ray_dnc_x_ms_bucket{application="a",replica="r1",le="1.0"} 1.0',
        'ray_dnc_x_ms_bucket{application="a",replica="r1",le="10.0"} 60.0',
        'ray_dnc_x_ms_bucket{application="a",replica="r1",le="+Inf"} 100.0',
        'ray_dnc_x_ms_count{application="a",replica="r1"} 100.0',
        'ray_dnc_x_ms_sum{application="a",replica="r1"} 5.5',
        'ray_dnc_tokens_total{application="a",replica="r1"} 3.0',
        'ray_dnc_tokens_total{application="a",replica="r2"} 4.0',
        'ray_dnc_tokens_total{application="b",replica="r3"} 100.0',
        'ray_serve_other_total{application="a"} 1.0'])
    summary = summarize_scrape(parse_prometheus(text), application="a")
    assert summary == {"ray_dnc_x_ms": {"count": 100.0, "buckets": {"1.0": 1.0, "10.0": 60.0, "+Inf": 100.0},
                                        "p50_le": "10.0", "p99_le": "+Inf"},
                       "ray_dnc_tokens_total": 7.0}


def test_scheduler_reports_tokens_and_inter_token_times(tiny_config):
    """The scheduler counts every token it hands out and times each step a running row waits for
    its next token (the JSON view's tokens/s and inter-token percentiles)."""
    import torch
    from concurrent.futures import ThreadPoolExecutor

    from dnc.generate import DecodeRow, SamplingParams
    from dnc.model import DNC
    from serve.scheduler import DecodeScheduler

    torch.manual_seed(0)
    model = DNC(tiny_config).eval()
    pool = ThreadPoolExecutor(1)

    async def run(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def main():
        sch = DecodeScheduler(model, run, chunk_s=0.0)
        rows = [DecodeRow(list(b"metrics row %d" % i), None, n, SamplingParams(0.0)) for i, n in enumerate((5, 9))]

        async def consume(row):
            return sum([len(steps) async for steps in sch.submit(row)])
        got = await asyncio.gather(*(consume(r) for r in rows))
        return sch, got
    sch, got = asyncio.run(main())
    pool.shutdown()
    assert got == [5, 9] and sch.stats["tokens"] == 14
    recent = sch.recent(window_s=60.0)
    assert recent["tokens_per_s"] == pytest.approx(14 / 60.0)
    # 9 steps in all; the first gives both rows their first token, each later one an inter-token time
    assert len(sch._recent_itl_ms) == 8 and all(ms > 0 for ms in sch._recent_itl_ms)
    assert 0 < recent["inter_token_ms_p50"] <= recent["inter_token_ms_p99"] < 10_000


# ------------------------------------------------------------------------------ real cluster
@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    from conftest import serve_app

    args = {"storage": str(tmp_path_factory.mktemp("metrics-storage")), "manager_interval_s": 0,
            "max_new_tokens": 64, "bank_shards": 1, "batch_wait_timeout_s": 0.0}
    yield from serve_app(args, PORT, APP)


def scrape_until(ray_cluster, ready, timeout_s: float = 90.0):
    """Scrape the node's metrics endpoint until ``ready(samples)`` (Ray exports every ~10 s)."""
    port = ray_cluster.nodes()[0]["MetricsExportPort"]
    deadline, samples = time.monotonic() + timeout_s, []
    while time.monotonic() < deadline:
        try:
            samples = parse_prometheus(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)
        except httpx.HTTPError:
            samples = []
        if ready(samples):
            return samples
        time.sleep(0.5)  # a scrape is one local GET; the export (every ~10 s) is seen ~0.75 s sooner than at 2 s
    names = sorted({n for n, lab, _ in samples if n.startswith("ray_dnc_")})
    pytest.fail(f"metrics not exported within {timeout_s:.0f} s; dnc series seen: {names}")


@pytest.mark.ray
@pytest.mark.slow
def test_prometheus_endpoint_shows_serving_metrics(served, ray_cluster):
    tokens = 0
    with httpx.Client(base_url=served, timeout=120) as c:
        for i in range(2):  # sessionless, whole
            r = c.post("/v1/generate", json={"prompt": f"plain request {i}", "max_new_tokens": 7, "temperature": 0.0})
            assert r.status_code == 200, r.text
            tokens += r.json()["tokens"]
        with c.stream("POST", "/v1/generate", json={"prompt": "streamed", "max_new_tokens": 9,
                                                    "temperature": 0.0, "stream": True}) as r:
            assert r.status_code == 200
            events = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: ")]
        assert events[-1]["type"] == "done" and sum(e["type"] == "token" for e in events) >= events[-1]["tokens"]
        tokens += events[-1]["tokens"]
        for turn in range(2):  # a session: two acknowledged turns
            r = c.post("/v1/generate", json={"prompt": f"turn {turn} of a chat", "max_new_tokens": 6,
                                             "state_id": "metrics-chat", "temperature": 0.0})
            assert r.status_code == 200, r.text
            tokens += r.json()["tokens"]
        assert c.get("/v1/state/never-made").status_code == 404
        assert c.post("/v1/generate", json={"prompt": "x", "max_new_tokens": "lots"}).status_code == 422
        serving = c.get("/model/stats").json()["serving"]
        stats = serving["generator"]
    # the JSON view agrees with the requests
    assert serving["sessions"] == serving["resident_sessions"] == 1  # one chat, in shard memory
    assert stats["decoded_tokens"] == tokens == stats["tokens_generated"]
    assert stats["inter_token_ms_p50"] > 0 and stats["durable_bytes_per_turn_p50"] > 1000
    durable = stats["durable_bytes_per_turn_p50"]

    def ready(s):
        return (total(s, "ray_dnc_generated_tokens_total") >= tokens
                and total(s, "ray_dnc_durable_bytes_per_turn_count") >= 2
                and total(s, "ray_dnc_resident_sessions", tier="store") >= 1
                and total(s, "ray_dnc_http_requests_total", route="/v1/state/{state_id}") >= 1)
    s = scrape_until(ray_cluster, ready)
    # tokens/s: a counter of every decoded token (rate() of it is tokens/s)
    assert total(s, "ray_dnc_generated_tokens_total") == tokens
    assert {lab["deployment"] for lab, _ in series(s, "ray_dnc_generated_tokens_total")} == {"Generator"}
    # finished generations by kind; TTFT: one observation per generation, all under the timeout
    assert total(s, "ray_dnc_generations_total", kind="sessionless") == 3
    assert total(s, "ray_dnc_generations_total", kind="session") == 2
    assert total(s, "ray_dnc_time_to_first_token_ms_count") == 5
    assert bucket(s, "ray_dnc_time_to_first_token_ms", 30000) == 5
    # one request at a time: one decode step (a model call of one row) per token, and an
    # inter-token time for every step but each request's first
    itl = total(s, "ray_dnc_inter_token_latency_ms_count")
    assert itl == tokens - 5 and bucket(s, "ray_dnc_inter_token_latency_ms", 1000) == itl
    assert total(s, "ray_dnc_decode_batch_size_count") == tokens == bucket(s, "ray_dnc_decode_batch_size", 1)
    # nothing is waiting or running any more
    assert series(s, "ray_dnc_queue_depth") and total(s, "ray_dnc_queue_depth") == 0
    assert series(s, "ray_dnc_running_requests") and total(s, "ray_dnc_running_requests") == 0
    # the session's bank is resident in the store's memory (the budget is far above one tiny bank)
    assert total(s, "ray_dnc_resident_sessions", tier="store") == 1
    # bytes made durable: two turns, in the bucket that holds what the JSON view reports
    assert total(s, "ray_dnc_durable_bytes_per_turn_count") == 2
    bounds = sorted({float(lab["le"]) for lab, _ in series(s, "ray_dnc_durable_bytes_per_turn_bucket")})
    le = next(b for b in bounds if durable <= b)
    assert bucket(s, "ray_dnc_durable_bytes_per_turn", le) == 2
    assert all(bucket(s, "ray_dnc_durable_bytes_per_turn", b) == 0 for b in bounds if b < durable / 4)
    # HTTP requests by route template, method and status (from the ingress)
    assert total(s, "ray_dnc_http_requests_total", route="/v1/generate", method="POST", status="200") == 5
    assert total(s, "ray_dnc_http_requests_total", route="/v1/generate", status="422") == 1
    assert total(s, "ray_dnc_http_requests_total", route="/v1/state/{state_id}", method="GET", status="404") == 1
    assert {lab["deployment"] for lab, _ in series(s, "ray_dnc_http_requests_total")} == {"Ingress"}
    assert total(s, "ray_dnc_http_request_ms_count", route="/v1/generate") == 6
    # the summary the benchmark stores agrees with the series
    summary = summarize_scrape(s, application=APP)
    assert summary["ray_dnc_generated_tokens_total"] == tokens
    ttft = summary["ray_dnc_time_to_first_token_ms"]
    assert ttft["count"] == 5 and ttft["buckets"]["+Inf"] == 5 and ttft["p50_le"] is not None
    assert float(summary["ray_dnc_durable_bytes_per_turn"]["p99_le"]) >= durable
