"""The decode loop's sampling and host work (issue 14): ``dnc.sampling.RowSampler`` draws every row of
a batch with its own parameters in a few device ops (each row keeps its own top-k / top-p cut and
distribution; seeded rows give the same tokens alone and in any batch), and a
``BatchDecoder.step`` reads the host once, whatever the number of rows."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from dnc.config import preset
from dnc.generate import BatchDecoder, DecodeRow, SamplingParams
from dnc.model import DNC
from dnc.sampling import RowSampler, _filtered_logits, multinomial1, sample_next
from decode_helpers import history_state, prompt_ids, solo

SEG = 16


@pytest.fixture(scope="module")
def model() -> DNC:
    torch.manual_seed(0)
    return DNC(preset("tiny", segment_len=SEG, l0_slots=32, l1_slots=16, l2_slots=8)).eval()


def _allowed(row: torch.Tensor, sp: SamplingParams) -> set[int]:
    """Tokens ``sample_next`` can draw for ``row`` (the finite logits after its cut)."""
    greedy, t, k, p = sp.normalized(row.numel())
    if greedy:
        return {int(row.argmax())}
    return set(torch.isfinite(_filtered_logits(row.float(), t, k, p)).nonzero().flatten().tolist())


# ------------------------------------------------------------------------------------ RowSampler
def test_batched_rows_keep_each_rows_own_cut():
    torch.manual_seed(1)
    logits = torch.randn(6, 40) * 3
    params = [SamplingParams(0.0), SamplingParams(1.0, top_k=5), SamplingParams(1.0, top_p=0.5),
              SamplingParams(0.8, top_k=10, top_p=0.7), SamplingParams(1.3), SamplingParams(2.0, top_k=1)]
    sampler = RowSampler(params, [None] * 6, 40, "cpu")
    allowed = [_allowed(logits[i], sp) for i, sp in enumerate(params)]
    seen = [set() for _ in params]
    for _ in range(300):
        for i, tok in enumerate(sampler.sample(logits).tolist()):
            assert tok in allowed[i], (i, params[i])
            seen[i].add(tok)
    assert len(allowed[1]) == 5 and len(allowed[2]) < 40 and len(allowed[5]) == 1
    assert seen[1] == allowed[1]  # every one of the top 5 comes up in 300 draws ...
    assert len(seen[4]) > 10      # ... and plain temperature rows spread over the vocabulary


def test_batched_draw_follows_each_rows_distribution():
    """Many copies of two rows in one batch (one multinomial): the token frequencies are the
    probabilities ``sample_next`` draws from, for each set of parameters."""
    torch.manual_seed(2)
    base = torch.randn(2, 30) * 2
    sps = [SamplingParams(0.7, top_k=6, top_p=0.9), SamplingParams(1.5, top_p=0.8)]
    n = 4000
    logits = base.repeat_interleave(n, 0)
    toks = RowSampler([sps[0]] * n + [sps[1]] * n, [None] * (2 * n), 30, "cpu").sample(logits)
    for j, sp in enumerate(sps):
        _, t, k, p = sp.normalized(30)
        want = _filtered_logits(base[j], t, k, p).softmax(-1)
        got = torch.bincount(toks[j * n:(j + 1) * n], minlength=30).float() / n
        assert (got - want).abs().max() < 0.03, (j, got, want)  # binomial sd <= 0.008 at n = 4000
        assert got[want == 0].sum() == 0


def test_seeded_rows_draw_as_sample_next_whatever_the_batch():
    logits = torch.randn(5, 40)
    sp = SamplingParams(0.9, top_k=12, top_p=0.9)
    want = [sample_next(logits[2], sp.temperature, sp.top_k, sp.top_p, torch.Generator().manual_seed(7)) for _ in range(1)]
    others = [SamplingParams(0.0), SamplingParams(1.0), SamplingParams(1.2, top_k=3), SamplingParams(0.5, top_p=0.5)]
    for gens_others in ([None] * 4, [torch.Generator().manual_seed(s) for s in range(4)]):
        params = others[:2] + [sp] + others[2:]
        gens = gens_others[:2] + [torch.Generator().manual_seed(7)] + gens_others[2:]
        assert RowSampler(params, gens, 40, "cpu").sample(logits)[2].item() == want[0]


# ------------------------------------------------------------------------------------ decode loop


def _seeded(model):
    return [dict(prompt_ids=prompt_ids(1, 7), max_new_tokens=24, sampling=SamplingParams(0.9, top_k=20), seed=5),
            dict(prompt_ids=prompt_ids(2, 5), state=history_state(model, 3, 29), max_new_tokens=20,
                 sampling=SamplingParams(1.1, top_p=0.8), seed=6)]


def test_seeded_rows_give_the_same_tokens_alone_and_in_any_batch(model):
    """Seeded rows among unseeded sampled rows (one batched draw from the global RNG), greedy rows and
    other seeded rows, in either order: each seeded row's tokens are those it gets alone."""
    alone = [solo(model, kw).tokens for kw in _seeded(model)]
    for order in (0, 1):
        torch.manual_seed(100 + order)  # the unseeded rows draw differently each time: no matter
        others = [DecodeRow(prompt_ids(10 + i, 6), None, 22, sp) for i, sp in enumerate(
            [SamplingParams(1.0), SamplingParams(0.0), SamplingParams(0.8, top_k=5), SamplingParams(1.0, top_p=0.6)])]
        seeded = [DecodeRow(**kw) for kw in _seeded(model)]
        rows = seeded + others if order == 0 else others[:2] + seeded[::-1] + others[2:]
        dec = BatchDecoder(model)
        dec.add(rows)
        list(dec.run())
        assert [r.tokens for r in seeded] == alone
        assert all(r.finish_reason == "length" for r in rows)


