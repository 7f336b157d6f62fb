"""Training data for one rank: curriculum task batches (:class:`TaskSource`) and corpus byte windows."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from dnc.config import ConfigError
from dnc.training.config import TrainConfig, resolve_path


class TaskSource:
    """Curriculum batches for one rank: wraps :class:`dnc.data.curriculum.Curriculum`.

    Every rank keeps an identical curriculum: losses from all ranks are gathered before
    ``record``, and the evaluation (rank 0) result is broadcast. Each rank draws its samples from
    its own numpy generator (``sample_batch(rng=...)`` leaves the curriculum's rng untouched), so
    ranks see different data. Stage lengths given in segments become tokens of
    ``TrainConfig.curriculum_segment_len`` or else the model's ``segment_len``; stages whose lengths
    exceed ``TrainConfig.max_len`` are clamped."""

    def __init__(self, cfg: TrainConfig, rank: int, pad_to_multiple: int, segment_len: int):
        from dnc.data.curriculum import Curriculum, load_stages

        self.cfg, self.rank = cfg, rank
        stages = load_stages(resolve_path(cfg.curriculum_dir), segment_len=cfg.curriculum_segment_len or segment_len)
        for st in stages:
            if st.max_len > cfg.max_len:
                st.max_len = cfg.max_len
                st.min_len = min(st.min_len, cfg.max_len)
                st.validate()
        self.curriculum = Curriculum(stages, seed=cfg.seed, pad_to_multiple=pad_to_multiple)
        if cfg.curriculum_start:
            self.enter_stage(cfg.curriculum_start)
        self.rng = np.random.default_rng([cfg.seed, 1 + rank])

    @property
    def stage_names(self) -> list[str]:
        return [st.name for st in self.curriculum.stages]

    def enter_stage(self, name: str) -> None:
        """Move to stage ``name`` as a fresh run starting there would (``curriculum_start``)."""
        names = self.stage_names
        if name not in names:
            raise ConfigError(f"curriculum_start {name!r} is not a stage; stages: {names}")
        self.curriculum._enter_stage(names.index(name), step=0)

    # -- batches ---------------------------------------------------------------------------------
    def batch_size(self) -> int:
        """Sequences per batch in the current stage (``batch_tokens`` / the stage's longest sample,
        at least ``min_batch_rows``)."""
        if self.cfg.batch_tokens is None:
            return self.cfg.batch_size
        return max(self.cfg.min_batch_rows, self.cfg.batch_tokens // self.curriculum.stage.max_len)

    def next_batch(self) -> tuple[dict[str, torch.Tensor], list[str]]:
        b = self.curriculum.sample_batch(self.batch_size(), rng=self.rng)
        tasks = [f"replay/{t}" for t in b["tasks"]] if b["replay"] else list(b["tasks"])
        return {k: b[k] for k in ("tokens", "targets", "loss_mask")}, tasks

    def record(self, tasks: Sequence[str], losses: Sequence[float], step: int) -> None:
        """Per-sample losses of all ranks -> per-task means -> the curriculum's loss EMA."""
        sums: dict[str, list[float]] = {}
        for t, v in zip(tasks, losses):
            if t.startswith("replay/"):  # an earlier stage's batch: its losses must not bias this stage's task mix
                continue
            sums.setdefault(t, []).append(float(v))
        self.curriculum.record_losses({t: sum(v) / len(v) for t, v in sums.items()}, step=step)

    def assess(self, predict: Callable | Any, n: int, step: int) -> dict[str, float]:
        """Exact-match eval of the current stage (its min/max lengths), adaptive difficulty and
        promotion. ``predict``: a ``dnc.training.exact_match.TeacherForcedScorer`` (batched, what
        the trainer uses) or a ``predict(prefix, max_new)`` function such as
        ``greedy_predict_fn(model)`` (token-by-token generation; the same verdicts, slower); see
        ``Curriculum.evaluate``. Returns flat metrics: ``eval/acc`` (mean), ``eval/acc/<task>``,
        ``curriculum/difficulty/<task>``, ``curriculum/promoted``, ``curriculum/stage_index``."""
        stage = self.curriculum.stage.name
        acc = self.curriculum.evaluate(predict, n_per_task=n, seed=self.cfg.seed + 1234)
        mean = float(np.mean(list(acc.values()))) if acc else 0.0
        diff = self.curriculum.adjust_difficulty(acc)
        promoted = self.curriculum.maybe_promote(acc, step)
        out = {"eval/acc": mean, **{f"eval/acc/{t}": float(a) for t, a in acc.items()},
               **{f"curriculum/difficulty/{t}": float(d) for t, d in diff.items()},
               "curriculum/promoted": float(promoted)}
        out["eval/stage_acc/" + stage] = mean
        return out

    # -- state -----------------------------------------------------------------------------------
    @property
    def stage_name(self) -> str:
        return self.curriculum.stage.name

    @property
    def stage_index(self) -> int:
        return int(self.curriculum.stage_index)

    def state_dict(self) -> dict[str, Any]:
        return self.curriculum.state_dict()

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.curriculum.load_state_dict(d)

    def rng_state(self) -> dict[str, Any]:
        return {"task_rng": self.rng.bit_generator.state}

    def load_rng_state(self, d: dict[str, Any]) -> None:
        if "task_rng" in d:
            self.rng.bit_generator.state = d["task_rng"]


def corpus_windows(texts: Iterable[bytes | str], seq_len: int, batch_size: int, *, seed: int = 0,
                   rank: int = 0, world_size: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """Endless LM batches from raw text (no Ray): byte windows of ``seq_len + 1``, shuffled per
    epoch, strided by rank. Yields ``tokens``/``targets`` [B, seq_len]."""
    buf = b"".join(t.encode("utf-8") if isinstance(t, str) else bytes(t) for t in texts)
    ids = torch.frombuffer(bytearray(buf), dtype=torch.uint8).long()
    win = seq_len + 1
    n = len(ids) // win
    if n < batch_size * world_size:
        raise ValueError(f"corpus too small: {len(ids)} bytes make {n} windows of {win}, "
                         f"need >= {batch_size * world_size}")
    windows = ids[: n * win].view(n, win)
    epoch = 0
    while True:
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        order = torch.randperm(n, generator=g)[rank::world_size]
        for i in range(0, len(order) - batch_size + 1, batch_size):
            w = windows[order[i:i + batch_size]]
            yield {"tokens": w[:, :-1].contiguous(), "targets": w[:, 1:].contiguous()}
        epoch += 1


# ==============================================================================================
