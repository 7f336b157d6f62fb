"""Many ways to state a fact and to ask for it back, split deterministically into phrasings used in
training and phrasings kept out of it (``split="train"`` / ``"heldout"``), so an evaluation can tell
retrieval that generalises from matching one template.

Users hide facts in their own text (prose, code comments, log lines, dialogue, config files) and ask
in their own words. Each retrieval task draws its wording from here (``phrasing="train"`` or
``"heldout"`` in :mod:`dnc.data.tasks`); ``phrasing=None`` keeps the original single template.

Pieces (``{v}`` the value, ``{s}`` a subject such as "access code", ``{S}`` its identifier form
``ACCESS_CODE``, ``{i}`` its lower identifier ``access_code``):

- needle: :data:`NEEDLE_SUBJECTS` x :data:`NEEDLE_FACTS` x :data:`NEEDLE_QUESTIONS`; the question
  text ends where the answer (the passkey) begins.
- kv_retrieval / mqar: :data:`PAIR_FACTS` (``{k}`` key, ``{v}`` value) and :data:`PAIR_QUESTIONS`.
- relational: :data:`RELATION_FACTS` (``{p}`` parent, ``{c}`` child) and
  :data:`RELATION_QUESTIONS` (``{rel}`` parent/grandparent/..., ``{x}`` the person asked about).

Every list is one table of ``(text, split)`` rows: the split is written next to each template (not
derived from a hash), so a reader sees at once which wordings training never meets. A held-out
needle is held-out in all three parts (subject, fact frame and question frame), so none of its
wording was seen in training.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

SPLITS = ("train", "heldout")
"""Phrasing splits: ``train`` reaches training data, ``heldout`` only evaluation."""

T, H = "train", "heldout"

NEEDLE_SUBJECTS: tuple[tuple[str, str], ...] = (
    ("pass key", T), ("access code", T), ("secret number", T), ("door code", T), ("PIN", T),
    ("locker combination", T), ("vault code", T), ("magic number", T), ("verification code", T),
    ("room code", T), ("ticket number", T), ("account number", T),
    ("safe combination", H), ("unlock code", H), ("backup PIN", H), ("confirmation number", H),
    ("alarm code", H), ("routing number", H),
)
"""What the hidden number is called. Held-out subjects appear in no training fact or question."""

NEEDLE_FACTS: tuple[tuple[str, str], ...] = (
    ("the {s} is {v}. ", T),
    ("# NOTE: the {s} is {v}\n", T),
    ("[INFO] {s} set to {v}\n", T),
    ("Remember {v}: it is the {s}. ", T),
    ("Alice: what's the {s}?\nBob: it's {v}.\n", T),
    ("// {s}: {v}\n", T),
    ("{S} = {v}  # do not share\n", T),
    ("By the way, the {s} you asked for is {v}. ", T),
    ("Please note that the {s} has been changed to {v}. ", T),
    ('"{i}": "{v}",\n', T),
    ("2024-05-01 12:00:03 INFO {i}={v}\n", T),
    ("The {s}, if anyone asks, is {v}. ", T),
    ("Don't forget, {v} is the {s}. ", H),
    ("/* the {s} was updated to {v} */\n", H),
    ("WARN: {i} -> {v}\n", H),
    ("- {s}: {v}\n", H),
    ("I wrote the {s} down as {v} so we would not lose it. ", H),
    ("{i}: int = {v}  # keep this\n", H),
)
"""Fact frames of the passkey task (prose, comment, log line, dialogue, config, code)."""

NEEDLE_QUESTIONS: tuple[tuple[str, str], ...] = (
    ("what is the {s}? ", T),
    ("Q: what was the {s}?\nA: ", T),
    ("the {s} was ", T),
    ("The {s} is ", T),
    ("Recall the {s}: ", T),
    ("{S} == ", T),
    ("Answer with the {s}: ", T),
    ("Tell me the {s}. It is ", H),
    ("So the {s} you need is ", H),
    ("print({i})  # -> ", H),
    ("Which number was the {s}? ", H),
)
"""Question frames of the passkey task; the answer (the number) follows the text directly."""

PAIR_FACTS: tuple[tuple[str, str], ...] = (
    ("{k}={v} ", T), ("{k}: {v}\n", T), ("set {k} to {v}. ", T), ("{k} -> {v}, ", T),
    ("{k} is {v}; ", T), ("[{k}] {v}\n", T),
    ("let {k} = {v}\n", H), ("{k} holds {v}. ", H), ("{k} maps to {v} ", H),
)
"""Key/value pair frames of kv_retrieval and mqar (``{k}`` the letters, ``{v}`` the digits)."""

PAIR_QUESTIONS: tuple[tuple[str, str], ...] = (
    ("{k}=", T), ("what is {k}? ", T), ("{k} -> ", T), ("value of {k}: ", T),
    ("{k} was ", H), ("and {k} gives ", H),
)
"""Key questions of kv_retrieval and mqar; the value follows the text directly."""

RELATION_FACTS: tuple[tuple[str, str], ...] = (
    ("{p} is the parent of {c}. ", T),
    ("{c}'s parent is {p}. ", T),
    ("{c} is a child of {p}. ", T),
    ("# {c}.parent = {p}\n", T),
    ("[family] {c} -> parent {p}\n", T),
    ("{p} is {c}'s mother. ", H),
    ("{c} was born to {p}. ", H),
    ("// parent of {c}: {p}\n", H),
)
"""Parent facts of the relational task (``{p}`` parent, ``{c}`` child)."""

RELATION_QUESTIONS: tuple[tuple[str, str], ...] = (
    ("who is the {rel} of {x}? ", T),
    ("{x}'s {rel} is ", T),
    ("Q: name the {rel} of {x}.\nA: ", T),
    ("Tell me who {x}'s {rel} is: ", H),
    ("the {rel} of {x} is called ", H),
)
"""Questions of the relational task (``{rel}`` parent / grandparent / great-grandparent)."""


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"phrasing must be one of {SPLITS} (or None for the original template), "
                         f"got {split!r}")
    return split


def of_split(table: tuple[tuple[str, str], ...], split: str) -> tuple[str, ...]:
    """The templates of ``table`` in ``split``."""
    check_split(split)
    return tuple(text for text, s in table if s == split)


def identifier(subject: str) -> str:
    """``"access code"`` -> ``"access_code"`` (a code identifier for the subject)."""
    return re.sub(r"\W+", "_", subject.strip()).lower()


@dataclass(frozen=True)
class NeedlePhrasing:
    """One way to hide a passkey and ask for it."""

    subject: str
    fact: str
    question: str
    split: str

    def _fill(self, template: str, subject: str, value: str = "") -> str:
        i = identifier(subject)
        return template.format(s=subject, S=i.upper(), i=i, v=value)

    def fact_text(self, value: str, subject: str | None = None) -> str:
        """The fact with ``value`` (and ``subject``, default this phrasing's own)."""
        return self._fill(self.fact, subject or self.subject, value)

    def question_text(self) -> str:
        """The question; the answer follows it directly."""
        return self._fill(self.question, self.subject)


NEEDLE_PARTS = ("subject", "fact", "question")
"""The three parts of a needle's wording, each with its own train / held-out table."""

ECHO = "echo"
"""Question "split" of :data:`PART_PHRASINGS`: the question is the fact's own text up to its value
("# NOTE: the {s} is " for "# NOTE: the {s} is {v}\n"), as the original template's question is, so
the answer can be copied on from the words before it (an induction step) without matching the subject
across two different frames."""

PART_PHRASINGS: dict[str, tuple[str, str, str]] = {
    "heldout_subject": (H, T, T), "heldout_fact": (T, H, T), "heldout_question": (T, T, H),
    "heldout_frames": (T, H, H), "train_echo": (T, T, ECHO), "heldout_echo": (H, H, ECHO),
}
"""Needle wordings mixed part by part (the split of subject, fact frame, question frame), for
evaluations that ask which part a model fails on (``bench/heldout_parts.py``). Those with a held-out
part are refused in training (:data:`HELDOUT_PHRASINGS`)."""

HELDOUT_PHRASINGS = (H,) + tuple(k for k, v in PART_PHRASINGS.items() if H in v)
"""``phrasing`` values that contain held-out wording: evaluation only
(``dnc.data.curriculum.Stage.validate`` refuses them in a training stage)."""


def needle_part_splits(phrasing: str) -> tuple[str, str, str]:
    """(subject split, fact split, question split) of a needle ``phrasing``: a split of
    :data:`SPLITS` for all three parts, or one of :data:`PART_PHRASINGS`."""
    if phrasing in PART_PHRASINGS:
        return PART_PHRASINGS[phrasing]
    if phrasing not in SPLITS:
        raise ValueError(f"needle phrasing must be one of {SPLITS + tuple(PART_PHRASINGS)} (or None for the "
                         f"original template), got {phrasing!r}")
    return (phrasing,) * 3


@lru_cache(maxsize=None)
def needle_phrasings(phrasing: str) -> tuple[NeedlePhrasing, ...]:
    """Every (subject, fact, question) combination of ``phrasing`` (a split, or a per-part mix of
    :data:`PART_PHRASINGS`), in a fixed order."""
    ss, fs, qs = needle_part_splits(phrasing)
    if qs == ECHO:  # facts that name the subject before the value, each asked with its own prefix
        return tuple(NeedlePhrasing(s, f, echo_question(f), phrasing) for s in of_split(NEEDLE_SUBJECTS, ss)
                     for f in of_split(NEEDLE_FACTS, fs) if echo_question(f) is not None)
    return tuple(NeedlePhrasing(s, f, q, phrasing) for s in of_split(NEEDLE_SUBJECTS, ss)
                 for f in of_split(NEEDLE_FACTS, fs) for q in of_split(NEEDLE_QUESTIONS, qs))


def echo_question(fact: str) -> str | None:
    """The fact frame's text before ``{v}`` (its :data:`ECHO` question), None when that text does
    not name the subject ("Remember {v}: it is the {s}. ")."""
    head = fact.split("{v}")[0]
    return head if any(x in head for x in ("{s}", "{S}", "{i}")) else None


@lru_cache(maxsize=None)
def shortest_needle(phrasing: str) -> NeedlePhrasing:
    """The phrasing of ``phrasing`` with the fewest fact + question bytes (the fallback when a drawn
    one does not fit a short sample)."""
    return min(needle_phrasings(phrasing),
               key=lambda o: len(o.fact_text("00000").encode()) + len(o.question_text().encode()))


def draw(rng: np.random.Generator, options: tuple) -> object:
    """One of ``options``, uniformly."""
    return options[int(rng.integers(0, len(options)))]


def template_regex(template: str, **fixed: str) -> re.Pattern[str]:
    """A regex that finds any rendering of ``template``: each placeholder matches what the tasks
    put there (digits for ``{v}``, letters for ``{k}``, a name for ``{p}``/``{c}``/``{x}``, any
    subject for ``{s}``/``{S}``/``{i}``, one of the relation words for ``{rel}``) unless given in
    ``fixed``. Used by tests to prove no held-out wording reaches training."""
    any_subject = [s for s, _ in NEEDLE_SUBJECTS]
    pattern = {
        "v": r"\d+", "k": r"[A-Z]+", "p": r"[A-Z][a-z]+", "c": r"[A-Z][a-z]+", "x": r"[A-Z][a-z]+",
        "s": "(?:" + "|".join(re.escape(s) for s in any_subject) + ")",
        "S": "(?:" + "|".join(re.escape(identifier(s).upper()) for s in any_subject) + ")",
        "i": "(?:" + "|".join(re.escape(identifier(s)) for s in any_subject) + ")",
        "rel": "(?:parent|grandparent|great-grandparent)",
    }
    out, pos = [], 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out.append(re.escape(template[pos:m.start()]))
        name = m.group(1)
        out.append(re.escape(fixed[name]) if name in fixed else pattern[name])
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out))


__all__ = [
    "SPLITS", "NEEDLE_SUBJECTS", "NEEDLE_FACTS", "NEEDLE_QUESTIONS", "PAIR_FACTS", "PAIR_QUESTIONS",
    "RELATION_FACTS", "RELATION_QUESTIONS", "NeedlePhrasing", "needle_phrasings", "shortest_needle", "of_split",
    "identifier", "draw", "template_regex", "check_split", "NEEDLE_PARTS", "PART_PHRASINGS",
    "HELDOUT_PHRASINGS", "needle_part_splits", "ECHO", "echo_question",
]
