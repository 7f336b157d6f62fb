"""bench/recall_placement.py: the two layouts put the pairs where they say, the targets are the
asked values, and a short run writes a result that the bench report renders."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import recall_placement as rp  # noqa: E402


@pytest.mark.parametrize("near", [0.0, 1.0])
def test_pairs_sit_where_the_layout_says_and_targets_are_their_values(near):
    seg = 64
    x, y, is_near = rp.recall_batch(np.random.default_rng(0), 16, seg, near)
    assert x.shape == (16, 4 * seg) and bool(is_near.all()) == (near == 1.0)
    for row in range(16):
        seq, tgt = x[row].numpy(), y[row].numpy()
        key_pos = np.flatnonzero((seq >= ord("A")) & (seq < ord("A") + 16))
        pair_keys = key_pos[key_pos < 3 * seg + 2 * rp.N_PAIRS]  # the pairs (questions repeat keys later)
        first_segment = {int(p) // seg for p in pair_keys}
        assert first_segment == ({3} if near == 1.0 else {0})
        pairs = {int(seq[p]): int(seq[p + 1]) for p in pair_keys}
        asked = np.flatnonzero(tgt != -100)
        assert len(asked) == rp.N_PAIRS and all(p // seg == 3 for p in asked)
        for p in asked:  # target at the key token of a question: the value paired with that key
            assert seq[p - 1] == rp.TOK.token_id("<query>") and tgt[p] == pairs[int(seq[p])] == seq[p + 1]


def test_too_short_a_segment_is_refused():
    with pytest.raises(ValueError, match="too short"):
        rp.recall_batch(np.random.default_rng(0), 2, 32, 0.5)


def test_a_short_run_writes_a_result_the_report_renders(tmp_path):
    assert rp.main(["--steps", "2", "--batch", "4", "--seeds", "0", "--eval-samples", "4",
                    "--out", str(tmp_path), "--tag", "t"]) == 0
    res = json.loads((tmp_path / "recall_placement_t.json").read_text())
    assert res["benchmark"] == "recall_placement" and "commit" in res and res["argv"][:2] == ["--steps", "2"]
    assert [r["self_read"] for r in res["runs"]] == [False, True]
    assert all(r[k]["n"] == 4 * rp.N_PAIRS for r in res["runs"] for k in ("far", "near"))
    import recall_placement_report

    body = recall_placement_report.render(res)
    assert "| off | 0 |" in body and "| on | 0 |" in body and "/32" in body
