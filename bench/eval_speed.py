"""Evaluation cost (issue 11): greedy exact match by token-by-token generation against batched
teacher forcing (``dnc.training.exact_match``), timed on the same samples in the same run, with the
per-sample verdicts of both compared.

Two suites, each scored both ways:
  - ``curriculum``: the eval set of a curriculum stage (``--stage``, lengths resolved with the
    model's ``segment_len``), exactly what training evaluates every ``eval_interval`` steps:
    ``predict_answer`` + ``greedy_predict_fn`` (``model.generate`` per answer span) against
    ``TeacherForcedScorer``.
  - ``passkey``: the long-context record's passkey cells (``bench/long_context.py``'s sample draws),
    its chunked ``GreedyReader`` against its ``TeacherReader``.

A model without a checkpoint is untrained, so every verdict would be "wrong" and agreement says
little: ``--train-steps N`` first lets it memorise every other sample of both suites (they then
hold right and wrong answers). Examples::

    # CPU, tiny (about a minute on 2 cores)
    python bench/eval_speed.py --preset tiny --train-steps 60 --device cpu --threads 2 --tag tiny_cpu

    # CPU, the small preset shrunk to CPU size
    python bench/eval_speed.py --preset small --model-set segment_len=128 --model-set n_layers=2 \\
        --model-set d_model=128 --train-steps 40 --n 4 --passkey-lengths 512,1k --device cpu --tag small_shrunk_cpu

    # GPU, a trained checkpoint (the H200 run's eval: small preset, 512-token segments)
    python bench/eval_speed.py --checkpoint runs/long_context/h200_s10/dnc --stage basic_reasoning \\
        --passkey-lengths 4k,16k,64k --depths 0,0.25,0.5,0.75,1 --n 8 --tag h200

Prints a table (seconds per path, speed-up, verdicts agreeing / total, accuracy by each path) and
writes ``bench/results/eval_speed_<tag>.json`` (argv, device, commit; per-sample verdicts).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

HERE = Path(__file__).resolve().parent
for _p in (str(HERE.parent), str(HERE)):  # the project (dnc) and bench/ (common, long_context_eval)
    if _p not in sys.path:
        sys.path.insert(0, _p)
from common import HelpFormatter, fmt_len, md_table, parse_pairs, provenance, stderr_logger, write_json  # noqa: E402

TITLE = "Evaluation cost: greedy generation against batched teacher forcing (`bench/eval_speed.py`)"
WHAT = ("The same exact-match verdicts two ways on the same samples, timed in one run: token-by-token greedy "
        "generation (the old path) and one teacher-forced forward per sample with equal-length samples as "
        "rows (`dnc/training/exact_match.py`, now the default of the curriculum eval, `task_accuracy` and "
        "`bench/long_context.py`). A verdict that differs is listed; the bench exits 1 then.")

log = stderr_logger("eval_speed")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python bench/eval_speed.py", description=__doc__,
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--preset", default="tiny", help="model preset without --checkpoint; default tiny")
    g.add_argument("--model-set", dest="model_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a DNCConfig field (YAML value), e.g. --model-set segment_len=128; repeatable")
    g.add_argument("--checkpoint", default=None, help="run dir or step_* dir to evaluate instead of a fresh preset")
    g.add_argument("--train-steps", type=int, default=0,
                   help="first memorise every other sample for this many steps (a fresh model's "
                        "verdicts are otherwise all wrong); default 0")
    g.add_argument("--seed", type=int, default=0, help="weights (fresh model) and sample seed; default 0")
    e = p.add_argument_group("samples")
    e.add_argument("--suites", default="curriculum,passkey", help="comma list of curriculum, passkey; default both")
    e.add_argument("--stage", default="foundation", help="curriculum stage (configs/curriculum); default foundation")
    e.add_argument("--n", type=int, default=8, help="curriculum samples per task and length (the trainer's "
                   "eval_samples); default 8")
    e.add_argument("--difficulty", type=float, default=None, help="curriculum difficulty (default: the stage's lowest)")
    e.add_argument("--passkey-lengths", default="256,512",
                   help="passkey sample lengths (k/M suffixes); default 256,512")
    e.add_argument("--depths", default="0,0.5,1", help="needle depths; default 0,0.5,1")
    e.add_argument("--n-passkey", type=int, default=4, help="passkey samples per length x depth; default 4")
    r = p.add_argument_group("scoring")
    r.add_argument("--max-rows", type=int, default=64, help="samples per teacher-forced forward; default 64")
    r.add_argument("--no-bf16", dest="bf16", action="store_false", help="no bf16 autocast on CUDA")
    r.add_argument("--repeats", type=int, default=1, help="timed runs of each path (the fastest is kept); default 1")
    o = p.add_argument_group("output")
    o.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available)")
    o.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    o.add_argument("--tag", default=None, help="result name suffix (default: <preset>_<cuda|cpu>)")
    o.add_argument("--out", default=str(HERE / "results"), help="folder of the JSON; default bench/results")
    return p


# ==============================================================================================
# Samples and the model
# ==============================================================================================
def curriculum_samples(stage: str, segment_len: int, n: int, difficulty: float | None, seed: int) -> list:
    """The eval set ``Curriculum.evaluate`` scores for ``stage`` (in its order): every active task
    x the stage's (min, max) length x ``n``."""
    from dnc.data.curriculum import Curriculum, load_stages

    stages = load_stages(segment_len=segment_len)
    names = [s.name for s in stages]
    if stage not in names:
        raise ValueError(f"--stage {stage!r} is not a curriculum stage; stages: {names}")
    cur = Curriculum(stages, seed=seed, check=False)
    cur._enter_stage(names.index(stage), step=0)  # noqa: SLF001 - what TaskSource does for curriculum_start

    kept: list = []

    class Recorder:  # a SampleScorer that keeps what it is given
        def score_samples(self, samples):
            kept.extend(samples)
            return [False] * len(samples)

    cur.evaluate(Recorder(), n_per_task=n, seed=seed + 1234, difficulty=difficulty)
    return kept


