"""Where a passkey is lost: greedy answers of a trained DNC by needle depth, with the distance from
the needle to the question, whether the needle sits in the question's own segment (read by local
attention) or in an earlier one (read from the memory bank), and the answers it gave when wrong.

    python bench/needle_probe.py --checkpoint runs/long_context/h200_s7/dnc --length 4k \\
        --depths 0.5,0.85,0.9,0.95,0.98,1 --n 8 --out /tmp/probe.json

Prints one line per depth (correct / n, in-segment count, median distance in tokens, the first
wrong answers) and writes them with the argv, commit, device and torch version to ``--out``.

``--readers`` scores the same samples through other paths too, to tell a model that never learnt a
layout from a reader that loses it: ``forward`` (the record's chunked reader, the default),
``generate`` (``DNC.generate``, the batched decode loop the training evaluation and the server use)
and ``teacher`` (one forward over the whole sample with the true answer fed in; right when the
argmax at every answer position is the true token) and ``own_segment`` (``teacher`` on the
question's own segment alone, from an empty bank: tells a lost local read from one the bank's reads
drown).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from long_context import one_length  # noqa: E402
from long_context_eval import GreedyReader, answer, draw_samples  # noqa: E402  (the record's reader and draws)
from long_context_train import resolve_checkpoint  # noqa: E402

from dnc.checkpoint import load_checkpoint  # noqa: E402
from dnc.data import tasks as task_lib  # noqa: E402


def _by_generate(model, sample: task_lib.Sample, device: torch.device) -> bool:
    """Exact match through ``DNC.generate`` from a fresh state (the training evaluation's path)."""
    from dnc.training.evaluate import greedy_predict_fn
    return task_lib.score(sample, task_lib.predict_answer(sample, greedy_predict_fn(model, device)))


@torch.no_grad()
def _argmax_matches(model, tokens, spans, device: torch.device) -> bool:
    """One forward over ``tokens`` from a fresh state: True when the argmax before every token of
    every ``(start, end)`` span is that token."""
    from dnc.training import autocast_ctx
    x = torch.as_tensor(np.asarray(tokens, dtype=np.int64), device=device).view(1, -1)
    with autocast_ctx(device, True):
        logits = model(x, state=model.init_state(1), metrics=False).logits[0].float()
    for s, e in spans:
        pred = logits[s - 1:e - 1].argmax(-1).cpu().numpy()
        if not np.array_equal(pred, np.asarray(tokens[s:e])):
            return False
    return True


def _teacher_forced(model, sample: task_lib.Sample, device: torch.device) -> bool:
    """One forward over the whole sample (as training sees it): right when the argmax before every
    answer token is that token."""
    return _argmax_matches(model, sample.tokens, sample.meta["answer_spans"], device)


def _own_segment_only(model, sample: task_lib.Sample, device: torch.device) -> bool:
    """``teacher`` on the question's own segment alone, from a fresh state (an empty bank): when the
    needle sits in that segment everything the answer needs is still there. Right here and wrong
    in ``teacher`` means the bank's reads drown a local read the model has; wrong in both means the
    local read is not learnt (or is lost)."""
    seg = model.config.segment_len
    start = (sample.meta["answer_spans"][0][0] // seg) * seg
    spans = [(s - start, e - start) for s, e in sample.meta["answer_spans"]]
    return _argmax_matches(model, sample.tokens[start:], spans, device)


READERS = {"forward": None, "generate": _by_generate, "teacher": _teacher_forced, "own_segment": _own_segment_only}
"""Reader name -> ``fn(model, sample, device) -> bool`` (``forward`` is the record's GreedyReader)."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--checkpoint", required=True, help="DNC run dir or checkpoint dir")
    p.add_argument("--length", default="4k", help="haystack length in tokens (k/M suffix ok); default 4k")
    p.add_argument("--depths", default="0.5,0.85,0.9,0.95,0.98,1", help="needle depths in [0, 1]")
    p.add_argument("--n", type=int, default=8, help="samples per depth; default 8")
    p.add_argument("--phrasing", default=None, help="None (template), train or heldout")
    p.add_argument("--markers", choices=["on", "off"], default="on")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--readers", default="forward",
                   help="comma list of forward, generate, teacher, own_segment (see above); default forward")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available)")
    p.add_argument("--out", default=None,
                   help="JSON file for the rows, or an existing folder (then needle_probe_<length>.json in it)")
    args = p.parse_args(argv)
    if args.out and Path(args.out).is_dir():
        args.out = str(Path(args.out) / f"needle_probe_{args.length}.json")
    readers = [r.strip() for r in args.readers.split(",") if r.strip()]
    bad = sorted(set(readers) - set(READERS))
    if bad or not readers:
        p.error(f"--readers: unknown {bad or readers}; choose from {', '.join(READERS)}")
    argv = sys.argv[1:] if argv is None else argv
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ckpt, _ = resolve_checkpoint(args.checkpoint)
    model, _ = load_checkpoint(ckpt, map_location="cpu")
    model = model.to(device).eval()
    seg = model.config.segment_len
    reader = GreedyReader(model, seg, device)
    length = one_length(args.length, "--length")
    rows = []
    for d in [float(x) for x in args.depths.split(",") if x.strip()]:
        kw = {"depth": d, "n_decoys": 0, "markers": args.markers == "on"}
        if args.phrasing:
            kw["phrasing"] = args.phrasing
        L, samples = draw_samples("needle", [args.seed, int(d * 1000), length], length, args.n, 0.0, **kw)
        ok, in_seg, dist, offset, wrong, others = 0, 0, [], [], [], {}
        for s in samples:
            q_start = s.meta["answer_spans"][0][0]
            same = s.meta["needle_pos"] // seg == q_start // seg
            in_seg += same
            dist.append(q_start - s.meta["needle_pos"])
            offset.append(q_start % seg)
            right, _, _ = answer(reader, s)
            ok += right
            for name in (r for r in readers if r != "forward"):
                others[name] = others.get(name, 0) + int(READERS[name](model, s, device))
            if not right and len(wrong) < 3:
                got = reader.pieces(s)[0]
                wrong.append({"truth": s.meta["passkey"], "got": task_lib.decode(got) if hasattr(task_lib, "decode")
                              else bytes(t for t in got if t < 256).decode("utf-8", "replace"),
                              "in_segment": bool(same)})
        row = {"depth": d, "length": L, "correct": ok, "n": len(samples), "in_segment": in_seg,
               "median_distance": statistics.median(dist), "median_answer_offset_in_segment": statistics.median(offset),
               "wrong": wrong}
        if readers != ["forward"]:
            row["correct_by_reader"] = {name: (ok if name == "forward" else others.get(name, 0)) for name in readers}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        res = common.provenance("needle_probe", argv, device, script="needle_probe")
        common.write_json(args.out, res | {"segment_len": seg, "rows": rows})
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    raise SystemExit(main())
