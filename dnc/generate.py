"""Generation apart from the model: sampling, and one batched decode loop.

* :func:`sample_next` / :func:`sample_rows`: the next token from logits. No argument value can make
  them raise: a temperature below :data:`MIN_TEMPERATURE` (or not finite) is greedy, ``top_k`` outside
  ``1..V-1`` is off, ``top_p`` not finite or ``>= 1`` is off and ``<= 0`` keeps the top token, and
  rows whose logits are not finite fall back to their argmax.
* :class:`BatchDecoder`: the decode loop of the library (:func:`generate_stream`, ``DNC.generate``)
  and of the server. Each row has its own prompt, state, sampling parameters, seed and stop
  condition. Rows are prefilled together when their states share a layout and their prompts a
  length, then decoded one token per row per :meth:`BatchDecoder.step`, every group of rows whose
  states share a layout (``DNCState.layout``) as one batch. Every op of the model is row-wise, so a
  row's tokens are those it would get alone; rows of different states never mix. Rows that finish
  leave the batch, and their final state is written back into the ``DNCState`` the caller gave.
  Rows can be added between steps (the place for continuous batching).

A row's failure (bad prompt ids, its stop check raising) finishes that row alone with
``finish_reason == "error"``; a failing model step fails only the rows of that batch.
Shapes: B rows, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from .state import DNCState

MIN_TEMPERATURE = 1e-4
"""Temperatures below this (and non-finite ones) mean greedy decoding."""


# ================================================================================== sampling
@dataclass(frozen=True)
class SamplingParams:
    """How a row picks its next token. Any values are accepted; :meth:`normalized` says what they mean."""

    temperature: float = 1.0
    """Softmax temperature; below ``MIN_TEMPERATURE`` (or NaN/inf) = greedy (argmax)."""
    top_k: int = 0
    """Keep the k most likely tokens; 0, negative or >= vocab = all."""
    top_p: float = 1.0
    """Nucleus: keep the smallest set of tokens with mass >= top_p; >= 1 or NaN = all, <= 0 = the top one."""

    def normalized(self, vocab: int) -> tuple[bool, float, int, float]:
        """(greedy, temperature, top_k (0 = off), top_p (1.0 = off)) with every edge case resolved."""
        t = _finite(self.temperature, 0.0)
        greedy = t < MIN_TEMPERATURE
        k = int(_finite(self.top_k, 0)) if not isinstance(self.top_k, bool) else 0
        k = k if 0 < k < vocab else 0
        p = _finite(self.top_p, 1.0)
        p = 1.0 if p >= 1.0 else max(p, 0.0)
        return greedy, t, k, p

    def plain(self, vocab: int) -> bool:
        """Temperature sampling without top-k/top-p (several rows share one multinomial)."""
        greedy, _, k, p = self.normalized(vocab)
        return not greedy and k == 0 and p >= 1.0


def _finite(x, default: float) -> float:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return default
    return x if math.isfinite(x) else default


def _filtered_logits(logits: torch.Tensor, t: float, k: int, p: float) -> torch.Tensor:
    """logits [V] float32 -> temperature-scaled logits with top-k / top-p cut to -inf."""
    logits = logits / t
    if k:
        kth = logits.topk(k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p < 1.0:
        sorted_logits, idx = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        remove = probs.cumsum(-1) - probs > p  # keep the smallest set with mass >= top_p (never the top one)
        logits = logits.scatter(0, idx, sorted_logits.masked_fill(remove, float("-inf")))
    return logits


def _safe_probs(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim of [B, V] logits; rows that are not a distribution (NaN/inf
    logits) become one-hot on their argmax, on the device (no host sync, no device assert)."""
    clean = torch.nan_to_num(logits.float(), nan=float("-inf"))
    probs = clean.softmax(-1)
    ok = torch.isfinite(probs).all(-1, keepdim=True) & (probs.sum(-1, keepdim=True) > 0)
    onehot = torch.zeros_like(probs).scatter_(-1, torch.nan_to_num(logits.float(), nan=0.0).argmax(-1, keepdim=True), 1.0)
    return torch.where(ok, torch.nan_to_num(probs, nan=0.0), onehot)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> int:
    """One token id from ``logits`` [V] or [1, V] (greedy when temperature < MIN_TEMPERATURE).
    ``generator`` (on the logits' device) makes the draw reproducible."""
    logits = logits.float().reshape(-1)
    greedy, t, k, p = SamplingParams(temperature, top_k, top_p).normalized(logits.numel())
    if greedy:
        return int(torch.nan_to_num(logits, nan=float("-inf")).argmax())
    probs = _safe_probs(_filtered_logits(logits, t, k, p)[None])
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None]) -> list[int]:
    """The next token of every row of ``logits`` [B, V] with its own parameters and generator.
    Greedy rows share one argmax, unseeded plain-temperature rows one multinomial; the others
    (top-k/top-p or seeded) are drawn row by row, each exactly as :func:`sample_next` draws it."""
    b, vocab = logits.shape
    out = [0] * b
    greedy = [i for i in range(b) if params[i].normalized(vocab)[0]]
    plain = [i for i in range(b) if generators[i] is None and params[i].plain(vocab)]
    if greedy:
        g = torch.nan_to_num(logits[greedy].float(), nan=float("-inf")).argmax(-1)
        for i, tok in zip(greedy, g.tolist()):
            out[i] = tok
    if plain:
        temp = torch.tensor([params[i].normalized(vocab)[1] for i in plain], device=logits.device)
        probs = _safe_probs(logits[plain].float() / temp[:, None])
        for i, tok in zip(plain, torch.multinomial(probs, 1).squeeze(1).tolist()):
            out[i] = tok
    done = set(greedy) | set(plain)
    for i in range(b):
        if i not in done:
            sp = params[i]
            out[i] = sample_next(logits[i], sp.temperature, sp.top_k, sp.top_p, generators[i])
    return out


