"""Long-context accuracy record (issue 5): the DNC against the Transformer baseline, both trained
the same way for the same wall-clock budget, measured far beyond the training length.

One run does three things:
  1. Train (skipped for a model whose checkpoint is given): the ``--preset`` DNC on the curriculum
     of ``configs/train/<preset>.yaml`` (its ``train`` section; ``--max-len``, budget and
     ``--set`` override it), mixed with Python-stdlib source text (``--corpus-ratio``), for
     ``--train-minutes`` of wall time, in this process on one device (``dnc.training.fit``, no Ray).
     Then the baseline with the same config for ``--baseline-minutes``: the same preset with
     memory off and one segment of ``--max-len`` tokens (full causal attention), the convention of
     ``bench/model_speed.py`` (``DNCConfig.baseline``).
  2. Evaluate greedy exact match of both models (same samples for both): passkey retrieval over
     ``--passkey-lengths`` x ``--depths``; two-hop relational recall and kv_retrieval at
     ``--recall-lengths``; MQAR with ``--mqar-pairs`` pairs (per-query and all-correct); bits per
     byte on held-out stdlib source at ``--bpb-context``. Each prompt is prefilled once, in chunks
     (the DNC one segment at a time, so 1M tokens stream through a bounded state; no [T, vocab]
     logits are ever built), then the short answer is decoded. The baseline runs only up to
     ``--baseline-max-len`` tokens (longer cells are null); an out-of-memory cell is recorded as such.
  3. Write ``<out>/long_context_<tag>.json`` after every cell, and ``.md`` + PNG plots after every
     phase, so a run that is cut short keeps what it measured.

Examples:
    # the record on one GPU: 8 + 8 minutes of training, evaluation up to 1M tokens
    python bench/long_context.py --preset small

    # CPU smoke test (about a minute on 2 cores)
    python bench/long_context.py --preset tiny --max-len 256 --train-minutes 0.3 --threads 1 \\
        --passkey-lengths 256,1k --depths 0,0.5,1 --recall-lengths 512 --mqar-len 512 \\
        --n 1 --n-recall 2 --n-mqar 2 --bpb-context 256 --bpb-bytes 16384 --out /tmp/lc

    # the same split into three shorter commands (train, train, evaluate); run dirs or step_* dirs
    python bench/long_context.py --preset small --train-only --skip-baseline
    python bench/long_context.py --preset small --train-only --checkpoint runs/long_context/small_h100/dnc
    python bench/long_context.py --checkpoint runs/long_context/small_h100/dnc \\
        --baseline-checkpoint runs/long_context/small_h100/baseline
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
from report import (fmt_len, git_commit, long_context_markdown, long_context_plots, long_context_targets,  # noqa: E402
                    parse_pairs, passkey_by_length)

from dnc.config import DNCConfig  # noqa: E402
from dnc.data import tasks as task_lib  # noqa: E402
from dnc.model import DNC  # noqa: E402
from ray_jobs.evaluate import parse_lengths  # noqa: E402  (4k/1M suffixes, as every CLI here)

SUITE_SEED = {"passkey": 1, "relational_2hop": 2, "kv_retrieval": 3, "mqar": 4}
"""Per-suite component of the sample seed (samples depend only on seed, suite, length, cell)."""

PHRASINGS = ("template", "train", "heldout")
"""``--phrasings``: the generators' original wording, the phrasings training draws, and the ones it
never sees (``dnc.data.phrasings``)."""
VARIANT_FILLER = {"template": "words", "train": "stdlib", "heldout": "stdlib_heldout"}
"""Filler of each phrasing cell: held-out wording comes with held-out text (stdlib eval modules)."""
BASE_VARIANT = ("template", True)
"""(phrasing, markers) of the original suites: their samples and seeds are unchanged."""


def variant_kwargs(phrasing: str, markers: bool) -> dict[str, Any]:
    """Task keyword arguments of one (phrasing, markers) cell; none for :data:`BASE_VARIANT`."""
    if (phrasing, markers) == BASE_VARIANT:
        return {}
    return {"phrasing": None if phrasing == "template" else phrasing, "markers": markers,
            "filler": VARIANT_FILLER[phrasing]}


def variant_seed(base: list[int], phrasing: str, markers: bool) -> list[int]:
    """The suite's seed list, extended for every variant but the base one (whose samples stay)."""
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


