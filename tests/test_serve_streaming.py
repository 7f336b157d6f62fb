"""The ingress under many streams, on the real Serve app (real local Ray cluster, real HTTP):

* a stream's tokens go out one write per decode iteration: several SSE events in one HTTP chunk,
  each still its own ``data:`` event of the schema clients parse (``/v1/generate`` and OpenAI);
* the Generator takes more than the old constant 64 streams at once (``generator_max_ongoing_requests``,
  default 256) and decodes them all together;
* plain (whole) requests, streams and OpenAI completions join the same continuous batch;
* ``ingress_one_loop`` reaches the ingress replicas' processes (and only them): their FastAPI app
  and Generator handle run on the replica's main loop, and every test here runs that way.

One app for the module on ``$DNC_SERVE_TEST_PORT`` (tiny untrained model, two ingress replicas);
Serve and the app's detached actors are removed at module end.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import os
import time

import httpx
import pytest
from pydantic import ValidationError
from conftest import serve_app

pytestmark = pytest.mark.ray

PORT = int(os.environ.get("DNC_SERVE_TEST_PORT", "8123"))
BASE = f"http://127.0.0.1:{PORT}"
PROMPT = "Every stream in this module starts alike. "  # one prompt length: one state layout


@pytest.fixture(scope="module")
def app_args(tmp_path_factory):
    # an idle replica waits 0.5 s for company, so requests sent together prefill (and decode) together
    return {"storage": str(tmp_path_factory.mktemp("serve-storage")), "manager_interval_s": 0,
            "max_new_tokens": 128, "batch_wait_timeout_s": 0.5, "bank_shards": 1, "live_interval_s": 5.0,
            "ingress_replicas": 2,  # requests spread over two ingress replicas, one Generator
            "ingress_one_loop": True}  # every stream test below runs on the ingress's one event loop


@pytest.fixture(scope="module")
def server(ray_cluster, app_args):
    yield from serve_app(app_args, PORT, "dnc-test-streaming")



def _stats(client) -> dict:
    return client.get("/model/stats").json()["serving"]["generator"]


def _raw_pieces(client, path: str, body: dict) -> list[bytes]:
    """The response body as the client's HTTP parser hands it over. With chunked transfer encoding
    a piece never spans two chunks, and every write of the ingress is one chunk."""
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers.get("transfer-encoding") == "chunked"
        return list(r.iter_raw())


def _events(body: bytes) -> list:
    """SSE events of a body: blank-line separated blocks of ``data:`` lines."""
    out = []
    for block in body.decode().split("\n\n"):
        data = [ln[6:] for ln in block.split("\n") if ln.startswith("data: ")]
        if data:
            d = "\n".join(data)
            out.append(d if d == "[DONE]" else json.loads(d))
    return out


# ------------------------------------------------------------------------------ config
def test_max_ongoing_requests_are_typed_and_checked():
    from serve.app import AppArgs

    a = AppArgs()
    assert a.generator_max_ongoing_requests >= 256 and a.ingress_max_ongoing_requests >= 256
    assert "decode together" in AppArgs.model_fields["generator_max_ongoing_requests"].description
    with pytest.raises(ValidationError, match="ingress_max_ongoing_requests .* is below generator_max_ongoing"):
        AppArgs(generator_max_ongoing_requests=512, ingress_max_ongoing_requests=300)
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        AppArgs(generator_max_ongoing_requests=0)
    with pytest.raises(ValidationError, match="ingress_replicas"):
        AppArgs(ingress_replicas=0)


def test_ingress_one_loop_sets_rays_switches_for_the_ingress_only():
    from serve.app import INGRESS_ONE_LOOP_ENV, AppArgs, ingress_actor_options

    on = ingress_actor_options(AppArgs(ingress_one_loop=True))
    assert on == {"num_cpus": 0, "runtime_env": {"env_vars": INGRESS_ONE_LOOP_ENV}}
    assert set(INGRESS_ONE_LOOP_ENV.values()) == {"0"}
    assert ingress_actor_options(AppArgs(ingress_one_loop=False)) == {"num_cpus": 0}


def _in_replicas(deployment: str, fn) -> list:
    """``fn(actor)`` run inside each live replica process of ``deployment`` of this module's app."""
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::dnc-test-streaming#{deployment}#")]
    handles = [ray.get_actor(n, namespace="serve") for n in names]
    return ray.get([h.__ray_call__.remote(fn) for h in handles], timeout=60)