# ================================================================================== decode loop
@dataclass(eq=False)
class DecodeRow:
    """One sequence to decode. The decoder fills the result fields."""

    prompt_ids: Sequence[int]
    """Token ids fed before the first new token (at least one)."""
    state: DNCState | None = None
    """Batch-1 state to continue from; updated in place when the row finishes (it then holds the
    prompt and every emitted token). None = a fresh state that is dropped afterwards."""
    max_new_tokens: int = 64
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    """Seed of the row's own generator (used when ``generator`` is None)."""
    generator: torch.Generator | None = None
    stop_tokens: frozenset[int] = frozenset()
    """Token ids that end the row (emitted, and fed into the state): finish_reason "eos"."""
    stop_check: Callable[[int], bool] | None = None
    """Called with every emitted token (before the other stop conditions); True ends the row after
    it (finish_reason "stop"), e.g. when the text completes a stop sequence."""
    tag: object = None
    """Anything the caller wants to find the row by."""
    # results
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "length" | "eos" | "stop" | "error" | "cancelled"
    error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)
class _Group:
    rows: list[DecodeRow]
    state: DNCState          # batch len(rows), row i = rows[i]
    logits: torch.Tensor     # [len(rows), V]: next-token logits of each row


@dataclass(frozen=True)
class StepToken:
    """One token a row emitted in a step (``finish`` set when it was the row's last)."""

    row: DecodeRow
    token: int
    index: int
    finish: str | None
    batch: int = 1
    """Rows decoded in the same model call."""


