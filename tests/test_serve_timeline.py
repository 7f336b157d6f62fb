"""A served request's timeline (issue 14: where a streamed request's time goes).

* In-process, on the tiny model: the scheduler stamps each request's stages in order, spaces a
  request's token lists by the running requests under load (``events_per_s``), and merges lists
  that piled up while the consumer was busy into one, every token once and in order.
* Over real HTTP (real local Ray cluster, the real Serve app on ``$DNC_SERVE_TEST_PORT``): plain,
  streamed and session responses carry the Generator's and the ingress's stages in
  ``timing.timeline``, and a session's turns (``GET /v1/state/{id}``) name the dtype they were
  decoded in.
* Session defects over real HTTP, on the same app: clients that leave before or during a session
  turn; such a turn is not saved behind the client's back.
* bench/serve_timeline.py: the stages it derives add up to the client's latency and TTFT.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from dnc.generate import BatchDecoder, DecodeRow, SamplingParams, StepToken
from dnc.model import DNC
from serve.scheduler import TIMELINE_STAMPS, DecodeScheduler, _Iteration, _Job, timeline_ms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PORT = int(os.environ.get("DNC_SERVE_TEST_PORT", "8123"))  # conftest.SERVE_PORT: one Serve for every module


@pytest.fixture(scope="module")
def model():
    from dnc.config import preset

    torch.manual_seed(0)
    return DNC(preset("tiny")).eval()


def _runner():
    pool = ThreadPoolExecutor(1)

    async def run(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
    return pool, run


def test_scheduler_stamps_every_stage_in_order(model):
    """Two requests together: each timing gets the stamps in the order the stages happen, the
    events it was handed, and ms offsets from :func:`timeline_ms`."""
    pool, run = _runner()

    async def main():
        sch = DecodeScheduler(model, run, chunk_s=0.0)
        timings = [{}, {}]
        rows = [DecodeRow(list(b"stamp %d" % i), None, 6, SamplingParams(0.0)) for i in range(2)]

        async def one(row, timing):
            return [st.index async for steps in sch.submit(row, timing) for st in steps]
        got = await asyncio.gather(*(one(r, t) for r, t in zip(rows, timings)))
        return sch, got, timings
    sch, got, timings = asyncio.run(main())
    pool.shutdown()
    assert got == [list(range(6))] * 2
    for t in timings:
        stamps = [t["submitted"]] + [t[k] for k in TIMELINE_STAMPS]
        assert stamps == sorted(stamps), t
        assert t["first_token"] < t["last_token"] and 1 <= t["events"] <= 6
        line = timeline_ms(t, t["submitted"])
        assert set(line) == {f"{k}_ms" for k in TIMELINE_STAMPS} | {"events", "event_lag_ms_mean"}
        assert line["admitted_ms"] >= 0 and line["last_event_ms"] == pytest.approx((t["last_event"] - t["submitted"]) * 1e3)
    st = sch.stats
    assert st["iterations"] >= 1 and 0 < st["step_s"] <= st["busy_s"] and st["prefill_s"] > 0 and st["hop_s"] >= 0


def test_pacing_grows_with_running_requests(model):
    """``events_per_s`` = 1000: with 3 requests running the gap stays ``chunk_s`` (10 ms), with 40
    it is 40 / 1000 = 40 ms; a request that ends still gets its tokens at once."""
    sch = DecodeScheduler(model, run=None, chunk_s=0.010, events_per_s=1000)
    assert DecodeScheduler(model, run=None, chunk_s=0.010).pacing_s() == 0.010  # 0: no cap
    now = [0.0]
    sch.clock = lambda: now[0]
    rows = [DecodeRow(list(b"row %02d" % i), None, 100, SamplingParams(0.0)) for i in range(40)]
    jobs = [_Job(r, {}) for r in rows]
    for j in jobs[:3]:
        sch.active[id(j.row)] = j
    assert sch.pacing_s() == 0.010
    for j in jobs[3:]:
        sch.active[id(j.row)] = j
    assert sch.pacing_s() == pytest.approx(0.040)

    def step(t: float, index: int) -> list[int]:
        """One iteration at time ``t`` giving every row token ``index``; lists handed to row 0."""
        now[0] = t
        sch._hand_out(_Iteration([StepToken(r, 1, index, r.finish_reason) for r in rows], []))
        out = []
        while not jobs[0].queue.empty():
            item = jobs[0].queue.get_nowait()
            out.append(None if item is None else [st.index for st in item])
        return out
    assert step(0.0, 0) == [[0]]  # the first token at once
    assert step(0.012, 1) == [] and step(0.035, 2) == []  # > chunk_s but < 40 ms: held
    assert step(0.045, 3) == [[1, 2, 3]]
    rows[0].finish_reason = "length"
    assert step(0.050, 4) == [[4], None]  # the last list at once, then the end


def test_lists_that_pile_up_go_out_as_one(model):
    """A consumer that stalls its asyncio loop after the first list: the lists handed meanwhile come
    out as one, in order; the row's tokens equal the same row decoded alone."""
    pool, run = _runner()
    prompt, n = list(b"a consumer that falls behind"), 24

    async def main():
        sch = DecodeScheduler(model, run, chunk_s=0.0)  # a list every iteration
        row, timing, lists = DecodeRow(prompt, None, n, SamplingParams(0.0)), {}, []
        async for steps in sch.submit(row, timing):
            lists.append([st.index for st in steps])
            if len(lists) == 1:
                await asyncio.sleep(0.3)  # the model thread keeps decoding meanwhile
        return row, timing, lists
    row, timing, lists = asyncio.run(main())
    pool.shutdown()
    assert [i for li in lists for i in li] == list(range(n))
    assert lists[0] == [0] and len(lists) < timing["events"], (lists, timing["events"])
    assert timing["event_lag_s"] >= 0.2  # the piled-up lists waited for the consumer
    alone = BatchDecoder(model, 1)
    ref = DecodeRow(prompt, None, n, SamplingParams(0.0))
    alone.add([ref])
    while alone.running:
        alone.step()
    assert row.tokens == ref.tokens


