"""dnc.admission's host-side shortcuts give exactly what the general path gives: fresh rows copied
from the decoder's template row equal fresh states inserted one by one (every tensor of the slot,
every host counter), the template follows the weights, and ``RaggedBatch.clone_rows_to`` /
``copy_rows_to`` / ``dnc.ragged.upload`` move the same values as the per-row ops they replace."""

from __future__ import annotations

import pytest
import torch

from decode_helpers import history_state, prompt_ids
from dnc.config import preset
from dnc.generate import BatchDecoder, DecodeRow, SamplingParams
from dnc.model import DNC
from dnc.ragged import RaggedBatch, upload

SEG = 16
ROW_TENSORS = RaggedBatch._ROW_TENSORS
BATCH_TENSORS = ("length", "seg_pos", "active", "logits", "fwd_on")


def _model(**kw) -> DNC:
    torch.manual_seed(0)
    return DNC(preset("tiny", segment_len=SEG, l0_slots=32, l1_slots=16, l2_slots=8, **kw)).eval()


def _slot(rb: RaggedBatch, slot: int) -> dict:
    """Every device value the row reads and every host counter of ``slot`` (``write_h`` up to the
    segment position: ``insert`` leaves what lies past it, which a step writes before reading)."""
    out = {}
    m = rb.rows[slot]
    for i, lb in enumerate(rb.layers):
        for name in ROW_TENSORS:
            t = getattr(lb, name)
            if t is not None:
                out[f"{i}.{name}"] = (t[slot, :m.seg_pos] if name == "write_h" else t[slot]).clone()
    for name in BATCH_TENSORS:
        t = getattr(rb, name)
        if t is not None:
            out[name] = t[slot].clone()
    out["meta"] = (m.seg_pos, m.tokens_seen, m.segments, m.carry_len, m.prev_write, m.has_prev_x, m.has_mass,
                   m.slots, m.settled, [None if b is None else b.sizes for b in m.banks])
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if k == "meta":
            assert a[k] == b[k]
        else:
            assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("kw", [{}, {"self_read": True, "forward_read": True}], ids=["plain", "forward-read"])
def test_template_copies_equal_fresh_states_inserted_one_by_one(kw):
    m = _model(**kw)
    dec = BatchDecoder(m)
    ref = RaggedBatch(m, 4)
    zeros = torch.zeros(m.config.vocab_size)
    for s in range(4):  # stale values first: the copy must overwrite every one of them
        ref.insert(s, history_state(m, 50 + s, 23), torch.randn(m.config.vocab_size), m)
    got = RaggedBatch(m, 4)
    for s in range(4):
        got.insert(s, history_state(m, 60 + s, 23), torch.randn(m.config.vocab_size), m)
        got.release(s)
        ref.rows[s] = None
        ref.insert(s, m.init_state(1), zeros, m)
    dec._fresh_template().clone_rows_to(got, [0, 0, 0, 0], [0, 1, 2, 3])
    for s in range(4):
        _assert_same(_slot(got, s), _slot(ref, s))
    assert dec._fresh_template() is dec._fresh_template()  # made once


def test_template_follows_the_weights():
    m = _model()
    dec = BatchDecoder(m)
    first = dec._fresh_template()
    with torch.no_grad():  # a fresh row's read view depends on the memory's weights
        for p in m.parameters():
            p.add_(0.01)
    second = dec._fresh_template()
    assert second is not first
    ref = RaggedBatch(m, 1)
    ref.insert(0, m.init_state(1), torch.zeros(m.config.vocab_size), m)
    _assert_same(_slot(second, 0), _slot(ref, 0))
    assert any(not torch.equal(a, b) for a, b in zip(_slot(first, 0).values(), _slot(second, 0).values())
               if torch.is_tensor(a))  # the test would see a stale template


def test_template_follows_a_replaced_embedding_and_another_model():
    """The kept parameter list (see ``_weights_key``) is made again when the embedding weight is a
    new object or the decoder's model is another one: the template is then rebuilt."""
    m = _model()
    dec = BatchDecoder(m)
    first = dec._fresh_template()
    assert dec._fresh_template() is first
    with torch.no_grad():
        m.embed.weight = torch.nn.Parameter(m.embed.weight + 0.01)  # a new object: its _version starts over
    second = dec._fresh_template()
    assert second is not first and dec._params[1] is m.embed.weight
    ref = RaggedBatch(m, 1)
    ref.insert(0, m.init_state(1), torch.zeros(m.config.vocab_size), m)
    _assert_same(_slot(second, 0), _slot(ref, 0))
    other = _model(self_read=True)
    dec.model = other
    third = dec._fresh_template()
    assert third is not second and dec._params[0] is other


def test_clone_and_copy_rows_move_what_insert_put_there():
    m = _model(self_read=True)
    a, b = RaggedBatch(m, 4), RaggedBatch(m, 8)
    states = [history_state(m, 70 + s, 5 + 11 * s) for s in range(3)]
    for s, st in enumerate(states):
        a.insert(s, st, torch.randn(m.config.vocab_size), m)
    want = [_slot(a, s) for s in range(3)]
    a.clone_rows_to(b, [2, 0], [5, 1])  # several sources, another batch: the sources stay
    _assert_same(_slot(b, 5), want[2])
    _assert_same(_slot(b, 1), want[0])
    _assert_same(_slot(a, 0), want[0])
    a.copy_rows_to(b, [1, 2], [7, 3])  # a move: the sources are freed, all in one op per tensor
    _assert_same(_slot(b, 7), want[1])
    _assert_same(_slot(b, 3), want[2])
    assert a.rows[1] is None and a.rows[2] is None and a.rows[0] is not None
    assert a.active.tolist() == [1, 0, 0, 0] and a.length[1:3].tolist() == [0, 0] and a.seg_pos[1:3].tolist() == [0, 0]


def test_upload_keeps_values_and_dtypes():
    for data, dtype in [([3, 1, 2], torch.long), ([[0.5], [2.0]], torch.float32), ([[True], [False]], torch.bool)]:
        t = upload(data, torch.device("cpu"), dtype)
        assert t.dtype == dtype and t.tolist() == data


def test_fresh_rows_admitted_into_a_running_batch_decode_what_each_decodes_alone():
    """Through the template, the join into a running batch and its growth to the next bucket."""
    m = _model()
    prompts = [prompt_ids(200 + i, 4 + 7 * i) for i in range(5)]

    def rows():
        return [DecodeRow(p, None, 12, SamplingParams(0.0)) for p in prompts]

    alone = []
    for r in rows():
        d = BatchDecoder(m)
        d.add([r])
        list(d.run())
        alone.append(r.tokens)
    dec = BatchDecoder(m)
    running = [DecodeRow(prompt_ids(300 + i, 9), history_state(m, 80 + i, 13 + 9 * i), 30, SamplingParams(0.0))
               for i in range(3)]
    dec.add(running)
    dec.step()
    together = rows()
    dec.add(together[:1])
    dec.step()
    dec.add(together[1:])  # 3 + 1 + 4 rows: the running batch grows to the next bucket
    list(dec.run())
    assert [r.tokens for r in together] == alone
