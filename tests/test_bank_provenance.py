"""Slot provenance (StateBank.track_sources): spans after writes, compression, eviction and merges,
checked against what the slots hold; no effect on the model's outputs; bench/needle_fate.py end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from dnc.config import preset
from dnc.memory import LearnedCompressor, StateBank, get_policy
from dnc.model import DNC

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def spans(bank: StateBank, level: int, row: int = 0) -> list[tuple[int, int]]:
    lvl = bank.levels[level]
    return [(int(lo), int(hi)) for lo, hi, v in zip(lvl.source[0, row], lvl.source[1, row], lvl.valid[row]) if v]


def write(bank: StateBank, m: int, comps, *, group: int, valid=None, policy: str = "lru", values=None, keys=None):
    b, h, d = bank.kv.shape[1], bank.kv.shape[2], bank.kv.shape[4]
    keys = torch.randn(b, h, m, d) if keys is None else keys
    values = torch.randn(b, h, m, d) if values is None else values
    valid = torch.ones(b, m, dtype=torch.bool) if valid is None else valid
    return bank.write(keys, values, valid, compressors=comps, policy=get_policy(policy), protect_salient=1.0,
                      group=group)


def test_spans_after_writes_count_on_from_start():
    bank = StateBank.empty(2, 1, 4, (16, 8, 8), "cpu", torch.float32).track_sources(tokens_per_slot=1, start=100)
    comps = torch.nn.ModuleList([LearnedCompressor(4, 2), LearnedCompressor(4, 2)])
    write(bank, 3, comps, group=2)
    write(bank, 3, comps, group=2)
    assert spans(bank, 0, 0) == spans(bank, 0, 1) == [(p, p) for p in range(100, 106)]
    assert bank.source_next == 106 and bank.source.dtype == torch.long
    pooled = StateBank.empty(1, 1, 4, (16, 8, 8), "cpu", torch.float32).track_sources(tokens_per_slot=4)
    write(pooled, 2, comps, group=2)
    assert spans(pooled, 0) == [(0, 3), (4, 7)]


def test_tracking_is_off_by_default_and_needs_an_empty_bank():
    bank = StateBank.empty(1, 1, 4, (8, 8, 8), "cpu", torch.float32)
    comps = torch.nn.ModuleList([LearnedCompressor(4, 2), LearnedCompressor(4, 2)])
    write(bank, 2, comps, group=2)
    assert bank.source is None and bank.levels[0].source is None
    with pytest.raises(ValueError, match="empty bank"):
        bank.track_sources()


def test_forced_compression_gives_the_group_span():
    """Three writes of 4 into an L0 of 8: the oldest 4 raw slots become 2 L1 slots (group 4), each
    covering the group's span; an invalid slot of the group does not count."""
    comps = torch.nn.ModuleList([LearnedCompressor(4, 4), LearnedCompressor(4, 4)])
    bank = StateBank.empty(1, 2, 4, (8, 8, 8), "cpu", torch.float32).track_sources()
    write(bank, 4, comps, group=4, valid=torch.tensor([[False, True, True, True]]))
    write(bank, 4, comps, group=4)
    stats = write(bank, 4, comps, group=4)
    assert stats["compressed"] == 4 and bank.sizes == [8, 2, 0]
    assert spans(bank, 1) == [(1, 3), (1, 3)]  # slot 0 was never valid
    assert spans(bank, 0) == [(p, p) for p in range(4, 12)]
    moved = bank.compact(4, compressors=comps, policy=get_policy("lru"), protect_salient=1.0, group=4)
    assert moved["compressed"] == 4 and spans(bank, 1) == [(1, 3), (1, 3), (4, 7), (4, 7)]


@pytest.mark.parametrize("policy", ["lru", "salience", "adaptive"])
def test_spans_match_what_slots_hold_through_compression_and_eviction(policy):
    """Values are one-hot token ids and the untrained compressor is exact pair-mean pooling (group
    2), so a slot's value is nonzero exactly at the tokens it holds: its span must be their min..max,
    and a token no valid slot covers must be in no slot's value (evicted)."""
    torch.manual_seed(0)
    n_tok, b = 64, 3
    comps = torch.nn.ModuleList([LearnedCompressor(n_tok, 2), LearnedCompressor(n_tok, 2)])
    bank = StateBank.empty(b, 1, n_tok, (4, 4, 4), "cpu", torch.float32).track_sources()
    evicted = 0
    for t in range(0, n_tok, 2):
        values = torch.eye(n_tok)[t:t + 2].expand(b, 1, 2, n_tok)
        evicted += write(bank, 2, comps, group=2, policy=policy, values=values)["evicted"]
        # some read mass so salience differs between rows and slots
        bank.apply_read_mass(torch.rand(b, bank.valid.shape[1]), 0.9)
    assert evicted > 0 and bank.sizes == [4, 4, 4]
    flat, _ = bank.flat()
    for r in range(b):
        held = set()
        for s in range(flat.valid.shape[1]):
            if not flat.valid[r, s]:
                continue
            support = torch.nonzero(flat.values[r, 0, s].abs() > 1e-6).flatten().tolist()
            assert (flat.source[0, r, s].item(), flat.source[1, r, s].item()) == (min(support), max(support))
            held |= set(support)
        covered = {p for s in range(flat.valid.shape[1]) if flat.valid[r, s]
                   for p in range(int(flat.source[0, r, s]), int(flat.source[1, r, s]) + 1)}
        assert held <= covered and len(held) < n_tok  # something was evicted, and nothing held is unaccounted


