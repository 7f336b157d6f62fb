"""StateBank mechanics: eviction policies on constructed cases, capacities, merge, compaction."""

from __future__ import annotations

import pytest
import torch

from dnc.config import preset
from dnc.memory import BankLevel, LearnedCompressor, StateBank, get_policy
from dnc.model import DNC

H, D = 2, 4


def level(n: int, last_access, access, salience, batch: int = 1) -> BankLevel:
    f = lambda xs: torch.tensor([xs] * batch, dtype=torch.float32)  # noqa: E731
    return BankLevel(torch.randn(batch, H, n, D), torch.randn(batch, H, n, D), f(salience), torch.zeros(batch, n),
                     f(access), f(last_access), torch.ones(batch, n, dtype=torch.bool))


def evicted_slot(policy: str, l2: BankLevel, alpha: float = 0.5) -> int:
    """Fill L0/L1 so that writing 2 slots cascades exactly one slot into a full L2; return which
    of L2's original slots was evicted (identified by its unique key)."""
    comps = torch.nn.ModuleList([LearnedCompressor(D, 2), LearnedCompressor(D, 2)])
    lvl = lambda n: level(n, [9.0] * n, [0.0] * n, [1.0] * n)  # noqa: E731
    bank = StateBank([lvl(2), lvl(2), l2], capacities=(2, 2, l2.n), clock=10,
                     alpha=torch.tensor([alpha]))
    before = l2.keys.clone()
    stats = bank.write(torch.randn(1, H, 2, D), torch.randn(1, H, 2, D), torch.ones(1, 2, dtype=torch.bool),
                       compressors=comps, policy=get_policy(policy), protect_salient=1.0, group=2)
    assert stats["evicted"] == 1 and bank.sizes == [2, 1, l2.n]
    kept = bank.levels[2].keys[0, 0, :-1]  # the last slot is the newly compressed one
    gone = [i for i in range(l2.n) if not any(torch.equal(before[0, 0, i], k) for k in kept)]
    assert len(gone) == 1
    return gone[0]


#                 slot:           0     1     2     3
LAST_ACCESS = [5.0, 1.0, 6.0, 7.0]   # slot 1 least recently used
ACCESS = [10.0, 5.0, 1.0, 8.0]       # slot 2 least frequently used
SALIENCE = [1.0, 2.0, 3.0, 0.1]      # slot 3 least salient


@pytest.mark.parametrize("policy,expected", [("lru", 1), ("lfu", 2), ("salience", 3)])
def test_single_signal_policies(policy, expected):
    assert evicted_slot(policy, level(4, LAST_ACCESS, ACCESS, SALIENCE)) == expected


def test_hybrid_prefers_old_and_unsalient():
    # slot 0 is the oldest but salient; slot 2 is a bit newer but barely read -> hybrid drops 2,
    # plain LRU would drop 0
    l2 = lambda: level(4, [1.0, 8.0, 2.0, 9.0], [1.0] * 4, [5.0, 1.0, 0.01, 1.0])  # noqa: E731
    assert evicted_slot("lru", l2()) == 0
    assert evicted_slot("hybrid", l2()) == 2


def test_adaptive_follows_its_weight():
    l2 = lambda: level(4, LAST_ACCESS, ACCESS, [1.0] * 4)  # noqa: E731
    assert evicted_slot("adaptive", l2(), alpha=1.0) == 1  # recency regime: like LRU
    assert evicted_slot("adaptive", l2(), alpha=0.0) == 2  # frequency regime: like LFU


def test_invalid_slots_go_first():
    l2 = level(4, LAST_ACCESS, ACCESS, SALIENCE)
    l2.valid[0, 0] = False  # slot 0 would otherwise be kept by every policy
    for policy in ("lru", "lfu", "salience", "hybrid", "adaptive"):
        l2c = BankLevel(*(t.clone() for t in (l2.keys, l2.values, l2.salience, l2.age, l2.access,
                                                l2.last_access, l2.valid)))
        assert evicted_slot(policy, l2c) == 0


@pytest.mark.parametrize("policy", ["lru", "lfu", "salience", "hybrid", "adaptive"])
def test_capacities_never_exceeded_over_10k_writes(policy):
    torch.manual_seed(0)
    caps = (16, 8, 8)
    comps = torch.nn.ModuleList([LearnedCompressor(D, 4), LearnedCompressor(D, 4)])
    bank = StateBank.empty(3, H, D, caps, "cpu", torch.float32)
    pol = get_policy(policy)
    written = 0
    with torch.no_grad():
        while written < 10_000:
            m = int(torch.randint(1, 9, ()))
            valid = torch.rand(3, m) > 0.1
            bank.write(torch.randn(3, H, m, D), torch.randn(3, H, m, D), valid, compressors=comps, policy=pol,
                       protect_salient=1.0, group=4)
            s = sum(bank.sizes)
            bank.apply_read_mass(torch.rand(3, s), decay=0.9)
            written += m
            for n, cap in zip(bank.sizes, caps):
                assert n <= cap
            for lvl in bank.levels:
                assert torch.isfinite(lvl.salience).all() and (lvl.n == 0 or lvl.salience.max() <= 1e4)
    assert bank.sizes[2] == caps[2]  # the last level saturates and stays there


