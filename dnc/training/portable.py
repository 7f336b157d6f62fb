"""Portable training checkpoints: a training checkpoint small enough to carry between machines.

A lent GPU machine runs one call of at most 10 minutes, is given back afterwards, and returns at
most 8 files of 16 MiB each. A full training checkpoint of the small preset (28M params) is
~107 MiB of float32 weights plus ~214 MiB of AdamW moments, so it cannot travel. ``pack`` keeps
what a resumed run needs and fits: the weights cast to bfloat16 (~53 MiB for the small preset),
split into parts of at most ``--max-file-mib``, and one ``portable.json`` manifest holding the
checkpoint's ``config.json``, ``extra.json``, ``train_state.json`` (step, schedule, curriculum and
data state), rank 0's RNG, the run's ``metrics.jsonl`` up to the checkpoint's step, and the size
and sha256 of every part. The optimizer state is dropped: :class:`~dnc.training.trainer.Trainer`
resumes such a checkpoint with a fresh AdamW and re-warms the LR over ``warmup_steps``.

``unpack`` verifies every part and writes ``<run_dir>/checkpoints/step_XXXXXXXX/`` in the layout of
:mod:`dnc.training.checkpoint` (float32 ``model.safetensors``, ``config.json``, ``extra.json``,
``train_state.json``, ``rng/rank_00000.pt``), without ``optimizer.pt``.

Examples::

    python -m dnc.training.portable pack runs/long_context/small_cuda/dnc $OUT/dnc
    python -m dnc.training.portable unpack carried/dnc runs/long_context/small_cuda/dnc
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load as st_load, save as st_save

from dnc.checkpoint import CheckpointError
from dnc.training.checkpoint import fs_and_path, latest_checkpoint

FORMAT = "bwr-dnc-portable"
FORMAT_VERSION = 1
MANIFEST = "portable.json"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
MAX_METRICS_BYTES = 8 << 20
"""A longer ``metrics.jsonl`` is left out (the manifest says so): it would swell a file meant to travel."""
MIB = float(1 << 20)


class PortableError(CheckpointError):
    """A portable checkpoint is missing, incomplete or corrupt, or would overwrite a checkpoint."""


def part_name(i: int) -> str:
    return f"weights-{i:02d}.bin"


def _sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


# ==============================================================================================
# pack
# ==============================================================================================
def resolve_training_checkpoint(src: str) -> tuple[str, str | None]:
    """``(checkpoint dir, run dir or None)`` for a ``step_*`` dir or a run dir (its newest
    checkpoint). Raises PortableError when ``src`` holds no training checkpoint."""
    from dnc.checkpoint import resolve_checkpoint

    fs, p = fs_and_path(src)
    if fs.exists(f"{p}/config.json"):
        ckpt, run_dir = src, None
        parent = os.path.dirname(src.rstrip("/"))
        if os.path.basename(parent) == "checkpoints":   # <run>/checkpoints/step_*: the run's metrics travel too
            run_dir = os.path.dirname(parent)
    else:
        ckpt = latest_checkpoint(src)
        if ckpt is None:
            try:
                ckpt = resolve_checkpoint(src)
            except FileNotFoundError:
                raise PortableError(f"{src} is neither a training checkpoint (step_* with config.json) nor a run "
                                    f"dir with checkpoints/step_*") from None
        run_dir = src
    fs, p = fs_and_path(ckpt)
    if not fs.exists(f"{p}/train_state.json") or not fs.exists(f"{p}/model.safetensors"):
        raise PortableError(f"{ckpt} is not a training checkpoint: it needs model.safetensors and train_state.json "
                            f"(a plain model checkpoint carries no step or curriculum state to resume)")
    return ckpt, run_dir


def _read_json(fs, path: str) -> Any:
    with fs.open(path, "r") as f:
        return json.load(f)


def _metrics_upto(run_dir: str | None, step: int) -> tuple[str | None, str]:
    """(the run's ``metrics.jsonl`` rows with ``step <= step``, or None; a note on what was kept)."""
    if run_dir is None:
        return None, "not included: the checkpoint was given outside a run dir"
    fs, p = fs_and_path(run_dir)
    if not fs.exists(f"{p}/metrics.jsonl"):
        return None, f"not included: {run_dir} has no metrics.jsonl"
    keep = []
    with fs.open(f"{p}/metrics.jsonl", "r") as f:
        for line in f:
            try:   # rows after the checkpoint belong to an attempt that resuming discards (MetricsLogger)
                if int(json.loads(line).get("step", 0)) <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except (json.JSONDecodeError, ValueError, AttributeError):
                continue
    text = "".join(keep)
    if len(text.encode()) > MAX_METRICS_BYTES:
        return None, f"not included: {len(text.encode()) / MIB:.1f} MiB is over {MAX_METRICS_BYTES / MIB:.0f} MiB"
    return text, f"{len(keep)} rows with step <= {step} from {run_dir}/metrics.jsonl"


def pack(src: str, out_dir: str, *, max_file_mib: float = 15.0, dtype: str = "bfloat16") -> dict[str, Any]:
    """Write the portable form of training checkpoint ``src`` (a ``step_*`` dir or a run dir: its
    newest checkpoint) to the local folder ``out_dir``: ``weights-NN.bin`` parts of at most
    ``max_file_mib`` MiB (the safetensors bytes of the weights, floating tensors cast to ``dtype``)
    and ``portable.json``, written last. Returns the manifest."""
    if dtype not in DTYPES:
        raise PortableError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    max_bytes = int(max_file_mib * MIB)
    if max_bytes < 1024:
        raise PortableError(f"--max-file-mib must be at least 1 KiB worth, got {max_file_mib}")
    ckpt, run_dir = resolve_training_checkpoint(src)
    fs, p = fs_and_path(ckpt)
    config, train_state = _read_json(fs, f"{p}/config.json"), _read_json(fs, f"{p}/train_state.json")
    extra = _read_json(fs, f"{p}/extra.json") if fs.exists(f"{p}/extra.json") else None
    with fs.open(f"{p}/model.safetensors", "rb") as f:
        tensors = st_load(f.read())
    target = DTYPES[dtype]
    orig_dtypes = {k: _dtype_name(v.dtype) for k, v in tensors.items()}
    cast = {k: (v.to(target) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    blob = st_save(cast, metadata={"format": FORMAT})
    del tensors, cast

    rng: dict[str, Any] | None = None
    rng_note = "rank 0's torch/numpy/python RNG and data-source RNG state"
    rank0 = f"{p}/rng/rank_00000.pt"
    if fs.exists(rank0):
        with fs.open(rank0, "rb") as f:
            raw = f.read()
        rng = {"file": "rng/rank_00000.pt", "bytes": len(raw), "sha256": _sha256(raw),
               "base64": base64.b64encode(raw).decode("ascii")}
        others = [d for d in (fs.ls(f"{p}/rng", detail=False) if fs.exists(f"{p}/rng") else [])
                  if not d.rstrip("/").endswith("rank_00000.pt")]
        if others:
            rng_note += f"; the other {len(others)} ranks' RNG files are dropped (those ranks reseed on resume)"
    else:
        rng_note = "none in the checkpoint: a resumed run reseeds its RNG"
    step = int(train_state.get("step", 0))
    metrics, metrics_note = _metrics_upto(run_dir, step)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = []
    for i, start in enumerate(range(0, len(blob), max_bytes)):
        chunk = blob[start:start + max_bytes]
        (out / part_name(i)).write_bytes(chunk)
        parts.append({"file": part_name(i), "bytes": len(chunk), "sha256": _sha256(chunk)})
    written = {q["file"] for q in parts}
    for stale in out.glob("weights-*.bin"):   # left by an earlier, larger pack into this folder
        if stale.name not in written:
            stale.unlink()
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": ckpt, "step_dir": os.path.basename(ckpt.rstrip("/")), "step": step,
        "dtype": dtype,
        "optimizer": "not included: resuming starts a fresh AdamW and re-warms the LR over warmup_steps",
        "config": config, "extra": extra, "train_state": train_state,
        "rng": rng, "rng_note": rng_note,
        "metrics_jsonl": metrics, "metrics_note": metrics_note,
        "weights": {"bytes": len(blob), "sha256": _sha256(blob), "tensors": len(orig_dtypes),
                    "original_dtypes": orig_dtypes, "max_part_bytes": max_bytes, "parts": parts},
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)   # the manifest last: a reader that finds it finds every part
    return manifest


# ==============================================================================================
# unpack
# ==============================================================================================
def read_manifest(src_dir: str) -> dict[str, Any]:
    path = Path(src_dir) / MANIFEST
    if not path.exists():
        raise PortableError(f"{src_dir} holds no {MANIFEST}: not a portable checkpoint (or the pack was cut short)")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PortableError(f"{path} is corrupt (not valid JSON): {e}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise PortableError(f"{path} is not a portable checkpoint manifest (format is not {FORMAT!r})")
    if m.get("format_version") != FORMAT_VERSION:
        raise PortableError(f"{path} has format version {m.get('format_version')}; this code reads {FORMAT_VERSION}")
    return m


def read_weights(src_dir: str, manifest: dict[str, Any]) -> bytes:
    """The parts joined, each checked against the manifest's size and sha256. Raises PortableError
    naming every missing or corrupt part."""
    w = manifest["weights"]
    chunks, problems = [], []
    for q in w["parts"]:
        f = Path(src_dir) / q["file"]
        if not f.exists():
            problems.append(f"part {q['file']} is missing")
            continue
        b = f.read_bytes()
        if len(b) != q["bytes"]:
            problems.append(f"part {q['file']} is corrupt: {len(b)} bytes, the manifest says {q['bytes']}")
        elif _sha256(b) != q["sha256"]:
            problems.append(f"part {q['file']} is corrupt: its sha256 differs from the manifest's")
        chunks.append(b)
    if problems:
        raise PortableError(f"{src_dir}: " + "; ".join(problems) + f" ({len(w['parts'])} parts listed in {MANIFEST})")
    blob = b"".join(chunks)
    if len(blob) != w["bytes"] or _sha256(blob) != w["sha256"]:
        raise PortableError(f"{src_dir}: the joined parts do not match {MANIFEST}'s total size/sha256")
    return blob


def unpack(src_dir: str, run_dir: str, *, force: bool = False) -> str:
    """Verify the portable checkpoint in ``src_dir`` and write it as
    ``<run_dir>/checkpoints/<step_dir>`` (float32 weights, no ``optimizer.pt``), plus
    ``<run_dir>/metrics.jsonl`` when the pack carried one and the run dir has none. Refuses to
    replace an existing step dir unless ``force``. Returns the step dir."""
    manifest = read_manifest(src_dir)
    blob = read_weights(src_dir, manifest)
    dest = Path(run_dir) / "checkpoints" / manifest["step_dir"]
    if dest.exists() and not force:
        raise PortableError(f"{dest} exists; pass --force to replace it")
    tensors = st_load(blob)
    orig = manifest["weights"]["original_dtypes"]
    if set(orig) != set(tensors):
        raise PortableError(f"{src_dir}: the weights' tensor names differ from {MANIFEST}'s list")
    tensors = {k: v.to(getattr(torch, orig[k])) for k, v in tensors.items()}
    rng = manifest.get("rng")
    raw_rng = base64.b64decode(rng["base64"]) if rng is not None else None
    if rng is not None and (len(raw_rng) != rng["bytes"] or _sha256(raw_rng) != rng["sha256"]):
        raise PortableError(f"{src_dir}: the RNG state in {MANIFEST} is corrupt (size/sha256 differ)")

    # Write beside the destination under a name that is no step_* and rename: neither
    # latest_checkpoint() nor resolve_checkpoint() ever sees half a checkpoint.
    tmp = dest.with_name(".partial-" + dest.name)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "rng").mkdir(parents=True)
        (tmp / "model.safetensors").write_bytes(st_save(tensors, metadata={"format": "bwr-dnc"}))
        if manifest.get("extra") is not None:
            (tmp / "extra.json").write_text(json.dumps(manifest["extra"], indent=2))
        (tmp / "config.json").write_text(json.dumps(manifest["config"], indent=2))
        if rng is not None:
            (tmp / rng["file"]).write_bytes(raw_rng)
        (tmp / "train_state.json").write_text(json.dumps(manifest["train_state"], indent=1))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    metrics_path = Path(run_dir) / "metrics.jsonl"
    if manifest.get("metrics_jsonl") and (force or not metrics_path.exists()):
        metrics_path.write_text(manifest["metrics_jsonl"])
    newest = latest_checkpoint(run_dir)
    if newest is not None and Path(newest).resolve() != dest.resolve():
        print(f"warning: {run_dir} holds a newer checkpoint, {newest}: a resume would continue from that one",
              file=sys.stderr)
    return str(dest)


# ==============================================================================================
# command line
# ==============================================================================================
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dnc.training.portable", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack", help="write a training checkpoint as weight parts + portable.json",
                       description="Write SRC's newest (or given) training checkpoint to OUT_DIR as "
                                   "weights-NN.bin parts and portable.json; no optimizer state.")
    a.add_argument("src", metavar="SRC", help="a step_* checkpoint dir or a run dir (its newest checkpoint)")
    a.add_argument("out_dir", metavar="OUT_DIR", help="local folder for the parts and portable.json")
    a.add_argument("--max-file-mib", type=float, default=15.0, help="largest part in MiB; default 15")
    a.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                   help="dtype of the floating weights in transit (integer tensors stay as they are); "
                        "default bfloat16")
    u = sub.add_parser("unpack", help="verify the parts and write RUN_DIR/checkpoints/step_*",
                       description="Verify every part (size, sha256) and write RUN_DIR/checkpoints/step_XXXXXXXX "
                                   "in the layout the Trainer resumes from, without optimizer.pt. Exit status 2 "
                                   "names a missing or corrupt part.")
    u.add_argument("src_dir", metavar="SRC_DIR", help="folder holding portable.json and the parts")
    u.add_argument("run_dir", metavar="RUN_DIR", help="run dir to resume (e.g. <work-dir>/<tag>/dnc of "
                                                      "bench/long_context.py)")
    u.add_argument("--force", action="store_true", help="replace an existing step dir (and metrics.jsonl)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        if args.cmd == "pack":
            m = pack(args.src, args.out_dir, max_file_mib=args.max_file_mib, dtype=args.dtype)
            w = m["weights"]
            manifest_bytes = (Path(args.out_dir) / MANIFEST).stat().st_size
            for q in w["parts"]:
                print(f"  {Path(args.out_dir) / q['file']}  {q['bytes'] / MIB:.2f} MiB")
            print(f"  {Path(args.out_dir) / MANIFEST}  {manifest_bytes / MIB:.2f} MiB")
            print(f"packed {m['source']} (step {m['step']}, {w['tensors']} tensors as {m['dtype']}, no optimizer "
                  f"state) into {len(w['parts'])} parts + {MANIFEST}: "
                  f"{(w['bytes'] + manifest_bytes) / MIB:.2f} MiB in {time.perf_counter() - t0:.2f} s")
        else:
            dest = unpack(args.src_dir, args.run_dir, force=args.force)
            print(f"unpacked {args.src_dir} into {dest} (float32 weights, no optimizer.pt: resuming re-warms "
                  f"the LR) in {time.perf_counter() - t0:.2f} s")
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
