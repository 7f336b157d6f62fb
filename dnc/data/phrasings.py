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

The train needle split is procedural on top of its table rows (:func:`subject_pool`,
:func:`fact_pool`, :func:`question_pool`): thousands of subjects (a modifier word and a head noun,
or a two- or three-word identifier of the stdlib *train* modules read as words) and thousands of
fact frames / a hundred question frames (prefix x core x suffix). A model trained on 12 subjects and
12 frames matched those strings (``bench/heldout_parts.py``); with thousands it has to match
whatever subject the question names. Held-out words (:data:`HELDOUT_SUBJECT_WORDS`) and held-out
frame shapes are kept out of the composed pools, so the held-out split stays unseen.
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

HELDOUT_SUBJECT_WORDS = ("safe", "unlock", "backup", "confirmation", "alarm", "routing")
"""Words of the held-out subjects that no train subject has (their head nouns "code", "number",
"combination" and "PIN" are shared with the train table). No composed train subject contains one,
even inside a longer word ("unsafe", "backups")."""

SUBJECT_MODIFIERS = (
    "access", "account", "admin", "agent", "api", "archive", "audit", "batch", "billing", "boarding",
    "booking", "branch", "build", "bundle", "cabin", "cache", "campus", "card", "cargo", "cart",
    "client", "cluster", "console", "contract", "courier", "customer", "daily", "database", "delivery",
    "deploy", "desk", "device", "door", "driver", "emergency", "employee", "entry", "event", "export",
    "factory", "field", "final", "flight", "floor", "folder", "gate", "guest", "hangar", "hotel",
    "import", "invoice", "job", "kernel", "lab", "launch", "library", "license", "locker", "lot",
    "mailbox", "main", "master", "meeting", "member", "mission", "network", "office", "order",
    "package", "parcel", "parking", "partner", "patient", "payment", "permit", "personal", "phone",
    "platform", "policy", "port", "primary", "printer", "private", "project", "promo", "queue",
    "radio", "reference", "release", "rental", "repair", "request", "reset", "room", "router",
    "sample", "school", "seat", "secret", "security", "sensor", "server", "service", "session",
    "shelf", "shipment", "shop", "signal", "site", "slot", "staff", "station", "storage", "student",
    "support", "system", "table", "task", "team", "temporary", "tenant", "terminal", "test", "ticket",
    "tracking", "trial", "truck", "user", "vault", "vendor", "visitor", "voucher", "wallet", "warehouse",
    "wifi", "work", "zone",
)
"""First words of composed train subjects (none holds a :data:`HELDOUT_SUBJECT_WORDS` word)."""

SUBJECT_HEADS = (
    "code", "number", "key", "id", "PIN", "password", "passcode", "token", "serial", "counter",
    "index", "value", "combination", "reference", "tag", "label", "seed", "offset", "port", "level",
    "count", "limit", "total", "score", "quota", "budget", "channel", "extension", "badge", "digits",
)
"""Last words of composed train subjects (what the number is)."""

FACT_PREFIXES = ("", "Note: ", "NB: ", "# ", "// ", "> ", "* ", "[INFO] ", "INFO ", "DEBUG: ", "Also, ",
                 "FYI ", "Reminder: ", "; ", "2024-05-01 12:00:03 INFO ", "Update: ", "PS ")
"""Openings of composed train fact frames ("- " (also inside "-- ") and "WARN" open held-out frames:
left out)."""
FACT_CORES = (
    "the {s} is {v}", "the {s} is set to {v}", "our {s} is {v}", "{s} is {v}", "the {s} equals {v}",
    "the current {s} is {v}", "use {v} as the {s}", "the {s} will be {v}", "my {s} is {v}",
    "the {s} reads {v}", "the new {s} is {v}", "the {s} has the value {v}", "the {s} you want is {v}",
    "{S} = {v}", "{i} = {v}", "{i}={v}", "{S}={v}", "{i}: {v}", "{S}: {v}", '"{i}": {v}', "{i} := {v}",
    "set {i} {v}", "export {S}={v}", '{i}: "{v}"', "{i} => {v}", "<{i}>{v}</{i}>", "{s} = {v}",
    "{s}: {v}", "the {s} should be {v}", "the {s} for today is {v}",
)
"""Cores of composed train fact frames: each names the subject ({s} words, {S}/{i} identifiers) and
the value once. Held-out shapes are left out: "{v} is the {s}", "{i} -> {v}", "{i}: int = {v}",
"was updated to", "wrote ... down"."""
FACT_SUFFIXES = (". ", ".\n", "\n", " ", "; ", ",\n", "  # do not share\n", " (noted)\n")
"""Endings of composed train fact frames."""

