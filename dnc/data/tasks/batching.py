"""Samples -> a padded next-token batch (:func:`collate`)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from dnc.data.tasks.builder import Sample
from dnc.data.tasks.vocab import PAD


def collate(samples: Sequence[Sample], pad_id: int | None = None,
            pad_to_multiple: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded next-token batch.

    Returns (``T`` = longest sample - 1, rounded up to ``pad_to_multiple``):
      ``tokens`` LongTensor ``[B, T]``: inputs ``sample.tokens[:-1]``, then ``pad_id``;
      ``targets`` LongTensor ``[B, T]``: ``sample.tokens[1:]`` where the loss mask is True, else -100;
      ``loss_mask`` BoolTensor ``[B, T]``: ``sample.loss_mask[1:]`` (False on padding);
      ``lengths`` LongTensor ``[B]``: valid input positions (``len(sample) - 1``);
      ``answer_start`` LongTensor ``[B]``: ``sample.answer_start`` (index in the unshifted sequence).
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
    pad = PAD if pad_id is None else int(pad_id)
    lens = np.array([len(s) - 1 for s in samples], dtype=np.int64)
    if lens.min() < 1:
        raise ValueError("every sample needs at least 2 tokens")
    T = int(math.ceil(lens.max() / pad_to_multiple) * pad_to_multiple)
    B = len(samples)
    tokens = np.full((B, T), pad, dtype=np.int64)
    targets = np.full((B, T), -100, dtype=np.int64)
    mask = np.zeros((B, T), dtype=bool)
    for i, s in enumerate(samples):
        n = lens[i]
        tokens[i, :n] = s.tokens[:-1]
        m = s.loss_mask[1:]
        mask[i, :n] = m
        targets[i, :n] = np.where(m, s.tokens[1:], -100)
    return {
        "tokens": torch.from_numpy(tokens),
        "targets": torch.from_numpy(targets),
        "loss_mask": torch.from_numpy(mask),
        "lengths": torch.from_numpy(lens),
        "answer_start": torch.tensor([s.answer_start for s in samples], dtype=torch.long),
    }
