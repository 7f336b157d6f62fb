"""The training segment step as CUDA graphs, recomputed in backward (``train.compile: graphs``).

Training the small preset is bound by host launches in the segment loop (issue 11: ~45 ms of
launches per segment at B=2 x 32k). ``train.compile: segment`` removes them with ``torch.compile``
but takes ~110 s per graph on an H200, and a curriculum needs one per batch size. This runner
captures :func:`dnc.training.compiled_segment.fixed_segment_step` (a pure function of tensors over
fixed-capacity banks) as plain CUDA graphs instead: a capture costs one eager segment or two.

Why not ``torch.cuda.make_graphed_callables``: one graphed forward serves all 16 segments of a
step, so its static activations hold only the last segment's, and its backward would use them for
every segment. Here each segment is one :class:`_GraphedStep` (an autograd Function), used like
activation checkpointing:

- forward: copy the segment's inputs into the graph's static buffers, replay a *no-grad* forward
  graph, clone the outputs out; save only the inputs (tokens, carried window, bank: small next to
  a segment's activations);
- backward: copy the saved inputs and the incoming output grads into static buffers, replay ONE
  graph that recomputes the forward with grad and runs ``torch.autograd.grad`` for the inputs that
  require grad and every trainable parameter (through aliases of the parameters, whose grad
  accumulators are made inside the capture), clone the grads out. Parameters are inputs of the
  Function, so their grads reach ``param.grad`` through autograd's own accumulation (and DDP's
  hooks, which fire once per step: the engine sums the segments' grads first).

One pair of graphs per static key (every input's shape, dtype and requires-grad, the autocast
dtype, ``want_recon``), captured after a warm-up on a side stream (as :mod:`dnc.cuda_graphs`
does), all in one memory pool: the graphs of one key replay one after another, never at once.
Host work (fill counts, clocks, BPTT cuts) stays outside, in :class:`CompiledTrainSegments`.
The step draws no random numbers (``dropout`` > 0 is refused: the forward and its recompute would
need the same masks).

Without CUDA the same Function runs with plain calls in place of the graphs (forward without grad,
backward recomputes with grad), so CPU tests check the recompute scheme against the eager forward.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from dnc.training.compiled_segment import CompiledTrainSegments, fixed_segment_step


def split_tensors(tree) -> tuple[list[torch.Tensor], tuple]:
    """The tensors of a pytree (in flatten order) and what :func:`join_tensors` needs to rebuild it:
    (spec, the other leaves (None, bools) with tensors' places None, the tensors' places)."""
    leaves, spec = tree_flatten(tree)
    places = tuple(i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor))
    tensors = [leaves[i] for i in places]
    for i in places:
        leaves[i] = None
    return tensors, (spec, tuple(leaves), places)


def join_tensors(tensors, structure: tuple):
    """The pytree :func:`split_tensors` took apart, over ``tensors``."""
    spec, leaves, places = structure
    leaves = list(leaves)
    for i, t in zip(places, tensors):
        leaves[i] = t
    return tree_unflatten(leaves, spec)


class _Step(torch.nn.Module):
    """``fixed_segment_step`` as a module over the model, for ``torch.func.functional_call``: the
    recompute runs it with aliases of the parameters (see :meth:`_SegmentGraph.recompute`)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, layout, *args):
        return fixed_segment_step(self.model, layout, *args)


def _copy_all(dst: list[torch.Tensor], src) -> None:
    if dst:
        torch._foreach_copy_(dst, list(src))  # a few launches for all of them