def passkey_samples(lengths: Sequence[int], depths: Sequence[float], n: int, seed: int) -> list:
    """The long-context record's passkey cells: ``n`` samples per length x depth, same draws."""
    from long_context_eval import SUITE_SEED, draw_samples

    out = []
    for L in lengths:
        for di, d in enumerate(depths):
            _, samples = draw_samples("needle", [seed, SUITE_SEED["passkey"], L, di], L, n, 0.0, depth=d)
            out += samples
    return out


def memorise(model, samples: list, steps: int, seed: int) -> float:
    """Train ``model`` on ``samples`` (answer tokens only; one batch per sample length) for
    ``steps`` AdamW steps of every batch; returns the mean loss of the last round. Only there to
    give the verdicts a mix of right and wrong."""
    import torch

    from dnc.data.tasks import collate

    torch.manual_seed(seed)
    by_len: dict[int, list] = {}
    for s in samples:
        by_len.setdefault(len(s), []).append(s)
    batches = [collate(group) for group in by_len.values()]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    losses = [float("nan")]
    for _ in range(steps):
        losses = []
        for b in batches:
            out = model(b["tokens"].to(model.device), targets=b["targets"].to(model.device))
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            losses.append(float(out.loss.detach()))
    model.eval()
    return sum(losses) / len(losses)


# ==============================================================================================
# Timing
# ==============================================================================================
def timed(fn: Callable[[], list[bool]], device, repeats: int) -> tuple[list[bool], float]:
    """(verdicts, the fastest of ``repeats`` wall-clock runs in seconds)."""
    import torch

    best, out = float("inf"), []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return [bool(v) for v in out], best


