"""Seeded synthetic tasks for long-range reasoning, built with numpy so that a 1M-token sample
takes milliseconds.

Every generator has the signature ``fn(rng, length, difficulty=0.5, **kw) -> Sample``:

- ``rng``: a ``numpy.random.Generator`` (or an int seed). The same rng state gives the same sample.
- ``length``: total tokens of the sample, answer and ``<eos>`` included. It is exact:
  ``len(sample.tokens) == length``. The distance the model must bridge grows with it, because the
  slack is filled with deterministic pseudo-text (words from :data:`WORDS`, never downloaded).
- ``difficulty``: a float in ``[0, 1]``; each task maps it to its own knobs (table below).
  Knobs chosen from ``difficulty`` shrink until the sample fits ``length``; knobs passed explicitly
  as keyword arguments never shrink: if they cannot fit, a ``ValueError`` says the minimum length.

Layout (``<x>`` are special tokens of :class:`dnc.tokenizer.ByteTokenizer`, the rest UTF-8 bytes;
``...`` is filler, ``[...]`` marks the answer, which is the only part in ``loss_mask``):

============  =====================================================================  ===============================================
task          layout                                                                 difficulty 0 -> 1
============  =====================================================================  ===============================================
copy          ``<bos><key>S<sep> ... <query><answer>[S<eos>]``                       ``len(S)`` 4 -> 32
kv_retrieval  ``<bos>(<key>KV)*n ... <sep> ... <query>K[V<eos>]``                    ``n_pairs`` 2 -> 32, ``value_len`` 1 -> 4
fill_blank    records ``"ABC: w1 w2 w3.\\n"`` in filler, then                         ``n_records`` 1 -> 8, ``n_words`` 3 -> 6
              ``<query>ABC: w1 <blank> w3.<answer>[w2<eos>]``
needle        ``<needle>the pass key is 12345.`` at ``depth``, decoys, then          ``n_decoys`` ("the room number is 48213.") 0 -> 4
              ``<query>the pass key is [12345<eos>]``
relational    facts ``"Ann is the parent of Bob."`` in filler, then                   ``hops`` 1 -> 3, extra people 0 -> 6
              ``<query>who is the grandparent of Cy?<answer>[Ann<eos>]``
mqar          ``<bos>(<key>KV)*n<sep> ... (<query>K[V])*q[<eos>]``                    ``n_pairs`` 2 -> 32 (``n_queries`` = ``n_pairs``)
============  =====================================================================  ===============================================

Alphabets (small on purpose, so a tiny model can learn the tasks):

- keys (kv_retrieval, mqar): :data:`KEY_ALPHABET`, 16 upper-case letters ``A..P``; a key is
  ``key_len`` of them (kv_retrieval: 2, i.e. 256 distinct keys; mqar: 1 up to 16 pairs, else 2).
  Keys within a sample are distinct.
- values (kv_retrieval, mqar): :data:`VALUE_ALPHABET`, the 10 digits; a value is ``value_len`` of them.
- copy strings: :data:`COPY_ALPHABET`, the 26 upper-case letters.
- filler: lower-case words from :data:`WORDS`, no digits and no upper case, so it never collides
  with keys, values, passkeys, record ids or names.

Generalisation (issue 11): the retrieval tasks (needle, kv_retrieval, relational, mqar) also take
``phrasing`` (``"train"`` / ``"heldout"`` wordings of :mod:`dnc.data.phrasings`, ``"mixed"`` = the
original template or a train one), ``markers=False`` (no ``<needle>``/``<key>``/``<sep>``/``<query>``/
``<answer>``; ``marker_prob=p`` keeps them with probability ``p``) and ``filler`` (``"words"``, real
text ``"stdlib"`` / held-out ``"stdlib_heldout"`` from :mod:`dnc.data.filler_text`, or ``"mixed"``).
Real-text filler has digits and capitals, so it may by chance hold a key-like string; the defaults
(template, markers, words) reproduce the layouts above sample for sample. Each sample records its
wording in ``meta["phrasing"]``, ``meta["markers"]``, ``meta["filler"]`` (and ``meta["frames"]``).

The answer always ends with ``<eos>``; invariants every sample satisfies:
``sample.tokens[sample.loss_mask] == sample.answer`` and ``sample.loss_mask[sample.answer_start]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch

from dnc.data import phrasings as ph
from dnc.data.filler_text import FILLERS, check_filler, text_filler
from dnc.tokenizer import ByteTokenizer

_TOK = ByteTokenizer()
BOS = _TOK.bos_id
EOS = _TOK.eos_id
PAD = _TOK.pad_id
SEP = _TOK.sep_id
QUERY = _TOK.token_id("<query>")
ANSWER = _TOK.token_id("<answer>")
KEY = _TOK.token_id("<key>")
NEEDLE = _TOK.token_id("<needle>")
BLANK = _TOK.token_id("<blank>")

KEY_ALPHABET = "ABCDEFGHIJKLMNOP"
"""16 letters keys are spelled with (kv_retrieval, mqar)."""
VALUE_ALPHABET = "0123456789"
"""10 digits values are spelled with (kv_retrieval, mqar)."""
COPY_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
"""26 letters the copy task's strings are drawn from."""

