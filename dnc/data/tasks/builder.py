"""The machinery every task generator is built from: :class:`Sample`, the filler (a vectorised
gather from a packed word table, or real text), :func:`with_inserts` (facts placed at fractions of a
filler), :class:`SampleBuilder` (token pieces + answer spans -> a Sample), and the shared argument
checks and random codes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from dnc.data.filler_text import check_filler, text_filler
from dnc.data.tasks.vocab import BOS, EOS, TOKENIZER, WORDS, encode_text


@dataclass
class Sample:
    """One task instance: a full token sequence with its answer at the end."""

    tokens: np.ndarray
    """``[T]`` int32 token ids (byte tokenizer), answer and final ``<eos>`` included."""
    loss_mask: np.ndarray
    """``[T]`` bool: True at positions ``i`` whose token is part of the answer, i.e. must be
    predicted from ``tokens[:i]``."""
    answer_start: int
    """Index of the first answer token (the first True of ``loss_mask``)."""
    answer: np.ndarray
    """``[A]`` int32 answer tokens, ending with ``<eos>``; equals ``tokens[loss_mask]``."""
    task: str
    """Task name (a key of :data:`TASKS`)."""
    meta: dict = field(default_factory=dict)
    """Task knobs and facts: ``difficulty``, ``length`` and e.g. ``depth``, ``n_pairs``, ``hops``;
    ``answer_spans`` lists ``[start, end)`` of each contiguous answer piece (several for mqar)."""

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def prompt(self) -> np.ndarray:
        """``[answer_start]`` the tokens before the answer (what a model is given at eval time)."""
        return self.tokens[: self.answer_start]

    def text(self) -> str:
        """Human-readable rendering with special tokens by name (for debugging and the UI)."""
        return TOKENIZER.decode(self.tokens.tolist(), skip_special=False)


class TaskGenerator(Protocol):
    """``(rng, length, difficulty=0.5, **kw) -> Sample``; see the module docstring."""

    def __call__(self, rng: np.random.Generator, length: int, difficulty: float = 0.5,
                 **kw: Any) -> Sample: ...


class _WordTable:
    """Filler words packed in one flat byte buffer, so a filler of N tokens is one vectorised
    gather instead of a Python loop per word. Entry ``i < W`` is ``"word "``, entry ``W + i`` is
    ``"word. "`` (a sentence end)."""

    def __init__(self, words: Sequence[str]) -> None:
        entries = [w + " " for w in words] + [w + ". " for w in words]
        enc = [encode_text(e) for e in entries]
        self.n_words = len(words)
        self.lens = np.array([len(e) for e in enc], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lens)[:-1]]).astype(np.int64)
        self.flat = np.concatenate(enc)
        self.mean_len = float(self.lens[: self.n_words].mean()) + 0.15


_TABLE: _WordTable | None = None


def _table() -> _WordTable:
    global _TABLE
    if _TABLE is None:  # built on first use: nothing happens at import time
        _TABLE = _WordTable(WORDS)
    return _TABLE


def filler(rng: np.random.Generator, n: int, sentence_end_p: float = 0.12,
           source: str = "words") -> np.ndarray:
    """Exactly ``n`` tokens ``[n]`` int32 of filler. ``source="words"``: pseudo-text, words from
    :data:`WORDS` separated by spaces, with a full stop after about one word in
    ``1/sentence_end_p``; ``"stdlib"`` / ``"stdlib_heldout"``: consecutive real text
    (:mod:`dnc.data.filler_text`)."""
    if n <= 0:
        return np.zeros(0, dtype=np.int32)
    if source != "words":
        return text_filler(rng, n, check_filler(source))
    t = _table()
    parts = []
    have = 0
    while have < n:
        m = int((n - have) / t.mean_len * 1.05) + 8
        idx = rng.integers(0, t.n_words, size=m) + t.n_words * (rng.random(m) < sentence_end_p)
        lens = t.lens[idx]
        ends = np.cumsum(lens)
        # Position j of the output reads flat[offset(word) + (j - start(word))].
        starts_out = ends - lens
        gather = np.arange(ends[-1], dtype=np.int64) + np.repeat(t.offsets[idx] - starts_out, lens)
        parts.append(t.flat[gather])
        have += int(ends[-1])
    return np.concatenate(parts)[:n]


filler_tokens = filler
""":func:`filler` under a name the generators' ``filler=`` argument does not shadow."""


def with_inserts(rng: np.random.Generator, n_total: int, inserts: Sequence[np.ndarray],
                  fractions: Sequence[float], source: str = "words") -> tuple[np.ndarray, list[int]]:
    """Filler of exactly ``n_total`` tokens with each ``inserts[i]`` placed at fraction
    ``fractions[i]`` (0 = start, 1 = end) of the filler (from ``source``, see :func:`filler`),
    snapped to a word boundary.

    Returns ``(tokens [n_total], starts)`` with ``starts[i]`` the index of ``inserts[i]``."""
    ins_total = sum(len(x) for x in inserts)
    n_fill = n_total - ins_total
    if n_fill < 0:
        raise ValueError(f"inserts ({ins_total} tokens) do not fit in {n_total}")
    fill = filler(rng, n_fill, source=source)
    if n_fill:
        fill[-1] = 32  # end on a space, so an insert at the very end does not glue to a word
    if not inserts:
        return fill, []
    frac = np.clip(np.asarray(fractions, dtype=np.float64), 0.0, 1.0)
    pos = np.round(frac * n_fill).astype(np.int64)
    # Snap to the start of a word (after a space) so inserts never split a filler word.
    bounds = np.concatenate([[0], np.flatnonzero(fill == 32) + 1, [n_fill]])
    j = np.clip(np.searchsorted(bounds, pos), 1, len(bounds) - 1)
    left, right = bounds[j - 1], bounds[j]
    pos = np.where(pos - left <= right - pos, left, right)
    order = np.argsort(pos, kind="stable")
    pieces, starts = [], [0] * len(inserts)
    prev, out_len = 0, 0
    for k in order:
        p = int(pos[k])
        pieces.append(fill[prev:p])
        out_len += p - prev
        starts[k] = out_len
        pieces.append(inserts[k])
        out_len += len(inserts[k])
        prev = p
    pieces.append(fill[prev:])
    return np.concatenate(pieces).astype(np.int32), starts


