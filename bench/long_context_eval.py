"""Evaluation of the long-context record (``bench/long_context.py``): the suites' samples and
their wordings (phrasing x markers), greedy exact match either by batched teacher forcing
(:class:`TeacherReader`, the default) or by greedy answers with one prefill per sample
(:class:`GreedyReader`, ``--scorer greedy``), one cell per model on the same samples
(:func:`run_cells`), and the four phases a run goes through (:func:`evaluate`: passkey, recall,
MQAR, bits per byte).
"""

from __future__ import annotations

import gc
import re
import time
from typing import Any

import numpy as np
import torch

from common import fmt_len, stderr_logger
from long_context_report import Run
from long_context_train import baseline_config

from dnc.data import tasks as task_lib
from dnc.model import DNC

log = stderr_logger("long_context")


# ==============================================================================================
# Samples and their wordings
# ==============================================================================================
SUITE_SEED = {"passkey": 1, "relational_2hop": 2, "kv_retrieval": 3, "mqar": 4}
"""Per-suite component of the sample seed (samples depend only on seed, suite, length, cell)."""

PHRASINGS = ("template", "train", "heldout", "cross_template", "cross_heldout")
"""``--phrasings``: the generators' original wording, the phrasings training draws, the ones it
never sees (``dnc.data.phrasings``), and two crosses that swap the filler of ``template`` and
``heldout`` (issue 11: tells a wording failure from a filler failure)."""
VARIANT_FILLER = {"template": "words", "train": "stdlib", "heldout": "stdlib_heldout",
                  "cross_template": "stdlib_heldout", "cross_heldout": "words"}
"""Filler of each phrasing cell: held-out wording comes with held-out text (stdlib eval modules);
the crosses take the other one."""
VARIANT_WORDING = {"cross_template": "template", "cross_heldout": "heldout"}
"""Wording of a cross variant (the others are their own). A cross draws with its wording's seed: the
first sample of a cell has that variant's passkey and wording in the other filler (later ones differ:
the two fillers use the generator's draws differently)."""
BASE_VARIANT = ("template", True)
"""(phrasing, markers) of the original suites: their samples and seeds are unchanged."""


def variant_kwargs(phrasing: str, markers: bool) -> dict[str, Any]:
    """Task keyword arguments of one (phrasing, markers) cell; none for :data:`BASE_VARIANT`."""
    if (phrasing, markers) == BASE_VARIANT:
        return {}
    wording = VARIANT_WORDING.get(phrasing, phrasing)
    return {"phrasing": None if wording == "template" else wording, "markers": markers,
            "filler": VARIANT_FILLER[phrasing]}


def variant_seed(base: list[int], phrasing: str, markers: bool) -> list[int]:
    """The suite's seed list, extended for every variant but the base one (whose samples stay); a
    cross takes its wording's seed (:data:`VARIANT_WORDING`)."""
    phrasing = VARIANT_WORDING.get(phrasing, phrasing)
    if (phrasing, markers) == BASE_VARIANT:
        return base
    return base + [1 + 2 * PHRASINGS.index(phrasing) + int(not markers)]


def variant_extra(phrasing: str, markers: bool) -> dict[str, Any]:
    return {"phrasing": phrasing, "markers": markers, "filler": VARIANT_FILLER[phrasing]}


def draw_samples(task: str, seed: list[int], length: int, n: int, difficulty: float,
                 **kw: Any) -> tuple[int, list[task_lib.Sample]]:
    """(length, ``n`` samples) of ``task``; a worded variant that does not fit ``length`` is drawn
    again at the length its error asks for (same seed), so every cell holds ``n`` samples."""
    L = length
    while True:
        rng = np.random.default_rng(seed)
        try:
            return L, [task_lib.generate(task, rng, L, difficulty, **kw) for _ in range(n)]
        except ValueError as e:
            m = re.search(r"at least (\d+) tokens", str(e))
            if m is None or not kw:
                raise
            L = max(int(m.group(1)), L + 1)


def parse_variants(phrasings: str, markers: str) -> list[tuple[str, bool]]:
    """``--phrasings`` x ``--markers`` as (phrasing, markers) pairs, the base variant first."""
    ps = [x.strip() for x in phrasings.split(",") if x.strip()]
    ms = [x.strip() for x in markers.split(",") if x.strip()]
    bad = [x for x in ps if x not in PHRASINGS] + [x for x in ms if x not in ("on", "off")]
    if bad or not ps or not ms:
        raise ValueError(f"--phrasings takes a comma list of {', '.join(PHRASINGS)} and --markers of on, off; "
                         f"got {phrasings!r} / {markers!r}")
    out = [(p, m == "on") for p in dict.fromkeys(ps) for m in dict.fromkeys(ms)]
    return sorted(out, key=lambda v: v != BASE_VARIANT)


