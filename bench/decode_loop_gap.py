"""Where the decode loop loses time: the model's one-token ragged decode step against a whole
``BatchDecoder.step`` (issue 14: on an H200, small preset, the loop took 3.4 ms a step at batch 1
against 0.93 ms for the model step alone).

For each batch size, ``rows`` fresh rows with a prompt of ``--context`` tokens are prefilled, then:
  loop   ``BatchDecoder.step()``: sample every row, stop checks, the ragged model step (a CUDA graph
         replay when graphs are on), ``after_step`` (and the segment commits it makes);
  step   the model step alone on the same batch (``model.decode_runner.step`` on CUDA, the eager
         ``ragged_decode_step`` on CPU), its position counters put back after each step (untimed).
Both are synchronised before and after each step; the table gives median ms per step, the ratio
loop/step, and per loop step: host reads (Python ``.tolist()``/``.item()``/``int()``... on tensors,
each a device sync on CUDA), aten items (``aten::_local_scalar_dense``: the same from C++, e.g. an
op's validity check), tensor builds (``torch.tensor`` from Python values: a host -> device copy),
CUDA syncs (ops ``torch.cuda.set_sync_debug_mode`` flags; CUDA only) and aten ops (profiler).
Plain PyTorch, no Ray.

    python bench/decode_loop_gap.py --device cpu --preset tiny --batches 1 8 64
    python bench/decode_loop_gap.py --device cuda --preset small --batches 1 8 64 --sampling mixed

Writes ``<out>/decode_loop_gap_<tag>.json`` (provenance: argv, command, commit, device, torch) and
prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
from common import HelpFormatter, device_tag, parse_pairs, provenance, write_json  # noqa: E402
from decode_loop_gap_report import render  # noqa: E402

from dnc.config import preset  # noqa: E402
from dnc.generate import BatchDecoder, DecodeRow, SamplingParams  # noqa: E402
from dnc.model import DNC  # noqa: E402
from dnc.ragged import ragged_decode_step  # noqa: E402

# --sampling mixed: rows cycle through these (seeded every other row), as a server batch might hold
MIXED = [SamplingParams(0.0), SamplingParams(0.8), SamplingParams(1.0, top_k=40), SamplingParams(0.9, top_p=0.9),
         SamplingParams(0.7, top_k=20, top_p=0.95)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--preset", default="tiny", help="model preset (untrained weights); default tiny")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a DNCConfig field, e.g. segment_len=256 (repeatable)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64], help="rows decoded together; default 1 8 64")
    p.add_argument("--context", type=int, default=64, help="prompt tokens per row before decoding; default 64")
    p.add_argument("--steps", type=int, default=40, help="timed steps per mode; default 40")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (graph warm-up and capture); default 5")
    p.add_argument("--sampling", choices=("greedy", "mixed"), default="greedy",
                   help="greedy rows, or rows cycling greedy/temperature/top-k/top-p, every other one seeded")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=("bf16", "fp32", "tf32"), default="bf16",
                   help="CUDA weights dtype; tf32 = float32 weights with TF32 matmuls; default bf16")
    p.add_argument("--no-graphs", action="store_true", help="CUDA: eager decode steps (no DecodeGraphs)")
    p.add_argument("--profile-steps", type=int, default=5, help="steps under the profiler for op counts (0 = off)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--seed", type=int, default=0, help="weights and prompts seed")
    p.add_argument("--tag", default=None, help="result name suffix (default: device tag, e.g. h200 or cpu)")
    p.add_argument("--out", default=str(HERE / "results"), help="folder of the JSON; default bench/results")
    return p


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_rows(n: int, args, vocab: int) -> list[DecodeRow]:
    g = torch.Generator().manual_seed(args.seed + 1)
    max_new = args.warmup + args.steps + 3 * args.profile_steps + 4  # no row finishes while timed
    rows = []
    for i in range(n):
        ids = torch.randint(0, min(vocab, 256), (args.context,), generator=g).tolist()
        sp = SamplingParams(0.0) if args.sampling == "greedy" else MIXED[i % len(MIXED)]
        seed = 1000 + i if args.sampling == "mixed" and i % 2 else None
        rows.append(DecodeRow(ids, None, max_new, sp, seed=seed))
    return rows


class _HostReads(TorchFunctionMode):
    """Counts tensor -> Python reads (``.tolist()``, ``.item()``, ``int()``, ``bool()`` ...: each a
    device sync on CUDA) and tensors built from Python values (``torch.tensor``: a host -> device copy)."""

    READS = {"tolist", "item", "__int__", "__bool__", "__float__", "__index__"}

    def __init__(self):
        super().__init__()
        self.reads = self.builds = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS:
            self.reads += 1
        elif name == "tensor":
            self.builds += 1
        return func(*args, **(kwargs or {}))


def counts(fn, steps: int, device: torch.device) -> dict[str, float | None]:
    """Per call of ``fn``: aten ops (torch profiler, CPU side), host reads and tensor builds
    (:class:`_HostReads`) and, on CUDA, the synchronising ops ``torch.cuda.set_sync_debug_mode`` flags."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
    # .item() from C++ too (e.g. validity checks inside an op): each a host sync on CUDA
    items = sum(e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense")
    mode = _HostReads()
    with mode:
        for _ in range(steps):
            fn()
    syncs = None
    if device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(steps):
                    fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchroniz" in str(w.message) for w in caught) / steps
    return {"aten_ops": ops / steps, "aten_items": items / steps, "host_reads": mode.reads / steps,
            "tensor_builds": mode.builds / steps, "cuda_syncs": syncs}


def bench_batch(model, n: int, args, device) -> dict:
    """Times ``BatchDecoder.step`` and the bare model step on the same batch of ``n`` rows, interleaved
    (a bare step before each loop step, so a change of machine load hits both alike). The bare step
    writes into the rows' KV caches and read mass like a real step, so the rows' later tokens are not
    what they would be alone: this times, it does not check tokens."""
    dec = BatchDecoder(model, max_batch=n)
    failed = dec.add(make_rows(n, args, model.config.vocab_size))
    assert not failed, [r.error for r in failed]
    runner = model.decode_runner
    rb = dec.batches[0].rb

    @torch.no_grad()  # as BatchDecoder.step runs it (DecodeGraphs replays only without grad)
    def bare():
        length, seg_pos = rb.length.clone(), rb.seg_pos.clone()
        sync(device)
        t0 = time.perf_counter()
        logits = runner.step(rb) if runner is not None else ragged_decode_step(model, rb)
        sync(device)
        dt = time.perf_counter() - t0
        rb.length.copy_(length)  # the step advanced the positions; the loop step takes this one again
        rb.seg_pos.copy_(seg_pos)
        del logits
        return dt

    def loop():
        sync(device)
        t0 = time.perf_counter()
        dec.step()
        sync(device)
        return time.perf_counter() - t0

    for _ in range(args.warmup):  # the first step of a bucket is eager, the second captures its graph
        bare(), loop()
    commits0 = dec.commits
    step_t, loop_t = [], []
    for _ in range(args.steps):
        step_t.append(bare())
        loop_t.append(loop())
    out = {"rows": n, "capacity": rb.capacity, "steps": args.steps, "commits_in_loop": dec.commits - commits0,
           "loop_ms_median": 1e3 * statistics.median(loop_t), "loop_ms_mean": 1e3 * statistics.fmean(loop_t),
           "step_ms_median": 1e3 * statistics.median(step_t), "step_ms_mean": 1e3 * statistics.fmean(step_t)}
    out["loop_over_step"] = out["loop_ms_median"] / out["step_ms_median"]
    out["host_ms_median"] = out["loop_ms_median"] - out["step_ms_median"]
    if args.profile_steps:
        out["loop_counts"] = counts(dec.step, args.profile_steps, device)
        out["step_counts"] = counts(bare, args.profile_steps, device)
    dec.close()
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = preset(args.preset, **parse_pairs("--set", args.overrides))
    model = DNC(cfg).to(device).eval()
    if device.type == "cuda":
        if args.dtype == "bf16":
            model = model.to(torch.bfloat16)
        # TF32 (or not) set explicitly: torch's default differs between versions and builds
        torch.backends.cuda.matmul.allow_tf32 = args.dtype == "tf32"
        if not args.no_graphs:
            model.enable_cuda_graphs()
    res = provenance("decode_loop_gap", argv, device) | {
        "preset": args.preset, "model_config": cfg.to_dict(), "context": args.context, "sampling": args.sampling,
        "dtype": args.dtype if device.type == "cuda" else "fp32",
        "graphs": device.type == "cuda" and not args.no_graphs, "threads": torch.get_num_threads(), "batches": []}
    for n in args.batches:
        r = bench_batch(model, n, args, device)
        res["batches"].append(r)
        print(f"rows {n:3d}: step {r['step_ms_median']:.3f} ms, loop {r['loop_ms_median']:.3f} ms "
              f"(x{r['loop_over_step']:.2f})", file=sys.stderr, flush=True)
    print(render(res))
    path = write_json(Path(args.out) / f"decode_loop_gap_{args.tag or device_tag(device)}.json", res)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
