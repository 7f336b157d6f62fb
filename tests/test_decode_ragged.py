"""dnc.ragged: rows of different layouts (segment position, bank fill, clock, tokens seen) decode in
one model call and get what each gets alone, across segment boundaries, compressions and evictions;
rows never see each other; BatchDecoder batches them whatever their layouts."""

from __future__ import annotations

import pytest
import torch

from dnc.config import preset
from dnc.generate import BatchDecoder, DecodeRow, SamplingParams
from dnc.model import DNC
from dnc.ragged import RaggedBatch, bucket_for, ragged_decode_step
from decode_helpers import history_state, prompt_ids

SEG = 16


def _model(**kw) -> DNC:
    torch.manual_seed(0)
    # small segments and banks: a few dozen tokens cross segment boundaries, fill L0, compress, evict
    return DNC(preset("tiny", segment_len=SEG, l0_slots=32, l1_slots=16, l2_slots=8, **kw)).eval()


@pytest.fixture(scope="module")
def model() -> DNC:
    return _model()




def _assert_same_state(a, b, tol=1e-5):
    ea, eb = a.export(), b.export()
    assert ea.keys() == eb.keys()
    for k in ea:
        torch.testing.assert_close(ea[k].float(), eb[k].float(), atol=tol, rtol=tol, msg=k)


@torch.no_grad()
def _reference(model, state, first_logits, steps):
    """Greedy decoding of one row through the plain model call, token by token: (tokens, logits [V] per step)."""
    tokens, logits, lg = [], [], first_logits
    for _ in range(steps):
        tok = int(lg.argmax())
        tokens.append(tok)
        lg = model(torch.tensor([[tok]]), state=state, last_logits_only=True, metrics=False).logits[0, -1]
        logits.append(lg)
    return tokens, logits


# (history seed, history length): different segment positions, bank fills and clocks; 0 = fresh
HISTORIES = [(None, 0), (40, 5), (41, 37), (42, 70), (43, 16 * 9 + 3), (44, 31)]


def _rows(model):
    """Per row: a batch-1 state holding its history and a prompt, and the next-token logits."""
    out = []
    for i, (seed, n) in enumerate(HISTORIES):
        state = model.init_state(1) if seed is None else history_state(model, seed, n)
        with torch.no_grad():
            lg = model(torch.tensor([prompt_ids(100 + i, 3 + i)]), state=state, last_logits_only=True,
                       metrics=False).logits[0, -1]
        out.append((state, lg))
    return out


def _feed_and_compare(model, batch, want, steps: int) -> None:
    """Feed each row's reference tokens through ragged steps; every step's logits must match the
    row decoded alone (``want[i] = (tokens, logits)``)."""
    with torch.no_grad():
        for t in range(steps):
            batch.tokens[:] = torch.tensor([w[0][t] for w in want])
            lg = ragged_decode_step(model, batch)
            batch.after_step(model)
            for i, w in enumerate(want):
                torch.testing.assert_close(lg[i], w[1][t], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kw", [{}, {"kv_window": 8}, {"self_read": True}, {"self_read": True, "kv_window": 8}],
                         ids=["no-window", "kv-window", "self-read", "self-read-kv-window"])
