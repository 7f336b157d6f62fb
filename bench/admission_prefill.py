"""Admitting rows into a running decode batch: the ragged prefill (one model call for every row
that arrives together, ``dnc.ragged_prefill``) against the per-layout prefill (rows batched only
when their states share a layout and their prompts a length: in practice one call per row).

Issue 14: at 64 concurrent streams the server's model thread spent 43% of its time prefilling
arrivals one model call each. Here two ``BatchDecoder`` s, one per path, each keep ``--running``
rows decoding; each wave admits ``K`` new rows (prompt lengths drawn uniformly from
``--min-len..--max-len``, fresh states, or with ``--continued`` states of random histories, so
every row has its own layout) into each decoder in turn, the order alternating between waves so a
change of machine load hits both alike. Timed: ``add()`` (prefill + joining the running batch),
synchronised before and after; counted: model calls (``BatchDecoder.prefill_calls``). The
admitted rows then decode two steps and are dropped, so the running batch stays the same. The
table gives per K the median ms per admission of each path, their ratio (old / new, from the same
run), and model calls per admission. Plain PyTorch, no Ray.

    python bench/admission_prefill.py --device cpu --preset tiny --admit 1 4 16
    python bench/admission_prefill.py --device cuda --preset small --admit 1 2 4 8 16 --running 32

``--count-ops`` (ragged path only) instead counts, per admission of K fresh rows of ``--min-len``
tokens, the aten ops ``add()`` dispatches, split by phase: ``state`` (the rows' fresh states into
a new decode batch), ``prefill`` (the ragged prefill calls), ``join`` (merging into the running
batch), then ``step1`` (the first decode step after it: new sampling plan, first tokens) against
``step`` (a decode step of an unchanged batch). Columns: kernel ops (aten ops that launch a
kernel), host syncs (``.item()`` and friends, and on CUDA those ``torch.cuda.set_sync_debug_mode``
reports: blocking copies, ``.tolist()``), blocking uploads (``torch.tensor(data, device=d)`` calls,
counted on any device: on CUDA each copies from pageable memory and then waits for the stream, i.e.
for every queued decode step). Also the median ms per admission (timed apart, uncounted).
``--baseline-src DIR`` runs the ``dnc`` package of another checkout (the commit before a change)
beside this one, alternating wave by wave, with the ratio baseline / this:

    git worktree add /tmp/base 649445f
    python bench/admission_prefill.py --count-ops --device cpu --preset tiny --set segment_len=128
        --admit 1 4 16 --running 32 --min-len 64 --max-len 64 --threads 1 --baseline-src /tmp/base
        --tag cpu_ops   (one command line)

Writes ``<out>/admission_prefill_<tag>.json`` (``--count-ops``: ``admission_ops_<tag>.json``;
provenance: argv, command, commit, device, torch) and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import statistics
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
from common import HelpFormatter, device_tag, fmt_num, md_table, parse_pairs, provenance, write_json  # noqa: E402

from profile_model import OpCounter  # noqa: E402

from dnc.config import preset  # noqa: E402
from dnc.generate import BatchDecoder, DecodeRow, SamplingParams  # noqa: E402
from dnc.model import DNC  # noqa: E402


TITLE = "Admitting rows into a running batch: ragged prefill against per-layout prefill (`bench/admission_prefill.py`)"
WHAT = ("K rows of mixed prompt lengths admitted together into a running decode batch, through the ragged "
        "prefill (one model call for all) and the per-layout prefill (one call per start layout and prompt "
        "length), alternating in one run: median ms per admission, their ratio, model calls per admission.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--preset", default="tiny", help="model preset (untrained weights)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, repeatable (e.g. --set self_read=true)")
    p.add_argument("--admit", type=int, nargs="+", default=[1, 4, 16], help="rows admitted together (K)")
    p.add_argument("--running", type=int, default=16, help="rows decoding while the others are admitted")
    p.add_argument("--min-len", type=int, default=16, help="shortest prompt (tokens)")
    p.add_argument("--max-len", type=int, default=128, help="longest prompt (tokens)")
    p.add_argument("--continued", action="store_true",
                   help="admitted rows carry states with histories of 0..2 segments (each its own layout)")
    p.add_argument("--waves", type=int, default=10, help="timed admissions per K and path")
    p.add_argument("--warmup", type=int, default=4, help="untimed admissions per K and path first (graph capture)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="CUDA weights dtype")
    p.add_argument("--no-graphs", action="store_true", help="CUDA: eager steps (no CUDA graphs)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--seed", type=int, default=0, help="weights and prompts seed")
    p.add_argument("--tag", default=None, help="result name suffix (default: device tag, e.g. h200 or cpu)")
    p.add_argument("--out", default=str(HERE / "results"), help="folder of the JSON")
    p.add_argument("--count-ops", action="store_true",
                   help="count ops, syncs and host tensors per admission phase (ragged path; see above)")
    p.add_argument("--baseline-src", default=None, metavar="DIR",
                   help="--count-ops: also run the dnc package of the checkout DIR (git worktree add DIR <commit>), "
                        "alternating, and give the ms ratio baseline / this")
    return p


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Rows:
    """Prompts (and with ``--continued`` states) drawn from one generator: both paths are given
    the very same rows, made before either is timed."""

    def __init__(self, model, args):
        self.model, self.args = model, args
        self.g = torch.Generator().manual_seed(args.seed + 1)
        self.vocab = min(model.config.vocab_size, 256)

    def ids(self, n: int) -> list[int]:
        return torch.randint(0, self.vocab, (n,), generator=self.g).tolist()

    def make(self, k: int, max_new: int) -> list[tuple[list[int], object]]:
        out = []
        for _ in range(k):
            n = int(torch.randint(self.args.min_len, self.args.max_len + 1, (1,), generator=self.g))
            state = None
            if self.args.continued:
                hist = int(torch.randint(0, 2 * self.model.config.segment_len, (1,), generator=self.g))
                state = self.model.init_state(1)
                if hist:
                    with torch.no_grad():
                        self.model(torch.tensor([self.ids(hist)], device=self.model.device), state=state, metrics=False)
            out.append((self.ids(n), state))
        return out


def decode_rows(spec, max_new: int, pkg=None) -> list[DecodeRow]:
    """Rows of ``spec`` ((ids, state) pairs): greedy, each on its own copy of the state (``pkg``: the
    dnc package whose ``DecodeRow`` to make, default this one)."""
    row, params = (DecodeRow, SamplingParams) if pkg is None else (pkg.generate.DecodeRow, pkg.generate.SamplingParams)
    return [row(ids, None if st is None else st.select([0]), max_new, params(0.0)) for ids, st in spec]


def admit(dec: BatchDecoder, spec, device, pkg=None) -> tuple[float, int]:
    """One admission into ``dec`` (timed), two decode steps, the admitted rows dropped.
    Returns (seconds, model calls)."""
    rows = decode_rows(spec, 1 << 20, pkg)
    calls = dec.prefill_calls
    sync(device)
    t0 = time.perf_counter()
    failed = dec.add(rows)
    sync(device)
    dt = time.perf_counter() - t0
    assert not failed, [r.error for r in failed]
    dec.step()
    dec.step()
    dec.drop(rows)
    return dt, dec.prefill_calls - calls


def bench_k(model, k: int, decoders: dict, rows: Rows, args, device) -> dict:
    times = {name: [] for name in decoders}
    calls = {name: [] for name in decoders}
    for wave in range(args.warmup + args.waves):
        spec = rows.make(k, 1)
        order = list(decoders) if wave % 2 == 0 else list(reversed(decoders))
        for name in order:
            dt, n = admit(decoders[name], spec, device)
            if wave >= args.warmup:
                times[name].append(dt)
                calls[name].append(n)
    out = {"k": k, "waves": args.waves}
    for name in decoders:
        out[f"{name}_ms_median"] = 1e3 * statistics.median(times[name])
        out[f"{name}_ms_mean"] = 1e3 * statistics.fmean(times[name])
        out[f"{name}_calls_mean"] = statistics.fmean(calls[name])
    out["old_over_new"] = out["old_ms_median"] / out["new_ms_median"]
    return out


def render(res: dict) -> str:
    """The body of a result's entry in ``bench/README.md``: where it ran, then its table."""
    where = (f"Device: {res.get('gpu') or res.get('device')}; torch {res.get('torch')}; "
             f"commit {res.get('commit') or 'unknown'}")
    if res.get("mode") == "count_ops":  # --count-ops: its table was made by main_count
        return f"{where}\n\n{res['markdown']}"
    head = ["K rows", "old ms", "new ms", "old / new", "old calls", "new calls", "waves"]
    body = [[str(r["k"]), fmt_num(r["old_ms_median"], "{:.2f}"), fmt_num(r["new_ms_median"], "{:.2f}"),
             fmt_num(r["old_over_new"], "{:.2f}x"), fmt_num(r["old_calls_mean"], "{:.1f}"),
             fmt_num(r["new_calls_mean"], "{:.1f}"), str(r["waves"])] for r in res["admissions"]]
    lines = [where, "", f"Admission prefill, {res['preset']} on {res['device']} ({res['dtype']}, graphs "
             f"{'on' if res['graphs'] else 'off'}): K rows of {res['min_len']}..{res['max_len']} prompt tokens "
             f"({'continued' if res['continued'] else 'fresh'} states) into {res['running']} decoding rows; "
             "median ms per admission, model calls per admission (mean)", ""]
    return "\n".join(lines + md_table(head, body, "rrrrrrr"))


