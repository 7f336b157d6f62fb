"""Generation apart from the model: one batched decode loop (sampling is in ``dnc.sampling``).

* :func:`sample_next` / :func:`sample_rows` / :class:`SamplingParams` (from ``dnc.sampling``, re-exported
  here): the next token from logits; no argument value can make them raise.
* :class:`BatchDecoder`: the decode loop of the library (:func:`generate_stream`, ``DNC.generate``)
  and of the server. Each row has its own prompt, state, sampling parameters, seed and stop
  condition. Rows added together are prefilled together whatever their states and prompt lengths
  (``dnc.admission``, ``dnc.ragged_prefill``: one model call for prompts within a segment; the rows' states padded
  into a decode batch, which then joins the running ones), or chunk by chunk between decode steps
  (``add(rows, prefill_chunk=N)``), then decoded one
  token per row per :meth:`BatchDecoder.step`: every running row, whatever its position in the
  segment, bank fill or clock, in one model call per batch of up to ``max_batch`` rows
  (``dnc.ragged``: static per-row tensors, padded to a bucket of 1, 2, 4, ..., 64 rows, so the step
  can be a captured CUDA graph). Every op of the step is row-wise, so a row's tokens are those it
  would get alone; rows of different states never mix. Rows that finish leave the batch, and their
  final state is written back into the ``DNCState`` the caller gave. Rows can be added between
  steps (continuous batching).

The host work of a step does not grow with its rows' device work (issue 14): the rows are sampled
on the device (``dnc.sampling.RowSampler``: one argmax for the greedy rows, one draw for the
unseeded ones, seeded rows on their own generators), the tokens feed the model step where they are,
and they come back to the host in one copy per step, waited for only after the model step is
launched (on CUDA the stop checks then overlap the device's work). ``RaggedBatch.after_step`` reads
the device only for a row that commits a segment.

A row's failure (bad prompt ids, its stop check raising) finishes that row alone with
``finish_reason == "error"``; a failing model step fails only the rows of that batch.
Shapes: B rows, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from .admission import Admission, _Prefill
from .ragged import RaggedBatch, bucket_for, ragged_decode_step, upload
from .ragged_prefill import MAX_TOKENS
from .sampling import MIN_TEMPERATURE, RowSampler, SamplingParams, sample_next, sample_rows  # noqa: F401  (dnc.generate API)
from .state import DNCState


# ================================================================================== decode loop
@dataclass(eq=False)
class DecodeRow:
    """One sequence to decode. The decoder fills the result fields."""

    prompt_ids: Sequence[int]
    """Token ids fed before the first new token (at least one)."""
    state: DNCState | None = None
    """Batch-1 state to continue from; updated in place when the row finishes (it then holds the
    prompt and every emitted token), untouched when it fails or is cancelled. None = a fresh state
    that is dropped afterwards."""
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
    forced: Sequence[int] | None = None
    """Tokens to emit instead of sampled ones, one per step (replaying a logged turn: the state
    then goes through exactly the decode loop's ops); the row ends after ``min(len(forced),
    max_new_tokens)`` tokens unless a stop condition ends it first."""
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
class _Plan:
    """What a batch's step needs of its rows, made once per composition (see ``_Batch.plan_for``)."""

    key: tuple
    sampler: RowSampler
    slots: torch.Tensor  # [n] long, the occupied slots on the device


@dataclass(eq=False)
class _Batch:
    rb: RaggedBatch                      # the rows' static decode tensors
    slots: list[DecodeRow | None]        # the row in each slot of rb (None: free)
    plan: _Plan | None = None
    host: torch.Tensor | None = None     # pinned [capacity] long: the step's tokens come back here (CUDA)
    ready: "torch.cuda.Event | None" = None  # recorded after that copy: the host waits on it alone
    fit_steps: int = 0                   # consecutive steps its rows fitted a smaller bucket (see BatchDecoder.step)

    def occupied(self) -> list[tuple[int, DecodeRow]]:
        return [(i, r) for i, r in enumerate(self.slots) if r is not None]

    def plan_for(self, occ: list[tuple[int, DecodeRow]], model) -> _Plan:
        """The plan of the rows in ``occ``: rebuilt when a row joined, left or changed its sampling."""
        key = tuple((slot, r, r.sampling, r.generator) for slot, r in occ)  # rows compare by identity (eq=False)
        if self.plan is None or self.plan.key != key:
            dev = self.rb.device
            sampler = RowSampler([r.sampling for _, r in occ], [r.generator for _, r in occ],
                                 model.config.vocab_size, dev)
            self.plan = _Plan(key, sampler, upload([s for s, _ in occ], dev))  # (no host sync)
        return self.plan

    def host_buffer(self, n: int) -> torch.Tensor:
        """A pinned host tensor [n] long (a non-blocking device -> host copy needs pinned memory)."""
        if self.host is None or self.host.numel() < n:
            self.host = torch.empty(max(n, self.rb.capacity), dtype=torch.long, pin_memory=True)
        return self.host[:n]


