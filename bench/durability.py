"""Durability long forms (issue 12): shard kills under writers, Generator kills mid-stream, and a soak.

Starts a local Ray cluster and the Serve app (tiny untrained model, loopback), then runs:

1. **shard kills**: ``--writers`` threads run session turns (each on its own sessions, plus a few
   shared ones) while a killer ``ray.kill``s a random SessionBank shard every ``--kill-interval``
   seconds, ``--shard-kills`` times. Afterwards every acknowledged turn is checked (seq + digest),
   then again after removing every shard actor for good (the client re-resolves them and they
   recover from storage). Target: 0 acknowledged turns lost.
2. **Generator kills mid-stream**: a streamed session turn; after its first token the Generator
   replica is killed. Measures how long until a turn on *that session* succeeds again (the lease
   must end with its holder) and, for reference, until a sessionless request succeeds.
3. **soak**: ``--soak-requests`` requests (sessionless and session turns, with manual and
   background compaction on), ``--soak-clients`` at a time, at most ``--soak-minutes``. Errors by
   status, latency p50/p99 per kind, compactions, and the resident memory of every actor before and
   after.

    python bench/durability.py --tag cpu2                 # the full run (about 15 minutes on 2 CPUs)
    python bench/durability.py --tag quick --shard-kills 5 --generator-kills 1 --soak-requests 100

Writes bench/results/durability_<tag>.json (argv, commit, host, figures) and a markdown table
beside it (durability_<tag>.md).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import random
import shlex
import sys
import tempfile
import threading
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

TEXT = "The cat sat on the mat. The dog ate the bone. Where did the cat sit? On the mat. "


def parse_args(argv=None) -> argparse.Namespace:
    from common import HelpFormatter  # bench/common.py (on sys.path above)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--tag", default=time.strftime("%Y%m%d-%H%M%S"), help="name of the result files")
    p.add_argument("--port", type=int, default=8127)
    p.add_argument("--storage", default=None, help="session storage (default: a new temp dir)")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--writers", type=int, default=4)
    p.add_argument("--shard-kills", type=int, default=100)
    p.add_argument("--kill-interval", type=float, default=1.0, help="seconds between shard kills")
    p.add_argument("--generator-kills", type=int, default=3)
    p.add_argument("--soak-requests", type=int, default=10_000)
    p.add_argument("--soak-clients", type=int, default=4)
    p.add_argument("--soak-minutes", type=float, default=6.0, help="the soak stops here even if short of its count")
    p.add_argument("--memory-interval", type=float, default=60.0, help="seconds between RSS samples during the soak")
    p.add_argument("--session-fraction", type=float, default=0.3, help="share of soak requests that are session turns")
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--out-dir", default=os.path.join(ROOT, "bench", "results"))
    return p.parse_args(argv)


def pct(xs: list[float], q: float) -> float | None:
    """The nearest-rank ``q``-quantile in ms, to 0.1 ms (None for no values)."""
    from common import percentile

    v = percentile(xs, q)
    return None if v is None else round(v, 1)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------ server
def start(args) -> tuple[str, dict[str, Any]]:
    import ray

    from serve.app import run_app

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    storage = args.storage or tempfile.mkdtemp(prefix="dnc-durability-")
    app_args = {"storage": storage, "bank_shards": args.shards, "manager_interval_s": 1.0, "auto_compact": True,
                "compact_idle_s": 1.0, "memory_budget_mb": 0.5, "max_new_tokens": 64, "torch_threads": 1,
                "namespace": "dnc-durability-bench"}
    return run_app(app_args, args.port, name="dnc-durability"), app_args


def actor_memory() -> dict[str, float]:
    """Resident MiB of every live actor on this machine, by class and pid (from the GCS actor
    table, which needs no dashboard, and /proc)."""
    from ray._private.state import actors

    out = {}
    for a in actors(actor_state_name="ALIVE").values():
        pid = a.get("Pid")
        try:
            with open(f"/proc/{pid}/status") as f:
                rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            out[f"{a.get('ActorClassName')}[{pid}]"] = round(rss / 1024, 1)
        except (OSError, StopIteration, TypeError):
            pass
    return out


def gen(client, sid: str | None, prompt: str, n: int = 4, **kw):
    return client.post("/v1/generate", json={"prompt": prompt, "max_new_tokens": n, "state_id": sid,
                                             "temperature": 0.8, **kw})


# ------------------------------------------------------------------------------ 1. shard kills
def shard_kills(url: str, app_args: dict[str, Any], args) -> dict[str, Any]:
    import httpx
    import ray

    from serve.app import AppArgs
    from serve.sessions import BankClient

    cfg = AppArgs(**app_args).bank_config()
    acked: dict[str, tuple[int, str]] = {}  # sid -> (seq, digest) of its newest acknowledged turn
    lock = threading.Lock()
    stop = threading.Event()
    counts = {"acknowledged": 0, "statuses": {}}

    def writer(w: int):
        own = [f"w{w}-s{i}" for i in range(3)]
        shared = [f"shared-{i}" for i in range(2)]
        with httpx.Client(base_url=url, timeout=120) as c:
            while not stop.is_set():
                sid = random.choice(own + shared)
                try:
                    r = gen(c, sid, f"Turn of writer {w}. ", n=3)
                    code = r.status_code
                except httpx.HTTPError as e:
                    code = type(e).__name__
                with lock:
                    counts["statuses"][str(code)] = counts["statuses"].get(str(code), 0) + 1
                    if code == 200:
                        st = r.json()["state"]
                        counts["acknowledged"] += 1
                        if st["seq"] >= acked.get(sid, (-1, ""))[0]:
                            acked[sid] = (st["seq"], st["digest"])

    threads = [threading.Thread(target=writer, args=(w,), daemon=True) for w in range(args.writers)]
    for t in threads:
        t.start()
    kills = 0
    t0 = time.monotonic()
    while kills < args.shard_kills:
        time.sleep(args.kill_interval)
        i = random.randrange(cfg.num_shards)
        try:
            ray.kill(ray.get_actor(cfg.actor_name(i), namespace=cfg.namespace), no_restart=False)
            kills += 1
        except ValueError:
            pass
        if kills % 10 == 0:
            log(f"shard kills {kills}/{args.shard_kills}, acknowledged turns {counts['acknowledged']}")
    stop.set()
    for t in threads:
        t.join(timeout=180)
    elapsed = time.monotonic() - t0

    def check(label: str) -> list[str]:
        lost = []
        with httpx.Client(base_url=url, timeout=120) as c:
            for sid, (seq, dig) in sorted(acked.items()):
                for _ in range(30):
                    r = c.get(f"/v1/state/{sid}")
                    if r.status_code != 503:
                        break
                    time.sleep(1)
                info = r.json() if r.status_code == 200 else {}
                if r.status_code != 200 or info["seq"] < seq or (info["seq"] == seq and info["digest"] != dig):
                    lost.append(f"{sid}: acked seq {seq}, {label} {r.status_code} seq {info.get('seq')}")
        return lost

    lost_live = check("after kills")
    BankClient(cfg).kill_all()  # every shard removed for good: the app's clients must re-resolve them
    lost_restart = check("after removing all shards")
    return {"kills": kills, "writers": args.writers, "seconds": round(elapsed, 1), **counts,
            "sessions": len(acked), "lost_after_kills": lost_live, "lost_after_full_shard_restart": lost_restart}


# ------------------------------------------------------------------------------ 2. generator kills
def generator_kills(url: str, args) -> dict[str, Any]:
    import httpx
    import ray

    rows = []
    for k in range(args.generator_kills):
        sid = f"genkill-{k}"
        with httpx.Client(base_url=url, timeout=120) as c:
            assert gen(c, sid, TEXT, n=2).status_code == 200
            events, killed_at = [], None
            with c.stream("POST", "/v1/generate", json={"prompt": TEXT, "max_new_tokens": 64, "state_id": sid,
                                                        "stream": True}) as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        try:
                            events.append(json.loads(line[5:]).get("type"))
                        except ValueError:
                            events.append(line[5:].strip()[:40])
                        if killed_at is None and events[-1] == "token":
                            names = [a for a in ray.util.list_named_actors(all_namespaces=True)
                                     if "Generator" in a["name"]]
                            for a in names:
                                ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=False)
                            killed_at = time.monotonic()
            t_session = t_plain = None
            deadline = time.monotonic() + 300
            while (t_session is None or t_plain is None) and time.monotonic() < deadline:
                if t_plain is None and gen(c, None, "hello", n=1).status_code == 200:
                    t_plain = time.monotonic() - killed_at
                if t_session is None and gen(c, sid, "again", n=1).status_code == 200:
                    t_session = time.monotonic() - killed_at
                if t_session is None or t_plain is None:
                    time.sleep(0.2)
        row = {"session": sid, "stream_events": events[-3:], "killed": killed_at is not None,
               "session_blocked_s": None if t_session is None else round(t_session, 2),
               "sessionless_blocked_s": None if t_plain is None else round(t_plain, 2)}
        log(f"generator kill {k + 1}: {row}")
        rows.append(row)
    return {"kills": len(rows), "rows": rows,
            "max_session_blocked_s": max((r["session_blocked_s"] or 1e9) for r in rows) if rows else None}


# ------------------------------------------------------------------------------ 3. soak
def shard_stats(app_args: dict[str, Any]) -> list[dict[str, Any]]:
    import asyncio

    from serve.app import AppArgs
    from serve.sessions import BankClient

    return asyncio.run(BankClient(AppArgs(**app_args).bank_config()).stats())


def soak(url: str, app_args: dict[str, Any], args) -> dict[str, Any]:
    import httpx

    lat: dict[str, list[float]] = {"sessionless": [], "session": [], "compact": []}
    statuses: dict[str, int] = {}
    errors: list[str] = []
    lock = threading.Lock()
    done = [0]
    deadline = time.monotonic() + args.soak_minutes * 60
    sessions = [f"soak-{i}" for i in range(16)]

    def one(i: int, c) -> None:
        r_kind = random.random()
        if i % 97 == 0:
            kind, call = "compact", lambda: c.post(f"/v1/state/{random.choice(sessions)}/compact", json={"merge": True})
        elif r_kind < args.session_fraction:
            kind, call = "session", lambda: gen(c, random.choice(sessions), TEXT[: random.randint(20, 80)], n=4)
        else:
            kind, call = "sessionless", lambda: gen(c, None, TEXT[: random.randint(10, 60)], n=4)
        t = time.perf_counter()
        try:
            r = call()
            code = str(r.status_code)
            ok = r.status_code == 200 or (kind == "compact" and r.status_code == 404)
            if not ok and len(errors) < 20:
                errors.append(f"{kind} {r.status_code}: {r.text[:200]}")
        except httpx.HTTPError as e:
            code, ok = type(e).__name__, False
        ms = (time.perf_counter() - t) * 1e3
        with lock:
            statuses[f"{kind}:{code}"] = statuses.get(f"{kind}:{code}", 0) + 1
            if ok:
                lat[kind].append(ms)
            done[0] += 1
            if done[0] % 500 == 0:
                log(f"soak {done[0]}/{args.soak_requests}")

    def client(w: int):
        with httpx.Client(base_url=url, timeout=120) as c:
            i = w
            while i < args.soak_requests and time.monotonic() < deadline:
                one(i, c)
                i += args.soak_clients

    mem_before = actor_memory()
    compactions_before = sum(st.get("compactions", 0) for st in shard_stats(app_args))
    t0 = time.monotonic()
    # resident memory of every actor during the soak, to tell a leak from warm-up: one sample a minute
    timeline: list[dict[str, Any]] = []
    stop = threading.Event()

    def sample_memory() -> None:
        while not stop.wait(args.memory_interval):
            timeline.append({"seconds": round(time.monotonic() - t0, 1), "requests": done[0], "mib": actor_memory()})

    sampler = threading.Thread(target=sample_memory, daemon=True)
    sampler.start()
    with cf.ThreadPoolExecutor(args.soak_clients) as ex:
        list(ex.map(client, range(args.soak_clients)))
    stop.set()
    sampler.join(timeout=30)
    elapsed = time.monotonic() - t0
    mem_after = actor_memory()
    shards = shard_stats(app_args)
    n_err = sum(v for k, v in statuses.items() if not (k.endswith(":200") or k == "compact:404"))
    return {"requests": done[0], "target": args.soak_requests, "seconds": round(elapsed, 1),
            "requests_per_s": round(done[0] / elapsed, 2), "errors": n_err, "statuses": statuses,
            "error_samples": errors,
            "latency_ms": {k: {"n": len(v), "p50": pct(v, 0.5), "p99": pct(v, 0.99)} for k, v in lat.items()},
            "compactions": sum(st.get("compactions", 0) for st in shards) - compactions_before,
            "shard_counters": [{k: st.get(k) for k in ("shard", "sessions", "compactions", "damaged_records",
                                                       "storage_errors", "fenced", "conflicts")} for st in shards],
            "memory_mib_before": mem_before, "memory_mib_after": mem_after, "memory_timeline": timeline}


# ------------------------------------------------------------------------------ report
def args_interval(res: dict[str, Any]) -> str:
    return str(res.get("memory_interval_s", "?"))


def markdown(res: dict[str, Any]) -> str:
    if res.get("benchmark") == "turn_bytes":  # bench/turn_bytes.py (issue 14) owns its table
        from turn_bytes import markdown as turn_bytes_markdown

        return turn_bytes_markdown(res)
    k, g, s = res.get("shard_kills", {}), res.get("generator_kills", {}), res.get("soak", {})
    out = ["| test | figure |", "|---|---|"]
    if k:
        out += [f"| shard kills ({k['writers']} writers, {k['seconds']} s) | {k['kills']} kills, "
                f"{k['acknowledged']} acknowledged turns on {k['sessions']} sessions |",
                f"| acknowledged turns lost | {len(k['lost_after_kills'])} after the kills, "
                f"{len(k['lost_after_full_shard_restart'])} after removing every shard |",
                f"| writer statuses | {k['statuses']} |"]
    if g:
        for r in g["rows"]:
            out.append(f"| Generator killed mid-stream ({r['session']}) | session usable again after "
                       f"{r['session_blocked_s']} s (sessionless after {r['sessionless_blocked_s']} s) |")
    if s:
        out += [f"| soak | {s['requests']} of {s['target']} requests in {s['seconds']} s "
                f"({s['requests_per_s']} req/s), {s['errors']} errors, {s['compactions']} compactions |"]
        for kind, v in s["latency_ms"].items():
            out.append(f"| soak latency {kind} | n={v['n']} p50 {v['p50']} ms, p99 {v['p99']} ms |")
        before, after = s["memory_mib_before"], s["memory_mib_after"]
        line = s.get("memory_timeline") or []
        for name in sorted(set(before) | set(after)):
            during = " -> ".join(str(t["mib"].get(name, "-")) for t in line)
            label = f"before -> each {args_interval(res)} s -> after" if line else "before -> after"
            out.append(f"| RSS {name} ({label}) | {before.get(name, '-')} -> "
                       f"{during + ' -> ' if during else ''}{after.get(name, '-')} MiB |")
    return "\n".join(out)


def main(argv=None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from common import git_commit, write_result  # bench/common.py: $DNC_COMMIT or git

    res: dict[str, Any] = {"benchmark": "durability", "command": shlex.join(["python", "bench/durability.py", *argv]),
                           "argv": argv, "memory_interval_s": args.memory_interval, "commit": git_commit(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                           "host": platform.node(), "cpus": os.cpu_count(), "device": "cpu"}
    url, app_args = start(args)
    res["app_args"] = app_args
    t0 = time.monotonic()
    try:
        if args.shard_kills:
            log("1. shard kills")
            res["shard_kills"] = shard_kills(url, app_args, args)
        if args.generator_kills:
            log("2. Generator kills mid-stream")
            res["generator_kills"] = generator_kills(url, args)
        if args.soak_requests:
            log("3. soak")
            res["soak"] = soak(url, app_args, args)
    finally:
        from serve.app import teardown

        res["wall_s"] = round(time.monotonic() - t0, 1)
        res["markdown"] = markdown(res)
        path = write_result(args.out_dir, f"durability_{args.tag}", res,
                            f"`{res['command']}` (commit {res['commit']}, {res['cpus']} CPUs)")
        print("\n" + res["markdown"])
        log(f"wrote {path}")
        teardown(app_args)
    return res


if __name__ == "__main__":
    main()
