"""DNC vs the plain-Transformer baseline: training throughput, prefill, decode, memory.

For each preset, in one run (same process, same device):
  * training: forward+backward tokens/s, MFU (CUDA) and peak memory at each ``--train-lengths``;
  * prefill: tokens/s and peak memory at each ``--prefill-lengths`` (baseline up to ``--baseline-max``);
  * decode: after a context of each ``--decode-contexts``, the serving decode loop
    (``dnc.generate.BatchDecoder``: ragged batches, CUDA-graph decode steps on CUDA) at each
    ``--decode-batches`` rows (every row a copy of that context): median ms per step (= per token of
    each row) and tokens/s in all; plus the plain one-token model call at batch 1 for comparison;
  * state size: DNC bank bytes vs the baseline's KV-cache bytes at the same context.
The baseline is the same code with memory off and one segment spanning the input.
Writes ``bench/results/model_speed_<device>.json`` and prints a markdown table.

Examples:
    python bench/model_speed.py --device cpu                      # tiny preset, small lengths
    python bench/model_speed.py --device cuda --presets small --no-infer --train-compile graphs  # training rows, CUDA graphs
    python bench/model_speed.py --device cuda --presets small,base --dtype bf16 \
        --train-lengths 2048,8192,32768 --prefill-lengths 4096,32768,131072,524288,1048576 \
        --decode-contexts 4096,32768,131072,1048576
    # issue 14's decode targets: batch 1 and 64 at 4k and 1M context (small, H200)
    python bench/model_speed.py --device cuda --presets small --no-train --prefill-lengths 4k \
        --decode-contexts 4k,1m --decode-batches 1,64 --tag decode
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from dnc.config import DNCConfig, preset  # noqa: E402
from dnc.generate import BatchDecoder, DecodeRow, SamplingParams  # noqa: E402
from dnc.model import DNC  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def ints(s: str) -> list[int]:
    out = []
    for part in s.split(","):
        part = part.strip().lower()
        if part:
            mult = 1024 * 1024 if part.endswith("m") else 1024 if part.endswith("k") else 1
            out.append(int(float(part.rstrip("km")) * mult))
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_mb(device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process high-water mark
    except Exception:
        return None


def timed(fn, device, warmup: int, iters: int) -> float:
    """Median seconds per call, measured after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def flops_per_token(model: DNC, attended: float) -> float:
    """6N (weights, fwd+bwd) + 12 * layers * d * attended (attention scores and values, fwd+bwd)."""
    cfg = model.config
    n = model.num_params(exclude_embedding=True) + cfg.vocab_size * cfg.d_model  # lm head matmul
    return 6 * n + 12 * cfg.n_layers * cfg.d_model * attended


MODEL_OVERRIDES: dict = {}
"""``--model-set`` fields applied to every preset (the DNC; its baseline keeps only what a
one-segment Transformer has), e.g. the trained config ``segment_len=512 write_importance=50
self_read=true`` of configs/train/small.yaml."""


