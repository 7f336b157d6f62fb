"""Serving pieces without Ray: text streaming with stop sequences, the live fan-out (a slow
subscriber is dropped, the others keep receiving), batched decoding == single-sequence decoding,
request validation messages, k-means."""

from __future__ import annotations

import asyncio

import pytest
import torch
from pydantic import ValidationError

from serve import schemas as S
from serve.generator import Generator, TextAssembler
from serve.live import Broadcaster, LiveHub
from serve.analysis import kmeans


def test_text_assembler_utf8_and_stop_sequences():
    asm = TextAssembler()
    euro = "€".encode()  # 3 bytes: nothing is emitted until the character is complete
    assert [asm.push(b) for b in euro] == ["", "", "€"]
    asm = TextAssembler(stop=["END"])
    out = "".join(asm.push(b) for b in b"abcEN")
    assert out == "abc"  # "EN" is held back: it may become the stop sequence
    assert asm.push(ord("D")) == "" and asm.stopped and asm.text == "abc"
    asm = TextAssembler(stop=["END"])
    out = "".join(asm.push(b) for b in b"abcENx") + asm.finish()
    assert out == "abcENx" and not asm.stopped  # a false start is released
    asm = TextAssembler(stop=["\n\n"])
    assert "".join(asm.push(b) for b in b"line\n") == "line"
    assert asm.finish() == "\n"


def test_broadcaster_drops_slow_subscriber_only():
    async def main():
        live = Broadcaster(queue_size=4)
        fast, slow = live.subscribe(), live.subscribe()
        got = []

        async def send(ev):
            got.append(ev)
        fast.task = asyncio.create_task(live.pump(fast, send))
        slow.task = asyncio.create_task(asyncio.sleep(3600))  # never reads
        for i in range(10):
            live.publish({"i": i})
            await asyncio.sleep(0.002)  # the fast pump keeps up
        await asyncio.sleep(0.01)
        assert [e["i"] for e in got] == list(range(10))
        assert slow.dropped and slow.task.cancelled() or slow.task.cancelling()
        assert not fast.dropped and live.stats()["dropped"] == 1 and live.stats()["subscribers"] == 1
        # a send that hangs (client stopped reading its socket) is dropped by the timeout
        stuck = live.subscribe()

        async def hang(ev):
            await asyncio.sleep(3600)
        stuck.task = asyncio.create_task(live.pump(stuck, hang, send_timeout_s=0.05))
        live.publish({"i": 10})
        await asyncio.sleep(0.2)
        assert stuck.dropped and not fast.dropped
        fast.task.cancel()
    asyncio.run(main())


def test_live_hub_long_poll_and_steps():
    async def main():
        hub = LiveHub(max_events=10)
        waiter = asyncio.create_task(hub.poll(0, timeout_s=5))
        await asyncio.sleep(0.01)
        await hub.publish({"type": "training_step", "run_id": "r", "step": 1, "metrics": {"loss": 2.0}})
        seq, events = await waiter
        assert seq == 1 and events[0]["step"] == 1
        assert (await hub.poll(1, timeout_s=0.01)) == (1, [])
        assert [e["step"] for e in await hub.training_steps("r")] == [1]
        assert (await hub.summary())["runs"]["r"]["steps"] == 1
    asyncio.run(main())


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    cls = Generator.func_or_class
    return cls({"model": {"preset": "tiny", "seed": 0}, "bank": {"storage": str(tmp_path_factory.mktemp("bank"))},
                "device": "cpu", "batch_wait_timeout_s": 0.05})


