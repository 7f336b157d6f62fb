"""Bounded load test of the serving API on loopback, beside the same generation run in-process.

For each concurrency level, ``--clients`` concurrent clients send ``--requests`` requests in total
(``/v1/generate``: ``stream`` mode reads Server-Sent Events and measures time to first token at the
client; ``plain`` mode is the batched non-streamed path, TTFT as the server reports it). The same
generation is then run in this process on the same model, sequentially, and the table shows the
served throughput relative to it.

    python bench/serve_load.py                          # starts a local Ray + Serve app (tiny model)
    python bench/serve_load.py --clients 1 4 16 --requests 64 --max-new-tokens 32
    python bench/serve_load.py --url http://127.0.0.1:8000   # an already running server
    python bench/serve_load.py --checkpoint runs/ckpt --session   # sessions (one per client)

Prints a markdown table and writes JSON to bench/results/serve_load-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="benchmark this running server instead of starting one")
    p.add_argument("--port", type=int, default=8125, help="port of the server this script starts")
    p.add_argument("--checkpoint", default=None, help="checkpoint for the started server / in-process run")
    p.add_argument("--preset", default="tiny", help="preset of the untrained model without --checkpoint")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8], help="concurrency levels")
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt length in tokens (bytes)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--modes", nargs="+", default=["plain", "stream"], choices=["plain", "stream"])
    p.add_argument("--session", action="store_true", help="each client generates in its own session")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray cluster")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch threads, the same for the served generator and the in-process run (0 = default)")
    p.add_argument("--batch-wait-ms", type=float, default=None,
                   help="batch_wait_timeout_s of the started server, in ms (default: the app's)")
    p.add_argument("--timeout", type=float, default=300.0, help="per-request timeout (s)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/serve_load-<time>.json)")
    return p.parse_args(argv)


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def prompt_text(n: int) -> str:
    base = "The quick brown fox jumps over the lazy dog. "
    return (base * (n // len(base) + 1))[:n]


# ------------------------------------------------------------------------------ load
async def one_request(client, args, mode: str, sid: str | None) -> dict[str, Any]:
    body = {"prompt": prompt_text(args.prompt_len), "max_new_tokens": args.max_new_tokens, "temperature": 0.0,
            "state_id": sid, "stream": mode == "stream"}
    t0 = time.perf_counter()
    try:
        if mode == "plain":
            r = await client.post("/v1/generate", json=body)
            dt = time.perf_counter() - t0
            if r.status_code != 200:
                return {"ok": False, "status": r.status_code, "latency": dt}
            out = r.json()
            return {"ok": True, "latency": dt, "ttft": out["timing"]["ttft_ms"] / 1e3, "tokens": out["tokens"]}
        ttft, tokens = None, 0
        async with client.stream("POST", "/v1/generate", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return {"ok": False, "status": r.status_code, "latency": time.perf_counter() - t0}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                ev = json.loads(line[6:])
                if ev.get("type") == "token" and ttft is None:
                    ttft = time.perf_counter() - t0
                if ev.get("type") == "done":
                    tokens = ev["tokens"]
                if ev.get("type") == "error":
                    return {"ok": False, "status": ev.get("status"), "latency": time.perf_counter() - t0}
        return {"ok": True, "latency": time.perf_counter() - t0, "ttft": ttft, "tokens": tokens}
    except Exception as e:  # a refused/reset connection is an error, not a crash of the benchmark
        return {"ok": False, "status": type(e).__name__, "latency": time.perf_counter() - t0}


async def run_level(url: str, args, mode: str, clients: int) -> dict[str, Any]:
    import httpx

    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(args.requests):
        queue.put_nowait(i)
    results: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout, limits=limits) as client:
        await one_request(client, args, mode, None)  # warm-up, not counted

        async def worker(w: int):
            sid = f"bench-{mode}-{clients}-{w}-{int(time.time())}" if args.session else None
            while True:
                try:
                    queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results.append(await one_request(client, args, mode, sid))
        before = (await client.get("/model/stats")).json()["serving"]["generator"]
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(clients)))
        wall = time.perf_counter() - t0
        after = (await client.get("/model/stats")).json()["serving"]["generator"]
    batches = after.get("batches", 0) - before.get("batches", 0)
    batched = after.get("batched_requests", 0) - before.get("batched_requests", 0)
    ok = [r for r in results if r["ok"]]
    lat = [r["latency"] * 1e3 for r in ok]
    ttft = [r["ttft"] * 1e3 for r in ok if r.get("ttft") is not None]
    errors: dict[str, int] = {}
    for r in results:
        if not r["ok"]:
            errors[str(r["status"])] = errors.get(str(r["status"]), 0) + 1
    return {"mode": mode, "clients": clients, "requests": len(results), "ok": len(ok), "errors": errors,
            "wall_s": wall, "requests_per_s": len(ok) / wall, "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "latency_ms_p50": pct(lat, 0.5), "latency_ms_p99": pct(lat, 0.99),
            "ttft_ms_p50": pct(ttft, 0.5), "ttft_ms_p99": pct(ttft, 0.99),
            "server_mean_batch": batched / batches if batches else None}


# ------------------------------------------------------------------------------ in-process
def in_process(args, n: int) -> dict[str, Any]:
    """The same generation on the same model in this process, one after another."""
    import torch

    from dnc.tokenizer import get_tokenizer
    from serve.modeling import ModelSpec, load_model

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    lm = load_model(ModelSpec(checkpoint=args.checkpoint, preset=args.preset), "auto")
    tok = get_tokenizer()
    ids = tok.encode(prompt_text(args.prompt_len))
    sync = torch.cuda.synchronize if lm.device.type == "cuda" else (lambda: None)
    lm.model.generate(ids, max_new_tokens=args.max_new_tokens, temperature=0.0, stop_tokens=[tok.eos_id])  # warm-up
    lat, ttft, tokens = [], [], 0
    t_all = time.perf_counter()
    for _ in range(n):
        state = lm.model.init_state(1)
        t0 = time.perf_counter()
        first = None
        for k, _t in enumerate(lm.model.generate_stream(ids, state=state, max_new_tokens=args.max_new_tokens,
                                                         temperature=0.0, stop_tokens=[tok.eos_id])):
            if first is None:
                sync()
                first = time.perf_counter() - t0
            tokens += 1
        sync()
        lat.append((time.perf_counter() - t0) * 1e3)
        ttft.append(first * 1e3)
    wall = time.perf_counter() - t_all
    return {"requests": n, "requests_per_s": n / wall, "tokens_per_s": tokens / wall, "latency_ms_p50": pct(lat, 0.5),
            "latency_ms_p99": pct(lat, 0.99), "ttft_ms_p50": pct(ttft, 0.5), "device": str(lm.device),
            "weights_digest": lm.digest}


# ------------------------------------------------------------------------------ server
def start_server(args, storage: str) -> tuple[str, dict[str, Any]]:
    import ray

    from serve.app import run_app

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    app_args = {"storage": storage, "checkpoint": args.checkpoint, "preset": args.preset,
                "max_new_tokens": max(512, args.max_new_tokens), "manager_interval_s": 0,
                "torch_threads": args.torch_threads}
    if args.batch_wait_ms is not None:
        app_args["batch_wait_timeout_s"] = args.batch_wait_ms / 1e3
    return run_app(app_args, args.port, name="dnc-bench"), app_args


def table(rows: list[dict[str, Any]], base: dict[str, Any]) -> str:
    f = lambda v, d=1: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    out = ["| mode | clients | requests | errors | req/s | tok/s | p50 ms | p99 ms | TTFT p50 ms | mean batch | vs in-process req/s |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['mode']} | {r['clients']} | {r['requests']} | {sum(r['errors'].values())} | "
                   f"{f(r['requests_per_s'], 2)} | {f(r['tokens_per_s'])} | {f(r['latency_ms_p50'])} | "
                   f"{f(r['latency_ms_p99'])} | {f(r['ttft_ms_p50'])} | {f(r['server_mean_batch'])} | "
                   f"{r['requests_per_s'] / base['requests_per_s']:.2f}x |")
    out.append(f"| in-process | 1 | {base['requests']} | 0 | {f(base['requests_per_s'], 2)} | {f(base['tokens_per_s'])} | "
               f"{f(base['latency_ms_p50'])} | {f(base['latency_ms_p99'])} | {f(base['ttft_ms_p50'])} | 1.0 | 1.00x |")
    return "\n".join(out)


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    # in-process first, while no Ray workers compete for the cores
    base = in_process(args, max(4, min(args.requests, 16)))
    print(f"in-process: {base['requests_per_s']:.2f} req/s, p50 {base['latency_ms_p50']:.1f} ms", flush=True)
    started = None
    if args.url:
        url = args.url.rstrip("/")
    else:
        import tempfile

        url, started = start_server(args, tempfile.mkdtemp(prefix="dnc-bench-storage-"))
    try:
        rows = []
        for mode in args.modes:
            for c in args.clients:
                r = asyncio.run(run_level(url, args, mode, c))
                rows.append(r)
                print(f"{mode:6s} clients={c:3d}: {r['requests_per_s']:.2f} req/s, p50 {r['latency_ms_p50']} ms, "
                      f"errors {r['errors']}", flush=True)
    finally:
        if started is not None:
            from serve.app import teardown

            teardown(started)
    md = table(rows, base)
    print()
    print(md)
    from report import git_commit  # bench/report.py: $DNC_COMMIT or git

    commit = git_commit()
    result = {"benchmark": "serve_load", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "commit": commit,
              "host": platform.node(), "cpus": os.cpu_count(), "url": url, "args": vars(args),
              "in_process": base, "results": rows, "markdown": md}
    out = args.out or os.path.join(ROOT, "bench", "results", f"serve_load-{time.strftime('%Y%m%d-%H%M%S')}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
