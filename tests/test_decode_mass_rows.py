"""A decode step computes the read mass (salience statistics) only for its rows at a salience
position (``RaggedBatch.mass_rows``), not for every row every step: the same logits and states as
the rule before (``mass_gather=False``: every row's mass, dropped where not sampled), token for
token, across segment boundaries, compressions and evictions, with and without self_read."""

from __future__ import annotations

import pytest
import torch

from dnc.config import preset
from dnc.model import DNC
from dnc.ragged import RaggedBatch, ragged_decode_step
from decode_helpers import history_state

SEG = 128  # stride 2: the mass is kept at every other segment position


def _model(**kw) -> DNC:
    torch.manual_seed(0)
    # a small bank: a segment's commit overflows L0, compresses into L1/L2 and evicts from L2
    return DNC(preset("tiny", segment_len=SEG, l0_slots=128, l1_slots=64, l2_slots=32, **kw)).eval()


def _batch(model, rows, gather: bool) -> RaggedBatch:
    batch = RaggedBatch(model, 8)
    batch.mass_gather = gather
    for i, (state, lg) in enumerate(rows):
        batch.insert(i, state.select([0]), lg, model)
    return batch


@pytest.mark.parametrize("kw", [{}, {"self_read": True}], ids=["bank", "self-read"])
@torch.no_grad()
def test_mass_of_sampled_rows_only_equals_every_rows_mass(kw):
    model = _model(**kw)
    rows = []
    # histories put the 4 rows (of 8 slots: 4 free) at segment positions 3, 5, 77, 127 of banks of
    # different fills: every other step none keeps its mass, the others all 4 (a gather of 4 rows
    # of 8); 131 steps take each across its next segment boundary
    for i, n in enumerate((130, 132, 332, 510)):
        state = history_state(model, 700 + i, n)
        lg = model(torch.tensor([[7 + i]]), state=state, last_logits_only=True, metrics=False).logits[0, -1]
        rows.append((state, lg))
    old, new = _batch(model, rows, gather=False), _batch(model, rows, gather=True)
    seen, commits = set(), 0
    for _ in range(131):
        toks = old.logits.argmax(-1)  # greedy on the old rule's logits: both batches take the same tokens
        old.tokens.copy_(toks)
        new.tokens.copy_(toks)
        seen.add(new.mass_rows())
        a, b = ragged_decode_step(model, old), ragged_decode_step(model, new)
        for i in range(len(rows)):  # free slots compute garbage that nothing reads
            torch.testing.assert_close(b[i], a[i], atol=0, rtol=0)
        old.logits.copy_(a)
        new.logits.copy_(b)
        ca, cb = old.after_step(model), new.after_step(model)
        assert ca == cb
        commits += ca["committed"]
    assert commits >= len(rows) and seen == {0, 4}  # the boundaries crossed; skipped and gathered steps
    for i in range(len(rows)):
        ea, eb = old.extract(i).export(), new.extract(i).export()
        assert ea.keys() == eb.keys()
        for k in ea:
            assert torch.equal(ea[k], eb[k]), k


def test_mass_rows_counts_occupied_rows_at_a_salience_position():
    model = _model()
    batch = RaggedBatch(model, 8)
    assert batch.mass_rows() == 0  # no rows
    state = history_state(model, 1, 5)
    lg = torch.zeros(model.config.vocab_size)
    for slot, pos in enumerate((1, 3, 4, 5, 7)):  # stride 2: odd positions are salience positions
        st = history_state(model, 1, pos)
        batch.insert(slot, st, lg, model)
    assert [batch.rows[i].seg_pos for i in range(5)] == [1, 3, 4, 5, 7]
    assert batch.mass_rows() == 4  # 4 odd positions: a bucket of 4 (of 8)
    batch.release(0)
    assert batch.mass_rows() == 4  # 3 rows: still a bucket of 4
    batch.release(1), batch.release(3)
    assert batch.mass_rows() == 1
    batch.release(4)
    assert batch.mass_rows() == 0  # row 2 (position 4) keeps no mass next step
    batch.mass_gather = False
    assert batch.mass_rows() == 8  # the rule before: every row
    del state
    assert RaggedBatch(DNC(preset("tiny", memory=False)).eval(), 4).mass_rows() == 0  # no memory, no mass
