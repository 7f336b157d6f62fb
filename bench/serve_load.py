"""Load test of the serving API beside the same generation in-process, from one run.

Starts a local Ray cluster and the Serve app itself (or uses ``--url``), then for each mode and
each ``--clients`` level runs that many concurrent clients:

* ``plain``  sessionless ``/v1/generate``, whole answers (``--requests`` in all);
* ``stream`` sessionless, Server-Sent Events; time to first token (TTFT) and inter-token latency
  (ITL) are taken at the client from the arrival time of each ``token`` event (``--requests``);
* ``chat``   long-lived chats: each client creates its own session and sends ``--turns`` streamed
  turns, one after another (clients x turns requests in all).

The in-process baseline runs first, in this process, on the same model and prompts through
``dnc.generate`` directly: one stream at a time (``generate_stream``: latency, TTFT, per-token
ITL) and one ``BatchDecoder`` batch per client level (tokens/s the decode loop gives without
HTTP, Ray or the scheduler). The table puts each served row beside it: p50 latency added at the
same prompt (served - in-process, ms) and tokens/s as a fraction of the in-process batch.

Paired (``--paired``, after the levels): one client alternates a served request (plain, then
streamed) with the same generation in this process, so both halves of each pair see the same
machine load; the figure is the median of the per-pair differences (served - in-process), the
latency the serving path adds to a lone request, and for streams the same for the first token.
On a shared machine it is the figure to trust: the levels' baseline is measured minutes apart.

Examples:

    # CPU, tiny preset, about a minute:
    python bench/serve_load.py --clients 1 8 --requests 16 --max-new-tokens 16 --modes stream chat --turns 3
    # the issue-14 table on a GPU (small preset, 64 and 256 concurrent streams, 4 client processes):
    python bench/serve_load.py --preset small --clients 1 64 256 --requests 512 --max-new-tokens 64 \\
        --modes plain stream chat --turns 8 --client-procs 4 --torch-threads 0 --prometheus
    # an already running server (the in-process baseline still loads --preset/--checkpoint here):
    python bench/serve_load.py --url http://127.0.0.1:8000 --clients 1 4

For a server it starts, each level also reads the CPU time the Serve processes spent on its
measured requests (inside each actor: the HTTP proxy, the Ingress and the Generator replicas):
ms per request and per streamed event, the cost that decides how many ingress replicas a host
needs. Robust to a shared machine where wall-clock figures are not.

Prints a markdown table and writes JSON (argv, device names, torch, Ray, commit, every row) to
bench/results/serve_load-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from typing import Any

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))  # report.git_commit, serve_clients
from serve_clients import prompt_text, run_clients, server_stats  # noqa: E402  (bench/serve_clients.py)
from serve_timeline import aggregate, generator_figures  # noqa: E402  (bench/serve_timeline.py)
from serve_load_report import result_markdown, targets  # noqa: E402
from serve_processes import cpu_figures, scrape_prometheus, serve_process_cpu  # noqa: E402

MODES = ("plain", "stream", "chat")
APP_NAME = "dnc-bench"  # the Serve application this script starts


def server_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["key=value", ...]`` (values parsed as YAML) -> AppArgs fields; an unknown field or a bad
    value fails here in one line, before any cluster starts."""
    from pydantic import ValidationError

    from serve.app import AppArgs

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in AppArgs.model_fields:
            raise SystemExit(f"--server-set {pair!r}: expected KEY=VALUE with KEY an AppArgs field "
                             f"(e.g. stream_events_per_s=2000)")
        out[key] = yaml.safe_load(value)
    try:
        AppArgs(**out)
    except ValidationError as e:
        raise SystemExit("--server-set: " + "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}"
                                                      for x in e.errors())) from None
    return out