# ==============================================================================================
# Greedy answers with one prefill per sample
# ==============================================================================================
class GreedyReader:
    """Greedy answers for task samples: the prompt is fed once, ``chunk`` tokens per forward
    call with ``last_logits_only`` (so the largest logits tensor is ``[1, chunk, V]``, inside the
    model), then each answer is decoded token by token from the same state.

    For samples with several answer spans (MQAR) the state is advanced over the true tokens
    between spans (teacher forcing, as :func:`dnc.data.tasks.predict_answer` does) and each
    one-token answer is read off the logits without touching the state."""

    def __init__(self, model: DNC, chunk: int, device: torch.device):
        self.model, self.chunk, self.device = model, int(chunk), device
        if device.type == "cuda" and model.config.memory:
            model.enable_cuda_graphs()  # a whole-segment chunk is one graph launch (dnc.cuda_graphs)

    def _feed(self, state, ids: np.ndarray) -> int:
        """Feed ``ids`` [n] through ``state``; returns the greedy next token after them."""
        out = None
        for i in range(0, len(ids), self.chunk):
            x = torch.from_numpy(np.asarray(ids[i:i + self.chunk], dtype=np.int64)).to(self.device).view(1, -1)
            out = self.model(x, state=state, last_logits_only=True, metrics=False)
        return int(out.logits[0, -1].float().argmax())

    def _decode(self, state, first: int, k: int) -> list[int]:
        got = [first]
        while len(got) < k:
            got.append(self._feed(state, np.array([got[-1]])))
        return got

    @torch.no_grad()
    def pieces(self, sample: task_lib.Sample) -> list[list[int]]:
        """One list of ``span length`` predicted tokens per answer span of ``sample``."""
        from dnc.training import autocast_ctx

        spans = sample.meta["answer_spans"]
        out = []
        with autocast_ctx(self.device, True):
            state = self.model.init_state(1)
            pos, nxt = 0, None
            for i, (s, e) in enumerate(spans):
                if s > pos:
                    nxt = self._feed(state, sample.tokens[pos:s])
                    pos = s
                if e - s == 1 or i == len(spans) - 1:
                    out.append(self._decode(state, nxt, e - s))  # last span: the state may move on
                else:  # a multi-token span before others: decode on a fresh copy of the prefix
                    fresh = self.model.init_state(1)
                    out.append(self._decode(fresh, self._feed(fresh, sample.tokens[:s]), e - s))
        return out


def answer(reader: GreedyReader, sample: task_lib.Sample) -> tuple[bool, int, int]:
    """(exact match of the whole answer as ``dnc.data.tasks.score`` defines it, spans right, spans)."""
    spans = sample.meta["answer_spans"]
    pieces = reader.pieces(sample)
    by_start = {s: p for (s, _), p in zip(spans, pieces)}
    pred = task_lib.predict_answer(sample, lambda prefix, k: by_start[len(prefix)])
    right = 0
    for (s, e), p in zip(spans, pieces):
        true = sample.tokens[s:e]
        if true[-1] == task_lib.EOS:
            true = true[:-1]
        right += int([int(t) for t in p[:len(true)]] == [int(t) for t in true])
    return task_lib.score(sample, pred), right, len(spans)


class TeacherReader:
    """The verdicts :func:`answer` gives through a :class:`GreedyReader`, from batched teacher
    forcing (``dnc.training.exact_match``): each sample is one forward over prompt and true
    answer, the cell's samples (all of one length) ``max_rows`` rows at a time, ``chunk`` tokens
    per call, and only the logits at answer positions are kept, so a 1M-token row needs no more
    memory than its prefill. ``max_batch_tokens`` caps rows x tokens of a model without memory
    (its KV cache grows with the input); the DNC's state does not, so it is not capped."""

    def __init__(self, model: DNC, chunk: int, device: torch.device, max_rows: int = 64,
                 max_batch_tokens: int | None = None):
        from dnc.training.exact_match import TeacherForcedScorer

        if device.type == "cuda" and model.config.memory:
            model.enable_cuda_graphs()  # whole-segment chunks, as GreedyReader's prefill
        self.scorer = TeacherForcedScorer(model, device, True, max_rows=max_rows, chunk=chunk,
                                          max_batch_tokens=None if model.config.memory else max_batch_tokens)

    def answers(self, samples: list[task_lib.Sample]) -> list[tuple[bool, int, int]]:
        """Per sample, what :func:`answer` returns: (exact match, spans right, spans)."""
        from dnc.training.exact_match import span_hits

        out = []
        for s, h in zip(samples, self.scorer.hits(samples)):
            per_span = span_hits(s, h)
            out.append((bool(h.all()), sum(per_span), len(per_span)))
        return out


