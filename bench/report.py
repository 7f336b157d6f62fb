"""Builds ``bench/README.md`` from every ``bench/results/*.json``: per benchmark what it measures,
the command that produced it, device / torch / commit, the tables, the target verdicts and plots
(PNG, under ``bench/results/plots/``).

    python bench/report.py                                   # bench/results -> bench/README.md
    python bench/report.py --results /tmp/res --readme /tmp/res/README.md

The command shown for a result is, in this order: the ``command`` stored in the JSON (newer
scripts store it); the command documented in the top-level ``README.md`` benchmark section for
that script, when its flags agree with the arguments stored in the JSON; otherwise a command
rebuilt from the stored arguments. Regenerating from the same JSON files gives the same README
and the same PNGs (no timestamps; PNG metadata is stripped; stale PNGs in the plot folder are
removed).

This module needs no torch; ``bench/long_context.py`` imports its long-context tables and plots.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Iterable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def git_commit() -> str | None:
    """The commit the benchmarked code is at: ``$DNC_COMMIT`` where the tree travels without
    ``.git`` (the GPU machine), else ``git rev-parse --short HEAD``; None when neither is known.
    Every benchmark script records it with its results."""
    import subprocess

    if os.environ.get("DNC_COMMIT"):
        return os.environ["DNC_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                       stderr=subprocess.DEVNULL).strip() or None
    except Exception:
        return None

def parse_pairs(flag: str, pairs: Iterable[str]) -> dict[str, Any]:
    """Repeated ``KEY=VALUE`` command-line values (each value read as YAML) -> dict, for the
    benchmark scripts' config overrides; ValueError naming ``flag`` for a malformed one."""
    import yaml

    out: dict[str, Any] = {}
    for kv in pairs:
        if "=" not in kv:
            raise ValueError(f"{flag} takes KEY=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


# ==============================================================================================
# Small formatting helpers
# ==============================================================================================


def fmt_len(n: int | float | None) -> str:
    """Token counts the way the CLIs take them: 1048576 -> ``1M``, 4096 -> ``4k``, 500 -> ``500``."""
    if n is None:
        return "—"
    n = int(n)
    if n and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n and n % 1024 == 0:
        return f"{n >> 10}k"
    return str(n)


def fmt_num(v: Any, spec: str = "{:,.0f}") -> str:
    """A number with ``spec``; ``—`` for missing / non-finite values, ``OOM`` for ``"oom"``."""
    if v is None:
        return "—"
    if v == "oom":
        return "OOM"
    if isinstance(v, float) and not math.isfinite(v):
        return "—"
    return spec.format(v)


def fmt_pct(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{100.0 * v:.{digits}f}%"


def md_table(header: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    """Markdown table lines; ``align`` is one character per column (``l`` or ``r``)."""
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---" if a == "l" else "---:" for a in align]
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(sep) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def verdict_word(met: bool | None) -> str:
    return "not measured" if met is None else ("met" if met else "missed")


# ==============================================================================================
# Plot helpers (matplotlib is optional: without it the README has tables only)
# ==============================================================================================


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a message) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[report] matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return None
    return plt


def _save(fig, path: Path) -> Path:
    """PNG at dpi 100 without metadata (no version/date), so the bytes depend only on the data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _len_axis(ax, lengths: Iterable[int]) -> None:
    ls = sorted(set(int(x) for x in lengths))
    ax.set_xscale("log", base=2)
    ax.set_xticks(ls, [fmt_len(x) for x in ls])
    ax.minorticks_off()


# ==============================================================================================
# model_speed (bench/model_speed.py)
# ==============================================================================================
MODEL_SPEED_TARGETS: list[dict[str, Any]] = [
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


def _ms_get(rows, kind, model, preset, length) -> dict:
    return next((r for r in rows if r.get("kind") == kind and r.get("model") == model
                 and r.get("preset") == preset and r.get("length") == length), {})


def model_speed_targets(res: dict) -> list[dict[str, Any]]:
    """One entry per (target, preset) with ``measured`` (a number or None) and ``met``."""
    rows = res.get("rows", [])
    out = []
    for pr in dict.fromkeys(r["preset"] for r in rows):
        for t in MODEL_SPEED_TARGETS:
            v = None
            if t["kind"] == "kv_over_bank":
                bank = _ms_get(rows, "infer", "dnc", pr, t["length"]).get("bank_bytes")
                kv = _ms_get(rows, "infer", "baseline", pr, t["length"]).get("kv_cache_bytes")
                v = kv / bank if kv and bank else None
                shown = None if v is None else f"1/{v:.0f}"
            elif t["kind"] == "prefill_keep":
                lo = _ms_get(rows, "infer", "dnc", pr, t["lo"]).get("prefill_tokens_per_s")
                hi = _ms_get(rows, "infer", "dnc", pr, t["hi"]).get("prefill_tokens_per_s")
                v = hi / lo if lo and hi else None
                shown = None if v is None else f"{100 * (v - 1):+.1f}%"
            elif t["kind"] == "decode_growth":
                lo = _ms_get(rows, "infer", "dnc", pr, t["lo"]).get("decode_ms_median")
                hi = _ms_get(rows, "infer", "dnc", pr, t["hi"]).get("decode_ms_median")
                v = hi / lo if lo and hi else None
                shown = None if v is None else f"{100 * (v - 1):+.1f}%"
            else:
                kind, key = ("train", "tokens_per_s") if t["kind"] == "train_ratio" else ("infer", "prefill_tokens_per_s")
                d = _ms_get(rows, kind, "dnc", pr, t["length"]).get(key)
                b = _ms_get(rows, kind, "baseline", pr, t["length"]).get(key)
                v = d / b if d and b else None
                shown = None if v is None else f"{v:.2f}x"
            if v is None:
                continue  # this run did not measure it (e.g. a training-only run)
            met = v >= t["min"] if "min" in t else v <= t["max"]
            out.append({"target": t["name"], "preset": pr, "measured": shown, "value": v, "met": met})
    return out


def model_speed_tables(res: dict) -> list[str]:
    rows = res.get("rows", [])
    lines: list[str] = []
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    train = []
    for pr in presets:
        for L in sorted({r["length"] for r in rows if r["kind"] == "train" and r["preset"] == pr}):
            d, b = _ms_get(rows, "train", "dnc", pr, L), _ms_get(rows, "train", "baseline", pr, L)
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
            d, b = _ms_get(rows, "infer", "dnc", pr, L), _ms_get(rows, "infer", "baseline", pr, L)
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


def model_speed_plots(res: dict, plots: Path, stem: str) -> list[tuple[str, Path]]:
    """Throughput, peak memory, decode latency and state bytes vs context (DNC solid, baseline
    dashed, one colour per preset). Returns ``[(caption, path)]``."""
    plt = _pyplot()
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
            _len_axis(ax, xs_all)
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
        out.append((caption, _save(fig, plots / f"{stem}_{name}.png")))
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
        _len_axis(ax, xs_all)
        ax.set_yscale("log")
        ax.set_ylabel("MB")
        ax.set_xlabel("context length (tokens)")
        ax.set_title("state bytes: DNC bank vs baseline KV cache", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, handlelength=3)
        fig.tight_layout()
        out.append(("DNC bank vs baseline KV-cache bytes", _save(fig, plots / f"{stem}_state_bytes.png")))
    return out


# ==============================================================================================
# train_scaling (bench/train_scaling.py)
# ==============================================================================================
def train_scaling_tables(res: dict) -> list[str]:
    results = res.get("results", {})
    derived = res.get("derived", {})
    rows = []
    for mode, r in results.items():
        if "error" in r:
            msg = str(r["error"]).splitlines()[0][:90]
            rows.append([mode, "—", "—", "—", "—", "—", "—", "—", f"failed: {msg}"])
            continue
        sc = derived.get(f"scaling/{mode}")
        rows.append([mode, str(r.get("world", "—")), fmt_num(r.get("tokens_per_s")),
                     fmt_num(r.get("tokens_per_s_per_gpu")),
                     fmt_num(r.get("step_ms"), "{:.1f}"), fmt_num(r.get("mfu"), "{:.1%}"),
                     fmt_num(sc, "{:.2f}x") if sc else "-", fmt_num(r.get("peak_mem_gb"), "{:.1f}"), ""])
    lines = md_table(["mode", "GPUs", "tokens/s", "tokens/s/GPU", "step ms", "MFU", "scaling vs 1 GPU", "peak GiB",
                      "note"], rows, "l" + "r" * 7 + "l") + [""]
    ratios = {k: v for k, v in derived.items() if not k.startswith("scaling/")}
    if ratios:
        lines += ["Derived: " + ", ".join(f"{k} = {v:.3f}" for k, v in sorted(ratios.items())), ""]
    return lines


def train_scaling_targets(res: dict) -> list[dict[str, Any]]:
    """The verdicts the script stored, with the measured value looked up by the target's wording
    (``single MFU ...``, ``<mode> 2-GPU scaling ...``, ``Ray/torchrun <strategy> ...``)."""
    results, derived = res.get("results", {}), res.get("derived", {})
    out = []
    for name, met in res.get("targets", {}).items():
        shown = None
        if "MFU" in name:
            v = results.get(name.split()[0], {}).get("mfu")
            shown = fmt_num(v, "{:.1%}") if v is not None else None
        elif "scaling" in name:
            v = derived.get(f"scaling/{name.split()[0]}")
            shown = fmt_num(v, "{:.2f}x") if v is not None else None
        elif name.startswith("Ray/torchrun"):
            v = derived.get(f"ray_over_torchrun/{name.split()[1]}")
            shown = fmt_num(v, "{:.3f}") if v is not None else None
        out.append({"target": name, "measured": shown, "met": bool(met) if met is not None else None})
    return out


# ==============================================================================================
# serve_load (bench/serve_load.py)
# ==============================================================================================
def serve_load_tables(res: dict) -> list[str]:
    if res.get("markdown"):
        return [res["markdown"].rstrip("\n"), ""]  # the script's own table, as it printed it
    rows = [[r.get("mode", "?"), str(r.get("clients", "?")), fmt_num(r.get("requests_per_s"), "{:.2f}"),
             fmt_num(r.get("tokens_per_s"), "{:.1f}"), fmt_num(r.get("latency_ms_p50"), "{:.1f}"),
             fmt_num(r.get("latency_ms_p99"), "{:.1f}")] for r in res.get("results", [])]
    return md_table(["mode", "clients", "req/s", "tok/s", "p50 ms", "p99 ms"], rows) + [""]


# ==============================================================================================
# segment_transfer (bench/segment_transfer.py)
# ==============================================================================================
def segment_transfer_tables(res: dict) -> list[str]:
    """Exact match per task x sample length, one row per segment length the checkpoint ran at."""
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
    return [note, ""] + md_table(header, rows) + [""]


# ==============================================================================================
# op_counts (bench/profile_model.py --count-ops)
# ==============================================================================================
def op_counts_tables(res: dict) -> list[str]:
    """Kernel-launching ops per segment and host syncs per (model, measurement), one column pair
    per label the script was run with (e.g. before / after an optimisation)."""
    labels = [k for k, v in res.items() if isinstance(v, dict) and isinstance(v.get("modes"), dict)]
    if not labels:
        return [f"No `modes` in this file (top-level keys: {', '.join(sorted(res))}).", ""]
    keys = list(dict.fromkeys((m, x) for lb in labels for m, xs in res[lb]["modes"].items() for x in xs))
    header = ["model", "measurement"]
    for lb in labels:
        header += [f"{lb}: kernel ops / segment", f"{lb}: host syncs"]
    if len(labels) > 1:
        header.append(f"{labels[-1]} / {labels[0]}")
    rows = []
    for m, x in keys:
        r = [m, x]
        vals = []
        for lb in labels:
            d = res[lb]["modes"].get(m, {}).get(x, {})
            vals.append(d.get("kernel_ops_per_segment"))
            r += [fmt_num(d.get("kernel_ops_per_segment"), "{:,.1f}"), fmt_num(d.get("host_syncs"))]
        if len(labels) > 1:
            r.append(fmt_num(vals[-1] / vals[0] if vals[0] and vals[-1] else None, "{:.2f}x"))
        rows.append(r)
    cfg = res[labels[0]].get("config", {})
    lines = [f"Counted on CPU with the preset shrunk ({', '.join(f'{k}={v}' for k, v in cfg.items())}); "
             "the per-segment op structure is that of the full-size model.", ""]
    return lines + md_table(header, rows, "ll" + "r" * (len(header) - 2)) + [""]


def op_counts_command(res: dict) -> tuple[str, str] | None:
    """The script's documented ``--count-ops`` example, once per label in the file."""
    src = (HERE / "profile_model.py").read_text(encoding="utf-8") if (HERE / "profile_model.py").exists() else ""
    ex = re.search(r"^\s*(python bench/profile_model\.py[^\n]*--count-ops[^\n]*)", src, flags=re.M)
    labels = [k for k, v in res.items() if isinstance(v, dict) and "modes" in v]
    if not ex or not labels:
        return None
    cmds = [re.sub(r"--label \S+", f"--label {lb}", ex.group(1).strip()) for lb in labels]
    return "\n".join(cmds), "the example in bench/profile_model.py, one run per label"


# ==============================================================================================
# long_context (bench/long_context.py): summary, targets, tables, plots
# ==============================================================================================
MODELS = ("dnc", "baseline")
MODEL_LABEL = {"dnc": "DNC", "baseline": "baseline"}
RECALL_SUITES = ("relational_2hop", "kv_retrieval")

LONG_CONTEXT_TARGETS = {
    "passkey": 0.99,          # exact match at every length up to 1M tokens
    "passkey_max_len": 1 << 20,
    "two_hop": 0.90,          # two-hop relational recall at 16k
    "two_hop_len": 16384,
    "mqar": 0.99,             # per-query exact match (the usual MQAR metric)
    "bpb_ratio": 1.02,        # DNC bits per byte <= 1.02 x baseline
}


def is_base_cell(c: dict) -> bool:
    """A cell of the suites' original wording with markers (results written before the phrasing
    and marker dimensions existed have only these)."""
    return c.get("phrasing", "template") == "template" and c.get("markers", True) is True


def _cells(res: dict, suite: str, model: str | None = None, *, every_variant: bool = False) -> list[dict]:
    """Cells of ``suite`` (and ``model``); only the original wording with markers unless
    ``every_variant`` (the headline tables, targets and plots are about that one)."""
    return [c for c in res.get("cells", []) if c.get("suite") == suite and (model is None or c.get("model") == model)
            and (every_variant or is_base_cell(c))]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval ``(low, high)`` of ``k`` successes in ``n`` trials (``n >= 1``)."""
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def fmt_count(k: int | None, n: int | None) -> str:
    """``"62.5% (25/40) [47-76%]"``: accuracy, counts, and the Wilson 95% interval when n < 50."""
    if k is None or not n:
        return "—"
    out = f"{100.0 * k / n:.1f}% ({k}/{n})"
    if n < 50:
        lo, hi = wilson(k, n)
        out += f" [{100 * lo:.0f}–{100 * hi:.0f}%]"
    return out


def passkey_by_length(res: dict, model: str) -> dict[int, dict[str, Any]]:
    """``{length: {"acc": mean over depths or None, "complete": every depth evaluated}}``."""
    out: dict[int, dict[str, Any]] = {}
    depths = res.get("config", {}).get("depths") or sorted({c["depth"] for c in _cells(res, "passkey")})
    for L in sorted({c["length"] for c in _cells(res, "passkey", model)}):
        cs = [c for c in _cells(res, "passkey", model) if c["length"] == L]
        ok = [c for c in cs if c.get("acc") is not None]
        n = sum(c["n"] for c in ok)
        out[L] = {"acc": sum(c["correct"] for c in ok) / n if n else None,
                  "complete": len(ok) == len(depths) and len(cs) == len(depths)}
    return out


def long_context_targets(res: dict) -> list[dict[str, Any]]:
    """The issue-5 targets from the cells: ``[{"target", "measured", "met"}]`` (met None = not measured)."""
    T = LONG_CONTEXT_TARGETS
    out = []
    pk = passkey_by_length(res, "dnc")
    if pk:
        accs = {L: v["acc"] for L, v in pk.items()}
        failing = [L for L, a in accs.items() if a is not None and a < T["passkey"]]
        reached = max(accs) >= T["passkey_max_len"] and all(v["complete"] for v in pk.values())
        met = False if failing else (True if reached else None)
        lo = min((a for a in accs.values() if a is not None), default=None)
        measured = f"min {fmt_pct(lo)} over {fmt_len(min(accs))}..{fmt_len(max(accs))}"
        if failing:
            measured += f"; below at {', '.join(fmt_len(L) for L in failing)}"
    else:
        met, measured = None, "not run"
    out.append({"target": f"passkey >= {T['passkey']:.0%} at every length up to {fmt_len(T['passkey_max_len'])}",
                "measured": measured, "met": met})

    c = next((c for c in _cells(res, "relational_2hop", "dnc") if c["length"] == T["two_hop_len"]), None)
    a = c.get("acc") if c else None
    out.append({"target": f"two-hop recall >= {T['two_hop']:.0%} at {fmt_len(T['two_hop_len'])}",
                "measured": fmt_pct(a) if a is not None else "not run at this length",
                "met": None if a is None else a >= T["two_hop"]})

    c = next(iter(_cells(res, "mqar", "dnc")), None)
    a = c.get("query_acc") if c else None
    out.append({"target": f"MQAR >= {T['mqar']:.0%} (per-query exact match)",
                "measured": "not run" if a is None
                else f"{fmt_pct(a)} per query, {fmt_pct(c.get('sample_acc'))} all-correct",
                "met": None if a is None else a >= T["mqar"]})

    d = next((c.get("bpb") for c in _cells(res, "bpb", "dnc")), None)
    b = next((c.get("bpb") for c in _cells(res, "bpb", "baseline")), None)
    ratio = d / b if d and b else None
    out.append({"target": f"DNC bits per byte within {T['bpb_ratio'] - 1:.0%} of the baseline",
                "measured": "not measured" if ratio is None else f"{d:.3f} vs {b:.3f} ({ratio:.3f}x)",
                "met": None if ratio is None else ratio <= T["bpb_ratio"]})
    return out


def _summary_line(res: dict) -> str:
    env = res.get("env", {})
    dirty = f" (+ uncommitted changes to {len(env['uncommitted'])} files)" if env.get("uncommitted") else ""
    # a given checkpoint brings its own model: --preset (recorded either way) did not choose it
    ckpt = res.get("args", {}).get("checkpoint")
    model = f"checkpoint `{ckpt}`" if ckpt else f"preset `{res.get('config', {}).get('preset', '?')}`"
    return (f"Device: {env.get('device', '?')}; torch {env.get('torch', '?')}; commit {env.get('commit') or 'unknown'}"
            f"{dirty}; {model}; status: {res.get('status', '?')}")


def long_context_tables(res: dict, heading: str = "###") -> list[str]:
    """Markdown for one long_context result (training, passkey, recall, MQAR, bpb, targets)."""
    cfg = res.get("config", {})
    L: list[str] = []
    models = [m for m in MODELS if m in res.get("models", {})]

    # training
    trows, stage_rows = [], []
    for m in models:
        info = res["models"][m]
        t = info.get("training") or {}
        trows.append([MODEL_LABEL[m], fmt_num(info.get("params")), fmt_num(t.get("steps")),
                      fmt_num(t.get("train_minutes"), "{:.1f}"), fmt_num(t.get("wall_minutes"), "{:.1f}"),
                      fmt_num(t.get("tokens_seen")), str(t.get("final_stage", "—")),
                      "given" if info.get("checkpoint_given") else "trained here"])
        for s in t.get("stages", []):
            accs = ", ".join(f"{k} {fmt_pct(v, 0)}" for k, v in sorted(s.get("last_acc", {}).items()))
            stage_rows.append([MODEL_LABEL[m], s["stage"], str(s["evals"]), str(s["last_step"]),
                               fmt_pct(s.get("last_mean")), fmt_pct(s.get("best_mean")), accs or "—"])
    if trows:
        L += [f"{heading} Training", ""]
        L += md_table(["model", "params", "steps", "train min", "wall min", "tokens seen", "final stage", "weights"],
                      trows, "lrrrrrll") + [""]
        if stage_rows:
            L += ["Curriculum evaluations during training (exact match on the stage's own tasks and lengths; "
                  "last and best mean per stage):", ""]
            L += md_table(["model", "stage", "evals", "last step", "last mean", "best mean", "last per task"],
                          stage_rows, "llrrrrl") + [""]
        notes = res.get("notes") or []
        L += [f"- {n}" for n in notes] + ([""] if notes else [])

    # passkey
    pcells = _cells(res, "passkey")
    if pcells:
        lengths = sorted({c["length"] for c in pcells})
        depths = sorted({c["depth"] for c in pcells})
        L += [f"{heading} Passkey retrieval", "",
              f"Exact match (greedy) per depth x length, {cfg.get('n', '?')} samples per cell, "
              f"{cfg.get('decoys', 0)} decoys. `—` = not run (baseline above {fmt_len(cfg.get('baseline_max_len'))} "
              f"tokens), `OOM` = out of memory.", ""]
        for m in models:
            rows = []
            for d in depths:
                r = [f"{d:g}"]
                for Ln in lengths:
                    c = next((c for c in pcells if c["model"] == m and c["length"] == Ln and c["depth"] == d), None)
                    r.append("" if c is None else ("OOM" if c.get("status") == "oom" else fmt_pct(c.get("acc"), 0)))
                rows.append(r)
            bl = passkey_by_length(res, m)
            rows.append(["**all**"] + [fmt_pct(bl[Ln]["acc"]) if Ln in bl else "" for Ln in lengths])
            L += [f"{MODEL_LABEL[m]}:", ""]
            L += md_table(["depth"] + [fmt_len(x) for x in lengths], rows) + [""]
            cross = [c for c in pcells if c["model"] == m and "boundary_n" in c]
            n_cross = sum(c["boundary_n"] for c in cross)
            if n_cross:
                right = sum(c["boundary_correct"] for c in cross)
                rest_n = sum(c["n"] for c in cross) - n_cross
                rest = sum(c["correct"] for c in cross) - right
                L += [f"Needles whose digits cross a segment boundary: {right}/{n_cross} ({fmt_pct(right / n_cross)}); "
                      f"the others: {rest}/{rest_n}" + (f" ({fmt_pct(rest / rest_n)})." if rest_n else "."), ""]

    # recall
    rcells = [c for s in RECALL_SUITES for c in _cells(res, s)]
    if rcells:
        lengths = sorted({c["length"] for c in rcells})
        rows = []
        for s in RECALL_SUITES:
            for m in models:
                cs = {c["length"]: c for c in _cells(res, s, m)}
                if cs:
                    rows.append([s, MODEL_LABEL[m]] + [
                        ("OOM" if cs[x].get("status") == "oom" else fmt_pct(cs[x].get("acc"))) if x in cs else ""
                        for x in lengths])
        L += [f"{heading} Recall", "",
              f"Exact match, {cfg.get('n_recall', '?')} samples per cell, difficulty {cfg.get('recall_difficulty', '?')} "
              f"(relational: 2 hops).", ""]
        L += md_table(["task", "model"] + [fmt_len(x) for x in lengths], rows, "ll" + "r" * len(lengths)) + [""]

    # mqar
    mcells = _cells(res, "mqar")
    if mcells:
        rows = [[MODEL_LABEL[c["model"]], fmt_len(c["length"]), str(c.get("n_pairs")), str(c.get("n")),
                 "OOM" if c.get("status") == "oom" else fmt_pct(c.get("query_acc")),
                 "OOM" if c.get("status") == "oom" else fmt_pct(c.get("sample_acc"))] for c in mcells]
        L += [f"{heading} MQAR", ""]
        L += md_table(["model", "length", "pairs", "samples", "per-query exact match", "all queries right"], rows,
                      "lrrrrr") + [""]
        note = next((c.get("note") for c in mcells if c.get("note")), None)
        if note:
            L += [f"- {note}", ""]

    # bits per byte
    bcells = _cells(res, "bpb")
    if bcells:
        rows = [[MODEL_LABEL[c["model"]], fmt_len(c.get("context")), fmt_num(c.get("bytes")),
                 "OOM" if c.get("status") == "oom" else fmt_num(c.get("bpb"), "{:.4f}")] for c in bcells]
        L += [f"{heading} Bits per byte (held-out Python stdlib)", ""]
        L += md_table(["model", "context", "bytes", "bits/byte"], rows) + [""]

    L += generalisation_table(res, models, heading)

    # targets
    targets = res.get("targets") or long_context_targets(res)
    L += [f"{heading} Targets", ""]
    L += md_table(["target", "measured (DNC)", "verdict"],
                  [[t["target"], t["measured"], verdict_word(t["met"])] for t in targets], "lll") + [""]
    return L


GENERALISATION_SUITES = ("passkey",) + RECALL_SUITES


def generalisation_table(res: dict, models: list[str], heading: str = "###") -> list[str]:
    """Every suite by wording (phrasing x markers x filler) and length, with sample counts; empty
    when the run had only the original wording (``--phrasings``/``--markers`` not widened)."""
    cells = [c for s in GENERALISATION_SUITES for c in _cells(res, s, every_variant=True)]
    mq = _cells(res, "mqar", every_variant=True)
    if all(is_base_cell(c) for c in cells + mq):
        return []
    lengths = sorted({c["length"] for c in cells})
    keys = list(dict.fromkeys((c["suite"], c["model"], c.get("phrasing", "template"), c.get("markers", True),
                               c.get("filler", "words")) for c in cells))
    keys = [k for k in keys if k[1] in models]
    rows = []
    for suite, m, ph, mk, fl in keys:
        r = [suite, MODEL_LABEL[m], ph, "on" if mk else "off", fl]
        for Ln in lengths:
            cs = [c for c in cells if (c["suite"], c["model"], c.get("phrasing", "template"), c.get("markers", True),
                                       c.get("filler", "words"), c["length"]) == (suite, m, ph, mk, fl, Ln)]
            ok = [c for c in cs if c.get("acc") is not None]
            if not cs:
                r.append("")
            elif not ok:
                r.append("OOM" if any(c.get("status") == "oom" for c in cs) else "—")
            else:
                r.append(fmt_count(sum(c["correct"] for c in ok), sum(c["n"] for c in ok)))
        rows.append(r)
    L = [f"{heading} Generalisation: held-out phrasings and filler, no markers", "",
         "Exact match per wording: `template` = the generators' original wording (the tables above), `train` = "
         "phrasings and stdlib filler that training draws, `heldout` = phrasings (subjects, fact and question "
         "frames) and stdlib modules that training never sees; markers = the `<needle>`/`<key>`/`<query>` tokens. "
         "Passkey pooled over depths. Correct/samples in brackets; 95% Wilson interval where a cell has fewer than "
         "50 samples.", ""]
    if rows:
        L += md_table(["suite", "model", "phrasing", "markers", "filler"] + [fmt_len(x) for x in lengths], rows,
                      "lllll" + "r" * len(lengths)) + [""]
    mrows = [[MODEL_LABEL[c["model"]], c.get("phrasing", "template"), "on" if c.get("markers", True) else "off",
              c.get("filler", "words"), fmt_len(c["length"]), str(c.get("n_pairs")),
              "OOM" if c.get("acc") is None else fmt_count(c["query_correct"], c["queries"]),
              "OOM" if c.get("acc") is None else fmt_count(c["correct"], c["n"])]
             for c in mq if c["model"] in models]
    if mrows:
        L += ["MQAR by wording (worded pairs are longer, so their samples are too; each query is one trial):", ""]
        L += md_table(["model", "phrasing", "markers", "filler", "length", "pairs", "per query", "all queries right"],
                      mrows, "llllrrrr") + [""]
    return L


def long_context_markdown(res: dict) -> str:
    """The ``.md`` file ``bench/long_context.py`` writes next to its JSON."""
    lines = [f"# Long-context accuracy ({res.get('tag', '')})", "", _summary_line(res), "",
             "```bash", res.get("command", ""), "```", ""]
    lines += long_context_tables(res, "##")
    return "\n".join(lines).rstrip("\n") + "\n"


def long_context_plots(res: dict, plots: Path, stem: str) -> list[tuple[str, Path]]:
    """Passkey heatmap (depth x length, one panel per model) and accuracy vs length lines."""
    plt = _pyplot()
    if plt is None:
        return []
    import numpy as np

    out = []
    pcells = _cells(res, "passkey")
    models = [m for m in MODELS if _cells(res, "passkey", m)]
    if pcells and models:
        lengths = sorted({c["length"] for c in pcells})
        depths = sorted({c["depth"] for c in pcells})
        w = 1.6 + 0.55 * len(lengths)
        fig, axes = plt.subplots(1, len(models), figsize=(w * len(models) + 0.8, max(2.6, 1.2 + 0.26 * len(depths))),
                                 squeeze=False, layout="constrained")
        cmap = plt.get_cmap("viridis").with_extremes(bad="#d9d9d9")
        im = None
        for ax, m in zip(axes[0], models):
            grid = np.full((len(depths), len(lengths)), np.nan)
            for c in _cells(res, "passkey", m):
                if c.get("acc") is not None:
                    grid[depths.index(c["depth"]), lengths.index(c["length"])] = c["acc"]
            im = ax.imshow(np.ma.masked_invalid(grid), vmin=0, vmax=1, cmap=cmap, aspect="auto", origin="upper")
            ax.set_xticks(range(len(lengths)), [fmt_len(x) for x in lengths], fontsize=8)
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
            ax.set_xlabel("context length (tokens)", fontsize=8)
            ax.set_ylabel("needle depth", fontsize=8)
            ax.set_title(f"passkey: {MODEL_LABEL[m]}", fontsize=9)
            for i in range(len(depths)):
                for j in range(len(lengths)):
                    v = grid[i, j]
                    ax.text(j, i, "n/a" if np.isnan(v) else f"{100 * v:.0f}", ha="center", va="center", fontsize=6,
                            color="black" if np.isnan(v) or v >= 0.6 else "white")
        fig.colorbar(im, ax=list(axes[0]), fraction=0.05, pad=0.02, label="exact match")
        out.append(("Passkey accuracy, needle depth x context length (grey = not run)",
                    _save(fig, plots / f"{stem}_passkey.png")))

    # accuracy vs length
    series = []
    for m in MODELS:
        pk = passkey_by_length(res, m)
        xs = [L for L, v in pk.items() if v["acc"] is not None]
        if xs:
            series.append(("passkey", m, xs, [pk[L]["acc"] for L in xs]))
        for s in RECALL_SUITES:
            cs = sorted((c["length"], c["acc"]) for c in _cells(res, s, m) if c.get("acc") is not None)
            if cs:
                series.append((s, m, [c[0] for c in cs], [c[1] for c in cs]))
    if series:
        fig, ax = plt.subplots(figsize=(6.4, 3.2), layout="constrained")
        colors = {"passkey": "C0", "relational_2hop": "C1", "kv_retrieval": "C2"}
        for s, m, xs, ys in series:
            ax.plot(xs, ys, "-" if m == "dnc" else "--", marker="o", ms=3, color=colors[s], label=f"{s} {MODEL_LABEL[m]}")
        _len_axis(ax, [x for s in series for x in s[2]])
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("exact match")
        ax.set_title("accuracy vs context length (DNC solid, baseline dashed)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, handlelength=3, loc="center left", bbox_to_anchor=(1.01, 0.5))
        out.append(("Accuracy vs context length", _save(fig, plots / f"{stem}_accuracy.png")))
    return out


# ==============================================================================================
# Commands: stored, documented in README.md, or rebuilt from the stored arguments
# ==============================================================================================
def readme_commands(readme: Path) -> dict[str, list[str]]:
    """``{"model_speed": ["python bench/model_speed.py ..."], ...}`` from the ```bash blocks of the
    top-level README's benchmark section (continuation lines joined, comments dropped)."""
    if not readme.exists():
        return {}
    text = readme.read_text(encoding="utf-8")
    start = text.find("## Benchmarks")
    text = text[start:] if start >= 0 else text
    out: dict[str, list[str]] = {}
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            m = re.match(r"python bench/(\w+)\.py\b", line)
            if m:
                out.setdefault(m.group(1), []).append(" ".join(line.split()))
    return out


def script_flags(script: Path) -> dict[str, bool]:
    """``{"--flag": takes_several_values}`` from a script's ``add_argument`` calls (source scan,
    so rendering never imports the benchmark and its heavy dependencies)."""
    if not script.exists():
        return {}
    src = script.read_text(encoding="utf-8")
    flags = {}
    for m in re.finditer(r"add_argument\(\s*\"(--[\w-]+)\"([^\n]*)", src):
        flags[m.group(1)] = "nargs" in m.group(2)
    return flags


def _norm(v: Any) -> list[str]:
    vals = v if isinstance(v, (list, tuple)) else [v]
    out = []
    for x in vals:
        s = str(x).strip().lower()
        try:
            s = repr(float(s))
        except ValueError:
            pass
        out.append(s)
    return out


def _parse_cli(cmd: str) -> dict[str, list[str]]:
    toks = shlex.split(cmd)[2:]
    out: dict[str, list[str]] = {}
    key = None
    for t in toks:
        if t.startswith("--"):
            key = t
            out[key] = []
        elif key is not None:
            out[key].append(t)
    return out


def command_agrees(cmd: str, args: dict[str, Any], flags: dict[str, bool]) -> bool:
    """True when every flag of ``cmd`` matches the stored ``args`` and every switch that was on
    in the run appears in ``cmd``."""
    parsed = _parse_cli(cmd)
    for flag, vals in parsed.items():
        key = flag[2:].replace("-", "_")
        if key in args:
            v = args[key]
            if isinstance(v, bool):
                if vals or not v:
                    return False
            elif _norm(vals if len(vals) > 1 else (vals[0] if vals else "")) != _norm(
                    ",".join(map(str, v)) if isinstance(v, list) and len(vals) == 1 else v):
                return False
        elif key.startswith("no_") and key[3:] in args:
            if args[key[3:]] is not False:
                return False
        else:
            return False
    for key, v in args.items():
        flag = "--" + key.replace("_", "-")
        if v is True and flag in flags and flag not in parsed:
            return False
        if v is False and f"--no-{key.replace('_', '-')}" in flags and f"--no-{key.replace('_', '-')}" not in parsed:
            return False
    return True


def rebuild_command(script: str, args: dict[str, Any], flags: dict[str, bool]) -> str:
    """A command line equivalent to the stored arguments (absolute output paths left out)."""
    parts = ["python", f"bench/{script}.py"]
    for key, v in args.items():
        flag = "--" + key.replace("_", "-")
        if key in ("out", "storage") and (v is None or os.path.isabs(str(v))):
            continue
        if flag not in flags:
            if v is False and f"--no-{key.replace('_', '-')}" in flags:
                parts.append(f"--no-{key.replace('_', '-')}")
            continue
        if v is None or v is False or v == "":
            continue
        if v is True:
            parts.append(flag)
        elif isinstance(v, (list, tuple)):
            parts += [flag] + ([str(x) for x in v] if flags[flag] else [",".join(map(str, v))])
        else:
            parts += [flag, str(v)]
    return shlex.join(parts)


# ==============================================================================================
# Benchmarks
# ==============================================================================================
def _kind(name: str, res: dict) -> str:
    for k in ("long_context", "model_speed", "train_scaling", "serve_load", "op_counts", "segment_transfer",
              "durability", "abuse", "train_loop_gap"):
        if name.startswith(k) or res.get("benchmark") == k:
            return k
    return "other"


def _env_line(kind: str, res: dict) -> str:
    if kind == "model_speed":
        return f"Device: {res.get('device')}; torch {res.get('torch')}; dtype {res.get('dtype')}; commit {res.get('commit')}"
    if kind == "train_scaling":
        e = res.get("env", {})
        return (f"Device: {e.get('gpu_count')}x {e.get('gpu')}; torch {e.get('torch')}; CUDA {e.get('cuda')}; "
                f"ray {e.get('ray')}; commit {e.get('commit') or 'unknown'}")
    if kind == "serve_load":
        ip = res.get("in_process", {})
        return (f"Device: host {res.get('host')}, {res.get('cpus')} CPUs, model on {ip.get('device', '?')}; "
                f"torch not recorded; commit {res.get('commit') or 'unknown'}")
    if kind == "long_context":
        return _summary_line(res)
    if kind == "op_counts":
        return "Device: CPU (op counts do not depend on the device); torch and commit not recorded"
    if kind == "segment_transfer":
        return f"Device: CPU; torch {res.get('torch')}; commit {res.get('commit') or 'unknown'}"
    if kind in ("durability", "abuse"):
        return f"Device: CPU, {res.get('cpus')} cores; commit {res.get('commit') or 'unknown'}"
    if kind == "train_loop_gap":
        return f"Device: {res.get('device')}; torch {res.get('torch')}; commit {res.get('commit') or 'unknown'}"
    return "Device: not recorded"


def _own_markdown(script: str):
    """A benchmark that owns its tables: render with that script's own ``markdown(result)``."""
    def tables(res: dict) -> list[str]:
        import importlib

        text = importlib.import_module(script).markdown(res)
        return [ln for ln in text.splitlines() if not ln.startswith("## ")] + [""]
    return tables


def train_loop_gap_tables(res: dict) -> list[str]:
    r = res["results"]
    rows = [[mode, fmt_num(v["tokens_per_s"]), f"{v['median_step_s'] * 1e3:.1f}", fmt_num(v["tokens"])]
            for mode, v in r.items()]
    return md_table(["mode", "tokens/s", "median step ms", "tokens timed"], rows, "lrrr") + [
        "", f"loop / step = {res['loop_over_step']:.3f} ({sum(res['corpus_batches'])} of "
            f"{len(res['corpus_batches'])} batches from the corpus)", ""]


KINDS: dict[str, dict[str, Any]] = {
    "model_speed": {
        "title": "DNC vs the Transformer baseline: speed and memory (`bench/model_speed.py`)",
        "what": ("Training throughput (forward + backward + AdamW, tokens/s, MFU, peak memory), prefill "
                 "throughput, median decode latency per token after a given context, and the size of the "
                 "DNC's memory bank against the baseline's KV cache at the same context, for each preset, "
                 "in one process on one device. The baseline is the same code with memory off and one "
                 "segment spanning the input."),
        "args": lambda r: r.get("args", {}),
        "tables": model_speed_tables, "targets": model_speed_targets, "plots": model_speed_plots,
    },
    "train_scaling": {
        "title": "Training throughput and scaling (`bench/train_scaling.py`)",
        "what": ("Tokens/s, step time, MFU and peak memory of the real training step on one GPU, then DDP "
                 "and FSDP2 on N GPUs through Ray Train and under torchrun, on random tokens."),
        "args": lambda r: r.get("config", {}),
        "tables": train_scaling_tables, "targets": train_scaling_targets, "plots": None,
    },
    "serve_load": {
        "title": "Serving load (`bench/serve_load.py`)",
        "what": ("Requests/s, tokens/s, latency percentiles and time to first token of `/v1/generate` under "
                 "N concurrent clients on loopback (plain = batched, stream = SSE), against the same "
                 "generation run in-process."),
        "args": lambda r: r.get("args", {}),
        "tables": serve_load_tables, "targets": None, "plots": None,
    },
    "long_context": {
        "title": "Long-context accuracy (`bench/long_context.py`)",
        "what": ("Trains the DNC with the curriculum (plus Python-stdlib text) and the Transformer baseline "
                 "the same way for the same wall-clock budget, then measures greedy exact match: passkey "
                 "retrieval over needle depth x context length up to 1M tokens, two-hop relational recall "
                 "and key/value retrieval at long contexts, multi-query associative recall (MQAR), and bits "
                 "per byte on held-out stdlib source. The baseline runs only where it fits."),
        "args": lambda r: r.get("args", {}),
        "tables": lambda r: long_context_tables(r, "####"), "targets": None, "plots": long_context_plots,
    },
    "segment_transfer": {
        "title": "A trained memory at other segment lengths (`bench/segment_transfer.py`)",
        "what": ("One checkpoint evaluated unchanged with other segment lengths (bank capacities scaled to "
                 "hold as many segments): greedy exact match on curriculum tasks whose facts sit 1.5-4 "
                 "segments before the question."),
        "args": lambda r: {"checkpoint": r.get("checkpoint"), "n": r.get("n")},
        "tables": segment_transfer_tables, "targets": None, "plots": None,
    },
    "op_counts": {
        "title": "Kernel launches per segment (`bench/profile_model.py --count-ops`)",
        "script": "profile_model",
        "what": ("The aten ops the model dispatches per segment (a proxy for CUDA kernel launches that needs "
                 "no GPU) and the host-device synchronisations, for training forward+backward, no-grad "
                 "prefill and single-token decode, DNC vs the memory-less baseline."),
        "args": lambda r: {}, "command": op_counts_command,
        "tables": op_counts_tables, "targets": None, "plots": None,
    },
    "train_loop_gap": {
        "title": "The curriculum loop against the model's own training step (`bench/train_loop_gap.py`)",
        "what": ("Tokens/s of train_step on batches already on the device, with the host-to-device copy, and "
                 "inside the loop that generates each batch and feeds the per-task losses back to the "
                 "curriculum, over the same batch sequence (the loop's own shapes)."),
        "args": lambda r: {}, "command": lambda r: ("python " + " ".join(r["argv"]), "stored in the result"),
        "tables": train_loop_gap_tables, "targets": None, "plots": None,
    },
    "durability": {
        "title": "Session durability under faults (`bench/durability.py`)",
        "what": ("Shard kills under concurrent writers (acknowledged turns lost), Generator kills mid-stream "
                 "(how long the session stays blocked), and a soak of sessionless and session turns with "
                 "background compaction (errors, latency, resident memory of every actor)."),
        "args": lambda r: {}, "tables": _own_markdown("durability"), "targets": None, "plots": None,
    },
    "abuse": {
        "title": "Abuse tests with API keys (`bench/abuse.py`)",
        "what": ("schemathesis against the app's own OpenAPI with keys (no 5xx, no schema violation), the "
                 "owner-isolation matrix over every endpoint and WebSocket with two keys, and the quotas."),
        "args": lambda r: {}, "command": lambda r: ("python " + " ".join(r["argv"]), "stored in the result"),
        "tables": _own_markdown("abuse"), "targets": None, "plots": None,
    },
}


def render_result(name: str, res: dict, plots: Path, readme_dir: Path, documented: dict[str, list[str]]) -> list[str]:
    kind = _kind(name, res)
    spec = KINDS.get(kind)
    lines = [f"### `{name}.json`", ""]
    if spec is None:
        writers = sorted(f"`bench/{f.name}`" for f in HERE.glob("*.py") if name in f.read_text(encoding="utf-8"))
        return lines + [f"Written by {', '.join(writers) or 'an unknown script'}; report.py has no renderer for "
                        f"this format yet (top-level keys: {', '.join(sorted(res))}).", ""]
    args = spec["args"](res)
    script = spec.get("script", kind)
    flags = script_flags(HERE / f"{script}.py")
    own = spec.get("command", lambda r: None)(res)
    if res.get("command"):
        cmd, source = res["command"], "stored in the result"
    elif own is not None:
        cmd, source = own
    else:
        cmd = next((c for c in documented.get(script, []) if command_agrees(c, args, flags)), None)
        source = "documented in README.md"
        if cmd is None:
            cmd, source = rebuild_command(script, args, flags), "rebuilt from the arguments stored in the result"
    lines += [f"Command ({source}):", "", "```bash", cmd, "```", "", _env_line(kind, res), ""]
    lines += spec["tables"](res)
    if spec["targets"]:
        ts = spec["targets"](res)
        if ts:
            rows = [[t["target"] + (f" ({t['preset']})" if t.get("preset") else ""), t["measured"] or "—",
                     verdict_word(t["met"])] for t in ts]
            lines += ["Targets:", ""] + md_table(["target", "measured", "verdict"], rows, "lll") + [""]
    if spec["plots"]:
        for caption, path in spec["plots"](res, plots, name):
            rel = os.path.relpath(path, readme_dir).replace(os.sep, "/")
            lines += [f"![{caption}]({rel})", ""]
    return lines


def build(results_dir: Path, readme: Path, plots: Path, source_readme: Path) -> str:
    """Render every ``results_dir/*.json`` into ``readme`` (and PNGs into ``plots``); returns the text."""
    files = sorted(results_dir.glob("*.json"))
    documented = readme_commands(source_readme)
    by_kind: dict[str, list[tuple[str, dict]]] = {}
    for f in files:
        try:
            res = json.loads(f.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            print(f"[report] skipping {f}: not valid JSON ({e})", file=sys.stderr)
            continue
        if not isinstance(res, dict):
            continue
        by_kind.setdefault(_kind(f.stem, res), []).append((f.stem, res))
    old_pngs = set(plots.glob("*.png")) if plots.exists() else set()
    rel_results = os.path.relpath(results_dir, readme.parent).replace(os.sep, "/")
    lines = ["# Benchmark results", "",
             f"Generated by `python bench/report.py` from `{rel_results}/*.json`; do not edit by hand. "
             "Each section says what the benchmark measures and the command that reproduces it; "
             "every figure comes from the JSON file named in its heading.", ""]
    order = [k for k in KINDS if k in by_kind] + (["other"] if "other" in by_kind else [])
    lines += ["Contents: " + ", ".join(f"[{KINDS[k]['title'].split(' (')[0] if k in KINDS else 'other'}]"
                                       f"(#{_anchor(KINDS[k]['title'] if k in KINDS else 'Other results')})"
                                       for k in order), ""]
    for k in order:
        title = KINDS[k]["title"] if k in KINDS else "Other results"
        lines += [f"## {title}", ""]
        if k in KINDS:
            lines += [KINDS[k]["what"], ""]
        for name, res in by_kind[k]:
            lines += render_result(name, res, plots, readme.parent, documented)
    missing = [k for k in KINDS if k not in by_kind]
    if missing:
        lines += ["## Not yet measured", ""]
        for k in missing:
            script = KINDS[k].get("script", k)
            src = (HERE / f"{script}.py").read_text(encoding="utf-8") if (HERE / f"{script}.py").exists() else ""
            ex = re.search(rf"^\s*(python bench/{script}\.py[^\n]*)", src, flags=re.M)
            lines += [f"- {KINDS[k]['title']}: no result in `{rel_results}/` yet"
                      + (f"; run `{ex.group(1).strip()}`" if ex else "") + "."]
        lines += [""]
    text = "\n".join(lines).rstrip("\n") + "\n"
    new_pngs = set(plots.glob("*.png")) if plots.exists() else set()
    written = {Path(p) for p in re.findall(r"\]\(([^)]+\.png)\)", text)}
    for stale in sorted(old_pngs | new_pngs):
        if Path(os.path.relpath(stale, readme.parent).replace(os.sep, "/")) not in written:
            stale.unlink()  # a plot of a result that no longer exists
    readme.write_text(text, encoding="utf-8")
    return text


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(HERE / "results"), help="folder of result JSON files")
    p.add_argument("--readme", default=None, help="README to write (default: bench/README.md, or "
                                                  "<results>/README.md when --results is given)")
    p.add_argument("--plots", default=None, help="PNG folder (default: <results>/plots)")
    p.add_argument("--source-readme", default=str(ROOT / "README.md"),
                   help="README whose benchmark section documents the commands of older results")
    args = p.parse_args(argv)
    results = Path(args.results)
    if not results.is_dir():
        print(f"error: --results {results} is not a folder of result JSON files", file=sys.stderr)
        return 2
    default_readme = HERE / "README.md" if results.resolve() == (HERE / "results").resolve() else results / "README.md"
    readme = Path(args.readme) if args.readme else default_readme
    plots = Path(args.plots) if args.plots else results / "plots"
    build(results, readme, plots, Path(args.source_readme))
    n_png = len(list(plots.glob("*.png"))) if plots.exists() else 0
    size = sum(f.stat().st_size for f in plots.glob("*.png")) if plots.exists() else 0
    print(f"wrote {readme} ({n_png} plots, {size / 1024:.0f} KiB in {plots})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
