"""Profile one DNC training step and a few decode steps with torch.profiler; prints the top ops.

    python bench/profile_model.py --preset small --length 8192 --device cuda
    python bench/profile_model.py --preset small --device cuda --decode-batch 64 --decode-context 4096

``--decode-batch N`` profiles N rows decoding together (``BatchDecoder``, CUDA-graph steps) instead:
the median ms per step and the kernel table (``--mass-gather off``: the read-mass rule before
session 17, for an A/B; ``--kv-attention flex``: local attention over each row's own KV length,
``RaggedBatch.kv_attention``). The rows' KV lengths are printed: a ``--decode-context`` that is a
whole number of segments puts every row near its segment's start (short KV: flex's best case);
``small`` with ``--decode-context 5120`` puts them near the middle (the average served row).

``--count-ops`` instead counts the aten ops the model dispatches (a proxy for CUDA kernel launches
that needs no GPU) per segment, for training forward+backward, no-grad prefill and single-token
decode, for the DNC and its memory-less baseline; prints a table and writes JSON:

    python bench/profile_model.py --count-ops --preset small --label after
    python bench/profile_model.py --count-ops --preset small --label fixed_segment --fixed-segment

``--fixed-segment`` counts the fixed-capacity segment step that ``train.compile: segment`` compiles,
run eagerly (its graph's ops before fusion); ``--compile-segment`` profiles the compiled step.

The count runs on CPU with the preset shrunk (``--shrink``: segment length and bank capacities
divided by it, width reduced) so it takes seconds; the per-segment op *structure* is unchanged
(same layers, memory layers, write pooling, compression group and level ratios), so the counts
are those of the full-size model. ``rms_norm`` is counted as the CUDA build's fused kernel (1 op
forward, 1 backward). Caveats of the proxy: composite backward ops such as ``select_backward`` /
``slice_backward`` count as 1 but are 2 kernels (zero fill + copy); "host syncs" counts aten ops
that read device values (``item``, ``nonzero``, ...; on CPU also ``one_hot``'s range checks, which
CUDA skips) but not ``Tensor.tolist()``, which bypasses the dispatcher.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HelpFormatter, fmt_num, md_table, parse_pairs, provenance, write_json  # noqa: E402
from dnc.config import DNCConfig, preset  # noqa: E402
from dnc.model import DNC  # noqa: E402
from dnc.parallel import compile_segments  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "op_counts_cpu.json"

TITLE = "Kernel launches per segment (`bench/profile_model.py --count-ops`)"
WHAT = ("The aten ops the model dispatches per segment (a proxy for CUDA kernel launches that needs "
        "no GPU) and the host-device synchronisations, for training forward+backward, no-grad "
        "prefill and single-token decode, DNC vs the memory-less baseline.")

# ops that launch no kernel on a GPU: allocation and metadata only (views are detected by schema);
# scalar_tensor wraps a python number as a CPU 0-dim tensor (torch.where(c, x, 0.0)), a kernel argument
_NO_KERNEL = {"detach", "scalar_tensor", "empty", "empty_strided", "empty_like", "lift_fresh", "_to_copy_noop", "set_",
              "resize_", "_reshape_alias", "alias", "_unsafe_view"}
# ops that make the host wait for the device (and break CUDA-graph capture)
_HOST_SYNC = {"_local_scalar_dense", "nonzero", "item", "is_nonzero", "equal", "allclose", "unique",
              "_unique2", "masked_select", "repeat_interleave"}


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active (forward and autograd backward alike)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

        self.active = True

    @contextlib.contextmanager
    def paused(self):
        was, self.active = self.active, False
        try:
            yield
        finally:
            self.active = was

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.active:
            self.ops[func] += 1
        return func(*args, **(kwargs or {}))

    def summary(self) -> dict:
        total = kernels = syncs = 0
        by_name: Counter = Counter()
        for func, n in self.ops.items():
            if isinstance(func, str):  # counted by hand (a fused kernel), e.g. "_fused_rms_norm"
                total += n
                kernels += n
                by_name[func] += n
                continue
            name = func.overloadpacket.__name__
            total += n
            if name in _HOST_SYNC:
                syncs += n
            if func.is_view or name in _NO_KERNEL:
                continue
            kernels += n
            by_name[name] += n
        casts = by_name["_to_copy"] + by_name["copy_"]
        return {"aten_ops": total, "kernel_ops": kernels, "host_syncs": syncs, "casts": casts,
                "top": dict(by_name.most_common(12))}


class _FusedRMSNorm(torch.autograd.Function):
    """``F.rms_norm`` counted as the CUDA build runs it: one ``_fused_rms_norm`` kernel forward
    and one ``_fused_rms_norm_backward`` backward. The CPU build decomposes it into ~6 ops each
    way, which would inflate every count with norms the memory path does not own."""

    counter: "OpCounter | None" = None
    original = torch.nn.functional.rms_norm

    @staticmethod
    def forward(ctx, x, weight, shape, eps):
        c = _FusedRMSNorm.counter
        with c.paused():
            xd, wd = x.detach().requires_grad_(x.requires_grad), weight.detach().requires_grad_(weight.requires_grad)
            with torch.enable_grad():
                y = _FusedRMSNorm.original(xd, shape, wd, eps)
        c.ops["_fused_rms_norm"] += 1
        ctx.saved = (xd, wd, y)
        return y.detach()

    @staticmethod
    def backward(ctx, gy):
        xd, wd, y = ctx.saved
        c = _FusedRMSNorm.counter
        with c.paused():
            gx, gw = torch.autograd.grad(y, (xd, wd), gy, allow_unused=True)
        c.ops["_fused_rms_norm_backward"] += 1
        return gx, gw, None, None


def _rms_norm(x, shape, weight=None, eps=None):
    if weight is None or not torch.is_grad_enabled():
        c = _FusedRMSNorm.counter
        with c.paused():
            y = _FusedRMSNorm.original(x, shape, weight, eps)
        c.ops["_fused_rms_norm"] += 1
        return y
    return _FusedRMSNorm.apply(x, weight, tuple(shape), eps)


def count(fn) -> dict:
    """Run ``fn`` and count the aten ops it dispatches (``rms_norm`` as the fused CUDA kernel)."""
    c = OpCounter()
    _FusedRMSNorm.counter = c
    torch.nn.functional.rms_norm = _rms_norm
    try:
        with c:
            fn()
    finally:
        torch.nn.functional.rms_norm = _FusedRMSNorm.original
    return c.summary()


def with_overrides(cfg: DNCConfig, overrides: dict) -> DNCConfig:
    """``cfg`` with ``--model-set`` fields (validated: ConfigError naming an unknown field or bad value)."""
    return DNCConfig.from_dict({**cfg.to_dict(), **overrides}) if overrides else cfg


def shrunk_config(name: str, shrink: int, memory: bool = True, **overrides):
    """The preset with segment length and bank capacities divided by ``shrink`` (same ratios)."""
    base = preset(name)
    kw = dict(d_model=16 * base.n_heads, segment_len=base.segment_len // shrink,
              l0_slots=base.l0_slots // shrink, l1_slots=base.l1_slots // shrink,
              l2_slots=base.l2_slots // shrink, kv_window=base.kv_window // shrink)
    kw.update(overrides)
    cfg = preset(name, **kw)
    return cfg if memory else cfg.baseline(cfg.segment_len)


def count_ops(a) -> dict:
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if a.autocast else contextlib.nullcontext
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = shrunk_config(a.preset, a.shrink)
    seg = cfg.segment_len
    n_seg = a.segments
    results: dict = {"config": {k: v for k, v in cfg.to_dict().items() if k in (
        "d_model", "n_layers", "n_heads", "segment_len", "l0_slots", "l1_slots", "l2_slots", "write_pool",
        "compress_group", "memory_layers", "kv_window", "mem_topk", "eviction")},
        "segments": n_seg, "autocast": "cpu bf16" if a.autocast else None, "modes": {}}
    # bank is full after (l0 + 2*l1 + 4*l2) raw slots: from then on every segment compresses + evicts
    fill_segments = -(-(cfg.l0_slots + 2 * cfg.l1_slots + 4 * cfg.l2_slots) * cfg.write_pool // seg) + 1

    for kind in ("dnc", "baseline"):
        torch.manual_seed(0)
        m_cfg = cfg if kind == "dnc" else cfg.baseline(n_seg * seg)
        model = DNC(m_cfg).train()
        if a.fixed_segment:
            compile_segments(model, compile=False)

        x = torch.randint(0, 256, (a.batch, n_seg * seg))
        modes = {}
        per = n_seg if kind == "dnc" else 1  # the baseline's whole input is one segment

        def train_step(state=None):
            with amp():
                out = model(x, targets=x, state=state)
            out.loss.backward()
            model.zero_grad(set_to_none=True)

        train_step()  # warm-up (lazy inits, caches)
        modes["train_fwd_bwd_fresh"] = count(train_step)
        with torch.no_grad():
            with amp():
                modes["train_fwd_fresh"] = count(lambda: model(x, targets=x))
        if kind == "dnc":
            # a full bank: every segment compresses L0->L1->L2 and evicts from L2 (with recon loss)
            def full_state():
                s = model.init_state(a.batch)
                with torch.no_grad(), amp():
                    model(torch.randint(0, 256, (a.batch, fill_segments * seg)), state=s, metrics=False)
                return s
            s = full_state()
            modes["train_fwd_bwd_fullbank"] = count(lambda: train_step(s))
        model.eval()
        with torch.no_grad(), amp():
            if kind == "dnc":
                s = full_state()
                modes["prefill_fullbank"] = count(lambda: model(x, state=s, last_logits_only=True, metrics=False))
                s = full_state()
                modes["prefill_fresh"] = count(lambda: model(x, state=model.init_state(a.batch),
                                                             last_logits_only=True, metrics=False))
                # decode: a token in the middle of a segment, and the token that ends a segment
                model(x[:, : seg // 2], state=s, metrics=False)
                tok = x[:, :1]
                modes["decode_token"] = count(lambda: model(tok, state=s, last_logits_only=True, metrics=False))
                model(x[:, : seg - s.seg_pos - 1], state=s, metrics=False)
                assert s.seg_pos == seg - 1
                modes["decode_boundary_token"] = count(
                    lambda: model(tok, state=s, last_logits_only=True, metrics=False))
            else:
                modes["prefill_fresh"] = count(lambda: model(x, last_logits_only=True, metrics=False))
                s = model.init_state(a.batch)
                model(x[:, : seg // 2], state=s, metrics=False)
                tok = x[:, :1]
                modes["decode_token"] = count(lambda: model(tok, state=s, last_logits_only=True, metrics=False))
        for name, r in modes.items():
            segs = 1 if name.startswith("decode") else per
            r["segments"] = segs
            r["kernel_ops_per_segment"] = round(r["kernel_ops"] / segs, 1)
            r["aten_ops_per_segment"] = round(r["aten_ops"] / segs, 1)
            r["casts_per_segment"] = round(r["casts"] / segs, 1)
            r["host_syncs_per_segment"] = round(r["host_syncs"] / segs, 2)
        results["modes"][kind] = modes
    return results


def print_table(res: dict, before: dict | None) -> None:
    print(f"aten ops (kernel-launching: views/allocations excluded) per segment; config {res['config']}; "
          f"{res['segments']} segments per call; autocast {res.get('autocast')}")
    hdr = ("| model | mode | kernel ops / seg | all aten ops / seg | casts / seg | host syncs / seg |"
           + (" before: kernel ops / seg | casts / seg | host syncs / seg | ratio |" if before else ""))
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for kind, modes in res["modes"].items():
        for mode, r in modes.items():
            row = (f"| {kind} | {mode} | {r['kernel_ops_per_segment']:,} | {r['aten_ops_per_segment']:,} | "
                   f"{r['casts_per_segment']:,} | {r['host_syncs_per_segment']} |")
            if before:
                b = before.get("modes", {}).get(kind, {}).get(mode)
                if b:
                    row += (f" {b['kernel_ops_per_segment']:,} | {b.get('casts_per_segment', '-')} | "
                            f"{b.get('host_syncs_per_segment', round(b['host_syncs'] / b['segments'], 2))} | "
                            f"{b['kernel_ops_per_segment'] / max(r['kernel_ops_per_segment'], 1):.2f}x |")
                else:
                    row += " - | - | - | - |"
            print(row)


def render(res: dict) -> str:
    """Kernel-launching ops per segment and host syncs per (model, measurement), one column pair
    per label the script was run with (e.g. before / after an optimisation): the body of an
    ``op_counts`` result's entry in ``bench/README.md``."""
    env = "Device: CPU (op counts do not depend on the device); torch and commit not recorded"
    labels = [k for k, v in res.items() if isinstance(v, dict) and isinstance(v.get("modes"), dict)]
    if not labels:
        return "\n".join([env, "", f"No `modes` in this file (top-level keys: {', '.join(sorted(res))}).", ""])
    keys = list(dict.fromkeys((m, x) for lb in labels for m, xs in res[lb]["modes"].items() for x in xs))
    header = ["model", "measurement"]
    for lb in labels:
        header += [f"{lb}: kernel ops / segment", f"{lb}: host syncs"]
    if len(labels) > 1:
        header.append(f"{labels[-1]} / {labels[0]}")
    rows = []
    for m, x in keys:
        r = [m, x]
        vals = []
        for lb in labels:
            d = res[lb]["modes"].get(m, {}).get(x, {})
            vals.append(d.get("kernel_ops_per_segment"))
            r += [fmt_num(d.get("kernel_ops_per_segment"), "{:,.1f}"), fmt_num(d.get("host_syncs"))]
        if len(labels) > 1:
            r.append(fmt_num(vals[-1] / vals[0] if vals[0] and vals[-1] else None, "{:.2f}x"))
        rows.append(r)
    cfg = res[labels[0]].get("config", {})
    lines = [env, "", f"Counted on CPU with the preset shrunk ({', '.join(f'{k}={v}' for k, v in cfg.items())}); "
             "the per-segment op structure is that of the full-size model.", ""]
    return "\n".join(lines + md_table(header, rows, "ll" + "r" * (len(header) - 2)) + [""])