class BatchDecoder:
    """Decodes any number of :class:`DecodeRow` s together (see the module docstring).

    ``add(rows)`` prefills them (rows whose states share a layout and whose prompts share a length
    as one batch); ``step()`` emits one token for every running row; ``running`` says whether any
    row is left. ``max_batch`` caps the rows of one model call (more rows of one layout form
    several batches). Runs under ``torch.no_grad``; the model should be in eval mode."""

    def __init__(self, model, max_batch: int = 64):
        self.model = model
        self.max_batch_rows = max(1, int(max_batch))  # rows in one model call at most
        self.groups: list[_Group] = []
        self.steps = 0
        self.max_batch = 0  # the most rows one model call has decoded

    @property
    def running(self) -> bool:
        return bool(self.groups)

    def batch_sizes(self) -> list[int]:
        return [len(g.rows) for g in self.groups]

    # ------------------------------------------------------------------ admission
    @torch.no_grad()
    def add(self, rows: Sequence[DecodeRow]) -> list[DecodeRow]:
        """Prefill ``rows`` and let them join the batch. Returns the rows that failed already
        (``finish_reason == "error"``: bad prompt, state of another model)."""
        failed = []
        buckets: dict[tuple, list[DecodeRow]] = {}
        for row in rows:
            problem = self._check(row)
            if problem:
                self._fail(row, ValueError(problem))
                failed.append(row)
                continue
            if row.generator is None and row.seed is not None:
                row.generator = torch.Generator(device=self.model.device).manual_seed(int(row.seed))
            start = None if row.state is None else row.state.layout()
            buckets.setdefault((start, len(row.prompt_ids)), []).append(row)
        n = self.max_batch_rows
        for bucket in buckets.values():
            for i in range(0, len(bucket), n):
                failed += self._prefill(bucket[i:i + n])
        return failed

    def _check(self, row: DecodeRow) -> str | None:
        vocab = self.model.config.vocab_size
        ids = row.prompt_ids
        if len(ids) == 0:
            return "prompt must contain at least one token"
        bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab]
        if bad:
            return f"prompt token ids must be ints in [0, {vocab}); got {bad[0]!r}"
        if row.state is not None and row.state.batch_size != 1:
            return f"a row's state must have batch size 1, got {row.state.batch_size}"
        return None

    def _prefill(self, rows: list[DecodeRow]) -> list[DecodeRow]:
        m = self.model
        if len(rows) == 1 and rows[0].state is not None:
            state = rows[0].state  # decode in the caller's own state object: no copy
        elif rows[0].state is None:
            state = m.init_state(len(rows))
        else:
            state = DNCState.stack([r.state for r in rows])
        ids = torch.tensor([list(r.prompt_ids) for r in rows], dtype=torch.long, device=m.device)
        try:
            logits = m(ids, state=state, last_logits_only=True, metrics=False).logits[:, -1]
        except Exception as e:
            if len(rows) == 1:
                self._fail(rows[0], e)
                return rows
            # find the culprit: each row alone (their own states are untouched: the batch was a copy)
            return [r for r in rows for f in [self._prefill([r])] if f]
        done = [r for r in rows if r.max_new_tokens <= 0]
        for r in done:
            r.finish_reason = "length"
        self._join(_Group(rows, state, logits), retire=done)
        return []

    def _join(self, group: _Group, retire: list[DecodeRow]) -> None:
        if retire:
            group = self._retire(group, retire)
            if group is None:
                return
        for g in self.groups:  # same layout: one batch from now on (equal layouts stay equal)
            if len(g.rows) + len(group.rows) <= self.max_batch_rows and g.state.layout() == group.state.layout():
                g.state = DNCState.stack([g.state, group.state])
                g.rows = g.rows + group.rows
                g.logits = torch.cat([g.logits, group.logits], 0)
                return
        self.groups.append(group)

    # ------------------------------------------------------------------ decoding
    @torch.no_grad()
    def step(self) -> list[StepToken]:
        """One new token for every running row: sample, check the stop conditions, feed the
        tokens through the model (also the last one of a finishing row, so its state holds the
        whole exchange), retire the rows that finished."""
        out: list[StepToken] = []
        self.steps += 1
        self.max_batch = max([self.max_batch] + self.batch_sizes())
        groups, self.groups = self.groups, []
        for g in groups:
            toks = sample_rows(g.logits, [r.sampling for r in g.rows], [r.generator for r in g.rows])
            finished = []
            for r, tok in zip(g.rows, toks):
                r.tokens.append(tok)
                try:
                    stopped = r.stop_check is not None and r.stop_check(tok)  # sees every token
                    if tok in r.stop_tokens:
                        r.finish_reason = "eos"
                    elif stopped:
                        r.finish_reason = "stop"
                    elif len(r.tokens) >= r.max_new_tokens:
                        r.finish_reason = "length"
                except Exception as e:  # the caller's stop check: this row alone fails
                    self._fail(r, e)
                if r.done:
                    finished.append(r)
                out.append(StepToken(r, tok, len(r.tokens) - 1, r.finish_reason, len(g.rows)))
            running = len(finished) < len(g.rows)
            if running or any(r.state is not None and r.finish_reason != "error" for r in finished):
                try:
                    x = torch.tensor(toks, dtype=torch.long, device=self.model.device).view(-1, 1)
                    g.logits = self.model(x, state=g.state, last_logits_only=True, metrics=False).logits[:, -1]
                except Exception as e:  # the batch's state is now partial: its rows cannot go on
                    for r in g.rows:
                        if r.finish_reason != "error":
                            self._fail(r, e)
                    continue
            rest = self._retire(g, finished)
            if rest is not None:
                self.groups.append(rest)
        return out

    def _retire(self, g: _Group, finished: list[DecodeRow]) -> _Group | None:
        """Write the finished rows' states back to their owners; the rest of the group, or None."""
        if not finished:
            return g
        gone = set(map(id, finished))
        for i, r in enumerate(g.rows):
            if (id(r) in gone and r.state is not None and r.finish_reason not in ("error", "cancelled")
                    and r.state is not g.state):
                r.state.assign_(g.state.select([i]))
        keep = [i for i, r in enumerate(g.rows) if id(r) not in gone]
        if not keep:
            return None
        idx = torch.tensor(keep, device=g.logits.device)
        return _Group([g.rows[i] for i in keep], g.state.select(keep), g.logits.index_select(0, idx))

    def drop(self, rows: Sequence[DecodeRow]) -> None:
        """Take running ``rows`` out without writing their states back (finish_reason "cancelled"):
        a client went away. Call between steps."""
        gone = {id(r) for r in rows if not r.done}
        if not gone:
            return
        groups, self.groups = self.groups, []
        for g in groups:
            hit = [r for r in g.rows if id(r) in gone]
            for r in hit:
                r.finish_reason = "cancelled"
                if r.state is g.state:  # the caller's own object was the batch: it holds a partial turn
                    r.state = None
            rest = self._retire(g, hit)
            if rest is not None:
                self.groups.append(rest)

    @staticmethod
    def _fail(row: DecodeRow, e: BaseException) -> None:
        row.finish_reason, row.error = "error", e

    def run(self) -> Iterator[StepToken]:
        """Step until every row has finished, yielding each emitted token."""
        while self.running:
            yield from self.step()


# ================================================================================== library API
def generate_stream(model, prompt_ids, state: DNCState | None = None, max_new_tokens: int = 64,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, stop_tokens: Sequence[int] = (),
                    generator: torch.Generator | None = None) -> Iterator[int]:
    """Stream new token ids for one sequence through :class:`BatchDecoder` (batch of one). With
    ``state`` given, it is updated in place and afterwards holds the prompt and every emitted token.
    Raises ValueError for an empty or out-of-vocabulary prompt."""
    ids = prompt_ids.reshape(-1).tolist() if torch.is_tensor(prompt_ids) else [int(i) for i in prompt_ids]
    row = DecodeRow(ids, state, max_new_tokens, SamplingParams(temperature, top_k, top_p), generator=generator,
                    stop_tokens=frozenset(int(s) for s in stop_tokens))
    was_training = model.training
    model.eval()
    try:
        dec = BatchDecoder(model)
        dec.add([row])
        while True:
            if row.error is not None:
                raise row.error
            if not dec.running:
                return
            for st in dec.step():
                if st.finish != "error":
                    yield st.token
    finally:
        model.train(was_training)