def test_bench_stages_add_up_to_the_client_figures():
    """bench/serve_timeline.py: the latency and TTFT splits sum to what the client measured, and
    aggregate() gives each stage's p50 and share."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from serve_timeline import LATENCY_STAGES, TTFT_STAGES, aggregate, latency_stages, ttft_stages

    t = {"admitted_ms": 2.0, "prefilled_ms": 9.0, "first_token_ms": 12.0, "first_event_ms": 12.5,
         "first_yield_ms": 13.0, "last_token_ms": 40.0, "last_event_ms": 40.5, "done_ms": 41.0, "events": 4,
         "event_lag_ms_mean": 0.3, "session_ready_ms": 1.0, "ingress_body_ms": 0.05, "ingress_handler_ms": 0.2,
         "ingress_sent_ms": 0.5,
         "ingress_first_event_ms": 16.0, "ingress_done_ms": 45.0}
    lat, first = latency_stages(60.0, t), ttft_stages(25.0, t)
    assert list(lat) == list(LATENCY_STAGES) and list(first) == list(TTFT_STAGES)
    assert sum(lat.values()) == pytest.approx(60.0) and sum(first.values()) == pytest.approx(25.0)
    assert lat["body"] == 0.05 and lat["asgi"] == pytest.approx(0.15) and lat["ingress"] == pytest.approx(0.3)
    assert lat["http"] == 15.0 and lat["ray"] == pytest.approx(45.0 - 0.5 - 41.0) and lat["decode"] == 31.0
    assert first["ray"] == pytest.approx(16.0 - 0.5 - 13.0) and first["loop"] == pytest.approx(0.5)
    assert latency_stages(60.0, {k: v for k, v in t.items() if k != "done_ms"}) is None
    agg = aggregate([{"latency": 0.060, "ttft": 0.025, "timeline": t},
                     {"latency": 0.1, "ttft": None, "timeline": None}], True)
    assert agg["latency"]["n"] == 1 and agg["latency"]["decode"] == {"p50_ms": 31.0, "share_p50": pytest.approx(31 / 60)}
    assert agg["ttft"]["n"] == 1 and agg["events_p50"] == 4


# ------------------------------------------------------------------------------ over real HTTP
# One Serve app for this module's HTTP tests: the timeline's and the session-defect guards below (they
# had an app of their own in tests/test_session_defects_http.py; one app start and teardown fewer, ~20 s
# of CI). The defect guards need turns long enough to be surely in flight (``max_new_tokens`` up to
# LONG); the timeline's tests ask for a few tokens each and run the same either way.
LONG = 4096  # tokens (the most a server allows): seconds of the tiny model on a CPU, so the turn is surely in flight


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):
    from conftest import serve_app

    args = {"storage": str(tmp_path_factory.mktemp("timeline-storage")), "manager_interval_s": 0.5,
            "auto_compact": False, "max_new_tokens": LONG, "bank_shards": 1, "live_interval_s": 5.0}
    yield from serve_app(args, PORT, "dnc-test-timeline")


GEN_STAGES = ("admitted_ms", "prefilled_ms", "first_token_ms", "first_event_ms", "first_yield_ms",
              "last_token_ms", "last_event_ms", "done_ms")


def _check_generator_stages(line: dict, tokens: int) -> None:
    got = [line[k] for k in GEN_STAGES if k != "first_yield_ms" or line.get(k) is not None]
    assert got == sorted(got) and got[0] >= 0, line
    assert 1 <= line["events"] <= tokens and line["event_lag_ms_mean"] >= 0


@pytest.mark.ray
def test_plain_streamed_and_session_responses_carry_their_timeline(client):
    body = {"prompt": "Where does the time go? ", "max_new_tokens": 8, "temperature": 0.0}
    plain = client.post("/v1/generate", json=body).json()
    line = plain["timing"]["timeline"]
    _check_generator_stages(line, plain["tokens"])
    # the ingress's clock: it sent the request before the Generator's work, got it back after
    assert 0 < line["ingress_body_ms"] <= line["ingress_handler_ms"] < line["ingress_sent_ms"] < line["ingress_done_ms"]
    assert line["ingress_done_ms"] >= line["done_ms"]
    assert line["ingress_first_event_ms"] is None and line["session_ready_ms"] is None

    events = []
    with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        events = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: ")]
    done = events[-1]
    assert done["type"] == "done" and [e["index"] for e in events[:-1]] == list(range(done["tokens"]))
    line = done["timing"]["timeline"]
    _check_generator_stages(line, done["tokens"])
    assert line["ingress_sent_ms"] < line["ingress_first_event_ms"] < line["ingress_done_ms"]
    # every Generator event reached the ingress, the done event too
    assert line["ingress_events"] <= line["events"] + 1 and line["ingress_events"] >= 2
    assert line["ingress_first_event_ms"] - line["ingress_sent_ms"] >= line["first_yield_ms"]

    turn = client.post("/v1/generate", json={**body, "state_id": "timeline-s", "stream": True})
    assert turn.status_code == 200
    done = json.loads([ln for ln in turn.text.splitlines() if ln.startswith('data: {"type": "done"')][0][6:])
    line = done["timing"]["timeline"]
    _check_generator_stages(line, done["tokens"])
    assert 0 <= line["session_ready_ms"] <= line["admitted_ms"]  # the state was resident before admission
    assert line["done_ms"] > line["last_event_ms"]  # after the turn was made durable


@pytest.mark.ray
def test_session_turns_name_their_dtype_over_http(client):
    """The turns list of a session (``GET /v1/state/{id}``, ``history``) keeps each turn's dtype:
    the served model's for generate turns, none for the create record."""
    sid = f"timeline-dtype-{int(time.time() * 1e3)}"
    for k in range(2):
        r = client.post("/v1/generate", json={"prompt": f"turn {k} ", "max_new_tokens": 3, "state_id": sid})
        assert r.status_code == 200, r.text
    served = client.get("/model/stats").json()["dtype"].removeprefix("torch.")
    hist = client.get(f"/v1/state/{sid}").json()["history"]
    gen = [h for h in hist if h["kind"] == "generate"]
    assert len(gen) == 2 and all(h["dtype"] == served for h in gen), hist
    assert all(h["dtype"] is None for h in hist if h["kind"] != "generate")


