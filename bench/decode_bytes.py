"""Bytes and ops of one decode step (issue 14: why a 64-row step of ``small`` costs ~3 ms on an H200).

Builds the real model and the real decode batch (``dnc.ragged.RaggedBatch``, the tensors a
captured decode step works on) at their exact sizes, runs the real step
(:func:`dnc.ragged.ragged_decode_step`, what ``DecodeGraphs`` captures) and counts what every aten
op reads and writes, attributed to what it touches:

- ``weights``: the parameters; ``kv``: the local-attention KV cache ``[C, H, Lmax, Dh]``;
- ``bank read``: the per-row read view of the bank ``[C, H, Smax+1, Dq]`` (keys and values);
- ``mass``: the read-mass (salience) accumulator; ``bank write``: the segment's memory inputs
  (``write_h``, what the commit writes) and, with self_read, the write slots;
- ``rows``: per-row control tensors and logits; ``activations``: everything else;
- ``copies``: bytes moved by ``copy_``, ``_to_copy``, ``index_select``, ``cat``, ``stack``, ``clone``
  (a cast of a bank view to float32 counts here *and* as bank read: the copy's output keeps the
  label of what it copied);
- ``runner``: what the graph runner and the loop add per step around the captured step (the
  logits ``clone`` out of the graph and the copy into the batch): no per-row state is copied in or
  out of static buffers (the graph is captured on the batch's own tensors).

Counting rules (a proxy for HBM traffic, not a measurement): an op reads each tensor input once
(an expanded input counts its distinct elements) and writes its outputs; an in-place scatter /
index op writes only its source's rows; ``index_select`` / ``gather`` / ``embedding`` read only
the rows they pick; ``scaled_dot_product_attention`` and ``rms_norm`` count as
one fused op each (the CUDA kernels), not as their CPU decompositions. Non-view ops are the kernel
proxy ("kernels"); view ops move no bytes.

Rows sit at random segment positions (seed 0) of full banks; the step runs ``stride`` times (the
salience period: 32 for small) and the table gives the mean per step. Segment commits (one step in
``segment_len`` per row, eager, outside the graph) are not counted. By default the model and the
batch live on the ``meta`` device (exact shapes, no memory: 256 rows of small would need ~13 GB).
``before`` = ``mass_gather`` off (every row's read mass every step, the rule before session 17),
``after`` = on, ``flex`` = on with ``RaggedBatch.kv_attention = "flex"`` (local attention over each
row's own KV length: issue 14). The flex kernel is counted as one fused op that reads the query,
each row's KV blocks up to its length (``ceil((length+1) / kv_block)`` blocks of ``--kv-block``
keys, at most ``Lmax``; lengths from the rows' host positions, since a meta tensor holds no values)
and the block mask, and writes the output; the ops that build the block mask count as they run.

    python bench/decode_bytes.py --preset small --batches 1,8,64,256
    python bench/decode_bytes.py --preset small --time-batch 64 --time-steps 8   # CPU ms per step too

``--time-batch N`` also times real CPU steps at N rows (float32, the CPU serving dtype), before and
after alternated step by step in the same run (other processes on the machine hit both alike);
``--time-dtype bf16`` times the GPU's dtype, where the fp32 cast of the bank view that the read
mass made happens (in float32 it is no copy).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

HERE = Path(__file__).resolve().parent
for _p in (str(HERE.parent), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from common import HelpFormatter, md_table, provenance, write_result  # noqa: E402
from dnc.config import preset  # noqa: E402
from dnc.model import DNC  # noqa: E402
import dnc.ragged  # noqa: E402
from dnc.ragged import RaggedBatch, RowMeta, ragged_decode_step  # noqa: E402

RESULTS = HERE / "results"
CATEGORIES = ("weights", "kv", "bank read", "mass", "bank write", "rows", "activations")
COPY_OPS = {"copy_", "_to_copy", "index_select", "cat", "stack", "clone"}
HBM_TBPS = 4.8  # H200 HBM3e, TB/s: the floor column's bandwidth
TITLE = "Bytes and ops of one decode step (`bench/decode_bytes.py`)"
WHAT = ("What one ragged decode step (the captured CUDA graph) reads and writes, per category (weights, KV "
        "cache, bank read view, read mass, bank write, copies), and its aten ops (kernel proxy), counted on "
        "the real model and batch tensors at their exact sizes; before/after the session-17 read-mass fix.")


# ================================================================================== counting
def _distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a view covers (an expanded dim, stride 0, counts once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


class _Labels:
    """Which buffer each tensor is (by object identity; views and copies inherit their source's)."""

    def __init__(self):
        self.of: dict[int, str] = {}
        self.keep: list[torch.Tensor] = []  # ids stay valid while the step runs

    def set(self, t, label: str) -> None:
        if isinstance(t, torch.Tensor):
            self.of[id(t)] = label
            self.keep.append(t)

    def get(self, t) -> str:
        return self.of.get(id(t), "activations")


class _Counter(TorchDispatchMode):
    """Records (op, reads {label: bytes}, writes {label: bytes}) for every aten op dispatched."""

    def __init__(self, labels: _Labels):
        super().__init__()
        self.labels = labels
        self.ops: list[tuple[str, dict, dict, bool]] = []
        self.views = 0
        self.paused = False

    def record(self, name: str, reads: dict, writes: dict) -> None:
        self.ops.append((name, dict(reads), dict(writes), name in COPY_OPS))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.paused:
            return out
        name = func._schema.name.split("::")[-1]
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        first = next((self.labels.get(a) for a in tensors if self.labels.get(a) != "activations"), "activations")
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        if func.is_view or name in ("detach", "alias", "lift_fresh"):
            self.views += 1
            for o in outs:
                self.labels.set(o, self.labels.get(tensors[0]) if tensors else "activations")
            return out
        reads, writes = defaultdict(int), defaultdict(int)
        inplace = func._schema.is_mutable
        target = tensors[0] if inplace and tensors else None
        if name in ("scatter_", "index_copy_", "index_add_", "index_put_", "scatter_add_"):
            src = tensors[-1]  # (self, [dim,] index, src): only the source's elements are written
            for a in tensors[1:]:
                reads[self.labels.get(a)] += _distinct_bytes(a)
            writes[self.labels.get(target)] += _distinct_bytes(src)
            if name in ("index_add_", "scatter_add_", "index_put_"):
                reads[self.labels.get(target)] += _distinct_bytes(src)  # read-modify-write
        elif name == "index_fill_":
            idx = tensors[1]
            row = _distinct_bytes(target) // max(1, target.shape[0])
            writes[self.labels.get(target)] += idx.numel() * row
        elif name == "copy_":
            reads[self.labels.get(tensors[1])] += _distinct_bytes(tensors[1])
            writes[self.labels.get(target)] += _distinct_bytes(target)
        elif name in ("index_select", "embedding", "gather"):  # reads the rows it picks, not the whole source
            src = tensors[0]  # (weight, indices) for embedding, (self, dim, index) for the others
            for a in tensors[1:]:
                reads[self.labels.get(a)] += _distinct_bytes(a)
            reads[self.labels.get(src)] += sum(_distinct_bytes(o) for o in outs)
            label = self.labels.get(src) if name in COPY_OPS else "activations"
            for o in outs:
                writes[label] += _distinct_bytes(o)
                self.labels.set(o, label)
        elif inplace:
            for a in tensors[(1 if name in ("fill_", "zero_") else 0):]:
                reads[self.labels.get(a)] += _distinct_bytes(a)
            writes[self.labels.get(target)] += _distinct_bytes(target)
        else:
            for a in tensors:
                reads[self.labels.get(a)] += _distinct_bytes(a)
            label = first if name in COPY_OPS else "activations"
            for o in outs:
                writes[label] += _distinct_bytes(o)
                self.labels.set(o, label)
        self.record(name, reads, writes)
        return out


class _Fused(TorchFunctionMode):
    """SDPA and rms_norm as one op each (the fused CUDA kernels), not their CPU decompositions."""

    FUSED = {F.scaled_dot_product_attention: "scaled_dot_product_attention", F.rms_norm: "rms_norm"}

    def __init__(self, counter: _Counter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = self.FUSED.get(func)
        if name is None or self.counter.paused:
            return func(*args, **kwargs)
        self.counter.paused = True
        try:
            out = func(*args, **kwargs)
        finally:
            self.counter.paused = False
        reads = defaultdict(int)
        for a in tree_flatten((args, kwargs))[0]:
            if isinstance(a, torch.Tensor):
                reads[self.counter.labels.get(a)] += _distinct_bytes(a)
        self.counter.record(name, reads, {"activations": _distinct_bytes(out)})
        return out


def _label_batch(labels: _Labels, model, batch: RaggedBatch) -> None:
    for p in model.parameters():
        labels.set(p, "weights")
    for lb in batch.layers:
        labels.set(lb.k, "kv")
        labels.set(lb.v, "kv")
        labels.set(lb.prev_x, "rows")
        for name in ("view_k", "view_v", "succ_idx"):
            labels.set(getattr(lb, name), "bank read")
        labels.set(lb.mass, "mass")
        labels.set(lb.write_h, "bank write")
        labels.set(lb.write_prev, "bank write")
    for name in ("length", "seg_pos", "active", "tokens", "logits", "key_pos", "sample0", "row_ids", "fwd_on", "view_pos"):
        labels.set(getattr(batch, name, None), "rows")


@contextlib.contextmanager
def _meta_autocast():
    """``torch.is_autocast_enabled('meta')`` and ``torch.autocast('meta')`` raise; the model asks
    the one (``layers.matmul_dtype``) and enters the other (``MemoryRead.probs``, to turn it off):
    autocast is off on the meta device while counting."""
    orig, orig_ac = torch.is_autocast_enabled, torch.autocast

    def enabled(*a):
        return False if a and str(a[0]) == "meta" else orig(*a)

    def autocast(device_type, *a, **kw):
        return contextlib.nullcontext() if str(device_type) == "meta" else orig_ac(device_type, *a, **kw)

    torch.is_autocast_enabled, torch.autocast = enabled, autocast
    try:
        yield
    finally:
        torch.is_autocast_enabled, torch.autocast = orig, orig_ac


@contextlib.contextmanager
def _counted_flex(counter: "_Counter", batch: RaggedBatch):
    """``kv_length_attention`` as one counted fused op (see the module docstring), output empty."""
    real = dnc.ragged.kv_length_attention

    def attend(q, k, v, block_mask):
        lens = [0 if m is None else m.carry_len[0] + m.seg_pos for m in batch.rows]  # the new token's position
        blk = batch.kv_block
        keys = sum(min(batch.max_len, -(-(n + 1) // blk) * blk) for n in lens)      # positions read, all rows
        per_key = k.shape[1] * k.shape[3] * k.element_size()                        # one position, every head
        reads = defaultdict(int)
        reads[counter.labels.get(q)] += _distinct_bytes(q)
        reads[counter.labels.get(k)] += keys * per_key
        reads[counter.labels.get(v)] += keys * per_key
        for t in block_mask.as_tuple()[2:]:
            if isinstance(t, torch.Tensor):
                reads["activations"] += _distinct_bytes(t)
        counter.paused = True
        try:
            out = torch.empty_like(q)
        finally:
            counter.paused = False
        counter.record("flex_attention", reads, {"activations": _distinct_bytes(out)})
        return out

    dnc.ragged.kv_length_attention = attend
    try:
        yield
    finally:
        dnc.ragged.kv_length_attention = real


def _phases(batch: RaggedBatch, rows: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(batch.segment_len) for _ in range(rows)]


def _occupy(batch: RaggedBatch, model, phases: list[int]) -> None:
    """Host bookkeeping of ``len(phases)`` occupied rows at those segment positions (full banks)."""
    n_layers = len(batch.layers)
    slots = [batch.smax if lb.mass is not None else 0 for lb in batch.layers]
    for i, p in enumerate(phases):
        batch.rows[i] = RowMeta(p, p, 1, [0] * n_layers, [None] * n_layers, [None] * n_layers, [True] * n_layers,
                                [True] * n_layers, list(slots), True)


def _set_positions(batch: RaggedBatch, phases: list[int], t: int) -> None:
    for i, p in enumerate(phases):
        batch.rows[i].seg_pos = (p + t) % batch.segment_len


def count_steps(model, batch: RaggedBatch, phases: list[int], steps: int) -> dict:
    """Mean bytes / ops of ``steps`` consecutive decode steps (host positions advanced by hand)."""
    totals = {"read": Counter(), "write": Counter(), "copies": 0, "kernels": 0, "views": 0}
    by_op: Counter = Counter()
    runner = {"read": 0, "write": 0, "kernels": 0}
    mass_rows = []
    for t in range(steps):
        _set_positions(batch, phases, t)
        mass_rows.append(batch.mass_rows())
        labels = _Labels()
        _label_batch(labels, model, batch)
        counter = _Counter(labels)
        flex = _counted_flex(counter, batch) if batch.kv_attention == "flex" else contextlib.nullcontext()
        with torch.no_grad(), counter, _Fused(counter), flex:
            logits = ragged_decode_step(model, batch)
            n_step = len(counter.ops)
            # DecodeGraphs.step returns entry.logits.clone(); BatchDecoder copies it into rb.logits
            batch.logits.copy_(logits.clone())
        for k, (name, reads, writes, is_copy) in enumerate(counter.ops):
            if k >= n_step:
                runner["read"] += sum(reads.values())
                runner["write"] += sum(writes.values())
                runner["kernels"] += 1
                continue
            totals["read"].update(reads)
            totals["write"].update(writes)
            totals["kernels"] += 1
            moved = sum(reads.values()) + sum(writes.values())
            if is_copy:
                totals["copies"] += moved
            by_op[name] += moved
        totals["views"] += counter.views
    mb = 1e6 * steps
    read = {c: totals["read"][c] / mb for c in CATEGORIES}
    write = {c: totals["write"][c] / mb for c in CATEGORIES}
    return {"read_mb": read, "write_mb": write, "total_mb": sum(read.values()) + sum(write.values()),
            "copies_mb": totals["copies"] / mb, "kernels": totals["kernels"] / steps, "views": totals["views"] / steps,
            "runner_mb": (runner["read"] + runner["write"]) / mb, "runner_kernels": runner["kernels"] / steps,
            "mass_rows": mass_rows, "top_ops_mb": {k: v / mb for k, v in by_op.most_common(8)}}


def floor_mb(model, batch: RaggedBatch, phases: list[int]) -> dict:
    """What a step must move at least: the weights once, each row's KV up to its length (+ the new
    token's), each row's bank view (full bank) once, the new K/V and memory input written."""
    cfg = model.config
    el = batch.dtype.itemsize
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    mean_len = statistics.mean([(p % cfg.segment_len) + 1 for p in phases]) + cfg.kv_window
    kv = len(phases) * cfg.n_layers * 2 * cfg.n_heads * mean_len * cfg.head_dim * el
    n_mem = sum(lb.view_k is not None for lb in batch.layers)
    n_view = batch.layers[cfg.memory_layer_ids[0]].view_k.shape[2] if n_mem else 0
    bank = len(phases) * n_mem * 2 * cfg.n_heads * n_view * batch.aug_dim * el
    return {"weights": weights / 1e6, "kv": kv / 1e6, "bank": bank / 1e6, "total": (weights + kv + bank) / 1e6}


MODES = {"before": (False, "masked"), "after": (True, "masked"), "flex": (True, "flex")}
"""mode -> (mass_gather, kv_attention)."""


def measure(name: str, batches: list[int], dtype: torch.dtype, device: str, seed: int, log,
            modes=("before", "after", "flex"), kv_block: int = 128) -> dict:
    with torch.device(device):
        model = DNC(preset(name)).eval().to(dtype)
    stride = max(1, model.config.segment_len // 64)
    out = []
    for b in batches:
        batch = RaggedBatch(model, b, device=device)
        phases = _phases(batch, b, seed)
        _occupy(batch, model, phases)
        row = {"rows": b, "floor_mb": floor_mb(model, batch, phases), "steps": stride}
        for mode in modes:
            batch.mass_gather, batch.kv_attention = MODES[mode]
            batch.kv_block = kv_block
            with _meta_autocast(), torch.no_grad():
                with _counted_flex(_Counter(_Labels()), batch):  # (meta tensors: flex itself cannot run)
                    ragged_decode_step(model, batch)  # uncounted: fills the cached constants (RoPE tables, ...)
                row[mode] = count_steps(model, batch, phases, stride)
            log(f"{name} B={b} {mode}: {row[mode]['total_mb']:,.0f} MB/step, {row[mode]['kernels']:.0f} kernels")
        out.append(row)
        del batch
    cfg = model.config
    return {"preset": name, "dtype": str(dtype).replace("torch.", ""), "stride": stride, "kv_block": kv_block,
            "sizes": {"segment_len": cfg.segment_len, "kv_window": cfg.kv_window, "n_layers": cfg.n_layers,
                      "d_model": cfg.d_model, "n_heads": cfg.n_heads, "bank_slots": cfg.bank_slots,
                      "memory_layers": list(cfg.memory_layer_ids), "self_read": cfg.self_read,
                      "params": sum(p.numel() for p in model.parameters())},
            "batches": out}


# ================================================================================== CPU timing
def time_cpu(name: str, rows: int, steps: int, seed: int, log, dtype: torch.dtype = torch.float32) -> dict:
    """Median ms of real CPU decode steps at ``rows`` rows (weights and state in ``dtype``), before
    and after alternated."""
    torch.manual_seed(0)
    model = DNC(preset(name)).eval().to(dtype)
    batch = RaggedBatch(model, rows)
    state = model.init_state(1)
    with torch.no_grad():
        lg = model(torch.tensor([[1, 2, 3]]), state=state, last_logits_only=True, metrics=False).logits[0, -1]
    batch.insert(0, state, lg, model)
    batch.clone_rows_to(batch, [0] * (rows - 1), list(range(1, rows)))
    # rows at random segment positions: the KV past a row's real tokens is zeros (costs the same)
    phases = _phases(batch, rows, seed)
    for i, p in enumerate(phases):
        batch.rows[i].seg_pos = p
        batch.rows[i].carry_len = [0] * len(batch.layers)
    batch.seg_pos.copy_(torch.tensor(phases))
    batch.length.copy_(torch.tensor(phases))
    ms = {"before": [], "after": []}
    with torch.no_grad():
        for t in range(2 * steps + 2):
            mode = ("before", "after")[t % 2]
            batch.mass_gather = mode == "after"
            # positions wrap by hand (no commit: the state is synthetic), device and host alike
            wrap = [i for i, m in enumerate(batch.rows) if m.seg_pos >= batch.segment_len - 1]
            for i in wrap:
                batch.rows[i].seg_pos = 0
                batch.seg_pos[i] = 0
                batch.length[i] = 0
            t0 = time.perf_counter()
            batch.tokens.copy_(batch.logits.argmax(-1))
            ragged_decode_step(model, batch)
            dt = (time.perf_counter() - t0) * 1e3
            for m in batch.rows:
                m.seg_pos += 1
            if t >= 2:  # one warm-up step of each
                ms[mode].append(dt)
    res = {"preset": name, "rows": rows, "steps": steps, "dtype": str(dtype).replace("torch.", ""),
           "torch_threads": torch.get_num_threads()}
    for mode in ms:
        res[f"{mode}_ms_median"] = statistics.median(ms[mode])
        res[f"{mode}_ms"] = ms[mode]
    log(f"CPU {name} B={rows}: before {res['before_ms_median']:.1f} ms, after {res['after_ms_median']:.1f} ms")
    return res


# ================================================================================== report
def _f(v, spec="{:,.1f}") -> str:
    return "-" if v is None else spec.format(v)


def table(entry: dict) -> list[str]:
    head = ["rows", "mode", "MB/step", "weights", "KV", "bank read", "mass", "bank write", "rows/logits",
            "activations", "copies", "kernels", "runner MB", "mass rows/step", "floor MB", f"floor µs @{HBM_TBPS} TB/s"]
    out = []
    for r in entry["batches"]:
        fl = r["floor_mb"]
        for mode in [m for m in MODES if m in r]:
            m = r[mode]
            cat = {c: m["read_mb"][c] + m["write_mb"][c] for c in CATEGORIES}
            out.append([str(r["rows"]), mode, _f(m["total_mb"]), _f(cat["weights"]), _f(cat["kv"]), _f(cat["bank read"]),
                        _f(cat["mass"], "{:,.2f}"), _f(cat["bank write"], "{:,.2f}"), _f(cat["rows"], "{:,.2f}"),
                        _f(cat["activations"]), _f(m["copies_mb"]), _f(m["kernels"], "{:.0f}"),
                        _f(m["runner_mb"], "{:,.2f}"), _f(statistics.mean(m["mass_rows"]), "{:.1f}"),
                        _f(fl["total"]), _f(fl["total"] / HBM_TBPS, "{:,.0f}")])
    return md_table(head, out)


def render(res: dict) -> str:
    """The body of a decode_bytes result's entry in ``bench/README.md``."""
    lines = [f"Device: {res.get('device')} (bytes counted on the `{res.get('count_device')}` device at exact sizes); "
             f"torch {res.get('torch')}; commit {res.get('commit') or 'unknown'}", ""]
    for e in res.get("entries", []):
        s = e["sizes"]
        lines += [f"**{e['preset']}**, {e['dtype']}: {s['n_layers']} layers, d {s['d_model']}, segment "
                  f"{s['segment_len']} (+ window {s['kv_window']}), bank {s['bank_slots']} slots on layers "
                  f"{s['memory_layers']}; mean of {e['stride']} steps (one salience period), rows at random "
                  f"segment positions. MB read + written per step (1 MB = 10^6 bytes); before / after: the "
                  f"read mass of every row / of the sampled rows; flex: after, with local attention over each "
                  f"row's own KV length in blocks of {e.get('kv_block', 128)} keys:", ""]
        lines += table(e) + [""]
    timing = res.get("cpu_timing") or []
    if timing:
        rows = [[t["preset"], t.get("dtype", "float32"), str(t["rows"]), str(t["steps"]), _f(t["before_ms_median"]),
                 _f(t["after_ms_median"]), _f(t["before_ms_median"] / t["after_ms_median"], "{:.2f}x")] for t in timing]
        lines += ["CPU ms per decode step (real tensors, rows at random segment positions; median, before and after "
                  "alternated step by step, so load from other processes hits both):", ""]
        lines += md_table(["preset", "dtype", "rows", "steps each", "before ms", "after ms", "before/after"], rows) + [""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--preset", action="append", default=None, help="preset(s) to count (default: small)")
    p.add_argument("--batches", default="1,8,64,256", help="rows per decode batch, comma separated")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="dtype of weights and state (H200 serving: bf16)")
    p.add_argument("--count-device", default="meta", help="device the counted tensors live on (meta: no memory)")
    p.add_argument("--time-batch", type=int, default=0, help="also time real CPU steps at this many rows (0: no)")
    p.add_argument("--time-presets", default="tiny,small", help="presets --time-batch times")
    p.add_argument("--time-steps", type=int, default=8, help="timed CPU steps of each mode")
    p.add_argument("--time-dtype", default="fp32", choices=["bf16", "fp32"],
                   help="--time-batch: dtype of the timed CPU model (fp32: the CPU serving dtype; bf16: the GPU's)")
    p.add_argument("--modes", default="before,after,flex",
                   help="what to count: before (mass_gather off), after (on), flex (on + kv_attention flex)")
    p.add_argument("--kv-block", type=int, default=128, help="flex: KV block (tokens), RaggedBatch.kv_block")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="cpu")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)

    def log(msg):
        print(f"[decode_bytes] {msg}", file=sys.stderr, flush=True)

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    batches = [int(x) for x in args.batches.split(",") if x]
    res = provenance("decode_bytes", sys.argv[1:] if argv is None else argv, "cpu")
    res.update({"count_device": args.count_device, "hbm_tbps": HBM_TBPS, "entries": [], "cpu_timing": []})
    for name in args.preset or ["small"]:
        res["entries"].append(measure(name, batches, dtype, args.count_device, args.seed, log,
                                      [m for m in args.modes.split(",") if m], args.kv_block))
    if args.time_batch:
        for name in args.time_presets.split(","):
            res["cpu_timing"].append(time_cpu(name, args.time_batch, args.time_steps, args.seed, log,
                                              torch.bfloat16 if args.time_dtype == "bf16" else torch.float32))
    md = render(res)
    print(md)
    stem = f"decode_bytes_{args.tag}"
    path = write_result(args.out, stem, res, f"# {TITLE}", md)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