@dataclass(frozen=True)
class StepToken:
    """One token a row emitted in a step (``finish`` set when it was the row's last)."""

    row: DecodeRow
    token: int
    index: int
    finish: str | None
    batch: int = 1
    """Rows decoded in the same model call."""


class BatchDecoder(Admission):
    """Decodes any number of :class:`DecodeRow` s together (see the module docstring).

    ``add(rows)`` prefills them together (``ragged_prefill``, the default: one ragged call per
    prompt piece up to a segment boundary or ``prefill_tokens`` tokens, for every row at once,
    for prompts of at most ``prefill_tokens`` tokens; longer ones go segment by segment as below;
    off: rows whose states share a layout and whose prompts share a length as one model call) or,
    with ``prefill_chunk=N``, queues them: each later ``step()`` first feeds at
    most N prompt tokens (oldest row first, chunks cut at segment boundaries), so a long prompt does
    not stall the running rows. ``step()`` emits one token for every running row; ``running`` says
    whether any row is left (decoding or prefilling). ``max_batch`` caps the rows of one model call
    (more rows form several batches). Runs under ``torch.no_grad``; the model should be in eval mode.
    Decode steps go through ``model.decode_runner`` when it is set (CUDA graphs), else eagerly.

    ``shrink_after`` (steps): a batch moves down to the smaller bucket its rows fit once they have
    fitted it after that many consecutive steps (<= 1: after the first, the rule before issue 14's
    host-cost work). A move copies every state tensor of every row (small: ~54 MB a row in bf16,
    one index copy per tensor), and under a churn of arrivals near a bucket boundary (rows
    hovering around 32) each shrink was undone by the next arrival's growth: a full copy each way,
    every other step. Waiting is not free either: the step computes its padded slots, so the wait
    is about what a move pair costs in padded steps (ski rental). H200, small, 32 rows in a batch
    of 64: the 32 padded slots cost ~1 ms a step (0.03 ms a slot, bench/decode_loop_gap.py), a move
    copies ~1.7 GB (~1 ms) plus its host ops, so a shrink and the growth that undoes it cost about
    2.5 padded steps. On a CPU the copy is cheap beside the padded compute: ``bench/decode_churn.py``
    measures both sides. ``resizes`` / ``resized_rows`` count the moves (growth and shrink) and the
    rows they copied. Measured, the wait lost on both: under 40 churning clients shrink_after 3 halved
    the resizes but made the median step 1.06x slower on the H200 (5.52 vs 5.20 ms, session 14) and
    1.05x on the CPU, so the default shrinks at once."""

    SHRINK_AFTER = 1
    """Default ``shrink_after`` (steps): 1, see above (``bench/results/decode_churn_*``)."""

    def __init__(self, model, max_batch: int = 64, ragged_prefill: bool = True, prefill_tokens: int = MAX_TOKENS,
                 shrink_after: int = SHRINK_AFTER, kv_attention: str | None = None):
        self.model = model
        self.kv_attention = kv_attention  # RaggedBatch.kv_attention of its batches (None: RaggedBatch.KV_ATTENTION)
        self.max_batch_rows = max(1, int(max_batch))  # rows in one model call at most
        self.ragged_prefill = bool(ragged_prefill)
        self.prefill_tokens = max(1, int(prefill_tokens))  # tokens per row per ragged prefill call at most
        self.prefill_calls = 0  # model calls of admissions (a ragged call, or one segment piece of a forward)
        self.batches: list[_Batch] = []
        self.prefilling: list[_Prefill] = []
        self.prefill_chunk = 0  # prompt tokens fed per step while rows are prefilling
        self.steps = 0
        self.max_batch = 0  # the most rows one model call has decoded
        self.commits = 0    # segment commits of decoding rows
        self.shrink_after = int(shrink_after)
        self.resizes = 0       # batches moved to another bucket (each a copy of every row's state)
        self.resized_rows = 0  # rows those moves copied

    @property
    def running(self) -> bool:
        return bool(self.batches) or bool(self.prefilling)

    def batch_sizes(self) -> list[int]:
        """Rows of each decode batch (one model call each); ``[0]`` while rows are only prefilling."""
        sizes = [b.rb.n_active for b in self.batches]
        return sizes or ([0] if self.prefilling else [])

    def _runner(self):
        return getattr(self.model, "decode_runner", None)

    def _decode_batch(self, rb: RaggedBatch) -> "_Batch":
        """A new, empty decode batch over ``rb`` (used by the admission code)."""
        return _Batch(rb, [None] * rb.capacity)

    def _new_batch(self, capacity: int) -> RaggedBatch:
        runner = self._runner()
        rb = runner.acquire(capacity) if runner is not None else RaggedBatch(self.model, capacity)
        rb.kv_attention = self.kv_attention or RaggedBatch.KV_ATTENTION
        return rb

    def _free_batch(self, rb: RaggedBatch) -> None:
        runner = self._runner()
        if runner is not None:
            runner.release(rb)

    def _resize(self, b: _Batch, capacity: int) -> None:
        """Move ``b``'s rows into a batch of ``capacity`` slots (the next bucket up or down)."""
        new = self._new_batch(capacity)
        occ = b.occupied()
        b.rb.copy_rows_to(new, [i for i, _ in occ], list(range(len(occ))))
        self._free_batch(b.rb)
        b.rb = new
        b.slots = [r for _, r in occ] + [None] * (capacity - len(occ))
        b.fit_steps = 0
        self.resizes += 1
        self.resized_rows += len(occ)

    # ------------------------------------------------------------------ decoding
    @torch.no_grad()
    def step(self) -> list[StepToken]:
        """Feed queued prompt chunks (``prefill_chunk``), then one new token for every decoding row:
        sample, check the stop conditions, feed the tokens through the model as one call per batch
        (also the last one of a finishing row, so its state holds the whole exchange), retire the
        rows that finished."""
        if self.prefilling:
            self._join(self._advance_prefill())
        out: list[StepToken] = []
        self.steps += 1
        self.max_batch = max([self.max_batch] + self.batch_sizes())
        for b in list(self.batches):
            out += self._step_batch(b)
            n = b.rb.n_active
            if n == 0:
                self.batches.remove(b)
                self._free_batch(b.rb)
            elif bucket_for(n) < b.rb.capacity:  # fewer rows: a smaller bucket, once they stay fewer
                b.fit_steps += 1
                if b.fit_steps >= self.shrink_after:
                    self._resize(b, bucket_for(n))
            else:
                b.fit_steps = 0
        return out

    def _step_batch(self, b: _Batch) -> list[StepToken]:
        """One token for every row of ``b``. Host work per step, whatever the rows: the sampling ops
        (``RowSampler``, made once per batch composition), one device -> host copy of the step's
        tokens, the model step (fed on the device from the sampled tokens) and ``after_step``
        (no sync unless a row commits a segment); then a few Python lines per row (stop checks,
        StepTokens). On CUDA the model step is launched before the host waits for the tokens, so
        the stop checks run while the device computes."""
        occ = b.occupied()
        rb = b.rb
        rows = [r for _, r in occ]
        n = len(occ)
        contiguous = occ[-1][0] == n - 1  # slots 0..n-1: views, no index tensor
        plan = b.plan_for(occ, self.model)
        forced = [(j, r) for j, r in enumerate(rows) if r.forced is not None]
        if len(forced) == n:  # a replayed turn: nothing to sample, the tokens are known here
            toks_host = [int(r.forced[len(r.tokens)]) for r in rows]
            toks = upload(toks_host, rb.device)
        else:
            toks_host = None
            toks = plan.sampler.sample(rb.logits[:n] if contiguous else rb.logits.index_select(0, plan.slots))
            if forced:
                toks[upload([j for j, _ in forced], rb.device)] = upload(
                    [int(r.forced[len(r.tokens)]) for _, r in forced], rb.device)
        if contiguous:
            rb.tokens[:n].copy_(toks)  # the next input stays on the device (free slots: stale ids, ignored)
        else:
            rb.tokens.index_copy_(0, plan.slots, toks)
        ready = None
        if toks_host is None and toks.device.type == "cuda":  # start the copy, read it after the launch
            host = b.host_buffer(n)
            host.copy_(toks, non_blocking=True)
            ready = b.ready = b.ready or torch.cuda.Event()
            ready.record()
        # the model step is needed unless every row ends now and none has a state to write back: rows
        # that may end by a stop token or check are decided after the launch (then the step is wasted)
        may_go_on = any(r.state is not None or (len(r.tokens) + 1 < r.max_new_tokens and
                                                (r.forced is None or len(r.tokens) + 1 < len(r.forced))) for r in rows)
        error, stepped = None, False
        if may_go_on:
            try:
                runner = self._runner()
                rb.logits.copy_(runner.step(rb) if runner is not None else ragged_decode_step(self.model, rb))
                stepped = True
            except Exception as e:  # raised below, once the rows have their tokens
                error = e
        if toks_host is None:
            if ready is not None:
                ready.synchronize()
                toks_host = host.tolist()
            else:
                toks_host = toks.tolist()
        out, finished = [], []
        for r, tok in zip(rows, toks_host):
            r.tokens.append(tok)
            try:
                stopped = r.stop_check is not None and r.stop_check(tok)  # sees every token
                if tok in r.stop_tokens:
                    r.finish_reason = "eos"
                elif stopped:
                    r.finish_reason = "stop"
                elif len(r.tokens) >= r.max_new_tokens or (r.forced is not None and len(r.tokens) >= len(r.forced)):
                    r.finish_reason = "length"
            except Exception as e:  # the caller's stop check: this row alone fails
                self._fail(r, e)
            if r.done:
                finished.append(r)
            out.append(StepToken(r, tok, len(r.tokens) - 1, r.finish_reason, n))
        needed = len(finished) < n or any(r.state is not None and r.finish_reason != "error" for r in finished)
        if needed:
            try:
                if error is not None:
                    raise error
                if stepped:  # (always, when needed: a row that may go on or has a state launched it)
                    self.commits += rb.after_step(self.model)["committed"]
            except Exception as e:  # the batch's tensors are now partial: its rows cannot go on
                for slot, r in occ:
                    if r.finish_reason != "error":
                        self._fail(r, e)
                    rb.release(slot)
                    b.slots[slot] = None
                return out
        gone = set(map(id, finished))
        for slot, r in occ:
            if id(r) in gone:
                if r.state is not None and r.finish_reason not in ("error", "cancelled"):
                    r.state.assign_(rb.extract(slot))
                rb.release(slot)
                b.slots[slot] = None
        return out

    def drop(self, rows: Sequence[DecodeRow]) -> None:
        """Take running or prefilling ``rows`` out without writing their states back (finish_reason
        "cancelled"): a client went away. Call between steps."""
        gone = {id(r) for r in rows if not r.done}
        if not gone:
            return
        for p in [p for p in self.prefilling if id(p.row) in gone]:
            p.row.finish_reason = "cancelled"
            self.prefilling.remove(p)
        for b in list(self.batches):
            for slot, r in b.occupied():
                if id(r) in gone:
                    r.finish_reason = "cancelled"
                    b.rb.release(slot)
                    b.slots[slot] = None
            if b.rb.n_active == 0:
                self.batches.remove(b)
                self._free_batch(b.rb)

    def close(self) -> None:
        """Cancel every row left (:meth:`drop`) and give the batches back to the decode runner."""
        self.drop([p.row for p in self.prefilling] + [r for b in self.batches for _, r in b.occupied()])

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
    ``state`` given, it is updated in place when the stream ends and then holds the prompt and every
    emitted token (a stream closed early leaves it as it was).
    Raises ValueError for an empty or out-of-vocabulary prompt."""
    ids = prompt_ids.reshape(-1).tolist() if torch.is_tensor(prompt_ids) else [int(i) for i in prompt_ids]
    row = DecodeRow(ids, state, max_new_tokens, SamplingParams(temperature, top_k, top_p), generator=generator,
                    stop_tokens=frozenset(int(s) for s in stop_tokens))
    was_training = model.training
    model.eval()
    dec = BatchDecoder(model)
    try:
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
        dec.close()  # a consumer that stops early: the row is cancelled, its state left as it was
        model.train(was_training)
