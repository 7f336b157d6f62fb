"""The serving dtype (issue 14): ``AppArgs.dtype`` / ``ModelSpec.dtype`` in {auto, float32, bfloat16},
turn records that name the dtype they were decoded in, and replays (a fresh replica's rebuild after
a shard restart, the shard's compaction on the CPU) that run each turn in that dtype.

In-process against a real shard on real files (``LocalBankClient``), the real tiny model and the
real decode loop, as tests/test_sessions_turns.py; the same paths with real Ray actors and kills are
in tests/test_durability_ray.py (parametrized over the dtype), the served HTTP path in bfloat16 in
tests/test_serve_load.py, and GPU-decoded turns replayed on the CPU in tests/test_replay_gpu.py."""

from __future__ import annotations

import asyncio
from dataclasses import asdict

import pytest
import torch
from pydantic import ValidationError

from serve.app import AppArgs
from serve.modeling import (ModelSpec, load_model, resolve_dtype, state_dtype, state_from_bytes,
                            weights_digest)
from serve.sessions import BankConfig, LocalBankClient, SessionBankShard
from serve.sessions.turn_log import ReplayModels, cast_state, fingerprint_drift, rebuild_state, state_fingerprint
from serve.sessions.turns import SessionTurns, state_of
from session_turn_helpers import chat, same_state


def _spec(**kw) -> dict:
    return {"preset": "tiny", "seed": 0, **kw}


@pytest.fixture(scope="module")
def models():
    """The tiny model on the CPU in both dtypes, from the same source weights."""
    return {d: load_model(ModelSpec(**_spec(dtype=d)), "cpu").model for d in ("float32", "bfloat16")}


def _cpu_models(default: str, preloaded) -> ReplayModels:
    """What a Generator replica on the CPU builds: its served model, other dtypes loaded on demand."""
    loads = []

    def load(dtype):
        loads.append(dtype)
        return load_model(ModelSpec(**_spec()), "cpu", dtype).model
    rm = ReplayModels(load, default, [preloaded])
    rm.loads = loads
    return rm


def _cfg(root, dtype="auto", **kw):
    base = dict(storage=str(root), num_shards=1, model=_spec(dtype=dtype), manager_interval_s=0, lease_wait_s=1.0,
                snapshot_every_turns=3, snapshot_every_tokens=10_000)
    return BankConfig(**{**base, **kw})


async def _run_here(fn, *args):
    return fn(*args)


class _OldReplica(LocalBankClient):
    """A replica of the version before the serving dtype: its token records name no dtype."""

    async def call(self, state_id, method, *args, **kwargs):
        if method == "commit_tokens":
            args = args[:8]  # lease_id, seq, update_id, ids, n_prompt, fingerprint, meta, turn
        return await super().call(state_id, method, *args, **kwargs)


def _replica(shard, model, models=None, old=False) -> SessionTurns:
    return SessionTurns(model, (_OldReplica if old else LocalBankClient)(shard), _run_here, models=models)


# --------------------------------------------------------------------------- the setting
def test_auto_is_float32_on_the_cpu_and_bfloat16_on_cuda(models):
    assert resolve_dtype("auto", "cpu") == "float32" and resolve_dtype("auto", torch.device("cuda")) == "bfloat16"
    assert resolve_dtype("float32", "cuda") == "float32" and resolve_dtype("bfloat16", "cpu") == "bfloat16"
    assert AppArgs().dtype == "auto" and AppArgs(dtype="bfloat16").model_spec().dtype == "bfloat16"
    assert AppArgs(dtype="bfloat16").bank_config().model["dtype"] == "bfloat16"  # the shards' copy knows it
    lm = load_model(ModelSpec(**_spec()), "cpu")
    assert lm.dtype == "float32" and all(p.dtype == torch.float32 for p in lm.model.parameters())
    bf = models["bfloat16"]
    assert all(p.dtype == torch.bfloat16 for p in bf.parameters()) and state_dtype(bf.init_state(1)) == "bfloat16"
    # the digest names the source weights, the same in every serving dtype
    assert load_model(ModelSpec(**_spec(dtype="bfloat16")), "cpu").digest == lm.digest == weights_digest(lm.model)
    w32 = lm.model.embed.weight
    assert torch.equal(bf.embed.weight, w32.to(torch.bfloat16)) and not torch.equal(bf.embed.weight.float(), w32)


def test_a_bad_dtype_is_refused_with_the_ones_that_work():
    with pytest.raises(ValueError, match=r"dtype must be one of auto, float32, bfloat16 \(got 'float16'\)"):
        ModelSpec(dtype="float16")
    with pytest.raises(ValidationError, match="'auto', 'float32' or 'bfloat16'"):
        AppArgs(dtype="fp16")
    from ray_jobs.parsing import UsageError
    from ray_jobs.serving import checked_app

    with pytest.raises(UsageError, match="dtype: Input should be 'auto', 'float32' or 'bfloat16'"):
        checked_app({"dtype": "half"})  # refused before anything starts (no Ray here)
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "ray_jobs.cli", "serve", "--dtype", "half"], cwd=root,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "dtype" in r.stderr and "bfloat16" in r.stderr, r.stderr


