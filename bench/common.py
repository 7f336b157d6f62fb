"""What every benchmark script repeats: where the run happened (commit, device, torch, argv), how
its result JSON is written, the statistics its tables quote (median, percentiles, Wilson
intervals) and how numbers and tables are formatted in markdown.

Importing this module is cheap (no torch, no matplotlib): ``bench/report.py`` and the renderers
use it without the benchmarks' heavy dependencies; the functions that need torch import it when
called.

    from common import provenance, write_json
    res = provenance("model_speed", argv, device) | {"rows": rows}   # argv, command, commit, gpu, ...
    write_json(out / "model_speed_h200.json", res)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


# ==============================================================================================
# Command line
# ==============================================================================================
class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` that keeps the module docstring's layout and names every option's default.

    argparse's ``ArgumentDefaultsHelpFormatter`` skips options without a help string and re-wraps
    the description; this one shows ``(default: X)`` on every option whose default is a value
    (not None, not a store_true's False) and whose help does not already say it.
    """

    def _shows_default(self, action: argparse.Action) -> bool:
        return (bool(action.option_strings) and action.default not in (None, False, argparse.SUPPRESS)
                and "default" not in (action.help or "").lower())

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._shows_default(action):
            # a copy with a help line (argparse prints none for an empty help); parsing keeps the original
            action = argparse.Action(**{k: getattr(action, k) for k in (
                "option_strings", "dest", "nargs", "const", "default", "type", "choices", "required",
                "metavar")}, help="(default: %(default)s)")
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = (action.help or "").strip()
        if self._shows_default(action):
            text = f"{text} (default: %(default)s)".strip()
        return text


# ==============================================================================================
# Where and how a run happened
# ==============================================================================================
def git_commit() -> str | None:
    """The commit the benchmarked code is at: ``$DNC_COMMIT`` where the tree travels without
    ``.git`` (the GPU machine), else ``git rev-parse --short HEAD``; None when neither is known."""
    if os.environ.get("DNC_COMMIT"):
        return os.environ["DNC_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                       stderr=subprocess.DEVNULL).strip() or None
    except Exception:
        return None


def git_dirty() -> list[str] | None:
    """Tracked files with uncommitted changes (the commit alone does not describe the code then);
    ``[]`` for a tree exported from ``$DNC_COMMIT``, None when git cannot be asked."""
    if os.environ.get("DNC_COMMIT"):   # a tree exported from that commit: no git state to ask
        return []
    try:
        out = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                      text=True, stderr=subprocess.DEVNULL)
    except Exception:
        return None
    return sorted(line[3:] for line in out.splitlines() if line.strip())


def cpu_name() -> str:
    """The processor as the OS names it (``x86_64`` where it gives no model name)."""
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: Any = None) -> str:
    """``"NVIDIA H200"`` for a CUDA device (torch's name), else :func:`cpu_name`. ``device`` is a
    ``torch.device``, a string such as ``"cuda:1"``, or None for the default CUDA device when
    there is one."""
    if device is None or str(device).startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(device)
    return cpu_name()


def device_tag(device: Any) -> str:
    """``h100`` for "NVIDIA H100 80GB HBM3", ``cuda`` for an unrecognised GPU, ``cpu`` (file names)."""
    kind = getattr(device, "type", str(device).split(":")[0])
    if kind != "cuda":
        return kind
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", device_name(device))
    return m.group(1).lower() if m else "cuda"


def command_line(script: str, argv: Sequence[str]) -> str:
    """The shell command that reruns a benchmark: ``python bench/<script>.py <argv>``."""
    return shlex.join(["python", f"bench/{script}.py", *map(str, argv)])


def provenance(benchmark: str, argv: Sequence[str], device: Any = None, *, script: str | None = None) -> dict[str, Any]:
    """The fields every result JSON starts with: ``benchmark``, ``argv`` (the arguments after the
    script name), ``command`` (the line that reruns it), ``commit``, ``uncommitted`` (files changed
    since it), ``device``, ``gpu`` (None on CPU), ``torch``, ``python``, ``host``, ``cpus`` and
    ``started`` (UTC, ISO 8601). ``script`` is the file under ``bench/`` when it is not named
    after the benchmark."""
    on_gpu = device is None or str(device).startswith("cuda")
    torch_version = gpu = None
    if "torch" in sys.modules or device is not None:  # a script that never loaded torch did not use it
        import torch

        torch_version = torch.__version__
        if on_gpu and torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(device)
    argv = [str(a) for a in argv]
    return {"benchmark": benchmark, "argv": argv, "command": command_line(script or benchmark, argv),
            "commit": git_commit(), "uncommitted": git_dirty(), "device": gpu or cpu_name(), "gpu": gpu,
            "torch": torch_version, "python": platform.python_version(), "host": platform.node(),
            "cpus": os.cpu_count(), "started": utc_now()}


def stderr_logger(name: str):
    """A ``log(msg)`` that prints ``[name] msg`` to stderr at once (progress of a long run)."""
    def log(msg: str) -> None:
        print(f"[{name}] {msg}", file=sys.stderr, flush=True)
    return log