def log(msg: str) -> None:
    print(f"[long_context] {msg}", file=sys.stderr, flush=True)


# ==============================================================================================
# Arguments
# ==============================================================================================
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python bench/long_context.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("training")
    g.add_argument("--preset", default="small", help="model preset (tiny | small | base); default: small")
    g.add_argument("--config", default=None,
                   help="training YAML whose train section is used (default: configs/train/<preset>.yaml if present)")
    g.add_argument("--max-len", default="8192", help="longest training sequence in tokens (k suffix ok); default 8192")
    g.add_argument("--train-minutes", type=float, default=8.0, help="wall-clock budget of DNC training; default 8")
    g.add_argument("--baseline-minutes", type=float, default=None, help="budget of baseline training (default: same)")
    g.add_argument("--max-steps", type=int, default=None, help="also stop each training run after this many steps")
    g.add_argument("--corpus-ratio", type=float, default=0.25,
                   help="fraction of steps on Python-stdlib text instead of curriculum tasks; default 0.25")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TrainConfig field (YAML value), e.g. --set lr=1e-3; repeatable")
    g.add_argument("--model-set", dest="model_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a DNCConfig field of the preset (YAML value), e.g. --model-set segment_len=512; "
                        "repeatable")
    g.add_argument("--checkpoint", default=None, help="DNC run dir or checkpoint dir: skip DNC training")
    g.add_argument("--baseline-checkpoint", default=None, help="baseline run dir or checkpoint dir: skip its training")
    g.add_argument("--skip-baseline", action="store_true", help="no baseline at all")
    g.add_argument("--train-only", action="store_true",
                   help="stop after training (evaluate later with --checkpoint / --baseline-checkpoint)")
    g.add_argument("--resume", action="store_true",
                   help="continue training in existing run dirs (default: start them afresh)")
    g.add_argument("--work-dir", default="runs/long_context", help="run dirs go to <work-dir>/<tag>/{dnc,baseline}")
    e = p.add_argument_group("evaluation")
    e.add_argument("--passkey-lengths", default="4k,16k,64k,256k,1M", help="default 4k,16k,64k,256k,1M")
    e.add_argument("--depths", default=",".join(f"{i / 10:g}" for i in range(11)),
                   help="needle depths in [0, 1]; default 0,0.1,...,1")
    e.add_argument("--n", type=int, default=2, help="passkey samples per depth x length cell; default 2")
    e.add_argument("--decoys", type=int, default=0, help="decoy numbers in each passkey haystack; default 0")
    e.add_argument("--recall-lengths", default="16k,64k", help="lengths of the recall tasks; default 16k,64k")
    e.add_argument("--n-recall", type=int, default=16, help="samples per recall cell; default 16")
    e.add_argument("--recall-difficulty", type=float, default=0.5,
                   help="task difficulty of the recall tasks (kv pairs, distractor people); default 0.5")
    e.add_argument("--mqar-pairs", type=int, default=64, help="MQAR key/value pairs (every key is queried); default 64")
    e.add_argument("--mqar-len", default="512",
                   help="MQAR sample length; raised to the shortest that holds the pairs and queries; default 512")
    e.add_argument("--n-mqar", type=int, default=16, help="MQAR samples; default 16")
    e.add_argument("--bpb-context", default="2048", help="bits-per-byte context (tokens = bytes); default 2048")
    e.add_argument("--bpb-bytes", type=int, default=262144, help="held-out bytes scored; default 262144")
    e.add_argument("--bpb-batch", type=int, default=4, help="windows per forward pass for bits per byte")
    e.add_argument("--baseline-max-len", default="128k", help="longest baseline cell; longer ones are null")
    e.add_argument("--prefill-chunk", type=int, default=4096,
                   help="baseline prefill chunk in tokens (the DNC uses its segment_len); default 4096")
    e.add_argument("--seed", type=int, default=1234, help="sample seed")
    e.add_argument("--phrasings", default="template",
                   help="wordings of the retrieval suites, a comma list of template (the generators' own, the "
                        "headline), train (phrasings and stdlib filler training draws), heldout (phrasings and "
                        "stdlib modules training never sees); e.g. template,heldout. Default: template")
    e.add_argument("--markers", default="on",
                   help="on, off or on,off: with or without the <needle>/<key>/<query> marker tokens; default on")
    e.add_argument("--eval-set", dest="eval_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a DNCConfig field of the evaluated DNC only, one that no weight's shape depends "
                        "on, e.g. --eval-set l0_slots=65536 (a raw level 32 segments deep); repeatable")
    o = p.add_argument_group("output")
    o.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available)")
    o.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is fastest for the tiny preset)")
    o.add_argument("--tag", default=None, help="result name suffix (default: <preset>_<gpu or cpu>)")
    o.add_argument("--out", default=str(HERE / "results"), help="folder of the JSON, markdown and plots")
    return p


