"""Prompts and histories the decode-loop tests share (imported by test_generate, test_decode_ragged
and test_decode_graphs; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch


def prompt_ids(seed: int, n: int) -> list[int]:
    """``n`` byte token ids drawn with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), generator=g).tolist()


def history_state(model, seed: int, n: int):
    """A batch-1 state of ``model`` after ``n`` tokens of :func:`prompt_ids` ``(seed, n)``."""
    state = model.init_state(1)
    with torch.no_grad():
        model(torch.tensor([prompt_ids(seed, n)], device=model.device), state=state)
    return state


def solo(model, row_kw: dict):
    """One ``DecodeRow(**row_kw)`` decoded alone by its own ``BatchDecoder``, to the end."""
    from dnc.generate import BatchDecoder, DecodeRow

    row = DecodeRow(**row_kw)
    dec = BatchDecoder(model)
    dec.add([row])
    list(dec.run())
    return row