def utc_now() -> str:
    """``2026-12-02T07:40:12Z``: the timestamps result files carry."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_json(path: str | os.PathLike, result: dict[str, Any], indent: int | None = None) -> Path:
    """Write ``result`` atomically (a temporary file renamed over ``path``), so a reader or a run
    cut short never sees half a file; values JSON cannot hold are written as strings. Compact (no
    indent) by default: results are committed, and indentation made them a third larger."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=indent, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_result(folder: str | os.PathLike, stem: str, result: dict[str, Any], header: str,
                 markdown: str | None = None) -> Path:
    """``<folder>/<stem>.json`` (:func:`write_json`, compact) and ``<stem>.md``: ``header``, a blank
    line, then ``markdown`` (default ``result["markdown"]``; given apart when the JSON does not store
    the tables its renderer rebuilds). Returns the JSON path."""
    path = write_json(Path(folder) / f"{stem}.json", result)
    md = result["markdown"] if markdown is None else markdown
    path.with_suffix(".md").write_text(f"{header}\n\n{md}\n", encoding="utf-8")
    return path


def add_probe_args(p: argparse.ArgumentParser, preset_help: str, model_set_help: str) -> None:
    """The flags every probe of a trained DNC shares: ``--checkpoint`` or ``--preset`` (one is
    required), ``--model-set`` (repeatable), ``--device`` and ``--threads``."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="DNC run dir or checkpoint (step) dir")
    src.add_argument("--preset", help=preset_help)
    p.add_argument("--model-set", action="append", default=[], metavar="KEY=VALUE", help=model_set_help)
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")


def save_to(out: str | os.PathLike, stem: str, result: dict[str, Any], header: str) -> Path:
    """``--out`` as probes take it: a ``.json`` path gets the JSON alone; a folder gets
    ``<stem>.json`` and its ``.md`` (:func:`write_result`). Returns the JSON's path."""
    out = Path(out)
    if out.suffix == ".json":
        return write_json(out, result)
    return write_result(out, stem, result, header)


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
# Statistics
# ==============================================================================================
def median(xs: Sequence[float]) -> float | None:
    """The median, None for no values."""
    return statistics.median(xs) if len(xs) else None


def percentile(xs: Sequence[float], q: float) -> float | None:
    """The ``q``-quantile (``q`` in [0, 1]) as the nearest-rank sample (no interpolation: every
    figure is a latency that was observed); None for no values."""
    if not len(xs):
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval ``(low, high)`` of ``k`` successes in ``n`` trials (``n >= 1``)."""
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / den
    return max(0.0, mid - half), min(1.0, mid + half)


# ==============================================================================================
# Markdown formatting
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
    """A fraction as a percentage: 0.625 -> ``62.5%``; ``—`` for None."""
    return "—" if v is None else f"{100.0 * v:.{digits}f}%"


def fmt_count(k: int | None, n: int | None) -> str:
    """``"62.5% (25/40) [47-76%]"``: accuracy, counts, and the Wilson 95% interval when n < 50."""
    if k is None or not n:
        return "—"
    out = f"{100.0 * k / n:.1f}% ({k}/{n})"
    if n < 50:
        lo, hi = wilson(k, n)
        out += f" [{100 * lo:.0f}–{100 * hi:.0f}%]"
    return out


def md_table(header: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    """Markdown table lines; ``align`` is one character per column (``l`` or ``r``), default the
    first column left and the others right."""
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---" if a == "l" else "---:" for a in align]
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(sep) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def verdict_word(met: bool | None) -> str:
    """A target's verdict: met, missed, or not measured (None)."""
    return "not measured" if met is None else ("met" if met else "missed")


def targets_section(targets: list[dict[str, Any]]) -> list[str]:
    """``[{"target", "measured", "met"}]`` (optionally ``"preset"``) as a ``Targets:`` table;
    no lines when there are none."""
    if not targets:
        return []
    rows = [[t["target"] + (f" ({t['preset']})" if t.get("preset") else ""), t.get("measured") or "—",
             verdict_word(t["met"])] for t in targets]
    return ["Targets:", ""] + md_table(["target", "measured", "verdict"], rows, "lll") + [""]


# ==============================================================================================
# Plots (matplotlib is optional: without it the reports have tables only)
# ==============================================================================================
def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a message) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[bench] matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return None
    return plt


def save_png(fig, path: Path) -> Path:
    """PNG at dpi 100 without metadata (no version/date), so the bytes depend only on the data.

    Stored with a 256-colour palette: line plots lose nothing visible and take ~3x fewer bytes,
    which keeps the tracked results small (the repository stays well under 8 MiB)."""
    import io

    import matplotlib.pyplot as plt
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    buf.seek(0)
    with Image.open(buf) as im:
        im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    return path


def length_axis(ax, lengths: Iterable[int]) -> None:
    """A log2 x axis ticked at ``lengths``, labelled as the CLIs write them (4k, 1M)."""
    ls = sorted(set(int(x) for x in lengths))
    ax.set_xscale("log", base=2)
    ax.set_xticks(ls, [fmt_len(x) for x in ls])
    ax.minorticks_off()