class PhaseCounter(OpCounter):
    """An :class:`OpCounter` whose counts go to the current phase (``self.phase``); on CUDA it also
    records the syncs ``torch.cuda.set_sync_debug_mode`` warns about, per phase."""

    def __init__(self):
        super().__init__()
        self.phase = "other"
        self.by_phase: dict[str, Counter] = {}
        self.cuda_syncs: Counter = Counter()
        self.uploads: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.by_phase.setdefault(self.phase, Counter())[func] += 1
        return func(*args, **(kwargs or {}))

    def summary_of(self, phase: str) -> dict:
        self.ops = self.by_phase.get(phase, Counter())
        s = self.summary()
        host = sum(n for f, n in self.ops.items() if not isinstance(f, str) and f.overloadpacket.__name__ == "lift_fresh")
        return {"kernel_ops": s["kernel_ops"], "host_syncs": s["host_syncs"], "host_tensors": host,
                "cuda_syncs": self.cuda_syncs[phase], "blocking_uploads": self.uploads[phase], "top": s["top"]}


@contextlib.contextmanager
def phases(counter: PhaseCounter, dec, device: torch.device):
    """Route ``dec.add`` 's ops to phases: ``state`` until the ragged prefill starts, ``prefill``
    during it, ``join`` after it (the module attribute the decoder calls is wrapped)."""
    mod = importlib.import_module(type(dec)._admit_ragged.__module__)
    orig = mod.ragged_prefill

    def wrapped(*a, **k):
        counter.phase = "prefill"
        try:
            return orig(*a, **k)
        finally:
            counter.phase = "join"

    tensor = torch.tensor

    def counted_tensor(*a, **k):  # torch.tensor(data, device=d): on CUDA a copy, then a wait for the stream
        if k.get("device") is not None:
            counter.uploads[counter.phase] += 1
        return tensor(*a, **k)

    mod.ragged_prefill = wrapped
    torch.tensor = counted_tensor
    cm = warnings.catch_warnings(record=True) if device.type == "cuda" else contextlib.nullcontext([])
    try:
        with cm as caught:
            if device.type == "cuda":
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
            counter.caught = caught
            yield
    finally:
        mod.ragged_prefill = orig
        torch.tensor = tensor
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)


