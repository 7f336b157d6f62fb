"""CUDA graphs for inference: whole-segment steps (prefill) and one-token decode steps.

A full segment through the DNC is ~1,000 small ops at batch 1: eight blocks, the memory reads and
the bank's write / compress / evict bookkeeping. Launched one by one from Python they take ~9 ms
per 2,048-token segment of the ``small`` preset on an H100, several times the GPU work itself. For
a given *layout* of the state (level sizes, KV carry, batch, dtype) a segment step has static
shapes and no host synchronisation, so it is captured once as a CUDA graph and replayed as one
launch.

:class:`SegmentGraphs` runs one full segment (``state.seg_pos == 0``, tokens ``[B, segment_len]``)
and commits it, as ``model(tokens, state=state)`` does, returning its logits ``[B, T, V]``. A layout seen for the first time runs eagerly; the second time it is captured, after
an eager warm-up on the graph's own input buffers (which also fills the model's cached constants);
from then on it is replayed. The state never aliases graph memory: its tensors are copied into the
graph's inputs and the results are copied out into fresh tensors, so any number of states (serving
sessions) can share the graphs. Host-side bookkeeping (level sizes, counters) is a function of the
layout, so it is recorded at capture and applied after each replay.

It is a *step runner* applied to the model from outside (``model.set_step_runner(SegmentGraphs(model))``,
or ``model.enable_cuda_graphs()``): it calls only the model's public ``segment_step`` and the state's
public fields, and the model never imports this module at load time.

:class:`DecodeGraphs` captures :func:`dnc.ragged.ragged_decode_step`, the one-token step of a
:class:`dnc.ragged.RaggedBatch` (rows of any layouts, static tensors per batch bucket 1, 2, 4, ...,
64). There the batch's own tensors are the graph's inputs and outputs: the step updates them in
place, so a replay copies nothing but the logits out. The runner therefore owns the batches
(``acquire(capacity)`` / ``release(batch)``, reused across decoders), one graph per (batch, read-mass
rows: ``RaggedBatch.mass_rows``, 0 or a power of two up to the capacity, so at most 8 per batch of
64). Each pair's first step runs eagerly (on a side stream: the warm-up that fills cached constants),
its second is captured and from then on it is replayed. Segment commits of single rows run eagerly outside it.
Its :meth:`DecodeGraphs.prefill_step` does the same for :func:`dnc.ragged_prefill.ragged_prefill_step`
(admissions: up to T prompt tokens per row), one graph per (batch, T) with its own static
``tokens [C, T]`` / ``counts [C]`` inputs, copied in before each replay.

Only for inference (``torch.no_grad``, eval mode) on CUDA. Graphs hold pointers to the parameters:
after replacing parameter tensors (``model.to(dtype)``, not an in-place ``load_state_dict``) call
:meth:`SegmentGraphs.clear`.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from dataclasses import dataclass, field

import torch

from .attention import KVCache
from .memory import StateBank
from .ragged import RaggedBatch, ragged_decode_step
from .ragged_prefill import ragged_prefill_step
from .state import DNCState, LayerState


@contextlib.contextmanager
def capturing(graph: torch.cuda.CUDAGraph, pool):
    """``torch.cuda.graph(graph, pool)`` with Python's cyclic garbage collector paused.

    A collection that starts inside a capture may free a dead cycle that holds an older
    ``CUDAGraph`` (a closed decoder, a dropped model); its destructor then resets that graph, which
    CUDA forbids while a stream captures, and the capture fails with
    ``cudaErrorStreamCaptureInvalidated``. Torch no longer collects before a capture
    (``torch.compiler.config.force_cudagraph_gc``), so this pauses the collector for the capture
    and lets such cycles go after it. ``thread_local``: a serving process may run CUDA work on
    other threads while this one captures."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            yield
    finally:
        if was_enabled:
            gc.enable()


def _state_tensors(state) -> list[torch.Tensor]:
    """Every tensor a segment step reads from or writes to ``state``, in a fixed order."""
    out = []
    for ls in state.layers:
        out += [ls.cache.k, ls.cache.v]
        if ls.prev_x is not None:
            out.append(ls.prev_x)
        if ls.bank is not None:
            out += [ls.bank.kv, ls.bank.meta, ls.bank.valid, ls.bank.alpha, ls.bank.clock_t]
            if ls.prev_write is not None:
                out.append(ls.prev_write)
    return out


