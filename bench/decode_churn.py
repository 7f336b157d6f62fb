"""The decode loop's host work under a churn of arriving and finishing rows (issue 14: at 64
streamed clients the model thread spent a third of its time around admissions).

Two parts, each comparing configurations in one run, alternating so a change of machine load hits
them alike. Plain PyTorch and asyncio in this process, no Ray, no HTTP.

decoder    ``BatchDecoder`` s, one per ``--shrink-after`` value (the first is the baseline; 1 is
           the old rule: shrink to a smaller bucket as soon as the rows fit it), driven step by
           step by the same closed-loop clients: ``--clients`` clients, each with one row at a
           time (``--new-tokens`` tokens, a ``--prompt-len`` prompt), the next arriving
           ``--gap`` steps after the previous one finished. With 40 clients, 8..24 tokens and a
           gap of 0..8 steps the rows hover around 32, the 32/64 bucket boundary. Per 1,000
           steps: resizes (each a copy of every state tensor of every row of the batch), rows
           copied, and the aten ops the resizes dispatched; the median ms per step (add + step)
           and the mean padded slots per running row. Every request's tokens are checked equal
           across the decoders (greedy).
scheduler  ``serve.scheduler.DecodeScheduler`` on a model thread (as the Generator runs it) with
           ``--sched-clients`` closed-loop clients, each sending ``--sched-requests`` requests
           (``--new-tokens``), one after another, ``--think-ms`` apart: ``before`` (arrivals admitted at
           the next step, one by one under load, and the old shrink rule) against ``after`` (the
           defaults: coalesced admissions, shrink after ``BatchDecoder.SHRINK_AFTER`` steps).
           Tokens/s, admissions and rows per admission, the model thread's share in admissions
           (prefill_s / busy_s), time to first token at the client (p50 / p90) and resizes per
           1,000 steps; ``--rounds`` rounds of each, figures pooled. 1 client checks that a lone
           request is not delayed.

    python bench/decode_churn.py --device cpu --threads 1 --tag cpu_hostcost

Writes ``<out>/decode_churn_<tag>.json`` (provenance: argv, command, commit, device, torch) and
prints the tables.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
from common import (HelpFormatter, device_tag, fmt_num, md_table, parse_pairs, percentile,  # noqa: E402
                    provenance, write_json)

from profile_model import OpCounter  # noqa: E402

from dnc.config import preset  # noqa: E402
from dnc.generate import BatchDecoder, DecodeRow, SamplingParams  # noqa: E402
from dnc.model import DNC  # noqa: E402

TITLE = "The decode loop's host work under churn: bucket resizes and coalesced admissions (`bench/decode_churn.py`)"
WHAT = ("Closed-loop clients whose rows arrive and finish around a bucket boundary: resize copies per 1,000 "
        "steps for each shrink rule of `BatchDecoder`, and the scheduler's admissions, admission share of the "
        "model thread and time to first token with arrivals admitted one by one against coalesced, in one run.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--preset", default="tiny", help="model preset (untrained weights)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, repeatable (e.g. --set segment_len=128)")
    p.add_argument("--parts", nargs="+", choices=("decoder", "scheduler"), default=["decoder", "scheduler"],
                   help="what to run")
    p.add_argument("--clients", type=int, default=40, help="decoder: closed-loop clients (one row each at a time)")
    p.add_argument("--steps", type=int, default=1000, help="decoder: steps per decoder")
    p.add_argument("--new-tokens", type=int, nargs=2, default=[8, 24], metavar=("MIN", "MAX"),
                   help="decoder: tokens per request, drawn uniformly")
    p.add_argument("--gap", type=int, nargs=2, default=[0, 8], metavar=("MIN", "MAX"),
                   help="decoder: steps between a client's row finishing and its next arriving")
    p.add_argument("--prompt-len", type=int, nargs=2, default=[8, 32], metavar=("MIN", "MAX"),
                   help="prompt tokens, drawn uniformly (both parts)")
    p.add_argument("--shrink-after", type=int, nargs="+", default=[1, BatchDecoder.SHRINK_AFTER],
                   help="decoder: BatchDecoder.shrink_after values compared (the first is the baseline)")
    p.add_argument("--sched-clients", type=int, nargs="+", default=[1, 32], help="scheduler: client levels")
    p.add_argument("--sched-requests", type=int, default=12, help="scheduler: requests per client per round")
    p.add_argument("--think-ms", type=float, nargs=2, default=[0.0, 10.0], metavar=("MIN", "MAX"),
                   help="scheduler: a client's pause between its requests (the HTTP round trip), drawn uniformly")
    p.add_argument("--rounds", type=int, default=3, help="scheduler: rounds of each configuration (alternating)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="CUDA weights dtype")
    p.add_argument("--no-graphs", action="store_true", help="CUDA: eager decode steps (no CUDA graphs)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--seed", type=int, default=0, help="weights and prompts seed")
    p.add_argument("--tag", default=None, help="result name suffix (default: device tag, e.g. h200 or cpu)")
    p.add_argument("--out", default=str(HERE / "results"), help="folder of the JSON")
    return p


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _draw(g: torch.Generator, lo_hi) -> int:
    lo, hi = lo_hi
    return int(torch.randint(lo, hi + 1, (1,), generator=g))


def _request(args, client: int, k: int, max_new=None) -> tuple[list[int], int]:
    """Client ``client`` 's ``k``-th request: (prompt ids, new tokens), the same in every configuration."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + client * 10_007 + k)
    n = _draw(g, args.prompt_len)
    return torch.randint(0, 256, (n,), generator=g).tolist(), max_new or _draw(g, args.new_tokens)


