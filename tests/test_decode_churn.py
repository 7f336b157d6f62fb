"""BatchDecoder's shrink hysteresis (``shrink_after``) under a churn of arriving and finishing rows:
every row still decodes exactly the tokens (and final state) it decodes alone, the bucket moves
(each a copy of every row's state) drop against the old shrink-at-once rule, and a batch whose
rows stay few does shrink after ``shrink_after`` steps."""

from __future__ import annotations

import pytest
import torch

from decode_helpers import history_state, prompt_ids
from dnc.config import preset
from dnc.generate import BatchDecoder, DecodeRow, SamplingParams
from dnc.model import DNC

SEG = 16


@pytest.fixture(scope="module")
def model() -> DNC:
    torch.manual_seed(0)
    # small segments and banks: rows cross segment boundaries (commits) while batches move
    return DNC(preset("tiny", segment_len=SEG, l0_slots=32, l1_slots=16, l2_slots=8)).eval()


def _spec(client: int, k: int) -> dict:
    """Client ``client`` 's ``k``-th request: 2..6 new tokens, every third one continuing a history."""
    g = torch.Generator().manual_seed(1000 * client + k)
    n_new = int(torch.randint(2, 7, (1,), generator=g))
    return {"prompt": prompt_ids(7 * client + k, 2 + (client + k) % 5), "new": n_new,
            "history": (client, 3 + 5 * k) if (client + k) % 3 == 0 else None}


_HISTORIES: dict = {}


def _row(model, spec: dict) -> DecodeRow:
    """The request's row, on its own copy of its history state (made once per history: a finishing
    row writes its state back)."""
    state = None
    if spec["history"] is not None:
        key = (id(model), spec["history"])
        if key not in _HISTORIES:
            _HISTORIES[key] = history_state(model, *spec["history"])
        state = _HISTORIES[key].select([0])
    return DecodeRow(spec["prompt"], state, spec["new"], SamplingParams(0.0))


def _churn(model, shrink_after: int, clients: int = 10, steps: int = 60) -> tuple[BatchDecoder, dict]:
    """``clients`` closed-loop clients (the next request one step after the last finished), so the
    running rows hover around 8, a bucket boundary. Returns the decoder and every finished row."""
    dec = BatchDecoder(model, shrink_after=shrink_after)
    rows, k, done = [None] * clients, [0] * clients, {}
    for _ in range(steps):
        arrive = []
        for c in range(clients):
            if rows[c] is not None and rows[c].done:
                done[(c, k[c])] = rows[c]
                rows[c], k[c] = None, k[c] + 1
            elif rows[c] is None:
                rows[c] = _row(model, _spec(c, k[c]))
                arrive.append(rows[c])
        if arrive:
            assert not dec.add(arrive)
        dec.step()
    dec.close()
    return dec, done


def test_churn_rows_decode_what_they_decode_alone_with_fewer_resizes(model):
    old, done_old = _churn(model, 1)
    new, done_new = _churn(model, 3)
    assert done_new.keys() == done_old.keys() and len(done_new) > 40
    assert old.resizes >= 20  # the schedule does churn across a boundary (else the comparison proves nothing)
    assert new.resizes <= old.resizes / 2, (new.resizes, old.resizes)
    assert new.resized_rows < old.resized_rows
    for key, row in done_new.items():
        assert row.tokens == done_old[key].tokens and row.finish_reason == "length"
    for key in list(done_new)[::6]:  # against the row decoded alone (a sixth: every one is slow)
        alone = _row(model, _spec(*key))
        dec = BatchDecoder(model)
        dec.add([alone])
        list(dec.run())
        assert done_new[key].tokens == alone.tokens
        if alone.state is not None:
            ea, eb = done_new[key].state.export(), alone.state.export()
            for name in ea:
                torch.testing.assert_close(ea[name].float(), eb[name].float(), atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("shrink_after", [1, 3])
def test_a_batch_whose_rows_stay_few_shrinks_after_shrink_after_steps(model, shrink_after):
    rows = [DecodeRow(prompt_ids(90 + i, 4), None, 2 if i < 6 else 12, SamplingParams(0.0)) for i in range(8)]
    dec = BatchDecoder(model, shrink_after=shrink_after)
    dec.add(rows)
    capacities = []
    while dec.running:
        dec.step()
        if dec.batches:
            capacities.append(dec.batches[0].rb.capacity)
    # six rows leave at step 2: the two left fit bucket 2 from then on, and move there at step 1 + shrink_after
    assert capacities[:shrink_after] == [8] * shrink_after
    assert capacities[shrink_after:] == [2] * (len(capacities) - shrink_after)
    assert dec.resizes == 1 and dec.resized_rows == 2


def test_an_arrival_inside_the_wait_keeps_the_batch_and_restarts_it(model):
    """Rows that fit a smaller bucket for fewer than ``shrink_after`` steps, then outgrow it again:
    no move; the count starts over."""
    dec = BatchDecoder(model, shrink_after=3)
    dec.add([DecodeRow(prompt_ids(120 + i, 3), None, 2 if i < 3 else 20, SamplingParams(0.0)) for i in range(5)])
    dec.step()
    dec.step()  # three rows leave: 2 rows in a batch of 8
    dec.step()
    assert dec.batches[0].rb.capacity == 8 and dec.batches[0].fit_steps == 2
    dec.add([DecodeRow(prompt_ids(130 + i, 3), None, 20, SamplingParams(0.0)) for i in range(3)])  # 5 rows
    dec.step()
    assert dec.batches[0].rb.capacity == 8 and dec.batches[0].fit_steps == 0 and dec.resizes == 0
