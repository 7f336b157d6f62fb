"""Where a passkey ends up in the bank (issue 11: accuracy against the number of compressions).

For passkey samples (the long-context record's generator and seeds: ``--lengths`` x ``--depths`` x
``--n``, ``--decoys``, ``--phrasing``, ``--markers``, ``--seed``) the prompt is read with slot
provenance on (``StateBank.track_sources``: the token span every slot summarises). At the question
(the bank the read before the first answer token sees) every memory layer gives the passkey's digits
a *fate*:

- ``own_segment``: the digit is in the question's own segment (local attention, and with
  ``self_read`` the segment's own write slots, read it; the bank does not hold it yet);
- ``raw``: a valid L0 slot covers it (stored as written);
- ``L1`` / ``L2``: only compressed slots of that level cover it (1 / 2 compressions);
- ``evicted``: no valid slot covers it.

A layer's fate is its worst digit's (the answer needs every digit); a sample's fate is its best
layer's. Beside it: the read's probability mass on the slots covering any digit (the bank's and the
segment's own writes, mean and max over heads) at the first answer position, the width of the
narrowest slot covering each digit (a compressed slot's span is its group's hull, an upper bound of
what it holds), and the verdict of teacher-forced exact match (``dnc.training.exact_match``, the
verdict of greedy decoding).

    python bench/needle_fate.py --checkpoint runs/long_context/h200_s7/dnc --lengths 4k,64k,256k,1M \\
        --depths 0,0.25,0.5,0.75,1 --n 8 --out bench/results
    python bench/needle_fate.py --preset tiny --lengths 256,1k --depths 0,0.5,1 --n 2   # CPU smoke run

Prints accuracy by fate (counts beside percentages), by length and fate, and by layer, and writes
them with the per-sample rows, argv, commit and device to ``--out`` (a ``.json`` file, or a folder
for ``needle_fate_<device>.json`` and its ``.md``). Runs the eager path (no CUDA graphs: they do not
carry provenance).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import common  # noqa: E402
from long_context_eval import (PHRASINGS, SUITE_SEED, VARIANT_FILLER, draw_samples, variant_kwargs,  # noqa: E402
                               variant_seed)
from long_context_train import resolve_checkpoint  # noqa: E402

from dnc.data import tasks as task_lib  # noqa: E402
from dnc.layers import matmul_dtype  # noqa: E402
from dnc.memory import MemoryRead  # noqa: E402
from dnc.model import DNC  # noqa: E402
from dnc.training.exact_match import TeacherForcedScorer, answer_positions  # noqa: E402
from ray_jobs.evaluate import parse_lengths  # noqa: E402

log = common.stderr_logger("needle_fate")

FATES = ("own_segment", "raw", "L1", "L2", "evicted")
"""Fates from the most to the least directly readable (a layer takes its worst digit's, a sample
its best layer's)."""
_RANK = {f: i for i, f in enumerate(FATES)}


# ==============================================================================================
# Capture: provenance and read probabilities at each row's question
# ==============================================================================================
class FateCapture:
    """Hooks on a DNC for one teacher-forced forward of ``rows`` (a batch of equal-length samples
    fed ``segment_len`` tokens per call from a fresh state, as :class:`TeacherForcedScorer` does).

    At the first call it turns on every bank's provenance; at the call (one whole segment) holding
    row ``r``'s read position ``reads[r]`` it snapshots each memory layer's bank spans for that row,
    and each memory layer's read hook computes that query's read probabilities
    (``MemoryRead.probs`` over ``[null, bank slots, the segment's own writes]``, as its forward
    makes them). Use as a context manager; ``snap[r][layer]`` and ``probs[r][layer]`` after."""

    def __init__(self, model: DNC, reads: list[int]):
        self.model, self.reads = model, reads
        self.seg = model.config.segment_len
        self.snap: list[dict[int, dict[str, Any]]] = [{} for _ in reads]
        self.probs: list[dict[int, torch.Tensor]] = [{} for _ in reads]
        self.active: dict[int, int] = {}  # row -> offset of its read in the current call
        self.handles: list = []

    def __enter__(self) -> "FateCapture":
        self.handles.append(self.model.register_forward_pre_hook(self._pre, with_kwargs=True))
        for i, blk in enumerate(self.model.blocks):
            if blk.mem is not None:
                self.handles.append(blk.mem.register_forward_hook(self._read_hook(i, blk.mem), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def _pre(self, module, args, kwargs) -> None:
        state, n = kwargs["state"], args[0].shape[1]
        t0 = state.tokens_seen
        if state.seg_pos != 0 or n > self.seg:
            raise RuntimeError(f"needle_fate expects calls of one segment (got {n} tokens at segment position "
                               f"{state.seg_pos})")
        for _, bank in state.banks():
            if t0 == 0:
                bank.track_sources(self.model.config.write_pool)
            elif bank.source is None or bank.source_next != t0:
                raise RuntimeError("a bank lost its provenance (a write path that does not carry it, e.g. CUDA graphs)")
        self.active = {r: q - t0 for r, q in enumerate(self.reads) if t0 <= q < t0 + n}
        for r in self.active:
            for i, bank in state.banks():
                self.snap[r][i] = {"source": bank.source[:, r].cpu(), "valid": bank.valid[r].cpu(),
                                   "level": bank.level_ids().cpu(), "segment_start": t0}

    def _read_hook(self, layer: int, mem: MemoryRead):
        def hook(module, args, kwargs, output) -> None:
            if not self.active:
                return
            h, view, topk = args[0], args[1], args[3]
            self_kv = kwargs.get("self_kv")
            rows = torch.tensor(list(self.active), device=h.device)
            at = torch.tensor(list(self.active.values()), device=h.device)
            with torch.no_grad():
                hq = h[rows, at].unsqueeze(1)                                           # [R, 1, D]
                hm = hq.to(matmul_dtype(hq))
                q = mem.augment_queries(hm, mem.queries(hm, out_dtype=hq.dtype))        # [R, H, 1, Dq]
                k = view.keys[rows].to(q.dtype)                                         # [R, H, S+1, Dq]
                mask = None
                if self_kv is not None:
                    sk, _ = mem.self_slots(self_kv[:, rows], q.dtype)                   # [R, H, P+T, Dq]
                    past = self_kv.shape[3] - h.shape[1]
                    # the query at chunk offset t reads the segment's writes 0 .. past + t
                    own = torch.arange(sk.shape[2], device=h.device)[None] <= (past + at)[:, None]
                    mask = torch.cat([torch.ones(len(rows), k.shape[2], dtype=torch.bool, device=h.device), own], 1)
                    mask = mask.view(len(rows), 1, 1, -1)
                    k = torch.cat([k, sk], 2)
                p = MemoryRead.probs(q, k, topk, mask)[:, :, 0].cpu()                   # [R, H, 1+S(+P+T)]
            for j, r in enumerate(self.active):
                self.probs[r][layer] = p[j]
        return hook


def layer_fate(snap: dict[str, Any], digits: np.ndarray) -> tuple[list[str], int | None]:
    """(fate of every digit position in one layer's bank snapshot (see the module docstring), the
    widest of the digits' narrowest covering spans in tokens, None when a digit has no covering slot).

    The width tells how loose a compressed fate is: a compressed slot's span is the hull of its group,
    an upper bound of what it holds (``StateBank.track_sources``)."""
    seg_start = snap["segment_start"]
    lo, hi = snap["source"][0].numpy(), snap["source"][1].numpy()
    valid, level = snap["valid"].numpy(), snap["level"].numpy()
    out, width = [], 0
    for d in digits:
        if d >= seg_start:
            out.append("own_segment")
            continue
        cover = valid & (lo <= d) & (d <= hi)
        levels = level[cover]
        out.append("evicted" if not len(levels) else ("raw", "L1", "L2")[int(levels.min())])
        width = None if width is None or not len(levels) else max(width, int((hi - lo + 1)[cover].min()))
    return out, (width or None)


def read_mass(probs: torch.Tensor, snap: dict[str, Any], digits: np.ndarray, pool: int) -> dict[str, float]:
    """Read probability on the slots covering any digit (bank slots by their spans, the segment's
    own write slots by position) from ``probs [H, 1 + S (+ own writes)]``: mean and max over heads,
    and the null slot's mean share."""
    lo, hi = snap["source"][0].numpy(), snap["source"][1].numpy()
    s = len(lo)
    cover = snap["valid"].numpy() & ((lo[:, None] <= digits[None]) & (digits[None] <= hi[:, None])).any(1)
    own = (snap["segment_start"] + pool * np.arange(probs.shape[1] - 1 - s))
    own_cover = ((own[:, None] <= digits[None]) & (digits[None] < own[:, None] + pool)).any(1)
    sel = torch.from_numpy(np.concatenate([[False], cover, own_cover]))
    per_head = probs[:, sel].sum(1)
    return {"needle_mean": float(per_head.mean()), "needle_max_head": float(per_head.max()),
            "null_mean": float(probs[:, 0].mean())}


# ==============================================================================================
# Samples, model, run
# ==============================================================================================
def load_model(args) -> DNC:
    """The checkpoint's DNC, or an untrained ``--preset`` (seeded by ``--seed``), with ``--model-set``."""
    from dnc.checkpoint import load_checkpoint
    from dnc.config import preset

    try:
        changes = common.parse_pairs("--model-set", args.model_set)
        if args.checkpoint:
            ckpt, _ = resolve_checkpoint(args.checkpoint)
            model, _ = load_checkpoint(ckpt, map_location="cpu")
            if changes:
                model = model.reconfigured(**changes)
        else:
            torch.manual_seed(args.seed)
            model = DNC(preset(args.preset, **changes))
    except (ValueError, TypeError) as e:  # ConfigError: an unknown preset or field, a bad value, new weight shapes
        raise SystemExit(f"error: --preset/--model-set: {e}") from None
    if not model.config.memory:
        raise SystemExit("error: needle_fate needs a model with memory (config.memory is off)")
    return model


def draw(args, lengths: list[int], depths: list[float]) -> list[tuple[float, task_lib.Sample]]:
    """(depth, sample) for every cell, as ``bench/long_context.py`` draws its passkey cells."""
    mk = args.markers == "on"
    out = []
    for L in lengths:
        for di, d in enumerate(depths):
            seed = variant_seed([args.seed, SUITE_SEED["passkey"], L, di], args.phrasing, mk)
            _, samples = draw_samples("needle", seed, L, args.n, 0.0, depth=d, n_decoys=args.decoys,
                                      **variant_kwargs(args.phrasing, mk))
            out += [(d, s) for s in samples]
    return out


def probe_batch(model: DNC, batch: list[tuple[float, task_lib.Sample]], device: torch.device) -> list[dict]:
    """One teacher-forced forward of ``batch`` (equal lengths) with provenance: a row per sample."""
    cfg = model.config
    samples = [s for _, s in batch]
    reads = [int(answer_positions(s)[0]) - 1 for s in samples]  # the logits there predict the first digit
    scorer = TeacherForcedScorer(model, device, True, max_rows=len(samples), chunk=cfg.segment_len)
    with FateCapture(model, reads) as cap:
        hits = scorer.hits(samples)
    rows = []
    for r, ((depth, s), hit) in enumerate(zip(batch, hits)):
        if not cap.snap[r]:
            raise RuntimeError(f"no snapshot at read position {reads[r]}: the scorer's calls changed")
        digits = s.meta["needle_pos"] + np.arange(len(s.meta["passkey"]))
        fated = {i: layer_fate(sn, digits) for i, sn in cap.snap[r].items()}
        per_digit = {i: f for i, (f, _) in fated.items()}
        layers = {i: max(f, key=_RANK.__getitem__) for i, f in per_digit.items()}
        best = min(layers, key=lambda i: _RANK[layers[i]])
        seg_start = next(iter(cap.snap[r].values()))["segment_start"]
        rows.append({
            "length": len(s), "depth": depth, "correct": bool(hit.all()), "digits_right": int(hit[:-1].sum()),
            "needle_pos": int(s.meta["needle_pos"]), "read_pos": reads[r],
            "distance": reads[r] - int(s.meta["needle_pos"]),
            "in_kv_window": bool(cfg.kv_window and seg_start - cfg.kv_window <= digits[0] < seg_start),
            "fate": layers[best], "best_layer": best,
            "layers": {str(i): f for i, f in layers.items()},
            "digit_fates": {str(i): f for i, f in per_digit.items()},
            "cover_width": {str(i): w for i, (_, w) in fated.items()},
            "read_mass": {str(i): read_mass(cap.probs[r][i], cap.snap[r][i], digits, cfg.write_pool)
                          for i in cap.probs[r]},
        })
    return rows


# ==============================================================================================
# Tables
# ==============================================================================================
def tally(rows: list[dict], key) -> dict[str, dict[str, int]]:
    """``{group: {"correct": k, "n": n}}`` with rows grouped by ``key(row)``."""
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        c = out.setdefault(str(key(r)), {"correct": 0, "n": 0})
        c["correct"] += r["correct"]
        c["n"] += 1
    return out


def summarise(rows: list[dict]) -> dict[str, Any]:
    """Accuracy by fate, by length and fate, and by layer and fate; the mean needle read mass by fate."""
    layers = sorted({k for r in rows for k in r["layers"]}, key=int)
    mass: dict[str, list[float]] = {}
    width: dict[str, list[int]] = {}
    digits: dict[str, list[int]] = {}
    for r in rows:
        digits.setdefault(r["fate"], []).append(r["digits_right"])
        m = r["read_mass"].get(str(r["best_layer"]))
        if m is not None:
            mass.setdefault(r["fate"], []).append(m["needle_mean"])
        w = r["cover_width"][str(r["best_layer"])]
        if w is not None:
            width.setdefault(r["fate"], []).append(w)
    return {
        "by_fate": tally(rows, lambda r: r["fate"]),
        "by_length_fate": {str(L): tally([r for r in rows if r["length"] == L], lambda r: r["fate"])
                           for L in sorted({r["length"] for r in rows})},
        "by_layer_fate": {i: tally(rows, lambda r, i=i: r["layers"][i]) for i in layers},
        "needle_mass_by_fate": {f: {"mean": float(np.mean(v)), "n": len(v)} for f, v in mass.items()},
        "cover_width_by_fate": {f: {"median": common.median(v), "max": max(v), "n": len(v)} for f, v in width.items()},
        # partial credit: at 1M exact match is often 0 everywhere while the digits still tell fates apart
        "digits_right_by_fate": {f: {"right": sum(v), "of": 5 * len(v)} for f, v in digits.items()},
    }


def markdown(summary: dict[str, Any]) -> str:
    def cell(c: dict[str, int] | None) -> str:
        return "—" if not c else common.fmt_count(c["correct"], c["n"])

    fates = [f for f in FATES if f in summary["by_fate"]]
    lines = ["Accuracy by fate (the sample's best memory layer):", ""]
    dig = summary.get("digits_right_by_fate", {})
    lines += common.md_table(["fate", "exact match", "passkey digits right", "needle read mass (mean over heads)",
                              "covering span, median tokens"],
                             [[f, cell(summary["by_fate"][f]),
                               common.fmt_count(dig[f]["right"], dig[f]["of"]) if f in dig else "—",
                               common.fmt_num(summary["needle_mass_by_fate"].get(f, {}).get("mean"), "{:.3f}"),
                               common.fmt_num(summary["cover_width_by_fate"].get(f, {}).get("median"), "{:g}")]
                              for f in fates])
    lines += ["", "By length and fate:", ""]
    lines += common.md_table(["length"] + fates,
                             [[common.fmt_len(int(L))] + [cell(by.get(f)) for f in fates]
                              for L, by in summary["by_length_fate"].items()])
    lines += ["", "By memory layer (each layer's own fate):", ""]
    lf = [f for f in FATES if any(f in by for by in summary["by_layer_fate"].values())]
    lines += common.md_table(["layer"] + lf, [[i] + [cell(by.get(f)) for f in lf]
                                              for i, by in summary["by_layer_fate"].items()])
    return "\n".join(lines)


TITLE = "Where the needle ends up in the bank (`bench/needle_fate.py`)"
WHAT = ("Per passkey sample of a trained DNC, where its digits are at the question (the question's own segment, "
        "a raw L0 slot, compressed once or twice, or evicted), the read's probability mass on the slots that "
        "hold them, and exact match by that fate.")


def render(res: dict) -> str:
    """The body of a needle_fate result's entry in ``bench/README.md``: where it ran, its wording, the tables."""
    st = res.get("settings", {})
    filler = VARIANT_FILLER.get(st.get("phrasing"), "?")
    head = (f"Device: {res.get('device')}; torch {res.get('torch')}; commit {res.get('commit') or 'unknown'}; "
            f"phrasing {st.get('phrasing')} (filler {filler}), markers {st.get('markers')}, lengths "
            f"{', '.join(common.fmt_len(x) for x in st.get('lengths', []))}, depths {st.get('depths')}, "
            f"{st.get('n')} per cell")
    rows = res.get("rows") or []
    # tables from the rows (results stored before a column existed get it too), else as stored
    md = markdown(summarise(rows)) if rows and all("digits_right" in r for r in rows) else res.get("markdown", "")
    return "\n".join([head] + ([f"Note: {res['note']}"] if res.get("note") else []) + ["", md, ""])


# ==============================================================================================
# Command line
# ==============================================================================================
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python bench/needle_fate.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    common.add_probe_args(p, preset_help="an untrained preset instead (e.g. tiny, for CPU smoke runs)",
                          model_set_help="config change for the model (e.g. l0_slots=256; weights kept); repeatable")
    p.add_argument("--lengths", default="4k,64k,256k,1M", help="haystack lengths (k/M suffix); default 4k,64k,256k,1M")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1]; default 0,0.25,0.5,0.75,1")
    p.add_argument("--n", type=int, default=4, help="samples per length x depth cell; default 4")
    p.add_argument("--decoys", type=int, default=0, help="decoy numbers in each haystack; default 0")
    p.add_argument("--phrasing", choices=PHRASINGS, default="template", help="wording (as long_context's --phrasings)")
    p.add_argument("--markers", choices=["on", "off"], default="on", help="<needle>/<query> markers; default on")
    p.add_argument("--seed", type=int, default=1234, help="sample seed (long_context's default: the same samples)")
    p.add_argument("--rows", type=int, default=16, help="samples per forward pass; default 16")
    p.add_argument("--out", default=None, help="result .json file, or a folder for needle_fate_<device>.json + .md")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    try:
        lengths = parse_lengths(args.lengths)
        depths = [float(x) for x in args.depths.split(",") if x.strip()]
    except ValueError as e:
        p.error(str(e))
    if not depths or any(not 0 <= d <= 1 for d in depths) or args.n < 1 or args.rows < 1:
        p.error("--depths must be in [0, 1], --n and --rows >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(args).to(device).eval()
    model.set_step_runner(None)  # eager segment steps: the graph paths do not carry provenance
    cfg = model.config
    samples = draw(args, lengths, depths)
    log(f"{len(samples)} samples, segment_len {cfg.segment_len}, banks {cfg.l0_slots}/{cfg.l1_slots}/{cfg.l2_slots}, "
        f"memory layers {list(cfg.memory_layer_ids)}, self_read {cfg.self_read}")
    by_len: dict[int, list] = {}
    for d, s in samples:
        by_len.setdefault(len(s), []).append((d, s))
    rows: list[dict] = []
    for L, group in by_len.items():
        for i in range(0, len(group), args.rows):
            t0 = time.time()
            got = probe_batch(model, group[i:i + args.rows], device)
            rows += got
            fates = Counter(r["fate"] for r in got)
            log(f"{common.fmt_len(L)}: {i + len(got)}/{len(group)} samples, {sum(r['correct'] for r in got)} right, "
                f"fates {dict(fates)} ({time.time() - t0:.1f}s)")
    summary = summarise(rows)
    md = markdown(summary)
    print(md)
    if args.out:
        res = common.provenance("needle_fate", argv, device) | {
            "model_config": cfg.to_dict(),
            "settings": {"lengths": lengths, "depths": depths, "n": args.n, "decoys": args.decoys,
                         "phrasing": args.phrasing, "markers": args.markers, "seed": args.seed},
            **summary, "rows": rows, "markdown": md}
        out = common.save_to(args.out, f"needle_fate_{common.device_tag(device)}", res,
                             "# Where the needle ends up in the bank (bench/needle_fate.py)")
        log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