def build(name: str, memory: bool, seq_len: int, device, dtype, compile_: bool) -> DNC:
    cfg = DNCConfig.from_dict({**preset(name).to_dict(), **MODEL_OVERRIDES})
    if not memory:
        cfg = cfg.baseline(seq_len)
    torch.manual_seed(0)
    model = DNC(cfg).to(device)
    if dtype is not None and device.type == "cuda":
        model = model.to(dtype)
    if compile_:
        # every Block shares one forward code object, so each block's compiled variants (memory or
        # not, first segment or not) count against dynamo's per-code limit: base has 12 blocks
        for knob in ("cache_size_limit", "recompile_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
        for blk in model.blocks:
            blk.forward = torch.compile(blk.forward, dynamic=True)
    return model


def train_compile(args) -> str:
    """What runs the DNC's training segments: off, segment or graphs (``--compile-segment`` = segment)."""
    return "segment" if args.compile_segment else args.train_compile


def bench_train(name, seq_len, memory, args, device, dtype) -> dict:
    model = build(name, memory, seq_len, device, None, args.compile).train()
    how = train_compile(args) if memory else "off"  # the baseline is one segment: nothing to capture
    if how == "segment":  # the DNC's whole training segment step as one torch.compile graph
        from dnc.parallel import compile_segments

        compile_segments(model, mode=args.compile_mode)
    elif how == "graphs":  # the same step as CUDA graphs (captured in the first warm-up step)
        from dnc.parallel import graph_segments

        graph_segments(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    b = max(1, args.tokens_per_step // seq_len)
    x = torch.randint(0, 256, (b, seq_len), device=device)
    ac = torch.autocast("cuda", dtype=torch.bfloat16) if (device.type == "cuda" and dtype == torch.bfloat16) \
        else torch.autocast("cpu", enabled=False)

    def step():
        with ac:
            loss = model(x, targets=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    reset_peak(device)
    try:
        sec = timed(step, device, args.warmup, args.iters)
    except torch.OutOfMemoryError:
        return {"oom": True}
    cfg = model.config
    attended = seq_len / 2 if not memory else (cfg.segment_len / 2 + cfg.kv_window
                                               + cfg.bank_slots * len(cfg.memory_layer_ids) / cfg.n_layers)
    tps = b * seq_len / sec
    out = {"tokens_per_s": tps, "step_s": sec, "batch": b, "peak_mb": peak_mb(device), "train_compile": how}
    if device.type == "cuda":
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in torch.cuda.get_device_name()), None)
        if peak:
            out["mfu"] = tps * flops_per_token(model, attended) / (peak * 1e12)
    del model, opt
    return out


@torch.no_grad()
def bench_prefill_decode(name, ctx, memory, args, device, dtype, decode: bool) -> dict:
    model = build(name, memory, ctx + args.decode_steps + 8, device, dtype, args.compile_infer).eval()
    chunk = model.config.segment_len if memory else ctx
    x = torch.randint(0, 256, (1, ctx), device=device)

    def prefill():
        st = model.init_state(1)
        for i in range(0, ctx, chunk):
            model(x[:, i:i + chunk], state=st, last_logits_only=True, metrics=False)
        return st

    out = {}
    if memory and args.compare_eager and device.type == "cuda":
        reset_peak(device)
        out["prefill_tokens_per_s_eager"] = ctx / timed(prefill, device, 1, args.prefill_iters)
    warmup = 1
    if memory and args.cuda_graphs and device.type == "cuda":
        model.enable_cuda_graphs()  # a layout is captured the second time it is seen: two warm-up calls
        warmup = 2
        if not args.decode_graphs:
            model.set_decode_runner(None)
    reset_peak(device)
    try:
        sec = timed(prefill, device, warmup, args.prefill_iters)
        state = prefill()
    except torch.OutOfMemoryError:
        return {"oom": True}
    out.update({"prefill_tokens_per_s": ctx / sec, "prefill_s": sec, "peak_mb": peak_mb(device),
                "bank_bytes": state.nbytes(), "kv_cache_bytes": state.cache_nbytes(),
                "cuda_graphs": model._segment_graphs is not None})
    if decode:
        tok = torch.randint(0, 256, (1, 1), device=device)
        if memory:
            for b in args.decode_batches:
                try:
                    r = bench_decode_loop(model, state, b, args, device)
                except torch.OutOfMemoryError:
                    r = {"oom": True}
                out[f"decode_b{b}"] = r
            if out.get("decode_b1", {}).get("ms_median") is not None:
                out["decode_ms_median"] = out["decode_b1"]["ms_median"]
                out["decode_ms_mean"] = out["decode_b1"]["ms_mean"]
        lat = []
        plain = state.select([0]) if memory else state
        for _ in range(args.decode_steps):
            sync(device)
            t = time.perf_counter()
            model(tok, state=plain, last_logits_only=True, metrics=False)
            sync(device)
            lat.append(time.perf_counter() - t)
        lat = lat[2:]  # warm-up
        key = "decode_plain_ms" if memory else "decode_ms"
        out[f"{key}_median"] = 1e3 * statistics.median(lat)
        out[f"{key}_mean"] = 1e3 * statistics.fmean(lat)
    del model, state
    return out


def bench_decode_loop(model, state, batch: int, args, device) -> dict:
    """The serving decode loop (``BatchDecoder.step``: sample, stop checks, one ragged model call,
    CUDA graphs when enabled) for ``batch`` rows, each a copy of ``state``. Rows share the position,
    so every ``segment_len`` steps all commit in one step: the median is the steady state, the
    mean includes the commits."""
    rows = [DecodeRow([1], state.select([0]), args.decode_steps + 8, SamplingParams(0.0)) for _ in range(batch)]
    dec = BatchDecoder(model, max_batch=batch)
    dec.add(rows)
    lat = []
    for _ in range(args.decode_steps):
        sync(device)
        t = time.perf_counter()
        dec.step()
        sync(device)
        lat.append(time.perf_counter() - t)
    dec.close()
    lat = lat[3:]  # warm-up: the first step is eager, the second captures the graph
    runner = model.decode_runner
    ms = 1e3 * statistics.median(lat)
    out = {"ms_median": ms, "ms_mean": 1e3 * statistics.fmean(lat), "tokens_per_s": batch / (ms / 1e3),
           "graph_replays": getattr(runner, "replays", 0), "commits": dec.commits}
    del rows, dec
    return out


def main(argv=None) -> int:
    from common import HelpFormatter  # bench/common.py (on sys.path above)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--presets", default=None, help="comma list (default: tiny on CPU, small,base on CUDA)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="CUDA compute dtype")
    p.add_argument("--train-lengths", default=None, help="e.g. 2k,8k,32k")
    p.add_argument("--prefill-lengths", default=None, help="e.g. 4k,32k,128k,512k,1m")
    p.add_argument("--decode-contexts", default=None, help="e.g. 4k,32k,128k,1m")
    p.add_argument("--baseline-max", default=None, help="longest baseline prefill/decode context (e.g. 128k)")
    p.add_argument("--baseline-train-max", default=None, help="longest baseline training length")
    p.add_argument("--tokens-per-step", type=int, default=None,
                   help="training tokens per step; batch = max(1, this / length) (default 64k CUDA, 4k CPU)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--prefill-iters", type=int, default=3)
    p.add_argument("--decode-steps", type=int, default=34)
    p.add_argument("--decode-batches", default=None,
                   help="rows of the decode loop to time at each decode context, e.g. 1,64 (default 1,64 CUDA, 1,8 CPU)")
    p.add_argument("--decode-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="the decode loop replays its steps as CUDA graphs per batch bucket (with --cuda-graphs)")
    p.add_argument("--no-train", action="store_true", help="inference rows only (prefill, decode)")
    p.add_argument("--compile", action="store_true", help="torch.compile each block for training")
    p.add_argument("--compile-segment", action="store_true",
                   help="torch.compile the DNC's whole training segment step (train.compile: segment); "
                        "the baseline is one segment and stays as it is")
    p.add_argument("--train-compile", default="off", choices=["off", "segment", "graphs"],
                   help="the DNC's training segment step: off (eager, the default), segment (torch.compile, "
                        "= --compile-segment) or graphs (CUDA graphs, recomputed in backward: train.compile: graphs)")
    p.add_argument("--compile-mode", default=None, help="--compile-segment: torch.compile mode, e.g. "
                   "max-autotune-no-cudagraphs")
    p.add_argument("--compile-infer", action="store_true",
                   help="torch.compile each block for prefill and decode too (DNC and baseline)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="DNC prefill replays each whole segment as a CUDA graph (dnc.cuda_graphs); default on")
    p.add_argument("--compare-eager", action="store_true",
                   help="also time the DNC prefill without CUDA graphs (prefill_tokens_per_s_eager)")
    p.add_argument("--no-infer", action="store_true", help="training rows only")
    p.add_argument("--model-set", dest="model_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a DNCConfig field of every preset (YAML value; repeatable), e.g. "
                        "--model-set segment_len=512 --model-set write_importance=50 (the trained small config)")
    p.add_argument("--tag", default="", help="suffix of the result file names")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    from common import parse_pairs  # bench/common.py

    try:
        MODEL_OVERRIDES.clear()  # this run's alone (main may run more than once in a process)
        MODEL_OVERRIDES.update(parse_pairs("--model-set", args.model_overrides))
        for name in (args.presets or "tiny").split(","):  # unknown fields and bad values fail here, before any timing
            DNCConfig.from_dict({**preset(name).to_dict(), **MODEL_OVERRIDES})
    except (ValueError, TypeError) as e:
        p.error(f"--model-set: {e}")

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if (cuda and args.dtype == "bf16") else None
    presets = (args.presets or ("small,base" if cuda else "tiny")).split(",")
    train_lengths = [] if args.no_train else ints(args.train_lengths or ("2k,8k,32k" if cuda else "256,1k,4k"))
    args.decode_batches = ints(args.decode_batches or ("1,64" if cuda else "1,8"))
    prefill_lengths = ints(args.prefill_lengths or ("4k,32k,128k,512k,1m" if cuda else "1k,4k,16k,64k"))
    decode_ctx = ints(args.decode_contexts or ("4k,32k,128k,1m" if cuda else "1k,4k,16k,64k"))
    base_max = ints(args.baseline_max or ("128k" if cuda else "16k"))[0]
    base_train_max = ints(args.baseline_train_max or ("32k" if cuda else "4k"))[0]
    args.tokens_per_step = args.tokens_per_step or (65536 if cuda else 4096)
    if not cuda:
        torch.set_num_threads(os.cpu_count() or 1)

    from common import command_line, git_commit  # bench/common.py: $DNC_COMMIT or git

    argv = list(sys.argv[1:] if argv is None else argv)
    results = {"benchmark": "model_speed", "argv": argv, "command": command_line("model_speed", argv),
               "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
               "torch": torch.__version__, "dtype": args.dtype if cuda else "fp32",
               "commit": git_commit() or "unknown", "args": vars(args), "rows": []}
    for name in presets:
        for L in train_lengths:
            for memory in (True, False):
                if not memory and L > base_train_max:
                    continue
                r = bench_train(name, L, memory, args, device, dtype)
                results["rows"].append({"preset": name, "kind": "train", "model": "dnc" if memory else "baseline",
                                        "length": L, **r})
                print(json.dumps(results["rows"][-1]), flush=True)
                save(results, args, cuda)
        for L in ([] if args.no_infer else sorted(set(prefill_lengths) | set(decode_ctx))):
            for memory in (True, False):
                if not memory and L > base_max:
                    continue
                r = bench_prefill_decode(name, L, memory, args, device, dtype, decode=L in decode_ctx)
                results["rows"].append({"preset": name, "kind": "infer", "model": "dnc" if memory else "baseline",
                                        "length": L, **r})
                print(json.dumps(results["rows"][-1]), flush=True)
                save(results, args, cuda)
    print(save(results, args, cuda))
    return 0


def save(results: dict, args, cuda: bool) -> str:
    """Write JSON + markdown after every row, so a run cut short keeps what it measured."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = ("cuda" if cuda else "cpu") + (f"_{args.tag}" if args.tag else "")
    (out / f"model_speed_{tag}.json").write_text(json.dumps(results))  # compact: results are committed
    table = markdown(results)
    (out / f"model_speed_{tag}.md").write_text(table)
    return table


def _fmt(v, spec="{:,.0f}"):
    return "—" if v is None else ("OOM" if v == "oom" else spec.format(v))


def markdown(results: dict) -> str:
    rows = results["rows"]
    how = {r.get("train_compile") for r in rows if r["kind"] == "train" and r["model"] == "dnc"} - {None, "off"}
    lines = [f"Device: {results['device']}, torch {results['torch']}, {results['dtype']}, commit {results['commit']}"
             + (f"; DNC training segments: {', '.join(sorted(how))}" if how else ""), ""]
    lines += ["| preset | length | DNC train tok/s | base train tok/s | ratio | DNC MFU | base MFU | DNC peak MB | base peak MB |",
              "|---|---|---|---|---|---|---|---|---|"]
    get = lambda kind, model, pr, L: next((r for r in rows if r["kind"] == kind and r["model"] == model  # noqa: E731
                                           and r["preset"] == pr and r["length"] == L), {})
    for pr in dict.fromkeys(r["preset"] for r in rows):
        for L in sorted({r["length"] for r in rows if r["kind"] == "train" and r["preset"] == pr}):
            d, b = get("train", "dnc", pr, L), get("train", "baseline", pr, L)
            ratio = d.get("tokens_per_s") / b["tokens_per_s"] if d.get("tokens_per_s") and b.get("tokens_per_s") else None
            lines.append(f"| {pr} | {L:,} | {_fmt(d.get('tokens_per_s'))} | {_fmt(b.get('tokens_per_s'))} | "
                         f"{_fmt(ratio, '{:.2f}x')} | {_fmt(d.get('mfu'), '{:.1%}')} | {_fmt(b.get('mfu'), '{:.1%}')} | "
                         f"{_fmt(d.get('peak_mb'))} | {_fmt(b.get('peak_mb'))} |")
    eager = any("prefill_tokens_per_s_eager" in r for r in rows)
    lines += ["", "| preset | context | DNC prefill tok/s | base prefill tok/s | ratio | DNC decode ms | base decode ms | "
              "DNC bank MB | base KV MB | KV/bank |" + (" DNC eager prefill tok/s | graphs speed-up |" if eager else ""),
              "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if eager else "")]
    for pr in dict.fromkeys(r["preset"] for r in rows):
        for L in sorted({r["length"] for r in rows if r["kind"] == "infer" and r["preset"] == pr}):
            d, b = get("infer", "dnc", pr, L), get("infer", "baseline", pr, L)
            ratio = d.get("prefill_tokens_per_s") / b["prefill_tokens_per_s"] \
                if d.get("prefill_tokens_per_s") and b.get("prefill_tokens_per_s") else None
            bank = d.get("bank_bytes")
            kv = b.get("kv_cache_bytes")
            lines.append(
                f"| {pr} | {L:,} | {_fmt(d.get('prefill_tokens_per_s'))} | {_fmt(b.get('prefill_tokens_per_s'))} | "
                f"{_fmt(ratio, '{:.2f}x')} | {_fmt(d.get('decode_ms_median'), '{:.2f}')} | "
                f"{_fmt(b.get('decode_ms_median'), '{:.2f}')} | {_fmt(bank / 2**20 if bank else None, '{:.1f}')} | "
                f"{_fmt(kv / 2**20 if kv else None, '{:.1f}')} | {_fmt(kv / bank if kv and bank else None, '{:.0f}x')} |"
                + (f" {_fmt(d.get('prefill_tokens_per_s_eager'))} | "
                   f"{_fmt(d['prefill_tokens_per_s'] / d['prefill_tokens_per_s_eager'] if d.get('prefill_tokens_per_s_eager') and d.get('prefill_tokens_per_s') else None, '{:.2f}x')} |"
                   if eager else ""))
    loops = [(r, k, v) for r in rows if r["kind"] == "infer" and r["model"] == "dnc"
             for k, v in r.items() if k.startswith("decode_b") and isinstance(v, dict)]
    if loops:
        lines += ["", "Decode loop (BatchDecoder: ragged batch, CUDA-graph steps on CUDA), every row at the context:", "",
                  "| preset | context | rows | ms / step (median) | ms / step (mean, with commits) | tokens/s in all | "
                  "plain model call, batch 1, ms |", "|---|---|---|---|---|---|---|"]
        for r, k, v in loops:
            lines.append(f"| {r['preset']} | {r['length']:,} | {k[len('decode_b'):]} | "
                         f"{'OOM' if v.get('oom') else _fmt(v.get('ms_median'), '{:.2f}')} | "
                         f"{_fmt(v.get('ms_mean'), '{:.2f}')} | {_fmt(v.get('tokens_per_s'))} | "
                         f"{_fmt(r.get('decode_plain_ms_median'), '{:.2f}')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
