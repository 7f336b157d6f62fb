"""Session defects of round 5 (session 20) on the real session store and the real Generator, in
process: a real shard (the class Ray runs as the actor) on real files behind ``LocalBankClient``,
the Generator class Serve runs (its real scheduler and decode loop, the tiny model on the CPU).
tests/test_session_defects5_http.py shows both through real Ray and HTTP. Each test failed on the
code before its fix.

* a turn that created its session and then failed (its decode raised; its client left) left the
  session behind, empty, listed and counted against the owner's ``max_sessions_per_owner``: a
  client retrying under fresh ids ran out of quota with no session holding anything (and one whose
  replica died mid-turn stayed too: the memory manager now removes it once its lease expired);
* a session deleted while its turn decoded kept that turn decoding to ``max_new_tokens`` (a batch
  row spent for nothing) before its in-band 404; and a row cancelled in the scheduler (its client
  left, or its session went) decoded on to the end of the iteration under way (``chunk_s`` of steps).
"""

from __future__ import annotations

import asyncio

import pytest

from serve.errors import APIError
from shard_helpers import local_shard, shard_config

OWNER = "alice"


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    """The Generator class Serve deploys, built in process; :func:`on_shard` gives it a shard."""
    from serve.generator import Generator

    g = Generator.func_or_class({"model": {"preset": "tiny", "seed": 0},
                                 "bank": {"storage": str(tmp_path_factory.mktemp("unused"))}, "device": "cpu"})
    g._publish = lambda event: None  # the live hub is a Ray actor: not this test's business (no Ray here)
    return g


def on_shard(g, root):
    """Point the Generator ``g`` at a fresh real shard on files under ``root`` (no Ray): -> shard."""
    from serve.sessions import LocalBankClient
    from serve.sessions.resident import ResidentStates

    shard = local_shard(shard_config(root))
    g.bank = g.turns.bank = LocalBankClient(shard)
    g.turns.cfg = shard.cfg
    g.turns.resident = ResidentStates(shard.cfg.resident_budget_bytes)  # no state of another test's shard
    return shard


def request(sid: str | None, prompt: bytes | list[int], n: int, **kw):
    from serve.generator import GenRequest

    ids = list(prompt) if isinstance(prompt, bytes) else prompt
    return GenRequest(prompt_ids=ids, max_new_tokens=n, state_id=sid, owner=OWNER, seed=7, temperature=0.8, **kw)


async def _listed(shard) -> list[str]:
    return sorted(s["state_id"] for s in await shard.list_sessions(OWNER))


# --------------------------------------------------------------------------- 1. failed first turns
def test_a_first_turn_that_fails_leaves_no_session_behind(generator, tmp_path):
    """Three create_state turns on fresh ids fail the two ways a turn fails: a decode that raises
    (a prompt the model refuses: 422 ``invalid_prompt``) and a client that leaves mid-decode (the
    request cancelled, as Serve cancels it). None of the three sessions may stay, live or after a
    restart, and the owner's quota (2 sessions) must still let them start two sessions. A session
    with an acknowledged turn, and one the owner created with POST /v1/states, stay when a later
    turn (or their first turn) fails."""
    from serve.context import ApiContext, Limits

    g = generator
    root = tmp_path / "bank"
    shard = on_shard(g, root)
    ctx = ApiContext(generator=None, bank=g.bank, hub=lambda: None, limits=Limits(max_sessions_per_owner=2))

    async def decode_raises(sid: str) -> None:
        with pytest.raises(APIError) as e:
            await g.generate(request(sid, [10**6], 8))  # out of the vocabulary: refused by the decoder
        assert (e.value.status, e.value.code) == (422, "invalid_prompt"), e.value

    async def client_leaves(sid: str) -> None:
        first = asyncio.Event()

        async def consume():
            async for ev in g.generate_stream(request(sid, b"a long first turn: ", 2000)):
                assert ev["type"] == "tokens"
                first.set()
        task = asyncio.ensure_future(consume())
        await first.wait()
        task.cancel()  # mid-decode, as Serve cancels the request of a client that left
        with pytest.raises(asyncio.CancelledError):
            await task

    async def main():
        for sid, fail in (("new-1", decode_raises), ("new-2", client_leaves), ("new-3", decode_raises)):
            await ctx.check_session_quota(OWNER, sid)  # before the fix: 429 at the third
            await fail(sid)
        assert await _listed(shard) == [], "a session whose creating turn failed stayed"
        with pytest.raises(APIError) as e:
            await shard.info("new-2", OWNER)
        assert e.value.status == 404
        # guards: an acknowledged turn, and a session the owner asked for, are the owner's to keep
        out = await g.generate(request("kept", b"kept: ", 4))
        assert out["state"]["seq"] == 1
        await decode_raises("kept")
        await shard.create("asked", OWNER)
        await decode_raises("asked")
        assert await _listed(shard) == ["asked", "kept"]
        await ctx.check_session_quota(OWNER, "kept")  # an existing session passes
        with pytest.raises(APIError) as e:
            await ctx.check_session_quota(OWNER, "new-4")
        assert e.value.code == "session_quota"  # the quota itself still holds
        shard.store.close()
        assert await _listed(local_shard(shard_config(root))) == ["asked", "kept"]  # and after a restart
    asyncio.run(main())