def _assign(state, tensors: list[torch.Tensor], host: list[tuple]) -> None:
    """Point ``state`` at ``tensors`` (the order of :func:`_state_tensors` for a state whose layers all
    carry ``prev_x`` and whose memory layers carry ``prev_write``, as after a step) and apply the
    recorded host bookkeeping ``host``."""
    it = iter(tensors)
    for ls, (carry_len, sizes) in zip(state.layers, host):
        ls.cache = KVCache(next(it), next(it), carry_len)
        ls.prev_x = next(it)
        if ls.bank is not None:
            bank = ls.bank
            bank.kv, bank.meta, bank.valid, bank.alpha, bank.clock_t = (next(it) for _ in range(5))
            ls.prev_write = next(it)
            bank.sizes = list(sizes)
            bank.clock += 1
            bank._group = None
        ls.write_buf, ls.mass, ls.view = [], None, None


def _shallow_state(state, tensors: list[torch.Tensor]):
    """A new state object with ``state``'s host fields over ``tensors`` (the :func:`_state_tensors`
    order of ``state``): what the warm-up and the capture run on."""
    it = iter(tensors)
    layers = []
    for ls in state.layers:
        new = LayerState(KVCache(next(it), next(it), ls.cache.carry_len))
        if ls.prev_x is not None:
            new.prev_x = next(it)
        if ls.bank is not None:
            bank = StateBank.__new__(StateBank)
            bank.capacities, bank.clock, bank.sizes = ls.bank.capacities, ls.bank.clock, list(ls.bank.sizes)
            bank.kv, bank.meta, bank.valid, bank.alpha, bank.clock_t = (next(it) for _ in range(5))
            new.bank = bank
            if ls.prev_write is not None:
                new.prev_write = next(it)
        layers.append(new)
    return DNCState(layers, state.batch_size, 0, state.tokens_seen, state.segments)


