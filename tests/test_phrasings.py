"""Generalisation data (issue 11): many phrasings split into train / held-out, filler from real text
with a held-out source, marker-free retrieval tasks, and a curriculum through which nothing held-out
ever reaches training."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from dnc.data import phrasings as ph
from dnc.data.corpus import stdlib_source_files
from dnc.data.curriculum import Curriculum, Stage, load_stages
from dnc.data.filler_text import corpus_bytes
from dnc.data.tasks import (ANSWER, BOS, EOS, KEY, NAMES, NEEDLE, QUERY, SEP, generate)

RETRIEVAL = ("needle", "kv_retrieval", "relational", "mqar")
MARKERS = {NEEDLE, QUERY, KEY, SEP, ANSWER}


def text_of(tokens) -> str:
    """Bytes as text; special tokens become NUL (so no template can match across one)."""
    return bytes(int(t) if t < 256 else 0 for t in tokens).decode("utf-8", "replace")


def _check(s, length: int) -> None:
    assert len(s) == length and s.tokens.dtype == np.int32
    assert np.array_equal(s.tokens[s.loss_mask], s.answer) and s.answer[-1] == EOS
    assert s.loss_mask[s.answer_start] and s.tokens[0] == BOS


# ---------------------------------------------------------------------------------------------- the split
def test_every_family_has_train_and_heldout_templates_and_dozens_of_needle_phrasings():
    for table in (ph.NEEDLE_SUBJECTS, ph.NEEDLE_FACTS, ph.NEEDLE_QUESTIONS, ph.PAIR_FACTS,
                  ph.PAIR_QUESTIONS, ph.RELATION_FACTS, ph.RELATION_QUESTIONS):
        train, held = ph.of_split(table, "train"), ph.of_split(table, "heldout")
        assert train and held and not set(train) & set(held)
        assert len(set(train + held)) == len(table)  # no template listed twice
    held = ph.needle_phrasings("heldout")
    assert len(held) >= 50
    # the train needle split is procedural: thousands of subjects and fact frames, >100 questions
    assert len(ph.subject_pool("train")) >= 5000 and len(ph.fact_pool("train")) >= 2000
    assert len(ph.question_pool("train")) >= 100
    for pool in (ph.subject_pool, ph.fact_pool, ph.question_pool):
        assert not set(pool("train")) & set(pool("heldout"))
    with pytest.raises(ValueError, match="phrasing must be one of"):
        ph.of_split(ph.PAIR_FACTS, "test")
    with pytest.raises(ValueError, match="draw it with draw_needle"):
        ph.needle_phrasings("train")


def test_no_heldout_subject_word_or_frame_can_come_out_of_the_train_pools():
    """Disjointness by construction: every train subject, fact and question frame the sampler can
    draw is checked, not a sample of them."""
    held_subjects = ph.of_split(ph.NEEDLE_SUBJECTS, "heldout")
    train_table_words = {w.lower() for s in ph.of_split(ph.NEEDLE_SUBJECTS, "train") for w in s.split()}
    # the held-out words no train subject may have: every word of a held-out subject the train table lacks
    assert set(ph.HELDOUT_SUBJECT_WORDS) == {w.lower() for s in held_subjects for w in s.split()} - train_table_words
    for s in ph.subject_pool("train"):
        low = s.lower()
        assert not any(w in low for w in ph.HELDOUT_SUBJECT_WORDS), s
        assert ph.identifier(s) not in {ph.identifier(h) for h in held_subjects}
    # frames: a train frame rendered with a listed subject never matches a held-out frame (anywhere in it)
    fact_rx = [ph.template_regex(f) for f in ph.of_split(ph.NEEDLE_FACTS, "heldout")]
    q_rx = [ph.template_regex(q + "{v}") for q in ph.of_split(ph.NEEDLE_QUESTIONS, "heldout")]
    n = 0
    for subject in ("pass key", "PIN"):
        for f in ph.fact_pool("train"):
            text = ph.NeedlePhrasing(subject, f, f, "train").fact_text("12345")
            assert text.count("12345") == 1 and not any(r.search(text) for r in fact_rx + q_rx), text
            n += 1
        for q in ph.question_pool("train"):
            text = ph.NeedlePhrasing(subject, q, q, "train").question_text() + "12345"
            assert "{" not in text and not any(r.search(text) for r in fact_rx + q_rx), text
            n += 1
    assert n == 2 * (len(ph.fact_pool("train")) + len(ph.question_pool("train")))
    # the checks can fail: a held-out frame or subject word is caught
    assert fact_rx[0].search(ph.NeedlePhrasing("pass key", ph.of_split(ph.NEEDLE_FACTS, "heldout")[0], "",
                                               "heldout").fact_text("12345"))
    # every frame names its subject, so a question can only be answered by matching it
    for f in ph.fact_pool("train") + ph.question_pool("train"):
        assert any(x in f for x in ("{s}", "{S}", "{i}")), f


def test_train_draws_cover_the_pools_and_part_mixes_take_each_part_from_its_split():
    rng = np.random.default_rng(1)
    got = [ph.draw_needle(rng, "train") for _ in range(3000)]
    assert all(ph.is_needle_phrasing(p, "train") for p in got)
    assert len({p.subject for p in got}) > 2000 and len({p.fact for p in got}) > 1500
    assert len({p.question for p in got}) > 100
    for phrasing, splits in ph.PART_PHRASINGS.items():
        for _ in range(50):
            p = ph.draw_needle(rng, phrasing)
            assert ph.is_needle_phrasing(p, phrasing)
            for part, split in zip(ph.NEEDLE_PARTS, splits):
                if split == ph.ECHO:  # the question repeats the fact up to its value
                    assert p.fact.startswith(p.question) and p.fact[len(p.question):].startswith("{v}")
                    continue
                pool = {"subject": ph.subject_pool, "fact": ph.fact_pool, "question": ph.question_pool}[part]
                assert getattr(p, part) in pool(split) and getattr(p, part) not in pool(
                    "train" if split == "heldout" else "heldout")
        kw = {"needle": {"phrasing": phrasing}}
        if "heldout" in splits:
            with pytest.raises(ValueError, match="held-out data"):
                Stage(name="s", tasks={"needle": 1.0}, min_len=64, max_len=128, task_kwargs=kw)
        else:  # an echo question of train parts is train data
            Stage(name="s", tasks={"needle": 1.0}, min_len=64, max_len=128, task_kwargs=kw)
    with pytest.raises(ValueError, match="needle phrasing must be one of"):
        generate("needle", 0, 400, phrasing="heldout_filler")


# ---------------------------------------------------------------------------------------------- the tasks
@pytest.mark.parametrize("task", RETRIEVAL)
@pytest.mark.parametrize("phrasing", [None, "train", "heldout"])
@pytest.mark.parametrize("markers", [True, False])
def test_retrieval_tasks_in_every_wording(task, phrasing, markers):
    rng = np.random.default_rng(7)
    for length, filler in ((300, "words"), (2000, "stdlib"), (5000, "stdlib_heldout")):
        for _ in range(4):
            s = generate(task, rng, length, 0.6, phrasing=phrasing, markers=markers, filler=filler)
            _check(s, length)
            assert s.meta["phrasing"] == (phrasing or "template") and s.meta["filler"] == filler
            specials = set(s.tokens[s.tokens >= 256].tolist()) - {BOS, EOS}
            if markers:
                assert QUERY in specials
            else:
                assert not specials & MARKERS, s.text()[-200:]


def test_needle_phrasing_puts_the_fact_at_needle_pos_and_asks_in_the_question_frame():
    rng = np.random.default_rng(3)
    for split in ph.SPLITS:
        for markers in (True, False):
            for _ in range(20):
                s = generate("needle", rng, 800, 1.0, phrasing=split, markers=markers, filler="stdlib")
                key, f = s.meta["passkey"], s.meta["frames"]
                p = ph.NeedlePhrasing(f["subject"], f["fact"], f["question"], split)
                assert ph.is_needle_phrasing(p, split)
                assert text_of(s.tokens[s.meta["needle_pos"]:s.meta["needle_pos"] + 5]) == key
                assert p.fact_text(key) in text_of(s.tokens)
                fact = s.tokens[s.meta["fact_pos"] + int(markers):s.meta["needle_pos"] + 5]
                assert p.fact_text(key).startswith(text_of(fact))  # fact_pos: the fact's first token
                assert text_of(s.prompt).endswith(p.question_text())
                # decoys: the same frame with other subjects of the split, other numbers
                text = text_of(s.tokens[:s.answer_start])
                found = [(m.group("s"), m.group("v")) for m in _any_subject(p.fact).finditer(text)]
                assert sum(v == key for _, v in found) == 1 and len(found) >= 1 + s.meta["n_decoys"]


def _any_subject(frame: str) -> re.Pattern[str]:
    """``frame`` with its value as group ``v`` and any subject (in any of its forms) as group ``s``."""
    forms = {"s": r"[A-Za-z][\w ]*?", "S": r"[A-Z][A-Z0-9_]*", "i": r"[a-z][a-z0-9_]*"}
    out, pos, seen = [], 0, False
    for m in re.finditer(r"\{(\w)\}", frame):
        out.append(re.escape(frame[pos:m.start()]))
        name = m.group(1)
        if name == "v":
            out.append(r"(?P<v>\d+)")
        elif not seen:
            out.append(f"(?P<s>{forms[name]})")
            seen = True
        else:
            out.append(forms[name])
        pos = m.end()
    return re.compile("".join(out) + re.escape(frame[pos:]))


def test_worded_needles_carry_decoys_from_difficulty_zero_and_the_template_does_not():
    """A worded needle alone in a digit-free haystack can be answered with "the only number"; its
    decoys (other subjects' numbers in the same frame) make the subject the only way to the answer."""
    from dnc.data.tasks.retrieval import WORDED_MIN_DECOYS

    rng = np.random.default_rng(4)
    for filler in ("words", "stdlib"):
        for _ in range(20):
            s = generate("needle", rng, 2048, 0.0, phrasing="train", filler=filler, markers=False)
            assert s.meta["n_decoys"] == WORDED_MIN_DECOYS >= 2
            f = s.meta["frames"]
            found = {m.group("s"): m.group("v") for m in _any_subject(f["fact"]).finditer(text_of(s.prompt))}
            values = [v for v in found.values() if len(v) == 5]
            assert s.meta["passkey"] in values and len(set(values)) >= 1 + WORDED_MIN_DECOYS
    assert generate("needle", rng, 2048, 0.0, filler="words").meta["n_decoys"] == 0  # the headline layout
    assert generate("needle", rng, 2048, 0.0, phrasing="heldout", n_decoys=0).meta["n_decoys"] == 0  # evals ask


def test_needle_falls_back_to_the_shortest_wording_when_the_drawn_one_does_not_fit():
    short = ph.shortest_needle("train")
    need = 1 + 1 + len(short.fact_text("00000")) + 1 + len(short.question_text()) + 5 + 1
    for seed in range(30):
        s = generate("needle", seed, need, 0.0, phrasing="train")
        assert s.meta["frames"]["fact"] == short.fact or len(s) == need
    with pytest.raises(ValueError, match="too short"):
        generate("needle", 0, need - 1, 0.0, phrasing="train")


def _parse_relations(text: str) -> dict[str, str]:
    """child -> parent from every relation fact frame found in ``text``."""
    parent = {}
    for frame, _ in ph.RELATION_FACTS:
        rx = re.escape(frame).replace(r"\{p\}", r"(?P<p>[A-Z][a-z]+)").replace(r"\{c\}", r"(?P<c>[A-Z][a-z]+)")
        for m in re.finditer(rx, text):
            if m.group("c") in NAMES and m.group("p") in NAMES:
                parent[m.group("c")] = m.group("p")
    return parent


@pytest.mark.parametrize("split", ph.SPLITS)
def test_relational_answer_rederived_from_worded_facts(split):
    rng = np.random.default_rng(11)
    for _ in range(25):
        s = generate("relational", rng, 1500, 1.0, phrasing=split, markers=bool(rng.random() < 0.5))
        parent = _parse_relations(text_of(s.prompt))
        assert len(parent) == s.meta["n_facts"]
        x = s.meta["target"]
        for _ in range(s.meta["hops"]):
            x = parent[x]
        assert x == s.meta["answer_name"] == text_of(s.answer[:-1])
        assert set(s.meta["frames"]["facts"]) <= set(ph.of_split(ph.RELATION_FACTS, split))


@pytest.mark.parametrize("task", ["kv_retrieval", "mqar"])
def test_pair_answers_are_the_values_written_with_the_keys(task):
    rng = np.random.default_rng(5)
    for split in ph.SPLITS:
        for _ in range(20):
            s = generate(task, rng, 600, 0.5, phrasing=split, markers=bool(rng.random() < 0.5))
            f = s.meta["frames"]
            rx = re.escape(f["pair"]).replace(r"\{k\}", "(?P<k>[A-P]+)").replace(r"\{v\}", r"(?P<v>\d+)")
            pairs = {m.group("k"): m.group("v") for m in re.finditer(rx, text_of(s.tokens[:s.answer_start]))}
            assert len(pairs) >= s.meta["n_pairs"]
            for a, b in s.meta["answer_spans"]:
                q = text_of(s.tokens[:a])
                key = re.search(re.escape(f["question"]).replace(r"\{k\}", "([A-P]+)") + "$", q).group(1)
                assert text_of([t for t in s.tokens[a:b] if t != EOS]) == pairs[key]


def test_defaults_keep_the_original_template():
    s = generate("needle", 0, 300, 0.0, depth=0.5)
    assert "the pass key is " + s.meta["passkey"] in s.text() and s.meta["phrasing"] == "template"
    assert NEEDLE in s.tokens and "frames" not in s.meta


# ---------------------------------------------------------------------------------------------- filler
def test_stdlib_filler_is_real_text_of_its_own_split():
    train = corpus_bytes("stdlib").tobytes()
    held = corpus_bytes("stdlib_heldout").tobytes()
    assert len(train) > 10 * 2048 and len(held) > 10 * 2048
    for source, mine, other in (("stdlib", train, held), ("stdlib_heldout", held, train)):
        s = generate("kv_retrieval", 1, 3000, 0.2, filler=source)
        sep = int(np.flatnonzero(s.tokens == SEP)[0])
        body = bytes(s.tokens[sep + 1:sep + 1 + 1500].astype(np.uint8).tolist())
        assert body in mine and body not in other
    a = generate("needle", 9, 4000, 0.5, filler="stdlib", phrasing="train")
    b = generate("needle", 9, 4000, 0.5, filler="stdlib", phrasing="train")
    assert np.array_equal(a.tokens, b.tokens)  # deterministic in the rng
    assert set(stdlib_source_files("train")).isdisjoint(stdlib_source_files("eval"))


def test_mixtures_are_drawn_per_sample():
    rng = np.random.default_rng(0)
    got = [generate("needle", rng, 400, 0.0, phrasing="mixed", marker_prob=0.7, filler="mixed").meta
           for _ in range(400)]
    markers = np.mean([m["markers"] for m in got])
    assert 0.6 < markers < 0.8
    assert {m["filler"] for m in got} == {"words", "stdlib"}
    assert {m["phrasing"] for m in got} == {"template", "train"}
    with pytest.raises(ValueError, match="marker_prob must be a probability"):
        generate("needle", 0, 400, marker_prob=1.5)
    with pytest.raises(ValueError, match="filler must be one of"):
        generate("needle", 0, 400, filler="wiki")


# ---------------------------------------------------------------------------------------------- no leaks
def _heldout_detectors() -> list[re.Pattern[str]]:
    out = []
    for f in ph.of_split(ph.NEEDLE_FACTS, "heldout"):
        out.append(ph.template_regex(f))
    for q in ph.of_split(ph.NEEDLE_QUESTIONS, "heldout"):
        out.append(ph.template_regex(q + "{v}"))
    for s in ph.of_split(ph.NEEDLE_SUBJECTS, "heldout"):
        out.append(re.compile(re.escape(s) + r"|" + re.escape(ph.identifier(s))))
    for table in (ph.PAIR_FACTS, ph.RELATION_FACTS):
        out += [ph.template_regex(f) for f in ph.of_split(table, "heldout")]
    out += [ph.template_regex(q + "{v}") for q in ph.of_split(ph.PAIR_QUESTIONS, "heldout")]
    out += [ph.template_regex(q + "{p}") for q in ph.of_split(ph.RELATION_QUESTIONS, "heldout")]
    return out


def _heldout_only_lines() -> set[str]:
    """Lines (stripped, >= 40 characters) of the held-out stdlib modules that no train module has."""
    def lines(source):
        return {ln.strip() for ln in corpus_bytes(source).tobytes().decode("utf-8", "replace").splitlines()
                if len(ln.strip()) >= 40}
    return lines("stdlib_heldout") - lines("stdlib")


def _leaks(text: str, detectors, held_lines: set[str]) -> list[str]:
    found = [m.group(0) for d in detectors for m in [d.search(text)] if m]
    # the first and last line of a filler slice may be cut: only whole lines count
    found += [ln.strip() for ln in text.splitlines()[1:-1] if ln.strip() in held_lines]
    return found


def test_no_heldout_phrasing_or_filler_reaches_training_batches():
    detectors, held_lines = _heldout_detectors(), _heldout_only_lines()
    assert len(held_lines) > 1000
    # the detectors do find held-out data when it is there (so this test can fail)
    for task in RETRIEVAL:
        s = generate(task, 2, 4000, 0.5, phrasing="heldout", filler="stdlib_heldout")
        assert _leaks(text_of(s.tokens), detectors, held_lines), task
    n_rows = 0
    for segment_len in (32, 256):
        cur = Curriculum(seed=segment_len, segment_len=segment_len, pad_to_multiple=segment_len)
        for stage in range(len(cur.stages)):
            cur._enter_stage(stage, step=0)
            for d in (cur.stage.difficulty[0], cur.stage.difficulty[1]):
                cur.difficulty = {t: d for t in cur.difficulty}
                batch = cur.sample_batch(8 if segment_len == 256 else 32)
                for row, L in zip(batch["tokens"], batch["lengths"]):
                    text = text_of(row[:int(L)].tolist())
                    assert not _leaks(text, detectors, held_lines), text
                    n_rows += 1
    assert n_rows == 2 * 5 * (32 + 8)


def test_training_stages_refuse_heldout_data():
    with pytest.raises(ValueError, match="held-out data"):
        Stage(name="s", tasks={"needle": 1.0}, min_len=64, max_len=128,
              task_kwargs={"needle": {"phrasing": "heldout"}})
    with pytest.raises(ValueError, match="evaluation only"):
        Stage(name="s", tasks={"mqar": 1.0}, min_len=64, max_len=128,
              task_kwargs={"mqar": {"filler": "stdlib_heldout"}})
    for st in load_stages():  # the repo's stages do mix in the generalisation data
        for t in set(st.active_tasks) & set(RETRIEVAL):
            kw = st.task_kwargs[t]
            assert kw["phrasing"] == "mixed" and kw["filler"] == "mixed" and 0 < kw["marker_prob"] < 1


def test_phrasings_module_is_plain_python():
    src = (Path(ph.__file__)).read_text()
    assert "import ray" not in src and "import torch" not in src
