"""Curriculum over the synthetic tasks: stages (YAML in ``configs/curriculum/``), adaptive
difficulty inside a stage, loss-weighted task sampling, length-bucketed batches and promotion on
eval accuracy. The whole state is a small JSON-serialisable dict, and restoring it reproduces the
next batches exactly (the sampler's rng state is part of it).

Recurrent memories are hard to train from scratch on long inputs (RMT/ARMT use a curriculum over
the number of segments), so stage lengths are given in *segments* of the model being trained
(``length_unit: segments``): the first stage spans 1.5-4 segments, so its facts sit in earlier
segments than its questions and the memory is needed from the first step on, whatever the
preset's ``segment_len`` (32 tokens for tiny, 2048 for small). Stages may also give plain token
lengths (``length_unit: tokens``, the default).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from dnc.data import phrasings
from dnc.data.filler_text import HELDOUT_FILLERS
from dnc.data.tasks import TASKS, PredictFn, Sample, collate, generate, predict_answer, score

STATE_VERSION = 1


class SampleScorer(Protocol):
    """Scores whole eval sets at once: ``score_samples(samples) -> [bool]`` exact match per sample
    (``dnc.training.exact_match.TeacherForcedScorer`` is one)."""

    def score_samples(self, samples: Sequence[Sample]) -> list[bool]: ...


HELDOUT_PHRASINGS = phrasings.HELDOUT_PHRASINGS
"""``phrasing`` values a training stage may not use (see :mod:`dnc.data.phrasings`)."""


def default_stage_dir() -> Path:
    """``configs/curriculum`` of the repository this package lives in (``dnc/data/../../``)."""
    return Path(__file__).resolve().parents[2] / "configs" / "curriculum"


@dataclass
class Stage:
    """One curriculum stage: which tasks, how long, how hard, and when to move on."""

    name: str
    """Stage name (e.g. ``foundation``); unique within a curriculum."""
    tasks: dict[str, float]
    """Task name (a key of :data:`dnc.data.tasks.TASKS`) -> sampling weight (>= 0, sum > 0)."""
    min_len: float
    """Shortest sample (answer included), in ``length_unit``s."""
    max_len: float
    """Longest sample, in ``length_unit``s."""
    difficulty: tuple[float, float] = (0.0, 1.0)
    """``(low, high)`` range inside ``[0, 1]`` the adaptive difficulty moves in; starts at low."""
    promote_at: float = 0.9
    """Eval exact-match accuracy (mean over the stage's tasks) needed to move to the next stage."""
    min_steps: int = 0
    """Training steps to spend in the stage before promotion is considered."""
    max_steps: int = 0
    """Training steps after which the stage moves on even below ``promote_at`` (0 = never): a
    warm-up stage that teaches one skill should not hold a time-boxed run forever."""
    replay: dict[str, float] = field(default_factory=dict)
    """Earlier stage name -> share of this stage's batches drawn from that stage instead (its tasks,
    lengths and task knobs; the batch size asked for is kept), so a skill taught early is not lost
    while later stages train others: e.g. ``{"local": 0.15}`` keeps facts that share the question's
    segment, which only local attention can read, in 15% of the batches."""
    batch_size: int = 32
    """Batch size hint for trainers (``sample_batch(None)`` uses it)."""
    n_buckets: int = 4
    """Length buckets between ``min_len`` and ``max_len`` (geometric); a batch uses one bucket."""
    order: int = 0
    """Position of the stage when loaded from a directory (ascending, then by name)."""
    task_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Fixed task knobs per task, e.g. ``{"relational": {"hops": 1}}``."""
    description: str = ""
    """Free text for people and the UI."""
    length_unit: str = "tokens"
    """``tokens`` or ``segments`` (multiples of the model's ``segment_len``, resolved to tokens by
    :meth:`in_tokens` when the curriculum is built for a model)."""

    def __post_init__(self) -> None:
        self.difficulty = (float(self.difficulty[0]), float(self.difficulty[1]))
        self.tasks = {str(k): float(v) for k, v in self.tasks.items()}
        self.task_kwargs = {str(k): dict(v or {}) for k, v in (self.task_kwargs or {}).items()}
        self.validate()
        if self.length_unit == "tokens":  # whole numbers (validated): keep them ints for the generators
            self.min_len, self.max_len = int(self.min_len), int(self.max_len)

    def validate(self) -> None:
        where = f"curriculum stage {self.name!r}"
        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown:
            raise ValueError(f"{where}: unknown tasks {unknown}; known: {sorted(TASKS)}")
        unknown_kw = sorted(set(self.task_kwargs) - set(self.tasks))
        if unknown_kw:
            raise ValueError(f"{where}: task_kwargs for tasks not in the stage: {unknown_kw}")
        for t, kw in self.task_kwargs.items():
            held = [f"{k}={kw[k]!r}" for k in ("phrasing", "filler")
                    if kw.get(k) in HELDOUT_PHRASINGS + HELDOUT_FILLERS]
            if held:
                raise ValueError(f"{where}: task_kwargs of {t!r} ask for held-out data ({', '.join(held)}); "
                                 f"held-out phrasings and fillers are for evaluation only: use phrasing "
                                 f"'train' or 'mixed' and filler 'words', 'stdlib' or 'mixed'")
        if any(w < 0 for w in self.tasks.values()) or sum(self.tasks.values()) <= 0:
            raise ValueError(f"{where}: task weights must be >= 0 with a positive sum, "
                             f"got {self.tasks}")
        if self.length_unit not in ("tokens", "segments"):
            raise ValueError(f"{where}: length_unit must be 'tokens' or 'segments', got {self.length_unit!r}")
        if self.length_unit == "tokens" and (self.min_len != int(self.min_len) or self.max_len != int(self.max_len)):
            raise ValueError(f"{where}: token lengths must be whole numbers, got {self.min_len}, {self.max_len}")
        positive = self.min_len >= 1 if self.length_unit == "tokens" else self.min_len > 0
        if not positive or self.min_len > self.max_len:
            raise ValueError(f"{where}: need {'1 <=' if self.length_unit == 'tokens' else '0 <'} min_len "
                             f"<= max_len, got {self.min_len}, {self.max_len}")
        lo, hi = self.difficulty
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"{where}: difficulty must be [low, high] with 0 <= low <= high <= 1, "
                             f"got {list(self.difficulty)}")
        if not 0.0 <= self.promote_at <= 1.0:
            raise ValueError(f"{where}: promote_at must be in [0, 1], got {self.promote_at}")
        if self.min_steps < 0 or self.batch_size < 1 or self.n_buckets < 1:
            raise ValueError(f"{where}: need min_steps >= 0, batch_size >= 1, n_buckets >= 1")
        if self.max_steps < 0 or (self.max_steps and self.max_steps < self.min_steps):
            raise ValueError(f"{where}: max_steps must be 0 (no limit) or >= min_steps ({self.min_steps}), "
                             f"got {self.max_steps}")
        if self.name in self.replay:
            raise ValueError(f"{where}: replay names the stage itself; name earlier stages")
        if any(not 0.0 < w < 1.0 for w in self.replay.values()) or sum(self.replay.values()) >= 1.0:
            raise ValueError(f"{where}: replay shares must be in (0, 1) and sum below 1 (the rest of the "
                             f"batches are the stage's own), got {self.replay}")

    def in_tokens(self, segment_len: int) -> "Stage":
        """This stage with its lengths in tokens (a copy when given in segments)."""
        if self.length_unit == "tokens":
            return self
        if segment_len < 1:
            raise ValueError(f"segment_len must be >= 1, got {segment_len}")
        lo = max(1, round(self.min_len * segment_len))
        return dataclasses.replace(self, min_len=lo, max_len=max(lo, round(self.max_len * segment_len)),
                                   length_unit="tokens")

    def _need_tokens(self) -> None:
        if self.length_unit != "tokens":
            raise ValueError(f"curriculum stage {self.name!r} gives lengths in segments: build the "
                             f"curriculum with segment_len=<the model's segment_len>")

    def check_feasible(self) -> None:
        """Generate every task once at ``min_len`` and the hardest difficulty, so a stage whose
        lengths cannot hold its tasks fails at load time rather than mid-training."""
        self._need_tokens()
        for t in self.active_tasks:
            try:
                generate(t, np.random.default_rng(0), self.min_len, self.difficulty[1],
                         **self.task_kwargs.get(t, {}))
            except ValueError as e:
                raise ValueError(f"curriculum stage {self.name!r}: task {t!r} does not fit "
                                 f"min_len={self.min_len}: {e}") from None

    @property
    def active_tasks(self) -> list[str]:
        """Tasks with a positive weight, in the stage's order."""
        return [t for t, w in self.tasks.items() if w > 0]

    def bucket_edges(self) -> list[tuple[int, int]]:
        """``n_buckets`` inclusive ``(lo, hi)`` token ranges covering ``[min_len, max_len]``,
        geometric so every bucket has about the same relative padding."""
        self._need_tokens()
        n = max(1, min(self.n_buckets, self.max_len - self.min_len + 1))
        edges = np.unique(np.round(np.geomspace(self.min_len, self.max_len + 1, n + 1)).astype(int))
        out = [(int(a), int(b) - 1) for a, b in zip(edges[:-1], edges[1:])]
        out[-1] = (out[-1][0], self.max_len)
        return out

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["difficulty"] = list(self.difficulty)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Stage":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"curriculum stage {d.get('name', '?')!r}: unknown fields {unknown}; "
                             f"known: {sorted(known)}")
        return cls(**dict(d))