def answers(reader: GreedyReader | TeacherReader, samples: list[task_lib.Sample]) -> list[tuple[bool, int, int]]:
    """:func:`answer` of every sample of a cell: batched through a :class:`TeacherReader`, one by
    one through anything else."""
    if isinstance(reader, TeacherReader):
        return reader.answers(samples)
    return [answer(reader, s) for s in samples]


def is_oom(e: BaseException) -> bool:
    return isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and ("out of memory" in str(e).lower() or "can't allocate memory" in str(e)))


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def mqar_lengths(ds: dict[str, Any]) -> dict[str, int]:
    """MQAR sample length of every ``"<phrasing>/<on|off>"`` variant: ``--mqar-len``, raised to the
    shortest that holds the pairs and queries (worded variants: the longest their samples need)."""
    out = {}
    for ph, mk in ds["variants"]:
        L = max(ds["mqar_len"], mqar_min_length(ds["mqar_pairs"]))
        if (ph, mk) != BASE_VARIANT:
            seed = variant_seed([ds["seed"], SUITE_SEED["mqar"], ds["mqar_len"]], ph, mk)
            L, _ = draw_samples("mqar", seed, ds["mqar_len"], ds["n_mqar"], 0.0, n_pairs=ds["mqar_pairs"],
                                **variant_kwargs(ph, mk))
        out[f"{ph}/{'on' if mk else 'off'}"] = L
    return out


def mqar_min_length(n_pairs: int, value_len: int = 1) -> int:
    """Shortest MQAR sample holding ``n_pairs`` pairs and as many queries (layout of
    ``dnc.data.tasks.mqar``: bos, pairs ``<key>KV``, sep, queries ``<query>KV``, eos;
    keys are 1 letter up to 16 pairs, else 2)."""
    key_len = 1 if n_pairs <= 16 else 2
    return 3 + 2 * n_pairs * (1 + key_len + value_len)


# ==============================================================================================
# Cells and the phases of a run
# ==============================================================================================
def crosses_segment(sample: task_lib.Sample, segment_len: int) -> bool:
    """True when a passkey sample's digits are split between two segments of ``segment_len``."""
    start = sample.meta["needle_pos"]
    return start // segment_len != (start + len(sample.meta["passkey"]) - 1) // segment_len


def fact_split_from_digits(sample: task_lib.Sample, segment_len: int) -> bool:
    """True when a passkey's words ("the pass key is") end in an earlier segment than its first
    digit: without a carried attention window (``kv_window``) the digits are then written with
    no sight of the words that name them (session 20: the depth-0.25 cells of every length)."""
    fact = sample.meta.get("fact_pos")
    return fact is not None and fact // segment_len != sample.meta["needle_pos"] // segment_len


