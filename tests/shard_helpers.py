"""A one-shard session store on local files, run in the test process (no Ray), for the storage and
defect tests (imported by test_durability_storage and test_session_defects{,2}; pytest puts tests/ on
sys.path)."""

from __future__ import annotations

from dataclasses import asdict

from serve.sessions import BankConfig, SessionBankShard


def shard_config(root, **kw) -> BankConfig:
    """One shard under ``root``, the tiny model, no background manager, short lease and queue waits
    (s) so a refused turn answers at once; ``kw`` overrides any field."""
    base = dict(storage=str(root), num_shards=1, model={"preset": "tiny", "seed": 0},
                manager_interval_s=0, lease_wait_s=0.5, queue_wait_s=1.0)
    base.update(kw)
    return BankConfig(**base)


def local_shard(cfg: BankConfig) -> SessionBankShard:
    """Shard 0 of ``cfg`` as a plain object in this process."""
    return SessionBankShard(asdict(cfg), 0)


def turn_ids(tag: str) -> list[int]:
    """The byte tokens of a turn tagged ``tag`` (its text names the tag, so records tell turns apart)."""
    return list(f"{tag}: what this turn said ".encode())


async def commit_turn(shard: SessionBankShard, sid: str, lease: dict, tag: str) -> dict:
    """Commit one turn tagged ``tag`` under ``lease`` (from ``begin_turn``): update id ``u-<tag>``,
    the next seq, the turn's tokens, history entry ``{"kind": "generate", "tag": tag}``."""
    ids = turn_ids(tag)
    return await shard.commit_tokens(sid, lease["lease_id"], lease["seq"] + 1, f"u-{tag}", ids, 8, None,
                                     {"tokens_seen": len(ids)}, {"kind": "generate", "tag": tag})