def _weights(stage: Stage) -> dict[str, float]:
    """The stage's own task weights, normalised (a replayed stage samples without loss factors)."""
    w = {t: stage.tasks[t] for t in stage.active_tasks}
    total = sum(w.values())
    return {t: x / total for t, x in w.items()}


def load_stages(directory: str | Path | None = None, segment_len: int | None = None) -> list[Stage]:
    """All ``*.yaml`` stages of ``directory`` (default :func:`default_stage_dir`), sorted by
    ``order`` then name; with ``segment_len``, lengths given in segments are resolved to tokens."""
    import yaml

    d = Path(directory) if directory is not None else default_stage_dir()
    files = sorted(d.glob("*.yaml")) + sorted(d.glob("*.yml"))
    if not files:
        raise FileNotFoundError(f"no curriculum stage YAML files in {d}; pass a directory with "
                                f"foundation.yaml etc. or a list of Stage objects")
    stages = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh) or {}
        raw.setdefault("name", f.stem)
        try:
            stages.append(Stage.from_dict(raw))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{f}: {e}") from None
    stages.sort(key=lambda s: (s.order, s.name))
    return [s.in_tokens(segment_len) for s in stages] if segment_len else stages


class Curriculum:
    """Stage progression, adaptive difficulty and batch sampling.

    Typical loop::

        cur = Curriculum(seed=0, pad_to_multiple=64, segment_len=cfg.segment_len)
        for step in range(n):
            batch = cur.sample_batch(32)                 # tensors + batch["tasks"]
            ...                                          # per-task mean losses
            cur.record_losses({"copy": 1.2, ...})
            if step % eval_every == 0:
                acc = cur.evaluate(predict_fn, n_per_task=16)
                cur.adjust_difficulty(acc)
                cur.maybe_promote(sum(acc.values()) / len(acc), step)
    """

    def __init__(self, stages: str | Path | Sequence[Stage] | None = None, *, seed: int = 0,
                 pad_to_multiple: int = 1, loss_ema_decay: float = 0.9, loss_power: float = 1.0,
                 loss_factor_clip: tuple[float, float] = (0.25, 4.0), difficulty_step: float = 0.1,
                 raise_at: float = 0.9, lower_at: float = 0.5, difficulty_jitter: float = 0.05,
                 check: bool = True, segment_len: int | None = None) -> None:
        """
        Args:
            stages: a directory of stage YAMLs (default: the repo's ``configs/curriculum``) or a
                list of :class:`Stage`.
            seed: seed of the sampler's rng (its full state is in ``state_dict``).
            pad_to_multiple: batches are padded to a multiple of this (e.g. 64: few distinct shapes, little padding).
            loss_ema_decay: decay of the per-task loss EMA.
            loss_power: task sampling weight is ``stage weight * (ema / mean ema) ** loss_power``,
                clipped to ``loss_factor_clip``: tasks with the highest recent loss come up more.
            difficulty_step: how far ``adjust_difficulty`` moves a task's difficulty.
            raise_at / lower_at: accuracy at/above which difficulty rises, below which it falls.
            difficulty_jitter: each sample's difficulty is the task's current one +- this
                (uniform, clipped to the stage range), so the model sees a spread.
            check: generate each task once at its stage's ``min_len`` to fail early.
            segment_len: the model's segment length, which resolves stage lengths given in
                segments (required when a stage has ``length_unit: segments``).
        """
        if stages is None or isinstance(stages, (str, Path)):
            self.stages = load_stages(stages)
        else:
            self.stages = [s if isinstance(s, Stage) else Stage.from_dict(s) for s in stages]
        if segment_len:
            self.stages = [s.in_tokens(segment_len) for s in self.stages]
        for s in self.stages:
            s._need_tokens()
        if not self.stages:
            raise ValueError("a curriculum needs at least one stage")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"curriculum stage names must be unique, got {names}")
        for i, s in enumerate(self.stages):
            later = sorted(set(s.replay) - set(names[:i]))
            if later:
                raise ValueError(f"curriculum stage {s.name!r}: replay names {later}, which are not earlier "
                                 f"stages; earlier: {names[:i] or 'none'}")
        if check:
            for s in self.stages:
                s.check_feasible()
        if pad_to_multiple < 1:
            raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
        self.pad_to_multiple = int(pad_to_multiple)
        self.loss_ema_decay = float(loss_ema_decay)
        self.loss_power = float(loss_power)
        self.loss_factor_clip = (float(loss_factor_clip[0]), float(loss_factor_clip[1]))
        self.difficulty_step = float(difficulty_step)
        self.raise_at = float(raise_at)
        self.lower_at = float(lower_at)
        self.difficulty_jitter = float(difficulty_jitter)
        self._rng = np.random.default_rng(seed)
        self.stage_index = 0
        self.stage_start_step = 0
        self.last_step = 0
        self.batches_drawn = 0
        self.loss_ema: dict[str, float] = {}
        self.difficulty: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []
        self._enter_stage(0, step=0)

    # ------------------------------------------------------------------ state
    @property
    def stage(self) -> Stage:
        """The current stage."""
        return self.stages[self.stage_index]

    @property
    def is_last_stage(self) -> bool:
        return self.stage_index == len(self.stages) - 1

    @property
    def steps_in_stage(self) -> int:
        """Steps since the current stage began (as of the last step seen)."""
        return self.last_step - self.stage_start_step

    def _enter_stage(self, index: int, step: int) -> None:
        self.stage_index = index
        self.stage_start_step = int(step)
        lo = self.stage.difficulty[0]
        # Each stage restarts easy: its lengths are longer, so "easy" is already harder.
        self.difficulty = {t: lo for t in self.stage.active_tasks}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state; ``load_state_dict`` of it reproduces the next batches."""
        return {
            "version": STATE_VERSION,
            "stages": [s.name for s in self.stages],
            "stage_index": self.stage_index,
            "stage_start_step": self.stage_start_step,
            "last_step": self.last_step,
            "batches_drawn": self.batches_drawn,
            "difficulty": dict(self.difficulty),
            "loss_ema": dict(self.loss_ema),
            "history": [dict(h) for h in self.history],
            "rng": _jsonable_rng_state(self._rng.bit_generator.state),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"curriculum state version {state.get('version')!r} is not "
                             f"{STATE_VERSION}; it was saved by another release")
        names = [s.name for s in self.stages]
        if list(state["stages"]) != names:
            raise ValueError(f"curriculum state was saved with stages {list(state['stages'])}, "
                             f"this curriculum has {names}; load the same stage files")
        self.stage_index = int(state["stage_index"])
        self.stage_start_step = int(state["stage_start_step"])
        self.last_step = int(state["last_step"])
        self.batches_drawn = int(state["batches_drawn"])
        self.difficulty = {str(k): float(v) for k, v in state["difficulty"].items()}
        self.loss_ema = {str(k): float(v) for k, v in state["loss_ema"].items()}
        self.history = [dict(h) for h in state["history"]]
        bg = self._rng.bit_generator
        rs = dict(state["rng"])
        if rs.get("bit_generator") != type(bg).__name__:
            self._rng = np.random.Generator(getattr(np.random, rs["bit_generator"])())
        self._rng.bit_generator.state = rs

    # ------------------------------------------------------------------ sampling
    def task_probabilities(self) -> dict[str, float]:
        """Current sampling probability per task: stage weight times a loss factor."""
        tasks = self.stage.active_tasks
        w = np.array([self.stage.tasks[t] for t in tasks], dtype=np.float64)
        seen = [self.loss_ema[t] for t in tasks if t in self.loss_ema]
        if seen and self.loss_power != 0:
            mean = float(np.mean(seen))
            lo, hi = self.loss_factor_clip
            f = np.array([
                (self.loss_ema[t] / mean) ** self.loss_power if t in self.loss_ema and mean > 0
                else 1.0 for t in tasks])
            w = w * np.clip(f, lo, hi)
        p = w / w.sum()
        return {t: float(x) for t, x in zip(tasks, p)}

    def sample_batch(self, batch_size: int | None = None,
                     rng: np.random.Generator | None = None) -> dict[str, Any]:
        """A batch from the current stage, all samples from one length bucket.

        Returns :func:`dnc.data.tasks.collate`'s tensors (``tokens``/``targets``/``loss_mask``
        ``[B, T]``, ``lengths``/``answer_start`` ``[B]``, ``T`` a multiple of ``pad_to_multiple``)
        plus ``tasks`` (list[str], per row), ``difficulty`` (list[float]), ``bucket`` (int),
        ``stage`` (str: the stage the batch was drawn from) and ``replay`` (bool: drawn from an
        earlier stage through :attr:`Stage.replay`). With ``rng`` given the curriculum's own rng is left untouched."""
        B = int(batch_size) if batch_size is not None else self.stage.batch_size
        if B < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        r = self._rng if rng is None else rng
        stage, replayed = self.stage, False
        if stage.replay:  # drawn only when set, so curricula without replay sample as before
            u, acc = float(r.random()), 0.0
            for name, share in stage.replay.items():
                acc += share
                if u < acc:
                    stage, replayed = self.stages[[s.name for s in self.stages].index(name)], True
                    break
        buckets = stage.bucket_edges()
        b = int(r.integers(0, len(buckets)))
        lo_len, hi_len = buckets[b]
        probs = self.task_probabilities() if not replayed else _weights(stage)
        names = list(probs)
        picks = r.choice(len(names), size=B, p=np.array([probs[t] for t in names]))
        lengths = r.integers(lo_len, hi_len + 1, size=B)
        jitter = r.uniform(-self.difficulty_jitter, self.difficulty_jitter, size=B)
        d_lo, d_hi = stage.difficulty
        samples: list[Sample] = []
        diffs: list[float] = []
        for i in range(B):
            t = names[int(picks[i])]
            d = float(np.clip(self.difficulty.get(t, d_lo) + jitter[i], d_lo, d_hi))
            samples.append(generate(t, r, int(lengths[i]), d, **stage.task_kwargs.get(t, {})))
            diffs.append(d)
        batch: dict[str, Any] = collate(samples, pad_to_multiple=self.pad_to_multiple)
        batch.update(tasks=[s.task for s in samples], difficulty=diffs, bucket=b, stage=stage.name,
                     replay=replayed)
        if rng is None:
            self.batches_drawn += 1
        return batch

    # ------------------------------------------------------------------ adaptation
    def record_losses(self, task_losses: Mapping[str, float], step: int | None = None) -> None:
        """Fold per-task mean losses (nats/token over answer tokens) into the loss EMA that
        biases task sampling. Non-finite losses are ignored (one bad step must not poison it)."""
        a = self.loss_ema_decay
        for t, v in task_losses.items():
            v = float(v)
            if not math.isfinite(v):
                continue
            self.loss_ema[t] = v if t not in self.loss_ema else a * self.loss_ema[t] + (1 - a) * v
        if step is not None:
            self.last_step = max(self.last_step, int(step))

    def adjust_difficulty(self, acc_by_task: Mapping[str, float]) -> dict[str, float]:
        """Adaptive difficulty inside the stage: a task at accuracy >= ``raise_at`` gets harder by
        ``difficulty_step``, one below ``lower_at`` easier, within the stage's range. Returns the
        new per-task difficulty."""
        lo, hi = self.stage.difficulty
        for t, acc in acc_by_task.items():
            if t not in self.difficulty:
                continue
            d = self.difficulty[t]
            if acc >= self.raise_at:
                d += self.difficulty_step
            elif acc < self.lower_at:
                d -= self.difficulty_step
            self.difficulty[t] = float(min(hi, max(lo, round(d, 6))))
        return dict(self.difficulty)

    def maybe_promote(self, eval_acc: float | Mapping[str, float], step: int) -> bool:
        """Move to the next stage when ``eval_acc`` (a float, or per-task accuracies whose mean is
        taken) reaches the stage's ``promote_at`` after at least ``min_steps`` steps in it, or
        when the stage has run ``max_steps`` steps (if set). Returns True when it promoted; the
        last stage never promotes."""
        if isinstance(eval_acc, Mapping):
            eval_acc = float(np.mean(list(eval_acc.values()))) if eval_acc else 0.0
        self.last_step = max(self.last_step, int(step))
        st = self.stage
        if self.is_last_stage:
            return False
        in_stage = int(step) - self.stage_start_step
        timed_out = bool(st.max_steps) and in_stage >= st.max_steps
        if not timed_out and (eval_acc < st.promote_at or in_stage < st.min_steps):
            return False
        self.history.append({"from": st.name, "to": self.stages[self.stage_index + 1].name,
                             "step": int(step), "eval_acc": float(eval_acc),
                             "reason": "max_steps" if timed_out and eval_acc < st.promote_at else "promote_at"})
        self._enter_stage(self.stage_index + 1, step)
        return True

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, predict_fn: PredictFn | SampleScorer, n_per_task: int = 16,
                 lengths: Sequence[int] | None = None, *, seed: int = 1234,
                 difficulty: float | None = None, tasks: Sequence[str] | None = None,
                 progress: bool = False) -> dict[str, float]:
        """Exact-match accuracy per task on a fixed eval set.

        ``predict_fn`` is either a :class:`SampleScorer` (``score_samples(samples) -> [bool]``,
        e.g. ``dnc.training.exact_match.TeacherForcedScorer``: every sample in batched forward
        passes) or ``predict_fn(prefix_tokens [P] int32, max_new) -> list[int]`` (greedy
        decoding), which answers each sample (one call per answer span, see
        :func:`dnc.data.tasks.predict_answer`). ``n_per_task`` samples per task and length;
        ``lengths`` default to the stage's ``(min_len, max_len)``. The set depends only on
        ``seed``, the stage and the difficulty (default: each task's current one), not on the
        training rng, so evals are comparable."""
        st = self.stage
        lens = list(lengths) if lengths is not None else sorted({st.min_len, st.max_len})
        names = list(tasks) if tasks is not None else st.active_tasks
        rng = np.random.default_rng(seed)
        jobs = [(t, L) for t in names for L in lens for _ in range(n_per_task)]
        # drawn in job order from one rng, before any scoring (scoring draws nothing): the set is
        # the same whichever way it is scored
        samples = []
        for t, L in jobs:
            d = difficulty if difficulty is not None else self.difficulty.get(t, st.difficulty[0])
            samples.append(generate(t, rng, L, d, **st.task_kwargs.get(t, {})))
        scorer = getattr(predict_fn, "score_samples", None)
        if callable(scorer):
            verdicts = [bool(v) for v in scorer(samples)]
        else:
            it: Any = samples
            if progress:
                from tqdm.auto import tqdm

                it = tqdm(samples, desc=f"eval {st.name}", leave=False)
            verdicts = [score(s, predict_answer(s, predict_fn)) for s in it]
        right: dict[str, int] = {t: 0 for t in names}
        total: dict[str, int] = {t: 0 for t in names}
        for (t, _), v in zip(jobs, verdicts):
            right[t] += int(v)
            total[t] += 1
        return {t: right[t] / total[t] for t in names if total[t]}


def _jsonable_rng_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """numpy bit-generator state with numpy scalars/arrays turned into plain Python values
    (PCG64's state is already plain ints; MT19937 holds an array)."""
    out: dict[str, Any] = {}
    for k, v in state.items():
        if isinstance(v, Mapping):
            out[k] = _jsonable_rng_state(v)
        elif isinstance(v, np.ndarray):
            out[k] = v.tolist()
        elif isinstance(v, np.integer):
            out[k] = int(v)
        else:
            out[k] = v
    return out


__all__ = ["Stage", "Curriculum", "SampleScorer", "load_stages", "default_stage_dir", "STATE_VERSION"]
