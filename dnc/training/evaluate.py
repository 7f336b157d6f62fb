"""Evaluation of a model: exact-match accuracy on tasks (greedy decoding's verdicts, by batched
teacher forcing or by generation) and bits per byte of text.

:func:`evaluate` is the entry point for a checkpoint (``ray_jobs.evaluate`` and the benchmarks);
:func:`task_accuracy` and :func:`text_bits_per_byte` are its two parts. The curriculum's own
evaluation during training (difficulty, promotion) is ``TaskSource.assess`` on top of these.

Shapes: B batch, T tokens, V vocab."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dnc.parallel import unwrap
from dnc.training.step import autocast_ctx


def greedy_predict_fn(model: nn.Module, device: torch.device | None = None, bf16: bool = True):
    """``predict(prompt_ids, max_new_tokens) -> list[int]``: greedy generation from a fresh memory
    state, stopping only at ``max_new_tokens`` (so the number of forward passes is deterministic)."""
    m = unwrap(model)
    dev = device or next(m.parameters()).device

    def predict(prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        with torch.no_grad(), autocast_ctx(dev, bf16):
            ids = torch.as_tensor(list(prompt_ids), dtype=torch.long, device=dev)
            return [int(t) for t in m.generate(ids, max_new_tokens=int(max_new_tokens), temperature=0.0,
                                               stop_tokens=())]
    return predict


def task_accuracy(model: nn.Module, tasks: Sequence[str] | Any, lengths: Sequence[int], n: int = 16, *,
                   seed: int = 1234, difficulty: float | None = None, device: torch.device | None = None,
                   bf16: bool = True, task_kwargs: dict[str, dict[str, Any]] | None = None,
                   progress: Callable[[str, int, float], None] | None = None,
                   mode: str = "teacher", max_rows: int = 64) -> dict[str, dict[int, float]]:
    """Exact-match accuracy per task and length under greedy decoding.

    ``tasks``: task names of :data:`dnc.data.tasks.TASKS`, or a ``Curriculum`` (its current
    stage's tasks, difficulties and task knobs). ``mode="teacher"`` (default) scores every sample
    with one teacher-forced forward pass, samples of equal length batched ``max_rows`` at a time
    (:class:`dnc.training.exact_match.TeacherForcedScorer`: the same verdicts as greedy decoding);
    ``mode="greedy"`` answers each sample span by span with ``model.generate`` through
    :func:`dnc.data.tasks.predict_answer` and scores it with :func:`dnc.data.tasks.score`.
    Samples depend only on ``(seed, task, length)``. Returns ``{task: {length: accuracy}}``."""
    from dnc.data import tasks as task_lib
    from dnc.training.exact_match import TeacherForcedScorer

    if mode not in ("teacher", "greedy"):
        raise ValueError(f"mode must be 'teacher' (batched teacher forcing) or 'greedy' (token-by-token "
                         f"generation), got {mode!r}")
    diffs: dict[str, float] = {}
    if not isinstance(tasks, (list, tuple)):
        cur = tasks
        task_kwargs = task_kwargs or cur.stage.task_kwargs
        diffs = dict(cur.difficulty)
        tasks = cur.stage.active_tasks
    cells: list[tuple[str, int, list]] = []  # (task, length, samples)
    for task in tasks:
        d = difficulty if difficulty is not None else diffs.get(task, 0.5)
        for length in lengths:
            rng = np.random.default_rng([seed, _stable_hash(task), int(length)])
            cells.append((task, int(length), [task_lib.generate(task, rng, int(length), d,
                                                                **(task_kwargs or {}).get(task, {}))
                                              for _ in range(n)]))
    results: dict[str, dict[int, float]] = {t: {} for t in tasks}

    def record(task: str, length: int, verdicts: Sequence[bool]) -> None:
        results[task][length] = sum(bool(v) for v in verdicts) / n
        if progress:
            progress(task, length, results[task][length])

    if mode == "teacher":  # one call per length: its cells share batches (other lengths never could)
        scorer = TeacherForcedScorer(model, device, bf16, max_rows=max_rows)
        for length in dict.fromkeys(L for _, L, _ in cells):
            same = [c for c in cells if c[1] == length]
            verdicts = scorer.score_samples([s for _, _, samples in same for s in samples])
            for i, (task, _, _) in enumerate(same):
                record(task, length, verdicts[i * n:(i + 1) * n])
        return results
    predict = greedy_predict_fn(model, device, bf16)
    m = unwrap(model)
    was_training = m.training
    m.eval()
    try:
        for task, length, samples in cells:
            record(task, length, [task_lib.score(s, task_lib.predict_answer(s, predict)) for s in samples])
    finally:
        m.train(was_training)
    return results


def text_bits_per_byte(model: nn.Module, data: bytes | str | Iterable[bytes | str], context_len: int, *,
                  max_bytes: int | None = None, batch_size: int = 4, device: torch.device | None = None,
                  bf16: bool = True) -> float:
    """Bits per byte of text under the byte tokenizer: non-overlapping windows of
    ``context_len + 1`` bytes, each position predicting the next byte from a fresh memory state;
    ``sum(CE nats) / (ln 2 * bytes scored)`` (``dnc.data.corpus.bits_per_byte``)."""
    from dnc.data.corpus import bits_per_byte

    m = unwrap(model)
    dev = device or next(m.parameters()).device
    if isinstance(data, (bytes, str)):
        data = [data]
    buf = b"".join(d.encode("utf-8") if isinstance(d, str) else bytes(d) for d in data)
    if max_bytes:
        buf = buf[:max_bytes]
    ids = torch.frombuffer(bytearray(buf), dtype=torch.uint8).long()
    win = context_len + 1
    n_win = len(ids) // win
    if n_win == 0:
        raise ValueError(f"need at least {win} bytes to score bits per byte, got {len(ids)}")
    windows = ids[: n_win * win].view(n_win, win)
    nats, count = 0.0, 0
    was_training = m.training
    m.eval()
    try:
        with torch.no_grad():
            for i in range(0, n_win, batch_size):
                w = windows[i:i + batch_size].to(dev)
                with autocast_ctx(dev, bf16):
                    out = m(w[:, :-1])
                nats += float(F.cross_entropy(out.logits.float().transpose(1, 2), w[:, 1:], reduction="sum"))
                count += int(w[:, 1:].numel())
    finally:
        m.train(was_training)
    return bits_per_byte(nats, count)


# ==============================================================================================


def _stable_hash(s: str) -> int:
    return int.from_bytes(s.encode("utf-8")[:8].ljust(8, b"\0"), "little") % (2**31)


def evaluate(model: nn.Module, *, tasks: Sequence[str] = (), lengths: Sequence[int] = (), n: int = 16,
             seed: int = 1234, difficulty: float | None = 0.5, text: bytes | str | None = None,
             context_len: int | None = None, max_bytes: int | None = None, device: torch.device | None = None,
             bf16: bool = True, mode: str = "teacher") -> dict[str, Any]:
    """Everything one evaluates a model with, in one call.

    Returns ``{"accuracy": {task: {length: exact match in [0, 1]}}, "bits_per_byte": float | None}``:
    accuracy from :func:`task_accuracy` for each task x length (``n`` samples each; ``mode`` as
    there: batched teacher forcing, or ``"greedy"`` generation), bits per byte
    of ``text`` from :func:`text_bits_per_byte` (``context_len`` defaults to 4 segments)."""
    acc = task_accuracy(model, list(tasks), list(lengths), n=n, seed=seed, difficulty=difficulty,
                        device=device, bf16=bf16, mode=mode) if tasks and lengths else {}
    bpb = None
    if text:
        ctx = context_len or 4 * unwrap(model).config.segment_len
        bpb = text_bits_per_byte(model, text, ctx, max_bytes=max_bytes, device=device, bf16=bf16)
    return {"accuracy": acc, "bits_per_byte": bpb}