def one_length(text: str, what: str) -> int:
    v = parse_lengths(text)
    if len(v) != 1:
        raise ValueError(f"{what} takes one length, got {text!r}")
    return v[0]


def device_tag(device: torch.device) -> str:
    """``h100`` for "NVIDIA H100 80GB HBM3", ``cuda`` for an unrecognised GPU, ``cpu``."""
    if device.type != "cuda":
        return device.type
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", torch.cuda.get_device_name(device))
    return m.group(1).lower() if m else "cuda"


def git_dirty() -> list[str] | None:
    """Tracked files with uncommitted changes (the commit alone does not describe the code then)."""
    if os.environ.get("DNC_COMMIT"):   # a tree exported from that commit: no git state to ask
        return []
    try:
        out = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                      text=True, stderr=subprocess.DEVNULL)
    except Exception:
        return None
    return sorted(line[3:] for line in out.splitlines() if line.strip())


# ==============================================================================================
# Training
# ==============================================================================================
def train_config(args, ds: dict[str, Any]) -> tuple[Any, dict[str, Any], str | None]:
    """TrainConfig from the YAML's train section + this run's overrides; also the YAML's model
    overrides and the YAML path used (None without one)."""
    import yaml

    from dnc.training import TrainConfig

    path = Path(args.config) if args.config else ROOT / "configs" / "train" / f"{args.preset}.yaml"
    section: dict[str, Any] = {}
    model_overrides: dict[str, Any] = {}
    if path.exists():
        raw = yaml.safe_load(path.read_text()) or {}
        section = dict(raw.get("train") or {})
        model_overrides = dict((raw.get("model") or {}).get("overrides") or {})
    elif args.config:
        raise FileNotFoundError(f"--config {path} does not exist")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    section["max_len"] = ds["max_len"]
    section["corpus_ratio"] = args.corpus_ratio
    if args.max_steps:
        section["max_steps"] = args.max_steps
    if "max_minutes" in fields:
        section["max_minutes"] = args.train_minutes
    section.update(parse_pairs("--set", args.overrides))
    model_overrides.update(parse_pairs("--model-set", args.model_overrides))
    return TrainConfig.from_dict(section), model_overrides, str(path) if path.exists() else None