def parse_args(argv=None) -> argparse.Namespace:
    from common import HelpFormatter  # bench/common.py (on sys.path above)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--url", help="benchmark this running server instead of starting one")
    p.add_argument("--port", type=int, default=8125, help="port of the server this script starts")
    p.add_argument("--checkpoint", default=None, help="checkpoint for the started server / in-process run")
    p.add_argument("--preset", default="tiny", help="preset of the untrained model without --checkpoint")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="serving dtype of the started server (AppArgs dtype) and of the in-process baseline; "
                        "auto = bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--server-set", dest="server_set", action="append", default=[], metavar="KEY=VALUE",
                   help="an AppArgs field of the started server (YAML value), e.g. --server-set "
                        "stream_events_per_s=2000; repeatable")
    p.add_argument("--proxies", nargs="+", default=None, choices=PROXY_CHOICES,
                   help="measure one started server per name, each on a fresh local Ray cluster (Ray reads the "
                        "proxy switches when a cluster starts; serve/proxy_mode.py), and compare them: AppArgs proxy, "
                        "+throughput = ray_throughput_optimized. Default: one server as --server-set says")
    p.add_argument("--rounds", type=int, default=1,
                   help="with --proxies: measure each this many times, the order reversed every other round")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8], help="concurrency levels")
    p.add_argument("--requests", type=int, default=32, help="requests per level in plain/stream modes")
    p.add_argument("--turns", type=int, default=4, help="turns of each client's chat in chat mode")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt length in tokens (bytes)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--modes", nargs="+", default=["plain", "stream"], choices=MODES)
    p.add_argument("--session", action="store_true", help="plain/stream: each client generates in its own session")
    p.add_argument("--client-procs", type=int, default=1,
                   help="client processes sharing the clients (one parses ~10-13k SSE token events/s on a "
                        "shared 2-core machine: use several above ~5k tokens/s)")
    p.add_argument("--warmup", type=int, default=1, help="rounds of one request per client before each level")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray cluster")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch threads, the same for the served generator and the in-process run (0 = default)")
    p.add_argument("--max-batch-size", type=int, default=None,
                   help="rows of one decode model call on the started server (default: the largest --clients, <= 256)")
    p.add_argument("--replicas", type=int, default=1, help="Generator replicas of the started server")
    p.add_argument("--batch-wait-ms", type=float, default=None,
                   help="batch_wait_timeout_s of the started server, in ms (default: the app's)")
    p.add_argument("--no-in-process", action="store_true", help="skip the in-process baseline")
    p.add_argument("--paired", type=int, default=16, metavar="N",
                   help="pairs (served request, the same generation in-process) per mode plain/stream, one "
                        "client, after the levels; 0 = none (also skipped with --no-in-process)")
    p.add_argument("--prometheus", nargs="?", const="auto", default=None, metavar="URL",
                   help="after the run, scrape the server's Prometheus metrics (serve/metrics.py) into the JSON: "
                        "URL of a node's /metrics, or none = the started cluster's node")
    p.add_argument("--api-key", default=os.environ.get("DNC_API_KEY"),
                   help="Bearer key for a --url server with keys on (default $DNC_API_KEY)")
    p.add_argument("--timeout", type=float, default=300.0, help="per-request timeout (s)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/serve_load-<time>.json)")
    p.add_argument("--tag", default=None,
                   help="write bench/results/<tag>.json and .md (bench/common.py write_result) instead of --out")
    args = p.parse_args(argv)
    server_overrides(args.server_set)  # a bad field fails now, not after the cluster started
    if min(args.clients) < 1 or args.client_procs < 1 or args.requests < 1 or args.turns < 1:
        p.error("--clients, --requests, --turns and --client-procs must be >= 1")
    if args.proxies and (args.url or any(kv.split("=")[0] in ("proxy", "ray_throughput_optimized")
                                         for kv in args.server_set)):
        p.error("--proxies starts its own servers and sets their proxy: not with --url or --server-set proxy=...")
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if args.tag and args.out:  # one of them would be ignored, and a run's result lost with it
        p.error("give --tag (bench/results/<tag>.json) or --out (a JSON path), not both")
    return args


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def run_level(url: str, args, mode: str, clients: int, cpu_app: str | None = None) -> dict[str, Any]:
    """One load level; ``cpu_app``: the Serve application to read the processes' CPU of (the
    server this script started), None = no CPU figures."""
    cpu_before: dict[str, float] = {}
    results, wall, before = run_clients(url, args, mode, clients,
                                        lambda: cpu_before.update(serve_process_cpu(cpu_app)) if cpu_app else None)
    cpu_after = serve_process_cpu(cpu_app) if cpu_app else {}
    after = server_stats(url, args)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in ("batches", "batched_requests", "session_turns",
                                                             "tokens_generated", "requests")}
    ok = [r for r in results if r["ok"]]
    lat = [r["latency"] * 1e3 for r in ok]
    ttft = [r["ttft"] * 1e3 for r in ok if r.get("ttft") is not None]
    itl = [g for r in ok for g in r.get("itl_ms", [])]
    itl_mean = [r["itl_mean_ms"] for r in ok if r.get("itl_mean_ms") is not None]
    errors: dict[str, int] = {}
    for r in results:
        if not r["ok"]:
            errors[str(r["status"])] = errors.get(str(r["status"]), 0) + 1
    return {"mode": mode, "clients": clients, "requests": len(results), "ok": len(ok), "errors": errors,
            "wall_s": wall, "requests_per_s": len(ok) / wall, "tokens": sum(r["tokens"] for r in ok),
            "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "latency_ms_p50": pct(lat, 0.5), "latency_ms_p99": pct(lat, 0.99),
            "ttft_ms_p50": pct(ttft, 0.5), "ttft_ms_p99": pct(ttft, 0.99),
            "ttft_at": "server" if mode == "plain" else "client",
            "itl_ms_p50": pct(itl, 0.5), "itl_ms_p99": pct(itl, 0.99), "itl_mean_ms_p50": pct(itl_mean, 0.5),
            "server_mean_batch": delta["batched_requests"] / delta["batches"] if delta["batches"] else None,
            "server": {"requests": delta["requests"], "tokens": delta["tokens_generated"],
                       "session_turns": delta["session_turns"], "itl_ms_p50": after.get("inter_token_ms_p50"),
                       "ttft_ms_p50": after.get("ttft_ms_p50")},
            # the server's stages of each request (bench/serve_timeline.py) and its Generator over the level
            "timeline": aggregate(ok, mode != "plain"), "generator": generator_figures(before, after, wall),
            # the CPU of the proxy, ingress and Generator processes (per request, per streamed event)
            "cpu": cpu_figures(cpu_before, cpu_after, len(ok), sum(r["tokens"] for r in ok),
                               sum((r.get("timeline") or {}).get("ingress_events") or 0 for r in ok)
                               if mode != "plain" else None)}


