"""jsonargparse parsers for the ``dnc`` commands: help from docstrings without RST markup, and
argument errors as one line (``error: train.lr: lr must be a positive number, got -1.0``)."""

from __future__ import annotations

import re
from typing import Any

RST_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")
RST_LITERAL = re.compile(r"``([^`]+)``")


def plain(text: str | None) -> str | None:
    """Docstring text as a terminal shows it: ``x`` -> x, :class:`dnc.X` -> dnc.X."""
    if not text:
        return text
    return RST_LITERAL.sub(r"\1", RST_ROLE.sub(r"\1", text))


def new_parser(**kwargs: Any):
    """A jsonargparse ``ArgumentParser`` whose help is cleaned of RST markup and that raises
    ``ArgumentError`` instead of exiting (the caller prints one line)."""
    from jsonargparse import ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)

    class Parser(ArgumentParser):
        def format_help(self) -> str:
            clean_help(self)
            return super().format_help()

    kwargs.setdefault("exit_on_error", False)
    kwargs["description"] = plain(kwargs.get("description"))
    return Parser(**kwargs)


def clean_help(parser: Any) -> None:
    """Strip RST markup from every action's help and group title/description, in place."""
    for action in parser._actions:
        if isinstance(action.help, str):
            action.help = plain(action.help)
    for group in parser._action_groups:
        group.description = plain(group.description)
        group.title = plain(group.title)


def error_line(e: BaseException) -> str:
    """One line for an argument or config error (jsonargparse spreads one over several lines and
    nests the cause: ``Parser key "run.name":\\n  Expected a <class 'str'>``)."""
    text = str(e).strip()
    m = re.match(r'Parser key "([^"]+)":\s*(.*)', text, re.S)
    if m:
        key, rest = m.groups()
        lines = [ln.strip(" -") for ln in rest.splitlines() if ln.strip(" -")]
        # a ConfigError raised by a dataclass's __post_init__ is the most useful line
        why = next((ln for ln in lines if "must" in ln or "unknown" in ln), lines[0] if lines else "")
        return f"{key}: {why}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


class UsageError(ValueError):
    """A command's arguments are wrong; the message says what to use (printed as one line)."""