class SampleBuilder:
    """Accumulates token pieces and which of them are answer (masked) pieces."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []
        self.masks: list[bool] = []
        self.n = 0
        self.spans: list[list[int]] = []

    def add(self, x: np.ndarray | str | int | Sequence[int], answer: bool = False) -> int:
        """Append ``x`` (token array, text, one id or ids); return its start index."""
        if isinstance(x, str):
            arr = encode_text(x)
        elif isinstance(x, (int, np.integer)):
            arr = np.array([int(x)], dtype=np.int32)
        else:
            arr = np.asarray(x, dtype=np.int32)
        start = self.n
        self.parts.append(arr)
        self.masks.append(answer)
        self.n += len(arr)
        if answer and len(arr):
            if self.spans and self.spans[-1][1] == start:  # merge adjacent answer pieces
                self.spans[-1][1] = self.n
            else:
                self.spans.append([start, self.n])
        return start

    def build(self, task: str, meta: dict) -> Sample:
        tokens = np.concatenate(self.parts).astype(np.int32)
        mask = np.zeros(len(tokens), dtype=bool)
        for s, e in self.spans:
            mask[s:e] = True
        meta = dict(meta, answer_spans=[list(s) for s in self.spans])
        return Sample(tokens=tokens, loss_mask=mask, answer_start=int(self.spans[0][0]),
                      answer=tokens[mask].copy(), task=task, meta=meta)


def facts_then_question(rng: np.random.Generator, length: int, facts: Sequence[np.ndarray],
                        fractions: Sequence[float], question: np.ndarray, answer: np.ndarray,
                        source: str = "words") -> tuple[SampleBuilder, list[int]]:
    """The layout of the tasks that hide facts in filler and ask at the end:
    ``<bos>`` filler with ``facts[i]`` at ``fractions[i]`` (see :func:`with_inserts`), then
    ``question`` and ``[answer<eos>]``, exactly ``length`` tokens in all.

    Returns ``(builder, starts)``: ``builder.build(task, meta)`` makes the Sample and ``starts[i]``
    is the index of ``facts[i]`` in the filler region (add 1 for the ``<bos>``)."""
    fixed = 1 + len(question) + len(answer) + 1
    region, starts = with_inserts(rng, length - fixed, facts, fractions, source=source)
    b = SampleBuilder()
    b.add(BOS)
    b.add(region)
    b.add(question)
    b.add(answer, answer=True)
    b.add(EOS, answer=True)
    return b, starts


def shrink_to_fit(plan: Callable[[int, int], tuple], length: int, first: int, second: int,
                  first_floor: int, second_floor: int) -> tuple[int, int, tuple]:
    """Lower two sizes, ``first`` before ``second``, until ``plan(first, second)`` fits.

    ``plan`` returns a tuple whose last item is the tokens the sample needs; a size never goes
    below its floor (a size the caller gave explicitly is its own floor: it never shrinks).
    Returns ``(first, second, plan(first, second))``; the caller raises if it still does not fit."""
    out = plan(first, second)
    while out[-1] > length and (first > first_floor or second > second_floor):
        if first > first_floor:
            first -= 1
        else:
            second -= 1
        out = plan(first, second)
    return first, second, out


def as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def lerp(lo: float, hi: float, d: float) -> int:
    return int(round(lo + (hi - lo) * d))


def too_short(task: str, length: int, need: int, what: str) -> ValueError:
    return ValueError(f"{task}: length {length} is too short for {what}: it needs at least {need} "
                      f"tokens; raise length or lower the explicit arguments")


def distinct_codes(rng: np.random.Generator, n: int, length: int, alphabet: str) -> np.ndarray:
    """``[n, length]`` int32 byte ids of ``n`` distinct strings over ``alphabet``."""
    base = len(alphabet)
    space = base ** length
    if n > space:
        raise ValueError(f"cannot draw {n} distinct codes of length {length} from {base} symbols "
                         f"({space} exist); raise the code length")
    codes = rng.choice(space, size=n, replace=False)
    digits = (codes[:, None] // base ** np.arange(length - 1, -1, -1)[None, :]) % base
    return encode_text(alphabet)[digits]


def random_codes(rng: np.random.Generator, n: int, length: int, alphabet: str) -> np.ndarray:
    """``[n, length]`` int32 byte ids of strings over ``alphabet`` (repeats allowed)."""
    return encode_text(alphabet)[rng.integers(0, len(alphabet), size=(n, length))]


def check_common(length: int, difficulty: float) -> None:
    if not isinstance(length, (int, np.integer)) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    if not 0.0 <= float(difficulty) <= 1.0:
        raise ValueError(f"difficulty must be in [0, 1], got {difficulty!r}")


def retrieval_meta(phrasing: str | None, markers: bool, source: str, **frames: Any) -> dict:
    """The generalisation knobs every retrieval sample records (what wording, markers, filler)."""
    return dict(phrasing=phrasing or "template", markers=bool(markers), filler=source,
                **({"frames": frames} if phrasing is not None else {}))