def compare(name: str, samples: list, greedy: Callable[[list], list[bool]], teacher: Callable[[list], list[bool]],
            device, repeats: int) -> dict[str, Any]:
    """Both paths on ``samples`` (a warm-up on two samples first), timed, verdicts compared."""
    greedy(samples[:2])
    teacher(samples[:2])
    v_greedy, s_greedy = timed(lambda: greedy(samples), device, repeats)
    v_teacher, s_teacher = timed(lambda: teacher(samples), device, repeats)
    n = len(samples)
    agree = sum(a == b for a, b in zip(v_greedy, v_teacher))
    by_len: dict[int, int] = {}
    for s in samples:
        by_len[len(s)] = by_len.get(len(s), 0) + 1
    row = {"suite": name, "samples": n, "tokens": sum(len(s) for s in samples), "lengths": by_len,
           "greedy_seconds": s_greedy, "teacher_seconds": s_teacher, "speedup": s_greedy / s_teacher,
           "agree": agree, "greedy_right": sum(v_greedy), "teacher_right": sum(v_teacher),
           "disagreements": [{"index": i, "task": s.task, "length": len(s), "greedy": a, "teacher": b}
                             for i, (s, a, b) in enumerate(zip(samples, v_greedy, v_teacher)) if a != b],
           "verdicts": {"greedy": v_greedy, "teacher": v_teacher},
           "tasks": [s.task for s in samples]}
    log(f"{name}: {n} samples, greedy {s_greedy:.2f}s, teacher {s_teacher:.2f}s ({row['speedup']:.1f}x); "
        f"verdicts agree {agree}/{n}; right: greedy {row['greedy_right']}, teacher {row['teacher_right']}")
    return row


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    import torch

    from dnc.config import preset
    from dnc.data import tasks as task_lib
    from dnc.model import DNC
    from dnc.training.evaluate import greedy_predict_fn
    from dnc.training.exact_match import TeacherForcedScorer
    from long_context_eval import GreedyReader, TeacherReader, answer
    from ray_jobs.evaluate import parse_lengths

    suites = [s.strip() for s in a.suites.split(",") if s.strip()]
    try:
        if not suites or set(suites) - {"curriculum", "passkey"}:
            raise ValueError(f"--suites takes a comma list of curriculum, passkey; got {a.suites!r}")
        if min(a.n, a.n_passkey, a.max_rows, a.repeats) < 1 or a.train_steps < 0:
            raise ValueError("--n, --n-passkey, --max-rows and --repeats must be >= 1, --train-steps >= 0")
        lengths = sorted(parse_lengths(a.passkey_lengths))
        depths = [float(d) for d in a.depths.split(",") if d.strip()]
        overrides = parse_pairs("--model-set", a.model_overrides)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.checkpoint:
        from dnc.checkpoint import load_checkpoint, resolve_checkpoint

        model, _ = load_checkpoint(resolve_checkpoint(a.checkpoint), map_location="cpu")
        if overrides:
            model = model.reconfigured(**overrides)
    else:
        torch.manual_seed(a.seed)
        model = DNC(preset(a.preset, **overrides))
    model = model.to(device).eval()
    cfg = model.config
    tag = a.tag or f"{a.preset if not a.checkpoint else 'checkpoint'}_{device.type}"
    log(f"model: {cfg.d_model}d x {cfg.n_layers} layers, segment_len {cfg.segment_len}, memory {cfg.memory}")

    cur = curriculum_samples(a.stage, cfg.segment_len, a.n, a.difficulty, a.seed)
    keys = passkey_samples(lengths, depths, a.n_passkey, a.seed) if "passkey" in suites and cfg.memory else []
    train_loss = None
    if a.train_steps:
        train_loss = memorise(model, cur[::2] + keys[::2], a.train_steps, a.seed)
        log(f"memorised {len(cur[::2]) + len(keys[::2])} samples in {a.train_steps} steps (loss {train_loss:.3f})")
    rows = []
    if "curriculum" in suites:
        predict = greedy_predict_fn(model, device, a.bf16)
        scorer = TeacherForcedScorer(model, device, a.bf16, max_rows=a.max_rows)
        rows.append(compare("curriculum", cur, lambda ss: [task_lib.score(s, task_lib.predict_answer(s, predict))
                                                           for s in ss],
                            scorer.score_samples, device, a.repeats))
    if keys:
        samples = keys
        gr = GreedyReader(model, cfg.segment_len, device)
        tr = TeacherReader(model, cfg.segment_len, device, a.max_rows)
        rows.append(compare("passkey", samples, lambda ss: [answer(gr, s)[0] for s in ss],
                            lambda ss: [r[0] for r in tr.answers(ss)], device, a.repeats))
    elif "passkey" in suites:
        log("passkey suite skipped: a model without memory is the long-context baseline, read in other chunks")
    res = {**provenance("eval_speed", argv, device), "model": {"config": cfg.to_dict(), "params": model.num_params(),
                                                               "checkpoint": a.checkpoint},
           "settings": {"stage": a.stage, "n": a.n, "difficulty": a.difficulty, "passkey_lengths": lengths,
                        "depths": depths, "n_passkey": a.n_passkey, "max_rows": a.max_rows, "bf16": a.bf16,
                        "repeats": a.repeats, "train_steps": a.train_steps, "train_loss": train_loss, "seed": a.seed},
           "rows": rows}
    res["markdown"] = render(res)
    dest = write_json(Path(a.out) / f"eval_speed_{tag}.json", res)
    print(res["markdown"])
    log(f"wrote {dest}")
    return 0 if all(r["agree"] == r["samples"] for r in rows) else 1


def render(res: dict[str, Any]) -> str:
    """Markdown of one result: a row per suite, times of both paths measured in the same run."""
    rows = []
    for r in res["rows"]:
        lens = ", ".join(f"{fmt_len(L)} x {k}" for L, k in sorted((int(L), k) for L, k in r["lengths"].items()))
        n = r["samples"]
        rows.append([r["suite"], lens, f"{r['greedy_seconds']:.2f}", f"{r['teacher_seconds']:.2f}",
                     f"{r['speedup']:.1f}x", f"{r['agree']}/{n}",
                     f"{r['greedy_right']}/{n}", f"{r['teacher_right']}/{n}"])
    head = ["suite", "samples (length x count)", "greedy s", "teacher s", "speed-up", "verdicts agree",
            "right (greedy)", "right (teacher)"]
    cfg = res["model"]["config"]
    return "\n".join([f"Device: {res.get('device') or 'CPU'}; torch {res.get('torch')}; commit {res.get('commit')}; "
                      f"model {cfg['d_model']}d x {cfg['n_layers']} layers, segment_len {cfg['segment_len']}", ""]
                     + md_table(head, rows) + [""])


if __name__ == "__main__":
    sys.exit(main())
