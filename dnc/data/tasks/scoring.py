"""How an answer is scored: exact match (:func:`score`) of what the model predicts for each answer
span with the true prefix before it (:func:`predict_answer`)."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from dnc.data.tasks.builder import Sample
from dnc.data.tasks.vocab import EOS


def _cut_at_eos(ids: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)
    hit = np.flatnonzero(arr == EOS)
    return arr[: hit[0]] if len(hit) else arr


def score(sample: Sample, predicted_answer_tokens: Sequence[int] | np.ndarray) -> bool:
    """Exact match. The prediction is cut at its first ``<eos>``; it is right iff what remains
    equals ``sample.answer`` without its ``<eos>`` (so trailing junk before an ``<eos>``, or a
    missing token, is wrong)."""
    return bool(np.array_equal(_cut_at_eos(predicted_answer_tokens),
                               np.asarray(sample.answer[:-1], dtype=np.int64)))


PredictFn = Callable[[np.ndarray, int], Sequence[int]]
"""``predict_fn(prefix_tokens [P] int32, max_new) -> list[int]`` new tokens (greedy decoding)."""


def predict_answer(sample: Sample, predict_fn: PredictFn) -> list[int]:
    """The model's answer to ``sample`` in the form :func:`score` takes.

    For each answer span (one for most tasks; one per query for mqar) the model gets the true
    prefix up to that span (teacher forcing of earlier queries) and ``span length`` new tokens;
    the pieces are concatenated. A piece that stops early is padded with ``-1`` (never a token)."""
    out: list[int] = []
    for s, e in sample.meta["answer_spans"]:
        k = e - s
        got = [int(t) for t in list(predict_fn(sample.tokens[:s], k))[:k]]
        if len(got) < k and not (got and got[-1] == EOS):
            got += [-1] * (k - len(got))
        out += got
        if got and got[-1] == EOS:
            break
    return out