# ------------------------------------------------------------------------------ in-process baseline
def in_process(args, n: int) -> dict[str, Any]:
    """The same prompts on the same model through ``dnc.generate`` in this process: ``n`` streams one
    after another, then one ``BatchDecoder`` batch per client level."""
    import torch

    from dnc.generate import BatchDecoder, DecodeRow, SamplingParams, generate_stream
    from dnc.tokenizer import get_tokenizer
    from serve.modeling import ModelSpec, load_model

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    lm = load_model(ModelSpec(checkpoint=args.checkpoint, preset=args.preset, dtype=args.dtype), "auto")
    tok = get_tokenizer()
    ids = tok.encode(prompt_text(args.prompt_len))
    sync = torch.cuda.synchronize if lm.device.type == "cuda" else (lambda: None)
    gen = dict(max_new_tokens=args.max_new_tokens, temperature=0.0, stop_tokens=[tok.eos_id])
    list(generate_stream(lm.model, ids, **gen))  # warm-up
    lat, ttft, itl, tokens = [], [], [], 0
    t_all = time.perf_counter()
    for _ in range(n):
        t0 = last = time.perf_counter()
        for k, _t in enumerate(generate_stream(lm.model, ids, state=lm.model.init_state(1), **gen)):
            sync()
            now = time.perf_counter()
            if k == 0:
                ttft.append((now - t0) * 1e3)
            else:
                itl.append((now - last) * 1e3)
            last, tokens = now, tokens + 1
        lat.append((time.perf_counter() - t0) * 1e3)
    wall = time.perf_counter() - t_all
    out = {"requests": n, "requests_per_s": n / wall, "tokens_per_s": tokens / wall, "latency_ms_p50": pct(lat, 0.5),
           "latency_ms_p99": pct(lat, 0.99), "ttft_ms_p50": pct(ttft, 0.5), "itl_ms_p50": pct(itl, 0.5),
           "itl_ms_p99": pct(itl, 0.99), "device": str(lm.device), "dtype": lm.dtype, "weights_digest": lm.digest,
           "batched": {}}
    for c in sorted(set(args.clients)):
        for _ in range(2):  # a warm-up batch, then the timed one
            dec = BatchDecoder(lm.model, max_batch=c)
            rows = [DecodeRow(ids, None, args.max_new_tokens, SamplingParams(0.0), stop_tokens=frozenset([tok.eos_id]))
                    for _ in range(c)]
            sync()
            t0 = time.perf_counter()
            dec.add(rows)
            steps = 0
            while dec.running:
                dec.step()
                steps += 1
            sync()
            dt = time.perf_counter() - t0
        made = sum(len(r.tokens) for r in rows)
        out["batched"][str(c)] = {"rows": c, "tokens": made, "seconds": dt, "tokens_per_s": made / dt,
                                  "step_ms_mean": dt * 1e3 / max(1, steps)}
    del lm
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def paired(url: str, args, n: int) -> dict[str, Any]:
    """``n`` pairs per mode ("plain", "stream"): a served ``/v1/generate`` of the benchmark's prompt,
    then the same greedy generation in this process (``generate_stream``), one after the other.
    Returns per mode the pairs' latencies (ms), the median of the differences (served - in-process)
    and, for streams, the same for the first token (TTFT)."""
    import httpx
    import torch

    from dnc.generate import generate_stream
    from dnc.tokenizer import get_tokenizer
    from serve.modeling import ModelSpec, load_model
    from serve_clients import TOKEN_EVENT
    from serve_clients import auth as auth_headers

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    lm = load_model(ModelSpec(checkpoint=args.checkpoint, preset=args.preset, dtype=args.dtype), "auto")
    tok = get_tokenizer()
    text = prompt_text(args.prompt_len)
    ids = tok.encode(text)
    sync = torch.cuda.synchronize if lm.device.type == "cuda" else (lambda: None)
    gen = dict(max_new_tokens=args.max_new_tokens, temperature=0.0, stop_tokens=[tok.eos_id])
    body = {"prompt": text, "max_new_tokens": args.max_new_tokens, "temperature": 0.0}

    def local() -> tuple[float, float, int]:
        t0 = time.perf_counter()
        first, k = None, 0
        for k, _t in enumerate(generate_stream(lm.model, ids, state=lm.model.init_state(1), **gen), 1):
            sync()
            first = first or time.perf_counter()
        return (time.perf_counter() - t0) * 1e3, (first - t0) * 1e3, k

    def served(client, stream: bool) -> tuple[float, float, int]:
        t0 = time.perf_counter()
        if not stream:
            r = client.post("/v1/generate", json=body)
            r.raise_for_status()
            out = r.json()
            server_ms[0] = out["timing"]["total_ms"]
            return (time.perf_counter() - t0) * 1e3, out["timing"]["ttft_ms"], out["tokens"]
        first, tokens = None, 0
        with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line.startswith(TOKEN_EVENT):
                    first = first or time.perf_counter()
                elif line.startswith('data: {"type": "done"'):
                    tokens = json.loads(line[6:])["tokens"]
        return (time.perf_counter() - t0) * 1e3, (first - t0) * 1e3, tokens

    out: dict[str, Any] = {}
    server_ms = [None]  # plain: the Generator's own time for the request (arrival to done)
    with httpx.Client(base_url=url, timeout=args.timeout, headers=auth_headers(args)) as client:
        local(), served(client, False)  # warm-up
        for mode in ("plain", "stream"):
            pairs = []
            for _ in range(n):
                s_ms, s_first, s_tok = served(client, mode == "stream")
                l_ms, l_first, l_tok = local()
                pairs.append({"served_ms": s_ms, "in_process_ms": l_ms, "served_ttft_ms": s_first,
                              "in_process_ttft_ms": l_first, "served_tokens": s_tok, "in_process_tokens": l_tok,
                              "generator_ms": server_ms[0] if mode == "plain" else None})
            out[mode] = {"pairs": len(pairs), "rows": pairs,
                         "added_ms_p50": pct([p["served_ms"] - p["in_process_ms"] for p in pairs], 0.5),
                         "ttft_added_ms_p50": pct([p["served_ttft_ms"] - p["in_process_ttft_ms"] for p in pairs], 0.5),
                         "served_ms_p50": pct([p["served_ms"] for p in pairs], 0.5),
                         "in_process_ms_p50": pct([p["in_process_ms"] for p in pairs], 0.5),
                         "same_tokens": all(p["served_tokens"] == p["in_process_tokens"] for p in pairs)}
            if mode == "plain":  # the added time split: the Generator's decode path / HTTP, Ray and the ingress
                out[mode]["generator_added_ms_p50"] = pct([p["generator_ms"] - p["in_process_ms"] for p in pairs], 0.5)
                out[mode]["transport_ms_p50"] = pct([p["served_ms"] - p["generator_ms"] for p in pairs], 0.5)
    del lm
    return out