@dataclass
class _SegmentGraph:
    """Everything one static key needs: its input/output structure and, on CUDA, its two graphs.

    ``inputs``: the flat tensors of ``fixed_segment_step``'s arguments (tokens [B, L], rope tables,
    sample positions, caches [B, H, w, Dh], prev_xs [B, 1, D], banks, prev_writes [B, 1, D]);
    ``grad_in``: per input, whether the graph computes its grad; ``out_diff``: per flat output
    (logits [B, L, V], caches, prev_xs, banks, prev_writes, recon []), whether it carries grad."""

    model: Any
    step: _Step
    layout: Any
    in_spec: tuple                    # split_tensors structure of the step's tensor arguments
    want_recon: bool
    grad_in: list[bool]
    names: list[str]                  # every trainable parameter's name, as model.named_parameters() gives it
    params: list[torch.nn.Parameter]  # ... and the parameters
    amp: tuple[str, torch.dtype, bool]  # autocast (device type, dtype, enabled) of the caller
    out_spec: Any = None
    out_diff: list[bool] = field(default_factory=list)
    cuda: bool = False
    static_in: list[torch.Tensor] = field(default_factory=list)
    static_out: list[torch.Tensor] = field(default_factory=list)
    static_gout: list[torch.Tensor] = field(default_factory=list)   # one per output with out_diff
    static_grads: list = field(default_factory=list)                # grad_in inputs, then params (None = unused)
    fwd_graph: Any = None
    bwd_graph: Any = None

    def autocast(self):
        # without the weight-cast cache: a graph must cast the weights itself rather than read casts
        # cached (and later freed) outside its memory
        dev, dtype, enabled = self.amp
        return torch.autocast(dev, dtype=dtype, enabled=enabled, cache_enabled=False)

    def call(self, flat: list[torch.Tensor], params: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """``fixed_segment_step`` over flat inputs (and ``params`` in place of the parameters, in
        ``names`` order); its flat outputs."""
        args = (self.layout, *join_tensors(flat, self.in_spec), self.want_recon)
        if params is None:
            out = fixed_segment_step(self.model, *args)
        else:
            out = torch.func.functional_call(self.step, {f"model.{n}": p for n, p in zip(self.names, params)}, args)
        out, self.out_spec = split_tensors(out)
        return out

    def recompute(self, inputs, gouts) -> list:
        """The forward again, with grad, and its grads for the ``grad_in`` inputs then the params,
        given the grads ``gouts`` of the ``out_diff`` outputs (what the backward graph holds).

        Differentiated with respect to fresh leaves that alias the parameters (same storage), not
        the parameters: a parameter's own grad accumulator may be alive (the training graph's, or
        DDP's, made on the default stream), and the autograd engine would make that stream wait on
        the capture stream, which invalidates the capture. An alias's accumulator is made here."""
        with torch.enable_grad(), self.autocast():
            req = [t.detach().requires_grad_(g) for t, g in zip(inputs, self.grad_in)]
            aliases = [p.detach().requires_grad_() for p in self.params]
            outs = [o for o, d in zip(self.call(req, aliases), self.out_diff) if d]
            wrt = [t for t, g in zip(req, self.grad_in) if g] + aliases
            return list(torch.autograd.grad(outs, wrt, list(gouts), allow_unused=True))

    # ------------------------------------------------------------------ setup
    def prepare(self, inputs: list[torch.Tensor], pool) -> None:
        """Find which outputs carry grad (one run with grad) and, on CUDA, capture both graphs."""
        self.cuda = inputs[0].is_cuda
        if not self.cuda:
            with torch.enable_grad(), self.autocast():
                req = [t.detach().requires_grad_(g) for t, g in zip(inputs, self.grad_in)]
                self.out_diff = [o.requires_grad for o in self.call(req)]
            return
        from dnc.cuda_graphs import capturing

        self.static_in = [t.detach().clone() for t in inputs]
        # warm-up on a side stream (as torch.cuda.graph requires): fills the model's cached
        # constants (made during a capture they would live in graph memory) and picks kernels, for
        # both graphs' code paths: the forward without grad, the forward with grad and its backward
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            with torch.no_grad(), self.autocast():
                self.call(self.static_in)
            with torch.enable_grad(), self.autocast():
                req = [t.detach().requires_grad_(g) for t, g in zip(self.static_in, self.grad_in)]
                outs = self.call(req)
            self.out_diff = [o.requires_grad for o in outs]
            gouts = [torch.zeros_like(o) for o, d in zip(outs, self.out_diff) if d]
            del req, outs
            self.recompute(self.static_in, gouts)
        torch.cuda.current_stream().wait_stream(side)
        # the static grads of the outputs on the main stream, where the replays use them (memory
        # made on the side stream would return to its free list at a time unsynchronised with ours)
        self.static_gout = [torch.zeros_like(g) for g in gouts]
        del gouts
        self.fwd_graph, self.bwd_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.no_grad(), capturing(self.fwd_graph, pool), self.autocast():
            self.static_out = self.call(self.static_in)
        with capturing(self.bwd_graph, pool):
            self.static_grads = self.recompute(self.static_in, self.static_gout)

    # ------------------------------------------------------------------ the two passes
    def forward(self, inputs) -> list[torch.Tensor]:
        """Flat outputs of the step (fresh tensors: the next segment's replay overwrites the graph's)."""
        if not self.cuda:
            with torch.no_grad(), self.autocast():
                return self.call(list(inputs))
        _copy_all(self.static_in, inputs)
        self.fwd_graph.replay()
        return [t.clone() for t in self.static_out]

    def backward(self, inputs, gouts) -> list:
        """Grads of the ``grad_in`` inputs, then of the params (fresh tensors or None)."""
        gouts = [g for g, d in zip(gouts, self.out_diff) if d]
        if not self.cuda:
            return self.recompute(inputs, gouts)
        _copy_all(self.static_in, inputs)
        _copy_all(self.static_gout, gouts)
        self.bwd_graph.replay()
        return [None if g is None else g.clone() for g in self.static_grads]


class _GraphedStep(torch.autograd.Function):
    """One segment: ``apply(entry, n_in, *inputs, *params)`` -> the step's flat outputs."""

    @staticmethod
    def forward(ctx, entry: _SegmentGraph, n_in: int, *flat):
        inputs = flat[:n_in]
        outs = entry.forward(inputs)
        ctx.entry, ctx.n_in = entry, n_in
        ctx.save_for_backward(*inputs)  # the segment's inputs only; backward recomputes the rest
        ctx.mark_non_differentiable(*[o for o, d in zip(outs, entry.out_diff) if not d])
        return tuple(outs)

    @staticmethod
    def backward(ctx, *gouts):
        entry = ctx.entry
        grads = iter(entry.backward(ctx.saved_tensors, gouts))
        in_grads = [next(grads) if g else None for g in entry.grad_in]
        return (None, None, *in_grads, *grads)


class GraphedTrainSegments(CompiledTrainSegments):
    """Step runner for training forwards: whole segments through CUDA graphs (see the module
    docstring); the host bookkeeping, eligibility and fallback are :class:`CompiledTrainSegments`'.

    ``max_graphs``: static keys captured at most (each holds its static buffers, including one set
    of parameter grads); later keys run the eager step with a warning. Counters: ``compiled_steps``
    (segments through :class:`_GraphedStep`), ``eager_steps`` (the first segment of a run with a
    carried KV window, keys past ``max_graphs``, segments without grad); ``graphs``: one dict per
    capture (``key``, ``batch``, ``seconds`` of warm-up and capture, ``at_step``).

    ``min_segments``: the length gate of :meth:`select_for_length` (0 = graphs for every length)."""

    def __init__(self, model, *, fallback=None, max_graphs: int = 8, log: bool = True, min_segments: int = 0):
        if model.config.dropout > 0:
            raise NotImplementedError("train.compile: graphs recomputes each segment in backward and cannot "
                                      f"replay dropout masks (dropout={model.config.dropout}); use dropout 0 "
                                      "or train.compile: false/segment")
        super().__init__(model, compile=False, fallback=fallback, max_graphs=max_graphs, log=log)
        self.entries: dict[tuple, _SegmentGraph] = {}
        self.step_module = _Step(model)
        self.pool = None
        self.min_segments = min_segments
        self.active = True          # False while a gated (too short) sequence runs the eager step
        self.paths = {"graphs": 0, "eager": 0}   # training forwards per path chosen by the gate
        self.last_path: str | None = None
        self._gate_said = False

    def select_for_length(self, tokens: int) -> str:
        """The length gate (``TrainConfig.graphs_min_segments``): called by ``train_step`` before
        each training forward over ``tokens`` tokens per sequence. Sequences of fewer than
        ``min_segments`` segments run the model's eager step (the graphs' recompute in backward
        costs more than the launches they save there); others go through the graphs. Returns the
        path chosen (``"graphs"`` or ``"eager"``), also counted in ``paths`` and kept in ``last_path``."""
        segments = -(-int(tokens) // self.model.config.segment_len)
        self.active = segments >= self.min_segments
        path = "graphs" if self.active else "eager"
        self.paths[path] += 1
        self.last_path = path
        if not self.active and not self._gate_said and self.log:
            self._gate_said = True
            print(f"[dnc.training] compile: graphs: sequences under graphs_min_segments={self.min_segments} "
                  f"segments (this one: {segments}) run the eager step; longer ones the graphs", flush=True)
        return path

    def _mine(self, tokens: torch.Tensor, state) -> bool:
        return self.active and super()._mine(tokens, state)

    def clear(self) -> None:
        """Drop every graph (after replacing parameter tensors: the graphs point at the old ones)."""
        self.entries.clear()
        self._keys.clear()
        self._refused.clear()
        self.pool = None
        super().clear()

    def step(self, tokens: torch.Tensor, state) -> tuple[torch.Tensor, dict[str, Any]]:
        """One whole segment ``tokens [B, segment_len]`` into ``state`` (updated in place, committed).

        Returns (logits [B, L, V], {"compressed", "evicted", "recon_terms"}) like ``DNC.segment_step``."""
        if not self._mine(tokens, state):
            return self.fallback.step(tokens, state)
        args, host = self.prepare(tokens, state)
        flat, in_spec = split_tensors(args[2:10])  # (tokens, flags, rope, sample, caches, prev_xs, banks, prev_ws)
        key = self.graph_key(flat, in_spec, args[10])
        if not (host["steady"] and torch.is_grad_enabled() and self._admit(key)):
            self.eager_steps += 1
            return self._finish(state, fixed_segment_step(*args), host)
        entry = self.entries.get(key) or self._capture(key, flat, in_spec, args[10], tokens.shape[0])
        outs = _GraphedStep.apply(entry, len(flat), *flat, *entry.params)
        self.compiled_steps += 1
        return self._finish(state, join_tensors(outs, entry.out_spec), host)

    def graph_key(self, flat: list[torch.Tensor], in_spec: tuple, want_recon: bool) -> tuple:
        """What a graph is specialised to: each input's shape, dtype and requires-grad, the other
        arguments (which are None), ``want_recon``, the autocast dtype and the parameters' storage
        (graphs hold pointers to them)."""
        dev = self.model.embed.weight.device.type
        cast = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        shapes = tuple((tuple(t.shape), t.dtype, t.requires_grad) for t in flat)
        return (shapes, in_spec[1], want_recon, cast, self.model.embed.weight.data_ptr())

    def _admit(self, key: tuple) -> bool:
        return self._admit_bounded(key, lambda n: (
            f"graphed training segment: {n} keys captured already (max_graphs={self.max_graphs}); a new one "
            f"(batch {key[0][0][0][0]}) runs eagerly (slower, not wrong). Raise max_graphs or use fewer batch sizes"))

    def _capture(self, key: tuple, flat: list[torch.Tensor], in_spec, want_recon: bool, batch: int) -> _SegmentGraph:
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        if any(type(p).__name__ == "DTensor" for p in params):
            raise NotImplementedError("train.compile: graphs does not support FSDP-sharded parameters; "
                                      "use DDP or train.compile: false")
        dev = flat[0].device.type
        amp = (dev, torch.get_autocast_dtype(dev), torch.is_autocast_enabled(dev))
        entry = _SegmentGraph(self.model, self.step_module, self.layout, in_spec, want_recon,
                              [t.requires_grad for t in flat], [n for n, _ in named], params, amp)
        t0 = time.perf_counter()
        if flat[0].is_cuda and self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        entry.prepare(flat, self.pool)
        if entry.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        self.entries[key] = entry
        rec = {"key": f"batch {batch}, autocast {key[3]}, recon {want_recon}", "batch": batch,
               "seconds": round(seconds, 3), "at_step": self.compiled_steps}
        self.graphs.append(rec)
        if self.log:
            what = "captured the training segment graphs" if entry.cuda else "prepared the recomputed segment (no CUDA)"
            print(f"[dnc.training] {what} for {rec['key']} in {seconds:.2f} s (graph {len(self.graphs)})", flush=True)
            if not entry.cuda and len(self.graphs) == 1:
                # without CUDA there is no launch cost to save, only the recompute: say so once
                print("[dnc.training] train.compile: graphs needs a CUDA device to pay: on this device every "
                      "segment is recomputed in backward (slower than train.compile: false)", flush=True)
        return entry