def test_batched_decoding_matches_generate_stream(generator):
    """Concurrent sessionless requests decode as one batch in the Generator's scheduler and get
    exactly the tokens each gets alone from the library's generate."""
    from serve.generator import GenRequest

    g = generator
    prompts = [list(b"same length A"), list(b"same length B"), list(b"same length C"), list(b"other length")]
    reqs = [GenRequest(prompt_ids=p, max_new_tokens=n, temperature=0.0, stop_ids=[g.tok.eos_id])
            for p, n in zip(prompts, (6, 9, 4, 7))]

    async def main():
        return await asyncio.gather(*(g.generate(r) for r in reqs))
    outs = asyncio.run(main())
    for r, out in zip(reqs, outs):
        single = g.lm.model.generate(r.prompt_ids, max_new_tokens=r.max_new_tokens, temperature=0.0,
                                     stop_tokens=r.stop_ids)
        assert out["token_ids"] == single and out["tokens"] == r.max_new_tokens
        assert out["type"] == "done" and out["finish_reason"] == "length"
    # every request shares one ragged batch, whatever its prompt length (dnc.ragged)
    assert [o["batch_size"] for o in outs] == [4, 4, 4, 4]
    assert g.scheduler.stats["max_batch"] == 4 and not g.scheduler.active


def test_stream_events_stop_sequences_and_seeds(generator):
    from serve.generator import GenRequest

    g = generator
    free = g.lm.model.generate(list(b"stop here: "), max_new_tokens=12, temperature=0.0)
    text = bytes(t for t in free if t < 256).decode("utf-8", "replace")
    stop = text[3:5] if len(text) >= 5 else None

    async def stream(r):
        return [ev async for ev in g.generate_stream(r)]
    r = GenRequest(prompt_ids=list(b"stop here: "), max_new_tokens=12, temperature=0.0, stop=[stop] if stop else [])
    evs = asyncio.run(stream(r))
    assert [e["type"] for e in evs][-1] == "done" and all(e["type"] == "tokens" for e in evs[:-1])
    assert len(evs[0]["items"]) == 1  # the first token goes out alone (time to first token)
    done = evs[-1]
    streamed = "".join(i["token"] for e in evs[:-1] for i in e["items"])
    assert streamed == done["text"]
    if stop:
        assert done["finish_reason"] == "stop" and stop not in done["text"] and text.startswith(done["text"])
        assert done["token_ids"] == free[:len(done["token_ids"])]
    seeded = [GenRequest(prompt_ids=list(b"seeded"), max_new_tokens=10, temperature=1.0, top_k=20, seed=3)
              for _ in range(2)]
    outs = [asyncio.run(g.generate(x)) for x in seeded]
    assert outs[0]["token_ids"] == outs[1]["token_ids"]


def test_a_stream_that_goes_away_leaves_the_batch_alone(generator):
    """Closing a stream early (the client went away) takes its row out between steps; the rows
    decoding with it still get exactly their own tokens."""
    from serve.generator import GenRequest

    g = generator
    short = GenRequest(prompt_ids=list(b"twin prompt A"), max_new_tokens=12, temperature=0.0)
    long = GenRequest(prompt_ids=list(b"twin prompt B"), max_new_tokens=400, temperature=0.0)

    async def main():
        async def leave_early():
            n = 0
            stream = g.generate_stream(long)
            async for ev in stream:
                n += len(ev.get("items", []))
                if n >= 3:
                    break
            await stream.aclose()  # what Ray does when the client disconnects: the row is cancelled
            for _ in range(3000):  # the driver drops it at its next iteration
                if not g.scheduler.active:
                    break
                await asyncio.sleep(0.01)
            return n, g.scheduler.decoder.running, dict(g.scheduler.active)
        return await asyncio.gather(g.generate(short), leave_early())
    stepped = g.scheduler.stats["rows_stepped"]
    out, (seen, running, active) = asyncio.run(main())
    assert seen >= 3 and not running and not active
    assert g.scheduler.stats["rows_stepped"] - stepped < 12 + 400  # the long row stopped early
    assert out["token_ids"] == g.lm.model.generate(short.prompt_ids, max_new_tokens=12, temperature=0.0)
    assert not g.scheduler.active and not g.scheduler.decoder.running