def test_salient_slots_stay_uncompressed_longer():
    """protect_salient keeps a highly read L0 slot raw while its older, unread peers compress."""
    comps = torch.nn.ModuleList([LearnedCompressor(D, 2), LearnedCompressor(D, 2)])
    l0 = level(4, [0.0] * 4, [0.0] * 4, [1.0, 1.0, 1.0, 1.0])
    l0.age = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    l0.salience = torch.tensor([[50.0, 1.0, 1.0, 1.0]])  # the oldest slot is very salient
    oldest = l0.keys[0, 0, 0].clone()
    bank = StateBank([l0, BankLevel.empty(1, H, D, "cpu", torch.float32), BankLevel.empty(1, H, D, "cpu", torch.float32)],
                     capacities=(4, 4, 4))
    bank.write(torch.randn(1, H, 2, D), torch.randn(1, H, 2, D), torch.ones(1, 2, dtype=torch.bool),
               compressors=comps, policy=get_policy("lru"), protect_salient=1.0, group=2)
    assert any(torch.equal(oldest, k) for k in bank.levels[0].keys[0, 0])


def marked_level(last_access) -> tuple[BankLevel, torch.Tensor, torch.Tensor]:
    """Four slots aged 4, 3, 2, 1 (slot 0 oldest) of which only slot 0 has a key along the
    importance direction. Returns (level, slot 0's key, importance weights w [1, 2, H, D])."""
    lvl = level(4, last_access, [0.0] * 4, [1.0] * 4)
    lvl.age = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    lvl.keys[..., 0] = 0.0
    lvl.keys[0, :, 0, 0] = 1.0
    w = torch.zeros(1, 2, H, D)
    w[0, 0, :, 0] = 1.0
    return lvl, lvl.keys[0, 0, 0].clone(), w


def empty_level() -> BankLevel:
    return BankLevel.empty(1, H, D, "cpu", torch.float32)


@pytest.mark.parametrize("level_index", [0, 2])
def test_important_slots_stay_raw_and_are_evicted_last(level_index):
    """A learned importance (key . w[0] + value . w[1], head mean) times ``importance_weight`` keeps
    the oldest slot of L0 raw while its peers compress, and keeps it in a full L2 under LRU."""
    comps = torch.nn.ModuleList([LearnedCompressor(D, 2), LearnedCompressor(D, 2)])
    for weight, kept in ((0.0, False), (10.0, True)):
        lvl, marked, w = marked_level([0.0, 1.0, 2.0, 3.0])  # slot 0 also least recently used
        if level_index == 0:
            levels, caps = [lvl, empty_level(), empty_level()], (4, 4, 4)
        else:
            full = lambda: level(2, [9.0] * 2, [0.0] * 2, [1.0] * 2)  # noqa: E731
            levels, caps = [full(), full(), lvl], (2, 2, 4)
        bank = StateBank(levels, capacities=caps)
        bank.write_packed(torch.stack([torch.zeros(1, H, 2, D), torch.randn(1, H, 2, D)]),
                          torch.ones(1, 2, dtype=torch.bool), compressors=comps, policy=get_policy("lru"),
                          protect_salient=1.0, group=2, importance_w=w, importance_weight=weight)
        assert bank.sizes == ([4, 1, 0] if level_index == 0 else [2, 1, 4])
        assert any(torch.equal(marked, k) for k in bank.levels[level_index].keys[0, 0]) == kept, weight


def test_compaction_keeps_important_slots_raw():
    """compact() (the memory manager's off-path compression) honours the learned importance too."""
    comps = torch.nn.ModuleList([LearnedCompressor(D, 2), LearnedCompressor(D, 2)])
    for weight, kept in ((0.0, False), (10.0, True)):
        lvl, marked, w = marked_level([0.0] * 4)  # slot 0 oldest: compressed first without importance
        bank = StateBank([lvl, empty_level(), empty_level()], capacities=(4, 4, 4))
        bank.compact(2, compressors=comps, policy=get_policy("lru"), protect_salient=1.0, group=2,
                     importance_w=w, importance_weight=weight)
        assert bank.sizes == [2, 1, 0]
        assert any(torch.equal(marked, k) for k in bank.levels[0].keys[0, 0]) == kept, weight


def test_merge_duplicates_and_compaction():
    torch.manual_seed(0)
    m = DNC(preset("tiny", segment_len=16, l0_slots=64, l1_slots=32, l2_slots=16)).eval()
    state = m.init_state(1)
    with torch.no_grad():
        m(torch.full((1, 64), 97), state=state)  # a constant input writes near-identical slots
    bank = state.banks()[0][1]
    before = bank.valid_counts()[0]
    merged = state.merge_duplicates(0.98)
    assert merged > 0 and bank.valid_counts()[0] == before - merged
    moved = m.compact_state(state, keep_l0=0)
    assert moved["compressed"] > 0 and bank.sizes[0] == 0 and bank.sizes[1] > 0
    with torch.no_grad():  # the compacted state still runs
        m(torch.randint(0, 256, (1, 20)), state=state)


def test_100k_tokens_bank_stays_at_capacity_and_memory_is_flat(one_torch_thread):
    """Stream 100,000 tokens through tiny: every level at capacity and the state's bytes constant
    (on one intra-op thread: conftest's ``one_torch_thread`` says why)."""
    torch.manual_seed(0)
    m = DNC(preset("tiny")).eval()
    state = m.init_state(1)
    sizes = []
    chunk = 4096
    with torch.no_grad():
        for i in range(0, 100_000, chunk):
            m(torch.randint(0, 256, (1, min(chunk, 100_000 - i))), state=state, last_logits_only=True)
            sizes.append(state.nbytes())
    cfg = m.config
    assert state.tokens_seen == 100_000
    assert state.banks()[0][1].sizes == [cfg.l0_slots, cfg.l1_slots, cfg.l2_slots]
    assert len(set(sizes[2:])) == 1, f"bank bytes changed after filling: {sizes}"