def _replica_flags(deployment: str) -> list[tuple[bool, bool]]:
    """(user code in a separate thread, router in a separate loop) as Ray Serve's constants read
    them inside each live replica process of ``deployment``."""
    def flags(_self):
        from ray.serve._private import constants as c

        return c.RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD, c.RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP
    return _in_replicas(deployment, flags)


def test_ingress_replicas_run_on_one_loop_and_the_generator_keeps_its_own(server):
    assert _replica_flags("Ingress") == [(False, False)] * 2  # both ingress replicas
    assert _replica_flags("Generator") == [(True, True)]      # Ray's defaults: untouched


def test_hot_routes_never_hop_to_the_thread_pool(client):
    """FastAPI runs a plain ``def`` dependency or route in anyio's thread pool; inside a Serve
    replica every request gets a fresh worker thread (anyio keeps its pool per request task),
    started and stopped per request. The routes a load sends (generate, streamed or not, OpenAI,
    stats) have none: no job reaches the pool in either ingress replica."""
    def count_jobs(_actor, start: bool) -> int:
        # inside a replica (defined here so that Ray pickles it by value): ``start`` wraps anyio's
        # ``to_thread.run_sync``, what FastAPI and Starlette call for each sync dependency or route,
        # with a counter that calls through; ``start=False`` restores it and returns the count
        import anyio.to_thread as to_thread

        if start:
            original = to_thread.run_sync

            async def counted(*args, **kwargs):
                counted.jobs += 1
                return await original(*args, **kwargs)
            counted.jobs, counted.original = 0, original
            to_thread.run_sync = counted
            return 0
        counted = to_thread.run_sync
        to_thread.run_sync = counted.original
        return counted.jobs
    assert _in_replicas("Ingress", lambda a: count_jobs(a, True)) == [0, 0]
    body = {"prompt": PROMPT, "max_new_tokens": 4, "temperature": 0.0}
    try:
        for _ in range(4):  # over both ingress replicas
            assert client.post("/v1/generate", json=body).status_code == 200
            _raw_pieces(client, "/v1/generate", {**body, "stream": True})
            assert client.post("/v1/completions", json={"model": "bwr-dnc", "prompt": PROMPT,
                                                        "max_tokens": 4}).status_code == 200
            assert client.get("/model/stats").status_code == 200
    finally:
        jobs = _in_replicas("Ingress", lambda a: count_jobs(a, False))
    assert jobs == [0, 0]


# ------------------------------------------------------------------------------ chunked streams
def test_generate_stream_sends_an_iterations_tokens_in_one_write(client):
    body = {"prompt": PROMPT, "max_new_tokens": 96, "temperature": 0.0, "stream": True}
    pieces = _raw_pieces(client, "/v1/generate", body)
    events = _events(b"".join(pieces))
    tokens, done = [e for e in events if e["type"] == "token"], events[-1]
    # the schema clients and the UI parse: one `token` event per token, then `done`
    assert done["type"] == "done" and done["tokens"] == 96 and len(tokens) >= 96
    assert set(tokens[0]) == {"type", "token", "token_id", "index"}
    assert [t["token_id"] for t in tokens if t["token_id"] is not None] == done["token_ids"]
    assert "".join(t["token"] for t in tokens) == done["text"]
    whole = client.post("/v1/generate", json={**body, "stream": False}).json()
    assert whole["token_ids"] == done["token_ids"]  # greedy: the same tokens either way
    # several tokens per write: fewer writes than tokens, and some write carries several events
    per_piece = [p.count(b'data: {"type": "token"') for p in pieces]
    assert max(per_piece) >= 2, per_piece
    assert len(pieces) < len(tokens), (len(pieces), len(tokens))


