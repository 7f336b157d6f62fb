"""Admission: how rows join a :class:`dnc.generate.BatchDecoder` (its ``add`` and the prefill paths).

``BatchDecoder`` inherits :class:`Admission`; the decode loop (``step``) stays in ``dnc.generate``.
Three ways in, all giving each row exactly the tokens it would get alone:

* ragged (the default): the rows added together are prefilled in one fresh decode batch
  (``dnc.ragged_prefill``: one model call per prompt piece for every row, whatever their layouts),
  which then merges into the running batches (one index copy per tensor for all its rows);
* per layout (``ragged_prefill=False``, and the fallback for rows the ragged path cannot take):
  rows whose states share a layout and whose prompts share a length as one model call;
* chunked (``add(rows, prefill_chunk=N)``): prompts fed N tokens per decode step.

Host cost (issue 14): a fresh row is a copy of one template row (a fresh state inserted once per
decoder and model weights), broadcast into the new batch's slots in one op per tensor, not a new
``init_state`` + ``insert`` per admission; slot indices go to the device without a host sync
(``dnc.ragged.upload``), so an admission does not wait for queued decode steps. The count per
phase: ``bench/admission_prefill.py --count-ops``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from .ragged import RaggedBatch, bucket_for, upload
from .ragged_prefill import prefill as ragged_prefill
from .state import DNCState

if TYPE_CHECKING:
    from .generate import DecodeRow, _Batch


@dataclass(eq=False)
class _Prefill:
    row: "DecodeRow"
    state: DNCState    # the row's own copy, prefilled chunk by chunk
    fed: int = 0       # prompt tokens fed so far


class Admission:
    """The admission half of :class:`dnc.generate.BatchDecoder` (see the module docstring). Relies
    on the decoder's ``model``, ``batches``, ``prefilling``, ``shrink_after``, ``_new_batch``,
    ``_free_batch``, ``_resize``, ``_decode_batch``, ``_runner`` and ``_fail``."""

    _template: tuple | None = None  # (weights key, RaggedBatch of 1: the fresh row), see _fresh_template
    _params: tuple | None = None    # (model, its embedding weight, list of its parameters), see _weights_key

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
            # a prompt longer than one ragged call goes the per-layout way: its forward runs whole
            # segments (captured as segment graphs on a GPU), where the ragged path would take
            # len / prefill_tokens calls (a 128k-token prompt: 512 calls instead of 64 segments)
            short = [r for r in ready if len(r.prompt_ids) <= self.prefill_tokens]
            rest = [r for r in ready if len(r.prompt_ids) > self.prefill_tokens]
            for i in range(0, len(short), n):
                rest += self._admit_ragged(short[i:i + n])
            ready = rest  # long prompts, and rows the ragged path left (see _admit_ragged)
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
        ids = upload([list(r.prompt_ids) for r in rows], m.device)
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
        zeros = None
        for slot, row in enumerate(rows):
            if row.state is None:
                continue
            try:  # the state's tensors are copied in (its banks shared read-only): the row's own state stays
                zeros = torch.zeros(m.config.vocab_size, device=rb.device) if zeros is None else zeros
                rb.insert(slot, row.state, zeros, m)
            except Exception:
                rb.release(slot)
                rest.append(row)
                continue
            placed.append((slot, row))
        fresh = [(slot, row) for slot, row in enumerate(rows) if row.state is None]
        if fresh:  # copies of the template row: one op per tensor for all of them
            self._fresh_template().clone_rows_to(rb, [0] * len(fresh), [slot for slot, _ in fresh])
            placed = sorted(placed + fresh, key=lambda p: p[0])
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

    def _fresh_template(self) -> RaggedBatch:
        """A batch of one slot holding a fresh state (``init_state(1)`` inserted): what ``insert``
        would write for any fresh row. Made again when the weights change (a fresh row's read view
        depends on them) or the runner's batches take another device or dtype."""
        m = self.model
        key = self._weights_key()
        if self._template is None or self._template[0] != key:
            rb = RaggedBatch(m, 1)
            rb.insert(0, m.init_state(1), torch.zeros(m.config.vocab_size, device=rb.device), m)
            self._template = (key, rb)
        return self._template[1]

    def _weights_key(self) -> tuple:
        """What the fresh row depends on: the model, its device and dtype, and each parameter's
        version (bumped by in-place writes: load_state_dict, optimizer steps). The parameter list is
        kept between admissions (``model.parameters()`` walks every module: ~0.2 ms a call for
        small on a CPU core, against ~8 us for the kept list) and made again when the model or
        its embedding weight is another object; like ``DecodeGraphs``' keys (the embedding's
        pointer), this does not see other parameters replaced by new objects."""
        m = self.model
        cached = self._params
        if cached is None or cached[0] is not m or cached[1] is not m.embed.weight:
            cached = self._params = (m, m.embed.weight, list(m.parameters()))
        return (id(m), m.device, m.embed.weight.dtype, tuple(p._version for p in cached[2]))

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

        def copy_in(b: _Batch, items: list[tuple[int, DecodeRow]]) -> None:
            dst = b.rb.free_slots()[:len(items)]
            rb.copy_rows_to(b.rb, [slot for slot, _ in items], dst)
            for d, (_, row) in zip(dst, items):
                b.slots[d] = row

        todo = self._into_running(todo, copy_in)
        if not todo:
            self._free_batch(rb)
            return
        b = self._decode_batch(rb)
        for slot, row in todo:
            b.slots[slot] = row
        self.batches.append(b)
        if self.shrink_after <= 1 and bucket_for(len(todo)) < rb.capacity:
            self._resize(b, bucket_for(len(todo)))  # (else the step's rule shrinks it if it stays small)

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
            x = upload([list(ids[p.fed:p.fed + n])], m.device)
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
        todo = self._into_running(todo, self._insert)
        while todo:
            k = min(self.max_batch_rows, len(todo))
            b = self._decode_batch(self._new_batch(bucket_for(k)))
            self.batches.append(b)
            self._insert(b, todo[:k])
            todo = todo[k:]

    def _into_running(self, todo: list, place: Callable[[_Batch, list], None]) -> list:
        """``place(batch, items)`` puts items of ``todo`` into the free slots of the running batches,
        growing a batch to the next bucket up to ``max_batch`` rows; returns the items left over."""
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
            place(b, todo[:k])
            todo = todo[k:]
        return todo

    def _insert(self, b: _Batch, rows: list[tuple[DecodeRow, DNCState, torch.Tensor]]) -> None:
        for slot, (row, state, logits) in zip(b.rb.free_slots(), rows):
            try:
                b.rb.insert(slot, state, logits, self.model)
            except Exception as e:  # a state that does not fit (another model's): this row alone
                b.rb.release(slot)
                self._fail(row, e)
                continue
            b.slots[slot] = row


def _pieces(seg_pos: int, n: int, segment_len: int) -> int:
    """Segment pieces (model steps) of ``n`` tokens fed from segment position ``seg_pos``."""
    head = min(n, segment_len - seg_pos)
    return 1 + -(-(n - head) // segment_len)