def count_admission(dec, spec, device, counter: PhaseCounter, pkg) -> None:
    """One counted admission of ``spec`` into ``dec``: add (phases state/prefill/join), the first
    step after it (step1), one more step (step), then the rows are dropped."""
    rows = decode_rows(spec, 1 << 20, pkg)
    seen = 0

    def run(phase: str, fn):
        nonlocal seen
        counter.phase = phase
        out = fn()
        counter.phase = "other"
        for w in counter.caught[seen:]:
            if "synchroniz" in str(w.message):
                counter.cuda_syncs[phase] += 1
        seen = len(counter.caught)
        return out

    sync(device)
    with counter:
        failed = run("state", lambda: dec.add(rows))
    assert not failed, [r.error for r in failed]
    with counter:
        run("step1", dec.step)
        run("step", dec.step)
    dec.drop(rows)


def load_baseline(src: str):
    """The ``dnc`` package of the checkout at ``src`` (e.g. ``git worktree add /tmp/base <commit>``),
    imported as ``dnc_baseline`` beside this one (its imports are relative)."""
    init = Path(src) / "dnc" / "__init__.py"
    if not init.exists():
        raise SystemExit(f"--baseline-src: no dnc package at {init.parent}; give a checkout of the baseline commit")
    spec = importlib.util.spec_from_file_location("dnc_baseline", init, submodule_search_locations=[str(init.parent)])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["dnc_baseline"] = pkg
    spec.loader.exec_module(pkg)
    for sub in ("generate", "model", "config"):
        importlib.import_module(f"dnc_baseline.{sub}")
    return pkg


