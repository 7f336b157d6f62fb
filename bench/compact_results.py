"""One-off migration (session 16): rewrite ``bench/results/*.json`` compactly, each figure once.

    python bench/compact_results.py            # rewrite bench/results/*.json in place
    python bench/compact_results.py --check    # say what would change; write nothing

What it does, per file:

- every result: JSON without indentation (bench/common.py's ``write_json`` writes it so since);
- a serve_load result of several rounds (``--proxies``/``--rounds``): its rows were stored twice,
  in ``results`` (tagged with their round and proxy) and in each ``rounds[i].rows``; they stay in
  ``results`` only. ``proxy_summary`` and ``markdown`` go when bench/serve_load_report.py rebuilds
  them from the rows: the summary exactly, the tables with the same figures (:func:`same_figures`:
  session 14's tables differ from today's in one ";" that is now a "."); tables that differ in any
  figure stay. The per-pair samples of ``--paired`` (``paired[mode].rows``) go: no renderer reads
  them; the pair count (``pairs``) and the medians the tables show stay beside them;
- a ``<stem>.md`` its script wrote beside ``<stem>.json`` goes when every number in it is in the
  JSON or its rendering (bench/report.py renders it; ``--full`` for older results) and no tracked
  file outside bench/results, bench/README.md and tests names it (docs name some: those stay).

Lossless for what the renderers read: before writing, each file's README entry (the stored command
and its benchmark module's ``render``) is rendered from the old and the new content and must be
identical (for a serve_load result whose tables it dropped: the same lines and figures), and the
new content must parse back to what was meant; a file that fails either check is left as it was
and named (exit status 1).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
for _p in (str(HERE.parent), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from common import HelpFormatter  # noqa: E402


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def same_figures(a: str, b: str) -> bool:
    """Two renderings with the same lines and, in order, the same numbers (wording may differ)."""
    return a.count("\n") == b.count("\n") and _NUMBER.findall(a) == _NUMBER.findall(b)


def without_pair_samples(paired: Any) -> Any:
    """``paired`` (``{mode: {"pairs": n, "rows": [n samples], medians...}}``) without the samples
    where their count is stored beside them."""
    if not isinstance(paired, dict):
        return paired
    return {m: ({k: x for k, x in v.items() if k != "rows"}
                if isinstance(v, dict) and isinstance(v.get("rows"), list) and v.get("pairs") == len(v["rows"]) else v)
            for m, v in paired.items()}


def compact_serve_load(res: dict[str, Any]) -> dict[str, Any]:
    """A serve_load result with each row once and no per-pair samples (see the module docstring)."""
    res = {**res, "paired": without_pair_samples(res.get("paired"))} if res.get("paired") else res
    if isinstance(res.get("rounds"), list):
        res = {**res, "rounds": [{**r, "paired": without_pair_samples(r.get("paired"))} if isinstance(r, dict) and
                                 r.get("paired") else r for r in res["rounds"]]}
    return _rows_once(res)


def _rows_once(res: dict[str, Any]) -> dict[str, Any]:
    from serve_load_report import proxy_summary, result_markdown, rounds_of

    rounds = res.get("rounds")
    if not isinstance(rounds, list) or not rounds or not all("rows" in r for r in rounds):
        return res
    tagged = [{**r, "proxy": rnd["proxy"], "round": rnd["round"]} for rnd in rounds for r in rnd["rows"]]
    if tagged != res.get("results"):
        return res  # rows that differ between the two copies: keep both, this tool cannot choose
    out = {**res, "rounds": [{k: v for k, v in rnd.items() if k != "rows"} for rnd in rounds]}
    assert rounds_of(out) == rounds  # the rows come back to each round as they were
    if out.get("proxy_summary") is not None and proxy_summary(rounds) == out["proxy_summary"]:
        del out["proxy_summary"]
    base = res.get("in_process") if isinstance(res.get("in_process"), dict) else None
    if out.get("markdown") and same_figures(result_markdown(rounds, base), out["markdown"]):
        del out["markdown"]
    return out


def entry(name: str, res: dict[str, Any]) -> tuple[str | None, str]:
    """What bench/README.md takes from a result: its stored command and its module's render."""
    import report

    bench = report.benchmark_of(name, res)
    if bench is None:
        return None, ""
    return report.stored_command(res, bench), report.renderer(bench).render(res)