# ================================================================================== decoder
class _Client:
    def __init__(self, idx: int):
        self.idx, self.k, self.row, self.due = idx, 0, None, 0


def run_decoders(model, args) -> dict:
    decs = {s: BatchDecoder(model, 64, shrink_after=s) for s in args.shrink_after}
    clients = {s: [_Client(c) for c in range(args.clients)] for s in decs}
    tokens = {s: {} for s in decs}
    ms = {s: [] for s in decs}
    padded = {s: [] for s in decs}
    running = {s: [] for s in decs}
    counters = {s: OpCounter() for s in decs}
    for s, dec in decs.items():  # the ops of every resize (growth in add, shrink in step)
        orig, counter = dec._resize, counters[s]

        def counted(b, capacity, orig=orig, counter=counter):
            with counter:
                orig(b, capacity)
        dec._resize = counted
    g = torch.Generator().manual_seed(args.seed + 7)
    gaps = [[_draw(g, args.gap) for _ in range(4 * args.steps)] for _ in range(args.clients)]
    for t in range(args.steps):
        order = list(decs) if t % 2 == 0 else list(reversed(decs))
        for s in order:
            dec, arrive = decs[s], []
            for c in clients[s]:
                if c.row is not None and c.row.done:
                    tokens[s][(c.idx, c.k)] = c.row.tokens
                    c.row, c.due, c.k = None, t + gaps[c.idx][c.k], c.k + 1
                if c.row is None and t >= c.due:
                    ids, n = _request(args, c.idx, c.k)
                    c.row = DecodeRow(ids, None, n, SamplingParams(0.0))
                    arrive.append(c.row)
            sync(dec.model.device)
            t0 = time.perf_counter()
            if arrive:
                assert not dec.add(arrive)
            dec.step()
            sync(dec.model.device)
            ms[s].append(1e3 * (time.perf_counter() - t0))
            rows = sum(b.rb.n_active for b in dec.batches)
            running[s].append(rows)
            if rows:
                padded[s].append(sum(b.rb.capacity for b in dec.batches) / rows - 1)
    out = []
    base = args.shrink_after[0]
    common = set.intersection(*(set(v) for v in tokens.values()))
    for s, dec in decs.items():
        per = 1000 / dec.steps
        ops = counters[s].summary()
        out.append({"shrink_after": s, "steps": dec.steps, "requests_done": len(tokens[s]),
                    "resizes_per_1k": dec.resizes * per, "rows_copied_per_1k": dec.resized_rows * per,
                    "resize_kernel_ops_per_1k": ops["kernel_ops"] * per, "ms_median": statistics.median(ms[s]),
                    "ms_mean": statistics.fmean(ms[s]), "padded_per_row_mean": statistics.fmean(padded[s]),
                    "running_mean": statistics.fmean(running[s]),
                    "running_p10_p90": [percentile(running[s], 0.1), percentile(running[s], 0.9)],
                    "tokens_equal_to_baseline": all(tokens[s][k] == tokens[base][k] for k in common),
                    "requests_compared": len(common)})
        dec.close()
    return {"clients": args.clients, "new_tokens": args.new_tokens, "gap": args.gap, "rows": out}


# ================================================================================== scheduler
CONFIGS = {"before": {"admit_batch": 1, "admit_delay_s": 0.0, "shrink_after": 1}, "after": {}}


