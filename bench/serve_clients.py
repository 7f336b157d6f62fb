"""Concurrent clients of the serving API for bench/serve_load.py: one ``/v1/generate`` request
(whole, or Server-Sent Events with each token event's arrival time), the clients of one load level
(their own chats in chat mode), spread over several processes when one cannot parse the events
fast enough. ``args`` is serve_load's parsed command line.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import time
from typing import Any

TOKEN_EVENT = 'data: {"type": "token"'  # json.dumps of serve.streaming's token events starts so


def prompt_text(n: int, turn: int | None = None) -> str:
    """The prompt of every request (``turn``: the chat turn's own message, same length)."""
    base = "The quick brown fox jumps over the lazy dog. "
    head = "" if turn is None else f"Turn {turn}: "
    return (head + base * (n // len(base) + 1))[:n]


# ------------------------------------------------------------------------------ one client request
async def one_request(client, args, stream: bool, sid: str | None, turn: int | None = None) -> dict[str, Any]:
    """One ``/v1/generate``: latency; TTFT, every token's arrival gap (ITL) and tokens when streamed;
    the server's ``timeline`` of the request (``serve.schemas.Timeline``, from ``timing``)."""
    body = {"prompt": prompt_text(args.prompt_len, turn), "max_new_tokens": args.max_new_tokens,
            "temperature": 0.0, "state_id": sid, "stream": stream}
    t0 = time.perf_counter()
    try:
        if not stream:
            r = await client.post("/v1/generate", json=body)
            dt = time.perf_counter() - t0
            if r.status_code != 200:
                return {"ok": False, "status": r.status_code, "latency": dt}
            out = r.json()
            return {"ok": True, "latency": dt, "ttft": out["timing"]["ttft_ms"] / 1e3, "tokens": out["tokens"],
                    "timeline": out["timing"].get("timeline")}
        arrivals, tokens, timeline = [], 0, None
        async with client.stream("POST", "/v1/generate", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return {"ok": False, "status": r.status_code, "latency": time.perf_counter() - t0}
            async for line in r.aiter_lines():
                if line.startswith(TOKEN_EVENT):  # no JSON parse on the hot path
                    arrivals.append(time.perf_counter())
                elif line.startswith("data: "):
                    ev = json.loads(line[6:])
                    if ev.get("type") == "done":
                        tokens, timeline = ev["tokens"], ev.get("timing", {}).get("timeline")
                    elif ev.get("type") == "error":
                        return {"ok": False, "status": ev.get("status"), "latency": time.perf_counter() - t0}
        gaps = [(b - a) * 1e3 for a, b in zip(arrivals, arrivals[1:])]
        return {"ok": True, "latency": time.perf_counter() - t0, "ttft": (arrivals[0] - t0) if arrivals else None,
                "tokens": tokens, "itl_ms": gaps, "timeline": timeline,
                "itl_mean_ms": (arrivals[-1] - arrivals[0]) * 1e3 / (len(arrivals) - 1) if len(arrivals) > 1 else None}
    except Exception as e:  # a refused/reset connection is an error, not a crash of the benchmark
        return {"ok": False, "status": type(e).__name__, "latency": time.perf_counter() - t0}


async def drive_clients(url: str, args, mode: str, workers: list[int], level: int, warmed=None) -> dict[str, Any]:
    """Clients ``workers`` (ids out of ``level``) of one level. ``warmed()`` is called after the
    warm-up and before the measured requests (it waits for the other client processes). Returns
    the records and the wall-clock span."""
    import httpx

    n = len(workers)
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    stamp = f"{os.getpid()}-{int(time.time() * 1e3)}"
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout, limits=limits, headers=auth(args)) as client:
        for _ in range(args.warmup):  # connections open, the server's batch sizes seen once
            await asyncio.gather(*(one_request(client, args, mode != "plain", None) for _ in workers))
        if warmed is not None:
            warmed()
        records: list[dict[str, Any]] = []

        async def worker(w: int):
            if mode == "chat":
                sid = f"bench-chat-{level}-{w}-{stamp}"
                for turn in range(args.turns):
                    records.append(await one_request(client, args, True, sid, turn))
                return
            sid = f"bench-{mode}-{level}-{w}-{stamp}" if args.session else None
            for _ in range(args.requests // level + (w < args.requests % level)):
                records.append(await one_request(client, args, mode == "stream", sid))
        start = time.time()
        await asyncio.gather(*(worker(w) for w in workers))
        return {"records": records, "start": start, "end": time.time()}


def _client_proc(url, args, mode, workers, level, ready, go, results) -> None:
    """A client process (``--client-procs``): warm up, say so, wait for ``go``, send its share."""
    def warmed():
        ready.put(os.getpid())
        go.wait()
    results.put(asyncio.run(drive_clients(url, args, mode, workers, level, warmed)))


def auth(args) -> dict[str, str]:
    return {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}


def server_stats(url: str, args) -> dict[str, Any]:
    import httpx

    r = httpx.get(f"{url}/model/stats", timeout=60, headers=auth(args))
    r.raise_for_status()
    return r.json()["serving"]["generator"]


def run_clients(url: str, args, mode: str, level: int,
                warmed_up=None) -> tuple[list[dict[str, Any]], float, dict[str, Any]]:
    """All clients of a level, over ``--client-procs`` processes: (records, wall seconds, the
    server's stats after the warm-up). ``warmed_up()``, when given, is called after the warm-up,
    just before the timed requests start (serve_load reads the processes' CPU there)."""
    procs = min(args.client_procs, level)
    shares = [list(range(level))[i::procs] for i in range(procs)]
    before: dict[str, Any] = {}
    if procs == 1:
        def warmed():
            before.update(server_stats(url, args))
            if warmed_up:
                warmed_up()
        out = [asyncio.run(drive_clients(url, args, mode, shares[0], level, warmed))]
    else:
        ctx = mp.get_context("spawn")
        ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
        ps = [ctx.Process(target=_client_proc, args=(url, args, mode, s, level, ready, go, results), daemon=True)
              for s in shares]
        for p in ps:
            p.start()
        for _ in ps:
            ready.get(timeout=args.timeout * (1 + args.warmup))
        before.update(server_stats(url, args))
        if warmed_up:
            warmed_up()
        go.set()
        out = [results.get(timeout=args.timeout * max(1, args.requests, args.turns)) for _ in ps]
        for p in ps:
            p.join(timeout=30)
    wall = max(o["end"] for o in out) - min(o["start"] for o in out)
    return [r for o in out for r in o["records"]], wall, before
