"""One session's record in a shard: owner, seq, incarnation, bank (or where it went), history,
lease, damage. Plain data; the shard's modules change it.

A session's content is its last full state (``payload``, at ``base_seq``) plus the token turns
logged after it (``tail``, see :mod:`.turn_log`); a snapshot file holds both."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Session:
    state_id: str
    owner: str
    created_at: float
    updated_at: float
    seq: int = 0
    inc: str = ""  # incarnation: a re-created id must not pick up an old incarnation's WAL records
    payload: bytes | None = None  # the last full state (at ``base_seq``); None = a fresh state
    nbytes: int = 0
    digest: str | None = None  # of the session's content at ``seq`` (``turn_log.chain_digest`` over ``tail``)
    base_seq: int = 0  # seq of the last full state record
    base_digest: str | None = None  # digest of ``payload``'s bytes
    tail: list[dict[str, Any]] = field(default_factory=list)  # token turn records after ``base_seq``
    offloaded: bool = False
    snapshot_seq: int = -1
    meta: dict[str, Any] = field(default_factory=dict)  # summary, levels, tokens_seen
    history: list[dict[str, Any]] = field(default_factory=list)
    applied: dict[int, str] = field(default_factory=dict)  # seq -> update id (recent)
    compacted_seq: int = -1
    last_access: float = field(default_factory=time.monotonic)
    lease: tuple[str, float] | None = None  # (lease id, monotonic expiry)
    leased_at: float = 0.0  # monotonic time the lease was granted (renewals stop lease_timeout_s after)
    grant: str | None = None  # fencing token: the lease granted last; a commit under an older one is refused
    background: str | None = None  # the lease of a compaction (background or asked for), which a turn takes over
    ended: list[str] = field(default_factory=list)  # the last leases released (committed, given back): never taken back
    cond: asyncio.Condition | None = None
    deleted: bool = False
    damage: str | None = None  # why the stored session cannot be recovered as acknowledged (None = fine)
    made_by: str | None = None  # the lease of the turn that created it, until that turn ends (not durable)
    discarded: bool = False  # removed because the turn that created it failed (StateMachineMixin.abort_turn)

    def condition(self) -> asyncio.Condition:
        if self.cond is None:
            self.cond = asyncio.Condition()
        return self.cond

    ENDED_REMEMBERED = 8

    def end_lease(self, lease_id: str) -> None:
        """Remember that ``lease_id``'s holder is done with it (see ``renew_lease``)."""
        if lease_id not in self.ended:
            self.ended.append(lease_id)
            del self.ended[:-self.ENDED_REMEMBERED]

    def leased(self) -> bool:
        return self.lease is not None and self.lease[1] > time.monotonic()

    def header(self) -> dict[str, Any]:
        return {"sid": self.state_id, "inc": self.inc, "owner": self.owner, "created_at": self.created_at,
                "updated_at": self.updated_at, "seq": self.seq, "nbytes": self.nbytes, "digest": self.digest,
                "base_seq": self.base_seq, "base_digest": self.base_digest, "tail": self.tail,
                "meta": self.meta, "history": self.history, "applied": {str(k): v for k, v in self.applied.items()},
                "compacted_seq": self.compacted_seq, "damage": self.damage}

    def state_bytes(self) -> int:
        """Size of the session's state: its stored full state, or, once token turns followed it,
        the tensor bytes of the state they left (bank + local KV cache, from the turn's summary)."""
        summary = self.meta.get("summary") or {}
        if not self.tail or "bank_bytes" not in summary:
            return self.nbytes
        return int(summary["bank_bytes"]) + int(summary.get("cache_bytes", 0))

    def tail_tokens(self) -> int:
        return sum(len(t["ids"]) for t in self.tail)

    def digest_at(self, seq: int) -> str | None | bool:
        """The session's digest at ``seq`` if this session can replay from there (``seq`` is its
        last full state or one of the token turns after it); False otherwise."""
        if seq == self.base_seq:
            return self.base_digest
        for t in self.tail:
            if t["seq"] == seq:
                return t["digest"]
        return False

    def info(self, shard: int, with_history: bool = False) -> dict[str, Any]:
        out = {"state_id": self.state_id, "owner": self.owner, "created_at": self.created_at,
               "updated_at": self.updated_at, "seq": self.seq,
               "tokens_seen": int(self.meta.get("tokens_seen", 0)),
               "turns": sum(1 for t in self.history if t.get("kind") == "generate"),
               "bank_bytes": self.state_bytes(), "offloaded": self.offloaded, "digest": self.digest, "shard": shard,
               "levels": self.meta.get("levels", []), "summary": self.meta.get("summary", {})}
        if self.damage:
            out["damage"] = self.damage
        if with_history:
            out["history"] = list(self.history)
        return out

    @classmethod
    def from_header(cls, h: dict[str, Any]) -> "Session":
        """A session from a snapshot header (its bank stays on storage until accessed)."""
        return cls(state_id=h["sid"], inc=h.get("inc", ""), owner=h["owner"], created_at=h["created_at"],
                   updated_at=h.get("updated_at", h["created_at"]), seq=h["seq"],
                   nbytes=h.get("nbytes", 0), digest=h.get("digest"), meta=h.get("meta", {}),
                   base_seq=h.get("base_seq", h["seq"]), base_digest=h.get("base_digest", h.get("digest")),
                   tail=list(h.get("tail", [])),
                   history=list(h.get("history", [])),
                   applied={int(k): v for k, v in h.get("applied", {}).items()},
                   compacted_seq=h.get("compacted_seq", -1), damage=h.get("damage"))