def test_ragged_step_equals_each_row_alone(kw):
    """Six rows at different positions, one ragged step each token for 60 tokens (every row crosses
    several segment boundaries, compresses into L1/L2 and evicts from L2): every step's logits match
    the row decoded alone through the plain model call, and so do the final states."""
    model = _model(**kw)
    steps = 60
    rows = _rows(model)
    layouts = {s.layout() for s, _ in rows}
    assert len(layouts) == len(rows)  # really different layouts
    ref_states = [s.select([0]) for s, _ in rows]  # copies: the reference decodes into these
    want = [_reference(model, st, lg, steps) for st, (_, lg) in zip(ref_states, rows)]
    batch = RaggedBatch(model, bucket_for(len(rows)))
    assert batch.capacity == 8  # two padding slots
    for i, (s, lg) in enumerate(rows):
        batch.insert(i, s, lg, model)
    commits = compressed = evicted = 0
    with torch.no_grad():
        for t in range(steps):
            toks = batch.logits[:len(rows)].argmax(-1)
            assert toks.tolist() == [w[0][t] for w in want], f"step {t}"
            batch.tokens[:len(rows)] = toks
            logits = ragged_decode_step(model, batch)
            batch.logits.copy_(logits)
            stats = batch.after_step(model)
            commits, compressed, evicted = (commits + stats["committed"], compressed + stats["compressed"],
                                            evicted + stats["evicted"])
            for i, w in enumerate(want):
                torch.testing.assert_close(logits[i], w[1][t], atol=1e-4, rtol=1e-4, msg=f"row {i} step {t}")
    assert commits >= len(rows) * (steps // SEG)
    assert compressed > 0 and evicted > 0  # the rows' own commits compressed and evicted
    for i, ref in enumerate(ref_states):
        got = batch.extract(i)
        _assert_same_state(got, ref)
        assert (got.seg_pos, got.tokens_seen, got.segments) == (ref.seg_pos, ref.tokens_seen, ref.segments)
    assert any(b.sizes[2] > 0 for _, b in ref_states[4].banks())  # compressed down to L2


def test_rows_never_see_each_other(model):
    """Changing one row's state (another history) changes nothing in the other rows' logits."""
    results = []
    for other in (50, 51):
        rows = _rows(model)
        rows[2] = (history_state(model, other, 37), rows[2][1])
        batch = RaggedBatch(model, 8)
        for i, (s, lg) in enumerate(rows):
            batch.insert(i, s, lg, model)
        seen = []
        with torch.no_grad():
            for t in range(40):
                batch.tokens[:len(rows)] = torch.tensor(prompt_ids(300 + t, len(rows)))  # the same tokens both times
                seen.append(ragged_decode_step(model, batch))
                batch.after_step(model)
        results.append(torch.stack(seen))
    a, b = results
    others = [i for i in range(len(HISTORIES)) if i != 2]
    assert torch.equal(a[:, others], b[:, others])
    assert not torch.allclose(a[:, 2], b[:, 2])  # the changed row itself does differ


def test_free_slots_stay_put_and_garbage_does_not_leak(model):
    """A free slot's counters do not move, and NaN in a freed slot's tensors reaches no other row."""
    rows = _rows(model)[:3]
    batch = RaggedBatch(model, 4)
    for i, (s, lg) in enumerate(rows):
        batch.insert(i, s, lg, model)
    want = [_reference(model, s.select([0]), lg, 5)[1] for s, lg in rows[:2]]
    batch.release(2)
    for lb in batch.layers:
        lb.k[2:].fill_(float("nan"))
        lb.prev_x[2:].fill_(float("nan"))
    with torch.no_grad():
        for t in range(5):
            batch.tokens[:2] = batch.logits[:2].argmax(-1)
            batch.logits.copy_(ragged_decode_step(model, batch))
            batch.after_step(model)
            for i in range(2):
                torch.testing.assert_close(batch.logits[i], want[i][t], atol=1e-4, rtol=1e-4)
    assert batch.length[2:].tolist() == [0, 0] and batch.seg_pos[2:].tolist() == [0, 0]


def test_decoder_batches_rows_of_every_layout_in_one_call(model):
    """BatchDecoder: rows with different histories and prompt lengths share one model call, their
    tokens and final states are those of each row alone (max_batch=1)."""
    def make():
        return [DecodeRow(prompt_ids(200 + i, 2 + 2 * i), None if s is None else history_state(model, s, n), 30 + 3 * i,
                          SamplingParams(0.0) if i % 2 else SamplingParams(0.9), seed=i)
                for i, (s, n) in enumerate(HISTORIES)]
    solo = make()
    for r in solo:
        dec = BatchDecoder(model, max_batch=1)
        dec.add([r])
        list(dec.run())
    rows = make()
    dec = BatchDecoder(model)
    assert dec.add(rows) == []
    assert dec.batch_sizes() == [len(rows)]
    sizes = []
    while dec.running:
        sizes.append(dec.batch_sizes())
        dec.step()
    assert sizes[0] == [6] and sizes[-1] == [1]  # rows leave as they finish; the rest stay one batch
    assert dec.commits >= 6
    for s, r in zip(solo, rows):
        assert r.tokens == s.tokens and r.finish_reason == s.finish_reason == "length"
        if r.state is not None:
            _assert_same_state(r.state, s.state)


def test_rows_join_between_steps_and_buckets_grow_and_shrink(model):
    """Continuous batching: rows added while others run join the same batch (growing it to the next
    bucket), leave it as they finish (shrinking it), and each gets its solo tokens."""
    def row(i, n_new):
        return DecodeRow(prompt_ids(400 + i, 3 + i % 5), history_state(model, 500 + i, 7 * i + 1), n_new, SamplingParams(0.0))
    want = []
    for i in range(11):
        r = row(i, 12 + 2 * i)
        dec = BatchDecoder(model)
        dec.add([r])
        list(dec.run())
        want.append(r.tokens)
    rows = [row(i, 12 + 2 * i) for i in range(11)]
    dec = BatchDecoder(model, shrink_after=1)  # a bucket the rows fit at once (tests/test_decode_churn.py: later)
    dec.add(rows[:1])
    capacities = []
    for i in range(1, 11):  # one more row every step
        dec.step()
        dec.add([rows[i]])
        capacities.append(dec.batches[0].rb.capacity)
        assert len(dec.batches) == 1 and dec.batch_sizes() == [i + 1]
    while dec.running:
        dec.step()
        if dec.batches:
            capacities.append(dec.batches[0].rb.capacity)
    assert [1, 2, 4, 8, 16] == sorted(set(capacities))[:5]
    assert capacities[-1] == 1  # shrunk back as rows left
    assert [r.tokens for r in rows] == want


@pytest.mark.parametrize("chunk", [SEG, 7])
def test_chunked_prefill_equals_one_shot_and_does_not_stall_running_rows(model, chunk):
    """A long prompt added with prefill_chunk is fed a chunk per step while a running row keeps
    emitting a token every step; the result equals one-shot prefill (tokens and final state)."""
    long_prompt = prompt_ids(600, 5 * SEG + 7)
    one_shot = DecodeRow(long_prompt, history_state(model, 601, 9), 20, SamplingParams(0.0))
    dec = BatchDecoder(model)
    dec.add([one_shot])
    list(dec.run())

    runner = DecodeRow(prompt_ids(602, 4), history_state(model, 603, 20), 40, SamplingParams(0.0))
    dec = BatchDecoder(model)
    dec.add([runner])
    chunked = DecodeRow(long_prompt, history_state(model, 601, 9), 20, SamplingParams(0.0))
    assert dec.add([chunked], prefill_chunk=chunk) == []
    fed = []
    while chunked.tokens == []:
        before = len(runner.tokens)
        fed.append(dec.prefilling[0].fed if dec.prefilling else None)
        dec.step()
        assert len(runner.tokens) == before + 1  # the running row was not stalled
    list(dec.run())
    assert len(fed) >= len(long_prompt) // chunk  # the prompt took several steps
    assert chunked.tokens == one_shot.tokens
    _assert_same_state(chunked.state, one_shot.state)
    solo = DecodeRow(prompt_ids(602, 4), history_state(model, 603, 20), 40, SamplingParams(0.0))
    d = BatchDecoder(model)
    d.add([solo])
    list(d.run())
    assert runner.tokens == solo.tokens


def test_chunked_prefill_chunks_end_at_segment_boundaries(model):
    """With prefill_chunk >= segment_len, chunks after the first start at a segment boundary (whole
    segments are what the CUDA-graph prefill replays); a prompt at seg_pos 9 first tops its segment up."""
    state = history_state(model, 700, 9)
    row = DecodeRow(prompt_ids(701, 4 * SEG), state, 3, SamplingParams(0.0))
    dec = BatchDecoder(model)
    dec.add([row], prefill_chunk=SEG)
    positions = []
    while dec.prefilling:
        positions.append(dec.prefilling[0].state.seg_pos)
        dec.step()
    assert positions[0] == 9 and all(p == 0 for p in positions[1:])
    with pytest.raises(ValueError, match="prefill_chunk must be a positive int"):
        dec.add([DecodeRow([1, 2], None, 3)], prefill_chunk=0)


def test_cancel_and_failures_leave_callers_state_alone(model):
    """A cancelled (or prefilling and cancelled) row does not touch the state it was given; a state of
    another model fails that row alone."""
    state = history_state(model, 800, 21)
    before = state.export()
    a = DecodeRow(prompt_ids(801, 5), state, 50, SamplingParams(0.0))
    b = DecodeRow(prompt_ids(802, 5), None, 6, SamplingParams(0.0))
    c = DecodeRow(prompt_ids(803, 40), history_state(model, 804, 3), 6, SamplingParams(0.0))
    other = DNC(preset("tiny", segment_len=SEG, l0_slots=32, l1_slots=16, l2_slots=8, n_heads=2)).eval()
    foreign = DecodeRow(prompt_ids(805, 5), history_state(other, 806, 3), 6, SamplingParams(0.0))
    dec = BatchDecoder(model)
    failed = dec.add([a, b, foreign])
    assert failed == [foreign] and foreign.finish_reason == "error"
    dec.add([c], prefill_chunk=8)
    for _ in range(3):
        dec.step()
    dec.drop([a, c])
    assert a.finish_reason == c.finish_reason == "cancelled" and not dec.prefilling
    list(dec.run())
    assert b.finish_reason == "length" and len(b.tokens) == 6
    after = state.export()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("self_read", [False, True], ids=["bank", "self-read"])
def test_salience_positions_follow_each_rows_segment_position(self_read):
    """segment_len 128 samples the read mass at every other position (stride 2): rows at odd and even
    positions in one step accumulate it only where each would alone (the pending mass in their states;
    with self_read, the mass on the bank's slots only, the segment's own writes sharing the read)."""
    torch.manual_seed(0)
    model = DNC(preset("tiny", segment_len=128, l0_slots=128, l1_slots=64, l2_slots=32, self_read=self_read)).eval()
    rows = []
    for i, n in enumerate((130, 131, 200, 257)):  # + 1 prompt token: segment positions 3, 4, 73, 2
        state = history_state(model, 900 + i, n)
        with torch.no_grad():
            lg = model(torch.tensor([[5 + i]]), state=state, last_logits_only=True, metrics=False).logits[0, -1]
        rows.append((state, lg))
    refs = [s.select([0]) for s, _ in rows]
    want = [_reference(model, st, lg, 9) for st, (_, lg) in zip(refs, rows)]
    batch = RaggedBatch(model, 4)
    for i, (s, lg) in enumerate(rows):
        batch.insert(i, s, lg, model)
    _feed_and_compare(model, batch, want, 9)
    for i, ref in enumerate(refs):
        got = batch.extract(i)
        assert any(ls.mass is not None for ls in got.layers)
        _assert_same_state(got, ref)


def test_rows_reaching_a_boundary_together_commit_as_one_batch(model):
    """Rows whose states share a layout (sessions started together) commit in one model call; each
    still gets what it gets alone, and a row of another layout committing in the same step too."""
    def make():
        rows = []
        for i in range(4):
            hist = 21 if i < 3 else 5  # three rows of one layout, one of another, all at segment position 6
            st = history_state(model, 1000 + i, hist)
            with torch.no_grad():
                lg = model(torch.tensor([[7 + i]]), state=st, last_logits_only=True, metrics=False).logits[0, -1]
            rows.append((st, lg))
        return rows
    rows = make()
    assert len({s.layout() for s, _ in rows}) == 2
    refs = [s.select([0]) for s, _ in rows]
    want = [_reference(model, st, lg, 30) for st, (_, lg) in zip(refs, rows)]
    batch = RaggedBatch(model, 4)
    for i, (s, lg) in enumerate(rows):
        batch.insert(i, s, lg, model)
    calls = []
    commit = model.commit_segment
    model.commit_segment = lambda st: calls.append(st.batch_size) or commit(st)
    try:
        _feed_and_compare(model, batch, want, 30)
    finally:
        del model.commit_segment
    assert sorted(calls) == [1, 1, 3, 3]  # two boundaries: the three alike together, the other alone
    for i, ref in enumerate(refs):
        _assert_same_state(batch.extract(i), ref)
