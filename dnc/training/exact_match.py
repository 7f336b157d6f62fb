"""Exact match of task samples under greedy decoding, scored by teacher forcing: one forward pass
over each sample (prompt and true answer), samples of equal length batched as rows, and the argmax
of the logits before every answer token compared with that token.

Why this gives the verdict of the greedy path (:func:`dnc.data.tasks.predict_answer`, then
:func:`dnc.data.tasks.score`), sample for sample:

- The greedy path answers span by span, each from the *true* prefix before the span, generating
  exactly ``span length`` tokens (no early stop), and ``score`` cuts the concatenation at its first
  ``<eos>`` and compares it with the answer without its ``<eos>``. The answer's only ``<eos>`` is its
  last token (checked here, else ValueError).
- If every answer token is the argmax of the teacher-forced logits before it, greedy decoding of
  each span sees exactly the teacher-forced prefix at every step (by induction inside the span; each
  span starts from the true prefix), so it emits the true span: the sample is right.
- Otherwise take the first answer position ``p`` whose argmax ``w`` is not the true token: every
  earlier span came out true (no ``<eos>`` inside, so nothing stopped early), and the greedy output
  of ``p``'s span agrees with the truth before ``p`` and emits ``w`` at ``p``. If ``w`` is ``<eos>``
  the cut answer has ``p`` tokens, fewer than the answer's; if not, the cut answer keeps ``w`` at
  ``p`` (no ``<eos>`` before it), where the truth has another token or its ``<eos>``: wrong either way.
- Were later spans fed the model's own earlier predictions instead of the truth, the whole-sample
  verdict would still be this one: while every earlier prediction is right the model's prefix *is*
  the truth, and the first wrong token decides the verdict whatever follows. Only per-span counts
  (MQAR's per-query accuracy) need the true prefix, which is what ``predict_answer`` and the
  long-context reader give; :func:`span_hits` counts them that way.

Equal in exact arithmetic. The two paths run different kernels (a prefill plus one-token decode
steps against whole chunks), so an argmax between two logits within rounding of each other can go
either way: ``bench/eval_speed.py`` counts how often the verdicts disagree.

Rows are never padded: samples are grouped by exact token length (the curriculum and the
long-context suites draw many samples of one length), and every op of the model is row-wise, so a
row's logits do not depend on its batch-mates (tested). Logits are kept only at answer positions,
chunk by chunk (``chunk`` tokens per forward call, the model's segment by default): memory stays
``O(rows x chunk x vocab)`` however long the samples, as in the model's own chunked forward.

Shapes: B rows, T tokens, V vocab, A answer tokens of one sample.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from dnc.data.tasks import EOS, Sample
from dnc.parallel import unwrap
from dnc.training.step import autocast_ctx


def answer_positions(sample: Sample) -> np.ndarray:
    """``[A]`` int64 indices in ``sample.tokens`` of the answer tokens (the answer spans in
    order). Raises ValueError when the sample breaks what the teacher-forced verdict relies on:
    spans that are the answer, one ``<eos>`` and only at its end, a prompt before the first span."""
    spans = sample.meta.get("answer_spans")
    if not spans:
        raise ValueError(f"{sample.task} sample has no meta['answer_spans']; it cannot be scored")
    pos = np.concatenate([np.arange(s, e, dtype=np.int64) for s, e in spans])
    toks = np.asarray(sample.tokens, dtype=np.int64)
    ans = np.asarray(sample.answer, dtype=np.int64)
    if pos[0] < 1 or pos[-1] >= len(toks) or not np.array_equal(toks[pos], ans):
        raise ValueError(f"{sample.task} sample: answer_spans {spans} do not hold sample.answer after a prompt")
    if ans[-1] != EOS or (ans[:-1] == EOS).any():
        raise ValueError(f"{sample.task} sample: the answer must end with its only <eos> for the teacher-forced "
                         f"verdict to equal greedy decoding's; score it with mode='greedy'")
    return pos


def span_hits(sample: Sample, hits: np.ndarray) -> list[bool]:
    """Per answer span: are its tokens before the ``<eos>`` all right (``hits [A]`` from
    :meth:`TeacherForcedScorer.hits`)? Greedy decoding of a span from the true prefix reproduces
    those tokens exactly when this is True (MQAR's per-query accuracy)."""
    out, i = [], 0
    for s, e in sample.meta["answer_spans"]:
        n = e - s - int(sample.tokens[e - 1] == EOS)
        out.append(bool(hits[i:i + n].all()))
        i += e - s
    return out


class TeacherForcedScorer:
    """Greedy exact match of task samples, batched (see the module docstring).

    ``score_samples(samples) -> [bool]`` is the verdict of :func:`dnc.data.tasks.score` on
    :func:`dnc.data.tasks.predict_answer` with greedy ``model.generate``; :meth:`hits` gives the
    per-answer-token detail and :meth:`answer_logits` the logits it is read from. The
    curriculum's ``evaluate`` and ``TaskSource.assess`` take an instance wherever they take a
    ``predict_fn``.

    Args:
        model: a DNC (or a DDP / compiled wrapper of one); put in eval mode while scoring.
        device: where the model runs (default: its parameters' device).
        bf16: bf16 autocast on CUDA, as training and ``greedy_predict_fn`` use it.
        max_rows: samples per forward pass at most.
        max_batch_tokens: rows x tokens per forward pass at most (None: no cap). A memory-less model
            keeps every token's keys and values, so its batch memory grows with this; a DNC's state
            does not grow with length.
        chunk: tokens per forward call (default: the model's ``segment_len``, so whole segments
            go through the model's step runner, e.g. CUDA graphs); the logits kept per call are
            ``[B, chunk, V]`` at most.
    """

    def __init__(self, model: nn.Module, device: torch.device | None = None, bf16: bool = True, *,
                 max_rows: int = 64, max_batch_tokens: int | None = None, chunk: int | None = None):
        self.model = unwrap(model)
        self.device = device or next(self.model.parameters()).device
        self.bf16 = bool(bf16)
        if max_rows < 1 or (max_batch_tokens is not None and max_batch_tokens < 1) or (chunk is not None and chunk < 1):
            raise ValueError(f"max_rows, max_batch_tokens and chunk must be >= 1, got {max_rows}, "
                             f"{max_batch_tokens}, {chunk}")
        self.max_rows, self.max_batch_tokens = int(max_rows), max_batch_tokens
        self.chunk = int(chunk or self.model.config.segment_len)

    def score_samples(self, samples: Sequence[Sample]) -> list[bool]:
        """Exact match per sample, in order."""
        return [bool(h.all()) for h in self.hits(samples)]

    def hits(self, samples: Sequence[Sample]) -> list[np.ndarray]:
        """Per sample, in order, ``[A]`` bool: is answer token ``i`` the argmax of the logits
        before it (float32, NaN as -inf, first index on ties: how greedy sampling takes it)?"""
        out = []
        for s, lg in zip(samples, self.answer_logits(samples)):
            pred = torch.nan_to_num(lg, nan=float("-inf")).argmax(-1).numpy()
            out.append(pred == np.asarray(s.tokens, dtype=np.int64)[answer_positions(s)])
        return out

    def answer_logits(self, samples: Sequence[Sample]) -> list[torch.Tensor]:
        """Per sample, in order, ``[A, V]`` float32 on the CPU: the logits before each answer token
        from one teacher-forced forward (samples of one length batched as rows)."""
        positions = [answer_positions(s) for s in samples]
        groups: dict[int, list[int]] = defaultdict(list)
        for i, s in enumerate(samples):
            groups[len(s)].append(i)
        out: list[torch.Tensor | None] = [None] * len(samples)
        m = self.model
        was_training = m.training
        m.eval()
        try:
            for length, idx in groups.items():
                rows = self.max_rows
                if self.max_batch_tokens is not None:
                    rows = max(1, min(rows, self.max_batch_tokens // length))
                for j in range(0, len(idx), rows):
                    part = idx[j:j + rows]
                    got = self._batch([samples[i] for i in part], [positions[i] for i in part])
                    for i, lg in zip(part, got):
                        out[i] = lg
        finally:
            m.train(was_training)
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def _batch(self, samples: list[Sample], positions: list[np.ndarray]) -> list[torch.Tensor]:
        """One forward over ``samples`` (equal lengths T) as B rows from a fresh state, ``chunk``
        tokens per call, keeping the logits at answer positions only; one copy to the host at the
        end. Returns per row ``[A, V]`` float32."""
        m, dev = self.model, self.device
        # [B, T-1] int32 on the device in one copy (a copy per chunk from pageable memory would make
        # the host wait for the device before launching each chunk); int64 per chunk
        x = torch.from_numpy(np.stack([np.asarray(s.tokens[:-1], dtype=np.int32) for s in samples])).to(dev)
        # logits at input position p predict token p + 1: answer token j is read at j - 1
        row = np.concatenate([np.full(len(p), r, dtype=np.int64) for r, p in enumerate(positions)])
        at = np.concatenate(positions) - 1
        order = np.argsort(at, kind="stable")  # by position, so each chunk's picks are one slice
        at_sorted = at[order]
        row_d = torch.from_numpy(row[order]).to(dev)
        at_d = torch.from_numpy(at_sorted).to(dev)
        picked = torch.empty(len(at), m.config.vocab_size, dtype=torch.float32, device=dev)  # [sum A, V]
        state = m.init_state(len(samples), dev)
        n_in = x.shape[1]
        with autocast_ctx(dev, self.bf16):
            for t0 in range(0, n_in, self.chunk):
                t1 = min(t0 + self.chunk, n_in)
                logits = m(x[:, t0:t1].long(), state=state, metrics=False).logits  # [B, t1 - t0, V]
                a, b = np.searchsorted(at_sorted, [t0, t1])
                if b > a:
                    picked[a:b] = logits[row_d[a:b], at_d[a:b] - t0].float()
        flat = torch.empty_like(picked, device="cpu")
        flat[torch.from_numpy(order)] = picked.cpu()
        bounds = np.cumsum([0] + [len(p) for p in positions])
        return [flat[bounds[r]:bounds[r + 1]] for r in range(len(samples))]


__all__ = ["TeacherForcedScorer", "answer_positions", "span_hits"]