WORDS: tuple[str, ...] = tuple(
    """the a of and to in is was for on that with as by at from it this be are or an which
    one all were when there can more if will about would their out up other into time some what
    so them these two may then first way could made over after like did many water long little
    very just where most know through back much before good new day also around another came
    come work three word must because does part even place well such here take why things help
    put years different away again off went old number great tell men say small every found still
    between name should home big give air line set own under read last never us left end along
    while might next sound below saw something thought both few those always looked show large
    often together asked house world going want school important until form food keep children
    feet land side without once animals life enough took four head above kind began almost live
    page got earth need far hand high year mother light country father let night picture being
    study second soon story since white ever paper hard near sentence better best across during
    today however sure knew try told young sun thing whole hear example heard several change
    answer room sea against top turned learn point city play toward five himself usually money
    seen car morning river garden bird music stone window table letter ocean quiet green""".split()
)
"""Filler vocabulary: common lower-case English words (no digits, no capitals, no "parent")."""

NAMES: tuple[str, ...] = tuple(
    """Ann Bob Cy Dee Eve Fay Gus Hal Ida Jay Kim Lou Max Ned Oli Pam Quin Ray Sue Tom Uma Val
    Wes Xia Yul Zed Abe Bea Cal Dot Eli Flo Gil Hope Ira Joy Ken Liv Mo Nia""".split()
)
"""Person names of the relational task (capitalised, distinct, never in the filler)."""

_RECORD_WORDS_IDX = np.array([i for i, w in enumerate(WORDS) if len(w) <= 5], dtype=np.int64)
"""Indices of the short words fill_blank records are made of (keeps records short)."""

_REL_WORDS = {1: "parent", 2: "grandparent", 3: "great-grandparent"}


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
        return _TOK.decode(self.tokens.tolist(), skip_special=False)


class TaskGenerator(Protocol):
    """``(rng, length, difficulty=0.5, **kw) -> Sample``; see the module docstring."""

    def __call__(self, rng: np.random.Generator, length: int, difficulty: float = 0.5,
                 **kw: Any) -> Sample: ...


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------
def _enc(text: str) -> np.ndarray:
    """UTF-8 bytes of ``text`` as int32 token ids ``[len(bytes)]``."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def _dec(ids: np.ndarray) -> str:
    return _TOK.decode(ids.tolist())


class _WordTable:
    """Filler words packed in one flat byte buffer, so a filler of N tokens is one vectorised
    gather instead of a Python loop per word. Entry ``i < W`` is ``"word "``, entry ``W + i`` is
    ``"word. "`` (a sentence end)."""

    def __init__(self, words: Sequence[str]) -> None:
        entries = [w + " " for w in words] + [w + ". " for w in words]
        enc = [_enc(e) for e in entries]
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


_filler_fn = filler
""":func:`filler` under a name the generators' ``filler=`` argument does not shadow."""