def test_forced_greedy_and_seeded_rows_in_one_batch(model):
    greedy_kw = dict(prompt_ids=prompt_ids(30, 9), max_new_tokens=25, sampling=SamplingParams(0.0))
    seeded_kw = _seeded(model)[0]
    forced_tokens = prompt_ids(31, 18)
    forced_kw = dict(prompt_ids=prompt_ids(32, 4), max_new_tokens=40, forced=forced_tokens,
                     sampling=SamplingParams(1.0), seed=3)
    alone = [solo(model, kw) for kw in (greedy_kw, seeded_kw, forced_kw)]
    rows = [DecodeRow(**greedy_kw), DecodeRow(**forced_kw), DecodeRow(**seeded_kw)]
    dec = BatchDecoder(model)
    dec.add(rows)
    list(dec.run())
    assert rows[1].tokens == forced_tokens == alone[2].tokens and rows[1].finish_reason == "length"
    assert rows[0].tokens == alone[0].tokens and rows[2].tokens == alone[1].tokens


def test_rows_ending_together_by_stop_tokens_free_the_batch(model):
    """Every row ends on a stop token in the same step with no state to write back: the model step
    launched for them is dropped and the decoder is empty."""
    p = prompt_ids(40, 6)
    free = solo(model, dict(prompt_ids=p, max_new_tokens=10, sampling=SamplingParams(0.0))).tokens
    rows = [DecodeRow(p, None, 10, SamplingParams(0.0), stop_tokens=frozenset({free[3]})) for _ in range(3)]
    dec = BatchDecoder(model)
    dec.add(rows)
    list(dec.run())
    first = free.index(free[3])
    assert all(r.tokens == free[:first + 1] and r.finish_reason == "eos" for r in rows)
    assert not dec.running and dec.batches == []


class _HostReads(TorchFunctionMode):
    """Counts tensor -> Python reads (each a device sync on CUDA) and tensors built from Python values."""

    def __init__(self):
        super().__init__()
        self.reads = self.builds = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        self.reads += name in ("tolist", "item", "__int__", "__bool__", "__float__", "__index__")
        self.builds += name == "tensor"
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("n_rows", [3, 12])
def test_a_decode_step_reads_the_host_once_whatever_the_rows(model, n_rows):
    """Greedy, temperature, top-k/top-p and seeded rows: once the batch is formed, a step (without a
    segment commit) reads the step's tokens back once and builds no tensor from Python values."""
    kinds = [SamplingParams(0.0), SamplingParams(0.9), SamplingParams(1.0, top_k=8), SamplingParams(0.8, top_p=0.9)]
    rows = [DecodeRow(prompt_ids(50 + i, 5), None, 60, kinds[i % 4], seed=i if i % 3 == 2 else None)
            for i in range(n_rows)]
    dec = BatchDecoder(model)
    dec.add(rows)
    dec.step()  # the batch's sampler is made on its first step
    checked = 0
    for _ in range(2 * SEG):
        commits, mode = dec.commits, _HostReads()
        with mode:
            out = dec.step()
        assert len(out) == n_rows
        if dec.commits == commits:  # a commit reads its rows' states (once per row per segment)
            assert (mode.reads, mode.builds) == (1, 0)
            checked += 1
    assert checked >= SEG


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphed_decode_step_syncs_the_host_at_most_once():
    """On CUDA with decode graphs: the tokens are those of the eager decoder, and a steady step (no
    commit, graph captured) has at most one synchronising op (the step's tokens coming back)."""
    def rows(m):
        kinds = [SamplingParams(0.0), SamplingParams(0.9), SamplingParams(1.0, top_k=8), SamplingParams(0.8, top_p=0.9)]
        return [DecodeRow(prompt_ids(60 + i, 5), None, 40, kinds[i % 4], seed=i) for i in range(6)]

    torch.manual_seed(0)
    m = DNC(preset("tiny", segment_len=SEG, l0_slots=32, l1_slots=16, l2_slots=8)).cuda().eval()
    eager = rows(m)
    dec = BatchDecoder(m)
    dec.add(eager)
    list(dec.run())
    m.enable_cuda_graphs()
    graphed = rows(m)
    dec = BatchDecoder(m)
    dec.add(graphed)
    for _ in range(3):  # eager warm-up, capture, first replay
        dec.step()
    import warnings
    checked = 0
    while dec.running:
        commits = dec.commits
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                dec.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        if dec.commits == commits and dec.running:
            assert sum("synchroniz" in str(w.message) for w in caught) <= 1, [str(w.message) for w in caught]
            checked += 1
    assert checked >= 10 and m.decode_runner.replays >= checked
    assert [r.tokens for r in graphed] == [r.tokens for r in eager]


def _multinomial_matches(device: str):
    torch.manual_seed(3)
    logits = torch.randn(4, 300, device=device) * 2
    logits[1, 7] = float("nan")  # _safe_probs makes it a one-hot row
    from dnc.sampling import _safe_probs
    probs = _safe_probs(logits / 0.8)
    for seed in range(50):
        g1 = torch.Generator(device=device).manual_seed(seed)
        g2 = torch.Generator(device=device).manual_seed(seed)
        assert multinomial1(probs, g1).tolist() == torch.multinomial(probs, 1, generator=g2).squeeze(1).tolist()
        for i in (0, 2):  # one row at a time, as seeded rows draw
            assert multinomial1(probs[i:i + 1], g1).item() == torch.multinomial(probs[i:i + 1], 1, generator=g2).item()


def test_multinomial1_is_torch_multinomial_without_its_host_syncs():
    """The sync-free draw gives a seeded generator's very tokens (so seeds keep their tokens)."""
    _multinomial_matches("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_multinomial1_is_torch_multinomial_on_cuda():
    _multinomial_matches("cuda")