def test_research_registry_runs_and_names_bad_input(generator):
    from serve.errors import Unprocessable
    from serve.research import RESEARCH

    assert set(RESEARCH) == set(S.RESEARCH_REQUESTS)
    assert all(RESEARCH[n].request is S.RESEARCH_REQUESTS[n] and RESEARCH[n].summary for n in RESEARCH)
    assert {n for n, e in RESEARCH.items() if e.expensive} == {"gradient-analysis", "efficiency-metrics", "explain-decision",
                                                                   "state-evolution"}
    out = asyncio.run(generator.research("analyze-text", {"text": "hello memory"}, "anonymous"))
    assert out["endpoint"] == "analyze-text" and len(out["token_ids"]) == 12 and out["compute_ms"] > 0
    out = asyncio.run(generator.research("state-clustering", {"text": "hello memory " * 20, "k": 2}, "anonymous"))
    assert out["k"] <= 2 and out["bank_levels"][0]["capacity"] > 0
    with pytest.raises(Unprocessable, match="unknown research endpoint 'nope'"):
        asyncio.run(generator.research("nope", {}, "anonymous"))
    with pytest.raises(Unprocessable, match="analyze-text: .*at least 2 characters"):
        asyncio.run(generator.research("analyze-text", {"text": "x"}, "anonymous"))
    with pytest.raises(Unprocessable, match="single byte token"):
        asyncio.run(generator.research("explain-decision", {"text": "hello", "target": "ab"}, "anonymous"))
    out = asyncio.run(generator.research("slots", {"text": "hello memory " * 20, "per_level": 3}, "anonymous"))
    assert out["endpoint"] == "slots" and out["has_importance"] is False  # the tiny preset learns none
    assert all(lv["shown"] <= 3 and lv["shown"] + lv["not_shown"] == lv["valid"] for lv in out["levels"])
    assert out["total_slots"] > 0
    with pytest.raises(Unprocessable, match=r"slots: .*less than or equal to 256 \(per_level\)"):
        asyncio.run(generator.research("slots", {"text": "hello", "per_level": 1000}, "anonymous"))
    with pytest.raises(Unprocessable, match="slots: .*exactly one of state_id or text"):
        asyncio.run(generator.research("slots", {"per_level": 4}, "anonymous"))


def test_slot_cards_equal_the_banks_tensors():
    """slot_cards on a real tiny model with a learned write importance, after a few segments: every
    listed value is the bank's own tensor entry, levels are sorted by salience and capped."""
    from dnc.config import preset
    from dnc.model import DNC
    from serve.analysis import run_segments, slot_cards

    torch.manual_seed(0)
    model = DNC(preset("tiny", segment_len=16, l0_slots=32, l1_slots=16, l2_slots=8, write_importance=2.0)).eval()
    with torch.no_grad():  # non-zero importance weights, so the importance is not trivially 0
        for blk in model.blocks:
            if blk.mem is not None:
                blk.mem.importance_w.normal_(0.0, 1.0)
    ids = list(b"The blue key is in the red box. The coin is in the green box. " * 6)
    _, _, state, _ = run_segments(model, ids, trace=False)
    assert state.segments >= 4
    empty = slot_cards(model, model.init_state(1))
    assert empty["total_slots"] == 0 and all(lv["slots"] == [] and lv["valid"] == 0 for lv in empty["levels"])

    out = slot_cards(model, state, per_level=5)
    banks = dict(state.banks())
    assert out["has_importance"] and out["per_level"] == 5
    assert out["total_slots"] == sum(int(l.valid.sum()) for b in banks.values() for l in b.levels)
    checked = 0
    for lv, level in enumerate(out["levels"]):
        valid = sum(int(b.levels[lv].valid.sum()) for b in banks.values())
        assert level["valid"] == valid and level["shown"] == min(5, valid) and level["not_shown"] == valid - level["shown"]
        sal = [c["salience"] for c in level["slots"]]
        assert sal == sorted(sal, reverse=True)
        if level["not_shown"]:  # the listed ones are the most salient of the level
            rest = [float(b.levels[lv].salience[0, j]) for b in banks.values()
                    for j in torch.nonzero(b.levels[lv].valid[0]).flatten().tolist()]
            assert min(sal) >= sorted(rest, reverse=True)[level["shown"] - 1] - 1e-7
        for c in level["slots"]:
            bank = banks[c["layer"]]
            lvl, j = bank.levels[c["level"]], c["index"]
            assert c["level"] == lv and bool(lvl.valid[0, j])
            for f in ("salience", "age", "access", "last_access"):
                assert c[f] == float(getattr(lvl, f)[0, j]), f
            off = sum(bank.sizes[:lv])
            with torch.no_grad():
                want = model.blocks[c["layer"]].mem.slot_importance(bank.kv)[0, :, off + j].mean()
            assert c["importance"] == pytest.approx(float(want), rel=1e-5, abs=1e-6)
            checked += 1
    assert checked >= 5 and any(c["age"] > 0 for lv in out["levels"] for c in lv["slots"])