QUESTION_PREFIXES = ("", "Q: ", "Question: ", "> ", "User: ", "# ", "Now, ", "Quick check: ")
"""Openings of composed train question frames."""
QUESTION_CORES = (
    "what is the {s}? ", "what was the {s}? ", "the {s} is ", "The {s} is ", "{S} == ", "{i} = ",
    "{S}=", "Recall the {s}: ", "Answer with the {s}: ", "what was the {s}?\nA: ", "the value of {i} is ",
    "{s}: ", "Give the {s}: ", "remind me of the {s}: ", "the {s} was ", "{i} is ",
)
"""Cores of composed train question frames; the answer follows directly. Held-out shapes are left
out: ". It is ", "you need is", "print(", "Which number"."""

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


STDLIB_SUBJECT_RE = re.compile(r"\b[a-z]{3,12}(?:_[a-z]{3,12}){1,2}\b")
"""Identifiers of the stdlib train modules that become subjects (``buffer_size`` -> "buffer size")."""


def _heldout_free(text: str) -> bool:
    low = text.lower()
    return not any(w in low for w in HELDOUT_SUBJECT_WORDS)


@lru_cache(maxsize=None)
def stdlib_subjects() -> tuple[str, ...]:
    """Two- and three-word subjects read off identifiers of the stdlib *train* modules (sorted; the
    count depends on the interpreter's stdlib, a few thousand), none with a held-out word."""
    from dnc.data.filler_text import corpus_bytes  # lazy: reads ~10 MB on first use

    text = corpus_bytes("stdlib").tobytes().decode("utf-8", "replace")
    names = {m.replace("_", " ") for m in STDLIB_SUBJECT_RE.findall(text)}
    held = {s.lower() for s in of_split(NEEDLE_SUBJECTS, H)}
    return tuple(sorted(n for n in names if _heldout_free(n) and n not in held))


@lru_cache(maxsize=None)
def subject_pool(split: str) -> tuple[str, ...]:
    """Every subject of ``split``: the held-out table rows, or for ``train`` the table rows, every
    modifier x head composition and :func:`stdlib_subjects` (no duplicates, in a fixed order)."""
    table = of_split(NEEDLE_SUBJECTS, split)
    if split == H:
        return table
    composed = [f"{m} {h}" for m in SUBJECT_MODIFIERS for h in SUBJECT_HEADS if m != h.lower()]
    return tuple(dict.fromkeys([*table, *composed, *stdlib_subjects()]))


@lru_cache(maxsize=None)
def fact_pool(split: str) -> tuple[str, ...]:
    """Every fact frame of ``split``: the table rows, plus for ``train`` every prefix x core x suffix."""
    table = of_split(NEEDLE_FACTS, split)
    if split == H:
        return table
    composed = [p + c + x for p in FACT_PREFIXES for c in FACT_CORES for x in FACT_SUFFIXES]
    return tuple(dict.fromkeys([*table, *composed]))


@lru_cache(maxsize=None)
def question_pool(split: str) -> tuple[str, ...]:
    """Every question frame of ``split``: the table rows, plus for ``train`` every prefix x core."""
    table = of_split(NEEDLE_QUESTIONS, split)
    if split == H:
        return table
    return tuple(dict.fromkeys([*table, *(p + c for p in QUESTION_PREFIXES for c in QUESTION_CORES)]))


@lru_cache(maxsize=None)
def needle_phrasings(phrasing: str) -> tuple[NeedlePhrasing, ...]:
    """Every (subject, fact, question) combination of a phrasing whose parts are all held out
    (the table's product, in a fixed order); a phrasing with a train part is drawn part by part
    (:func:`draw_needle`), its product being too large to list."""
    ss, fs, qs = needle_part_splits(phrasing)
    if T in (ss, fs, qs):
        raise ValueError(f"needle phrasing {phrasing!r} has procedural train parts: draw it with draw_needle")
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
def echo_facts(split: str) -> tuple[str, ...]:
    """The fact frames of ``split`` that have an :func:`echo_question`."""
    return tuple(f for f in fact_pool(split) if echo_question(f) is not None)