def baseline_config(cfg: DNCConfig, seq_len: int) -> DNCConfig:
    """The Transformer baseline of ``cfg`` covering ``seq_len`` tokens in one segment (rounded up
    so that ``write_pool`` divides it, which config validation requires)."""
    return cfg.baseline(-(-seq_len // cfg.write_pool) * cfg.write_pool)


def stdlib_texts() -> tuple[list[bytes], bytes]:
    """(train files' bytes, held-out files' bytes joined) of the interpreter's standard library."""
    from dnc.data.corpus import stdlib_source_files

    train = [Path(f).read_bytes() for f in stdlib_source_files("train")]
    held = b"".join(Path(f).read_bytes() for f in stdlib_source_files("eval"))
    return train, held


def train_one(label: str, tcfg, mcfg: DNCConfig, run_dir: Path, corpus: list[bytes] | None, eval_text: bytes,
              device: torch.device, resume: bool) -> tuple[str, float]:
    """Run ``dnc.training.fit``; returns (newest checkpoint dir, wall seconds)."""
    from dnc.training import fit, latest_checkpoint

    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)  # this script's own run dir: a fresh run per invocation
    budget = f"{tcfg.max_minutes} min" if getattr(tcfg, "max_minutes", None) else f"{tcfg.stop_step} steps"
    log(f"training {label}: {DNC(mcfg).num_params() / 1e6:.1f}M params, budget {budget}, "
        f"max_len {tcfg.max_len}, corpus_ratio {tcfg.corpus_ratio} -> {run_dir}")
    t0 = time.time()
    fit(tcfg, mcfg, run_dir=str(run_dir), run_name=f"long_context-{label}", device=str(device), resume=resume,
        corpus_texts=corpus if tcfg.corpus_ratio > 0 else None, eval_text=eval_text, wandb="off",
        keep_checkpoints=1, progress=True)
    wall = time.time() - t0
    ckpt = latest_checkpoint(str(run_dir))
    if ckpt is None:
        raise RuntimeError(f"training {label} wrote no checkpoint under {run_dir}/checkpoints")
    return ckpt, wall


def resolve_checkpoint(path: str) -> tuple[str, str | None]:
    """(checkpoint dir, run dir holding metrics.jsonl or None) for a run dir or a checkpoint dir."""
    from dnc.checkpoint import resolve_checkpoint as resolve

    ckpt = resolve(path)
    for cand in (path, os.path.dirname(ckpt.rstrip("/")), os.path.dirname(os.path.dirname(ckpt.rstrip("/")))):
        if os.path.exists(os.path.join(cand, "metrics.jsonl")):
            return ckpt, cand
    return ckpt, None


def training_summary(ckpt: str, run_dir: str | None, wall_s: float | None) -> dict[str, Any]:
    """Steps, time, tokens, final stage (``train_state.json``) and the curriculum evaluations of
    ``metrics.jsonl`` grouped by the stage they evaluated."""
    from dnc.training import read_metrics, read_train_state

    out: dict[str, Any] = {"checkpoint": ckpt, "run_dir": run_dir,
                           "wall_minutes": None if wall_s is None else wall_s / 60}
    if os.path.exists(os.path.join(ckpt, "train_state.json")):
        st = read_train_state(ckpt)
        out.update(steps=st.step, tokens_seen=st.tokens_seen, train_minutes=st.elapsed_s / 60,
                   final_stage=st.data.get("stage"), world_size=st.world_size, train_config=st.train_config)
    rows = read_metrics(run_dir) if run_dir else []
    stages: dict[str, dict[str, Any]] = {}
    for r in rows:
        acc = {k[len("eval/acc/"):]: v for k, v in r.items() if k.startswith("eval/acc/")}
        if not acc:
            continue
        # the row's "stage" is the stage after a promotion; eval/stage_acc/<name> names the evaluated one
        name = next((k[len("eval/stage_acc/"):] for k in r if k.startswith("eval/stage_acc/")), r.get("stage", "?"))
        mean = float(r.get("eval/acc", sum(acc.values()) / len(acc)))
        s = stages.setdefault(name, {"stage": name, "evals": 0, "first_step": r["step"], "best_mean": mean})
        s.update(evals=s["evals"] + 1, last_step=r["step"], last_mean=mean, last_acc=acc,
                 best_mean=max(s["best_mean"], mean))
    out["stages"] = list(stages.values())
    bpb = [r["eval/bpb"] for r in rows if "eval/bpb" in r]
    out["last_eval_bpb"] = bpb[-1] if bpb else None
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    out["last_train_loss"] = losses[-1] if losses else None
    return out


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
# The run
# ==============================================================================================
class Run:
    """Holds the results dict and writes it (JSON after every cell, markdown + plots per phase)."""

    def __init__(self, args, argv: Sequence[str], device: torch.device, ds: dict[str, Any]):
        self.args, self.device, self.ds = args, device, ds
        self.tag = args.tag or f"{args.preset}_{device_tag(device)}"
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.json_path = self.out / f"long_context_{self.tag}.json"
        self.res: dict[str, Any] = {
            "benchmark": "long_context", "format_version": 1, "tag": self.tag,
            "command": shlex.join(["python", "bench/long_context.py", *argv]), "argv": list(argv),
            "env": {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
                    else (platform.processor() or platform.machine() or "cpu"),
                    "device_type": device.type, "torch": torch.__version__, "python": platform.python_version(),
                    "cpus": os.cpu_count(), "commit": git_commit(), "uncommitted": git_dirty()},
            "config": {k: ds[k] for k in ds} | {"preset": args.preset},
            "args": vars(args), "status": "running", "phase": "start",
            "train_config": {}, "models": {}, "notes": [], "cells": [],
        }

    def save(self) -> None:
        self.res["summary"] = {"passkey_by_length": {m: {str(L): v["acc"] for L, v in passkey_by_length(self.res, m).items()}
                                                     for m in self.res["models"]}}
        self.res["targets"] = long_context_targets(self.res)
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.res, indent=1, default=str))
        os.replace(tmp, self.json_path)

    def render(self, phase: str) -> None:
        self.res["phase"] = phase
        self.save()
        (self.out / f"long_context_{self.tag}.md").write_text(long_context_markdown(self.res))
        long_context_plots(self.res, self.out, f"long_context_{self.tag}")

    def add(self, cell: dict[str, Any]) -> None:
        self.res["cells"].append(cell)
        self.save()