def test_request_validation_messages():
    with pytest.raises(ValidationError, match=r"state_id must match \[A-Za-z0-9_-\]\{1,64\}"):
        S.GenerateRequest(prompt="x", state_id="no spaces")
    with pytest.raises(ValidationError, match="max_new_tokens"):
        S.GenerateRequest(prompt="x", max_new_tokens=0)
    with pytest.raises(ValidationError, match="Extra inputs|extra"):
        S.GenerateRequest(prompt="x", tempreature=1)
    step = S.TrainingStepRequest.model_validate({"run_id": "r1", "step": 3, "loss": 2.5, "lr": 1e-3})
    assert step.metrics == {"loss": 2.5, "lr": 1e-3}
    with pytest.raises(ValidationError, match="finite"):
        S.TrainingStepRequest(step=1, metrics={"loss": float("nan")})
    with pytest.raises(ValidationError, match="exactly one prompt"):
        S.CompletionRequest(prompt=["a", "b"])
    assert S.CompletionRequest(prompt=["a"], stop="x", foo="ignored").stop == ["x"]
    with pytest.raises(ValidationError, match="exactly one of state_id or text"):
        S.StateClusteringRequest(k=2)
    with pytest.raises(ValidationError, match="per_level"):
        S.SlotsRequest(state_id="s1", per_level=0)
    with pytest.raises(ValidationError, match="exactly one of state_id or text"):
        S.SlotsRequest(state_id="s1", text="both given")


def test_kmeans_separates_blobs():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 4, generator=g) * 0.1 + torch.tensor([5.0, 0, 0, 0])
    b = torch.randn(30, 4, generator=g) * 0.1 - torch.tensor([5.0, 0, 0, 0])
    labels, inertia = kmeans(torch.cat([a, b]), 2)
    assert len(set(labels[:30].tolist())) == 1 and len(set(labels[30:].tolist())) == 1
    assert labels[0] != labels[-1] and inertia < 10


def test_admission_coalescing_settings_reach_the_scheduler(tmp_path):
    """AppArgs.admit_batch / admit_delay_ms are validated at the edge and travel, typed, through
    GeneratorSettings to the replica's scheduler (ms -> s)."""
    from pydantic import ValidationError

    from serve.app import AppArgs

    with pytest.raises(ValidationError, match="admit_batch"):
        AppArgs(admit_batch=0)
    with pytest.raises(ValidationError, match="admit_delay_ms"):
        AppArgs(admit_delay_ms=-1)
    settings = AppArgs(storage=str(tmp_path), device="cpu", admit_batch=3, admit_delay_ms=7.5).generator_settings()
    g = Generator.func_or_class(settings)
    assert g.scheduler.admit_batch == 3 and g.scheduler.admit_delay_s == pytest.approx(0.0075)
    defaults = AppArgs()
    assert (defaults.admit_batch, defaults.admit_delay_ms) == (8, 5.0)
