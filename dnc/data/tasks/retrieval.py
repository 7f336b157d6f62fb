"""Retrieval tasks: key/value recall (:func:`kv_retrieval`, one query; :func:`mqar`, many) and
passkey retrieval (:func:`needle`). The layouts and difficulty knobs are in :mod:`dnc.data.tasks`."""

from __future__ import annotations

from itertools import islice
from typing import Sequence

import numpy as np

from dnc.data import phrasings as ph
from dnc.data.filler_text import check_filler
from dnc.data.tasks.builder import (Sample, SampleBuilder, as_rng, check_common, distinct_codes,
                                    facts_then_question, lerp, random_codes, retrieval_meta,
                                    too_short)
from dnc.data.tasks.builder import filler as filler_tokens  # the generators' ``filler=`` is a source name
from dnc.data.tasks.vocab import (BOS, EOS, KEY, KEY_ALPHABET, NEEDLE, QUERY, SEP, VALUE_ALPHABET,
                                  decode_ids, encode_text)


def _pair_frames(rng: np.random.Generator, phrasing: str | None) -> tuple[str, str]:
    """(pair fact frame, question frame) of kv_retrieval / mqar: the original ``"{k}{v}"`` /
    ``"{k}"`` without a phrasing (no rng drawn), else one of each from the phrasing's split."""
    if phrasing is None:
        return "{k}{v}", "{k}"
    return (str(ph.draw(rng, ph.of_split(ph.PAIR_FACTS, phrasing))),
            str(ph.draw(rng, ph.of_split(ph.PAIR_QUESTIONS, phrasing))))