# ------------------------------------------------------------------------------ environment, server
def redact_key(argv: list[str]) -> list[str]:
    """``argv`` with the value of ``--api-key`` hidden (the JSON is shared; keys are secrets)."""
    out = list(argv)
    for i, a in enumerate(out):
        if a == "--api-key" and i + 1 < len(out):
            out[i + 1] = "<redacted>"
        elif a.startswith("--api-key="):
            out[i] = "--api-key=<redacted>"
    return out


def environment(argv: list[str]) -> dict[str, Any]:
    """What the figures were measured on: device names, versions, commit, command line."""
    import torch

    from report import git_commit  # bench/report.py: $DNC_COMMIT or git

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        import ray

        ray_version = ray.__version__
    except ImportError:  # pragma: no cover - serving needs Ray
        ray_version = None
    cuda = torch.cuda.is_available()
    return {"commit": git_commit(), "argv": argv, "command": shlex.join(["python", "bench/serve_load.py", *argv]),
            "host": platform.node(),
            "cpu": cpu, "cpus": os.cpu_count(), "gpu": torch.cuda.get_device_name() if cuda else None,
            "gpus": torch.cuda.device_count() if cuda else 0, "torch": torch.__version__,
            "cuda": torch.version.cuda if cuda else None, "ray": ray_version, "python": platform.python_version()}


