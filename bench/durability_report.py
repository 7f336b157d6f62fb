"""The table of a ``bench/durability.py`` result (the script's own ``markdown``), with where it ran."""

from __future__ import annotations

TITLE = "Session durability under faults (`bench/durability.py`)"
WHAT = ("Shard kills under concurrent writers (acknowledged turns lost), Generator kills mid-stream "
        "(how long the session stays blocked), and a soak of sessionless and session turns with "
        "background compaction (errors, latency, resident memory of every actor).")


def render(res: dict) -> str:
    """The body of a durability result's entry in ``bench/README.md``."""
    from durability import markdown  # the script's table (stdlib imports only)

    return "\n".join([f"Device: CPU, {res.get('cpus')} cores; commit {res.get('commit') or 'unknown'}", "",
                      markdown(res), ""])
