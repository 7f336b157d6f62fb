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
     byte on held-out stdlib source at ``--bpb-context``. By default (``--scorer teacher``) each
     sample is read in one teacher-forced forward, a cell's samples batched as rows, in chunks (the
     DNC one segment at a time, so 1M tokens stream through a bounded state; only the logits at
     answer positions are kept, no [T, vocab] logits are ever built): an answer is right when every
     answer token is the argmax before it, which is greedy decoding's verdict. ``--scorer greedy``
     prefills each prompt once, in the same chunks, then decodes the short answer. The baseline
     runs only up to ``--baseline-max-len`` tokens (longer cells are null); an out-of-memory cell
     is recorded as such.
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

This file is the command line and the run's order; ``long_context_train.py`` trains,
``long_context_eval.py`` draws the samples and reads the answers, ``long_context_report.py``
holds the JSON record, its tables, targets and plots.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
from common import HelpFormatter, parse_pairs, stderr_logger  # noqa: E402
from long_context_eval import evaluate, for_long_inputs, mqar_lengths, parse_variants  # noqa: E402
from long_context_report import Run, markdown  # noqa: E402
from long_context_train import (baseline_config, resolve_checkpoint, stdlib_texts, train_config,  # noqa: E402
                                train_one, training_summary)

from dnc.model import DNC  # noqa: E402
from ray_jobs.evaluate import parse_lengths  # noqa: E402  (4k/1M suffixes, as every CLI here)

# bench/needle_probe.py (on main) reads these from here; they live in long_context_eval / common
from common import git_commit  # noqa: E402,F401
from long_context_eval import GreedyReader, answer, draw_samples  # noqa: E402,F401

log = stderr_logger("long_context")


# ==============================================================================================
# Arguments
# ==============================================================================================
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python bench/long_context.py", description=__doc__,
                                formatter_class=HelpFormatter)
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
                   help="continue training in existing run dirs; exits with an error if one has no checkpoint "
                        "(default: start them afresh)")
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
    e.add_argument("--scorer", choices=("teacher", "greedy"), default="teacher",
                   help="teacher: one teacher-forced forward per sample, a cell's samples batched (greedy "
                        "decoding's verdicts, dnc.training.exact_match); greedy: prefill then token-by-token "
                        "decoding per sample (the old path). Default: teacher")
    e.add_argument("--score-rows", type=int, default=64,
                   help="samples per forward pass with --scorer teacher; default 64")
    e.add_argument("--score-batch-tokens", default="1M",
                   help="rows x tokens per forward pass of the memory-less baseline with --scorer teacher (its KV "
                        "cache grows with them; the DNC is not capped); default 1M")
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


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """What the run measures, from the command line: lengths as token counts, depths, sample
    counts, wordings (recorded as the result's ``config``); ValueError for a bad value."""
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
        "scorer": args.scorer, "score_rows": args.score_rows,
        "score_batch_tokens": one_length(args.score_batch_tokens, "--score-batch-tokens"),
        "variants": parse_variants(args.phrasings, args.markers),
    }
    ds["mqar_lengths"] = mqar_lengths(ds)
    if not all(0.0 <= d <= 1.0 for d in ds["depths"]):
        raise ValueError(f"--depths must lie in [0, 1], got {args.depths}")
    if min(args.n, args.n_recall, args.n_mqar, args.prefill_chunk, args.bpb_batch, args.score_rows,
           ds["score_batch_tokens"]) < 1:
        raise ValueError("--n, --n-recall, --n-mqar, --prefill-chunk, --bpb-batch, --score-rows and "
                         "--score-batch-tokens must be >= 1")
    return ds


# ==============================================================================================
# The run
# ==============================================================================================
def prepare_models(run: Run, args: argparse.Namespace, corpus: list[bytes], held_out: bytes) -> dict[str, DNC]:
    """The evaluated models, ``{"dnc": ..., "baseline": ...}`` (no baseline with
    ``--skip-baseline``): each loaded from its given checkpoint or trained here first (on
    ``corpus`` files mixed into the curriculum, evaluated on ``held_out`` text), set up for long
    inputs, on the run's device, with its config and training recorded in ``run.res``."""
    from dnc.checkpoint import load_checkpoint
    from dnc.training import model_config_for

    ds, device = run.ds, run.device
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
    return models


def runs_without_checkpoint(args: argparse.Namespace, tag: str) -> list[str]:
    """The run dirs this invocation would train that hold no checkpoint to resume from."""
    from dnc.training import latest_checkpoint

    work = Path(args.work_dir) / tag
    to_train = ([] if args.checkpoint else ["dnc"]) + ([] if args.skip_baseline or args.baseline_checkpoint
                                                       else ["baseline"])
    return [str(work / n) for n in to_train if latest_checkpoint(str(work / n)) is None]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        ds = settings(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Run(args, argv, device, ds)
    missing = runs_without_checkpoint(args, run.tag) if args.resume else []
    if missing:  # a resume that found nothing would silently train afresh and spend the budget
        print(f"error: --resume: no checkpoint to continue from in {', '.join(missing)} "
              f"(check --tag / --work-dir, or drop --resume to start afresh)", file=sys.stderr)
        return 2
    log(f"results -> {run.json_path}")
    corpus, held_out = stdlib_texts()  # held-out text: training evals and the final bits per byte
    models = prepare_models(run, args, corpus, held_out)
    if args.train_only:
        run.res["status"] = "trained (--train-only)"
        run.render("trained")
        runs = {n: run.res["models"][n]["training"]["run_dir"] or run.res["models"][n]["checkpoint"] for n in models}
        log(f"wrote {run.json_path}; evaluate with --checkpoint {runs['dnc']}"
            + (f" --baseline-checkpoint {runs['baseline']}" if "baseline" in runs else ""))
        return 0

    evaluate(run, models, args, held_out)
    run.res["status"] = "complete"
    run.render("done")
    print(markdown(run.res))
    log(f"wrote {run.json_path} (+ .md, plots)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