def _frame_len(frame: str, **fields: str) -> int:
    return len(frame.format(**fields).encode("utf-8"))


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
    check_common(length, difficulty)
    rng = as_rng(rng)
    check_filler(filler)
    explicit = n_pairs is not None
    vlen = value_len if value_len is not None else lerp(1, 4, difficulty)
    n = n_pairs if explicit else lerp(2, 32, difficulty)
    fact_frame, q_frame = _pair_frames(rng, phrasing)
    m = int(bool(markers))
    pair = m + _frame_len(fact_frame, k="A" * key_len, v="0" * vlen)
    q_len = _frame_len(q_frame, k="A" * key_len)
    tail_after_fill = m + q_len + vlen + 1  # query marker, question, value, eos
    tail = m + tail_after_fill  # + sep
    budget = (prefix_len if prefix_len is not None else length - tail) - 1  # minus bos
    if prefix_len is not None and prefix_len + tail > length:
        raise too_short("kv_retrieval", length, prefix_len + tail, f"prefix_len={prefix_len}")
    if not explicit:
        n = max(1, min(n, budget // pair))
    if n < 1 or n * pair > budget:
        where = f"prefix_len={prefix_len}" if prefix_len is not None else f"length={length}"
        raise ValueError(f"kv_retrieval: {n} pairs of {pair} tokens do not fit in {where} "
                         f"(need {1 + n * pair} + {tail} query tokens); raise it or lower n_pairs")
    keys = distinct_codes(rng, n, key_len, KEY_ALPHABET)
    vals = random_codes(rng, n, vlen, VALUE_ALPHABET)
    q = int(rng.integers(0, n))
    b = SampleBuilder()
    b.add(BOS)
    b.add(_pairs(keys, vals, fact_frame, markers))
    if prefix_len is not None:
        b.add(filler_tokens(rng, prefix_len - b.n, source=filler))
    if markers:
        b.add(SEP)
    b.add(_question_side(filler_tokens(rng, length - b.n - tail_after_fill, source=filler), markers))
    if markers:
        b.add(QUERY)
    b.add(q_frame.format(k=decode_ids(keys[q])))
    b.add(vals[q], answer=True)
    b.add(EOS, answer=True)
    return b.build("kv_retrieval", dict(
        difficulty=float(difficulty), length=int(length), n_pairs=n, key_len=key_len,
        value_len=vlen, query_index=q, prefix_len=prefix_len,
        pair_pos=int(1 + q * pair), distance=int(length - tail - (1 + q * pair)),
        **retrieval_meta(phrasing, markers, filler, pair=fact_frame, question=q_frame)))


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
    text = [encode_text(frame.format(k=decode_ids(k), v=decode_ids(v))) for k, v in zip(keys, vals)]
    if markers:
        text = [np.concatenate([[KEY], t]) for t in text]
    return np.concatenate(text).astype(np.int32)


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
    check_common(length, difficulty)
    rng = as_rng(rng)
    check_filler(filler)
    explicit = n_pairs is not None
    n = n_pairs if explicit else lerp(2, 32, difficulty)
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
        raise too_short("mqar", length, need, f"{n} pairs and {nq} queries")
    keys = distinct_codes(rng, n, kl, KEY_ALPHABET)
    vals = random_codes(rng, n, value_len, VALUE_ALPHABET)
    qs = (rng.permutation(n)[:nq] if nq <= n else rng.integers(0, n, size=nq))
    b = SampleBuilder()
    b.add(BOS)
    b.add(_pairs(keys, vals, fact_frame, markers))
    if markers:
        b.add(SEP)
    b.add(_question_side(filler_tokens(rng, length - need, source=filler), markers))
    for j, i in enumerate(qs):
        if j and gap:
            b.add(encode_text("\n"))
        if markers:
            b.add(QUERY)
        b.add(keys[i] if q_frame == "{k}" else encode_text(q_frame.format(k=decode_ids(keys[i]))))
        b.add(vals[i], answer=True)
    b.add(EOS, answer=True)
    return b.build("mqar", dict(difficulty=float(difficulty), length=int(length), n_pairs=n,
                                n_queries=int(nq), key_len=kl, value_len=value_len,
                                query_indices=[int(i) for i in qs],
                                **retrieval_meta(phrasing, markers, filler, pair=fact_frame,
                                                  question=q_frame)))


WORDED_MIN_DECOYS = 2
"""Decoys a worded needle carries at difficulty 0 (when ``n_decoys`` is not given): other subjects'
numbers in the same frame. Without them the passkey was the only number in a words-filler haystack,
and a model learnt to answer with "the number" instead of the one its subject names: the session-13
checkpoint found 9/16 worded needles in words filler and 3/16 in stdlib text, which has numbers of
its own (``bench/results/heldout_parts_cpu_heldout_*``)."""

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
    ins = [np.concatenate([np.array(head, dtype=np.int32), encode_text(fact)]).astype(np.int32)]
    ins += [encode_text(p.fact_text(str(int(x)), subject=s)) for x, s in zip(nums[1:], decoy_subjects)]
    question = np.concatenate([np.array([QUERY] if markers else [], dtype=np.int32),
                               encode_text(p.question_text())]).astype(np.int32)
    return ins, question, len(head) + before_key


def needle(rng: np.random.Generator, length: int, difficulty: float = 0.5, *,
           depth: float | None = None, n_decoys: int | None = None, phrasing: str | None = None,
           markers: bool = True, filler: str = "words") -> Sample:
    """Passkey retrieval: a 5-digit number hidden at ``depth`` (fraction 0..1 of the haystack,
    random when None) of filler text, asked at the end.

    ``<bos> ... <needle>the pass key is 12345. ... <query>the pass key is [12345<eos>]``.
    The question repeats the needle's own words, so the answer continues text seen before.
    ``meta["needle_pos"]`` is the index of the passkey's first digit, ``meta["fact_pos"]`` that of
    the fact's first token (marker or words before the digits). Difficulty adds decoy
    numbers (``"the room number is 48213."``) at random depths: ``n_decoys`` 0 -> 4 (worded:
    :data:`WORDED_MIN_DECOYS` -> 4, so the subject has to be matched).

    Generalisation knobs (defaults reproduce the layout above): ``phrasing`` ``"train"`` /
    ``"heldout"`` draws a subject, fact frame and question frame of that split
    (:func:`dnc.data.phrasings.draw_needle`, e.g. ``"# NOTE: the access code is 12345"`` /
    ``"Q: what was the access code?\\nA: [12345]"``; the train split is procedural, thousands of
    subjects and frames); decoys then use other subjects of the split in
    the same frame. When the drawn wording does not fit ``length`` the shortest of the split is
    used. ``phrasing`` may also hold out only some parts (:data:`dnc.data.phrasings.PART_PHRASINGS`,
    e.g. ``"heldout_subject"``: a held-out subject in train frames; decoys take subjects of the
    subject's split), to tell which part a model fails on. ``markers=False`` drops
    ``<needle>``/``<query>``; ``filler`` picks the filler source."""
    check_common(length, difficulty)
    rng = as_rng(rng)
    check_filler(filler)
    d = float(rng.random()) if depth is None else float(depth)
    if not 0.0 <= d <= 1.0:
        raise ValueError(f"needle: depth must be in [0, 1], got {depth!r}")
    low = 0 if phrasing is None else WORDED_MIN_DECOYS  # the template keeps its headline layout
    nd = n_decoys if n_decoys is not None else lerp(low, 4, difficulty)
    nums = rng.integers(10000, 100000, size=1 + nd)
    if phrasing is None:
        p, decoy_subjects = _LEGACY_NEEDLE, ["room number"] * nd
        shortest = p
    else:
        p = ph.draw_needle(rng, phrasing)
        split = ph.needle_part_splits(phrasing)[0]
        n_others = len(ph.subject_pool(split)) - 1
        if n_decoys is None:
            nd = min(nd, n_others)
        if nd > n_others:
            raise ValueError(f"needle: {nd} decoys need {nd} other subjects; split {phrasing!r} "
                             f"has {n_others}")
        decoy_subjects = ph.draw_other_subjects(rng, split, nd, p.subject)
        shortest = ph.shortest_needle(phrasing)
    key = encode_text(str(int(nums[0])))

    def need(parts, k: int) -> int:
        ins, question, _ = parts
        return 1 + len(question) + len(key) + 1 + sum(len(x) for x in ins[: 1 + k])

    for attempt in (p, shortest):
        p = attempt
        if p is not _LEGACY_NEEDLE and p.subject in decoy_subjects:  # the shortest may clash
            decoy_subjects = list(islice((s for s in ph.subject_pool(split) if s != p.subject), nd))
        parts = _needle_parts(p, nums, decoy_subjects, markers)
        if n_decoys is None:
            while nd > 0 and need(parts, nd) > length:
                nd -= 1
        if need(parts, nd) <= length:
            break
    if need(parts, nd) > length:
        raise too_short("needle", length, need(parts, nd), f"a passkey and {nd} decoys")
    ins, question, key_offset = parts
    fr = [d] + list(rng.random(nd))
    b, starts = facts_then_question(rng, length, ins[: 1 + nd], fr, question, key, source=filler)
    fact_pos = 1 + starts[0]  # the fact's first token (its marker, when it has one)
    needle_pos = fact_pos + key_offset
    extra = retrieval_meta(phrasing, markers, filler, subject=p.subject, fact=p.fact,
                            question=p.question)
    return b.build("needle", dict(
        difficulty=float(difficulty), length=int(length), depth=d, n_decoys=nd,
        passkey=decode_ids(key), needle_pos=int(needle_pos), fact_pos=int(fact_pos),
        distance=int(length - len(key) - 1 - needle_pos), **extra))
