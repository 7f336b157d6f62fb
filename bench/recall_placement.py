"""Key/value recall by where the facts sit: in the bank (three segments before the questions) or in
the questions' own segment, for a tiny DNC trained with ``self_read`` off and on, on CPU in minutes.

The H200 runs of issue 11 read passkeys from the bank but not from the question's own segment, even
fed that segment alone (``bench/needle_probe.py --readers own_segment``): local attention never keeps
the in-context lookup while the memory read learns it. ``DNCConfig.self_read`` lets the memory read
see the current segment's own writes too. This trains the same tiny model on the same batches with
the flag off and on (a share ``--near`` of the samples put their facts in the questions' segment,
the rest three segments earlier) and scores held-out samples of each placement separately.

    python bench/recall_placement.py                       # 2 seeds x 2 arms, ~4 minutes on 2 cores
    python bench/recall_placement.py --steps 300 --seeds 0 1 2 --near 0.2

Layout, ``--seg`` tokens a segment, 4 segments: ``far`` puts ``<bos> k1 v1 ... k8 v8`` at the start
of segment 0 and the eight questions ``<query> k v`` in segment 3; ``near`` puts the pairs at the start
of segment 3, right before its questions. Keys are 8 of 16 letters, values digits (chance 10%).
Writes ``<out>/recall_placement_<tag>.json`` (provenance: argv, commit, device, torch) and prints a
table: exact match per placement and arm, with the sample counts.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HelpFormatter, device_tag, provenance, wilson, write_json  # noqa: E402

from dnc.config import preset  # noqa: E402
from dnc.model import DNC  # noqa: E402
from dnc.tokenizer import ByteTokenizer  # noqa: E402

N_PAIRS = 8
N_VALUES = 10
TOK = ByteTokenizer()


def recall_batch(rng: np.random.Generator, batch: int, seg: int, near: float) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Tokens [B, 4*seg], targets [B, 4*seg] (-100 except where the next token is a value) and
    ``is_near`` [B] bool (pairs in the questions' own segment)."""
    if seg < 2 * N_PAIRS + 3 * N_PAIRS + 8:
        raise ValueError(f"--seg {seg} is too short: the near layout needs {5 * N_PAIRS + 8} tokens in one segment")
    keys = np.stack([rng.permutation(16)[:N_PAIRS] for _ in range(batch)]) + ord("A")
    vals = rng.integers(0, N_VALUES, (batch, N_PAIRS)) + ord("0")
    seq = rng.integers(ord("a"), ord("z") + 1, (batch, 4 * seg))
    seq[:, 0] = TOK.bos_id
    is_near = rng.random(batch) < near
    start = np.where(is_near, 3 * seg, 1)  # first key's position
    rows = np.arange(batch)
    for j in range(N_PAIRS):
        seq[rows, start + 2 * j] = keys[:, j]
        seq[rows, start + 2 * j + 1] = vals[:, j]
    order = np.stack([rng.permutation(N_PAIRS) for _ in range(batch)])
    tgt = np.full_like(seq, -100)
    q0 = 3 * seg + 2 * N_PAIRS + 4  # after the near pairs (and a few filler tokens) in both layouts
    for j in range(N_PAIRS):
        p = q0 + 3 * j
        k = np.take_along_axis(keys, order[:, j:j + 1], 1)[:, 0]
        v = np.take_along_axis(vals, order[:, j:j + 1], 1)[:, 0]
        seq[:, p], seq[:, p + 1], seq[:, p + 2] = TOK.token_id("<query>"), k, v
        tgt[:, p + 1] = v
    return torch.tensor(seq), torch.tensor(tgt), is_near


def train_arm(self_read: bool, args, seed: int) -> dict:
    """Train one arm; returns its held-out scores per placement and its training seconds."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    # L0 holds all four segments raw: the far pairs are read uncompressed, as in the memory-learning test
    cfg = preset("tiny", segment_len=args.seg, l0_slots=4 * args.seg, bptt_segments=4, self_read=self_read)
    model = DNC(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    t0 = time.perf_counter()
    for step in range(args.steps):
        x, y, _ = recall_batch(rng, args.batch, args.seg, args.near)
        loss = model(x, targets=y).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / 30)
        opt.step()
        if (step + 1) % max(1, args.steps // 5) == 0:
            print(f"  self_read={self_read} seed={seed} step {step + 1}/{args.steps} loss {float(loss.detach()):.3f}",
                  file=sys.stderr, flush=True)
    train_s = time.perf_counter() - t0
    model.eval()
    out = {"self_read": self_read, "seed": seed, "train_s": round(train_s, 1)}
    for name, share in (("far", 0.0), ("near", 1.0)):
        x, y, _ = recall_batch(np.random.default_rng(10_000 + seed), args.eval_samples, args.seg, share)
        with torch.no_grad():
            pred = model(x).logits.argmax(-1)
        mask = y != -100
        right = int((pred[mask] == y[mask]).sum())
        out[name] = {"correct": right, "n": int(mask.sum())}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter, epilog=__doc__)
    p.add_argument("--steps", type=int, default=200, help="training steps per arm; default 200")
    p.add_argument("--batch", type=int, default=32, help="samples per step; default 32")
    p.add_argument("--seg", type=int, default=64, help="segment length in tokens; default 64")
    p.add_argument("--near", type=float, default=0.2,
                   help="share of training samples whose pairs sit in the questions' segment; default 0.2")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one run per seed and arm; default 0 1")
    p.add_argument("--eval-samples", type=int, default=256, help="held-out samples per placement (8 questions each)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--tag", default=None, help="result name suffix (default: the device tag, e.g. cpu)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="folder of the JSON")
    args = p.parse_args(argv)
    if not 0.0 <= args.near <= 1.0:
        p.error(f"--near must be in [0, 1], got {args.near}")
    if args.steps < 1 or args.batch < 1 or args.eval_samples < 1:
        p.error("--steps, --batch and --eval-samples must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    res = provenance("recall_placement", sys.argv[1:] if argv is None else argv, device) | {
        "preset": "tiny", "segment_len": args.seg, "steps": args.steps, "batch": args.batch, "near": args.near,
        "n_pairs": N_PAIRS, "chance": 1 / N_VALUES, "threads": torch.get_num_threads(), "runs": []}
    for seed in args.seeds:
        for self_read in (False, True):  # the arms alternate, so both see the same machine load
            res["runs"].append(train_arm(self_read, args, seed))
    print("| self_read | seed | facts in the bank (far) | facts in the questions' segment (near) | train s |")
    print("|---|---:|---:|---:|---:|")
    for r in res["runs"]:
        cells = []
        for name in ("far", "near"):
            k, n = r[name]["correct"], r[name]["n"]
            lo, hi = wilson(k, n)
            cells.append(f"{k / n:.1%} ({k}/{n}) [{lo:.0%}-{hi:.0%}]")
        print(f"| {'on' if r['self_read'] else 'off'} | {r['seed']} | {cells[0]} | {cells[1]} | {r['train_s']} |")
    path = write_json(Path(args.out) / f"recall_placement_{args.tag or device_tag(device)}.json", res)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
