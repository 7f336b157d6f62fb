"""Does a trained memory still work at other segment lengths? Evaluates one checkpoint, unchanged,
with ``segment_len`` set to each of ``--segments`` (bank capacities raised to hold as many
segments as the checkpoint's), on tasks whose facts sit 1.5-4 segments before the question.

    python bench/segment_transfer.py --checkpoint runs/curriculum-tiny-cpu --segments 32,64,128

``--l0-segments`` also varies how many segments the raw level L0 holds (L1/L2 scaled alike): a
fact further back than that has been compressed 2:1 or 4:1, so the same checkpoint at the same
segment length shows what compression costs exact recall, e.g.

    python bench/segment_transfer.py --checkpoint runs/curriculum-tiny-cpu --segments 32 \
        --spans 2,4,8,16 --tasks needle,kv_retrieval --l0-segments 4,16 --tag tiny_cpu_l0

No weight's shape depends on ``segment_len``, so a model whose memory was learnt with short
segments (cheap: few slots to search) can run with long ones; this measures what carries over.
Prints a table and writes ``bench/results/segment_transfer_<tag>.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _p in (str(HERE.parent), str(HERE)):  # the project (dnc) and bench/ (report)
    if _p not in sys.path:
        sys.path.insert(0, _p)
from common import fmt_num, md_table, parse_pairs, provenance, write_json  # noqa: E402

TITLE = "A trained memory at other segment lengths (`bench/segment_transfer.py`)"
WHAT = ("One checkpoint evaluated unchanged with other segment lengths (bank capacities scaled to "
        "hold as many segments): greedy exact match on curriculum tasks whose facts sit 1.5-4 "
        "segments before the question.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="step_* directory or run directory (its newest checkpoint)")
    p.add_argument("--segments", default="32,64,128", help="segment lengths to evaluate at (comma-separated)")
    p.add_argument("--spans", default="1.5,4", help="sample lengths in segments")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a DNCConfig field that no weight's shape depends on, e.g. write_importance=50")
    p.add_argument("--l0-segments", default="", help="raw segments L0 holds, comma-separated (empty: the checkpoint's)")
    p.add_argument("--tasks", default="mqar,kv_retrieval,needle", help="curriculum tasks (comma-separated)")
    p.add_argument("--n", type=int, default=32, help="samples per task x length")
    p.add_argument("--difficulty", type=float, default=0.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tag", default="cpu")
    p.add_argument("--out", default=str(HERE / "results"))
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    import torch

    from dnc.checkpoint import load_checkpoint, resolve_checkpoint
    from dnc.training import task_accuracy

    try:
        segments = [int(x) for x in a.segments.split(",") if x.strip()]
        spans = [float(x) for x in a.spans.split(",") if x.strip()]
        l0_segments = [int(x) for x in a.l0_segments.split(",") if x.strip()]
    except ValueError:
        raise SystemExit("error: --segments and --l0-segments take integers and --spans numbers, "
                         "comma-separated (e.g. 32,64)")
    if not segments or min(segments) < 1 or not spans or min(spans) <= 0 or min(l0_segments, default=1) < 1:
        raise SystemExit("error: --segments, --spans and --l0-segments need positive values")
    try:
        path = resolve_checkpoint(a.checkpoint)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}")
    trained, _ = load_checkpoint(path, map_location="cpu")
    try:
        overrides = parse_pairs("--set", a.overrides)
        base = trained.config.replace(**overrides)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"error: --set: {e}")
    ratio = max(1, base.l0_slots * base.write_pool // base.segment_len)  # raw segments L0 holds
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    rows = []
    print(f"checkpoint {path} (trained with segment_len {trained.config.segment_len}); {a.n} samples per cell",
          flush=True)
    for seg, raw in [(s, r) for s in segments for r in (l0_segments or [ratio])]:
        floor = raw == ratio  # the checkpoint's own ratio: never below its capacities
        changes = dict(segment_len=seg,
                       l0_slots=max(base.l0_slots if floor else 0, raw * seg // base.write_pool),
                       l1_slots=max(base.l1_slots if floor else 0, raw * seg // (2 * base.write_pool)),
                       l2_slots=max(base.l2_slots if floor else 0, raw * seg // (4 * base.write_pool)))
        try:
            model = trained.reconfigured(**{**overrides, **changes}).to(a.device).eval()
        except ValueError as e:  # ConfigError: --set changed the shape of the checkpoint's weights
            raise SystemExit(f"error: --set: {e}")
        cfg = model.config
        lengths = [max(8, round(s * seg)) for s in spans]
        t0 = time.time()
        acc = task_accuracy(model, tasks, lengths, n=a.n, difficulty=a.difficulty, device=torch.device(a.device),
                             task_kwargs={"kv_retrieval": {"key_len": 1}})
        row = {"segment_len": seg, "l0_slots": cfg.l0_slots, "lengths": lengths, "accuracy": acc,
               "seconds": round(time.time() - t0, 1)}
        rows.append(row)
        cells = ", ".join(f"{t} " + "/".join(f"{acc[t][L]:.2f}" for L in lengths) for t in tasks)
        print(f"segment_len {seg:>5}, L0 {cfg.l0_slots:>5} slots (lengths {'/'.join(map(str, lengths))}): {cells}",
              flush=True)
    res = {**provenance("segment_transfer", argv, a.device), "checkpoint": path,
           "trained_segment_len": trained.config.segment_len, "spans_in_segments": spans, "overrides": overrides,
           "n": a.n, "difficulty": a.difficulty, "tasks": tasks, "rows": rows}
    dest = write_json(Path(a.out) / f"segment_transfer_{a.tag}.json", res)
    print(render(res))
    print(f"wrote {dest}")
    return 0


def render(res: dict) -> str:
    """Markdown of one result (the body of its entry in ``bench/README.md``, also printed): exact
    match per task x sample length, one row per segment length the checkpoint ran at."""
    tasks = res.get("tasks", [])
    spans = res.get("spans_in_segments", [])
    header = ["segment_len", "L0 slots", "lengths"] + [f"{t} @ {s:g} seg" for t in tasks for s in spans]
    rows = []
    for r in res.get("rows", []):
        acc, lengths = r.get("accuracy", {}), r.get("lengths", [])
        cells = [fmt_num(acc.get(t, {}).get(str(L), acc.get(t, {}).get(L)), "{:.2f}") for t in tasks for L in lengths]
        rows.append([str(r.get("segment_len")), fmt_num(r.get("l0_slots"), "{:,}"), "/".join(map(str, lengths))] + cells)
    note = (f"Checkpoint trained with segment_len {res.get('trained_segment_len')}; {res.get('n')} samples "
            f"per cell, difficulty {res.get('difficulty')}"
            + (f"; evaluated with {', '.join(f'{k}={v}' for k, v in res['overrides'].items())}" if res.get("overrides") else "")
            + ".")
    return "\n".join([f"Device: {res.get('device') or 'CPU'}; torch {res.get('torch')}; commit {res.get('commit') or 'unknown'}", "", note, ""]
                     + md_table(header, rows) + [""])


if __name__ == "__main__":
    sys.exit(main())