def run_cells(run: Run, models: dict[str, DNC], readers: dict[str, GreedyReader | TeacherReader], suite: str,
              length: int, samples: list[task_lib.Sample], extra: dict[str, Any],
              done: dict[str, tuple[list, float, int]] | None = None) -> None:
    """Evaluate every model on the same ``samples`` and record one cell per model. ``done``: model
    name -> (its answers to ``samples``, seconds, cells of the call) already read by
    :func:`run_cell_group`."""
    for name, model in models.items():
        cell: dict[str, Any] = {"suite": suite, "model": name, "length": length, **extra, "n": len(samples)}
        if name == "baseline" and length > run.ds["baseline_max_len"]:
            cell.update(acc=None, status="skipped", reason=f"above --baseline-max-len {run.ds['baseline_max_len']}")
            run.add(cell)
            continue
        t0 = time.time()
        error = None
        if done and name in done:
            res, seconds, shared = done[name]
            cell["shared_call_cells"] = shared  # seconds: this cell's share (by samples) of one batched call
        else:
            try:
                res = answers(readers[name], samples)
            except Exception as e:  # noqa: BLE001 - only out-of-memory is recorded; anything else re-raises
                if not is_oom(e):
                    raise
                error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            seconds = time.time() - t0
        if error is not None:  # outside the except block: its traceback no longer pins the state
            free_memory(run.device)
            cell.update(acc=None, status="oom", error=error, seconds=seconds)
            log(f"{suite} {fmt_len(length)} {extra} {name}: out of memory")
            run.add(cell)
            continue
        correct = sum(r[0] for r in res)
        cell.update(correct=correct, acc=correct / len(samples), status="ok", seconds=seconds)
        if suite == "passkey" and model.config.memory:
            # needles whose digits cross a segment boundary: their second part is written in a
            # segment whose local attention never saw the first (kv_window carries some across)
            cross = [crosses_segment(x, model.config.segment_len) for x in samples]
            cell.update(boundary_n=sum(cross), boundary_correct=sum(r[0] for r, c in zip(res, cross) if c))
            split = [fact_split_from_digits(x, model.config.segment_len) for x in samples]
            cell.update(split_fact_n=sum(split), split_fact_correct=sum(r[0] for r, c in zip(res, split) if c))
        if suite == "mqar":
            q_right, q_total = sum(r[1] for r in res), sum(r[2] for r in res)
            cell.update(queries=q_total, query_correct=q_right, query_acc=q_right / q_total, sample_acc=cell["acc"])
        log(f"{suite} {fmt_len(length)} {' '.join(f'{k}={v}' for k, v in extra.items() if k != 'note')} {name}: "
            f"{correct}/{len(samples)}" + (f" (queries {cell['query_acc']:.1%})" if suite == "mqar" else "")
            + f" in {cell['seconds']:.1f}s")
        run.add(cell)


def run_cell_group(run: Run, models: dict[str, DNC], readers: dict[str, GreedyReader | TeacherReader], suite: str,
                   cells: list[tuple[int, list[task_lib.Sample], dict[str, Any]]]) -> None:
    """:func:`run_cells` for several ``(length, samples, extra)`` cells of one suite (the depths of a
    passkey length): a :class:`TeacherReader` reads all their samples in one call (more rows per
    forward pass), then every cell is recorded as ``run_cells`` records it, in the same order, its
    ``seconds`` the call's share by sample count. A call that runs out of memory falls back to one
    call per cell; other readers always read cell by cell."""
    shared: dict[str, dict[int, tuple[list, float, int]]] = {}
    for name in models:
        todo = [c for c in cells if not (name == "baseline" and c[0] > run.ds["baseline_max_len"])]
        if not isinstance(readers[name], TeacherReader) or len(todo) < 2:
            continue
        t0 = time.time()
        oom = False
        try:
            res = answers(readers[name], [s for _, samples, _ in todo for s in samples])
        except Exception as e:  # noqa: BLE001 - out of memory falls back to smaller calls; anything else re-raises
            if not is_oom(e):
                raise
            oom = True
        if oom:
            free_memory(run.device)
            log(f"{suite} {name}: out of memory reading {len(todo)} cells at once; one cell per call")
            continue
        per_sample = (time.time() - t0) / len(res)
        it = iter(res)
        shared[name] = {id(samples): ([next(it) for _ in samples], per_sample * len(samples), len(todo))
                        for _, samples, _ in todo}
    for length, samples, extra in cells:
        run_cells(run, models, readers, suite, length, samples, extra,
                  done={n: d[id(samples)] for n, d in shared.items() if id(samples) in d})