def _copy_all(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    if hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(dst, src)  # a few launches for all of them
    else:
        for d, s in zip(dst, src):
            d.copy_(s)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    tokens: torch.Tensor                 # static input [B, segment_len]
    inputs: list[torch.Tensor]           # static inputs, the :func:`_state_tensors` order
    outputs: list[torch.Tensor]          # logits [B, T, V], then the state's tensors after the step
    host: list[tuple] = field(default_factory=list)  # per layer (carry_len, bank sizes or None)
    stats: dict = field(default_factory=dict)        # the commit's counters (compressed, evicted)


class SegmentGraphs:
    """Captured segment steps of one model, keyed by state layout (see the module docstring)."""

    def __init__(self, model, max_graphs: int = 32):
        if model.config.forward_read:
            raise NotImplementedError("forward_read is not supported by dnc.cuda_graphs (SegmentGraphs) yet; "
                                      "run the model eagerly (enable_cuda_graphs(False)) or with forward_read=false")
        self.model = model
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, _Graph] = {}
        self.seen: set[tuple] = set()
        self.pool = None
        self.replays = 0
        self.eager = 0
        self._lock = threading.Lock()  # one step at a time: captures and the shared buffers are not reentrant

    def clear(self) -> None:
        """Drop every captured graph (their memory is freed with them)."""
        self.graphs.clear()
        self.seen.clear()
        self.pool = None

    # ------------------------------------------------------------------ eligibility
    def eligible(self, tokens: torch.Tensor, state) -> bool:
        """True when ``tokens`` are one whole segment starting a segment, on CUDA, for inference."""
        m = self.model
        return (tokens.is_cuda and not m.training and not torch.is_grad_enabled() and state.seg_pos == 0
                and tokens.shape[1] == m.config.segment_len
                and all(not ls.write_buf and ls.mass is None for ls in state.layers))

    def _layout(self, tokens: torch.Tensor, state) -> tuple:
        parts: list = [tuple(tokens.shape), tokens.device, self.model.embed.weight.data_ptr(),
                       torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")]
        for ls in state.layers:
            parts.append((tuple(ls.cache.k.shape), ls.cache.k.dtype, ls.cache.carry_len, ls.prev_x is None, ls.prev_write is None,
                          None if ls.bank is None else (tuple(ls.bank.sizes), ls.bank.kv.dtype, ls.bank.kv.shape[1])))
        return tuple(parts)

    # ------------------------------------------------------------------ the step
    def _run_eager(self, tokens: torch.Tensor, state) -> tuple[torch.Tensor, dict]:
        logits, stats = self.model.segment_step(tokens, state)  # the model's public step function
        return logits, {"compressed": stats["compressed"], "evicted": stats["evicted"]}

    def step(self, tokens: torch.Tensor, state) -> tuple[torch.Tensor, dict]:
        """One segment ``tokens [B, segment_len]`` into ``state`` (updated in place, committed).

        Returns (logits [B, segment_len, V], {"compressed": n, "evicted": n})."""
        with self._lock:
            return self._step(tokens, state)

    def _step(self, tokens: torch.Tensor, state) -> tuple[torch.Tensor, dict]:
        key = self._layout(tokens, state)
        entry = self.graphs.get(key)
        if entry is None:
            if key not in self.seen or len(self.graphs) >= self.max_graphs:
                self.seen.add(key)
                self.eager += 1
                return self._run_eager(tokens, state)
            entry = self._capture(key, tokens, state)
        entry.tokens.copy_(tokens)
        _copy_all(entry.inputs, _state_tensors(state))
        entry.graph.replay()
        out = [torch.empty_like(t) for t in entry.outputs]
        _copy_all(out, entry.outputs)
        _assign(state, out[1:], entry.host)
        state.tokens_seen += tokens.shape[1]
        state.segments += 1
        self.replays += 1
        return out[0], dict(entry.stats)

    def _capture(self, key: tuple, tokens: torch.Tensor, state) -> _Graph:
        static_tokens = tokens.clone()
        inputs = [t.clone() for t in _state_tensors(state)]
        # The caller's autocast, without its weight-cast cache: a graph must cast the weights itself
        # rather than read casts cached (and later freed) outside the graph's memory.
        amp = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=torch.is_autocast_enabled("cuda"),
                             cache_enabled=False)
        # warm-up on a side stream (as torch.cuda.graph requires): fills cached constants, picks kernels
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), amp:
            warm = _shallow_state(state, inputs)
            _, stats = self._run_eager(static_tokens, warm)
        torch.cuda.current_stream().wait_stream(side)
        _copy_all(inputs, _state_tensors(state))  # in case the warm-up wrote into its inputs
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        work = _shallow_state(state, inputs)
        with capturing(graph, self.pool), amp:
            logits, _ = self._run_eager(static_tokens, work)
            outputs = [logits] + _state_tensors(work)
        host = [(ls.cache.carry_len, None if ls.bank is None else tuple(ls.bank.sizes)) for ls in work.layers]
        entry = _Graph(graph, static_tokens, inputs, outputs, host, stats)
        self.graphs[key] = entry
        return entry


# ================================================================================== decode steps
@dataclass
class _DecodeGraph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # the step's output [C, V] in graph memory
    batch: RaggedBatch    # held: the graph points into its tensors (and keeps its id from being reused)
    tokens: torch.Tensor | None = None  # prefill graphs: static inputs [C, T] and [C]
    counts: torch.Tensor | None = None