def main_count(a, argv: list[str]) -> int:
    """``--count-ops``: count, print, and store the counts under ``--label`` in the ``--out`` file
    of labelled entries (whose top-level ``command`` lists one command per label)."""
    t = time.perf_counter()
    res = provenance("op_counts", argv, "cpu", script="profile_model") | count_ops(a)
    results = Path(a.out)
    stored = json.loads(results.read_text()) if results.exists() else {}
    before = stored.get(a.before) if a.label != a.before else None
    print_table(res, before)
    if a.details:
        for kind, modes in res["modes"].items():
            for mode, r in modes.items():
                print(kind, mode, r["top"])
    stored[a.label] = res
    stored["benchmark"] = "op_counts"
    stored["command"] = "\n".join(v["command"] for v in stored.values() if isinstance(v, dict) and v.get("command"))
    if not a.no_save:
        write_json(results, stored)
        print(f"wrote {results} [{a.label}] in {time.perf_counter() - t:.1f}s")
    return 0


def main_decode(a) -> int:
    """``--decode-batch N``: N rows decode together through ``BatchDecoder`` (as the server's
    scheduler does), each from the same ``--decode-context``-token history plus a prompt of
    1-64 tokens, so the rows sit at different segment positions (as served streams do: the
    read mass of a step is for the rows at a salience position). Prints the median ms per step
    (unprofiled) and the profiler's kernel table over ``--decode-steps`` steps."""
    from dnc.generate import BatchDecoder, DecodeRow, SamplingParams

    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    model = DNC(with_overrides(preset(a.preset), a.model_overrides)).to(dev).eval()
    if cuda and a.dtype == "bf16":
        model = model.to(torch.bfloat16)
    if cuda:
        model.enable_cuda_graphs()
    with torch.no_grad():
        state = model.init_state(1)
        seg = model.config.segment_len
        x = torch.randint(0, 256, (1, a.decode_context), device=dev)
        for i in range(0, a.decode_context, seg):
            model(x[:, i:i + seg], state=state, last_logits_only=True, metrics=False)
    steps = a.decode_steps
    warm = 2 * model.config.segment_len // 64 + 4  # every mass-row count's graph captured (2 sightings each)
    rows = [DecodeRow(torch.randint(0, 256, (1 + (7 * i) % 64,)).tolist(), state.select([0]), warm + 3 * steps + 8,
                      SamplingParams(0.0)) for i in range(a.decode_batch)]
    dec = BatchDecoder(model, max_batch=a.decode_batch, kv_attention=a.kv_attention)
    dec.add(rows)
    for b in dec.batches:
        b.rb.mass_gather = a.mass_gather == "on"
        b.rb.kv_block = a.kv_block

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for _ in range(warm):
        dec.step()
    lat = []
    for _ in range(steps):
        sync()
        t = time.perf_counter()
        dec.step()
        sync()
        lat.append(time.perf_counter() - t)
    lat.sort()
    kv = torch.cat([b.rb.length[b.rb.active > 0] for b in dec.batches]).float()
    print(f"KV length per row after the timed steps: mean {kv.mean():.0f}, min {kv.min():.0f}, max {kv.max():.0f} "
          f"of Lmax {dec.batches[0].rb.max_len}")
    print(f"decode {a.preset} {a.dtype if cuda else 'fp32'} rows={a.decode_batch} context={a.decode_context} "
          f"mass_gather={a.mass_gather} kv_attention={a.kv_attention} graphs={cuda}: median {lat[len(lat) // 2] * 1e3:.3f} ms per step over "
          f"{steps} steps ({a.decode_batch / lat[len(lat) // 2]:,.0f} tokens/s); batches {dec.batch_sizes()}")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            dec.step()
        sync()
    dec.close()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"profiled {steps} steps (totals over them):")
    print(prof.key_averages().table(sort_by=key, row_limit=a.rows, max_name_column_width=60))
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--baseline", action="store_true")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--count-ops", action="store_true", help="count aten ops per segment on CPU (see above)")
    p.add_argument("--shrink", type=int, default=16, help="--count-ops: divide segment/bank sizes by this")
    p.add_argument("--segments", type=int, default=4, help="--count-ops: segments per call (4 = an 8k step of small)")
    p.add_argument("--label", default="after", help="--count-ops: key of the JSON entry (before/after)")
    p.add_argument("--before", default="before", help="--count-ops: JSON entry to compare against")
    p.add_argument("--autocast", action="store_true",
                   help="--count-ops: run under CPU bf16 autocast (counts the dtype casts a CUDA bf16 step makes)")
    p.add_argument("--out", default=str(RESULTS), help="--count-ops: JSON file of labelled entries")
    p.add_argument("--details", action="store_true", help="--count-ops: print the most frequent ops per mode")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--fixed-segment", action="store_true",
                   help="--count-ops: count the fixed-capacity segment step (train.compile: segment) run "
                        "eagerly: the ops its compiled graph holds before fusion")
    p.add_argument("--compile-segment", action="store_true",
                   help="profile: torch.compile the training segment step (train.compile: segment)")
    p.add_argument("--compile-mode", default=None, help="--compile-segment: torch.compile mode")
    p.add_argument("--profile-shrink", type=int, default=1,
                   help="profile: divide the preset's segment/bank sizes and width as --count-ops does (1 = as is)")
    p.add_argument("--timed", type=int, default=0,
                   help="profile: also time this many unprofiled steps after warm-up and print the median")
    p.add_argument("--decode-batch", type=int, default=0,
                   help="profile N rows decoding (BatchDecoder steps: CUDA-graph replays on CUDA) instead of a "
                        "training step: the kernel table of --decode-steps steps and the median ms per step")
    p.add_argument("--decode-context", type=int, default=4096, help="--decode-batch: tokens of history per row")
    p.add_argument("--decode-steps", type=int, default=32,
                   help="--decode-batch: profiled steps (32 = one salience period of small)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="--decode-batch: weights and state on CUDA")
    p.add_argument("--mass-gather", default="on", choices=["on", "off"],
                   help="--decode-batch: the read mass of a step for its rows at a salience position only "
                        "(on, RaggedBatch.mass_gather) or for every row every step (off, the rule before)")
    p.add_argument("--kv-attention", default="masked", choices=["masked", "flex"],
                   help="--decode-batch: local attention over every row's whole KV buffer with a mask (masked) "
                        "or over each row's own length (flex: flex_attention, compiled on CUDA)")
    p.add_argument("--kv-block", type=int, default=128, help="--kv-attention flex: KV block (tokens)")
    p.add_argument("--model-set", dest="model_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="profile, --decode-batch: override a DNCConfig field of the preset (YAML value; "
                        "repeatable), e.g. the trained small config: --model-set segment_len=512 "
                        "--model-set write_importance=50 --model-set self_read=true")
    a = p.parse_args(argv)
    try:
        a.model_overrides = parse_pairs("--model-set", a.model_overrides)
        with_overrides(preset(a.preset), a.model_overrides)  # a bad field fails before any work
    except (ValueError, TypeError) as e:
        p.error(f"--model-set: {e}")
    if a.count_ops:
        return main_count(a, argv)
    if a.decode_batch:
        return main_decode(a)
    dev = torch.device(a.device)
    cfg = preset(a.preset) if a.profile_shrink == 1 else shrunk_config(a.preset, a.profile_shrink)
    cfg = with_overrides(cfg, a.model_overrides)
    if a.baseline:
        cfg = cfg.baseline(a.length)
    model = DNC(cfg).to(dev).train()
    if a.compile_segment:
        compile_segments(model, mode=a.compile_mode)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, 256, (a.batch, a.length), device=dev)
    cuda = dev.type == "cuda"

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = model(x, targets=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    if cuda:
        torch.cuda.synchronize()
    if a.timed:
        times = []
        for _ in range(a.timed):
            t = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        times.sort()
        print(f"train step {a.preset} (shrink {a.profile_shrink}) L={a.length} B={a.batch} "
              f"{'compiled segment' if a.compile_segment else 'eager'}: median {times[len(times) // 2] * 1e3:.1f} ms "
              f"over {a.timed} steps")
        if a.compile_segment:
            from torch._inductor import metrics

            print(f"inductor kernels generated (forward + backward graphs): {metrics.generated_kernel_count}")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    print(f"train step {a.preset} L={a.length} B={a.batch}: {time.perf_counter() - t:.3f}s (profiled)")
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=a.rows, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