def test_openai_stream_sends_several_chunks_per_write(client):
    body = {"model": "bwr-dnc", "prompt": PROMPT, "max_tokens": 96, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    pieces = _raw_pieces(client, "/v1/completions", body)
    events = _events(b"".join(pieces))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 96
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    whole = client.post("/v1/completions", json={k: v for k, v in body.items() if k not in ("stream", "stream_options")}).json()
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == whole["choices"][0]["text"]
    per_piece = [p.count(b'data: {"id": "cmpl-') for p in pieces]
    assert max(per_piece) >= 2 and len(pieces) < len(chunks), per_piece


def test_a_client_that_goes_away_stops_its_generation(client):
    """The SSE response never reads the request (serve/streaming.py: SSEResponse); Serve's proxy
    notices the client going away and cancels the request, and with it the row in the batch."""
    before = _stats(client)
    body = {"prompt": PROMPT, "max_new_tokens": 128, "temperature": 0.0, "stream": True}
    with client.stream("POST", "/v1/generate", json=body) as r:
        assert r.status_code == 200
        first = next(ln for ln in r.iter_lines() if ln.startswith("data: "))
        assert json.loads(first[6:])["type"] == "token"
    # the connection is closed: the row leaves the batch long before its 128 tokens
    for _ in range(200):
        after = _stats(client)
        if after["running"] == 0:
            break
        time.sleep(0.05)
    assert after["running"] == 0 and after["waiting"] == 0, after
    assert after["requests"] == before["requests"]  # it never finished
    assert after["decoded_tokens"] - before["decoded_tokens"] < 128, (before, after)


# ------------------------------------------------------------------------------ one batch for all
def test_concurrent_plain_requests_decode_in_one_model_call(client):
    body = {"prompt": PROMPT, "max_new_tokens": 24, "temperature": 0.0}
    before = _stats(client)
    with cf.ThreadPoolExecutor(2) as ex:
        outs = list(ex.map(lambda _: client.post("/v1/generate", json=body).json(), range(2)))
    after = _stats(client)
    assert outs[0]["token_ids"] == outs[1]["token_ids"] and outs[0]["tokens"] == 24
    calls = after["batches"] - before["batches"]
    rows = after["batched_requests"] - before["batched_requests"]
    # decoded apart they would take a model call per row; together every call holds both
    assert rows == 2 * calls, (rows, calls)


def test_plain_stream_and_openai_requests_share_the_batch(client):
    """A whole /v1/generate, a streamed one and an OpenAI completion sent together: one batch."""
    n = 24
    before = _stats(client)

    def plain():
        return client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": n, "temperature": 0.0}).json()

    def streamed():
        pieces = _raw_pieces(client, "/v1/generate", {"prompt": PROMPT, "max_new_tokens": n, "temperature": 0.0,
                                                      "stream": True})
        return _events(b"".join(pieces))[-1]

    def openai_completion():
        return client.post("/v1/completions", json={"model": "bwr-dnc", "prompt": PROMPT, "max_tokens": n,
                                                    "temperature": 0.0}).json()
    with cf.ThreadPoolExecutor(3) as ex:
        futs = [ex.submit(f) for f in (plain, streamed, openai_completion)]
        a, s, o = (f.result() for f in futs)
    after = _stats(client)
    assert a["token_ids"] == s["token_ids"] and o["choices"][0]["text"] == a["text"]
    calls = after["batches"] - before["batches"]
    rows = after["batched_requests"] - before["batched_requests"]
    assert rows == 3 * calls, (rows, calls)


def test_more_than_64_streams_decode_at_once(server, client):
    """The Generator used to take 64 requests (a constant); now all 96 streams run together."""
    streams = 96

    async def one(c: httpx.AsyncClient) -> int:
        body = {"prompt": PROMPT, "max_new_tokens": 48, "temperature": 0.0, "stream": True}
        async with c.stream("POST", "/v1/generate", json=body) as r:
            assert r.status_code == 200
            text = (await r.aread()).decode()
        return json.loads(text.rsplit("data: ", 1)[1])["tokens"]

    async def main():
        limits = httpx.Limits(max_connections=streams, max_keepalive_connections=streams)
        async with httpx.AsyncClient(base_url=server, timeout=300, limits=limits) as c:
            return await asyncio.gather(*(one(c) for _ in range(streams)))
    assert asyncio.run(main()) == [48] * streams
    s = _stats(client)
    assert s["max_running"] > 64, s