async def _closed_loop(sch, args, n_clients: int, rnd: int) -> dict:
    ttft, tokens = [], {}

    async def client(c: int):
        for k in range(args.sched_requests):
            ids, n = _request(args, 1000 * (rnd + 1) + c, k)
            row = DecodeRow(ids, None, n, SamplingParams(0.0))
            g = torch.Generator().manual_seed(rnd * 1_000_003 + c * 1009 + k)
            think = args.think_ms[0] + (args.think_ms[1] - args.think_ms[0]) * float(torch.rand(1, generator=g))
            t0, first = time.perf_counter(), None
            async for _ in sch.submit(row):
                if first is None:
                    first = time.perf_counter() - t0
            ttft.append(1e3 * first)
            tokens[(c, k)] = row.tokens
            await asyncio.sleep(think / 1e3)
    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(n_clients)))
    return {"wall_s": time.perf_counter() - t0, "ttft_ms": ttft, "tokens": tokens}


def run_scheduler(model, args) -> dict:
    from serve.scheduler import DecodeScheduler

    levels = []
    for n_clients in args.sched_clients:
        pooled = {name: {"wall_s": 0.0, "ttft_ms": [], "stats": {}, "resizes": 0, "dec_steps": 0, "equal": True}
                  for name in CONFIGS}
        for rnd in range(args.rounds):
            seen = {}
            for name in (list(CONFIGS) if rnd % 2 == 0 else list(reversed(CONFIGS))):
                kw = dict(CONFIGS[name])
                shrink = kw.pop("shrink_after", None)
                pool = ThreadPoolExecutor(1, thread_name_prefix="dnc-model")

                async def run(fn, *a, pool=pool):
                    return await asyncio.get_running_loop().run_in_executor(pool, fn, *a)

                # as the Generator makes it (serve/generator.py defaults: 15 ms chunks, 500 events/s)
                sch = DecodeScheduler(model, run, chunk_s=0.015, max_batch=64, max_running=256,
                                      events_per_s=500.0, **kw)
                if shrink is not None:
                    sch.decoder.shrink_after = shrink
                r = asyncio.run(_closed_loop(sch, args, n_clients, rnd))
                pool.shutdown()
                p = pooled[name]
                p["wall_s"] += r["wall_s"]
                p["ttft_ms"] += r["ttft_ms"]
                for key, v in sch.stats.items():
                    p["stats"][key] = p["stats"].get(key, 0) + v if key not in ("max_batch", "max_running") else \
                        max(p["stats"].get(key, 0), v)
                p["resizes"] += sch.decoder.resizes
                p["dec_steps"] += sch.decoder.steps
                seen[name] = r["tokens"]
            pooled["after"]["equal"] &= seen["after"] == seen["before"]
        rows = []
        for name, p in pooled.items():
            st = p["stats"]
            rows.append({"config": name, "clients": n_clients, "requests": len(p["ttft_ms"]),
                         "tokens_per_s": st["tokens"] / p["wall_s"], "admissions": st["admissions"],
                         "rows_per_admission": st["admitted"] / max(1, st["admissions"]),
                         "prefill_share": st["prefill_s"] / max(1e-9, st["busy_s"]),
                         "iterations": st["iterations"], "mean_batch": st["rows_stepped"] / max(1, st["steps"]),
                         "ttft_ms_p50": percentile(p["ttft_ms"], 0.5), "ttft_ms_p90": percentile(p["ttft_ms"], 0.9),
                         "resizes_per_1k_steps": 1000 * p["resizes"] / max(1, p["dec_steps"]),
                         "tokens_equal_to_before": p["equal"]})
        levels += rows
        for r in rows:
            print(f"{n_clients} clients {r['config']}: {r['tokens_per_s']:.0f} tok/s, {r['admissions']} admissions "
                  f"({r['rows_per_admission']:.1f} rows), prefill {100 * r['prefill_share']:.0f}% of busy, "
                  f"TTFT p50 {r['ttft_ms_p50']:.1f} ms", file=sys.stderr, flush=True)
    return {"rounds": args.rounds, "requests_per_client": args.sched_requests, "new_tokens": args.new_tokens,
            "think_ms": args.think_ms, "configs": CONFIGS, "levels": levels}