def crosses_segment(sample: task_lib.Sample, segment_len: int) -> bool:
    """True when a passkey sample's digits are split between two segments of ``segment_len``."""
    start = sample.meta["needle_pos"]
    return start // segment_len != (start + len(sample.meta["passkey"]) - 1) // segment_len


def run_cells(run: Run, models: dict[str, DNC], readers: dict[str, GreedyReader], suite: str, length: int,
              samples: list[task_lib.Sample], extra: dict[str, Any]) -> None:
    """Evaluate every model on the same ``samples`` and record one cell per model."""
    for name, model in models.items():
        cell: dict[str, Any] = {"suite": suite, "model": name, "length": length, **extra, "n": len(samples)}
        if name == "baseline" and length > run.ds["baseline_max_len"]:
            cell.update(acc=None, status="skipped", reason=f"above --baseline-max-len {run.ds['baseline_max_len']}")
            run.add(cell)
            continue
        t0 = time.time()
        error = None
        try:
            res = [answer(readers[name], s) for s in samples]
        except Exception as e:  # noqa: BLE001 - only out-of-memory is recorded; anything else re-raises
            if not is_oom(e):
                raise
            error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        if error is not None:  # outside the except block: its traceback no longer pins the state
            free_memory(run.device)
            cell.update(acc=None, status="oom", error=error, seconds=time.time() - t0)
            log(f"{suite} {fmt_len(length)} {extra} {name}: out of memory")
            run.add(cell)
            continue
        correct = sum(r[0] for r in res)
        cell.update(correct=correct, acc=correct / len(samples), status="ok", seconds=time.time() - t0)
        if suite == "passkey" and model.config.memory:
            # needles whose digits cross a segment boundary: their second part is written in a
            # segment whose local attention never saw the first (kv_window carries some across)
            cross = [crosses_segment(x, model.config.segment_len) for x in samples]
            cell.update(boundary_n=sum(cross), boundary_correct=sum(r[0] for r, c in zip(res, cross) if c))
        if suite == "mqar":
            q_right, q_total = sum(r[1] for r in res), sum(r[2] for r in res)
            cell.update(queries=q_total, query_correct=q_right, query_acc=q_right / q_total, sample_acc=cell["acc"])
        log(f"{suite} {fmt_len(length)} {' '.join(f'{k}={v}' for k, v in extra.items() if k != 'note')} {name}: "
            f"{correct}/{len(samples)}" + (f" (queries {cell['query_acc']:.1%})" if suite == "mqar" else "")
            + f" in {cell['seconds']:.1f}s")
        run.add(cell)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        ds = {
            "max_len": one_length(args.max_len, "--max-len"),
            "train_minutes": args.train_minutes,
            "baseline_minutes": args.baseline_minutes if args.baseline_minutes is not None else args.train_minutes,
            "corpus_ratio": args.corpus_ratio,
            "passkey_lengths": sorted(parse_lengths(args.passkey_lengths)),
            "depths": sorted(float(d) for d in args.depths.split(",") if d.strip()),
            "n": args.n, "decoys": args.decoys,
            "recall_lengths": sorted(parse_lengths(args.recall_lengths)),
            "n_recall": args.n_recall, "recall_difficulty": args.recall_difficulty,
            "mqar_pairs": args.mqar_pairs, "mqar_len": one_length(args.mqar_len, "--mqar-len"), "n_mqar": args.n_mqar,
            "bpb_context": one_length(args.bpb_context, "--bpb-context"), "bpb_bytes": args.bpb_bytes,
            "baseline_max_len": one_length(args.baseline_max_len, "--baseline-max-len"),
            "prefill_chunk": args.prefill_chunk, "seed": args.seed,
            "variants": parse_variants(args.phrasings, args.markers),
        }
        ds["mqar_lengths"] = mqar_lengths(ds)
        if not all(0.0 <= d <= 1.0 for d in ds["depths"]):
            raise ValueError(f"--depths must lie in [0, 1], got {args.depths}")
        if min(args.n, args.n_recall, args.n_mqar, args.prefill_chunk, args.bpb_batch) < 1:
            raise ValueError("--n, --n-recall, --n-mqar, --prefill-chunk and --bpb-batch must be >= 1")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Run(args, argv, device, ds)
    log(f"results -> {run.json_path}")
    from dnc.checkpoint import load_checkpoint
    from dnc.training import model_config_for, text_bits_per_byte

    # ---------------------------------------------------------------------------------- training
    tcfg, model_overrides, yaml_path = train_config(args, ds)
    eval_overrides = parse_pairs("--eval-set", args.eval_overrides)
    has_budget = hasattr(tcfg, "max_minutes")
    if not has_budget:
        run.res["notes"].append("TrainConfig has no max_minutes here: training ran to max_steps / total_steps.")
        log(f"WARNING: this dnc.training.TrainConfig has no max_minutes; the wall-clock budget is ignored and "
            f"training runs to step {tcfg.stop_step} (use --max-steps)")
    tcfg_base = tcfg.replace(max_minutes=ds["baseline_minutes"]) if has_budget else tcfg
    run.res["train_config"] = {"source": yaml_path, "dnc": tcfg.to_dict(), "baseline": tcfg_base.to_dict()}
    want_base = not args.skip_baseline
    need_training = args.checkpoint is None or (want_base and args.baseline_checkpoint is None)
    corpus, held_out = stdlib_texts()  # held-out text: training evals and the final bits per byte
    if not need_training:
        corpus = []
    work = Path(args.work_dir) / run.tag

    models: dict[str, DNC] = {}

    def register(name: str, ckpt: str, run_dir: str | None, wall: float | None, given: bool) -> None:
        """Load the weights for evaluation and record the model, its training and its train config."""
        m, _ = load_checkpoint(ckpt, map_location="cpu")
        if m.config.memory != (name == "dnc"):
            raise SystemExit(f"error: {ckpt} is {'a memory' if m.config.memory else 'a memory-less'} model; "
                             f"--{'checkpoint' if name == 'dnc' else 'baseline-checkpoint'} needs "
                             f"{'memory on' if name == 'dnc' else 'memory off (the baseline)'}")
        training = training_summary(ckpt, run_dir, wall)
        trained_with = training.pop("train_config", None)
        if given:  # what it was really trained with, not this invocation's settings
            run.res["train_config"][name] = trained_with
            run.res["train_config"].setdefault("from_checkpoint", []).append(name)
        models[name] = for_long_inputs(m, ds, eval_overrides if name == "dnc" else {}).to(device).eval()
        run.res["models"][name] = {"config": m.config.to_dict(), "params": m.num_params(), "checkpoint": ckpt,
                                   "checkpoint_given": given, "training": training,
                                   "eval_segment_len": models[name].config.segment_len,
                                   "eval_config": models[name].config.to_dict()}
        run.render(f"trained {name}")

    if args.checkpoint:
        c, rd = resolve_checkpoint(args.checkpoint)
        register("dnc", c, rd, None, True)
        dnc_cfg = models["dnc"].config
    else:
        dnc_cfg = model_config_for(tcfg, args.preset, **model_overrides)
        c, wall = train_one("dnc", tcfg, dnc_cfg, work / "dnc", corpus, held_out, device, args.resume)
        register("dnc", c, str(work / "dnc"), wall, False)
    if want_base:
        base_cfg = baseline_config(dnc_cfg, tcfg_base.max_len)
        # curriculum stages are given in segments: the baseline trains on the DNC's token lengths
        tcfg_base = tcfg_base.replace(curriculum_segment_len=tcfg_base.curriculum_segment_len or dnc_cfg.segment_len)
        run.res["train_config"]["baseline"] = tcfg_base.to_dict()
        if args.baseline_checkpoint:
            c, rd = resolve_checkpoint(args.baseline_checkpoint)
            register("baseline", c, rd, None, True)
        else:
            c, wall = train_one("baseline", tcfg_base, base_cfg, work / "baseline", corpus, held_out, device,
                                args.resume)
            register("baseline", c, str(work / "baseline"), wall, False)
        if not args.checkpoint and not args.baseline_checkpoint:
            run.res["notes"].append(
                f"The trainer pads curriculum batches to a multiple of segment_len: {dnc_cfg.segment_len} tokens "
                f"per row for the DNC, {base_cfg.segment_len} for the baseline.")
    if args.train_only:
        run.res["status"] = "trained (--train-only)"
        run.render("trained")
        runs = {n: run.res["models"][n]["training"]["run_dir"] or run.res["models"][n]["checkpoint"] for n in models}
        log(f"wrote {run.json_path}; evaluate with --checkpoint {runs['dnc']}"
            + (f" --baseline-checkpoint {runs['baseline']}" if "baseline" in runs else ""))
        return 0
    readers = {n: GreedyReader(m, m.config.segment_len if m.config.memory else ds["prefill_chunk"], device)
               for n, m in models.items()}

    # ---------------------------------------------------------------------------------- passkey
    for ph, mk in ds["variants"]:
        for L in ds["passkey_lengths"]:
            for di, d in enumerate(ds["depths"]):
                seed = variant_seed([args.seed, SUITE_SEED["passkey"], L, di], ph, mk)
                Ls, samples = draw_samples("needle", seed, L, args.n, 0.0, depth=d, n_decoys=args.decoys,
                                           **variant_kwargs(ph, mk))
                run_cells(run, models, readers, "passkey", Ls, samples, {"depth": d, **variant_extra(ph, mk)})
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
            cell["bpb"] = text_bits_per_byte(model, held_out, ctx, max_bytes=args.bpb_bytes, batch_size=args.bpb_batch,
                                        device=device, bf16=True)
            cell["status"] = "ok"
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            cell.update(bpb=None, status="oom", error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        if cell["status"] == "oom":
            free_memory(device)
        cell["seconds"] = time.time() - t0
        log(f"bits per byte {name} at {fmt_len(ctx)}: {cell['bpb'] if cell['bpb'] is None else round(cell['bpb'], 4)}")
        run.add(cell)

    run.res["status"] = "complete"
    run.render("done")
    print(long_context_markdown(run.res))
    log(f"wrote {run.json_path} (+ .md, plots)")
    return 0


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


if __name__ == "__main__":
    raise SystemExit(main())