def _with_inserts(rng: np.random.Generator, n_total: int, inserts: Sequence[np.ndarray],
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


class _Builder:
    """Accumulates token pieces and which of them are answer (masked) pieces."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []
        self.masks: list[bool] = []
        self.n = 0
        self.spans: list[list[int]] = []

    def add(self, x: np.ndarray | str | int | Sequence[int], answer: bool = False) -> int:
        """Append ``x`` (token array, text, one id or ids); return its start index."""
        if isinstance(x, str):
            arr = _enc(x)
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


def _as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def _lerp(lo: float, hi: float, d: float) -> int:
    return int(round(lo + (hi - lo) * d))


def _too_short(task: str, length: int, need: int, what: str) -> ValueError:
    return ValueError(f"{task}: length {length} is too short for {what}: it needs at least {need} "
                      f"tokens; raise length or lower the explicit arguments")


def _distinct_codes(rng: np.random.Generator, n: int, length: int, alphabet: str) -> np.ndarray:
    """``[n, length]`` int32 byte ids of ``n`` distinct strings over ``alphabet``."""
    base = len(alphabet)
    space = base ** length
    if n > space:
        raise ValueError(f"cannot draw {n} distinct codes of length {length} from {base} symbols "
                         f"({space} exist); raise the code length")
    codes = rng.choice(space, size=n, replace=False)
    digits = (codes[:, None] // base ** np.arange(length - 1, -1, -1)[None, :]) % base
    return _enc(alphabet)[digits]


def _random_codes(rng: np.random.Generator, n: int, length: int, alphabet: str) -> np.ndarray:
    """``[n, length]`` int32 byte ids of strings over ``alphabet`` (repeats allowed)."""
    return _enc(alphabet)[rng.integers(0, len(alphabet), size=(n, length))]


def _check_common(length: int, difficulty: float) -> None:
    if not isinstance(length, (int, np.integer)) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    if not 0.0 <= float(difficulty) <= 1.0:
        raise ValueError(f"difficulty must be in [0, 1], got {difficulty!r}")


# ------------------------------------------------------------------------------------------------
# Tasks
# ------------------------------------------------------------------------------------------------
def copy_task(rng: np.random.Generator, length: int, difficulty: float = 0.5, *,
              str_len: int | None = None) -> Sample:
    """Copy a random string of ``str_len`` letters (difficulty: 4 -> 32) seen at the start.

    ``<bos><key>S<sep> filler <query><answer>[S<eos>]``."""
    _check_common(length, difficulty)
    rng = _as_rng(rng)
    fixed = 6  # bos key sep query answer eos
    n = str_len if str_len is not None else _lerp(4, 32, difficulty)
    if str_len is None:
        n = max(1, min(n, (length - fixed) // 2))
    if fixed + 2 * n > length or n < 1:
        raise _too_short("copy", length, fixed + 2 * max(n, 1), f"a string of {n}")
    s = _random_codes(rng, 1, n, COPY_ALPHABET)[0]
    b = _Builder()
    b.add([BOS, KEY])
    b.add(s)
    b.add(SEP)
    b.add(filler(rng, length - fixed - 2 * n))
    b.add([QUERY, ANSWER])
    b.add(s, answer=True)
    b.add(EOS, answer=True)
    return b.build("copy", dict(difficulty=float(difficulty), length=int(length), str_len=n,
                                distance=int(length - 2 - n)))


def _pair_frames(rng: np.random.Generator, phrasing: str | None) -> tuple[str, str]:
    """(pair fact frame, question frame) of kv_retrieval / mqar: the original ``"{k}{v}"`` /
    ``"{k}"`` without a phrasing (no rng drawn), else one of each from the phrasing's split."""
    if phrasing is None:
        return "{k}{v}", "{k}"
    return (str(ph.draw(rng, ph.of_split(ph.PAIR_FACTS, phrasing))),
            str(ph.draw(rng, ph.of_split(ph.PAIR_QUESTIONS, phrasing))))


def _frame_len(frame: str, **fields: str) -> int:
    return len(frame.format(**fields).encode("utf-8"))


def _retrieval_meta(phrasing: str | None, markers: bool, source: str, **frames: Any) -> dict:
    """The generalisation knobs every retrieval sample records (what wording, markers, filler)."""
    return dict(phrasing=phrasing or "template", markers=bool(markers), filler=source,
                **({"frames": frames} if phrasing is not None else {}))


def kv_retrieval(rng: np.random.Generator, length: int, difficulty: float = 0.5, *,
                 n_pairs: int | None = None, key_len: int = 2, value_len: int | None = None,
                 prefix_len: int | None = None, phrasing: str | None = None, markers: bool = True,
                 filler: str = "words") -> Sample:
    """Key/value pairs at the start, filler, then one key asked at the very end.

    ``<bos>(<key>KV)*n [filler to prefix_len] <sep> filler <query>K[V<eos>]``.
    The value follows its key directly, in the facts and in the question alike (keys are
    letters, values digits): the answer is then "what followed this key before", a single
    induction step, instead of a lookup across marker tokens, which trains several times slower.
    With ``prefix_len`` every pair lies in ``tokens[:prefix_len]`` and the query in the last
    ``key_len + value_len + 2`` tokens, so the pair-to-question distance is set by ``length``.
    Difficulty: ``n_pairs`` 2 -> 32 and ``value_len`` 1 -> 4 digits.

    Generalisation knobs (defaults reproduce the layout above): ``phrasing`` ``"train"`` /
    ``"heldout"`` words each pair (e.g. ``"set K to V. "``) and the question (``"what is K? "``)
    with one frame of :mod:`dnc.data.phrasings` each per sample; ``markers=False`` drops
    ``<key>``/``<sep>``/``<query>``; ``filler`` picks the filler source."""
    _check_common(length, difficulty)
    rng = _as_rng(rng)
    check_filler(filler)
    explicit = n_pairs is not None
    vlen = value_len if value_len is not None else _lerp(1, 4, difficulty)
    n = n_pairs if explicit else _lerp(2, 32, difficulty)
    fact_frame, q_frame = _pair_frames(rng, phrasing)
    m = int(bool(markers))
    pair = m + _frame_len(fact_frame, k="A" * key_len, v="0" * vlen)
    q_len = _frame_len(q_frame, k="A" * key_len)
    tail_after_fill = m + q_len + vlen + 1  # query marker, question, value, eos
    tail = m + tail_after_fill  # + sep
    budget = (prefix_len if prefix_len is not None else length - tail) - 1  # minus bos
    if prefix_len is not None and prefix_len + tail > length:
        raise _too_short("kv_retrieval", length, prefix_len + tail, f"prefix_len={prefix_len}")
    if not explicit:
        n = max(1, min(n, budget // pair))
    if n < 1 or n * pair > budget:
        where = f"prefix_len={prefix_len}" if prefix_len is not None else f"length={length}"
        raise ValueError(f"kv_retrieval: {n} pairs of {pair} tokens do not fit in {where} "
                         f"(need {1 + n * pair} + {tail} query tokens); raise it or lower n_pairs")
    keys = _distinct_codes(rng, n, key_len, KEY_ALPHABET)
    vals = _random_codes(rng, n, vlen, VALUE_ALPHABET)
    q = int(rng.integers(0, n))
    b = _Builder()
    b.add(BOS)
    b.add(_pairs(keys, vals, fact_frame, markers))
    if prefix_len is not None:
        b.add(_filler_fn(rng, prefix_len - b.n, source=filler))
    if markers:
        b.add(SEP)
    b.add(_question_side(_filler_fn(rng, length - b.n - tail_after_fill, source=filler), markers))
    if markers:
        b.add(QUERY)
    b.add(q_frame.format(k=_dec(keys[q])))
    b.add(vals[q], answer=True)
    b.add(EOS, answer=True)
    return b.build("kv_retrieval", dict(
        difficulty=float(difficulty), length=int(length), n_pairs=n, key_len=key_len,
        value_len=vlen, query_index=q, prefix_len=prefix_len,
        pair_pos=int(1 + q * pair), distance=int(length - tail - (1 + q * pair)),
        **_retrieval_meta(phrasing, markers, filler, pair=fact_frame, question=q_frame)))


def _question_side(fill: np.ndarray, markers: bool) -> np.ndarray:
    """The filler before the questions, ending on a newline when no ``<query>`` marker follows
    (so the first question never glues onto a filler word)."""
    if not markers and len(fill):
        fill[-1] = 10
    return fill


def _pairs(keys: np.ndarray, vals: np.ndarray, frame: str, markers: bool) -> np.ndarray:
    """``[n * pair]`` token ids of every pair rendered with ``frame`` (``<key>`` before each with
    ``markers``). The original ``"{k}{v}"`` frame stays one vectorised concatenation."""
    n = len(keys)
    if frame == "{k}{v}":
        cols = [keys, vals] if not markers else [np.full((n, 1), KEY, np.int32), keys, vals]
        return np.concatenate(cols, axis=1).reshape(-1)
    text = [_enc(frame.format(k=_dec(k), v=_dec(v))) for k, v in zip(keys, vals)]
    if markers:
        text = [np.concatenate([[KEY], t]) for t in text]
    return np.concatenate(text).astype(np.int32)



def fill_blank(rng: np.random.Generator, length: int, difficulty: float = 0.5, *,
               n_records: int | None = None, n_words: int | None = None) -> Sample:
    """Structured records ``"ABC: w1 w2 w3.\\n"`` scattered in filler; at the end one record
    comes back with a word replaced by ``<blank>``; the answer is that word.

    ``... ABC: w1 w2 w3.\\n ... <query>ABC: w1 <blank> w3.<answer>[w2<eos>]``.
    Record ids are 3 distinct upper-case letters, so the earlier occurrence is unambiguous.
    Difficulty: ``n_records`` 1 -> 8 (distractor records), ``n_words`` 3 -> 6 per record."""
    _check_common(length, difficulty)
    rng = _as_rng(rng)
    nw = n_words if n_words is not None else _lerp(3, 6, difficulty)
    nr = n_records if n_records is not None else _lerp(1, 8, difficulty)
    if nw < 1 or nr < 1:
        raise ValueError(f"fill_blank: n_words and n_records must be >= 1, got {nw}, {nr}")
    # Draw for the largest sizes first, so shrinking to fit never changes the rng stream.
    max_r, max_w = max(nr, 8), max(nw, 6)
    ids = _distinct_codes(rng, max_r, 3, COPY_ALPHABET)
    words = _RECORD_WORDS_IDX[rng.integers(0, len(_RECORD_WORDS_IDX), size=(max_r, max_w))]
    blank_u = float(rng.random())
    target = 0  # ids are random, so the first record is as good as any

    def parts(r: int, w: int):
        recs = [_enc(_dec(ids[i]) + ": " + " ".join(WORDS[x] for x in words[i, :w]) + ".\n")
                for i in range(r)]
        k = min(int(blank_u * w), w - 1)
        before = _dec(ids[target]) + ": " + "".join(WORDS[x] + " " for x in words[target, :k])
        after = "".join(" " + WORDS[x] for x in words[target, k + 1:w]) + "."
        q = np.concatenate([[QUERY], _enc(before), [BLANK], _enc(after), [ANSWER]])
        a = _enc(WORDS[words[target, k]])
        return recs, q, a, k, 1 + len(q) + len(a) + 1 + sum(len(x) for x in recs)

    rec, query, ans, blank_at, need = parts(nr, nw)
    while need > length and (n_records is None and nr > 1 or n_words is None and nw > 2):
        if n_records is None and nr > 1:
            nr -= 1
        else:
            nw -= 1
        rec, query, ans, blank_at, need = parts(nr, nw)
    if need > length:
        raise _too_short("fill_blank", length, need, f"{nr} records of {nw} words")
    fixed = 1 + len(query) + len(ans) + 1
    fr = rng.random(nr)
    region, starts = _with_inserts(rng, length - fixed, rec, fr)
    b = _Builder()
    b.add(BOS)
    b.add(region)
    b.add(query)
    b.add(ans, answer=True)
    b.add(EOS, answer=True)
    return b.build("fill_blank", dict(
        difficulty=float(difficulty), length=int(length), n_records=nr, n_words=nw,
        blank_index=blank_at, record_pos=int(1 + starts[target]),
        distance=int(length - len(ans) - 1 - (1 + starts[target]))))


_LEGACY_NEEDLE = ph.NeedlePhrasing("pass key", "the {s} is {v}. ", "the {s} is ", "template")
"""The original passkey wording (``phrasing=None``); its decoys say "the room number is ..."."""


def _needle_parts(p: ph.NeedlePhrasing, nums: np.ndarray, decoy_subjects: Sequence[str],
                  markers: bool) -> tuple[list[np.ndarray], np.ndarray, int]:
    """(inserts: the fact then one decoy per number after the first, question tokens, offset of
    the passkey's first digit inside the fact insert)."""
    key = str(int(nums[0]))
    fact = p.fact_text(key)
    before_key = len(p.fact_text("\x00").split("\x00")[0].encode("utf-8"))
    head = [NEEDLE] if markers else []
    ins = [np.concatenate([np.array(head, dtype=np.int32), _enc(fact)]).astype(np.int32)]
    ins += [_enc(p.fact_text(str(int(x)), subject=s)) for x, s in zip(nums[1:], decoy_subjects)]
    question = np.concatenate([np.array([QUERY] if markers else [], dtype=np.int32),
                               _enc(p.question_text())]).astype(np.int32)
    return ins, question, len(head) + before_key


def needle(rng: np.random.Generator, length: int, difficulty: float = 0.5, *,
           depth: float | None = None, n_decoys: int | None = None, phrasing: str | None = None,
           markers: bool = True, filler: str = "words") -> Sample:
    """Passkey retrieval: a 5-digit number hidden at ``depth`` (fraction 0..1 of the haystack,
    random when None) of filler text, asked at the end.

    ``<bos> ... <needle>the pass key is 12345. ... <query>the pass key is [12345<eos>]``.
    The question repeats the needle's own words, so the answer continues text seen before.
    ``meta["needle_pos"]`` is the index of the passkey's first digit. Difficulty adds decoy
    numbers (``"the room number is 48213."``) at random depths: ``n_decoys`` 0 -> 4.

    Generalisation knobs (defaults reproduce the layout above): ``phrasing`` ``"train"`` /
    ``"heldout"`` draws a subject, fact frame and question frame of that split
    (:func:`dnc.data.phrasings.needle_phrasings`, e.g. ``"# NOTE: the access code is 12345"`` /
    ``"Q: what was the access code?\\nA: [12345]"``); decoys then use other subjects of the split in
    the same frame. When the drawn wording does not fit ``length`` the shortest of the split is
    used. ``markers=False`` drops ``<needle>``/``<query>``; ``filler`` picks the filler source."""
    _check_common(length, difficulty)
    rng = _as_rng(rng)
    check_filler(filler)
    d = float(rng.random()) if depth is None else float(depth)
    if not 0.0 <= d <= 1.0:
        raise ValueError(f"needle: depth must be in [0, 1], got {depth!r}")
    nd = n_decoys if n_decoys is not None else _lerp(0, 4, difficulty)
    nums = rng.integers(10000, 100000, size=1 + nd)
    if phrasing is None:
        p, decoy_subjects = _LEGACY_NEEDLE, ["room number"] * nd
        shortest = p
    else:
        options = ph.needle_phrasings(ph.check_split(phrasing))
        p = options[int(rng.integers(0, len(options)))]
        others = [s for s in ph.of_split(ph.NEEDLE_SUBJECTS, phrasing) if s != p.subject]
        if n_decoys is None:
            nd = min(nd, len(others))
        if nd > len(others):
            raise ValueError(f"needle: {nd} decoys need {nd} other subjects; split {phrasing!r} "
                             f"has {len(others)}")
        decoy_subjects = [others[i] for i in rng.permutation(len(others))[:nd]]
        shortest = ph.shortest_needle(phrasing)
    key = _enc(str(int(nums[0])))

    def need(parts, k: int) -> int:
        ins, question, _ = parts
        return 1 + len(question) + len(key) + 1 + sum(len(x) for x in ins[: 1 + k])

    for attempt in (p, shortest):
        p = attempt
        if p is not _LEGACY_NEEDLE and p.subject in decoy_subjects:  # the shortest may clash
            decoy_subjects = [s for s in ph.of_split(ph.NEEDLE_SUBJECTS, phrasing)
                              if s != p.subject][:nd]
        parts = _needle_parts(p, nums, decoy_subjects, markers)
        if n_decoys is None:
            while nd > 0 and need(parts, nd) > length:
                nd -= 1
        if need(parts, nd) <= length:
            break
    if need(parts, nd) > length:
        raise _too_short("needle", length, need(parts, nd), f"a passkey and {nd} decoys")
    ins, question, key_offset = parts
    fixed = 1 + len(question) + len(key) + 1
    fr = [d] + list(rng.random(nd))
    region, starts = _with_inserts(rng, length - fixed, ins[: 1 + nd], fr, source=filler)
    b = _Builder()
    b.add(BOS)
    b.add(region)
    b.add(question)
    b.add(key, answer=True)
    b.add(EOS, answer=True)
    needle_pos = 1 + starts[0] + key_offset
    extra = _retrieval_meta(phrasing, markers, filler, subject=p.subject, fact=p.fact,
                            question=p.question)
    return b.build("needle", dict(
        difficulty=float(difficulty), length=int(length), depth=d, n_decoys=nd,
        passkey=_dec(key), needle_pos=int(needle_pos),
        distance=int(length - len(key) - 1 - needle_pos), **extra))



def relational(rng: np.random.Generator, length: int, difficulty: float = 0.5, *,
               hops: int | None = None, n_people: int | None = None, phrasing: str | None = None,
               markers: bool = True, filler: str = "words") -> Sample:
    """Multi-hop family facts ``"Ann is the parent of Bob."`` scattered in filler, then a question
    ``hops`` generations up: ``"who is the grandparent of Cy?"`` (1 parent, 2 grandparent,
    3 great-grandparent). Every person has at most one parent, so the answer is unique and
    derivable from the facts alone.

    Difficulty: ``hops`` 1 -> 3 and ``n_people`` hops+1 -> hops+7 (distractor relatives).
    When they do not fit ``length``, distractors are dropped first, then hops.

    Generalisation knobs (defaults reproduce the layout above): ``phrasing`` ``"train"`` /
    ``"heldout"`` words each fact with its own frame of that split (``"Bob's parent is Ann. "``,
    ``"# Bob.parent = Ann"``) and the question with one (``"Cy's grandparent is [Ann]"``); when
    they do not fit, the split's shortest frames are used. ``markers=False`` drops
    ``<query>``/``<answer>``; ``filler`` picks the filler source."""
    _check_common(length, difficulty)
    rng = _as_rng(rng)
    check_filler(filler)
    h = hops if hops is not None else 1 + min(2, int(difficulty * 3))
    if h not in _REL_WORDS:
        raise ValueError(f"relational: hops must be 1, 2 or 3, got {hops!r}")
    extra = (n_people - h - 1) if n_people is not None else _lerp(0, 6, difficulty)
    if extra < 0 or h + 1 + extra > len(NAMES):
        raise ValueError(f"relational: n_people must be in [{h + 1}, {len(NAMES)}], got {n_people}")
    # Draw everything once for the requested sizes; shrinking only drops facts.
    names = [NAMES[i] for i in rng.permutation(len(NAMES))[: h + 1 + extra]]
    attach = rng.random(extra)
    order_u = rng.random(h + extra)
    frac_u = rng.random(h + extra)
    if phrasing is None:
        fact_frames = ["{p} is the parent of {c}. "] * (h + extra)
        q_frame = "who is the {rel} of {x}?"
        short = (fact_frames, q_frame)
    else:
        facts_split = ph.of_split(ph.RELATION_FACTS, ph.check_split(phrasing))
        qs_split = ph.of_split(ph.RELATION_QUESTIONS, phrasing)
        fact_frames = [facts_split[i] for i in rng.integers(0, len(facts_split), size=h + extra)]
        q_frame = qs_split[int(rng.integers(0, len(qs_split)))]
        short = ([min(facts_split, key=len)] * (h + extra), min(qs_split, key=len))
    q_head, q_tail = ([QUERY], [ANSWER]) if markers else ([], [])

    def plan(h_: int, extra_: int):
        """Facts (child -> parent) of a chain of ``h_`` hops plus ``extra_`` distractors."""
        chain = names[: h_ + 1]
        parent = {chain[i]: chain[i - 1] for i in range(1, h_ + 1)}
        pool = list(chain)
        for j, nm in enumerate(names[h + 1: h + 1 + extra_]):
            # A distractor hangs under anyone already placed (a sibling or cousin) or starts a new
            # root; either way it never changes the target's ancestors.
            r = int(attach[j] * (len(pool) + 1))
            if r < len(pool):
                parent[nm] = pool[r]
            pool.append(nm)
        facts = [fact_frames[j].format(p=p, c=c) for j, (c, p) in enumerate(parent.items())]
        order = np.argsort(order_u[: len(facts)], kind="stable")
        enc_facts = [_enc(facts[i]) for i in order]
        q = np.concatenate([np.array(q_head, dtype=np.int32),
                            _enc(q_frame.format(rel=_REL_WORDS[h_], x=chain[h_])),
                            np.array(q_tail, dtype=np.int32)]).astype(np.int32)
        a = _enc(chain[0])
        need = 1 + len(q) + len(a) + 1 + sum(len(f) for f in enc_facts)
        return enc_facts, q, a, need, len(pool)

    h0, extra0 = h, extra
    for attempt in range(2):
        if attempt:  # the drawn wording did not fit: the split's shortest frames, sizes afresh
            (fact_frames, q_frame), h, extra = short, h0, extra0
        facts, q, a, need, people = plan(h, extra)
        while need > length and (n_people is None and extra > 0 or hops is None and h > 1):
            if n_people is None and extra > 0:
                extra -= 1
            else:
                h -= 1
            facts, q, a, need, people = plan(h, extra)
        if need <= length or phrasing is None:
            break
    if need > length:
        raise _too_short("relational", length, need, f"{h} hops and {people} people")
    fixed = 1 + len(q) + len(a) + 1
    region, starts = _with_inserts(rng, length - fixed, facts, frac_u[: len(facts)], source=filler)
    b = _Builder()
    b.add(BOS)
    b.add(region)
    b.add(q)
    b.add(a, answer=True)
    b.add(EOS, answer=True)
    return b.build("relational", dict(
        difficulty=float(difficulty), length=int(length), hops=h, n_people=people,
        n_facts=len(facts), target=names[h], answer_name=names[0],
        first_fact_pos=int(1 + min(starts)),
        **_retrieval_meta(phrasing, markers, filler, facts=sorted(set(fact_frames)),
                          question=q_frame)))



def mqar(rng: np.random.Generator, length: int, difficulty: float = 0.5, *,
         n_pairs: int | None = None, n_queries: int | None = None, key_len: int | None = None,
         value_len: int = 1, phrasing: str | None = None, markers: bool = True,
         filler: str = "words") -> Sample:
    """Multi-query associative recall: ``n_pairs`` key/value pairs, filler, then ``n_queries``
    queries (distinct keys while ``n_queries <= n_pairs``); every query's value is an answer
    span, the final ``<eos>`` closes the last one. Exact match = every query right.

    ``<bos>(<key>KV)*n<sep> filler (<query>K[V])*q [<eos>]`` (values follow keys directly,
    as in :func:`kv_retrieval`).
    Difficulty: ``n_pairs`` 2 -> 32; ``n_queries`` defaults to ``n_pairs``; keys are 1 letter
    up to 16 pairs, else 2. ``phrasing`` / ``markers`` / ``filler`` as in :func:`kv_retrieval`
    (one pair frame and one question frame per sample; worded queries are one per line)."""
    _check_common(length, difficulty)
    rng = _as_rng(rng)
    check_filler(filler)
    explicit = n_pairs is not None
    n = n_pairs if explicit else _lerp(2, 32, difficulty)
    fact_frame, q_frame = _pair_frames(rng, phrasing)
    m = int(bool(markers))
    gap = int(q_frame != "{k}")  # a worded query ends its line, so the next one does not glue on

    def sizes(n_: int) -> tuple[int, int, int]:
        kl = key_len if key_len is not None else (1 if n_ <= 16 else 2)
        nq = n_queries if n_queries is not None else n_
        pair = m + _frame_len(fact_frame, k="A" * kl, v="0" * value_len)
        query = m + _frame_len(q_frame, k="A" * kl) + value_len + gap
        return kl, nq, 1 + n_ * pair + m + nq * query - gap + 1

    kl, nq, need = sizes(n)
    if not explicit:
        while n > 1 and need > length:
            n -= 1
            kl, nq, need = sizes(n)
    if n < 1 or nq < 1 or need > length:
        raise _too_short("mqar", length, need, f"{n} pairs and {nq} queries")
    keys = _distinct_codes(rng, n, kl, KEY_ALPHABET)
    vals = _random_codes(rng, n, value_len, VALUE_ALPHABET)
    qs = (rng.permutation(n)[:nq] if nq <= n else rng.integers(0, n, size=nq))
    b = _Builder()
    b.add(BOS)
    b.add(_pairs(keys, vals, fact_frame, markers))
    if markers:
        b.add(SEP)
    b.add(_question_side(_filler_fn(rng, length - need, source=filler), markers))
    for j, i in enumerate(qs):
        if j and gap:
            b.add(_enc("\n"))
        if markers:
            b.add(QUERY)
        b.add(keys[i] if q_frame == "{k}" else _enc(q_frame.format(k=_dec(keys[i]))))
        b.add(vals[i], answer=True)
    b.add(EOS, answer=True)
    return b.build("mqar", dict(difficulty=float(difficulty), length=int(length), n_pairs=n,
                                n_queries=int(nq), key_len=kl, value_len=value_len,
                                query_indices=[int(i) for i in qs],
                                **_retrieval_meta(phrasing, markers, filler, pair=fact_frame,
                                                  question=q_frame)))



# ------------------------------------------------------------------------------------------------
# Registry, scoring, batching
# ------------------------------------------------------------------------------------------------
TASKS: dict[str, TaskGenerator] = {
    "copy": copy_task,
    "kv_retrieval": kv_retrieval,
    "fill_blank": fill_blank,
    "needle": needle,
    "relational": relational,
    "mqar": mqar,
}
"""Task name -> generator ``(rng, length, difficulty=0.5, **kw) -> Sample``."""


def generate(task: str, rng: np.random.Generator | int | None, length: int,
             difficulty: float = 0.5, **kw: Any) -> Sample:
    """One sample of ``task`` with exactly ``length`` tokens; ``kw`` are the task's own knobs
    (e.g. ``depth=`` for needle, ``hops=`` for relational, ``prefix_len=`` for kv_retrieval).
    The retrieval tasks (needle, kv_retrieval, relational, mqar) also take ``phrasing``
    (``"train"``/``"heldout"``/``"mixed"``), ``markers`` or ``marker_prob``, and ``filler`` (a source of
    :mod:`dnc.data.filler_text`, or ``"mixed"``)."""
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    rng = _as_rng(rng)
    kw = _resolve_mixtures(task, rng, kw)
    return TASKS[task](rng, int(length), float(difficulty), **kw)


def _resolve_mixtures(task: str, rng: np.random.Generator, kw: dict[str, Any]) -> dict[str, Any]:
    """Per-sample draws of the curriculum's mixtures (one rng draw each, only when asked for, so
    samples without them stay what they were): ``marker_prob`` -> ``markers`` (True with that
    probability), ``filler="mixed"`` -> ``"words"`` or ``"stdlib"``, ``phrasing="mixed"`` -> the
    original template (None) or ``"train"`` (even odds each). Nothing here ever picks a held-out
    phrasing or filler: those are only given explicitly, by evaluations."""
    if "marker_prob" in kw:
        kw = dict(kw)
        p = kw.pop("marker_prob")
        if "markers" in kw:
            raise ValueError(f"{task}: give markers or marker_prob, not both")
        if not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"{task}: marker_prob must be a probability in [0, 1], got {p!r}")
        kw["markers"] = bool(rng.random() < float(p))
    if kw.get("filler") == "mixed":
        kw = dict(kw, filler="words" if rng.random() < 0.5 else "stdlib")
    if kw.get("phrasing") == "mixed":
        kw = dict(kw, phrasing=None if rng.random() < 0.5 else "train")
    return kw


def _cut_at_eos(ids: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)
    hit = np.flatnonzero(arr == EOS)
    return arr[: hit[0]] if len(hit) else arr


def score(sample: Sample, predicted_answer_tokens: Sequence[int] | np.ndarray) -> bool:
    """Exact match. The prediction is cut at its first ``<eos>``; it is right iff what remains
    equals ``sample.answer`` without its ``<eos>`` (so trailing junk before an ``<eos>``, or a
    missing token, is wrong)."""
    return bool(np.array_equal(_cut_at_eos(predicted_answer_tokens),
                               np.asarray(sample.answer[:-1], dtype=np.int64)))


PredictFn = Callable[[np.ndarray, int], Sequence[int]]
"""``predict_fn(prefix_tokens [P] int32, max_new) -> list[int]`` new tokens (greedy decoding)."""


def predict_answer(sample: Sample, predict_fn: PredictFn) -> list[int]:
    """The model's answer to ``sample`` in the form :func:`score` takes.

    For each answer span (one for most tasks; one per query for mqar) the model gets the true
    prefix up to that span (teacher forcing of earlier queries) and ``span length`` new tokens;
    the pieces are concatenated. A piece that stops early is padded with ``-1`` (never a token)."""
    out: list[int] = []
    for s, e in sample.meta["answer_spans"]:
        k = e - s
        got = [int(t) for t in list(predict_fn(sample.tokens[:s], k))[:k]]
        if len(got) < k and not (got and got[-1] == EOS):
            got += [-1] * (k - len(got))
        out += got
        if got and got[-1] == EOS:
            break
    return out


def collate(samples: Sequence[Sample], pad_id: int | None = None,
            pad_to_multiple: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded next-token batch.

    Returns (``T`` = longest sample - 1, rounded up to ``pad_to_multiple``):
      ``tokens`` LongTensor ``[B, T]``: inputs ``sample.tokens[:-1]``, then ``pad_id``;
      ``targets`` LongTensor ``[B, T]``: ``sample.tokens[1:]`` where the loss mask is True, else -100;
      ``loss_mask`` BoolTensor ``[B, T]``: ``sample.loss_mask[1:]`` (False on padding);
      ``lengths`` LongTensor ``[B]``: valid input positions (``len(sample) - 1``);
      ``answer_start`` LongTensor ``[B]``: ``sample.answer_start`` (index in the unshifted sequence).
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
    pad = PAD if pad_id is None else int(pad_id)
    lens = np.array([len(s) - 1 for s in samples], dtype=np.int64)
    if lens.min() < 1:
        raise ValueError("every sample needs at least 2 tokens")
    T = int(math.ceil(lens.max() / pad_to_multiple) * pad_to_multiple)
    B = len(samples)
    tokens = np.full((B, T), pad, dtype=np.int64)
    targets = np.full((B, T), -100, dtype=np.int64)
    mask = np.zeros((B, T), dtype=bool)
    for i, s in enumerate(samples):
        n = lens[i]
        tokens[i, :n] = s.tokens[:-1]
        m = s.loss_mask[1:]
        mask[i, :n] = m
        targets[i, :n] = np.where(m, s.tokens[1:], -100)
    return {
        "tokens": torch.from_numpy(tokens),
        "targets": torch.from_numpy(targets),
        "loss_mask": torch.from_numpy(mask),
        "lengths": torch.from_numpy(lens),
        "answer_start": torch.tensor([s.answer_start for s in samples], dtype=torch.long),
    }


__all__ = [
    "Sample", "TaskGenerator", "TASKS", "generate", "score", "predict_answer", "collate", "filler",
    "copy_task", "kv_retrieval", "fill_blank", "needle", "relational", "mqar",
    "KEY_ALPHABET", "VALUE_ALPHABET", "COPY_ALPHABET", "WORDS", "NAMES", "PredictFn",
]