def draw_needle(rng: np.random.Generator, phrasing: str) -> NeedlePhrasing:
    """One wording of ``phrasing``: for ``heldout`` one index into the table's product (the draw
    held-out samples always made), else subject, fact and question drawn one after the other from
    the pools of their splits, uniformly."""
    ss, fs, qs = needle_part_splits(phrasing)
    if T not in (ss, fs, qs):
        return draw(rng, needle_phrasings(phrasing))
    subject = str(draw(rng, subject_pool(ss)))
    if qs == ECHO:
        fact = str(draw(rng, echo_facts(fs)))
        return NeedlePhrasing(subject, fact, echo_question(fact), phrasing)
    return NeedlePhrasing(subject, str(draw(rng, fact_pool(fs))), str(draw(rng, question_pool(qs))), phrasing)


def draw_other_subjects(rng: np.random.Generator, split: str, n: int, exclude: str) -> list[str]:
    """``n`` distinct subjects of ``split`` other than ``exclude`` (a needle's decoys). The held-out
    table: a permutation of the others (the draw held-out samples always made); the train pool:
    uniform draws without repeats by rejection (a permutation of ~10k subjects per sample made a
    sample 20 times slower)."""
    pool = subject_pool(split)
    if n > len(pool) - 1:
        raise ValueError(f"{n} other subjects asked of split {split!r}, which has {len(pool) - 1}")
    if split == H:
        others = [s for s in pool if s != exclude]
        return [others[i] for i in rng.permutation(len(others))[:n]]
    out: list[str] = []
    while len(out) < n:
        s = pool[int(rng.integers(0, len(pool)))]
        if s != exclude and s not in out:
            out.append(s)
    return out


def is_needle_phrasing(p: NeedlePhrasing, phrasing: str) -> bool:
    """True when ``p`` can come out of :func:`draw_needle` for ``phrasing``."""
    ss, fs, qs = needle_part_splits(phrasing)
    if qs == ECHO:
        return p.subject in subject_pool(ss) and p.fact in echo_facts(fs) and p.question == echo_question(p.fact)
    return p.subject in subject_pool(ss) and p.fact in fact_pool(fs) and p.question in question_pool(qs)


def _frame_len(frame: str, subject: str) -> int:
    return len(NeedlePhrasing(subject, frame, frame, "").fact_text("00000").encode())


@lru_cache(maxsize=None)
def shortest_needle(phrasing: str) -> NeedlePhrasing:
    """The wording of ``phrasing`` with the fewest fact + question bytes (the fallback when a drawn
    one does not fit a short sample): the shortest subject (every frame names it at least once, so
    a longer one never gives a shorter text) with the frames shortest around it."""
    ss, fs, qs = needle_part_splits(phrasing)
    subjects = subject_pool(ss)
    shortest = min(len(x.encode()) for x in subjects)
    best, best_len = None, None
    for s in (x for x in subjects if len(x.encode()) == shortest):
        if qs == ECHO:
            f = min(echo_facts(fs), key=lambda t: _frame_len(t, s) + _frame_len(echo_question(t), s))
            q = echo_question(f)
        else:
            f = min(fact_pool(fs), key=lambda t: _frame_len(t, s))
            q = min(question_pool(qs), key=lambda t: _frame_len(t, s))
        n = _frame_len(f, s) + _frame_len(q, s)
        if best_len is None or n < best_len:
            best, best_len = NeedlePhrasing(s, f, q, phrasing), n
    return best


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
    "HELDOUT_PHRASINGS", "needle_part_splits", "ECHO", "echo_question", "echo_facts", "draw_needle",
    "draw_other_subjects", "is_needle_phrasing", "subject_pool", "fact_pool",
    "question_pool", "stdlib_subjects", "HELDOUT_SUBJECT_WORDS", "SUBJECT_MODIFIERS", "SUBJECT_HEADS",
    "FACT_PREFIXES", "FACT_CORES", "FACT_SUFFIXES", "QUESTION_PREFIXES", "QUESTION_CORES",
]
