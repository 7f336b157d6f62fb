"""Generator deployment: holds the model (CUDA when present, else CPU) and runs every model call.

* Every generation, sessionless or session, streamed or not, is a row of one decode scheduler
  (serve/scheduler.py over ``dnc.generate.BatchDecoder``): requests join and leave the batch between
  decode steps, each with its own prompt, sampling parameters, seed and stop condition; rows whose
  states share a layout run as one batch, which is exact (every model op is row-wise).
* A session turn (``serve.sessions.turns``): lease the session from its SessionBank shard, take its
  state resident on this replica (or rebuild it from the shard's last full state and token turns),
  generate, log the turn's tokens as update ``seq + 1`` (the full state now and then; acknowledged
  once durable), then answer. The state stays resident, LRU within a byte budget.
* Research computations run here too, on the same model, looked up in ``serve.research.RESEARCH``.

Events are typed (:class:`TokensEvent`, :class:`DoneEvent`); over Ray they travel as their
``to_dict()`` (the routes read ``ev["type"]`` ...). All model work happens on one dedicated thread per
replica, so the asyncio loop stays free to stream tokens.
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
from pydantic import BaseModel
from ray import serve
from ray.serve.config import RequestRouterConfig

from dnc.generate import DecodeRow, SamplingParams

from . import analysis as A
from . import research as R
from .errors import Unprocessable
from .live import get_hub
from .metrics import get_metrics, record_durable_bytes, set_resident_sessions
from .modeling import ModelSpec, load_model
from .scheduler import DecodeScheduler, timeline_ms
from .sessions import BankClient, BankConfig
from .sessions.routing import ROUTER_CLASS as SESSION_ROUTER
from .sessions.turn_log import ReplayModels
from .sessions.turns import SessionTurns, Turn, deleted_midway, state_of

logger = logging.getLogger("serve.generator")


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


@dataclass(frozen=True)
class TokenItem:
    """One emitted token: its text delta (may be empty while a UTF-8 character or a possible stop
    sequence is incomplete), its id (None for the text released at the end) and its index."""

    token: str
    token_id: int | None
    index: int


@dataclass(frozen=True)
class TokensEvent:
    """Tokens made since the last event of the same request (one at first: time to first token)."""

    items: list[TokenItem]
    type = "tokens"

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "items": [vars(i).copy() for i in self.items]}


@dataclass
class Timing:
    queue_ms: float
    ttft_ms: float
    total_ms: float
    tokens_per_s: float
    timeline: dict[str, float] = field(default_factory=dict)
    """Stages of the request, ms after it reached the Generator (``schemas.Timeline``; the ingress
    adds its own stages, ms after it received the request)."""


@dataclass
class DoneEvent:
    """The complete result of a generation, last event of a stream."""

    text: str
    token_ids: list[int]
    tokens: int
    prompt_tokens: int
    finish_reason: str                  # "length" | "eos" | "stop"
    state_id: str | None
    timing: Timing
    batch_size: int = 1                 # the most rows decoded in one model call with this one
    state: dict[str, Any] | None = None  # the session's info after the turn (session requests)
    type = "done"

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "done": True, "text": self.text, "token_ids": self.token_ids,
                "tokens": self.tokens, "prompt_tokens": self.prompt_tokens, "finish_reason": self.finish_reason,
                "state_id": self.state_id, "state": self.state,
                "timing": {**vars(self.timing), "timeline": dict(self.timing.timeline)},
                "batch_size": self.batch_size}


GenEvent = TokensEvent | DoneEvent


@dataclass
class GeneratorSettings:
    """What a Generator replica is built with: made once from :class:`serve.app.AppArgs` (its
    ``generator_settings()``) and handed to the deployment as this typed object."""

    model: ModelSpec
    """Where the weights come from."""
    bank: BankConfig
    """The session store the replica talks to."""
    hub_namespace: str = "bwr-dnc"
    hub_name: str = "dnc-live-hub"
    device: str = "auto"
    max_batch_size: int = 64
    """Most rows in one model call of the decode loop (more running requests form several batches)."""
    batch_wait_timeout_s: float = 0.0
    """When nothing is decoding, how long a first request waits for others to prefill with it (s);
    0: at once (later arrivals join between decode steps)."""
    torch_threads: int = 0
    model_name: str = "bwr-dnc"
    stream_chunk_ms: float = 15.0
    """Decode work per scheduler iteration, and the shortest time between two token events of one
    request (but its first and last): a streamed event holds what was made in this time."""
    stream_events_per_s: float = 500.0
    """Token events the replica hands out a second, about, in all: under load one request's events
    are ``max(stream_chunk_ms, running / stream_events_per_s)`` apart, because every event costs CPU
    in the Generator, the Ray hop, the ingress and the proxy (0 = ``stream_chunk_ms`` at any load)."""
    admit_batch: int = 8
    """While rows decode, arrivals are admitted together once this many wait (or ``admit_delay_ms``)."""
    admit_delay_ms: float = 5.0
    """Longest wait of an arrival for others while rows decode (ms); an idle replica admits at once."""
    admit_share: float = 0.0
    """While rows decode, admissions are spaced so they take about this share of the model thread
    at most (0 = no spacing; ``DecodeScheduler.admit_share``)."""
    admit_max_delay_ms: float = 25.0
    """The longest that spacing holds an arrival back while rows decode (ms)."""
    keep_stepping_ms: float = 0.0
    """The model thread runs decode iterations back to back for up to this long, handing tokens to
    the asyncio loop without waiting for it (0 = back to the loop after every iteration;
    ``DecodeScheduler.keep_stepping_s``)."""
    kv_attention: str = "masked"
    """The decode step's local attention (``RaggedBatch.kv_attention``): "masked" reads every row's
    whole KV window, "flex" only each row's own length (flex_attention; compiled on CUDA)."""
    metrics_interval_s: float = 5.0
    """How often the replica refreshes gauges read from elsewhere (session banks in shard memory)."""
    max_ongoing_requests: int = 256
    """Requests the replica takes at once (its deployment's ``max_ongoing_requests``, ``MAX_ONGOING``
    unless serve/app.py sets it); all of them decode together in the scheduler."""