# --------------------------------------------------------------------------- bfloat16 sessions
def test_bfloat16_turns_come_back_after_a_shard_restart_and_through_the_shards_compaction(tmp_path, models):
    """Token records and full states decoded in bfloat16 are rebuilt bit for bit by a fresh replica
    after the shard restarted (every acknowledged turn checked against its fingerprint on the way),
    and the shard compacts them on the CPU with its own bfloat16 model: no float32 model is loaded."""
    async def main():
        cfg = _cfg(tmp_path / "bank", dtype="bfloat16")
        shard = SessionBankShard(asdict(cfg), 0)
        bf = models["bfloat16"]
        a = _replica(shard, bf)
        acks = [(await chat(a, "s", i))[1] for i in range(5)]  # full state at turn 3, then token turns
        assert [k["record"] for k in acks] == ["tokens", "tokens", "state", "tokens", "tokens"]
        s = shard.sessions["s"]
        assert [t["dtype"] for t in s.tail] == ["bfloat16", "bfloat16"]
        assert {h["dtype"] for h in s.history if h.get("kind") == "generate"} == {"bfloat16"}
        assert state_dtype(state_from_bytes(s.payload, bf, "stored")) == "bfloat16"  # the full state's bytes
        reference = a.resident._items["s"].state
        shard.store.close()

        shard2 = SessionBankShard(asdict(cfg), 0)  # recovery from the WAL
        b = _replica(shard2, bf)
        t = await b.begin("s", "alice", False)
        assert t.source == "loaded" and len(t.lease["turns"]) == 2
        same_state(t.state, reference)
        await b.end(t)

        res = await shard2.compact("s", "alice")  # replays the two bfloat16 turns on the shard's CPU model
        assert res["state"]["seq"] == 6 and shard2._models.loaded() == ["bfloat16"]
        compacted = shard2.sessions["s"].payload
        assert state_dtype(state_from_bytes(compacted, bf, "stored")) == "bfloat16"
        t, ack = await chat(b, "s", 5)  # and the session goes on from the compacted state
        assert t.source == "loaded" and ack["info"]["seq"] == 7
    asyncio.run(main())


def test_turns_without_a_dtype_replay_in_float32_and_a_bfloat16_server_continues_them(tmp_path, models):
    """Records written before turns named their dtype are float32 turns; a server restarted in
    bfloat16 replays them in float32 (a float32 copy loaded for it), decodes on in bfloat16, and its
    mixed log is rebuilt bit for bit after a shard restart, and compacted by the shard."""
    async def main():
        cfg = _cfg(tmp_path / "bank", snapshot_every_turns=100)
        shard = SessionBankShard(asdict(cfg), 0)
        f32, bf = models["float32"], models["bfloat16"]
        old = _replica(shard, f32, old=True)
        for i in range(2):
            await chat(old, "s", i)
        assert [("dtype" in t) for t in shard.sessions["s"].tail] == [False, False]
        bank = await shard.get_bank("s", "alice")
        same_state(state_of(f32, "s", bank), old.resident._items["s"].state)  # old records replay in float32

        new = _replica(shard, bf, _cpu_models("bfloat16", bf))
        for i in range(2, 4):
            t, _ = await chat(new, "s", i)
        assert new.models.loads == ["float32"]  # loaded once, for the old turns
        assert [t.get("dtype") for t in shard.sessions["s"].tail] == [None, None, "bfloat16", "bfloat16"]
        reference = new.resident._items["s"].state
        shard.store.close()

        shard2 = SessionBankShard(asdict(cfg), 0)
        fresh = _replica(shard2, bf, _cpu_models("bfloat16", bf))
        t = await fresh.begin("s", "alice", False)
        assert t.source == "loaded" and len(t.lease["turns"]) == 4
        same_state(t.state, reference)
        await fresh.end(t)

        # the arithmetic class matters: the bfloat16 turns replayed as float32 ones do not give the state back
        bank = await shard2.get_bank("s", "alice")
        as_f32 = [{k: v for k, v in r.items() if k != "dtype"} for r in bank["turns"]]
        wrong = rebuild_state(_cpu_models("float32", f32), bank["payload"], as_f32, check=False)
        assert state_dtype(wrong) == "float32"
        assert fingerprint_drift(state_fingerprint(reference), state_fingerprint(wrong)) > 0

        await shard2.compact("s", "alice")  # float32 turns, then bfloat16 ones, on the shard's CPU models
        assert shard2._models.loaded() == ["bfloat16", "float32"]
        t, ack = await chat(fresh, "s", 4)
        assert t.source == "loaded" and ack["info"]["seq"] == 6
    asyncio.run(main())


def test_a_float32_server_replays_bfloat16_turns_in_bfloat16(tmp_path, models):
    """The other way round (a GPU server set back to float32): bfloat16 turns replay on a bfloat16
    copy and the state is then cast to float32, on the live replica and on a fresh one alike."""
    async def main():
        cfg = _cfg(tmp_path / "bank", snapshot_every_turns=100)
        shard = SessionBankShard(asdict(cfg), 0)
        f32, bf = models["float32"], models["bfloat16"]
        z = _replica(shard, bf)
        await chat(z, "s", 0)
        want = cast_state(z.resident._items["s"].state, f32, "float32")  # as the bfloat16 server held it
        a = _replica(shard, f32, _cpu_models("float32", f32))
        t = await a.begin("s", "alice", False)
        assert t.source == "loaded" and a.models.loads == ["bfloat16"]
        same_state(t.state, want)
        await a.end(t)
        await chat(a, "s", 1)
        b = _replica(shard, f32, _cpu_models("float32", f32))
        t = await b.begin("s", "alice", False)
        same_state(t.state, a.resident._items["s"].state)
        await b.end(t)
        with pytest.raises(ValueError, match="decoded in bfloat16 can only be replayed by a model in bfloat16"):
            await _replica(shard, f32).begin("s", "alice", False)  # no loader: said, not guessed
    asyncio.run(main())
