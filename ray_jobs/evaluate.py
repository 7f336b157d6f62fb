"""Exact-match accuracy of a checkpoint per task x length: JSON, a markdown table, a PNG heatmap.

    dnc evaluate --checkpoint PATH --lengths 1k,4k,16k [--tasks needle,kv_retrieval]
        [--n 16] [--difficulty 0.5] [--out DIR] [--device cuda] [--ray_workers N] [--gpu true]
    (python -m ray_jobs.evaluate ... is the same command)

``PATH`` is a checkpoint directory (``model.safetensors`` + ``config.json``, local or fsspec URI)
or a run directory (its newest ``step_*`` checkpoint is used). Lengths take ``k``/``M`` suffixes
(1k = 1024 tokens). With ``--ray-workers N`` the (task, length) cells are spread over N Ray tasks
(one GPU each with ``--gpu``); otherwise everything runs in this process.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Any, Sequence

from ray_jobs.signals import stop_on_sigterm


def parse_lengths(text: str) -> list[int]:
    """``"1k,4k,16k"`` -> ``[1024, 4096, 16384]`` (``M`` = 1024**2, plain numbers as given)."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmM]?)", part)
        if not m:
            raise ValueError(f"bad length {part!r}: use numbers with an optional k/M suffix, e.g. 1k,4k,16k")
        mult = {"": 1, "k": 1024, "m": 1024 ** 2}[m.group(2).lower()]
        out.append(int(float(m.group(1)) * mult))
    if not out:
        raise ValueError("no lengths given")
    return out


_MODELS: dict[tuple[str, str], Any] = {}


def _eval_cell(ckpt: str, task: str, length: int, n: int, difficulty: float | None, seed: int,
               device: str | None) -> tuple[str, int, float, float]:
    import torch

    from dnc.checkpoint import load_checkpoint
    from dnc.training import evaluate

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    key = (ckpt, str(dev))
    if key not in _MODELS:  # one load per process (Ray workers are reused across cells)
        model, _ = load_checkpoint(ckpt, map_location=dev)
        _MODELS[key] = model.to(dev).eval()
    model = _MODELS[key]
    t0 = time.time()
    res = evaluate(model, tasks=[task], lengths=[length], n=n, seed=seed, difficulty=difficulty, device=dev)
    return task, length, res["accuracy"][task][length], time.time() - t0


def evaluate_checkpoint(ckpt: str, tasks: Sequence[str], lengths: Sequence[int], n: int = 16, *,
                        difficulty: float | None = 0.5, seed: int = 1234, device: str | None = None,
                        ray_workers: int = 0, gpu: bool = False) -> dict[str, Any]:
    """``{"accuracy": {task: {length: acc}}, "seconds": {...}, ...}`` for one checkpoint."""
    cells = [(t, L) for t in tasks for L in lengths]
    acc: dict[str, dict[int, float]] = {t: {} for t in tasks}
    secs: dict[str, dict[int, float]] = {t: {} for t in tasks}
    if ray_workers > 0:
        import ray

        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS") or "local")  # not a stale `ray start` (init_ray)
            stop_on_sigterm()  # ray.init replaced it with Ray's (ray_jobs.signals)
        remote = ray.remote(num_gpus=1 if gpu else 0, num_cpus=1)(_eval_cell)
        pending = [remote.remote(ckpt, t, L, n, difficulty, seed, device) for t, L in cells]
        results = []
        from tqdm.auto import tqdm

        with tqdm(total=len(pending), desc="evaluate") as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                results.extend(ray.get(done))
                bar.update(len(done))
    else:
        from tqdm.auto import tqdm

        results = [_eval_cell(ckpt, t, L, n, difficulty, seed, device) for t, L in tqdm(cells, desc="evaluate")]
    for t, L, a, s in results:
        acc[t][L], secs[t][L] = a, s
    return {"checkpoint": ckpt, "tasks": list(tasks), "lengths": list(lengths), "n": n,
            "difficulty": difficulty, "seed": seed, "accuracy": acc, "seconds": secs}


def fmt_len(n: int) -> str:
    if n % (1024 ** 2) == 0:
        return f"{n // 1024 ** 2}M"
    if n % 1024 == 0:
        return f"{n // 1024}k"
    return str(n)


def markdown_table(report: dict[str, Any]) -> str:
    lengths = report["lengths"]
    lines = [f"Exact-match accuracy (n={report['n']} per cell, difficulty={report['difficulty']}) of "
             f"`{report['checkpoint']}`", "",
             "| task | " + " | ".join(fmt_len(L) for L in lengths) + " |",
             "|---|" + "---:|" * len(lengths)]
    for t in report["tasks"]:
        lines.append(f"| {t} | " + " | ".join(f"{report['accuracy'][t][L] * 100:.1f}%" for L in lengths) + " |")
    return "\n".join(lines) + "\n"


def heatmap(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks, lengths = report["tasks"], report["lengths"]
    grid = np.array([[report["accuracy"][t][L] for L in lengths] for t in tasks])
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(lengths), 0.9 + 0.55 * len(tasks)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(lengths)), [fmt_len(L) for L in lengths])
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel("context length (tokens)")
    for i in range(len(tasks)):
        for j in range(len(lengths)):
            ax.text(j, i, f"{grid[i, j] * 100:.0f}", ha="center", va="center",
                    color="white" if grid[i, j] < 0.6 else "black", fontsize=9)
    fig.colorbar(im, ax=ax, label="exact match")
    ax.set_title("accuracy per task x length")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_evaluation(*, checkpoint: str, lengths: str, tasks: str | None, n: int, difficulty: float, seed: int,
                   device: str | None, out: str, ray_workers: int, gpu: bool) -> int:
    """``dnc evaluate`` (its arguments are documented there): checks every argument first (a wrong
    one raises ``UsageError`` at once), evaluates, writes eval.json, eval.md and eval.png."""
    from dnc.checkpoint import resolve_checkpoint
    from dnc.data.tasks import TASKS
    from ray_jobs.parsing import UsageError

    try:
        lengths_list = parse_lengths(lengths)
        task_list = [t.strip() for t in (tasks or ",".join(TASKS)).split(",") if t.strip()]
        unknown = [t for t in task_list if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; known: {sorted(TASKS)}")
        if n < 1:
            raise ValueError("--n must be >= 1")
        ckpt = resolve_checkpoint(checkpoint)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None
    report = evaluate_checkpoint(ckpt, task_list, lengths_list, n, difficulty=difficulty, seed=seed,
                                 device=device, ray_workers=ray_workers, gpu=gpu)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "eval.json"), "w") as f:
        json.dump(report, f, indent=1)
    md = markdown_table(report)
    with open(os.path.join(out, "eval.md"), "w") as f:
        f.write(md)
    heatmap(report, os.path.join(out, "eval.png"))
    print(md)
    print(f"wrote {out}/eval.json, eval.md, eval.png")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ray_jobs.evaluate`` = ``dnc evaluate``."""
    from ray_jobs.cli import main as dnc_main

    return dnc_main(["evaluate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