PROXY_CHOICES = ("python", "haproxy", "python+throughput", "haproxy+throughput")
"""``--proxies`` names: AppArgs ``proxy``, and ``+throughput`` for ``ray_throughput_optimized``."""


def proxy_set(proxy: str | None) -> list[str]:
    """A ``--proxies`` name as ``--server-set`` pairs ([] for None)."""
    if proxy is None:
        return []
    mode, _, extra = proxy.partition("+")
    return [f"proxy={mode}", f"ray_throughput_optimized={'true' if extra == 'throughput' else 'false'}"]


def running_proxy() -> str | None:
    """The ``--proxies`` name of what the running Serve controller uses (asked in its process, so an
    exported RAY_SERVE_ENABLE_HA_PROXY counts too); None when it cannot be asked."""
    from serve.proxy_mode import cluster_mode

    running = cluster_mode()
    return None if running is None else running[0] + ("+throughput" if running[1] else "")


def proxy_schedule(proxies: list[str] | None, rounds: int) -> list[str | None]:
    """The servers to measure, in order: ``proxies`` ``rounds`` times, every other repetition
    reversed (A B B A ...: a drift of the shared machine falls on both alike); [None] = one server
    as ``--server-set`` says."""
    if not proxies:
        return [None]
    return [p for r in range(rounds) for p in (proxies if r % 2 == 0 else proxies[::-1])]


