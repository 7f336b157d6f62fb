"""Generator deployment: holds the model (CUDA when present, else CPU) and runs every model call.

* Sessionless, non-streamed requests go through ``@serve.batch``: requests whose prompts have the
  same length are decoded together as one batch (one forward per step for all of them; the model's
  state is per row, so this is exact); other lengths form their own groups.
* Streamed requests and session requests use ``model.generate_stream`` token by token.
* A session turn: lease the session's bank from its SessionBank shard, rebuild the ``DNCState``,
  generate, write the new bank back as update ``seq + 1`` (acknowledged once durable), then answer.
* Research computations (serve/research.py) run here too, on the same model.

All model work happens on one dedicated thread per replica, so the asyncio loop stays free to
stream tokens, and requests interleave token by token instead of running the model concurrently.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import torch
from ray import serve

from . import research as R
from .errors import Unprocessable
from .live import get_hub
from .modeling import ModelSpec, levels_of, load_model, state_from_bytes, state_meta, state_to_bytes
from .session_bank import BankClient, BankConfig

logger = logging.getLogger("serve.generator")
_END = object()


@dataclass
class GenRequest:
    """A validated generation request, tokenized by the ingress."""

    prompt_ids: list[int]
    max_new_tokens: int = 32
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_ids: list[int] = field(default_factory=list)
    state_id: str | None = None
    create_state: bool = True
    owner: str = "anonymous"
    prompt_preview: str = ""
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    arrival: float = 0.0


class TextAssembler:
    """Token ids -> text deltas: incremental UTF-8 (a multi-byte character is emitted once complete)
    and stop sequences (text that could still become a stop sequence is held back; the stop
    sequence itself is never emitted)."""

    def __init__(self, stop: list[str] | None = None, vocab_bytes: int = 256):
        self._dec = codecs.getincrementaldecoder("utf-8")("replace")
        self.stop = [s for s in (stop or []) if s]
        self.text = ""
        self.emitted = 0
        self.stopped = False
        self.vocab_bytes = vocab_bytes

    def push(self, tok: int) -> str:
        if self.stopped:
            return ""
        if 0 <= tok < self.vocab_bytes:
            self.text += self._dec.decode(bytes([tok]))
        return self._release(final=False)

    def finish(self) -> str:
        if not self.stopped:
            self.text += self._dec.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stop and not self.stopped:
            hits = [i for i in (self.text.find(s, max(0, self.emitted - len(s))) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
                final = True
        end = len(self.text)
        if not final:
            for s in self.stop:  # hold back a suffix that is a prefix of a stop sequence
                for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        out = self.text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return out


@dataclass
class GeneratorSettings:
    model: dict[str, Any]
    bank: dict[str, Any]
    hub_namespace: str = "bwr-dnc"
    hub_name: str = "dnc-live-hub"
    device: str = "auto"
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.02
    torch_threads: int = 0
    model_name: str = "bwr-dnc"
    stream_chunk_ms: float = 15.0


@serve.deployment(name="Generator", max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
class Generator:
    def __init__(self, settings: dict[str, Any]):
        self.settings = GeneratorSettings(**settings)
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        self.lm = load_model(ModelSpec(**self.settings.model), self.settings.device)
        from dnc.tokenizer import get_tokenizer

        self.tok = get_tokenizer()
        self.bank = BankClient(BankConfig(**self.settings.bank))
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="dnc-model")
        self._hub = None
        self.generate_batched.set_max_batch_size(self.settings.max_batch_size)
        self.generate_batched.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)
        self.started = time.time()
        self.counters = collections.Counter()
        self.latency_ms: collections.deque[float] = collections.deque(maxlen=1024)
        self.ttft_ms: collections.deque[float] = collections.deque(maxlen=1024)
        self.tokens_per_s: collections.deque[float] = collections.deque(maxlen=1024)
        self.last_probe: dict[str, Any] | None = None

    # ------------------------------------------------------------------ plumbing
    async def _run(self, fn, *args):
        """Run ``fn`` on the model thread."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def _rng(self, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        return torch.Generator(device=self.lm.device).manual_seed(int(seed))

    def _publish(self, event: dict[str, Any]) -> None:
        try:
            if self._hub is None:
                self._hub = get_hub(self.settings.hub_namespace, self.settings.hub_name)
            self._hub.publish.remote(event)  # fire and forget: events never slow a request
        except Exception:  # pragma: no cover - the hub is best effort
            logger.exception("could not publish a live event")

    def _finish(self, r: GenRequest, ids: list[int], text: str, finish: str, t0: float, ttft: float | None,
                batch: int = 1) -> dict[str, Any]:
        total = time.perf_counter() - t0
        gen_time = max(1e-9, total - (ttft or 0.0))
        tps = (len(ids) - 1) / gen_time if len(ids) > 1 else len(ids) / max(total, 1e-9)
        timing = {"queue_ms": 0.0, "ttft_ms": (ttft or total) * 1e3, "total_ms": total * 1e3, "tokens_per_s": tps}
        self.counters["requests"] += 1
        self.counters["tokens_generated"] += len(ids)
        self.latency_ms.append(total * 1e3)
        self.ttft_ms.append(timing["ttft_ms"])
        self.tokens_per_s.append(tps)
        return {"type": "done", "done": True, "text": text, "token_ids": ids, "tokens": len(ids),
                "prompt_tokens": len(r.prompt_ids), "finish_reason": finish, "state_id": r.state_id,
                "state": None, "timing": timing, "batch_size": batch}

    def _announce(self, r: GenRequest, result: dict[str, Any]) -> None:
        st = result.get("state") or {}
        self._publish({"type": "generation", "state_id": r.state_id, "tokens": result["tokens"],
                       "prompt_tokens": result["prompt_tokens"], "finish_reason": result["finish_reason"],
                       "tokens_per_s": result["timing"]["tokens_per_s"], "ttft_ms": result["timing"]["ttft_ms"],
                       "text": result["text"][:120], "prompt": r.prompt_preview[:120],
                       "batch_size": result.get("batch_size", 1), "levels": st.get("levels"),
                       "tokens_seen": st.get("tokens_seen"), "owner": r.owner})

    # ------------------------------------------------------------------ single-sequence streaming
    @staticmethod
    def _step_chunk(it, asm: TextAssembler, stop_ids: list[int], max_tokens: int, budget_s: float):
        """Up to ``max_tokens`` tokens (or ``budget_s`` of work) from ``it``, on the model thread.
        Stop sequences are checked token by token here, so the state never runs past one.
        Returns ([(token, text delta)], finish or None, exhausted)."""
        out: list[tuple[int, str]] = []
        finish = None
        t_end = time.perf_counter() + budget_s
        while len(out) < max_tokens:
            tok = next(it, _END)
            if tok is _END:
                return out, finish, True
            out.append((tok, asm.push(tok)))
            if tok in stop_ids:
                finish = "eos"  # the model feeds it and stops by itself
            elif asm.stopped:
                next(it, _END)  # feed the last token into the state, drop the one sampled after it
                return out, "stop", True
            if time.perf_counter() > t_end:
                break
        return out, finish, False

    async def _stream_one(self, r: GenRequest, state, t0: float) -> AsyncIterator[dict[str, Any]]:
        """``tokens`` events (a chunk of one or more tokens each), then an internal ``result`` event.
        ``state`` is updated in place and afterwards holds exactly the prompt and the emitted tokens.
        The first chunk is one token (time to first token); later ones hold what the model made in
        ~``stream_chunk_ms``, which saves a thread hop and a Ray message per token while other
        requests still get the model between chunks."""
        it = self.lm.model.generate_stream(r.prompt_ids, state=state, max_new_tokens=r.max_new_tokens,
                                           temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                                           stop_tokens=r.stop_ids, generator=self._rng(r.seed))
        asm = TextAssembler(r.stop)
        ids: list[int] = []
        finish, ttft, done = "length", None, False
        try:
            while not done:
                first = not ids
                chunk, fin, done = await self._run(self._step_chunk, it, asm, r.stop_ids, 1 if first else 64,
                                                   self.settings.stream_chunk_ms / 1e3)
                if chunk and ttft is None:
                    ttft = time.perf_counter() - t0
                items = [{"token": d, "token_id": t, "index": len(ids) + k} for k, (t, d) in enumerate(chunk)]
                ids += [t for t, _ in chunk]
                finish = fin or finish
                if items:
                    yield {"type": "tokens", "items": items}
        finally:
            await self._run(it.close)
        tail = asm.finish()
        if tail:
            yield {"type": "tokens", "items": [{"token": tail, "token_id": None, "index": len(ids)}]}
        yield {**self._finish(r, ids, asm.text, finish, t0, ttft), "type": "result"}

    async def _session_turn(self, r: GenRequest) -> AsyncIterator[dict[str, Any]]:
        t0 = time.perf_counter()
        lease = await self.bank.call(r.state_id, "begin_turn", r.owner, r.create_state)
        keeper = self.bank.start_keep_lease(r.state_id, lease)  # the lease lives as long as this turn
        committed = False
        try:
            state = await self._run(state_from_bytes, lease["payload"], self.lm.model)
            result = None
            async for ev in self._stream_one(r, state, t0):
                if ev["type"] == "result":
                    result = ev
                else:
                    yield ev
            payload, meta = await self._run(lambda: (state_to_bytes(state), state_meta(state)))
            turn = {"kind": "generate", "prompt_tokens": len(r.prompt_ids), "new_tokens": result["tokens"],
                    "tokens_seen": meta["tokens_seen"], "duration_ms": result["timing"]["total_ms"],
                    "prompt_preview": r.prompt_preview[:200], "completion_preview": result["text"][:200]}
            ack = await self.bank.call(r.state_id, "commit_turn", lease["lease_id"], lease["seq"] + 1,
                                       r.request_id, payload, meta, turn)
            committed = True
            result["state"] = ack["info"]
            self.counters["session_turns"] += 1
            yield result
        finally:
            keeper.cancel()
            if not committed:
                try:
                    await asyncio.shield(self.bank.call(r.state_id, "abort_turn", lease["lease_id"]))
                except Exception:
                    pass

    async def _plain_stream(self, r: GenRequest) -> AsyncIterator[dict[str, Any]]:
        t0 = time.perf_counter()
        state = await self._run(self.lm.model.init_state, 1)
        async for ev in self._stream_one(r, state, t0):
            yield ev

    # ------------------------------------------------------------------ batched (sessionless)
    def _decode_group(self, reqs: list[GenRequest]) -> list[dict[str, Any]]:
        """Decode requests whose prompts have equal length as one batch (model thread)."""
        from dnc.model import sample_next

        model, dev = self.lm.model, self.lm.device
        b = len(reqs)
        t0 = min(r.arrival for r in reqs)
        state = model.init_state(b)
        asms = [TextAssembler(r.stop) for r in reqs]
        gens = [self._rng(r.seed) for r in reqs]
        out: list[list[int]] = [[] for _ in reqs]
        finish = ["length"] * b
        active = [True] * b
        ttft = None
        with torch.no_grad():
            logits = model(torch.tensor([r.prompt_ids for r in reqs], device=dev), state=state,
                           last_logits_only=True).logits[:, -1]
            for _ in range(max(r.max_new_tokens for r in reqs)):
                step = self._sample_rows(logits, reqs, active, gens, sample_next)
                for i, r in enumerate(reqs):
                    if not active[i]:
                        continue  # finished rows ride along; their output is ignored
                    tok = step[i]
                    out[i].append(tok)
                    asms[i].push(tok)
                    if tok in r.stop_ids:
                        finish[i], active[i] = "eos", False
                    elif asms[i].stopped:
                        finish[i], active[i] = "stop", False
                    elif len(out[i]) >= r.max_new_tokens:
                        active[i] = False
                if ttft is None:
                    ttft = time.perf_counter() - t0
                if not any(active):
                    break
                logits = model(torch.tensor(step, device=dev).view(b, 1), state=state,
                               last_logits_only=True).logits[:, -1]
        results = []
        for i, r in enumerate(reqs):
            asms[i].finish()
            res = self._finish(r, out[i], asms[i].text, finish[i], r.arrival, ttft, batch=b)
            res["timing"]["queue_ms"] = (t0 - r.arrival) * 1e3
            results.append(res)
        return results

    @staticmethod
    def _sample_rows(logits, reqs: list[GenRequest], active: list[bool], gens, sample_next) -> list[int]:
        """Next token of every active row: greedy rows with one argmax, plain unseeded sampling
        with one multinomial, the rest (top-k/top-p/seeded) row by row. One device sync per group."""
        toks = [0] * len(reqs)
        greedy = [i for i, r in enumerate(reqs) if active[i] and r.temperature <= 0]
        plain = [i for i, r in enumerate(reqs) if active[i] and r.temperature > 0 and not r.top_k
                 and r.top_p >= 1.0 and gens[i] is None]
        done = set(greedy) | set(plain)
        if greedy:
            for i, t in zip(greedy, logits[greedy].argmax(-1).tolist()):
                toks[i] = t
        if plain:
            temp = torch.tensor([reqs[i].temperature for i in plain], device=logits.device)
            probs = (logits[plain].float() / temp[:, None]).softmax(-1)
            for i, t in zip(plain, torch.multinomial(probs, 1).squeeze(1).tolist()):
                toks[i] = t
        for i, r in enumerate(reqs):
            if active[i] and i not in done:
                toks[i] = sample_next(logits[i:i + 1], r.temperature, r.top_k, r.top_p, gens[i])
        return toks

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def generate_batched(self, reqs: list[GenRequest]) -> list[dict[str, Any]]:
        self.counters["batches"] += 1
        self.counters["batched_requests"] += len(reqs)
        self.counters["max_batch"] = max(self.counters["max_batch"], len(reqs))
        groups: dict[int, list[int]] = collections.defaultdict(list)
        for i, r in enumerate(reqs):
            groups[len(r.prompt_ids)].append(i)
        results: list[dict[str, Any] | None] = [None] * len(reqs)
        for idx in groups.values():
            for i, res in zip(idx, await self._run(self._decode_group, [reqs[i] for i in idx])):
                results[i] = res
        for r, res in zip(reqs, results):
            self._announce(r, res)
        return results

    # ------------------------------------------------------------------ public methods
    async def generate(self, r: GenRequest) -> dict[str, Any]:
        """One complete generation (no streaming)."""
        r.arrival = time.perf_counter()
        if r.state_id is None:
            return await self.generate_batched(r)
        result = None
        async for ev in self._session_turn(r):
            if ev["type"] == "result":
                result = ev
        result["type"] = "done"
        self._announce(r, result)
        return result

    async def generate_stream(self, r: GenRequest) -> AsyncIterator[dict[str, Any]]:
        """Token events, then one ``done`` event with the complete result (call with stream=True)."""
        r.arrival = time.perf_counter()
        self.counters["streamed"] += 1
        src = self._session_turn(r) if r.state_id else self._plain_stream(r)
        async for ev in src:
            if ev["type"] == "result":
                ev["type"] = "done"
                self._announce(r, ev)
            yield ev

    async def health(self) -> dict[str, Any]:
        ids = list(b"health check: the model runs a real forward pass.")

        def fwd():
            with torch.no_grad():
                t = time.perf_counter()
                out = self.lm.model(torch.tensor([ids], device=self.lm.device))
                if self.lm.device.type == "cuda":
                    torch.cuda.synchronize()
                return (time.perf_counter() - t) * 1e3, bool(torch.isfinite(out.logits).all())
        ms, finite = await self._run(fwd)
        return {"forward_ms": ms, "logits_finite": finite, "device": str(self.lm.device)}

    async def model_info(self) -> dict[str, Any]:
        m, cfg = self.lm.model, self.lm.config
        return {"model_name": self.settings.model_name, "source": self.lm.spec.describe(),
                "checkpoint": self.lm.spec.checkpoint, "preset": None if self.lm.spec.checkpoint else self.lm.spec.preset,
                "params": m.num_params(), "device": str(self.lm.device), "dtype": str(next(m.parameters()).dtype),
                "weights_digest": self.lm.digest, "memory_layers": list(cfg.memory_layer_ids),
                "bank_capacity_slots": cfg.bank_slots * len(cfg.memory_layer_ids), "config": cfg.to_dict(),
                "extra": self.lm.extra}

    async def stats(self) -> dict[str, Any]:
        def pct(xs, q):
            if not xs:
                return None
            s = sorted(xs)
            return s[min(len(s) - 1, int(q * len(s)))]
        c = dict(self.counters)
        c["mean_batch"] = c.get("batched_requests", 0) / max(1, c.get("batches", 0))
        return {"uptime_s": time.time() - self.started, "device": str(self.lm.device), **c,
                "latency_ms_p50": pct(self.latency_ms, 0.5), "latency_ms_p99": pct(self.latency_ms, 0.99),
                "ttft_ms_p50": pct(self.ttft_ms, 0.5),
                "tokens_per_s_mean": sum(self.tokens_per_s) / len(self.tokens_per_s) if self.tokens_per_s else None}

    async def probe(self) -> dict[str, Any]:
        ids = list(b"The memory bank remembers what the local window forgets. " * 3)
        self.last_probe = await self._run(R.probe, self.lm.model, ids)
        return self.last_probe

    async def research(self, name: str, params: dict[str, Any], owner: str | None) -> dict[str, Any]:
        """Run one research computation on the real model (see serve/research.py)."""
        payload = None
        sid = params.get("state_id")
        if sid:
            payload = (await self.bank.call(sid, "get_bank", owner))["payload"]
        t = time.perf_counter()
        out = await self._run(self._research_sync, name, params, payload)
        self.counters[f"research/{name}"] += 1
        return {"endpoint": name, "compute_ms": (time.perf_counter() - t) * 1e3,
                "state_id": sid, **out}

    def _research_sync(self, name: str, p: dict[str, Any], payload: bytes | None) -> dict[str, Any]:
        m = self.lm.model
        state = state_from_bytes(payload, m) if p.get("state_id") else None
        ids = self.tok.encode(p["text"]) if p.get("text") else None
        if name == "analyze-text":
            return R.analyze_text(m, ids, state, p.get("top_slots", 4))
        if name == "gradient-analysis":
            return R.gradient_analysis(m, ids, state)
        if name == "state-evolution":
            return R.state_evolution(m, ids, state, p.get("segment_len"))
        if name == "attention-analysis":
            return R.attention_analysis(m, ids, state, p.get("max_matrix", 64))
        if name == "information-flow":
            return R.information_flow(m, ids, state)
        if name == "efficiency-metrics":
            return R.efficiency_metrics(m, p.get("context_tokens", 256), p.get("new_tokens", 16))
        if name == "state-clustering":
            if state is None:
                _, _, state, _ = R.run_segments(m, ids, None, trace=False)
            out = R.state_clustering(state, p.get("k", 4), p.get("max_points", 1024))
            out["bank_levels"] = levels_of(state.summary())
            return out
        if name == "explain-decision":
            target_id = p.get("target_id")
            if target_id is None and p.get("target"):
                enc = self.tok.encode(p["target"])
                if len(enc) != 1:
                    raise Unprocessable(f"target must be a single byte token (one ASCII character); "
                                        f"{p['target']!r} is {len(enc)} tokens: use target_id", param="target")
                target_id = enc[0]
            if target_id is not None and target_id >= m.config.vocab_size:
                raise Unprocessable(f"target_id must be < vocab_size ({m.config.vocab_size})", param="target_id")
            try:
                return R.explain_decision(m, ids, state, p.get("position", -1), target_id, p.get("top_k", 8))
            except ValueError as e:
                raise Unprocessable(str(e), param="position") from None
        raise Unprocessable(f"unknown research endpoint {name!r}")