def test_merge_duplicates_widens_the_survivor():
    comps = torch.nn.ModuleList([LearnedCompressor(4, 2), LearnedCompressor(4, 2)])
    bank = StateBank.empty(1, 1, 4, (8, 8, 8), "cpu", torch.float32).track_sources()
    k = torch.randn(1, 1, 4, 4)
    k[:, :, 3] = k[:, :, 0]  # slot 3 is a copy of slot 0
    write(bank, 4, comps, group=2, keys=k, values=k.clone())
    assert bank.merge_duplicates(0.98) == 1
    assert spans(bank, 0) == [(1, 1), (2, 2), (0, 3)]


def test_stack_select_cat_carry_and_export_leaves_it_out():
    cfg = preset("tiny", l0_slots=32, l1_slots=16, l2_slots=8, memory_layers=(0, 1))
    torch.manual_seed(0)
    model = DNC(cfg).eval()
    state = model.init_state(2)
    for _, bank in state.banks():
        bank.track_sources()
    with torch.no_grad():
        model(torch.randint(0, 256, (2, 32 * 6)), state=state)
    banks = [bank for _, bank in state.banks()]
    assert all(bk.source is not None and bk.source_next == 32 * 6 for bk in banks)
    assert banks[0]._group is banks[1]._group  # both layers were written as one stacked group
    one = state.select([1])
    assert torch.equal(one.banks()[0][1].source, banks[0].source[:, 1:])
    lvl = banks[0].levels[0]
    assert torch.equal(lvl.select(torch.tensor([[1, 0], [0, 1]])).source[:, 0], lvl.source[:, 0, [1, 0]])
    assert type(lvl).cat(lvl, lvl).source.shape[2] == 2 * lvl.n
    assert not any("source" in key for key in state.export())


def _run(model: DNC, tokens: torch.Tensor, track: bool):
    state = model.init_state(tokens.shape[0])
    if track:
        for _, bank in state.banks():
            bank.track_sources()
    with torch.no_grad():
        out = model(tokens, state=state)
    return out, state


@pytest.mark.parametrize("self_read", [False, True])
def test_outputs_are_bit_identical_with_tracking_on(self_read):
    """Golden comparison: the same logits and bank tensors, bit for bit, over segments that compress
    and evict, with provenance on and off (tiny, float32, CPU)."""
    cfg = preset("tiny", l0_slots=32, l1_slots=16, l2_slots=8, memory_layers=(0, 1), self_read=self_read,
                 write_importance=50.0)
    torch.manual_seed(0)
    model = DNC(cfg).eval()
    tokens = torch.randint(0, 256, (2, 32 * 12))
    off, s_off = _run(model, tokens, False)
    on, s_on = _run(model, tokens, True)
    assert off.metrics["mem/compressions"] > 0 and off.metrics["mem/evictions"] > 0
    assert torch.equal(off.logits, on.logits)
    for (_, a), (_, b) in zip(s_off.banks(), s_on.banks()):
        assert a.source is None and b.source is not None
        assert a.sizes == b.sizes
        for name in ("kv", "meta", "valid", "alpha"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_read_probabilities_match_the_models_trace():
    """FateCapture recomputes the read at each row's question; its level and own-write masses must be
    the ones the model's own trace reports for that query."""
    from needle_fate import FateCapture

    cfg = preset("tiny", l0_slots=32, l1_slots=16, l2_slots=8, memory_layers=(0, 1), self_read=True)
    torch.manual_seed(0)
    model = DNC(cfg).eval()
    seg, n_seg = cfg.segment_len, 5
    tokens = torch.randint(0, 256, (2, seg * n_seg))
    reads = [seg * (n_seg - 1) + 5, seg * (n_seg - 1) + 20]
    state = model.init_state(2)
    with FateCapture(model, reads) as cap, torch.no_grad():
        for t0 in range(0, tokens.shape[1], seg):
            out = model(tokens[:, t0:t0 + seg], state=state, trace=True)
    for layer, info in zip(range(cfg.n_layers), out.trace):
        for r, q in enumerate(reads):
            p, snap = cap.probs[r][layer], cap.snap[r][layer]
            s = len(snap["level"])
            lvl_mass = torch.stack([p[:, 1:s + 1][:, snap["level"] == i].sum(-1).mean() for i in range(3)])
            torch.testing.assert_close(lvl_mass, info["mem_level_mass"][r, q % seg].float())
            torch.testing.assert_close(p[:, s + 1:].sum(-1).mean(), info["mem_self_mass"][r, q % seg].float())


def test_needle_fate_end_to_end(tmp_path):
    """A real run of the probe's main on an untrained tiny preset: one row per sample, fates from the
    allowed set, own_segment exactly where the needle shares the question's segment."""
    from needle_fate import FATES, main

    out = tmp_path / "fate.json"
    assert main(["--preset", "tiny", "--model-set", "self_read=true", "--model-set", "memory_layers=[0,1]",
                 "--lengths", "256,512", "--depths", "0,1", "--n", "2", "--out", str(out)]) == 0
    # (no --threads: it would set the process-wide thread count for every later test)
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert len(rows) == 2 * 2 * 2 and res["commit"] and res["argv"][0] == "--preset"
    seg = res["model_config"]["segment_len"]
    for r in rows:
        assert r["fate"] in FATES and set(r["layers"]) == {"0", "1"}
        assert all(f in FATES for fs in r["digit_fates"].values() for f in fs)
        own = r["needle_pos"] >= (r["read_pos"] // seg) * seg
        assert (r["fate"] == "own_segment") == own
        assert 0.0 <= r["read_mass"][str(r["best_layer"])]["needle_mean"] <= 1.0
    assert {"own_segment"} < {r["fate"] for r in rows}  # depth 1 in the own segment, depth 0 in the bank
    assert sum(c["n"] for c in res["by_fate"].values()) == len(rows)