def start_server(args, storage: str, extra_set: list[str] | None = None) -> tuple[str, dict[str, Any]]:
    """A local Ray cluster and the Serve app on 127.0.0.1:``--port`` (``serve.app.run_app``), behind
    the proxy ``--server-set proxy=...`` names (python by default): its environment is set here,
    before the cluster starts, because Ray reads it then (serve/proxy_mode.py)."""
    import ray

    from serve.app import AppArgs, run_app
    from serve.proxy_mode import apply_env

    app_args = {"storage": storage, "checkpoint": args.checkpoint, "preset": args.preset, "dtype": args.dtype,
                "max_new_tokens": max(512, args.max_new_tokens), "manager_interval_s": 0,
                "torch_threads": args.torch_threads, "generator_replicas": args.replicas,
                "max_sessions_per_owner": max(1000, 2 * sum(args.clients) * (1 + args.warmup))}
    if args.batch_wait_ms is not None:
        app_args["batch_wait_timeout_s"] = args.batch_wait_ms / 1e3
    app_args.update(server_overrides(args.server_set + list(extra_set or [])))
    if not ray.is_initialized():  # a new local cluster, never one that `ray start` left on this machine
        typed = AppArgs(**{k: v for k, v in app_args.items() if k in ("proxy", "ray_throughput_optimized")})
        apply_env(typed.proxy, typed.ray_throughput_optimized)
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    app_args.setdefault("max_batch_size", args.max_batch_size or min(256, max(args.clients)))
    if args.replicas > 1 and "generator_num_gpus" not in app_args:  # --server-set wins
        app_args["generator_num_gpus"] = 1.0 / args.replicas if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    return run_app(app_args, args.port, name=APP_NAME), app_args


# ------------------------------------------------------------------------------ report
def served_model(url: str, args) -> dict[str, Any]:
    """The server's ``/model/stats`` (model name, device, ``dtype`` as torch names it)."""
    import httpx

    from serve_clients import auth

    r = httpx.get(f"{url}/model/stats", timeout=60, headers=auth(args))
    r.raise_for_status()
    body = r.json()
    return {**body, "dtype": str(body["dtype"]).removeprefix("torch.")}


def serve_round(args, base: dict[str, Any] | None, proxy: str | None = None) -> dict[str, Any]:
    """Every level (and the pairs, the Prometheus scrape) against one server: ``--url``, or one this
    function starts and tears down, behind ``proxy`` (a :data:`PROXY_CHOICES` name; None = what
    ``--server-set`` says). Returns the server's dtype, its AppArgs (None for ``--url``), the rows,
    the pairs and the scrape."""
    started = None
    if args.url:
        url = args.url.rstrip("/")
    else:
        import tempfile

        url, started = start_server(args, tempfile.mkdtemp(prefix="dnc-bench-storage-"), proxy_set(proxy))
    rows, prometheus, pair = [], None, None
    try:
        proxy_seen = running_proxy() if started is not None else None
        if proxy and proxy_seen != proxy:  # the cluster did not take the environment: no figures under a wrong name
            raise RuntimeError(f"asked for the {proxy} proxy, the running Serve uses {proxy_seen}")
        served_dtype = served_model(url, args)["dtype"]  # what the server runs, whoever started it
        print(f"server {url}: weights in {served_dtype}" + (f", {proxy_seen} proxy" if proxy_seen else ""), flush=True)
        for mode in args.modes:
            for c in args.clients:
                r = run_level(url, args, mode, c, cpu_app=None if args.url else APP_NAME)
                rows.append(r)
                print(f"{mode:6s} clients={c:3d}: {r['tokens_per_s']:.1f} tok/s, p50 {r['latency_ms_p50']} ms, "
                      f"TTFT p50 {r['ttft_ms_p50']} ms, ITL p50 {r['itl_ms_p50']} ms, errors {r['errors']}", flush=True)
        if args.prometheus == "auto" and started is None:
            print("--prometheus without a URL needs the server this script starts; give the node's /metrics URL")
        elif args.prometheus:
            prometheus = scrape_prometheus(args.prometheus, None if args.url else APP_NAME)
        if args.paired and not args.no_in_process:  # after the scrape: its series hold the levels only
            pair = paired(url, args, args.paired)
            for mode, v in pair.items():
                print(f"paired {mode}: served - in-process p50 {v['added_ms_p50']:.1f} ms over {v['pairs']} pairs "
                      f"(TTFT {v['ttft_added_ms_p50']:.1f} ms)", flush=True)
    finally:
        if started is not None:
            from serve.app import teardown

            teardown(started)
    return {"proxy": proxy_seen, "url": url, "dtype": served_dtype, "server_args": started, "rows": rows, "paired": pair,
            "prometheus": prometheus}


