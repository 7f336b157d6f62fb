"""The one registry of research endpoints: name -> (request schema, function, summary, cost).

The routes add ``POST /research/{name}`` for each entry of :data:`RESEARCH` and the Generator runs
``RESEARCH[name].run`` on its model; the computations themselves are in :mod:`serve.analysis`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel

from . import schemas as S
from .analysis import (analyze_text, attention_analysis, efficiency_metrics, explain_decision, gradient_analysis,
                       information_flow, run_segments, slot_cards, state_clustering, state_evolution)
from .errors import Unprocessable
from .modeling import levels_of


# --------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class ResearchEndpoint:
    """One research endpoint: ``POST /research/{name}`` with a ``request`` body, computed by ``run``."""

    name: str
    """URL tail: POST /research/{name}."""
    request: type[BaseModel]
    """Request body schema (serve/schemas.py)."""
    run: Callable[..., dict]
    """run(loaded_model, request_obj, state_or_None) -> JSON-able dict, on the model thread. The state
    is the session's (``request.state_id``) when given, else None."""
    summary: str
    """One line for OpenAPI."""
    expensive: bool = False
    """Capped (context/token limits) and concurrency-limited per key: it runs a backward pass or times
    generation."""


def _ids(req) -> list[int] | None:
    from dnc.tokenizer import get_tokenizer

    text = getattr(req, "text", None)
    return get_tokenizer().encode(text) if text else None


def _run_clustering(lm, req: S.StateClusteringRequest, state) -> dict[str, Any]:
    if state is None:
        _, _, state, _ = run_segments(lm.model, _ids(req), None, trace=False)
    out = state_clustering(state, req.k, req.max_points)
    out["bank_levels"] = levels_of(state.summary())
    return out


def _run_slots(lm, req: S.SlotsRequest, state) -> dict[str, Any]:
    if state is None:
        _, _, state, _ = run_segments(lm.model, _ids(req), None, trace=False)
    return slot_cards(lm.model, state, req.per_level)


def _run_explain(lm, req: S.ExplainDecisionRequest, state) -> dict[str, Any]:
    from dnc.tokenizer import get_tokenizer

    vocab = lm.model.config.vocab_size
    target_id = req.target_id
    if target_id is None and req.target:
        enc = get_tokenizer().encode(req.target)
        if len(enc) != 1:
            raise Unprocessable(f"target must be a single byte token (one ASCII character); "
                                f"{req.target!r} is {len(enc)} tokens: use target_id", param="target")
        target_id = enc[0]
    if target_id is not None and target_id >= vocab:
        raise Unprocessable(f"target_id must be < vocab_size ({vocab})", param="target_id")
    try:
        return explain_decision(lm.model, _ids(req), state, req.position, target_id, req.top_k)
    except ValueError as e:
        raise Unprocessable(str(e), param="position") from None


def _endpoints() -> dict[str, ResearchEndpoint]:
    E = ResearchEndpoint
    entries = [
        E("analyze-text", S.AnalyzeTextRequest,
          lambda lm, r, st: analyze_text(lm.model, _ids(r), st, r.top_slots),
          "Per-token loss and memory reads (level mass, top slots) from model(..., trace=True)"),
        E("gradient-analysis", S.GradientAnalysisRequest,
          lambda lm, r, st: gradient_analysis(lm.model, _ids(r), st),
          "Per-layer gradient norms of the LM loss from a real backward pass", expensive=True),
        E("state-evolution", S.StateEvolutionRequest,
          lambda lm, r, st: state_evolution(lm.model, _ids(r), st, r.segment_len),
          "The bank (slots per level, bytes, loss) after each segment of the text", expensive=True),
        E("attention-analysis", S.AttentionAnalysisRequest,
          lambda lm, r, st: attention_analysis(lm.model, _ids(r), st, r.max_matrix),
          "Local attention (entropy, distance, matrix) and memory attention by level"),
        E("efficiency-metrics", S.EfficiencyRequest,
          lambda lm, r, st: efficiency_metrics(lm.model, r.context_tokens, r.new_tokens),
          "Tokens/s measured now; bank bytes vs the KV cache of a plain Transformer", expensive=True),
        E("state-clustering", S.StateClusteringRequest, _run_clustering,
          "Slot keys clustered by k-means and projected to 2-D by PCA"),
        E("slots", S.SlotsRequest, _run_slots,
          "Per-slot salience, age, access count, last access and learned importance, per level by salience"),
        E("information-flow", S.InformationFlowRequest,
          lambda lm, r, st: information_flow(lm.model, _ids(r), st),
          "Share of each layer's update from the memory read vs local attention"),
        E("explain-decision", S.ExplainDecisionRequest, _run_explain,
          "Memory slots and input tokens that most raised a chosen token's logit", expensive=True),
    ]
    return {e.name: e for e in entries}


RESEARCH: dict[str, ResearchEndpoint] = _endpoints()
"""Every research endpoint by name (the routes and the Generator both use it)."""


def research_request(name: str, params: dict[str, Any] | BaseModel) -> tuple[ResearchEndpoint, BaseModel]:
    """The registry entry of ``name`` and ``params`` validated by its schema (a request the HTTP
    route already validated passes as it is); Unprocessable (422) naming the endpoint or the field
    otherwise."""
    entry = RESEARCH.get(name)
    if entry is None:
        raise Unprocessable(f"unknown research endpoint {name!r}; known: {', '.join(sorted(RESEARCH))}",
                            "unknown_endpoint", "endpoint")
    if isinstance(params, entry.request):
        return entry, params
    try:
        return entry, entry.request.model_validate(params)
    except ValueError as e:  # pydantic's ValidationError
        errs = getattr(e, "errors", lambda: [])()
        first = errs[0] if errs else {}
        param = ".".join(str(x) for x in first.get("loc", ())) or None
        raise Unprocessable(f"{name}: {first.get('msg', str(e))}" + (f" ({param})" if param else ""),
                            "invalid_request", param) from None

