"""The training loop (:class:`Trainer`), shared by Ray Train workers and :func:`fit` (one process, no Ray).

``ray_jobs/worker.py`` runs the same :class:`Trainer` inside Ray Train workers and passes in the
parallelism wrapper (DDP/FSDP, ``dnc.parallel``) and a report callback; :func:`fit` runs it in one
process. Both write the checkpoint layout of :mod:`dnc.training.checkpoint`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dnc.config import DNCConfig
from dnc.parallel import compile_blocks, compile_segments, graph_segments, is_fsdp, unwrap
from dnc.training.checkpoint import (TrainState, capture_rng, fs_and_path, full_model_state,
                                     full_optimizer_state, has_optimizer_state, latest_checkpoint,
                                     load_optimizer_state, load_weights_from, read_optimizer_state,
                                     read_rank_state, read_train_state, restore_rng, save_train_checkpoint)
from dnc.training.config import TrainConfig, model_config_for
from dnc.training.data import TaskSource, corpus_windows
from dnc.training.evaluate import text_bits_per_byte
from dnc.training.exact_match import TeacherForcedScorer
from dnc.training.metrics import MetricsLogger
from dnc.training.optim import LRSchedule, build_optimizer
from dnc.training.step import IGNORE_INDEX, batch_to_device, train_step
from dnc.training.timing import PartClock


ReportFn = Callable[[int, dict[str, float], "str | None"], None]
"""``report(step, metrics, checkpoint_dir_or_None)``: called on every rank at the same steps."""


class InjectedFault(RuntimeError):
    """Raised (or the process exits) by the ``fail_at_step`` test switch."""


class Trainer:
    """The training loop shared by :func:`fit` (one process) and Ray Train workers.

    Distributed-aware through ``torch.distributed`` only: pass ``rank``/``world_size`` and a
    ``parallelize(model) -> model`` that applies DDP or FSDP2. Every rank calls ``report`` at the
    same steps (every ``log_interval`` and at the end), with a local checkpoint directory holding
    this rank's part every ``checkpoint_interval`` steps.
    """

    def __init__(self, cfg: TrainConfig, model_config: DNCConfig, *, run_name: str = "run",
                 device: torch.device | str | None = None, rank: int = 0, world_size: int = 1,
                 parallelize: Callable[[nn.Module], nn.Module] | None = None,
                 resume_from: str | None = None,
                 corpus_batches: Iterator[dict[str, torch.Tensor]] | None = None,
                 eval_text: bytes | None = None,
                 logger: MetricsLogger | None = None,
                 progress: bool = True, progress_factory: Callable[..., Any] | None = None):
        from dnc.model import DNC
        from dnc.tokenizer import get_tokenizer

        self.cfg, self.model_config, self.run_name = cfg, model_config, run_name
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.logger = logger
        self.corpus_batches, self.eval_text = corpus_batches, eval_text
        self.tokenizer = get_tokenizer("byte")
        self._progress_on = progress and rank == 0
        self._progress_factory = progress_factory

        resume_state = read_train_state(resume_from) if resume_from else None
        rank_state = read_rank_state(resume_from, rank) if resume_from else None

        # Model: identical init on every rank (FSDP2 shards each rank's local copy).
        torch.manual_seed(cfg.seed)
        if resume_from:
            from dnc.checkpoint import load_checkpoint

            model, _ = load_checkpoint(resume_from, map_location="cpu")
            if model.config.to_dict() != model_config.to_dict():
                print(f"[dnc.training] resuming with the checkpoint's model config (differs from the requested one)")
                self.model_config = model.config
        else:
            model = DNC(model_config)
            if cfg.init_from:
                used = load_weights_from(model, cfg.init_from)
                if rank == 0:
                    print(f"[dnc.training] fresh run initialised from the weights of {used}")
        model.to(self.device)
        if cfg.compile_target == "blocks":
            compile_blocks(model)
        elif cfg.compile_target == "segment":
            compile_segments(model, mode=cfg.compile_mode, dynamic_batch=cfg.compile_dynamic_batch)
        elif cfg.compile_target == "graphs":
            graph_segments(model)
            model.step_runner.min_segments = cfg.graphs_min_segments  # the length gate (train_step asks it)
        self.model = parallelize(model) if parallelize else model
        self.optimizer = build_optimizer(self.model, cfg)
        self.schedule = LRSchedule(cfg)
        # Pad task batches to a multiple of 64 tokens, not of a segment: a 256-token sample padded
        # to a 2048-token segment would spend 8x the compute on padding.
        self.data = TaskSource(cfg, rank, min(64, self.model_config.segment_len), self.model_config.segment_len) \
            if cfg.corpus_ratio < 1.0 else None
        self.state = TrainState(train_config=cfg.to_dict(), model_config=self.model_config.to_dict(),
                                world_size=world_size, run_name=run_name)
        # Chooses corpus vs task batches. Identical on every rank: Ray Data's streaming split
        # expects all ranks to pull corpus batches in step.
        self.data_rng = np.random.default_rng([cfg.seed, 10_000])
        self.resumed_from_step: int | None = None

        if resume_state is not None:
            self.schedule.load_state_dict(resume_state.schedule)
            if has_optimizer_state(resume_from):
                load_optimizer_state(self.model, self.optimizer, read_optimizer_state(resume_from))
            else:
                # A portable checkpoint (dnc.training.portable) carries no AdamW moments: the fresh
                # optimizer's first updates would be full-LR steps on trained weights, so re-warm.
                self.schedule.rewarm(resume_state.step)
                if rank == 0:
                    how = (f"LR re-warmed over {cfg.warmup_steps} steps from step {resume_state.step}"
                           if cfg.warmup_steps > 0 else "no LR re-warm (warmup_steps is 0)")
                    print(f"[dnc.training] {resume_from} has no optimizer.pt: fresh AdamW, {how}")
            if self.data is not None and resume_state.data.get("source"):
                self.data.load_state_dict(resume_state.data["source"])
            self.state.step, self.state.tokens_seen = resume_state.step, resume_state.tokens_seen
            self.state.elapsed_s, self.state.loss_ema = resume_state.elapsed_s, resume_state.loss_ema
            self.resumed_from_step = resume_state.step
            if resume_state.data.get("mix_rng"):
                self.data_rng.bit_generator.state = resume_state.data["mix_rng"]
            if rank_state is not None:
                restore_rng(rank_state["rng"], self.device)
                if self.data is not None:
                    self.data.load_rng_state(rank_state.get("source", {}))
            elif rank == 0 or world_size > 1:
                print(f"[dnc.training] rank {rank}: no RNG state in the checkpoint "
                      f"(was written by {resume_state.world_size} ranks); data RNG reseeded")
                torch.manual_seed(cfg.seed + 7919 * (rank + 1) + resume_state.step)
                if self.data is not None:
                    self.data.rng = np.random.default_rng([cfg.seed, 1 + rank, resume_state.step])
        self._update_stage_fields()

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self.state.step

    def _update_stage_fields(self) -> None:
        if self.data is not None:
            self.state.data = {"stage": self.data.stage_name, "stage_index": self.data.stage_index,
                               "source": self.data.state_dict()}
        else:
            self.state.data = {"stage": "corpus", "stage_index": -1}
        self.state.data["mix_rng"] = self.data_rng.bit_generator.state

    def _dist(self) -> bool:
        return self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()

    def _all_mean(self, values: dict[str, float]) -> dict[str, float]:
        """Mean over ranks per key (ranks may report different keys, e.g. memory metrics that
        exist only once a bank holds slots; a key's mean is over the ranks that have it)."""
        if not self._dist():
            return values
        acc: dict[str, list[float]] = {}
        for d in self._gather(values):
            for k, v in d.items():
                acc.setdefault(k, []).append(float(v))
        return {k: sum(v) / len(v) for k, v in acc.items()}

    def _gather(self, obj: Any) -> list[Any]:
        if not self._dist():
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def _broadcast(self, obj: Any) -> Any:
        if not self._dist():
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def _pad_to_common_length(self, micro: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """Right-pad every micro-batch to the longest one across ranks (FSDP runs one all-gather
        per unit per segment, so all ranks must run the same number of segments). Padding is
        ``<pad>`` with target -100 after the content: it changes no loss."""
        lens = torch.tensor([b["tokens"].shape[1] for b in micro], dtype=torch.long)
        torch.distributed.all_reduce(lens, op=torch.distributed.ReduceOp.MAX)
        out = []
        for b, T in zip(micro, lens.tolist()):
            extra = T - b["tokens"].shape[1]
            if extra > 0:
                b = dict(b)
                b["tokens"] = F.pad(b["tokens"], (0, extra), value=self.tokenizer.pad_id)
                b["targets"] = F.pad(b["targets"], (0, extra), value=IGNORE_INDEX)
                if b.get("loss_mask") is not None:
                    b["loss_mask"] = F.pad(b["loss_mask"], (0, extra), value=False)
            out.append(b)
        return out

    def _next_batch(self) -> tuple[dict[str, torch.Tensor], list[str] | None]:
        use_corpus = self.corpus_batches is not None and (
            self.data is None or self.data_rng.random() < self.cfg.corpus_ratio)
        if use_corpus:
            return next(self.corpus_batches), None
        return self.data.next_batch()

    def _eval_model(self) -> nn.Module | None:
        """A model rank 0 can run alone: the bare module (plain/DDP) or, under FSDP, an unsharded
        copy (building it is a collective all ranks join). None on other ranks."""
        if not is_fsdp(self.model):
            return unwrap(self.model) if self.rank == 0 else None
        from dnc.model import DNC

        sd = full_model_state(self.model)
        if self.rank != 0:
            return None
        if getattr(self, "_eval_copy", None) is None:
            self._eval_copy = DNC(self.model_config).to(self.device)
        self._eval_copy.load_state_dict(sd)
        return self._eval_copy

    def _maybe_fail(self) -> None:
        cfg = self.cfg
        if cfg.fail_at_step is None or self.step != cfg.fail_at_step:
            return
        fail_rank = cfg.fail_rank if cfg.fail_rank >= 0 else self.world_size - 1
        if self.rank != fail_rank:
            return
        if cfg.fail_marker:
            fs, p = fs_and_path(cfg.fail_marker)
            if fs.exists(p):
                return
            fs.makedirs(os.path.dirname(p) or ".", exist_ok=True)
            with fs.open(p, "w") as f:
                f.write(json.dumps({"step": self.step, "rank": self.rank, "time": time.time()}))
        msg = f"injected fault at step {self.step} on rank {self.rank} (fail_at_step)"
        print(f"[dnc.training] {msg}", flush=True)
        if cfg.fail_mode == "exit":
            os._exit(17)
        raise InjectedFault(msg)

    # -- evaluation --------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Curriculum eval (+ promotion) and corpus bits per byte. Rank 0 evaluates; the result and
        the curriculum state are broadcast so every rank agrees on the stage."""
        m = self._eval_model()
        result: dict[str, Any] = {}
        if self.rank == 0:
            t0 = time.time()
            if self.data is not None:
                # batched teacher forcing: greedy decoding's verdicts at a fraction of its cost
                predict = TeacherForcedScorer(m, self.device, self.cfg.bf16)
                m.eval()
                try:
                    result.update(self.data.assess(predict, self.cfg.eval_samples, self.step))
                finally:
                    m.train()
                result["_source"] = self.data.state_dict()
            if self.eval_text and self.cfg.corpus_eval_bytes:
                ctx = min(self.cfg.max_len, 4 * self.model_config.segment_len)
                result["eval/bpb"] = text_bits_per_byte(m, self.eval_text, ctx, max_bytes=self.cfg.corpus_eval_bytes,
                                                   device=self.device, bf16=self.cfg.bf16)
            result["eval/seconds"] = time.time() - t0
        result = self._broadcast(result)
        src = result.pop("_source", None)
        if src is not None and self.rank != 0:
            self.data.load_state_dict(src)
        if result.get("curriculum/promoted"):
            self.schedule.plateau.reset()
        return result

    # -- checkpoint --------------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Write this rank's part of a checkpoint to ``path`` (collective: all ranks call)."""
        self._update_stage_fields()
        self.state.schedule = self.schedule.state_dict()
        ms = full_model_state(self.model) if is_fsdp(self.model) else None
        osd = full_optimizer_state(self.model, self.optimizer) if (is_fsdp(self.model) or self.rank == 0) else None
        rank_state = {"rng": capture_rng(self.device),
                      "source": self.data.rng_state() if self.data is not None else {}}
        if self.rank == 0:
            bare = unwrap(self.model) if ms is None else None
            save_train_checkpoint(path, rank=0, model=bare, model_config=self.model_config,
                                  model_state=ms if ms is not None else {}, optimizer_state=osd,
                                  state=self.state, rank_state=rank_state)
        else:
            save_train_checkpoint(path, rank=self.rank, model=None, model_config=self.model_config,
                                  model_state=None, optimizer_state=None, state=None, rank_state=rank_state)

    # -- loop --------------------------------------------------------------------------------------
    def run(self, report: ReportFn | None = None) -> dict[str, float]:
        cfg = self.cfg
        stop = cfg.stop_step
        last: dict[str, float] = {}
        if self.step >= stop:
            return dict(self.state.last_metrics)
        bar = self._make_progress(stop)
        # time accounting (TrainConfig.time_accounting): marks charge the time since the previous
        # one to a part; off, they are no-ops and nothing synchronises
        clock = PartClock(self.device) if cfg.time_accounting else None
        mark = clock.mark if clock is not None else (lambda part: None)
        skip = clock.skip if clock is not None else (lambda: None)
        window: dict[str, float] = {}
        pending: dict[str, float] = {}
        n_window = 0
        t_window = time.time()
        attempt_start = time.time()
        tokens_window = 0
        while self.step < stop:
            lr = self.schedule.apply(self.optimizer, self.step)
            skip()
            micro, task_lists = [], []
            for _ in range(cfg.grad_accum):
                b, tasks = self._next_batch()
                micro.append(b)
                task_lists.append(tasks)
            if self._dist() and is_fsdp(self.model):
                micro = self._pad_to_common_length(micro)
            mark("data")
            micro = [batch_to_device(b, self.device) for b in micro]  # train_step's own move is then a no-op
            mark("h2d")
            m = train_step(self.model, micro, self.optimizer, clip=cfg.grad_clip, bf16=cfg.bf16, device=self.device)
            mark("step")
            self.state.step += 1
            losses = m.pop("sample_losses")
            if self.data is not None:
                self._record_task_losses(task_lists, losses)
                mark("record")
            for k, v in m.items():
                if isinstance(v, (int, float)):
                    window[k] = window.get(k, 0.0) + float(v)
            n_window += 1
            tokens_window += m["tokens"]
            ema = self.state.loss_ema
            self.state.loss_ema = m["loss"] if ema is None else 0.9 * ema + 0.1 * m["loss"]
            if bar is not None:
                bar.update(1)
            self._maybe_fail()

            is_last = self.step >= stop
            if cfg.max_minutes is not None and self.step % cfg.log_interval == 0 and not is_last:
                # Every rank must stop at the same step (collectives), so the ranks agree on the clock.
                over = float(time.time() - attempt_start > 60.0 * cfg.max_minutes)
                is_last = self._all_mean({"over": over})["over"] > 0
                stop = self.step if is_last else stop
            metrics = pending   # evaluation results wait for the next log step
            # Evaluate on the interval and at the end of the schedule, not at an early --max-steps
            # stop: evaluation adapts the curriculum, so an extra one would make a stopped-and-resumed
            # run differ from an uninterrupted one.
            if self.step % cfg.eval_interval == 0 or self.step >= cfg.total_steps:
                skip()
                t_eval = time.time()
                metrics.update(self.evaluate())
                if self.schedule.plateau.update(self.state.loss_ema):
                    metrics["lr/plateau_reduced"] = 1.0
                self._update_stage_fields()
                t_window += time.time() - t_eval   # throughput counts training time only
                mark("eval")
            if self.step % cfg.log_interval == 0 or is_last:
                skip()
                avg = {k: v / n_window for k, v in window.items() if k != "tokens"}
                avg = self._all_mean(avg)
                dt = max(1e-9, time.time() - t_window)
                tok = sum(self._gather(tokens_window))
                self.state.tokens_seen += tok
                self.state.elapsed_s += dt
                metrics.update({f"train/{k}" if not k.startswith("mem/") else k: v for k, v in avg.items()})
                metrics.update({"lr": lr, "lr/scale": self.schedule.plateau.scale,
                                "throughput/tokens_per_s": tok / dt,
                                "throughput/tokens_per_s_per_worker": tok / dt / self.world_size,
                                "tokens_seen": float(self.state.tokens_seen), "step": float(self.step),
                                "epoch_time_s": self.state.elapsed_s,
                                "curriculum/stage_index": float(self.state.data.get("stage_index", -1))})
                self.state.last_metrics = {k: v for k, v in metrics.items() if isinstance(v, float)}
                window, n_window, tokens_window, t_window = {}, 0, 0, time.time()
                pending = {}
                mark("log")
                ckpt_dir = None
                if self.step % cfg.checkpoint_interval == 0 or is_last:
                    ckpt_dir = tempfile.mkdtemp(prefix=f"dnc-ckpt-{self.step:06d}-r{self.rank}-")
                    self.save(ckpt_dir)
                    mark("checkpoint")
                if clock is not None:
                    # the interval ends here: what follows (writing this row, the report that
                    # uploads the checkpoint) is charged to the next interval's log / checkpoint
                    metrics.update(clock.take())
                    self.state.last_metrics = {k: v for k, v in metrics.items() if isinstance(v, float)}
                if self.rank == 0 and self.logger is not None:
                    self.logger.log({**metrics, "stage": self.state.data.get("stage", "")}, self.step)
                    if ckpt_dir:
                        self.logger.flush()
                if self.rank == 0 and bar is not None:
                    bar.set_postfix_str(f"loss={metrics.get('train/loss', float('nan')):.3f} "
                                        f"stage={self.state.data.get('stage', '')}")
                mark("log")
                if report is not None:
                    report(self.step, metrics, ckpt_dir)
                if ckpt_dir:
                    shutil.rmtree(ckpt_dir, ignore_errors=True)
                mark("checkpoint" if ckpt_dir else "log")
                last = metrics
        if bar is not None:
            bar.close()
        last = dict(last)
        last["attempt_time_s"] = time.time() - attempt_start
        return last

    def _record_task_losses(self, task_lists: list[list[str] | None], losses: torch.Tensor) -> None:
        tasks: list[str] = []
        vals: list[float] = []
        i = 0
        for tl in task_lists:
            n = self.cfg.batch_size
            if tl is not None:
                tasks.extend(tl)
                vals.extend(losses[i:i + len(tl)].tolist())
                n = len(tl)
            i += n
        gathered = self._gather((tasks, vals))
        all_tasks = [t for ts, _ in gathered for t in ts]
        all_vals = [v for _, vs in gathered for v in vs]
        if all_tasks:
            self.data.record(all_tasks, all_vals, self.step)

    def _make_progress(self, stop: int):
        if not self._progress_on:
            return None
        if self._progress_factory is not None:
            return self._progress_factory(total=stop, initial=self.step, desc=f"train {self.run_name}")
        from tqdm.auto import tqdm

        return tqdm(total=stop, initial=self.step, desc=f"train {self.run_name}", dynamic_ncols=True,
                    mininterval=1.0)


def fit(cfg: TrainConfig, model_config: DNCConfig | None = None, *, run_dir: str = "runs/fit",
        run_name: str | None = None, device: str | None = None, resume: bool = True,
        corpus_texts: Sequence[bytes | str] | None = None, eval_text: bytes | None = None,
        wandb: str = "off", keep_checkpoints: int = 3, progress: bool = True) -> dict[str, float]:
    """Train in this process without Ray. Checkpoints go to ``<run_dir>/checkpoints/step_N``;
    rerunning with the same ``run_dir`` resumes from the newest one. Returns the last metrics."""
    model_config = model_config or model_config_for(cfg)
    run_name = run_name or os.path.basename(run_dir.rstrip("/"))
    resume_from = latest_checkpoint(run_dir) if resume else None
    resume_step = read_train_state(resume_from).step if resume_from else None
    logger = MetricsLogger(run_dir, run_name, {"train": cfg.to_dict(), "model": model_config.to_dict()},
                           wandb=wandb, resume_step=resume_step)
    corpus = corpus_windows(corpus_texts, cfg.max_len, cfg.batch_size, seed=cfg.seed) if corpus_texts else None
    trainer = Trainer(cfg, model_config, run_name=run_name, device=device, resume_from=resume_from,
                      corpus_batches=corpus, eval_text=eval_text, logger=logger, progress=progress)
    fs, p = fs_and_path(run_dir)

    def report(step: int, metrics: dict[str, float], ckpt: str | None) -> None:
        if ckpt is None:
            return
        dest = f"{p}/checkpoints/step_{step:08d}"
        if fs.exists(dest):
            fs.rm(dest, recursive=True)
        fs.put(ckpt.rstrip("/") + "/", dest, recursive=True)
        old = sorted(d for d in fs.ls(f"{p}/checkpoints", detail=False))
        for d in old[:-keep_checkpoints] if keep_checkpoints > 0 else []:
            fs.rm(d, recursive=True)

    try:
        return trainer.run(report)
    finally:
        logger.close()