def evaluate(run: Run, models: dict[str, DNC], args, held_out: bytes) -> None:
    """Every suite on every model, the same samples for each: passkey over lengths x depths,
    two-hop relational recall and kv_retrieval, MQAR, then bits per byte on ``held_out``
    (stdlib text no training saw). ``args`` is the parsed command line; the run's markdown and
    plots are rewritten after each phase."""
    from dnc.training import text_bits_per_byte

    ds, device = run.ds, run.device
    def reader(m: DNC) -> GreedyReader | TeacherReader:
        chunk = m.config.segment_len if m.config.memory else ds["prefill_chunk"]
        if ds.get("scorer", "teacher") == "greedy":
            return GreedyReader(m, chunk, device)
        return TeacherReader(m, chunk, device, ds.get("score_rows", 64), ds.get("score_batch_tokens"))

    readers = {n: reader(m) for n, m in models.items()}

    # ---------------------------------------------------------------------------------- passkey
    for ph, mk in ds["variants"]:
        for L in ds["passkey_lengths"]:
            cells = []
            t0 = time.time()
            for di, d in enumerate(ds["depths"]):
                seed = variant_seed([args.seed, SUITE_SEED["passkey"], L, di], ph, mk)
                Ls, samples = draw_samples("needle", seed, L, args.n, 0.0, depth=d, n_decoys=args.decoys,
                                           **variant_kwargs(ph, mk))
                cells.append((Ls, samples, {"depth": d, **variant_extra(ph, mk)}))
            # the long cells' time is not all reading: say what drawing their haystacks took
            log(f"passkey {fmt_len(L)} phrasing={ph}: drew {sum(len(c[1]) for c in cells)} samples in {time.time() - t0:.1f}s")
            run_cell_group(run, models, readers, "passkey", cells)  # every depth of a length in one batch
    run.render("passkey")

    # ---------------------------------------------------------------------------------- recall
    for ph, mk in ds["variants"]:
        for L in ds["recall_lengths"]:
            for suite, task, kw in (("relational_2hop", "relational", {"hops": 2}),
                                    ("kv_retrieval", "kv_retrieval", {})):
                seed = variant_seed([args.seed, SUITE_SEED[suite], L], ph, mk)
                Ls, samples = draw_samples(task, seed, L, args.n_recall, args.recall_difficulty, **kw,
                                           **variant_kwargs(ph, mk))
                run_cells(run, models, readers, suite, Ls, samples, variant_extra(ph, mk))
    run.render("recall")

    # ---------------------------------------------------------------------------------- MQAR
    for ph, mk in ds["variants"]:
        L = ds["mqar_lengths"][f"{ph}/{'on' if mk else 'off'}"]
        extra: dict[str, Any] = {"n_pairs": args.mqar_pairs, **variant_extra(ph, mk)}
        if L != ds["mqar_len"]:
            extra["note"] = (f"{args.mqar_pairs} pairs and {args.mqar_pairs} queries need at least {L} tokens with the "
                             f"byte tokenizer, so the length was raised from {ds['mqar_len']} to {L}.")
            log(extra["note"])
        # worded variants: the seed and first length mqar_lengths used, so the draw lands on L again
        L0 = L if (ph, mk) == BASE_VARIANT else ds["mqar_len"]
        seed = variant_seed([args.seed, SUITE_SEED["mqar"], L0], ph, mk)
        _, samples = draw_samples("mqar", seed, L0, args.n_mqar, 0.0, n_pairs=args.mqar_pairs,
                                  **variant_kwargs(ph, mk))
        assert all(len(x) == L for x in samples)
        run_cells(run, models, readers, "mqar", L, samples, extra)
    run.render("mqar")

    # ---------------------------------------------------------------------------------- bits per byte
    ctx = ds["bpb_context"]
    avail = min(len(held_out), args.bpb_bytes)
    for name, model in models.items():
        cell: dict[str, Any] = {"suite": "bpb", "model": name, "context": ctx,
                                "bytes": (avail // (ctx + 1)) * ctx}
        t0 = time.time()
        try:
            cell["bpb"] = text_bits_per_byte(model, held_out, ctx, max_bytes=args.bpb_bytes,
                                             batch_size=args.bpb_batch, device=device, bf16=True)
            cell["status"] = "ok"
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            cell.update(bpb=None, status="oom", error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        if cell["status"] == "oom":
            free_memory(device)
        cell["seconds"] = time.time() - t0
        log(f"bits per byte {name} at {fmt_len(ctx)}: {cell['bpb'] if cell['bpb'] is None else round(cell['bpb'], 4)} "
            f"in {cell['seconds']:.1f}s")
        run.add(cell)


def for_long_inputs(model: DNC, ds: dict[str, Any], overrides: dict[str, Any] | None = None) -> DNC:
    """The baseline with one segment spanning every input it will see (its trained segment_len
    would cut attention at the training length; the weights do not depend on it). The DNC as is,
    or with ``overrides`` (``--eval-set``) applied to its config and the same weights."""
    cfg = model.config
    if cfg.memory:
        if not overrides:
            return model
        try:
            return model.reconfigured(**overrides)
        except ValueError as e:  # ConfigError: an invalid value or a change of weight shapes
            raise SystemExit(f"error: --eval-set: {e}\n(only fields such as l0_slots/l1_slots/l2_slots/"
                             f"segment_len/eviction/write_importance can change at evaluation)") from None
    longest = max([L for L in ds["passkey_lengths"] + ds["recall_lengths"] if L <= ds["baseline_max_len"]]
                  + list(ds.get("mqar_lengths", {}).values())
                  + [mqar_min_length(ds["mqar_pairs"]), ds["mqar_len"], ds["bpb_context"], cfg.segment_len])
    new = baseline_config(cfg, longest)
    if new.segment_len == cfg.segment_len:
        return model
    m = DNC(new)
    m.load_state_dict(model.state_dict())
    return m

