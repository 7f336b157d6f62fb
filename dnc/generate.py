"""Generation apart from the model: one batched decode loop (sampling is in ``dnc.sampling``).

* :func:`sample_next` / :func:`sample_rows` / :class:`SamplingParams` (from ``dnc.sampling``, re-exported
  here): the next token from logits; no argument value can make them raise.
* :class:`BatchDecoder`: the decode loop of the library (:func:`generate_stream`, ``DNC.generate``)
  and of the server. Each row has its own prompt, state, sampling parameters, seed and stop
  condition. Rows added together are prefilled together whatever their states and prompt lengths
  (``dnc.ragged_prefill``: one model call for prompts within a segment; the rows' states padded
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

from .ragged import RaggedBatch, bucket_for, ragged_decode_step
from .ragged_prefill import MAX_TOKENS, prefill as ragged_prefill
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

    def occupied(self) -> list[tuple[int, DecodeRow]]:
        return [(i, r) for i, r in enumerate(self.slots) if r is not None]

    def plan_for(self, occ: list[tuple[int, DecodeRow]], model) -> _Plan:
        """The plan of the rows in ``occ``: rebuilt when a row joined, left or changed its sampling."""
        key = tuple((slot, r, r.sampling, r.generator) for slot, r in occ)  # rows compare by identity (eq=False)
        if self.plan is None or self.plan.key != key:
            dev = self.rb.device
            sampler = RowSampler([r.sampling for _, r in occ], [r.generator for _, r in occ],
                                 model.config.vocab_size, dev)
            self.plan = _Plan(key, sampler, torch.tensor([s for s, _ in occ], device=dev))
        return self.plan

    def host_buffer(self, n: int) -> torch.Tensor:
        """A pinned host tensor [n] long (a non-blocking device -> host copy needs pinned memory)."""
        if self.host is None or self.host.numel() < n:
            self.host = torch.empty(max(n, self.rb.capacity), dtype=torch.long, pin_memory=True)
        return self.host[:n]


@dataclass(eq=False)
class _Prefill:
    row: DecodeRow
    state: DNCState    # the row's own copy, prefilled chunk by chunk
    fed: int = 0       # prompt tokens fed so far


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

    ``add(rows)`` prefills them together (``ragged_prefill``, the default: one ragged call per
    prompt piece up to a segment boundary or ``prefill_tokens`` tokens, for every row at once;
    off: rows whose states share a layout and whose prompts share a length as one model call) or,
    with ``prefill_chunk=N``, queues them: each later ``step()`` first feeds at
    most N prompt tokens (oldest row first, chunks cut at segment boundaries), so a long prompt does
    not stall the running rows. ``step()`` emits one token for every running row; ``running`` says
    whether any row is left (decoding or prefilling). ``max_batch`` caps the rows of one model call
    (more rows form several batches). Runs under ``torch.no_grad``; the model should be in eval mode.
    Decode steps go through ``model.decode_runner`` when it is set (CUDA graphs), else eagerly."""

    def __init__(self, model, max_batch: int = 64, ragged_prefill: bool = True, prefill_tokens: int = MAX_TOKENS):
        self.model = model
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

    @property
    def running(self) -> bool:
        return bool(self.batches) or bool(self.prefilling)

    def batch_sizes(self) -> list[int]:
        """Rows of each decode batch (one model call each); ``[0]`` while rows are only prefilling."""
        sizes = [b.rb.n_active for b in self.batches]
        return sizes or ([0] if self.prefilling else [])

    # ------------------------------------------------------------------ admission
    @torch.no_grad()
    def add(self, rows: Sequence[DecodeRow], prefill_chunk: int | None = None) -> list[DecodeRow]:
        """Prefill ``rows`` and let them join the batch, or with ``prefill_chunk`` (tokens, >= 1) queue
        their prefill for the next steps (see the class docstring). Returns the rows that failed
        already (``finish_reason == "error"``: bad prompt, state of another model)."""
        if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int)
                                          or prefill_chunk < 1):
            raise ValueError(f"prefill_chunk must be a positive int (tokens per step) or None, got {prefill_chunk!r}")
        failed, ready = [], []
        for row in rows:
            problem = self._check(row)
            if problem:
                self._fail(row, ValueError(problem))
                failed.append(row)
                continue
            if row.generator is None and row.seed is not None:
                row.generator = torch.Generator(device=self.model.device).manual_seed(int(row.seed))
            if prefill_chunk is not None:
                state = self.model.init_state(1) if row.state is None else row.state.select([0])
                self.prefilling.append(_Prefill(row, state))
                self.prefill_chunk = prefill_chunk
                continue
            ready.append(row)
        n = self.max_batch_rows
        if self.ragged_prefill:
            rest = []
            for i in range(0, len(ready), n):
                rest += self._admit_ragged(ready[i:i + n])
            ready = rest  # rows the ragged path left to the per-layout path (see _admit_ragged)
        buckets: dict[tuple, list[DecodeRow]] = {}
        for row in ready:
            start = None if row.state is None else row.state.layout()
            buckets.setdefault((start, len(row.prompt_ids)), []).append(row)
        joined: list[tuple[DecodeRow, DNCState, torch.Tensor]] = []
        for bucket in buckets.values():
            for i in range(0, len(bucket), n):
                failed += self._prefill(bucket[i:i + n], joined)
        self._join(joined)
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

    def _prefill(self, rows: list[DecodeRow], joined: list) -> list[DecodeRow]:
        """One model call for ``rows`` (equal layouts and prompt lengths) on a copy of their states;
        appends (row, its batch-1 state, next-token logits [V]) to ``joined``. Returns failed rows."""
        m = self.model
        state = m.init_state(len(rows)) if rows[0].state is None else DNCState.stack([r.state for r in rows])
        ids = torch.tensor([list(r.prompt_ids) for r in rows], dtype=torch.long, device=m.device)
        self.prefill_calls += _pieces(state.seg_pos, ids.shape[1], m.config.segment_len)
        try:
            logits = m(ids, state=state, last_logits_only=True, metrics=False).logits[:, -1]
        except Exception as e:
            if len(rows) == 1:
                self._fail(rows[0], e)
                return rows
            # find the culprit: each row alone (their own states are untouched: the batch was a copy)
            return [r for r in rows for f in [self._prefill([r], joined)] if f]
        for i, r in enumerate(rows):
            joined.append((r, state if len(rows) == 1 else state.select([i]), logits[i]))
        return []

    def _admit_ragged(self, rows: list[DecodeRow]) -> list[DecodeRow]:
        """Prefill ``rows`` (at most ``max_batch`` of them) together in a fresh decode batch
        (``dnc.ragged_prefill``), which then joins the running batches. Returns the rows left to
        the per-layout path: those whose state does not fit a ragged batch, or all of them when a
        ragged call failed (that path then fails the culprit alone)."""
        m = self.model
        rb = self._new_batch(bucket_for(len(rows)))
        placed: list[tuple[int, DecodeRow]] = []
        rest: list[DecodeRow] = []
        zeros = torch.zeros(m.config.vocab_size, device=rb.device)
        fresh = None  # the slot of the first fresh row: later fresh rows are copies of it
        for slot, row in enumerate(rows):
            if row.state is None and fresh is not None:
                continue
            try:  # the state's tensors are copied in (its banks shared read-only): the row's own state stays
                rb.insert(slot, m.init_state(1) if row.state is None else row.state, zeros, m)
            except Exception:
                rb.release(slot)
                rest.append(row)
                continue
            placed.append((slot, row))
            if row.state is None:
                fresh = slot
        if fresh is not None:
            copies = [(slot, row) for slot, row in enumerate(rows) if row.state is None and slot > fresh]  # (earlier: failed)
            rb.clone_row(fresh, [slot for slot, _ in copies])
            placed = sorted(placed + copies, key=lambda p: p[0])
        if placed:
            try:
                stats = ragged_prefill(m, rb, {slot: list(r.prompt_ids) for slot, r in placed},
                                       self.prefill_tokens, self._prefill_runner())
            except Exception:  # the batch's tensors are partial: every row goes the per-layout way
                for slot, _ in placed:
                    rb.release(slot)
                rest += [r for _, r in placed]
                placed = []
            else:
                self.prefill_calls += stats["calls"]
        if placed:
            self._join_batch(rb, placed)
        else:
            self._free_batch(rb)
        return rest

    def _prefill_runner(self):
        runner = self._runner()
        return runner if runner is not None and hasattr(runner, "prefill_step") else None

    def _join_batch(self, rb: RaggedBatch, placed: list[tuple[int, DecodeRow]]) -> None:
        """Prefilled rows (``placed``: slot, row) of ``rb`` join the decode batches: the free slots of
        running batches first (their tensors copied over), the rest stay in ``rb``, which becomes
        a decode batch of its own. Rows with nothing to decode finish at once."""
        todo = []
        for slot, row in placed:
            if row.max_new_tokens <= 0 or (row.forced is not None and len(row.forced) == 0):
                row.finish_reason = "length"
                if row.state is not None:
                    row.state.assign_(rb.extract(slot))
                rb.release(slot)
            else:
                todo.append((slot, row))
        cap = self.max_batch_rows
        for b in self.batches:
            if not todo:
                break
            n = b.rb.n_active
            k = min(cap - n, len(todo))
            if k <= 0:
                continue
            if n + k > b.rb.capacity:
                self._resize(b, bucket_for(n + k))
            dst = b.rb.free_slots()[:k]
            rb.copy_rows_to(b.rb, [slot for slot, _ in todo[:k]], dst)
            for d, (_, row) in zip(dst, todo[:k]):
                b.slots[d] = row
            todo = todo[k:]
        if not todo:
            self._free_batch(rb)
            return
        b = _Batch(rb, [None] * rb.capacity)
        for slot, row in todo:
            b.slots[slot] = row
        self.batches.append(b)
        if bucket_for(len(todo)) < rb.capacity:
            self._resize(b, bucket_for(len(todo)))

    def _advance_prefill(self) -> list[tuple[DecodeRow, DNCState, torch.Tensor]]:
        """Feed at most ``prefill_chunk`` prompt tokens of the queued rows, oldest first, in chunks
        that end at segment boundaries (whole segments replay as CUDA graphs). Returns the rows whose
        prompt is now complete, with their states and next-token logits."""
        m, seg = self.model, self.model.config.segment_len
        budget, first, done = self.prefill_chunk, True, []
        while self.prefilling and budget > 0:
            p = self.prefilling[0]
            ids = p.row.prompt_ids
            n = min(len(ids) - p.fed, seg - p.state.seg_pos)
            if n > budget:
                if not first:
                    break  # the next chunk would not fit: keep it whole for the next step
                n = budget
            x = torch.tensor([list(ids[p.fed:p.fed + n])], dtype=torch.long, device=m.device)
            self.prefill_calls += 1
            first = False
            budget -= n
            try:
                logits = m(x, state=p.state, last_logits_only=True, metrics=False).logits[0, -1]
            except Exception as e:
                self._fail(p.row, e)
                self.prefilling.pop(0)
                continue
            p.fed += n
            if p.fed == len(ids):
                self.prefilling.pop(0)
                done.append((p.row, p.state, logits))
        return done

    def _runner(self):
        return getattr(self.model, "decode_runner", None)

    def _new_batch(self, capacity: int) -> RaggedBatch:
        runner = self._runner()
        return runner.acquire(capacity) if runner is not None else RaggedBatch(self.model, capacity)

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

    def _join(self, joined: list[tuple[DecodeRow, DNCState, torch.Tensor]]) -> None:
        """Rows with a complete prompt join the decode batches (free slots first, growing a batch to
        the next bucket, else a new batch). Rows with nothing to decode finish at once."""
        todo = []
        for row, state, logits in joined:
            if row.max_new_tokens <= 0 or (row.forced is not None and len(row.forced) == 0):
                row.finish_reason = "length"
                if row.state is not None:
                    row.state.assign_(state)
            else:
                todo.append((row, state, logits))
        cap = self.max_batch_rows
        for b in self.batches:
            if not todo:
                return
            n = b.rb.n_active
            k = min(cap - n, len(todo))
            if k <= 0:
                continue
            if n + k > b.rb.capacity:
                self._resize(b, bucket_for(n + k))
            self._insert(b, todo[:k])
            todo = todo[k:]
        while todo:
            k = min(cap, len(todo))
            b = _Batch(self._new_batch(bucket_for(k)), [])
            b.slots = [None] * b.rb.capacity
            self.batches.append(b)
            self._insert(b, todo[:k])
            todo = todo[k:]

    def _insert(self, b: _Batch, rows: list[tuple[DecodeRow, DNCState, torch.Tensor]]) -> None:
        for slot, (row, state, logits) in zip(b.rb.free_slots(), rows):
            try:
                b.rb.insert(slot, state, logits, self.model)
            except Exception as e:  # a state that does not fit (another model's): this row alone
                b.rb.release(slot)
                self._fail(row, e)
                continue
            b.slots[slot] = row

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
            if b.rb.n_active == 0:
                self.batches.remove(b)
                self._free_batch(b.rb)
            elif bucket_for(b.rb.n_active) < b.rb.capacity:
                self._resize(b, bucket_for(b.rb.n_active))  # fewer rows: a smaller bucket
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
            toks = torch.tensor(toks_host, dtype=torch.long, device=rb.device)
        else:
            toks_host = None
            toks = plan.sampler.sample(rb.logits[:n] if contiguous else rb.logits.index_select(0, plan.slots))
            if forced:
                toks[torch.tensor([j for j, _ in forced], device=rb.device)] = torch.tensor(
                    [int(r.forced[len(r.tokens)]) for _, r in forced], dtype=torch.long, device=rb.device)
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


def _pieces(seg_pos: int, n: int, segment_len: int) -> int:
    """Segment pieces (model steps) of ``n`` tokens fed from segment position ``seg_pos``."""
    head = min(n, segment_len - seg_pos)
    return 1 + -(-(n - head) // segment_len)


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
