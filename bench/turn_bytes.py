"""Durable bytes per session turn, before and after issue 14 (token turn records).

Runs session turns through the Generator's real turn path (``serve.sessions.turns.SessionTurns``:
lease, resident state or rebuild, decode with ``dnc.generate.BatchDecoder``, commit) against a real
SessionBank shard on real files (in-process: the bytes do not depend on Ray or on the device), and
counts, per turn, the bytes of the WAL record the shard fsynced before acknowledging it, and the
bytes of session state the turn fetched from the shard.

* ``before``: ``snapshot_every_turns=1`` and no resident states: every turn fetches the full state
  and writes it whole (the behaviour before issue 14, the same code path as the snapshots now);
* ``after``: the configuration given (default ``BankConfig``: token records, a full state every
  ``snapshot_every_turns`` turns, states resident on the replica).

    python bench/turn_bytes.py --preset small --turns 8 --new-tokens 32 --tag small_cpu

Writes bench/results/durability_turn_bytes_<tag>.json (argv, commit, device, per-turn rows) and a
markdown table beside it (``bench/report.py`` renders it with the durability results).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
from common import HelpFormatter, write_result  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--turns", type=int, default=8, help="turns per mode")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per turn")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt tokens per turn")
    p.add_argument("--snapshot-every-turns", type=int, default=None, help="override for the 'after' mode")
    p.add_argument("--torch-threads", type=int, default=2)
    p.add_argument("--tag", default=time.strftime("%Y%m%d-%H%M%S"))
    p.add_argument("--out-dir", default=os.path.join(ROOT, "bench", "results"))
    return p.parse_args(argv)


async def _run_here(fn, *args):
    return fn(*args)


async def run_mode(model, cfg, turns: int, prompt_tokens: int, new_tokens: int) -> list[dict[str, Any]]:
    from dnc.generate import BatchDecoder, DecodeRow, SamplingParams
    from serve.sessions import LocalBankClient, SessionBankShard
    from serve.sessions.turns import SessionTurns

    shard = SessionBankShard(asdict(cfg), 0)
    replica = SessionTurns(model, LocalBankClient(shard), _run_here)
    rows = []
    try:
        for i in range(turns):
            prompt = [(7 * i + k) % 256 for k in range(prompt_tokens)]
            t0 = time.perf_counter()
            t = await replica.begin("bench", "bench", True)
            fetched = len(t.lease["payload"] or b"")
            try:
                row = DecodeRow(prompt, t.state, new_tokens, SamplingParams(0.8), seed=i)
                dec = BatchDecoder(model)
                dec.add([row])
                while dec.running:
                    dec.step()
                tc = time.perf_counter()
                ack = await replica.commit(t, f"bench-{i}", prompt, row.tokens, {"kind": "generate"})
                commit_ms = (time.perf_counter() - tc) * 1e3
            finally:
                await replica.end(t)
            rows.append({"turn": i + 1, "seq": ack["info"]["seq"], "record": ack["record"],
                         "durable_bytes": ack["durable_bytes"], "state_bytes_fetched": fetched,
                         "state_from": t.source, "tokens": prompt_tokens + len(row.tokens),
                         "commit_ms": round(commit_ms, 1), "turn_ms": round((time.perf_counter() - t0) * 1e3, 1)})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        shard.store.close()
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    tok = [r["durable_bytes"] for r in rows if r["record"] == "tokens"]
    full = [r["durable_bytes"] for r in rows if r["record"] == "state"]
    return {"turns": len(rows), "token_records": len(tok), "state_records": len(full),
            "token_record_bytes_max": max(tok) if tok else None,
            "token_record_bytes_mean": round(sum(tok) / len(tok)) if tok else None,
            "state_record_bytes_mean": round(sum(full) / len(full)) if full else None,
            "durable_bytes_mean": round(sum(r["durable_bytes"] for r in rows) / len(rows)),
            "state_bytes_fetched_mean": round(sum(r["state_bytes_fetched"] for r in rows) / len(rows))}


def markdown(res: dict[str, Any]) -> str:
    b, a = res["modes"]["before"]["summary"], res["modes"]["after"]["summary"]

    def kib(n):
        return "-" if n is None else f"{n / 1024:,.1f} KiB"
    out = [f"Durable bytes per {res['new_tokens']}-token session turn ({res['prompt_tokens']}-token prompts), "
           f"preset `{res['preset']}`, {res['turns']} turns per mode:", "",
           "| | before (full state every turn) | after (token records) |", "|---|---:|---:|",
           f"| WAL record per turn, token turns | - | {kib(a['token_record_bytes_mean'])} (max {kib(a['token_record_bytes_max'])}) |",
           f"| WAL record per turn, full state | {kib(b['state_record_bytes_mean'])} | "
           f"{kib(a['state_record_bytes_mean'])} ({a['state_records']} of {a['turns']} turns; every "
           f"{res['modes']['after']['snapshot_every_turns']} turns) |",
           f"| mean durable bytes per turn | {kib(b['durable_bytes_mean'])} | {kib(a['durable_bytes_mean'])} |",
           f"| state fetched from the shard per turn (mean) | {kib(b['state_bytes_fetched_mean'])} | "
           f"{kib(a['state_bytes_fetched_mean'])} |"]
    return "\n".join(out)


def main(argv=None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import torch

    from report import git_commit  # bench/report.py: $DNC_COMMIT or git
    from serve.modeling import ModelSpec, load_model
    from serve.sessions import BankConfig

    torch.set_num_threads(args.torch_threads)
    lm = load_model(ModelSpec(preset=args.preset, seed=0), "cpu")
    res: dict[str, Any] = {"benchmark": "turn_bytes", "command": shlex.join(["python", "bench/turn_bytes.py", *argv]),
                           "argv": argv, "commit": git_commit(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                           "host": platform.node(), "cpus": os.cpu_count(), "device": "cpu", "torch": torch.__version__,
                           "preset": args.preset, "params": lm.model.num_params(), "turns": args.turns,
                           "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens, "modes": {}}
    after = {} if args.snapshot_every_turns is None else {"snapshot_every_turns": args.snapshot_every_turns}
    modes = {"before": {"snapshot_every_turns": 1, "resident_budget_bytes": 0}, "after": after}
    for name, over in modes.items():
        with tempfile.TemporaryDirectory(prefix="dnc-turn-bytes-") as d:
            cfg = BankConfig(storage=d, num_shards=1, model={"preset": args.preset, "seed": 0}, manager_interval_s=0,
                             **over)
            print(f"--- {name}: {over or 'default BankConfig'}", flush=True)
            rows = asyncio.run(run_mode(lm.model, cfg, args.turns, args.prompt_tokens, args.new_tokens))
        res["modes"][name] = {"config": over, "snapshot_every_turns": cfg.snapshot_every_turns,
                              "snapshot_every_tokens": cfg.snapshot_every_tokens,
                              "resident_budget_bytes": cfg.resident_budget_bytes, "rows": rows, "summary": summary(rows)}
    res["markdown"] = markdown(res)
    path = write_result(args.out_dir, f"durability_turn_bytes_{args.tag}", res,
                        f"`{res['command']}` (commit {res['commit']}, CPU)")
    print("\n" + res["markdown"] + f"\n\nwrote {path}")
    return res


if __name__ == "__main__":
    main()