def test_every_request_gets_exactly_its_tokens_under_load_pacing(model):
    """Twelve requests of 1..12 new tokens, arriving staggered, paced as under load (``events_per_s``
    = 50: lists 240 ms apart at 12 running): each request gets every token once, in order, equal to
    its row decoded alone, and then its end."""
    pool, run = _runner()

    async def main():
        sch = DecodeScheduler(model, run, chunk_s=0.0, events_per_s=50)

        async def one(k: int):
            await asyncio.sleep(0.004 * k)
            row = DecodeRow(list(b"request %02d" % k), None, k, SamplingParams(0.0))
            got = [(st.index, st.token) async for steps in sch.submit(row) for st in steps]
            return row, got
        return await asyncio.gather(*(one(k) for k in range(1, 13)))
    out = asyncio.run(main())
    pool.shutdown()
    for row, got in out:
        alone = BatchDecoder(model, 1)
        ref = DecodeRow(list(row.prompt_ids), None, row.max_new_tokens, SamplingParams(0.0))
        alone.add([ref])
        while alone.running:
            alone.step()
        assert got == list(enumerate(ref.tokens)) and row.finish_reason == ref.finish_reason, (row.max_new_tokens, got)


# ------------------------------------------------------------------------------ session defects over HTTP
# (session 15 audit) Clients that leave before or during a session turn. A turn is saved only when its
# client can be told (the response, or the stream's ``done`` event); one whose client left is not saved,
# so the client's retry does not apply it twice and the next turn sees what the client saw. They run on
# this module's app (``server`` above).
def _body(sid, n, **kw):
    # greedy: the tiny untrained model then repeats a token and never ends a long turn early (its
    # end-of-text token comes about once in 260 sampled ones)
    return {"prompt": "Hello there. ", "max_new_tokens": n, "state_id": sid, "temperature": 0.0, **kw}


