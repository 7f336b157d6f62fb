"""The tables, targets and plots of a ``bench/model_speed.py`` result: training, prefill and
decode of the DNC against the Transformer baseline per preset and length, the issue's speed
targets, and throughput / memory / latency / state-size plots against context length.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common import fmt_num, length_axis, md_table, pyplot, save_png, targets_section

TITLE = "DNC vs the Transformer baseline: speed and memory (`bench/model_speed.py`)"
WHAT = ("Training throughput (forward + backward + AdamW, tokens/s, MFU, peak memory), prefill "
        "throughput, median decode latency per token after a given context, and the size of the "
        "DNC's memory bank against the baseline's KV cache at the same context, for each preset, "
        "in one process on one device. The baseline is the same code with memory off and one "
        "segment spanning the input.")

TARGETS: list[dict[str, Any]] = [
    # name, how it is computed from the rows, threshold (issue targets, quoted in the README)
    {"name": "bank at 128k <= 1/50 of the KV cache", "kind": "kv_over_bank", "length": 131072, "min": 50.0},
    {"name": "prefill rate at 1M within 10% of 32k", "kind": "prefill_keep", "lo": 32768, "hi": 1048576,
     "min": 0.9},
    {"name": "decode latency flat (<= 10% growth) 4k -> 1M", "kind": "decode_growth", "lo": 4096,
     "hi": 1048576, "max": 1.10},
    {"name": "2k training >= 0.9x baseline", "kind": "train_ratio", "length": 2048, "min": 0.9},
    {"name": "8k training >= 1.5x baseline", "kind": "train_ratio", "length": 8192, "min": 1.5},
    {"name": "128k prefill >= 3x baseline", "kind": "prefill_ratio", "length": 131072, "min": 3.0},
]


def _row(rows, kind, model, preset, length) -> dict:
    return next((r for r in rows if r.get("kind") == kind and r.get("model") == model
                 and r.get("preset") == preset and r.get("length") == length), {})


def targets(res: dict) -> list[dict[str, Any]]:
    """One entry per (target, preset) with ``measured`` (a number or None) and ``met``."""
    rows = res.get("rows", [])
    out = []
    for pr in dict.fromkeys(r["preset"] for r in rows):
        for t in TARGETS:
            v = None
            if t["kind"] == "kv_over_bank":
                bank = _row(rows, "infer", "dnc", pr, t["length"]).get("bank_bytes")
                kv = _row(rows, "infer", "baseline", pr, t["length"]).get("kv_cache_bytes")
                v = kv / bank if kv and bank else None
                shown = None if v is None else f"1/{v:.0f}"
            elif t["kind"] == "prefill_keep":
                lo = _row(rows, "infer", "dnc", pr, t["lo"]).get("prefill_tokens_per_s")
                hi = _row(rows, "infer", "dnc", pr, t["hi"]).get("prefill_tokens_per_s")
                v = hi / lo if lo and hi else None
                shown = None if v is None else f"{100 * (v - 1):+.1f}%"
            elif t["kind"] == "decode_growth":
                lo = _row(rows, "infer", "dnc", pr, t["lo"]).get("decode_ms_median")
                hi = _row(rows, "infer", "dnc", pr, t["hi"]).get("decode_ms_median")
                v = hi / lo if lo and hi else None
                shown = None if v is None else f"{100 * (v - 1):+.1f}%"
            else:
                kind, key = ("train", "tokens_per_s") if t["kind"] == "train_ratio" else ("infer", "prefill_tokens_per_s")
                d = _row(rows, kind, "dnc", pr, t["length"]).get(key)
                b = _row(rows, kind, "baseline", pr, t["length"]).get(key)
                v = d / b if d and b else None
                shown = None if v is None else f"{v:.2f}x"
            if v is None:
                continue  # this run did not measure it (e.g. a training-only run)
            met = v >= t["min"] if "min" in t else v <= t["max"]
            out.append({"target": t["name"], "preset": pr, "measured": shown, "value": v, "met": met})
    return out


def tables(res: dict) -> list[str]:
    rows = res.get("rows", [])
    lines: list[str] = []
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    train = []
    for pr in presets:
        for L in sorted({r["length"] for r in rows if r["kind"] == "train" and r["preset"] == pr}):
            d, b = _row(rows, "train", "dnc", pr, L), _row(rows, "train", "baseline", pr, L)
            ratio = d["tokens_per_s"] / b["tokens_per_s"] if d.get("tokens_per_s") and b.get("tokens_per_s") else None
            train.append([pr, f"{L:,}", fmt_num(d.get("tokens_per_s")), fmt_num(b.get("tokens_per_s")),
                          fmt_num(ratio, "{:.2f}x"), fmt_num(d.get("mfu"), "{:.1%}"), fmt_num(b.get("mfu"), "{:.1%}"),
                          "OOM" if d.get("oom") else fmt_num(d.get("peak_mb")),
                          "OOM" if b.get("oom") else fmt_num(b.get("peak_mb"))])
    if train:
        lines += ["Training (forward + backward + AdamW):", ""]
        lines += md_table(["preset", "length", "DNC train tok/s", "base train tok/s", "ratio", "DNC MFU", "base MFU",
                           "DNC peak MB", "base peak MB"], train, "lr" + "r" * 7) + [""]
    infer = []
    for pr in presets:
        for L in sorted({r["length"] for r in rows if r["kind"] == "infer" and r["preset"] == pr}):
            d, b = _row(rows, "infer", "dnc", pr, L), _row(rows, "infer", "baseline", pr, L)
            ratio = d["prefill_tokens_per_s"] / b["prefill_tokens_per_s"] \
                if d.get("prefill_tokens_per_s") and b.get("prefill_tokens_per_s") else None
            bank, kv = d.get("bank_bytes"), b.get("kv_cache_bytes")
            infer.append([pr, f"{L:,}", fmt_num(d.get("prefill_tokens_per_s")), fmt_num(b.get("prefill_tokens_per_s")),
                          fmt_num(ratio, "{:.2f}x"), fmt_num(d.get("decode_ms_median"), "{:.2f}"),
                          fmt_num(b.get("decode_ms_median"), "{:.2f}"),
                          fmt_num(bank / 2**20 if bank else None, "{:.1f}"), fmt_num(kv / 2**20 if kv else None, "{:.1f}"),
                          fmt_num(kv / bank if kv and bank else None, "{:.0f}x")])
    if infer:
        lines += ["Inference (batch 1; `—` = not measured, e.g. the baseline above its maximum context):", ""]
        lines += md_table(["preset", "context", "DNC prefill tok/s", "base prefill tok/s", "ratio", "DNC decode ms",
                           "base decode ms", "DNC bank MB", "base KV MB", "KV/bank"], infer, "lr" + "r" * 8) + [""]
    return lines


def plots(res: dict, folder: Path, stem: str) -> list[tuple[str, Path]]:
    """Throughput, peak memory, decode latency and state bytes vs context (DNC solid, baseline
    dashed, one colour per preset). Returns ``[(caption, path)]``."""
    plt = pyplot()
    if plt is None:
        return []
    rows = res.get("rows", [])
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    colors = {p: f"C{i}" for i, p in enumerate(presets)}

    def series(kind, model, preset, key):
        pts = sorted((r["length"], r[key]) for r in rows if r["kind"] == kind and r["model"] == model
                     and r["preset"] == preset and isinstance(r.get(key), (int, float)))
        return [p[0] for p in pts], [p[1] for p in pts]

    def panel(ax, kind, key, scale=1.0, ylabel="", title=""):
        drawn, xs_all = False, []
        for pr in presets:
            for model, style in (("dnc", "-"), ("baseline", "--")):
                xs, ys = series(kind, model, pr, key)
                if xs:
                    ax.plot(xs, [y * scale for y in ys], style, marker="o", ms=3, color=colors[pr],
                            label=f"{pr} {'DNC' if model == 'dnc' else 'baseline'}")
                    drawn, xs_all = True, xs_all + xs
        if drawn:
            length_axis(ax, xs_all)
            ax.set_yscale("log")
            ax.set_ylabel(ylabel)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("context length (tokens)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, handlelength=3)
        return drawn

    out = []
    specs = [
        ("throughput", "Throughput vs context length",
         [("train", "tokens_per_s", 1.0, "tokens/s", "training"),
          ("infer", "prefill_tokens_per_s", 1.0, "tokens/s", "prefill")]),
        ("memory", "Peak memory vs context length",
         [("train", "peak_mb", 1.0, "peak MB", "training"), ("infer", "peak_mb", 1.0, "peak MB", "prefill")]),
        ("decode", "Decode latency per token vs context length",
         [("infer", "decode_ms_median", 1.0, "ms / token (median)", "decode")]),
    ]
    for name, caption, panels in specs:
        present = [p for p in panels if any(r["kind"] == p[0] and isinstance(r.get(p[1]), (int, float)) for r in rows)]
        if not present:
            continue
        fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 3.2), squeeze=False)
        for ax, (kind, key, scale, ylabel, title) in zip(axes[0], present):
            panel(ax, kind, key, scale, ylabel, title)
        fig.tight_layout()
        out.append((caption, save_png(fig, folder / f"{stem}_{name}.png")))
    # DNC bank vs baseline KV cache (bytes at the same context)
    if any(isinstance(r.get("bank_bytes"), (int, float)) for r in rows):
        fig, ax = plt.subplots(figsize=(4.6, 3.2))
        xs_all = []
        for pr in presets:
            for model, key, style, label in (("dnc", "bank_bytes", "-", "DNC bank"),
                                             ("baseline", "kv_cache_bytes", "--", "baseline KV")):
                xs, ys = series("infer", model, pr, key)
                if xs:
                    ax.plot(xs, [y / 2**20 for y in ys], style, marker="o", ms=3, color=colors[pr], label=f"{pr} {label}")
                    xs_all += xs
        length_axis(ax, xs_all)
        ax.set_yscale("log")
        ax.set_ylabel("MB")
        ax.set_xlabel("context length (tokens)")
        ax.set_title("state bytes: DNC bank vs baseline KV cache", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, handlelength=3)
        fig.tight_layout()
        out.append(("DNC bank vs baseline KV-cache bytes", save_png(fig, folder / f"{stem}_state_bytes.png")))
    return out


def render(res: dict) -> str:
    """The body of a model_speed result's entry in ``bench/README.md``: device, tables, targets."""
    lines = [f"Device: {res.get('device')}; torch {res.get('torch')}; dtype {res.get('dtype')}; "
             f"commit {res.get('commit')}", ""] + tables(res)
    return "\n".join(lines + targets_section(targets(res)))