class DecodeGraphs:
    """Captured one-token decode steps, one per :class:`RaggedBatch` it hands out (see the module
    docstring). On CPU (or with grad, or in training mode) ``step`` is the eager step."""

    def __init__(self, model):
        if model.config.forward_read:
            raise NotImplementedError("forward_read is not supported by dnc.cuda_graphs (DecodeGraphs) yet; "
                                      "run the model eagerly (enable_cuda_graphs(False)) or with forward_read=false")
        self.model = model
        self.graphs: dict[tuple, _DecodeGraph] = {}
        self.seen: dict[tuple, RaggedBatch] = {}  # warmed up (held, so that its id stays its own)
        self.spare: dict[tuple, list[RaggedBatch]] = {}
        self.pool = None
        self.replays = 0
        self.eager = 0
        self.prefill_replays = 0
        self.prefill_eager = 0
        self._lock = threading.Lock()

    def clear(self) -> None:
        """Drop every graph and spare batch (their memory is freed with them)."""
        self.graphs.clear()
        self.seen.clear()
        self.spare.clear()
        self.pool = None

    # ------------------------------------------------------------------ batches
    def acquire(self, capacity: int) -> RaggedBatch:
        """A free batch of ``capacity`` rows (a spare one when there is one: its graph is kept)."""
        key = (capacity, self.model.device, self.model.embed.weight.dtype)
        with self._lock:
            spares = self.spare.get(key)
            if spares:
                return spares.pop()
        return RaggedBatch(self.model, capacity)

    def release(self, batch: RaggedBatch) -> None:
        """Take back an empty batch for reuse."""
        for slot in range(batch.capacity):
            if batch.rows[slot] is not None:
                batch.release(slot)
        with self._lock:
            self.spare.setdefault((batch.capacity, batch.device, batch.dtype), []).append(batch)

    # ------------------------------------------------------------------ the step
    def eligible(self, batch: RaggedBatch) -> bool:
        m = self.model
        return batch.device.type == "cuda" and not m.training and not torch.is_grad_enabled()

    def step(self, batch: RaggedBatch) -> torch.Tensor:
        """:func:`ragged_decode_step` on ``batch`` (replayed from its graph where there is one).
        Returns the next-token logits [C, V] (a new tensor)."""
        if not self.eligible(batch):
            return ragged_decode_step(self.model, batch)
        with self._lock:
            # mass_rows shapes the step (how many rows compute their read mass): one graph per value
            key = (id(batch), self.model.embed.weight.data_ptr(), torch.is_autocast_enabled("cuda"),
                   torch.get_autocast_dtype("cuda"), batch.mass_rows(), batch.kv_attention)
            entry = self.graphs.get(key)
            if entry is None:
                if key not in self.seen:
                    self.seen[key] = batch
                    self.eager += 1
                    return self._warm_up(batch)
                entry = self._capture(key, batch)
            entry.graph.replay()
            self.replays += 1
            return entry.logits.clone()

    def _amp(self):
        # the caller's autocast without its weight-cast cache (see SegmentGraphs._capture)
        return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=torch.is_autocast_enabled("cuda"),
                             cache_enabled=False)

    def prefill_step(self, batch: RaggedBatch, tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """:func:`dnc.ragged_prefill.ragged_prefill_step` on ``batch`` (``tokens [C, T]``, ``counts
        [C]`` long on its device), replayed from the graph of (batch, T) where there is one: a
        pair's first call runs eagerly (the warm-up), its second is captured and replayed.
        Returns the next-token logits [C, V] (a new tensor)."""
        if not self.eligible(batch):
            return ragged_prefill_step(self.model, batch, tokens, counts)
        with self._lock:
            key = ("prefill", id(batch), tokens.shape[1], self.model.embed.weight.data_ptr(),
                   torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
            entry = self.graphs.get(key)
            if entry is None:
                if key not in self.seen:
                    self.seen[key] = batch
                    self.prefill_eager += 1
                    return self._warm_up(batch, lambda: ragged_prefill_step(self.model, batch, tokens, counts))
                entry = self._capture_prefill(key, batch, tokens, counts)
            entry.tokens.copy_(tokens)
            entry.counts.copy_(counts)
            entry.graph.replay()
            self.prefill_replays += 1
            return entry.logits.clone()

    def _capture_prefill(self, key: tuple, batch: RaggedBatch, tokens: torch.Tensor, counts: torch.Tensor) -> _DecodeGraph:
        """Capture the prefill step on ``batch``'s tensors and new static inputs (runs nothing)."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        static_tokens, static_counts = tokens.clone(), counts.clone()
        graph = torch.cuda.CUDAGraph()
        with capturing(graph, self.pool), self._amp():
            logits = ragged_prefill_step(self.model, batch, static_tokens, static_counts)
        entry = _DecodeGraph(graph, logits, batch, static_tokens, static_counts)
        self.graphs[key] = entry
        return entry

    def _warm_up(self, batch: RaggedBatch, step=None) -> torch.Tensor:
        """A real (eager) step on a side stream, as capture wants: fills the cached constants.
        ``step``: what to run (default the decode step on ``batch``)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), self._amp():
            logits = ragged_decode_step(self.model, batch) if step is None else step()
        torch.cuda.current_stream().wait_stream(side)
        logits.record_stream(torch.cuda.current_stream())  # read on this stream after the side one is done
        return logits

    def _capture(self, key: tuple, batch: RaggedBatch) -> _DecodeGraph:
        """Capture the step on ``batch``'s tensors. Capturing runs nothing: the first replay is the step."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with capturing(graph, self.pool), self._amp():
            logits = ragged_decode_step(self.model, batch)
        entry = _DecodeGraph(graph, logits, batch)
        self.graphs[key] = entry
        return entry