def named_elsewhere(root: Path) -> str:
    """The text of the tracked files that may name a result for a reader (everything but
    bench/results, the generated bench/README.md, tests and vendored bundles), to see whether a
    ``.md`` is named."""
    try:
        files = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return ""
    keep = [f for f in files if not f.startswith(("bench/results/", "serve/static/", "ui/vendor/", "tests/"))
            and f != "bench/README.md" and f.endswith((".md", ".py", ".js", ".html", ".toml", ".yaml", ".yml", "Makefile"))]
    return "".join((root / f).read_text(encoding="utf-8", errors="ignore") for f in keep if (root / f).is_file())


def duplicate_md(md: Path, elsewhere: str) -> bool:
    """Whether ``md`` only repeats its JSON: every number in it is in the JSON or its rendering
    (commas aside), and no tracked file outside the results names it."""
    js = md.with_suffix(".json")
    if md.name in elsewhere or not js.is_file():
        return False
    text = js.read_text(encoding="utf-8")
    try:
        res = json.loads(text)
    except json.JSONDecodeError:
        return False
    if not isinstance(res, dict):
        return False
    cmd, body = entry(js.stem, res)
    have = {x.replace(",", "") for x in _NUMBER.findall(f"{cmd or ''}\n{body}\n{text}")}
    return all(x.lstrip("-").replace(",", "") in have or x.replace(",", "") in have
               for x in _NUMBER.findall(md.read_text(encoding="utf-8")))


def migrate(results: Path, write: bool) -> tuple[list[str], list[str], int, int]:
    """``(changed files, refused files, bytes before, bytes after)`` over ``results/*.json``."""
    import report

    changed, refused, before, after = [], [], 0, 0
    for f in sorted(results.glob("*.json")):
        text = f.read_text(encoding="utf-8")
        before += len(text.encode())
        try:
            res = json.loads(text)
        except json.JSONDecodeError:
            refused.append(f"{f.name}: not valid JSON")
            after += len(text.encode())
            continue
        new = res
        if isinstance(res, dict) and report.benchmark_of(f.stem, res) == "serve_load":
            new = compact_serve_load(res)
        new_text = json.dumps(new) + "\n"
        ok = json.loads(new_text) == new
        if ok and isinstance(res, dict):
            (cmd_new, body_new), (cmd_old, body_old) = entry(f.stem, json.loads(new_text)), entry(f.stem, res)
            ok = cmd_new == cmd_old and (body_new == body_old or ("markdown" in res and "markdown" not in new
                                                                  and same_figures(body_new, body_old)))
        if not ok:
            refused.append(f"{f.name}: the compact form renders differently")
            after += len(text.encode())
            continue
        after += len(new_text.encode())
        if new_text != text:
            changed.append(f.name)
            if write:
                f.write_text(new_text, encoding="utf-8")
    return changed, refused, before, after


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--results", default=str(HERE / "results"), help="folder of result JSON files")
    p.add_argument("--check", action="store_true", help="report what would change; write nothing")
    args = p.parse_args(argv)
    results = Path(args.results)
    if not results.is_dir():
        print(f"error: --results {results} is not a folder of result JSON files", file=sys.stderr)
        return 2
    changed, refused, before, after = migrate(results, write=not args.check)
    verb = "would rewrite" if args.check else "rewrote"
    print(f"{verb} {len(changed)} files: {before / 1024:.0f} KiB -> {after / 1024:.0f} KiB over "
          f"{len(list(results.glob('*.json')))} JSON files")
    elsewhere = named_elsewhere(HERE.parent)
    dups = [md for md in sorted(results.glob("*.md")) if md.name != "README.md" and duplicate_md(md, elsewhere)]
    size = sum(md.stat().st_size for md in dups)
    print(f"{'would remove' if args.check else 'removed'} {len(dups)} .md files that repeat their JSON "
          f"({size / 1024:.0f} KiB): {', '.join(md.name for md in dups)}")
    if not args.check:
        for md in dups:
            md.unlink()
    for r in refused:
        print(f"left as it was: {r}", file=sys.stderr)
    return 1 if refused else 0


if __name__ == "__main__":
    raise SystemExit(main())