def main_count(args, argv, model, rows, device, graphs, cfg) -> int:
    """``--count-ops``: per K, op/sync counts per phase of one admission (mean over ``--waves``) and
    the uncounted ms per admission; with ``--baseline-src`` the same for the baseline's code, the
    two alternating wave by wave, and their ratio."""
    import dnc
    versions = {"this": (dnc, model)}
    if args.baseline_src:
        base = load_baseline(args.baseline_src)
        bm = base.model.DNC(base.config.DNCConfig.from_dict(cfg.to_dict())).to(device).eval()
        bm.load_state_dict(model.state_dict())
        if device.type == "cuda" and graphs:
            bm.enable_cuda_graphs()
        versions["baseline"] = (base, bm)
    running = rows.make(args.running, 1)
    decs = {}
    for name, (pkg, m) in versions.items():
        decs[name] = pkg.generate.BatchDecoder(m)
        assert not decs[name].add(decode_rows(running, 1 << 20, pkg))
        decs[name].step()
    res = provenance("admission_prefill", argv, device) | {
        "mode": "count_ops", "preset": args.preset, "model_config": cfg.to_dict(), "graphs": graphs,
        "dtype": args.dtype if device.type == "cuda" else "fp32", "running": args.running,
        "min_len": args.min_len, "max_len": args.max_len, "threads": torch.get_num_threads(),
        "baseline_src": args.baseline_src, "counts": []}
    names = ("state", "prefill", "join", "step1", "step")
    for k in args.admit:
        times = {v: [] for v in versions}
        per = {v: [] for v in versions}
        for wave in range(args.warmup + args.waves):
            spec = rows.make(k, 1)
            order = list(versions) if wave % 2 == 0 else list(reversed(versions))
            for v in order:
                pkg = versions[v][0]
                counter = PhaseCounter()
                with phases(counter, decs[v], device):
                    count_admission(decs[v], spec, device, counter, pkg)
                dt, _ = admit(decs[v], spec, device, pkg)  # timed apart: counting slows the host down
                if wave >= args.warmup:
                    times[v].append(dt)
                    per[v].append({n: counter.summary_of(n) for n in names})
        for v in versions:
            r = {"k": k, "code": v, "waves": args.waves, "ms_median": 1e3 * statistics.median(times[v]),
                 "ms_mean": 1e3 * statistics.fmean(times[v])}
            for n in names:
                r[n] = {key: statistics.fmean(p[n][key] for p in per[v])
                        for key in ("kernel_ops", "host_syncs", "host_tensors", "cuda_syncs", "blocking_uploads")}
                r[n]["top"] = per[v][-1][n]["top"]
            if v == "baseline":
                r["baseline_over_this"] = r["ms_median"] / res["counts"][-1]["ms_median"]
            res["counts"].append(r)
            print(f"K {k:3d} {v}: {r['ms_median']:.2f} ms; " + ", ".join(
                f"{n} {r[n]['kernel_ops']:.0f} ops/{r[n]['host_syncs']:.0f}+{r[n]['cuda_syncs']:.0f} syncs"
                for n in names), file=sys.stderr, flush=True)
    for d in decs.values():
        d.close()
    head = ["K rows", "code", "ms / admission", "baseline / this"] + [f"{n} ops / syncs / uploads" for n in names] + ["waves"]
    body = [[str(r["k"]), r["code"], fmt_num(r["ms_median"], "{:.2f}"),
             fmt_num(r["baseline_over_this"], "{:.2f}x") if "baseline_over_this" in r else ""] + [
        f"{r[n]['kernel_ops']:.0f} / {r[n]['host_syncs'] + r[n]['cuda_syncs']:.0f} / {r[n]['blocking_uploads']:.0f}"
        for n in names] + [str(r["waves"])] for r in res["counts"]]
    res["markdown"] = "\n".join([
        f"Admission host work, {args.preset} on {res['device']} ({res['dtype']}, graphs {'on' if graphs else 'off'}): "
        f"K fresh rows of {args.min_len}..{args.max_len} tokens into {args.running} decoding rows; median ms per "
        "admission (add, uncounted) and per phase kernel ops / host syncs (item-like + CUDA sync-debug) / "
        "blocking uploads (torch.tensor(..., device=...): on CUDA each waits for the queued steps; mean per admission)", ""] + md_table(head, body, "rlrr" + "r" * (len(head) - 4)))
    print(res["markdown"])
    path = write_json(Path(args.out) / f"admission_ops_{args.tag or device_tag(device)}.json", res)
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = preset(args.preset, **parse_pairs("--set", args.overrides))
    model = DNC(cfg).to(device).eval()
    graphs = False
    if device.type == "cuda":
        if args.dtype == "bf16":
            model = model.to(torch.bfloat16)
        torch.backends.cuda.matmul.allow_tf32 = False
        if not args.no_graphs:
            model.enable_cuda_graphs()
            graphs = model.decode_runner is not None
    rows = Rows(model, args)
    if args.count_ops:
        return main_count(args, argv, model, rows, device, graphs, cfg)
    decoders = {"old": BatchDecoder(model, ragged_prefill=False), "new": BatchDecoder(model)}
    running = rows.make(args.running, 1)
    for dec in decoders.values():  # the running rows: the same prompts in both, decoding throughout
        assert not dec.add(decode_rows(running, 1 << 20))
        dec.step()
    res = provenance("admission_prefill", argv, device) | {
        "preset": args.preset, "model_config": cfg.to_dict(), "dtype": args.dtype if device.type == "cuda" else "fp32",
        "graphs": graphs, "running": args.running, "min_len": args.min_len, "max_len": args.max_len,
        "continued": args.continued, "threads": torch.get_num_threads(), "admissions": []}
    for k in args.admit:
        r = bench_k(model, k, decoders, rows, args, device)
        res["admissions"].append(r)
        print(f"K {k:3d}: old {r['old_ms_median']:.2f} ms ({r['old_calls_mean']:.1f} calls), new "
              f"{r['new_ms_median']:.2f} ms ({r['new_calls_mean']:.1f} calls): x{r['old_over_new']:.2f}",
              file=sys.stderr, flush=True)
    for dec in decoders.values():
        dec.close()
    res["markdown"] = render(res)
    print(res["markdown"])
    path = write_json(Path(args.out) / f"admission_prefill_{args.tag or device_tag(device)}.json", res)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
