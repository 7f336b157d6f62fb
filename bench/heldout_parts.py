"""Which held-out part of a passkey's wording a model fails on (issue 11, "Generalisation").

A held-out passkey differs from a trained one in four parts: its subject ("alarm code"), its fact
frame ("WARN: {i} -> {v}"), its question frame ("print({i})  # -> ") and its filler (held-out stdlib
modules). This script scores passkey samples that swap one part at a time (the needle generator's
``phrasing`` part mixes, :data:`dnc.data.phrasings.PART_PHRASINGS`) at two needle positions:
``bank`` (depth 0: the needle lies segments before the question, only the memory bank can give it
back) and ``own`` (depth 1: the needle lies in the question's own segment, local attention and the
segment's own writes can read it).

Cells (``--cells``; each ``name=phrasing/filler``, phrasing ``template`` for the original wording):

- ``template``: the original wording (words filler), the trained headline;
- ``train``: train subject, fact and question frames, train stdlib filler;
- ``subject`` / ``fact`` / ``question``: one part held out, the rest as ``train``;
- ``frames``: both frames held out, a train subject;
- ``filler``: train wording, held-out filler;
- ``wording``: every wording part held out, train filler;
- ``heldout``: everything held out (the record's held-out cell);
- ``train_echo`` / ``heldout_echo``: train / held-out subject and fact frame (and filler), the
  question being the fact's own text up to the value, as in the template (an induction copy).

Per cell it prints exact match (teacher-forced argmax, the record's verdict: the number and then
``<eos>``), how often the number alone is right, how often its first digit is (the one digit the
question alone must find: teacher forcing hands the later ones the true digits before them), how often
the first answer token is a digit at all, digits right, and whether the needle sat in the question's
segment.

    python bench/heldout_parts.py --checkpoint runs/ck_s13 --length 2k --n 16 --positions bank \\
        --device cpu --threads 1 --out bench/results --tag cpu_heldout_bank
    python bench/heldout_parts.py --preset tiny --length 256 --n 2 --cells train,subject   # smoke run

Writes ``heldout_parts_<tag>.json`` (argv, commit, device, per-sample rows, the table) and ``.md``
to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import common  # noqa: E402
from long_context_eval import draw_samples  # noqa: E402
from needle_fate import load_model  # noqa: E402

from dnc.data import phrasings as ph  # noqa: E402
from dnc.data import tasks as task_lib  # noqa: E402
from dnc.training.exact_match import TeacherForcedScorer, answer_positions  # noqa: E402
from ray_jobs.evaluate import parse_lengths  # noqa: E402

log = common.stderr_logger("heldout_parts")

CELLS: dict[str, tuple[str, str]] = {
    "template": ("template", "words"),
    "train": ("train", "stdlib"),
    "subject": ("heldout_subject", "stdlib"),
    "fact": ("heldout_fact", "stdlib"),
    "question": ("heldout_question", "stdlib"),
    "frames": ("heldout_frames", "stdlib"),
    "filler": ("train", "stdlib_heldout"),
    "wording": ("heldout", "stdlib"),
    "heldout": ("heldout", "stdlib_heldout"),
    "train_echo": ("train_echo", "stdlib"),
    "heldout_echo": ("heldout_echo", "stdlib_heldout"),
}
"""Cell name -> (needle phrasing, filler source); see the module docstring."""
POSITIONS = {"bank": 0.0, "own": 1.0}
"""Needle position -> depth (0: the first segment, read from the bank; 1: the question's segment)."""
SEED_TAG = 11
"""This script's component of the sample seed (the record's suites use 1-4)."""


def parse_cells(spec: str) -> dict[str, tuple[str, str]]:
    """``--cells``: names of :data:`CELLS`, or ``name=phrasing/filler`` for another mix."""
    out = {}
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        if "=" in item:
            name, _, mix = item.partition("=")
            phrasing, _, filler = mix.partition("/")
            if phrasing != "template":
                ph.needle_part_splits(phrasing)  # raises on an unknown phrasing
            out[name] = (phrasing, filler or "stdlib")
        elif item in CELLS:
            out[item] = CELLS[item]
        else:
            raise ValueError(f"unknown cell {item!r}: use one of {', '.join(CELLS)} or name=phrasing/filler")
    if not out:
        raise ValueError("--cells is empty")
    return out


def cell_samples(seed: int, length: int, n: int, cell_index: int, depth_index: int, depth: float,
                 phrasing: str, filler: str, markers: bool) -> tuple[int, list[task_lib.Sample]]:
    """(length, ``n`` passkey samples) of one cell and position; the seed depends on the cell's
    place in :data:`CELLS` and the position only, so a cell's samples do not change with ``--cells``."""
    kw = {"markers": markers, "filler": filler, "phrasing": None if phrasing == "template" else phrasing}
    return draw_samples("needle", [seed, SEED_TAG, length, depth_index, cell_index], length, n, 0.0,
                        depth=depth, n_decoys=0, **kw)


@torch.no_grad()
def score(scorer: TeacherForcedScorer, samples: list[task_lib.Sample], segment_len: int) -> list[dict[str, Any]]:
    """One row per sample: exact match, digits right, the predicted first answer token, and
    whether the needle lies in the question's segment."""
    rows = []
    for s, lg in zip(samples, scorer.answer_logits(samples)):
        pred = torch.nan_to_num(lg, nan=float("-inf")).argmax(-1).numpy()
        truth = np.asarray(s.tokens, dtype=np.int64)[answer_positions(s)]
        hit = pred == truth
        first = int(pred[0])
        read = int(answer_positions(s)[0]) - 1
        rows.append({"correct": bool(hit.all()), "digits_right": int(hit[:-1].sum()), "digits": len(hit) - 1,
                     "first_is_digit": 48 <= first <= 57, "first_pred": first,
                     "in_question_segment": s.meta["needle_pos"] // segment_len == read // segment_len,
                     "frames": s.meta.get("frames"), "passkey": s.meta["passkey"],
                     "pred": bytes(int(t) for t in pred[:-1] if t < 256).decode("utf-8", "replace")})
    return rows


def summarise(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Counts over one cell's rows. ``number_right``: every digit right, whether or not ``<eos>``
    follows (exact match also needs the ``<eos>``: a worded fact goes on after its number, "12345.\\n",
    and a model that copies that on is wrong by the record's verdict with the right number).
    ``first_digit_right``: the first digit, the one the question alone must find (teacher forcing
    gives the later digits the true ones before them, so a model that copies on from there gets them
    right once the first is given: ``digits_right`` flatters a model that cannot find the needle)."""
    return {"n": len(rows), "correct": sum(r["correct"] for r in rows),
            "number_right": sum(r["digits_right"] == r["digits"] for r in rows),
            "first_digit_right": sum(r["first_pred"] == ord(r["passkey"][0]) for r in rows),
            "digits_right": sum(r["digits_right"] for r in rows), "digits": sum(r["digits"] for r in rows),
            "first_is_digit": sum(r["first_is_digit"] for r in rows),
            "in_question_segment": sum(r["in_question_segment"] for r in rows)}


def cell_table(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The cells of a result with :func:`summarise`'s counts recomputed from its rows (results written
    before ``number_right`` existed get it too)."""
    out = []
    for c in res["cells"]:
        rows = [r for r in res.get("rows", []) if r["cell"] == c["cell"] and r["position"] == c["position"]]
        out.append(c | (summarise(rows) if rows else {}))
    return out


def markdown(cells: list[dict[str, Any]]) -> str:
    """The table: one row per cell x position."""
    rows = [[c["cell"], c["phrasing"], c["filler"], c["position"], common.fmt_len(c["length"]),
             common.fmt_count(c["correct"], c["n"]), common.fmt_count(c.get("number_right"), c["n"]),
             common.fmt_count(c.get("first_digit_right"), c["n"]), common.fmt_count(c["first_is_digit"], c["n"]),
             common.fmt_count(c["digits_right"], c["digits"]), f"{c['in_question_segment']}/{c['n']}"]
            for c in cells]
    return "\n".join(common.md_table(["cell", "phrasing", "filler", "needle", "length", "exact match",
                                      "number right (eos or not)", "first digit right", "first answer token a digit",
                                      "digits right (teacher-forced)", "needle in the question's segment"],
                                     rows, "llllrrrrrrr"))


TITLE = "Which held-out part a passkey fails on (`bench/heldout_parts.py`)"
WHAT = ("Passkey exact match of one trained DNC when one part of the wording at a time (subject, fact frame, "
        "question frame, filler) is held out of training, with the needle in the memory bank (depth 0) or in the "
        "question's own segment (depth 1).")


def render(res: dict) -> str:
    """The body of a heldout_parts result's entry in ``bench/README.md``."""
    st = res.get("settings", {})
    head = (f"Device: {res.get('device')}; torch {res.get('torch')}; commit {res.get('commit') or 'unknown'}; "
            f"markers {st.get('markers')}, {st.get('n')} samples per cell, segment_len {res.get('segment_len')}")
    return "\n".join([head, "", markdown(cell_table(res)), ""])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python bench/heldout_parts.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    common.add_probe_args(p, preset_help="an untrained preset instead (e.g. tiny, for smoke runs)",
                          model_set_help="config change for the model (weights kept); repeatable")
    p.add_argument("--length", default="2k", help="sample length (k/M suffix); default 2k")
    p.add_argument("--n", type=int, default=16, help="samples per cell and position; default 16")
    p.add_argument("--cells", default=",".join(CELLS), help=f"comma list of cells; default all: {', '.join(CELLS)}")
    p.add_argument("--positions", default="bank,own", help="comma list of bank, own; default both")
    p.add_argument("--markers", choices=["on", "off"], default="on", help="<needle>/<query> markers; default on")
    p.add_argument("--seed", type=int, default=1234, help="sample seed; default 1234")
    p.add_argument("--rows", type=int, default=16, help="samples per forward pass; default 16")
    p.add_argument("--out", default=None, help="folder for heldout_parts_<tag>.json and .md")
    p.add_argument("--tag", default=None, help="result name suffix (default: the device)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    try:
        (length,) = parse_lengths(args.length)
        cells = parse_cells(args.cells)
        positions = [x.strip() for x in args.positions.split(",") if x.strip()]
        bad = [x for x in positions if x not in POSITIONS]
        if bad or not positions:
            raise ValueError(f"--positions takes a comma list of {', '.join(POSITIONS)}, got {args.positions!r}")
    except ValueError as e:
        p.error(str(e))
    if args.n < 1 or args.rows < 1:
        p.error("--n and --rows must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(args).to(device).eval()
    seg = model.config.segment_len
    scorer = TeacherForcedScorer(model, device, True, max_rows=args.rows, chunk=seg)
    results, all_rows = [], []
    order = list(CELLS) + [c for c in cells if c not in CELLS]
    for pos in positions:
        for name, (phrasing, filler) in cells.items():
            t0 = time.time()
            L, samples = cell_samples(args.seed, length, args.n, order.index(name), list(POSITIONS).index(pos),
                                      POSITIONS[pos], phrasing, filler, args.markers == "on")
            rows = score(scorer, samples, seg)
            summary = summarise(rows)
            results.append({"cell": name, "phrasing": phrasing, "filler": filler, "position": pos,
                            "depth": POSITIONS[pos], "length": L, **summary})
            all_rows += [{"cell": name, "position": pos, **r} for r in rows]
            log(f"{pos} {name} ({phrasing}/{filler}) {common.fmt_len(L)}: {summary['correct']}/{summary['n']} right, "
                f"number right {summary['number_right']}/{summary['n']}, first digit {summary['first_digit_right']}/"
                f"{summary['n']}, digits {summary['digits_right']}/"
                f"{summary['digits']}, first a digit {summary['first_is_digit']}/"
                f"{summary['n']} ({time.time() - t0:.1f}s)")
    md = markdown(results)
    print(md)
    if args.out:
        tag = args.tag or common.device_tag(device)
        res = common.provenance("heldout_parts", argv, device) | {
            "model_config": model.config.to_dict(), "segment_len": seg,
            "settings": {"length": length, "n": args.n, "markers": args.markers, "seed": args.seed,
                         "positions": positions, "cells": {k: list(v) for k, v in cells.items()}},
            "cells": results, "rows": all_rows, "markdown": md}
        out = common.write_result(args.out, f"heldout_parts_{tag}", res,
                                  "# Which held-out part a passkey fails on (bench/heldout_parts.py)")
        log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