def main(argv=None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    env = environment(redact_key(argv))
    # in-process first, while no Ray workers compete for the cores
    base = None if args.no_in_process else in_process(args, max(4, min(args.requests, 16)))
    if base:
        print(f"in-process: {base['tokens_per_s']:.1f} tok/s one stream, p50 {base['latency_ms_p50']:.1f} ms; "
              + ", ".join(f"batch {c}: {b['tokens_per_s']:.0f} tok/s" for c, b in base["batched"].items()), flush=True)
    rounds = []
    for i, proxy in enumerate(proxy_schedule(args.proxies, args.rounds)):
        if args.proxies:
            print(f"--- round {i + 1}: {proxy} proxy", flush=True)
        rounds.append({"round": i + 1, **serve_round(args, base, proxy)})
        if args.proxies:  # Ray reads the proxy switches when a cluster starts: a fresh one per round
            import ray

            ray.shutdown()
    rows = [{**r, "proxy": rnd["proxy"], "round": rnd["round"]} for rnd in rounds for r in rnd["rows"]]
    md = result_markdown(rounds, base)
    print()
    print(md)
    first = rounds[0]
    result = {"benchmark": "serve_load", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "commit": env["commit"],
              "device": env["gpu"] or env["cpu"], "env": env, "host": env["host"], "cpus": env["cpus"],
              "url": first["url"], "dtype": first["dtype"], "proxy": first["proxy"] if len(rounds) == 1 else None,
              "args": {**vars(args), "api_key": "<redacted>" if args.api_key else None},
              "server_args": first["server_args"] if len(rounds) == 1 else None, "in_process": base, "results": rows,
              "paired": first["paired"] if len(rounds) == 1 else None,
              "targets": targets(first["rows"], base, first["paired"]) if len(rounds) == 1 else None,
              "prometheus": first["prometheus"] if len(rounds) == 1 else None,
              # several rounds: each row once (in "results", tagged with its round), the rounds without
              # them, and no summary or tables: bench/serve_load_report.py rebuilds both from the rows
              "rounds": [{k: v for k, v in rnd.items() if k != "rows"} for rnd in rounds] if len(rounds) > 1 else None,
              "markdown": md if len(rounds) == 1 else None}
    from common import git_dirty, write_json, write_result  # bench/common.py

    result["uncommitted"] = git_dirty()
    if args.tag:
        out = write_result(os.path.join(ROOT, "bench", "results"), args.tag, result,
                           f"# serve_load {args.tag}\n\n`{env['command']}` (commit {env['commit']}, {result['device']})",
                           markdown=md)
    else:
        out = write_json(args.out or os.path.join(ROOT, "bench", "results",
                                                  f"serve_load-{time.strftime('%Y%m%d-%H%M%S')}.json"), result)
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
