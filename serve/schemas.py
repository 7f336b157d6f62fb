"""Pydantic request/response models of the HTTP/WebSocket API (they are also the OpenAPI at /docs).

Our own endpoints reject unknown fields (a typo should not be silently ignored); the OpenAI-compatible
ones accept and ignore fields they do not use, as OpenAI clients send many. Bounds here are the hard
limits of the API; a server may configure tighter ones (``AppArgs``), checked in the routes.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, field_validator,
                      model_validator)

ID_PATTERN = r"[A-Za-z0-9_-]{1,64}"
ID_RE = re.compile(rf"^{ID_PATTERN}$")
MAX_NEW_TOKENS = 4096
MAX_PROMPT_CHARS = 262_144
MAX_RESEARCH_CHARS = 16_384
MAX_STOP = 8
MAX_SEED = 2**63 - 1
MAX_TOP_K = 100_000
TEMPERATURE_FLOOR = 1e-2  # below it sampling is greedy: logits / 1e-40 overflow to inf and NaN


def check_id(value: str, what: str = "state_id") -> str:
    if not isinstance(value, str) or not ID_RE.match(value):
        raise ValueError(f"{what} must match {ID_PATTERN}")
    return value


def _state_id(v: str) -> str:
    return check_id(v, "state_id")


def _owner(v: str) -> str:
    return check_id(v, "owner")


StateId = Annotated[str, AfterValidator(_state_id), Field(json_schema_extra={"pattern": f"^{ID_PATTERN}$"},
                                                          examples=["chat-42"])]
Owner = Annotated[str, AfterValidator(_owner), Field(json_schema_extra={"pattern": f"^{ID_PATTERN}$"},
                                                     description="Session owner; the X-Owner header wins.")]


class Strict(BaseModel):
    """Unknown fields are errors, and no coercion: ``"4"`` or ``true`` is not an int, ``"yes"`` not a bool."""

    model_config = ConfigDict(extra="forbid", strict=True)


def greedy_below_floor(v: float) -> float:
    """A temperature below :data:`TEMPERATURE_FLOOR` means greedy decoding (0.0)."""
    return 0.0 if v < TEMPERATURE_FLOOR else v


# --------------------------------------------------------------------------- generation
class SamplingParams(Strict):
    max_new_tokens: int = Field(32, ge=1, le=MAX_NEW_TOKENS, description="Tokens to generate (bytes).")
    temperature: float = Field(0.8, ge=0.0, le=5.0, description=f"0 = greedy (so is anything below "
                                                                     f"{TEMPERATURE_FLOOR}).")
    top_k: int = Field(0, ge=0, le=MAX_TOP_K, description="Keep the k most likely tokens (0 = all).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Sampling seed for reproducible output.")
    stop: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=MAX_STOP, description="Stop when the output ends with one of these.")

    _temperature_floor = field_validator("temperature")(classmethod(lambda cls, v: greedy_below_floor(v)))


class GenerateRequest(SamplingParams):
    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS)
    state_id: StateId | None = Field(None, description="Session whose memory the model reads and updates.")
    create_state: bool = Field(True, description="Create the session if it does not exist.")
    owner: Owner | None = None
    stream: bool = Field(False, description="Server-Sent Events: one `token` event per token, then `done`.")


class Timeline(BaseModel):
    """Where a request's time went, stage by stage. Two clocks, never compared: the Generator's
    stages are ms after the Generator received the request, the ingress's ms after the ingress's
    ASGI app received it (both ``time.perf_counter()`` differences within one process). A stage the request
    did not reach (cancelled, failed) is absent."""

    session_ready_ms: float | None = Field(None, description="Generator: the session's state resident here "
                                           "(session turns only).")
    admitted_ms: float | None = Field(None, description="Generator: given a place in the decode batch.")
    prefilled_ms: float | None = Field(None, description="Generator: its prompt went through the model.")
    first_token_ms: float | None = Field(None, description="Generator: the decode step that made its first token ended.")
    first_event_ms: float | None = Field(None, description="Generator: its first token event handed to its queue.")
    first_yield_ms: float | None = Field(None, description="Generator: that event taken from the queue (streamed "
                                         "on from here).")
    last_token_ms: float | None = Field(None, description="Generator: the step that made its last token ended.")
    last_event_ms: float | None = Field(None, description="Generator: its last token event handed to its queue.")
    done_ms: float | None = Field(None, description="Generator: the result ready (for session turns: durable).")
    events: int = Field(0, description="Generator: token events (lists of tokens) this request got.")
    event_lag_ms_mean: float | None = Field(None, description="Generator: mean time an event waited in its queue "
                                            "for the asyncio loop.")
    ingress_body_ms: float | None = Field(None, description="Ingress: the request body read (in a Serve replica, "
                                          "a call back to the proxy).")
    ingress_handler_ms: float | None = Field(None, description="Ingress: the route's handler began (after "
                                             "middleware, body parsing and validation).")
    ingress_sent_ms: float | None = Field(None, description="Ingress: validated and sent to the Generator.")
    ingress_first_event_ms: float | None = Field(None, description="Ingress: the first event back (streams).")
    ingress_done_ms: float | None = Field(None, description="Ingress: the result back from the Generator.")
    ingress_events: int | None = Field(None, description="Ingress: events received from the Generator (streams).")


class Timing(BaseModel):
    queue_ms: float = 0.0
    ttft_ms: float = Field(..., description="Time to first token.")
    total_ms: float
    tokens_per_s: float
    timeline: Timeline | None = Field(None, description="The request's stages (see Timeline).")


class LevelInfo(BaseModel):
    level: int
    slots: int = Field(..., description="Valid slots at this level, summed over memory layers.")
    capacity: int = Field(..., description="Slot capacity at this level, summed over memory layers.")


class Turn(BaseModel):
    seq: int
    kind: str = Field(..., description="generate | compact | merge | create")
    at: float = Field(..., description="Unix time (s).")
    prompt_tokens: int = 0
    new_tokens: int = 0
    tokens_seen: int = 0
    duration_ms: float = 0.0
    prompt_preview: str = ""
    completion_preview: str = ""
    dtype: str | None = Field(None, description="Dtype the turn was decoded in (float32 | bfloat16); absent "
                              "for turns recorded before the serving dtype existed (float32) and for non-generate turns.")
    detail: dict[str, Any] = Field(default_factory=dict)


class StateInfo(BaseModel):
    state_id: str
    owner: str
    created_at: float
    updated_at: float
    seq: int = Field(..., description="Sequence number of the last applied update.")
    tokens_seen: int = 0
    turns: int = 0
    bank_bytes: int = Field(0, description="Serialized bank size (bytes).")
    offloaded: bool = Field(False, description="Bank currently held in storage, not in shard memory.")
    digest: str | None = Field(None, description="sha256 of the serialized bank (first 16 hex).")
    shard: int = 0
    levels: list[LevelInfo] = Field(default_factory=list)
    summary: dict[str, Any] = Field(default_factory=dict, description="DNCState.summary() of the bank.")
    history: list[Turn] | None = Field(None, description="Turns, oldest first (GET /v1/state/{id} only).")


class GenerateResponse(BaseModel):
    text: str
    token_ids: list[int]
    tokens: int = Field(..., description="Generated tokens.")
    prompt_tokens: int
    finish_reason: Literal["length", "stop", "eos"]
    state_id: str | None = None
    state: StateInfo | None = None
    timing: Timing


class StateListResponse(BaseModel):
    states: list[StateInfo]
    count: int = Field(..., description="Sessions on this page.")
    has_more: bool = Field(False, description="More sessions follow: ask again with after=next_after.")
    next_after: str | None = None
    incomplete: bool = Field(False, description="Some session store shards could not answer: their sessions "
                             "are missing from this listing (they are not lost); ask again later.")
    unreachable_shards: list[int] = Field(default_factory=list, description="The shards that could not answer.")


class StateCreateRequest(Strict):
    state_id: StateId | None = Field(None, description="Omit to get a server-generated id.")
    owner: Owner | None = None


class StateCompactRequest(Strict):
    merge: bool = Field(True, description="Also merge near-duplicate slots (DNCState.merge_duplicates).")
    merge_threshold: float = Field(0.98, ge=0.5, le=1.0, description="Cosine similarity to merge at.")
    owner: Owner | None = None


class StateCompactResponse(BaseModel):
    state_id: str
    moved: dict[str, Any] = Field(default_factory=dict, description="model.compact_state() counts.")
    merged: int = 0
    levels_before: list[LevelInfo]
    levels_after: list[LevelInfo]
    bytes_before: int
    bytes_after: int
    state: StateInfo


class DeleteResponse(BaseModel):
    state_id: str
    deleted: bool


# --------------------------------------------------------------------------- service
class HealthResponse(BaseModel):
    status: Literal["ok", "degraded"]
    forward_ms: float = Field(..., description="Time of the real forward pass this check ran.")
    logits_finite: bool
    device: str
    shards_alive: int
    shards_total: int
    uptime_s: float


class ModelStatsResponse(BaseModel):
    model_name: str
    source: str = Field(..., description="Checkpoint URI, or 'untrained <preset> (seed N)'.")
    checkpoint: str | None
    preset: str | None
    params: int
    device: str
    dtype: str
    weights_digest: str
    memory_layers: list[int]
    bank_capacity_slots: int = Field(..., description="Slots per sequence over all memory layers and levels.")
    config: dict[str, Any]
    extra: dict[str, Any] = Field(default_factory=dict, description="Checkpoint extra.json (step, metrics...).")
    serving: dict[str, Any] = Field(default_factory=dict)


# --------------------------------------------------------------------------- OpenAI-compatible
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool = False


class _OpenAIBase(BaseModel):
    # OpenAI clients send fields we do not use: those are ignored; the ones we use are strict
    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = Field(None, max_length=256)
    temperature: float = Field(1.0, ge=0.0, le=2.0, description=f"0 (or below {TEMPERATURE_FLOOR}) = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="Only n=1 is supported.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    user: str | None = Field(None, max_length=256, description="The session owner when the server has no keys "
                                                               "and X-Owner is absent.")
    state_id: StateId | None = Field(None, description="Extension: session memory to read and update.")
    top_k: int = Field(0, ge=0, le=MAX_TOP_K, description="Extension: top-k sampling.")

    _temperature_floor = field_validator("temperature")(classmethod(lambda cls, v: greedy_below_floor(v)))

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return []
        v = [v] if isinstance(v, str) else v
        if len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s or len(s) > 64 for s in v):
            raise ValueError("each stop sequence must be 1-64 characters")
        return v


class CompletionRequest(_OpenAIBase):
    prompt: str | list[str] = Field(..., description="One prompt (a list must hold exactly one).")
    max_tokens: int = Field(16, ge=1, le=MAX_NEW_TOKENS)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("send exactly one prompt per request (batching happens server-side)")
            v = v[0]
        if not v:
            raise ValueError("prompt must not be empty")
        if len(v) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompt must be at most {MAX_PROMPT_CHARS} characters")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")


class ChatCompletionRequest(_OpenAIBase):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=1024)
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)

    def new_tokens(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 64


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: dict[str, Any]
    finish_reason: str | None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


# --------------------------------------------------------------------------- research
class TextInput(Strict):
    text: str = Field(..., min_length=2, max_length=MAX_RESEARCH_CHARS,
                      description="Text to run through the model (UTF-8 bytes are the tokens).")
    state_id: StateId | None = Field(None, description="Start from this session's memory (read-only).")
    owner: Owner | None = None


class AnalyzeTextRequest(TextInput):
    top_slots: int = Field(4, ge=1, le=4, description="Memory slots reported per token and layer (the trace keeps 4).")


class GradientAnalysisRequest(TextInput):
    pass


class StateEvolutionRequest(TextInput):
    segment_len: int | None = Field(None, ge=1, le=8192, description="Tokens per step (default: the model's).")


class AttentionAnalysisRequest(TextInput):
    max_matrix: int = Field(64, ge=0, le=256, description="Side of the local-attention matrix returned (0 = none).")


class InformationFlowRequest(TextInput):
    pass


class ExplainDecisionRequest(TextInput):
    position: int = Field(-1, description="Position whose next-token logit is explained (-1 = last).")
    target: str | None = Field(None, min_length=1, max_length=8,
                               description="Token to explain, as text (one UTF-8 byte); default: the argmax.")
    target_id: int | None = Field(None, ge=0, description="Token id to explain (overrides target).")
    top_k: int = Field(8, ge=1, le=64)


class EfficiencyRequest(Strict):
    context_tokens: int = Field(256, ge=1, le=16_384, description="Context processed before measuring.")
    new_tokens: int = Field(16, ge=1, le=512, description="Tokens generated for the tokens/s figure.")


class StateClusteringRequest(Strict):
    state_id: StateId | None = Field(None, description="Cluster this session's slots ...")
    text: str | None = Field(None, min_length=2, max_length=MAX_RESEARCH_CHARS, description="... or the bank built from this text.")
    owner: Owner | None = None
    k: int = Field(4, ge=1, le=32, description="k-means clusters.")
    max_points: int = Field(1024, ge=2, le=8192)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.state_id is None) == (self.text is None):
            raise ValueError("give exactly one of state_id or text")
        return self


class SlotsRequest(Strict):
    state_id: StateId | None = Field(None, description="List this session's slots ...")
    text: str | None = Field(None, min_length=2, max_length=MAX_RESEARCH_CHARS, description="... or the bank built from this text.")
    owner: Owner | None = None
    per_level: int = Field(32, ge=1, le=256, description="Slots listed per level, the most salient first; "
                                                          "the rest are counted in not_shown.")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.state_id is None) == (self.text is None):
            raise ValueError("give exactly one of state_id or text")
        return self


class TrainingStepRequest(BaseModel):
    """One training step's metrics from a trainer. Unknown numeric top-level fields are folded
    into ``metrics`` so ``{"run_id": "r1", "step": 10, "loss": 2.3}`` works too."""

    model_config = ConfigDict(extra="forbid", strict=True)
    run_id: Annotated[str, AfterValidator(lambda v: check_id(v, "run_id"))] = "default"
    step: int = Field(..., ge=0)
    metrics: dict[str, float] = Field(default_factory=dict)
    timestamp: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _fold_flat(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = {"run_id", "step", "metrics", "timestamp"}
            extra = {k: v for k, v in data.items() if k not in known}
            if extra:
                metrics = dict(data.get("metrics") or {})
                for k, v in extra.items():
                    if isinstance(v, bool) or not isinstance(v, (int, float)):
                        raise ValueError(f"field {k!r} is not a number; put metrics under 'metrics' as name -> number")
                    metrics[k] = v
                data = {k: v for k, v in data.items() if k in known} | {"metrics": metrics}
        return data

    @field_validator("metrics")
    @classmethod
    def _finite(cls, v: dict[str, float]) -> dict[str, float]:
        if len(v) > 256:
            raise ValueError("at most 256 metrics per step")
        bad = [k for k, x in v.items() if not math.isfinite(x)]
        if bad:
            raise ValueError(f"metrics must be finite numbers; not finite: {', '.join(bad[:5])}")
        return v


class WSResearchRequest(BaseModel):
    """A request on /ws/research: ``{"id": 1, "endpoint": "analyze-text", "params": {...}}``."""

    id: Any = None
    endpoint: str
    params: dict[str, Any] = Field(default_factory=dict)


# --------------------------------------------------------------------------- errors
class ErrorDetail(BaseModel):
    message: str = Field(..., description="What was wrong and what to do.")
    type: str = Field(..., description="invalid_request_error | authentication_error | not_found_error | "
                                       "conflict_error | rate_limit_error | service_unavailable | server_error")
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ValidationItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorResponse(ErrorResponse):
    detail: list[ValidationItem] | None = Field(None, description="One item per schema problem (schema errors only).")


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "A body that is not JSON"},
    401: {"model": ErrorResponse, "description": "No valid API key (servers with keys)"},
    404: {"model": ErrorResponse, "description": "No such session for this owner, or no such endpoint"},
    409: {"model": ErrorResponse, "description": "The session changed meanwhile (retry)"},
    422: {"model": ValidationErrorResponse, "description": "A value the server cannot use"},
    429: {"model": ErrorResponse, "description": "A quota or concurrency cap of this key"},
    503: {"model": ErrorResponse, "description": "Busy (the session is in another turn) or degraded"},
}


SSE_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"description": "JSON, or with stream=true Server-Sent Events (`data: {...}` lines)",
          "content": {"text/event-stream": {"schema": {  # one SSE event: `data:` is a JSON object or [DONE]
              "type": "object", "required": ["data"],
              "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}}}}}}}


RESEARCH_REQUESTS: dict[str, type[BaseModel]] = {
    "analyze-text": AnalyzeTextRequest,
    "gradient-analysis": GradientAnalysisRequest,
    "state-evolution": StateEvolutionRequest,
    "attention-analysis": AttentionAnalysisRequest,
    "efficiency-metrics": EfficiencyRequest,
    "state-clustering": StateClusteringRequest,
    "information-flow": InformationFlowRequest,
    "explain-decision": ExplainDecisionRequest,
    "slots": SlotsRequest,
}
