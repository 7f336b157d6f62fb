"""Prompts and histories the decode-loop tests share (imported by test_generate, test_decode_ragged,
test_decode_graphs, test_self_read and test_forward_read; pytest puts tests/ on sys.path)."""

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


def generate_and_greedy_calls(model, x: torch.Tensor, prefix: int, new_tokens: int):
    """Two batch-1 states fed ``x[:, :prefix]``; then ``model.generate`` from one (the batched
    decoder's ragged step) and greedy decoding through plain model calls from the other, each
    ``new_tokens`` long after ``x[:, prefix:]``. Returns (generated ids, greedy ids, its state,
    the reference state)."""
    s_gen, s_ref = model.init_state(1), model.init_state(1)
    with torch.no_grad():
        model(x[:, :prefix], state=s_gen)
        model(x[:, :prefix], state=s_ref)
        got = model.generate(x[0, prefix:].tolist(), state=s_gen, max_new_tokens=new_tokens, temperature=0.0)
        lg = model(x[:, prefix:], state=s_ref, last_logits_only=True).logits[0, -1]
        want = []
        for _ in range(new_tokens):
            want.append(int(lg.argmax()))
            lg = model(torch.tensor([[want[-1]]]), state=s_ref, last_logits_only=True).logits[0, -1]
    return got, want, s_gen, s_ref


def assert_causal(model, x: torch.Tensor, positions) -> None:
    """Changing token j of ``x`` [1, T] never changes ``model``'s logits before j, and does change
    them from j on, for each j in ``positions``."""
    with torch.no_grad():
        base = model(x).logits
        for j in positions:
            y = x.clone()
            y[0, j] = (y[0, j] + 1) % 256
            out = model(y).logits
            assert torch.equal(out[:, :j], base[:, :j]), j
            assert not torch.allclose(out[:, j:], base[:, j:]), j


def assert_no_host_sync(model, rb, steps: int = 3) -> None:
    """``ragged_decode_step(model, rb)`` ``steps`` times under CUDA's sync debug mode "error" (a host
    sync raises), after one untimed step that makes the cached constants (rope table, query tail,
    a compiled kernel): the step a decode graph captures must not synchronise with the host."""
    import torch

    from dnc.ragged import ragged_decode_step

    with torch.no_grad():
        ragged_decode_step(model, rb)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(steps):
                ragged_decode_step(model, rb)
        finally:
            torch.cuda.set_sync_debug_mode("default")
