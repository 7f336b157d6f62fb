"""The decode loop's sampling and host work (issue 14): ``dnc.sampling.RowSampler`` draws every row of
a batch with its own parameters in a few device ops (each row keeps its own top-k / top-p cut and
distribution; seeded rows give the same tokens alone and in any batch), and a
``BatchDecoder.step`` reads the host once, whatever the number of rows."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

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


# ------------------------------------------------------------------------------------ seeded rows, batched
# Seeded rows are drawn in the batched path (issue 14): their own generator fills their row of the
# noise, every other op is batched. Each row keeps sample_next's tokens (the generator stream and the
# cut are unchanged) alone and in any batch, and a step's op count does not grow with seeded rows.
SEEDED_KINDS = [SamplingParams(0.9), SamplingParams(1.0, top_k=7), SamplingParams(0.8, top_p=0.9),
                SamplingParams(0.7, top_k=20, top_p=0.95), SamplingParams(1.3, top_p=0.3), SamplingParams(2.0, top_k=1)]
OTHER_KINDS = [SamplingParams(0.0), SamplingParams(1.0), SamplingParams(0.9, top_k=5), SamplingParams(1.1, top_p=0.7)]


def _step_logits(step: int, n: int, vocab: int, device: str) -> torch.Tensor:
    """[n, V] logits of one step: spread ones, bf16-rounded ones and one of six values (ties at the
    top-k / top-p cut), and rows that are not distributions (NaN, +inf) or have -inf entries."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(n, vocab, generator=g) * 3
    x[1::3] = x[1::3].bfloat16().float()
    x[3 % n] = torch.randint(0, 6, (vocab,), generator=g) / 2  # six values: every cut splits a tie
    if step % 5 == 0:
        x[2 % n, 3] = float("nan")
    if step % 7 == 0:
        x[0, 5] = float("inf")
    x[n // 2, ::4] = float("-inf")
    return x.to(device)


def _seeded_batch(n: int, device: str) -> tuple[list[SamplingParams], list[torch.Generator | None]]:
    """``n`` rows: even rows seeded (seed 50 + i, kinds cycling), odd rows greedy or unseeded."""
    params, gens = [], []
    for i in range(n):
        seeded = i % 2 == 0
        kinds = SEEDED_KINDS if seeded else OTHER_KINDS
        params.append(kinds[(i // 2) % len(kinds)])
        gens.append(torch.Generator(device=device).manual_seed(50 + i) if seeded else None)
    return params, gens


def _seeded_rows_match_sample_next(device: str, vocab: int = 300, n: int = 12, steps: int = 40):
    torch.manual_seed(4)
    params, gens = _seeded_batch(n, device)
    ref_gens = [torch.Generator(device=device).manual_seed(50 + i) if g is not None else None
                for i, g in enumerate(gens)]
    sampler = RowSampler(params, gens, vocab, device)
    for step in range(steps):
        logits = _step_logits(step, n, vocab, device)
        got = sampler.sample(logits).tolist()
        for i, (sp, g) in enumerate(zip(params, ref_gens)):
            if g is not None:
                want = sample_next(logits[i], sp.temperature, sp.top_k, sp.top_p, g)  # the per-row path (_draw)
                assert got[i] == want, (step, i, sp)
            elif sp.temperature == 0.0:
                assert got[i] == int(torch.nan_to_num(logits[i], nan=float("-inf")).argmax())


def test_seeded_rows_in_the_batched_draw_give_sample_next_tokens():
    """Over many steps (the generators advancing), with ties at the cuts and rows that fall back to
    their argmax: every seeded row's token is the one ``sample_next`` draws with the same generator."""
    _seeded_rows_match_sample_next("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_seeded_rows_in_the_batched_draw_give_sample_next_tokens_on_cuda():
    """On CUDA too (there ``logits / t`` is a multiply by the reciprocal: the sampler scales alike),
    with a vocabulary past the sort's small-slice size."""
    _seeded_rows_match_sample_next("cuda")
    _seeded_rows_match_sample_next("cuda", vocab=5000, n=8, steps=10)


def _streams(rows: list[int], device: str, vocab: int = 64, steps: int = 50) -> dict[int, list[int]]:
    """Tokens over ``steps`` steps of the rows ``rows`` of ``_seeded_batch(64)`` sampled together as
    one batch, in that order; row j starts from token 7 + j and its logits depend only on its
    previous token, so a row's stream depends on nothing else when its draws don't."""
    params, gens = _seeded_batch(64, device)
    # the next step's logits from the previous token: [V, V]
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(9)).mul(2).to(device)
    sampler = RowSampler([params[j] for j in rows], [gens[j] for j in rows], vocab, device)
    prev = torch.tensor([(7 + j) % vocab for j in rows], device=device)
    torch.manual_seed(len(rows))  # the unseeded rows draw differently from batch to batch: no matter
    out = []
    for _ in range(steps):
        prev = sampler.sample(table[prev])
        out.append(prev.tolist())
    return {j: [step[pos] for step in out] for pos, j in enumerate(rows)}


def test_a_seeded_row_gives_the_same_tokens_alone_and_in_batches_of_8_and_64():
    """Every seeded row (even rows: each kind of SEEDED_KINDS) alone, then among greedy, unseeded
    and other seeded rows in batches of 8 and 64 (there in reverse order: other positions)."""
    seeded = list(range(0, 64, 2))
    alone = {j: _streams([j], "cpu")[j] for j in seeded}
    for rows in (list(range(8)), list(range(64))[::-1]):
        got = _streams(rows, "cpu")
        for j in set(rows) & set(seeded):
            assert got[j] == alone[j], (len(rows), j)
    assert all(len(set(s)) > 5 for j, s in alone.items() if SEEDED_KINDS[(j // 2) % len(SEEDED_KINDS)].top_k != 1)


def test_seeded_rows_in_the_decode_loop_alone_and_in_batches_of_8_and_64(model):
    """The decode loop: two seeded rows (top-k; top-p with a history) give their solo tokens in
    batches of 8 and 64 rows of every kind (greedy, unseeded, other seeded rows)."""
    alone = [solo(model, kw).tokens for kw in _seeded(model)]
    kinds = [SamplingParams(0.0), SamplingParams(1.0), SamplingParams(0.8, top_k=5), SamplingParams(1.0, top_p=0.6)]
    for n in (8, 64):
        torch.manual_seed(n)
        seeded = [DecodeRow(**kw) for kw in _seeded(model)]
        others = [DecodeRow(prompt_ids(200 + i, 6), None, 22, kinds[i % 4], seed=300 + i if i % 2 else None)
                  for i in range(n - 2)]
        dec = BatchDecoder(model)
        dec.add(others[:n // 2] + [seeded[0]] + others[n // 2:] + [seeded[1]])
        list(dec.run())
        assert [r.tokens for r in seeded] == alone, n


class _AtenOps(TorchDispatchMode):
    """Counts the aten ops run under it, by name."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_a_sampling_step_runs_the_same_ops_for_8_and_64_seeded_rows():
    """Only the seeded rows' noise draws (one ``exponential_`` each, from their own generator) grow
    with the rows: the other ops of a step are the same for 8 and 64 seeded rows (and for 1)."""
    counts = {}
    for n_seeded in (1, 8, 64):
        params, gens = _seeded_batch(2 * n_seeded, "cpu")  # n_seeded seeded rows, as many greedy / unseeded
        sampler = RowSampler(params, gens, 300, "cpu")
        logits = _step_logits(1, 2 * n_seeded, 300, "cpu")
        sampler.sample(logits)
        with _AtenOps() as mode:
            sampler.sample(logits)
        counts[n_seeded] = mode.ops
    for n_seeded, ops in counts.items():
        draws = sum(v for k, v in ops.items() if k.startswith("exponential_"))
        assert draws == n_seeded + (n_seeded > 1), (n_seeded, ops)  # + one global draw when there are unseeded rows
    rest = {n: {k: v for k, v in ops.items() if not k.startswith("exponential_")} for n, ops in counts.items()}
    assert rest[8] == rest[64] and sum(rest[64].values()) < 40, rest