def _seq(client, sid) -> int:
    r = client.get(f"/v1/state/{sid}")
    assert r.status_code == 200, r.text
    return r.json()["seq"]


def _wait_idle(client, sid, timeout_s=60.0):
    """Until a turn on ``sid`` can begin at once (no lease held), so what was saved is settled."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = client.post("/v1/generate", json=_body(sid, 1))
        if r.status_code == 200:
            return r.json()["state"]["seq"]
        time.sleep(0.5)
    raise AssertionError(f"{sid} stayed busy")


@pytest.mark.ray
@pytest.mark.parametrize("stream", [False, True])
def test_a_request_that_left_while_waiting_for_its_session_saves_nothing(client, stream):
    """Turn A holds the session; request B for it waits for the lease, and B's client gives up (its
    timeout) before B's turn began. After A, B's turn must not run and be saved behind the client's
    back."""
    sid = f"left-waiting-{int(stream)}"
    assert client.post("/v1/generate", json=_body(sid, 2)).status_code == 200
    with ThreadPoolExecutor(1) as pool:
        a = pool.submit(client.post, "/v1/generate", json=_body(sid, LONG))
        time.sleep(1.5)  # A has the lease and decodes
        with httpx.Client(base_url=client.base_url, timeout=1.0) as impatient:
            try:
                if stream:
                    with impatient.stream("POST", "/v1/generate", json=_body(sid, 4, stream=True)) as r:
                        got = (r.status_code, r.read()[:300])
                else:
                    r = impatient.post("/v1/generate", json=_body(sid, 4))
                    got = (r.status_code, r.text[:300])
            except httpx.TimeoutException:
                got = None
        assert got is None, (got, a.done() and a.result().text[:300])
        ra = a.result()
    assert ra.status_code == 200, ra.text
    assert ra.json()["state"]["seq"] == 2
    time.sleep(3.0)  # B would have had the lease and its few tokens by now
    assert _seq(client, sid) == 2
    assert _wait_idle(client, sid) == 3


@pytest.mark.ray
def test_a_client_that_leaves_mid_stream_is_not_saved(client):
    """A streamed session turn whose client disconnects after the first tokens is rolled back: the
    client never got ``done``, and its next turn must not build on text it never saw."""
    sid = "left-mid-stream"
    assert client.post("/v1/generate", json=_body(sid, 2)).status_code == 200
    with httpx.Client(base_url=client.base_url, timeout=60) as c:
        with c.stream("POST", "/v1/generate", json=_body(sid, LONG, stream=True)) as r:
            assert r.status_code == 200
            next(r.iter_bytes())  # the first tokens, then the client goes away
    time.sleep(2.0)
    assert _wait_idle(client, sid) == 2  # the left turn was never saved; this one is seq 2
