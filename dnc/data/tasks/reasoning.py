"""Tasks beyond a single lookup: :func:`copy_task` (reproduce a string), :func:`fill_blank`
(complete a record seen earlier) and :func:`relational` (follow parent facts several hops). The
layouts and difficulty knobs are in :mod:`dnc.data.tasks`."""

from __future__ import annotations

import numpy as np

from dnc.data import phrasings as ph
from dnc.data.filler_text import check_filler
from dnc.data.tasks.builder import (Sample, SampleBuilder, as_rng, check_common, distinct_codes,
                                    facts_then_question, filler, lerp, random_codes,
                                    retrieval_meta, shrink_to_fit, too_short)
from dnc.data.tasks.vocab import (ANSWER, BLANK, BOS, COPY_ALPHABET, EOS, KEY, NAMES, QUERY, SEP,
                                  WORDS, decode_ids, encode_text)

_RECORD_WORDS_IDX = np.array([i for i, w in enumerate(WORDS) if len(w) <= 5], dtype=np.int64)
"""Indices of the short words fill_blank records are made of (keeps records short)."""

_REL_WORDS = {1: "parent", 2: "grandparent", 3: "great-grandparent"}


def copy_task(rng: np.random.Generator, length: int, difficulty: float = 0.5, *,
              str_len: int | None = None) -> Sample:
    """Copy a random string of ``str_len`` letters (difficulty: 4 -> 32) seen at the start.

    ``<bos><key>S<sep> filler <query><answer>[S<eos>]``."""
    check_common(length, difficulty)
    rng = as_rng(rng)
    fixed = 6  # bos key sep query answer eos
    n = str_len if str_len is not None else lerp(4, 32, difficulty)
    if str_len is None:
        n = max(1, min(n, (length - fixed) // 2))
    if fixed + 2 * n > length or n < 1:
        raise too_short("copy", length, fixed + 2 * max(n, 1), f"a string of {n}")
    s = random_codes(rng, 1, n, COPY_ALPHABET)[0]
    b = SampleBuilder()
    b.add([BOS, KEY])
    b.add(s)
    b.add(SEP)
    b.add(filler(rng, length - fixed - 2 * n))
    b.add([QUERY, ANSWER])
    b.add(s, answer=True)
    b.add(EOS, answer=True)
    return b.build("copy", dict(difficulty=float(difficulty), length=int(length), str_len=n,
                                distance=int(length - 2 - n)))


def fill_blank(rng: np.random.Generator, length: int, difficulty: float = 0.5, *,
               n_records: int | None = None, n_words: int | None = None) -> Sample:
    """Structured records ``"ABC: w1 w2 w3.\\n"`` scattered in filler; at the end one record
    comes back with a word replaced by ``<blank>``; the answer is that word.

    ``... ABC: w1 w2 w3.\\n ... <query>ABC: w1 <blank> w3.<answer>[w2<eos>]``.
    Record ids are 3 distinct upper-case letters, so the earlier occurrence is unambiguous.
    Difficulty: ``n_records`` 1 -> 8 (distractor records), ``n_words`` 3 -> 6 per record."""
    check_common(length, difficulty)
    rng = as_rng(rng)
    nw = n_words if n_words is not None else lerp(3, 6, difficulty)
    nr = n_records if n_records is not None else lerp(1, 8, difficulty)
    if nw < 1 or nr < 1:
        raise ValueError(f"fill_blank: n_words and n_records must be >= 1, got {nw}, {nr}")
    # Draw for the largest sizes first, so shrinking to fit never changes the rng stream.
    max_r, max_w = max(nr, 8), max(nw, 6)
    ids = distinct_codes(rng, max_r, 3, COPY_ALPHABET)
    words = _RECORD_WORDS_IDX[rng.integers(0, len(_RECORD_WORDS_IDX), size=(max_r, max_w))]
    blank_u = float(rng.random())
    target = 0  # ids are random, so the first record is as good as any

    def parts(r: int, w: int):
        recs = [encode_text(decode_ids(ids[i]) + ": " + " ".join(WORDS[x] for x in words[i, :w]) + ".\n")
                for i in range(r)]
        k = min(int(blank_u * w), w - 1)
        before = decode_ids(ids[target]) + ": " + "".join(WORDS[x] + " " for x in words[target, :k])
        after = "".join(" " + WORDS[x] for x in words[target, k + 1:w]) + "."
        q = np.concatenate([[QUERY], encode_text(before), [BLANK], encode_text(after), [ANSWER]])
        a = encode_text(WORDS[words[target, k]])
        return recs, q, a, k, 1 + len(q) + len(a) + 1 + sum(len(x) for x in recs)

    nr, nw, (rec, query, ans, blank_at, need) = shrink_to_fit(
        parts, length, nr, nw, 1 if n_records is None else nr, 2 if n_words is None else nw)
    if need > length:
        raise too_short("fill_blank", length, need, f"{nr} records of {nw} words")
    b, starts = facts_then_question(rng, length, rec, rng.random(nr), query, ans)
    return b.build("fill_blank", dict(
        difficulty=float(difficulty), length=int(length), n_records=nr, n_words=nw,
        blank_index=blank_at, record_pos=int(1 + starts[target]),
        distance=int(length - len(ans) - 1 - (1 + starts[target]))))


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
    check_common(length, difficulty)
    rng = as_rng(rng)
    check_filler(filler)
    h = hops if hops is not None else 1 + min(2, int(difficulty * 3))
    if h not in _REL_WORDS:
        raise ValueError(f"relational: hops must be 1, 2 or 3, got {hops!r}")
    extra = (n_people - h - 1) if n_people is not None else lerp(0, 6, difficulty)
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
        for j, nm in enumerate(names[h_ + 1: h_ + 1 + extra_]):
            # A distractor hangs under anyone already placed (a sibling or cousin) or starts a new
            # root; either way it never changes the target's ancestors.
            r = int(attach[j] * (len(pool) + 1))
            if r < len(pool):
                parent[nm] = pool[r]
            pool.append(nm)
        facts = [fact_frames[j].format(p=p, c=c) for j, (c, p) in enumerate(parent.items())]
        order = np.argsort(order_u[: len(facts)], kind="stable")
        enc_facts = [encode_text(facts[i]) for i in order]
        q = np.concatenate([np.array(q_head, dtype=np.int32),
                            encode_text(q_frame.format(rel=_REL_WORDS[h_], x=chain[h_])),
                            np.array(q_tail, dtype=np.int32)]).astype(np.int32)
        a = encode_text(chain[0])
        need = 1 + len(q) + len(a) + 1 + sum(len(f) for f in enc_facts)
        return enc_facts, q, a, len(pool), need

    h0, extra0 = h, extra
    for attempt in range(2):
        if attempt:  # the drawn wording did not fit: the split's shortest frames, sizes afresh
            (fact_frames, q_frame), h, extra = short, h0, extra0
        extra, h, (facts, q, a, people, need) = shrink_to_fit(
            lambda e, h_: plan(h_, e), length, extra, h,
            0 if n_people is None else extra, 1 if hops is None else h)
        if need <= length or phrasing is None:
            break
    if need > length:
        raise too_short("relational", length, need, f"{h} hops and {people} people")
    b, starts = facts_then_question(rng, length, facts, frac_u[: len(facts)], q, a, source=filler)
    return b.build("relational", dict(
        difficulty=float(difficulty), length=int(length), hops=h, n_people=people,
        n_facts=len(facts), target=names[h], answer_name=names[0],
        first_fact_pos=int(1 + min(starts)),
        **retrieval_meta(phrasing, markers, filler, facts=sorted(set(fact_frames)),
                          question=q_frame)))
