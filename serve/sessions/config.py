"""Settings of the session store (shared by the client and every shard), the shard of a session,
and the storage layout check."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class BankConfig:
    """Settings shared by the client and every shard (passed to actors as a dict)."""

    storage: str
    """Root directory or fsspec URI; shard ``i`` keeps its files under ``<storage>/shard-<i>``."""
    num_shards: int = 2
    """Number of shard actors. Fixed for a storage root (recorded in ``<storage>/layout.json``)."""
    namespace: str = "bwr-dnc"
    """Ray namespace of the named actors."""
    model: dict[str, Any] = field(default_factory=dict)
    """``ModelSpec`` fields of the served model: shards load it (CPU) to compact banks."""
    memory_budget_bytes: int = 256 * 2**20
    """Bank bytes a shard keeps in memory; least recently used idle banks beyond it are offloaded."""
    session_ttl_s: float = 7 * 24 * 3600.0
    """Sessions untouched this long are deleted by the cleanup task."""
    manager_interval_s: float = 5.0
    """Period of the background memory manager."""
    auto_compact: bool = True
    """Compact (and merge) idle sessions whose L0 is at least ``compact_l0_fill`` full."""
    compact_idle_s: float = 30.0
    compact_l0_fill: float = 0.75
    merge_threshold: float = 0.98
    checkpoint_wal_bytes: int = 64 * 2**20
    """WAL size past which the manager snapshots the sessions it holds and starts a new epoch."""
    lease_timeout_s: float = 120.0
    """Longest lease the shard grants itself (a compaction), and the cap of a turn's renewed lease:
    renewals are refused this long after the grant, so a stuck turn frees its session."""
    lease_ttl_s: float = 10.0
    """A turn's lease expires this long after it was granted or last renewed. Its holder renews it
    (``BankClient.keep_lease``) every ``lease_ttl_s / 4`` while it lives, so a turn whose generator
    died frees its session within ``lease_ttl_s``, not ``lease_timeout_s``."""
    lease_wait_s: float = 30.0
    """How long a request waits for a busy session before answering 503."""
    queue_wait_s: float = 30.0
    """How long an out-of-order update waits for its predecessor."""
    answer_timeout_s: float = 10.0
    """How long a call over every shard (the session listing, the quota a new session checks, stats)
    waits for one shard before naming it unreachable: a shard that hangs (alive, but not answering)
    must not hang every owner's listing and every new session."""
    max_history: int = 256
    """Turns kept per session."""
    snapshot_every_turns: int = 32
    """A turn that changed a session only by tokens is logged as its tokens (a few KiB, issue 14);
    after this many such turns since the session's last full state, the next turn writes the full
    state instead (a snapshot), so a rebuild replays at most this many turns. 1 = every turn writes
    the full state (the behaviour before issue 14). Compaction and other changes that are not tokens
    always write the full state."""
    snapshot_every_tokens: int = 16384
    """The same bound in tokens: a turn that would bring the tokens logged since the last full state
    to this many or more writes the full state instead."""
    resident_budget_bytes: int = 1024 * 2**20
    """Bytes of session states each Generator replica keeps resident on its device between turns
    (least recently used ones beyond it are dropped; the shard stays the source of truth). 0 = none:
    every turn fetches the state from its shard."""

    def snapshot_due(self, tail_turns: int, tail_tokens: int, new_tokens: int) -> bool:
        """Whether a turn of ``new_tokens`` on a session holding ``tail_turns`` token turns
        (``tail_tokens`` tokens) since its last full state writes the full state."""
        return (tail_turns + 1 >= max(1, self.snapshot_every_turns)
                or tail_tokens + new_tokens >= self.snapshot_every_tokens)

    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.storage}|{self.num_shards}".encode()).hexdigest()[:10]

    def actor_name(self, i: int) -> str:
        return f"dnc-bank-{self.fingerprint()}-{i}"

    def shard_uri(self, i: int) -> str:
        return f"{self.storage.rstrip('/')}/shard-{i}"


def shard_index(state_id: str, num_shards: int) -> int:
    """Stable across processes and Python versions (unlike ``hash()``)."""
    h = hashlib.blake2b(state_id.encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") % num_shards



def check_layout(storage: str, num_shards: int) -> None:
    """Record the shard count of a storage root; refuse a different one (sessions would be lost)."""
    import fsspec

    from ..errors import APIError

    fs, root = fsspec.core.url_to_fs(storage)
    fs.makedirs(root, exist_ok=True)
    path = f"{root.rstrip('/')}/layout.json"
    if fs.exists(path):
        with fs.open(path, "r") as f:
            n = json.load(f).get("num_shards")
        if n != num_shards:
            raise APIError(f"storage {storage!r} holds sessions for {n} shards, not {num_shards}: use "
                           f"bank_shards={n} or a new storage directory")
        return
    with fs.open(path, "w") as f:
        json.dump({"num_shards": num_shards, "format": "bwr-dnc-session-bank", "version": 1}, f)
