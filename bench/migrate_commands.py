"""One-off migration (run on 2026-12-02 over bench/results/): gives every result JSON
written before its script stored its own command a ``command`` and a ``command_source`` (and a
``benchmark`` where it lacked one), so that ``bench/report.py`` reads commands from the results
alone instead of scraping the top-level README at every render.

The command is the one the old report.py showed: ``python <argv>`` where the result stored its
argv; the command documented in README.md's benchmark section whose flags agree with the stored
arguments; else one rebuilt from those arguments. op_counts files get their labels' stored
commands, one line per label.

    git show 1c92e01:bench/report.py > /tmp/old_report.py   # the report.py that scraped README.md
    python bench/migrate_commands.py /tmp/old_report.py [RESULTS_DIR]

Results that already hold a ``command`` are left as they are, so running it again only touches
files added since by a script that did not store its command yet. Delete this file once no such
script is left.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def indent_of(text: str) -> int | None:
    """The indent the file was written with (1 or 2 spaces; None: compact, one line, as
    bench/common.py's write_json writes since session 16), so a rewrite changes only new keys."""
    if text.rstrip("\n").count("\n") == 0:
        return None
    second = text.split("\n", 2)[1]
    return len(second) - len(second.lstrip(" ")) or 1


def migrate(old_report, results: Path) -> list[str]:
    documented = old_report.readme_commands(HERE.parent / "README.md")
    changed = []
    for f in sorted(results.glob("*.json")):
        text = f.read_text(encoding="utf-8")
        res = json.loads(text)
        if not isinstance(res, dict) or res.get("command"):
            continue
        kind = old_report._kind(f.stem, res)
        add: dict = {}
        if "benchmark" not in res:
            add["benchmark"] = kind
        if kind == "op_counts":
            labels = [v for v in res.values() if isinstance(v, dict) and v.get("command")]
            add["command"] = "\n".join(v["command"] for v in labels)
            add["command_source"] = "stored in the result, one run per label"
        elif res.get("argv"):  # stored with the script's path first
            add["command"] = "python " + " ".join(res["argv"])
            add["command_source"] = "stored in the result"
        else:
            spec = old_report.KINDS[kind]
            args = spec["args"](res)
            flags = old_report.script_flags(HERE / f"{kind}.py")
            cmd = next((c for c in documented.get(kind, []) if old_report.command_agrees(c, args, flags)), None)
            if cmd is not None:
                add["command"], add["command_source"] = cmd, "documented in README.md"
            else:
                add["command"] = old_report.rebuild_command(kind, args, flags)
                add["command_source"] = "rebuilt from the arguments stored in the result"
        new = {**{k: add[k] for k in ("benchmark",) if k in add}, **res,
               **{k: v for k, v in add.items() if k != "benchmark"}}
        f.write_text(json.dumps(new, indent=indent_of(text)) + ("\n" if text.endswith("\n") else ""), encoding="utf-8")
        changed.append(f"{f.name}: {add.get('command_source')}")
    return changed


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old_report", help="path of the old report.py (git show 1c92e01:bench/report.py > FILE)")
    ap.add_argument("results", nargs="?", default=str(HERE / "results"),
                    help="folder of result JSON files to migrate (default: %(default)s)")
    a = ap.parse_args(argv)
    spec = importlib.util.spec_from_file_location("old_report", a.old_report)
    if spec is None or spec.loader is None:  # not a .py file: a traceback would not say which argument
        ap.error(f"old_report must be a Python file, got {a.old_report!r}")
    old_report = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(HERE))
    spec.loader.exec_module(old_report)
    for line in migrate(old_report, Path(a.results)):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
