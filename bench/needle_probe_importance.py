"""How the passkey's write importance ranks against its filler's (issue 11: held-out passkeys live at
64k and die at 1M).

With ``DNCConfig.write_importance`` on, a memory layer's keep score of an L0/L1 slot (what is
compressed first, ``StateBank._cascade``) is ``protect_salient * log(salience) - log1p(age) +
write_importance * mean_h(k_h . w0_h + v_h . w1_h)``. A needle stays raw in L0 (2,048 slots here)
only while fewer than about that many newer slots outscore it, so the share ``f`` of filler slots
whose importance is at least the needle's bounds how long it stays: after ``L`` filler tokens about
``f * L`` of them rank above it (more, counting its growing age). This probe reads short samples
(``--length``, a few segments: importance is a function of the written key/value, so short context
is enough to rank) of each wording/filler variant and reports, per memory layer:

- the needle's importance (its weakest digit: the answer needs all five) and the filler's median;
- ``f``: the share of filler slots scoring at least the needle's weakest digit (pooled over samples:
  counts beside it), and ``f * L`` at 64k, 256k and 1M beside the L0 capacity.

    python bench/needle_probe_importance.py --checkpoint runs/s14_2200 \\
        --variants template,cross_template,heldout,cross_heldout,train --length 4k --n 4 --out bench/results

Writes argv, commit, device and the tables to ``--out`` (a ``.json`` file, or a folder for
``needle_probe_importance_<device>.json``); renders as a ``needle_probe`` result.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import common  # noqa: E402
from long_context_eval import PHRASINGS, SUITE_SEED, VARIANT_FILLER, draw_samples, variant_kwargs, variant_seed  # noqa: E402
from needle_fate import load_model  # noqa: E402

from dnc.memory.bank import StateBank  # noqa: E402
from ray_jobs.evaluate import parse_lengths  # noqa: E402

log = common.stderr_logger("needle_probe_importance")
HORIZONS = (65536, 262144, 1048576)
MARGINS = (0.0, 5.0, 10.0, 15.0)
"""Keep-score handicaps of the needle against a fresh slot: an old needle loses ``log1p(age)`` (4.6 at
100 segments, 7.6 at 2,000) and, when no query reads it, up to ``log(1e-4) = -9.2`` of salience."""
NEAR = 64
"""Tokens on either side of the needle (and before the question) that are not counted as filler."""


class ImportanceTap:
    """Records the learned importance bonus of every slot written while active: wraps
    ``StateBank.write_packed`` (the class method, so stacked banks of several layers are seen too).
    ``calls`` holds one ``[R, m]`` float array per write (R = memory layers x batch rows, layer-major
    as ``DNC`` stacks them; m = slots per segment)."""

    def __init__(self):
        self.calls: list[np.ndarray] = []
        self._orig = StateBank.write_packed

    def __enter__(self) -> "ImportanceTap":
        orig, calls = self._orig, self.calls

        def wrapped(bank, kv, valid, *a, importance_w=None, importance_weight=0.0, **kw):
            if importance_w is None or not importance_weight:
                raise SystemExit("error: the model has no learned write importance (write_importance 0)")
            with torch.no_grad():  # the same expression as StateBank._cascade's importance_bonus
                imp = torch.einsum("tbhsd,bthd->bs", kv.float(), importance_w) * (importance_weight / kv.shape[2])
            calls.append(imp.cpu().numpy())
            return orig(bank, kv, valid, *a, importance_w=importance_w, importance_weight=importance_weight, **kw)

        StateBank.write_packed = wrapped
        return self

    def __exit__(self, *exc) -> None:
        StateBank.write_packed = self._orig


@torch.no_grad()
def importance_per_token(model, samples, device) -> np.ndarray:
    """``[layers, B, T_written]`` importance of each written slot (write_pool 1: one slot per token)
    for equal-length ``samples`` fed a segment per call from a fresh state."""
    cfg = model.config
    if cfg.write_pool != 1:
        raise SystemExit("error: this probe maps slots to tokens one to one (write_pool 1)")
    x = torch.from_numpy(np.stack([s.tokens for s in samples]).astype(np.int64)).to(device)
    state = model.init_state(len(samples))
    with ImportanceTap() as tap:
        for i in range(0, x.shape[1], cfg.segment_len):
            model(x[:, i:i + cfg.segment_len], state=state, last_logits_only=True, metrics=False)
    n_mem = len(cfg.memory_layer_ids)
    per = np.concatenate(tap.calls, 1)  # [n_mem * B, T]
    return per.reshape(n_mem, len(samples), -1)


def _show(token: int) -> str:
    """A byte token as text (``repr`` of its character), a special token by id."""
    return repr(chr(token)) if token < 256 else f"<{token}>"


def probe_variant(model, variant: str, length: int, n: int, seed: int, device) -> dict[str, Any]:
    cfg = model.config
    s_seed = variant_seed([seed, SUITE_SEED["passkey"], length, 0], variant, True)
    _, samples = draw_samples("needle", s_seed, length, n, 0.0, n_decoys=0, **variant_kwargs(variant, True))
    imp = importance_per_token(model, samples, device)
    out: dict[str, Any] = {"variant": variant, "filler": VARIANT_FILLER[variant], "n": len(samples), "layers": {}}
    for li, layer in enumerate(cfg.memory_layer_ids):
        above, total, needle, filler_med, top = 0, 0, [], [], Counter()
        above_m = dict.fromkeys(MARGINS, 0)
        for b, s in enumerate(samples):
            digits = s.meta["needle_pos"] + np.arange(len(s.meta["passkey"]))
            row = imp[li, b]
            written = len(row)
            d = digits[digits < written]
            if len(d) != len(digits):
                continue  # the needle is in the unwritten last segment (not at these depths)
            weakest = float(row[d].min())
            mask = np.ones(written, dtype=bool)
            mask[max(0, d[0] - NEAR):d[-1] + NEAR] = False  # the needle's sentence is not filler,
            mask[max(0, s.meta["answer_spans"][0][0] - NEAR):] = False  # nor the question and its answer
            fill = row[mask]
            above += int((fill >= weakest).sum())
            for m in MARGINS:
                above_m[m] += int((fill >= weakest - m).sum())
            top.update(s.tokens[:written][mask][fill >= weakest].tolist())
            total += len(fill)
            needle.append(weakest)
            filler_med.append(float(np.median(fill)))
        f = above / total if total else None
        out["layers"][str(layer)] = {
            "needle_weakest_digit": needle, "filler_median": filler_med, "above": above, "filler_slots": total,
            "share_above": f,
            "top_tokens_above": [[_show(t), c] for t, c in top.most_common(8)],
            "share_above_margin": {f"{m:g}": (a / total if total else None) for m, a in above_m.items()},
            "expected_above": {str(L): (None if f is None else f * L) for L in HORIZONS}}
    return out


def markdown(rows: list[dict], l0: int) -> str:
    lines = [f"Share of filler slots whose learned importance is at least the passkey's weakest digit "
             f"(pooled over samples), and what that share means over a haystack: about that many newer "
             f"slots outrank the needle for L0's {l0:,} raw slots.", ""]
    body = []
    for r in rows:
        for layer, c in r["layers"].items():
            f = c["share_above"]
            body.append([r["variant"], r["filler"], layer, str(r["n"]),
                         common.fmt_num(np.mean(c["needle_weakest_digit"]) if c["needle_weakest_digit"] else None, "{:.2f}"),
                         common.fmt_num(np.mean(c["filler_median"]) if c["filler_median"] else None, "{:.2f}"),
                         f"{common.fmt_pct(f, 2)} ({c['above']:,}/{c['filler_slots']:,})"]
                        + [common.fmt_num(c["expected_above"][str(L)]) for L in HORIZONS]
                        + [", ".join(f"{t} {k}" for t, k in c.get("top_tokens_above", [])[:5]).replace("|", "\\|") or "—"])
    lines += common.md_table(["variant", "filler", "layer", "samples", "needle importance (weakest digit, mean)",
                              "filler median", "filler >= needle"] + [f"x {common.fmt_len(L)}" for L in HORIZONS]
                             + ["filler tokens above it (most common)"], body)
    lines += ["", "The same share against the needle's importance lowered by a margin (an old, unread needle's "
              "age and salience handicap in the keep score, up to about 17 at 1M):", ""]
    lines += common.md_table(["variant", "filler", "layer"] + [f"margin {m:g}" for m in MARGINS],
                             [[r["variant"], r["filler"], layer]
                              + [common.fmt_pct(c.get("share_above_margin", {}).get(f"{m:g}"), 2) for m in MARGINS]
                              for r in rows for layer, c in r["layers"].items()])
    return "\n".join(lines)


def render(res: dict) -> str:
    """The bench/README entry body (``needle_probe`` renderer delegates here for these results)."""
    st = res.get("settings", {})
    head = (f"Device: {res.get('device')}; torch {res.get('torch')}; commit {res.get('commit') or 'unknown'}; "
            f"passkey samples of {common.fmt_len(st.get('length'))} tokens, depths drawn at random, "
            f"{st.get('n')} per variant")
    return "\n".join([head, "", res.get("markdown", ""), ""])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python bench/needle_probe_importance.py", description=__doc__.split("\n\n")[0],
                                formatter_class=common.HelpFormatter, epilog=__doc__)
    common.add_probe_args(p, preset_help="an untrained preset instead (CPU smoke runs; needs write_importance)",
                          model_set_help="config change for the model (weights kept); repeatable")
    p.add_argument("--variants", default="template,cross_template,heldout,cross_heldout",
                   help=f"comma list of {', '.join(PHRASINGS)}")
    p.add_argument("--length", default="4k", help="sample length (k suffix)")
    p.add_argument("--n", type=int, default=4, help="samples per variant")
    p.add_argument("--seed", type=int, default=1234, help="sample seed")
    p.add_argument("--out", default=None, help="result .json file, or a folder")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or any(v not in PHRASINGS for v in variants) or args.n < 1:
        p.error(f"--variants takes a comma list of {', '.join(PHRASINGS)}; --n >= 1")
    try:
        (length,) = parse_lengths(args.length)
    except ValueError as e:
        p.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(args).to(device).eval()
    model.set_step_runner(None)
    rows = []
    for v in variants:
        rows.append(probe_variant(model, v, length, args.n, args.seed, device))
        log(f"{v}: " + ", ".join(f"layer {k} share {c['share_above']}" for k, c in rows[-1]["layers"].items()))
    md = markdown(rows, model.config.l0_slots)
    print(md)
    if args.out:
        res = common.provenance("needle_probe", argv, device, script="needle_probe_importance") | {
            "kind": "importance", "model_config": model.config.to_dict(),
            "settings": {"length": length, "n": args.n, "seed": args.seed, "variants": variants},
            "rows": rows, "markdown": md}
        out = common.save_to(args.out, f"needle_probe_importance_{common.device_tag(device)}", res,
                             "# Needle importance against its filler (bench/needle_probe_importance.py)")
        log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