def test_a_turn_waiting_for_a_failed_first_turn_creates_the_session(tmp_path):
    """Guard. Two first turns of one new id race: the second waits for the session while the first,
    which created it, fails (its session goes). The second must get a session (created again, seq
    0), not a 404 for a session its create_state asked for; its commit makes it stay."""
    from shard_helpers import commit_turn

    async def main():
        shard = local_shard(shard_config(tmp_path / "bank", lease_wait_s=5.0))
        first = await shard.begin_turn("s", OWNER, True)
        assert first["created"]
        second = asyncio.ensure_future(shard.begin_turn("s", OWNER, True))
        await asyncio.sleep(0.05)
        assert not second.done()  # waiting for the first turn's lease
        await shard.abort_turn("s", first["lease_id"])
        lease = await asyncio.wait_for(second, 2.0)
        assert lease["seq"] == 0 and lease["created"] and lease["inc"] != first["inc"]
        await commit_turn(shard, "s", lease, "second")
        await shard.abort_turn("s", lease["lease_id"])  # a late give-back after the commit: nothing happens
        assert [s["seq"] for s in await shard.list_sessions(OWNER)] == [1]
    asyncio.run(main())


def test_a_first_turn_whose_replica_died_leaves_no_session_after_the_manager_pass(tmp_path):
    """A first turn whose replica died mid-decode neither commits nor gives its lease back; once the
    lease expired, the memory manager's pass removes the empty session its turn created (and
    nothing else: a session with an acknowledged turn stays)."""
    from shard_helpers import commit_turn

    async def main():
        shard = local_shard(shard_config(tmp_path / "bank", lease_ttl_s=0.1))
        await shard.begin_turn("orphan", OWNER, True)  # then its replica dies: no renewal, no give-back
        await commit_turn(shard, "kept", await shard.begin_turn("kept", OWNER, True), "kept")
        assert await _listed(shard) == ["kept", "orphan"]
        await asyncio.sleep(0.15)  # the orphan's lease expires
        assert (await shard.manage_once())["abandoned"] == 1
        assert await _listed(shard) == ["kept"]
    asyncio.run(main())


# --------------------------------------------------------------------------- 2. deleted while decoding
MAX_NEW = 1500  # the deleted turn's; before the fix it decoded all of them before its 404
OTHER_NEW = 160


def test_a_session_deleted_mid_decode_leaves_the_batch_at_once(generator, tmp_path):
    """A session turn streams beside a sessionless request (one batch); the session is deleted after
    the turn's first tokens. Its row must leave the batch within a few steps (it decoded
    ``MAX_NEW`` = 1500 before the fix), the stream end with the in-band 404 ``state_not_found``,
    nothing of the turn be saved (live, or after a restart), and the other request get exactly
    the tokens it gets alone."""
    g = generator
    root = tmp_path / "bank"
    shard = on_shard(g, root)

    async def main():
        assert (await g.generate(request("doomed", b"t0: ", 3)))["state"]["seq"] == 1
        alone = await g.generate(request(None, b"the other request: ", OTHER_NEW))
        tokens0 = g.scheduler.stats["tokens"]
        other = asyncio.ensure_future(g.generate(request(None, b"the other request: ", OTHER_NEW)))
        seen, after, error = 0, None, None
        try:
            async for ev in g.generate_stream(request("doomed", b"a long turn: ", MAX_NEW)):
                assert ev["type"] == "tokens", ev
                seen += len(ev["items"])
                if after is None and seen >= 8:
                    assert (await shard.delete("doomed", OWNER))["deleted"]
                    after = seen
        except APIError as e:
            error = e
        assert error is not None and (error.status, error.code) == (404, "state_not_found"), error
        beside = await other
        made = g.scheduler.stats["tokens"] - tokens0 - OTHER_NEW  # the doomed row's, delivered or not
        # a few steps after the delete: 1 token here (events hold up to stream_chunk_ms of tokens, a
        # handful on a CPU; room for a loaded CI machine); before the fix 1488 of the 1500
        assert seen - after <= 32 and made - after <= 48, (after, seen, made)
        assert "deleted while this request ran" in error.message and "nothing was saved" in error.message
        assert beside["token_ids"] == alone["token_ids"] and beside["batch_size"] == 2
        assert not g.scheduler.active and not g.scheduler.waiting
        assert await _listed(shard) == []
        shard.store.close()
        assert await _listed(local_shard(shard_config(root))) == []
    asyncio.run(main())


def test_a_stopped_row_leaves_after_the_step_under_way(generator):
    """``DecodeScheduler.stop`` (what the Generator calls when a turn's session is deleted): a
    waiting row ends at once, untouched; a running one after the decode step under way, even in
    an iteration of ``chunk_s`` = 1 s of steps (before, a cancelled row was dropped only when the
    iteration ended: ~1 s of tokens made for nobody)."""
    from concurrent.futures import ThreadPoolExecutor

    from dnc.generate import DecodeRow, SamplingParams
    from serve.scheduler import DecodeScheduler

    pool = ThreadPoolExecutor(1)

    async def run(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def main():
        sch = DecodeScheduler(generator.lm.model, run, chunk_s=1.0, max_running=1)
        running = DecodeRow(list(b"running: "), None, 400, SamplingParams(0.0))
        waiting = DecodeRow(list(b"waiting: "), None, 400, SamplingParams(0.0))
        got: list[int] = []

        async def consume(row, out):
            async for steps in sch.submit(row):
                out += [st.token for st in steps]
                if row is running and sch.stop(running):
                    stopped_at.append(len(out))
        stopped_at: list[int] = []
        first = asyncio.ensure_future(consume(running, got))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(consume(waiting, []))
        await asyncio.sleep(0)
        assert sch.stop(waiting) and waiting.finish_reason == "cancelled"  # max_running 1: it waited
        await asyncio.wait_for(asyncio.gather(first, second), 30)
        assert running.finish_reason == "cancelled" and not waiting.tokens
        assert len(running.tokens) <= stopped_at[0] + 2, (stopped_at, len(running.tokens))
        assert got == running.tokens  # every token made went out, once
        assert not sch.active and not sch.waiting
    asyncio.run(main())
    pool.shutdown()