def _in_serve_replica() -> bool:
    """Whether this runs as a Serve replica (not an in-process test instance, which must not
    create shard actors for its gauges)."""
    try:
        serve.get_replica_context()
        return True
    except Exception:
        return False


MAX_ONGOING = 256  # requests a replica takes at once (default; build_app sets AppArgs.generator_max_ongoing_requests)


# a session's turns go to the replica holding its state (serve/sessions/routing.py)
# graceful_shutdown_wait_loop_s: an idle replica leaves after one poll of its ongoing requests; Ray's 2 s
# poll made every redeploy, app delete and Ctrl-C wait 2 s per replica for nothing (busy replicas
# still drain up to graceful_shutdown_timeout_s)
@serve.deployment(name="Generator", max_ongoing_requests=MAX_ONGOING, ray_actor_options={"num_cpus": 1},
                  graceful_shutdown_wait_loop_s=0.25,
                  request_router_config=RequestRouterConfig(request_router_class=SESSION_ROUTER))
class Generator:
    def __init__(self, settings: GeneratorSettings | dict[str, Any]):
        if isinstance(settings, dict):  # a hand-built replica (tests): the same fields as a dict
            settings = GeneratorSettings(**{**settings, "model": ModelSpec(**settings["model"]),
                                            "bank": BankConfig(**settings["bank"])})
        self.settings = settings
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        self.lm = load_model(self.settings.model, self.settings.device)
        from dnc.tokenizer import get_tokenizer

        self.tok = get_tokenizer()
        self.bank = BankClient(self.settings.bank)
        # session states resident here, in the serving dtype; turns logged in another dtype (before the
        # server's dtype changed) replay on a copy of the model in theirs, loaded on first use
        models = ReplayModels(lambda dtype: load_model(self.settings.model, self.settings.device, dtype).model,
                              self.lm.dtype, [self.lm.model])
        self.turns = SessionTurns(self.lm.model, self.bank, self._run, models=models)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="dnc-model")
        self.metrics = get_metrics()  # Prometheus, through ray.serve.metrics (serve/metrics.py)
        self.scheduler = DecodeScheduler(self.lm.model, self._run, chunk_s=self.settings.stream_chunk_ms / 1e3,
                                         max_batch=self.settings.max_batch_size,
                                         max_running=self.settings.max_ongoing_requests,
                                         admit_wait_s=self.settings.batch_wait_timeout_s, metrics=self.metrics,
                                         events_per_s=self.settings.stream_events_per_s,
                                         admit_batch=self.settings.admit_batch,
                                         admit_delay_s=self.settings.admit_delay_ms / 1e3,
                                         admit_share=self.settings.admit_share,
                                         admit_max_delay_s=self.settings.admit_max_delay_ms / 1e3,
                                         keep_stepping_s=self.settings.keep_stepping_ms / 1e3,
                                         kv_attention=self.settings.kv_attention)
        self._gauges: asyncio.Task | None = None
        self._hub = None
        self.started = time.time()
        self.counters = collections.Counter()
        self.latency_ms: collections.deque[float] = collections.deque(maxlen=1024)
        self.ttft_ms: collections.deque[float] = collections.deque(maxlen=1024)
        self.durable_bytes: collections.deque[int] = collections.deque(maxlen=1024)
        self.tokens_per_s: collections.deque[float] = collections.deque(maxlen=1024)
        self.last_probe: dict[str, Any] | None = None

    # ------------------------------------------------------------------ plumbing
    async def _run(self, fn, *args):
        """Run ``fn`` on the model thread."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def _publish(self, event: dict[str, Any]) -> None:
        try:
            if self._hub is None:
                self._hub = get_hub(self.settings.hub_namespace, self.settings.hub_name)
            self._hub.publish.remote(event)  # fire and forget: events never slow a request
        except Exception:  # pragma: no cover - the hub is best effort
            logger.exception("could not publish a live event")

    def _finish(self, r: GenRequest, ids: list[int], text: str, finish: str, t0: float, ttft: float | None,
                batch: int, stamps: dict) -> DoneEvent:
        end = time.perf_counter()
        total = end - t0
        gen_time = max(1e-9, total - (ttft or 0.0))
        tps = (len(ids) - 1) / gen_time if len(ids) > 1 else len(ids) / max(total, 1e-9)
        origin = r.arrival or t0
        line = timeline_ms(stamps, origin)
        if "first_yield" in stamps:
            line["first_yield_ms"] = (stamps["first_yield"] - origin) * 1e3
        line["done_ms"] = (end - origin) * 1e3
        timing = Timing(queue_ms=stamps.get("queue_s", 0.0) * 1e3, ttft_ms=(ttft or total) * 1e3, total_ms=total * 1e3,
                        tokens_per_s=tps, timeline=line)
        self.counters["requests"] += 1
        self.counters["tokens_generated"] += len(ids)
        self.metrics.record_generation("session" if r.state_id else "sessionless", finish)
        self.latency_ms.append(total * 1e3)
        self.ttft_ms.append(timing.ttft_ms)
        self.tokens_per_s.append(tps)
        return DoneEvent(text=text, token_ids=ids, tokens=len(ids), prompt_tokens=len(r.prompt_ids),
                         finish_reason=finish, state_id=r.state_id, timing=timing, batch_size=batch)

    def _announce(self, r: GenRequest, result: DoneEvent) -> None:
        st = result.state or {}
        self._publish({"type": "generation", "state_id": r.state_id, "tokens": result.tokens,
                       "prompt_tokens": result.prompt_tokens, "finish_reason": result.finish_reason,
                       "tokens_per_s": result.timing.tokens_per_s, "ttft_ms": result.timing.ttft_ms,
                       "text": result.text[:120], "prompt": r.prompt_preview[:120],
                       "batch_size": result.batch_size, "levels": st.get("levels"),
                       "tokens_seen": st.get("tokens_seen"), "owner": r.owner})

    # ------------------------------------------------------------------ decoding
    async def _decode(self, r: GenRequest, state, t0: float, turn: Turn | None = None) -> AsyncIterator[GenEvent]:
        """``TokensEvent`` s as the scheduler makes them, then the ``DoneEvent``. ``state`` (None for
        sessionless requests) is updated in place: afterwards it holds the prompt and the emitted
        tokens (a text stop sequence ends the row right after the token that completed it).
        ``turn``: the session turn this decodes; when its session is deleted meanwhile the row
        leaves the batch at once and this raises the turn's 404 (before, it decoded on to
        ``max_new_tokens`` for an answer its commit would refuse)."""
        asm = TextAssembler(r.stop)
        deltas: list[str] = []  # text delta of every emitted token (filled on the model thread)

        def stop_check(tok: int) -> bool:
            deltas.append(asm.push(tok))
            return asm.stopped
        row = DecodeRow(r.prompt_ids, state, r.max_new_tokens, SamplingParams(r.temperature, r.top_k, r.top_p),
                        seed=r.seed, stop_tokens=frozenset(r.stop_ids), stop_check=stop_check, tag=r.request_id)
        ttft, batch, timing = None, 1, {}
        if turn is not None and turn.keeper is not None:
            def stop_when_deleted(_: asyncio.Task) -> None:
                if turn.deleted():
                    self.scheduler.stop(row)
            # (a keeper already done calls back on the next loop pass, when ``submit`` below holds the row)
            turn.keeper.add_done_callback(stop_when_deleted)
        async for steps in self.scheduler.submit(row, timing):
            if ttft is None:
                timing["first_yield"] = time.perf_counter()
                ttft = timing["first_yield"] - t0
                self.metrics.record_ttft(ttft * 1e3, "session" if r.state_id else "sessionless")
            batch = max([batch] + [st.batch for st in steps])
            yield TokensEvent([TokenItem(deltas[st.index], st.token, st.index) for st in steps])
        if turn is not None and row.finish_reason == "cancelled" and turn.deleted():
            self.counters["session_turns_deleted_midway"] += 1
            raise deleted_midway(r.state_id)
        if row.error is not None:
            if isinstance(row.error, ValueError):
                raise Unprocessable(str(row.error), "invalid_prompt", "prompt") from None
            raise RuntimeError(f"generation failed: {row.error}") from row.error
        tail = asm.finish()
        if tail:
            yield TokensEvent([TokenItem(tail, None, len(row.tokens))])
        yield self._finish(r, list(row.tokens), asm.text, row.finish_reason, t0, ttft, batch, timing)

    async def _session_turn(self, r: GenRequest) -> AsyncIterator[GenEvent]:
        """A session turn (``serve.sessions.turns``): the session's state resident on this replica
        or rebuilt from its shard, decoded with everyone else, then the turn's tokens (or, now and
        then, the full state) made durable before the answer."""
        t0 = time.perf_counter()
        turn = await self.turns.begin(r.state_id, r.owner, r.create_state)
        ready = time.perf_counter()
        try:
            result = None
            async for ev in self._decode(r, turn.state, t0, turn):
                if isinstance(ev, DoneEvent):
                    result = ev
                else:
                    yield ev
            info = {"kind": "generate", "prompt_tokens": len(r.prompt_ids), "new_tokens": result.tokens,
                    "duration_ms": result.timing.total_ms, "prompt_preview": r.prompt_preview[:200],
                    "completion_preview": result.text[:200]}
            ack = await self.turns.commit(turn, r.request_id, r.prompt_ids, result.token_ids, info)
            origin = r.arrival or t0
            result.timing.timeline.update(session_ready_ms=(ready - origin) * 1e3,
                                          done_ms=(time.perf_counter() - origin) * 1e3)  # durable now
            result.state = ack["info"]
            self.counters["session_turns"] += 1
            self.counters[f"session_state_{turn.source}"] += 1  # resident | replayed | loaded
            durable = int(ack.get("durable_bytes", 0))  # what the shard wrote for this turn (0: a retried, duplicate commit)
            self.counters["session_durable_bytes"] += durable
            self.durable_bytes.append(durable)
            record_durable_bytes(durable)
            yield result
        finally:
            await self.turns.end(turn)

    def _events(self, r: GenRequest) -> AsyncIterator[GenEvent]:
        if (self._gauges is None or self._gauges.done()) and _in_serve_replica():
            self._gauges = asyncio.get_running_loop().create_task(self._refresh_gauges())
        return self._session_turn(r) if r.state_id else self._decode(r, None, time.perf_counter())

    async def _refresh_gauges(self) -> None:
        """Every ``metrics_interval_s``: the session states resident on this replica (tier "replica":
        sum over replicas) and the session banks the store holds in memory (tier "store": each
        replica reports the same figure, so aggregate with max, not sum)."""
        while self.settings.metrics_interval_s > 0:
            set_resident_sessions(self.turns.stats()["resident_sessions"], tier="replica")
            try:
                shards = await self.bank.stats()
                set_resident_sessions(sum(s["sessions"] - s.get("offloaded", 0) for s in shards), tier="store")
            except Exception:  # shards restarting: try again next time
                logger.debug("could not read shard stats for the gauges", exc_info=True)
            await asyncio.sleep(self.settings.metrics_interval_s)

    # ------------------------------------------------------------------ public methods
    async def generate(self, r: GenRequest) -> dict[str, Any]:
        """One complete generation (no streaming): the ``DoneEvent`` as a dict."""
        r.arrival = time.perf_counter()
        result = None
        async for ev in self._events(r):
            if isinstance(ev, DoneEvent):
                result = ev
        self._announce(r, result)
        return result.to_dict()

    async def generate_stream(self, r: GenRequest) -> AsyncIterator[dict[str, Any]]:
        """Token events, then one ``done`` event with the complete result (call with stream=True);
        each the ``to_dict()`` of a :class:`TokensEvent` / :class:`DoneEvent`."""
        r.arrival = time.perf_counter()
        self.counters["streamed"] += 1
        async for ev in self._events(r):
            if isinstance(ev, DoneEvent):
                self._announce(r, ev)
            yield ev.to_dict()

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
        sch = self.scheduler.stats
        # a "batch" is one model call of the decode loop; mean_batch = rows per call
        c.update(batches=sch["steps"], batched_requests=sch["rows_stepped"], max_batch=sch["max_batch"],
                 max_running=sch["max_running"], running=len(self.scheduler.active),
                 waiting=len(self.scheduler.waiting), iterations=sch["iterations"],
                 # seconds since start, summed: the model thread in iterations / in decode steps / in
                 # prefill, and the iterations' thread hops beyond that (differences over a run: busy fractions)
                 model_busy_s=sch["busy_s"], model_step_s=sch["step_s"], model_prefill_s=sch["prefill_s"],
                 model_hop_s=sch["hop_s"])
        c["mean_batch"] = c["batched_requests"] / max(1, c["batches"])
        recent = self.scheduler.recent()
        return {"uptime_s": time.time() - self.started, "device": str(self.lm.device), **c,
                "latency_ms_p50": pct(self.latency_ms, 0.5), "latency_ms_p99": pct(self.latency_ms, 0.99),
                "ttft_ms_p50": pct(self.ttft_ms, 0.5), "ttft_ms_p99": pct(self.ttft_ms, 0.99),
                "decoded_tokens": sch["tokens"],
                "recent_tokens_per_s": recent["tokens_per_s"], "inter_token_ms_p50": recent["inter_token_ms_p50"],
                "inter_token_ms_p99": recent["inter_token_ms_p99"],
                "durable_bytes_per_turn_p50": pct(self.durable_bytes, 0.5),
                "tokens_per_s_mean": sum(self.tokens_per_s) / len(self.tokens_per_s) if self.tokens_per_s else None}

    async def probe(self) -> dict[str, Any]:
        ids = list(b"The memory bank remembers what the local window forgets. " * 3)
        self.last_probe = await self._run(A.probe, self.lm.model, ids)
        return self.last_probe

    async def research(self, name: str, params: dict[str, Any] | BaseModel, owner: str | None) -> dict[str, Any]:
        """Run the research endpoint ``name`` (``serve.research.RESEARCH``) on the real model, from the
        session ``params.state_id`` when given (read-only). ``params``: the request the HTTP route
        validated, or a dict (WebSocket, tests) validated here."""
        entry, req = R.research_request(name, params)
        bank = None
        sid = getattr(req, "state_id", None)
        if sid:
            bank = await self.bank.call(sid, "get_bank", owner)

        def run():
            state = state_of(self.turns.models, sid, bank) if sid else None
            return entry.run(self.lm, req, state)
        t = time.perf_counter()
        out = await self._run(run)
        self.counters[f"research/{name}"] += 1
        return {"endpoint": name, "compute_ms": (time.perf_counter() - t) * 1e3, "state_id": sid, **out}