# ================================================================================== report
def render(res: dict) -> str:
    """The body of a result's entry in ``bench/README.md``: where it ran, then its tables."""
    lines = [f"Device: {res.get('gpu') or res.get('device')}; torch {res.get('torch')}; "
             f"commit {res.get('commit') or 'unknown'}; preset {res.get('preset')}, {res.get('dtype')}, CUDA graphs "
             f"{res.get('graphs')}, {res.get('threads')} threads", ""]
    d = res.get("decoder")
    if d:
        base = d["rows"][0]
        lo, hi = base["running_p10_p90"]
        lines += [f"Decoder under churn: {d['clients']} closed-loop clients, {d['new_tokens'][0]}.."
                  f"{d['new_tokens'][1]} tokens per request, next request {d['gap'][0]}..{d['gap'][1]} steps after "
                  f"the last (running rows: mean {base['running_mean']:.1f}, p10..p90 {lo:.0f}..{hi:.0f}); per 1,000 "
                  f"steps (ratio against shrink_after {base['shrink_after']}); tokens equal: each request's tokens "
                  "against the baseline's", ""]
        head = ["shrink_after", "steps", "requests", "resizes / 1k", "rows copied / 1k", "resize kernel ops / 1k",
                "ms / step (median)", "vs baseline", "padded slots / row", "tokens equal"]
        body = [[str(r["shrink_after"]), str(r["steps"]), str(r["requests_done"]),
                 fmt_num(r["resizes_per_1k"], "{:.1f}"),
                 fmt_num(r["rows_copied_per_1k"], "{:,.0f}"), fmt_num(r["resize_kernel_ops_per_1k"], "{:,.0f}"),
                 fmt_num(r["ms_median"], "{:.2f}"), fmt_num(r["ms_median"] / base["ms_median"], "{:.2f}x"),
                 fmt_num(r["padded_per_row_mean"], "{:.2f}"),
                 f"{'yes' if r['tokens_equal_to_baseline'] else 'NO'} ({r['requests_compared']})"] for r in d["rows"]]
        lines += md_table(head, body, "r" * len(head)) + [""]
    s = res.get("scheduler")
    if s:
        lines += [f"Scheduler, closed-loop clients in process: {s['requests_per_client']} requests of "
                  f"{s['new_tokens'][0]}..{s['new_tokens'][1]} tokens per client and round, "
                  f"{s['think_ms'][0]:g}..{s['think_ms'][1]:g} ms apart, {s['rounds']} rounds per configuration "
                  "(alternating), figures pooled; before = admitted one by one at the next step, old shrink rule", ""]
        head = ["clients", "config", "requests", "tokens/s", "admissions", "rows / admission", "admission share",
                "TTFT p50 ms", "TTFT p90 ms", "rows / step", "resizes / 1k steps", "tokens equal"]
        body = [[str(r["clients"]), r["config"], str(r["requests"]), fmt_num(r["tokens_per_s"], "{:,.0f}"),
                 str(r["admissions"]), fmt_num(r["rows_per_admission"], "{:.1f}"),
                 fmt_num(100 * r["prefill_share"], "{:.0f}%"), fmt_num(r["ttft_ms_p50"], "{:.1f}"),
                 fmt_num(r["ttft_ms_p90"], "{:.1f}"), fmt_num(r["mean_batch"], "{:.1f}"),
                 fmt_num(r["resizes_per_1k_steps"], "{:.1f}"),
                 "" if r["config"] == "before" else ("yes" if r["tokens_equal_to_before"] else "NO")]
                for r in s["levels"]]
        lines += md_table(head, body, "rlrrrrrrrrrl") + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = preset(args.preset, **parse_pairs("--set", args.overrides))
    model = DNC(cfg).to(device).eval()
    graphs = False
    if device.type == "cuda":
        if args.dtype == "bf16":
            model = model.to(torch.bfloat16)
        if not args.no_graphs:
            model.enable_cuda_graphs()
            graphs = model.decode_runner is not None
    res = provenance("decode_churn", argv, device) | {
        "preset": args.preset, "model_config": cfg.to_dict(), "threads": torch.get_num_threads(), "graphs": graphs,
        "dtype": args.dtype if device.type == "cuda" else "fp32"}
    if "decoder" in args.parts:
        res["decoder"] = run_decoders(model, args)
        for r in res["decoder"]["rows"]:
            print(f"shrink_after {r['shrink_after']}: {r['resizes_per_1k']:.1f} resizes / 1k steps, "
                  f"{r['ms_median']:.2f} ms / step", file=sys.stderr, flush=True)
    if "scheduler" in args.parts:
        res["scheduler"] = run_scheduler(model, args)
    res["markdown"] = render(res)
    print(res["markdown"])
    path = write_json(Path(args.out) / f"decode_churn_{args.tag or device_tag(device)}.json", res)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
