"""Task generators, scorer, collate and the fsspec corpus reader (fast, no Ray)."""

from __future__ import annotations

import re
import sys

import fsspec
import numpy as np
import pytest
import torch

from dnc.data import corpus
from dnc.data.tasks import (BLANK, EOS, KEY, NAMES, TASKS, Sample, collate, generate,
                            predict_answer, score)
from dnc.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
ALL_TASKS = sorted(TASKS)
KEY_LETTERS = {ord(c) for c in "ABCDEFGHIJKLMNOP"}


def _check_invariants(s: Sample, length: int) -> None:
    assert s.tokens.dtype == np.int32 and s.loss_mask.dtype == bool
    assert s.tokens.shape == s.loss_mask.shape == (length,)
    assert s.tokens[0] == TOK.bos_id
    assert ((s.tokens >= 0) & (s.tokens < TOK.vocab_size)).all()
    np.testing.assert_array_equal(s.tokens[s.loss_mask], s.answer)
    assert s.answer[-1] == EOS and s.tokens[-1] == EOS
    assert s.loss_mask[s.answer_start] and not s.loss_mask[: s.answer_start].any()
    # What precedes the answer: the <answer> marker, or for the lookup tasks the words the
    # answer followed earlier (the key; the needle's "the pass key is ").
    before = {"kv_retrieval": KEY_LETTERS, "mqar": KEY_LETTERS, "needle": {ord(" ")}}
    assert s.tokens[s.answer_start - 1] in before.get(s.task, {TOK.token_id("<answer>")})
    # Only the answer spans are masked, and they cover the mask exactly.
    m = np.zeros(length, bool)
    for a, b in s.meta["answer_spans"]:
        m[a:b] = True
    np.testing.assert_array_equal(m, s.loss_mask)


@pytest.mark.parametrize("task", ALL_TASKS)
@pytest.mark.parametrize("length", [64, 257, 4096])
@pytest.mark.parametrize("difficulty", [0.0, 0.5, 1.0])
def test_task_shapes_and_mask(task, length, difficulty):
    s = generate(task, np.random.default_rng(7), length, difficulty)
    assert s.task == task
    _check_invariants(s, length)


@pytest.mark.parametrize("task", ALL_TASKS)
def test_task_determinism(task):
    a = generate(task, np.random.default_rng(3), 500, 0.7)
    b = generate(task, np.random.default_rng(3), 500, 0.7)
    c = generate(task, np.random.default_rng(4), 500, 0.7)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert a.meta == b.meta
    assert not np.array_equal(a.tokens, c.tokens)
    # An int seed is the same as default_rng(seed).
    np.testing.assert_array_equal(generate(task, 3, 500, 0.7).tokens, a.tokens)


@pytest.mark.parametrize("task", ALL_TASKS)
def test_task_100k(task):
    s = generate(task, 0, 100_000, 1.0)
    _check_invariants(s, 100_000)


def test_needle_1m():
    s = generate("needle", 0, 1_000_000, 0.5, depth=0.25)
    _check_invariants(s, 1_000_000)
    assert abs(s.meta["needle_pos"] / 1_000_000 - 0.25) < 0.001


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_needle_depth(depth):
    L = 20_000
    s = generate("needle", 11, L, 1.0, depth=depth)
    pos = s.meta["needle_pos"]
    assert abs(pos / L - depth) < 0.01
    # The passkey sits right there, behind its <needle> phrase, and is the answer.
    np.testing.assert_array_equal(s.tokens[pos: pos + 5], s.answer[:-1])
    assert TOK.decode(s.tokens[pos - 16: pos]) == "the pass key is "
    assert s.tokens[pos - 17] == TOK.token_id("<needle>")
    # Decoys are other numbers, never the passkey; the passkey occurs once before the question.
    text = TOK.decode(s.prompt)
    assert text.count(s.meta["passkey"]) == 1
    assert text.count("the room number is") == s.meta["n_decoys"] == 4


@pytest.mark.parametrize("hops", [1, 2, 3])
@pytest.mark.parametrize("seed", range(5))
def test_relational_answer_rederived_from_facts(hops, seed):
    s = generate("relational", seed, 2000, 1.0, hops=hops)
    assert s.meta["hops"] == hops
    text = TOK.decode(s.prompt)
    parent = {}
    for p, c in re.findall(r"(\w+) is the parent of (\w+)\.", text):
        assert c not in parent, "a person must have one parent"
        parent[c] = p
    rel, target = re.search(r"who is the ([\w-]+) of (\w+)\?", text).groups()
    assert rel == {1: "parent", 2: "grandparent", 3: "great-grandparent"}[hops]
    x = target
    for _ in range(hops):
        x = parent[x]
    assert TOK.decode(s.answer) == x
    assert x in NAMES


def test_relational_shrinks_to_fit_and_explicit_raises():
    s = generate("relational", 0, 64, 1.0)  # difficulty asks for 3 hops; only 1 fits
    _check_invariants(s, 64)
    with pytest.raises(ValueError, match="too short"):
        generate("relational", 0, 64, 1.0, hops=3)


def test_kv_retrieval_prefix_len():
    L, P = 5000, 200
    s = generate("kv_retrieval", 1, L, 0.5, prefix_len=P, n_pairs=10)
    _check_invariants(s, L)
    keys = np.flatnonzero(s.tokens == KEY)
    assert len(keys) == 10 and keys.max() < P
    assert s.tokens[P] == TOK.sep_id
    # Query at the very end: <query> K K V V <eos>.
    tail = s.tokens[-(1 + 2 + s.meta["value_len"] + 1):]
    assert tail[0] == TOK.token_id("<query>")
    pairs = dict(re.findall(r"<key>([A-P]{2})([0-9]+)",
                            TOK.decode(s.tokens[:P], skip_special=False)))
    assert len(pairs) == 10
    key = TOK.decode(tail[1:3])
    assert pairs[key] == TOK.decode(s.answer)
    with pytest.raises(ValueError):
        generate("kv_retrieval", 1, L, 0.5, prefix_len=20, n_pairs=10)


def test_mqar_answers_and_predict_answer():
    s = generate("mqar", 2, 400, 0.4)
    _check_invariants(s, 400)
    n_q = s.meta["n_queries"]
    assert len(s.meta["answer_spans"]) == n_q
    assert (s.tokens == TOK.token_id("<query>")).sum() == n_q

    def oracle(prefix, max_new):  # reads the true continuation: a perfect model
        return s.tokens[len(prefix): len(prefix) + max_new].tolist()

    pred = predict_answer(s, oracle)
    assert score(s, pred)

    def wrong_last(prefix, max_new):
        out = oracle(prefix, max_new)
        if len(prefix) + max_new == len(s):  # the last query
            out[0] = (out[0] - ord("0") + 1) % 10 + ord("0")
        return out

    assert not score(s, predict_answer(s, wrong_last))


def test_score_cases():
    s = generate("kv_retrieval", 0, 200, 0.5)
    ans = s.answer.tolist()
    assert score(s, ans)
    assert score(s, ans + [65, 66])           # anything after <eos> is ignored
    assert score(s, ans[:-1])                 # no <eos> but exactly the answer
    assert not score(s, ans[:-2] + [EOS])     # a missing token
    assert not score(s, ans[:-1] + [65, EOS])  # extra junk before <eos>
    assert not score(s, [EOS])
    assert not score(s, [])
    bad = list(ans)
    bad[0] = bad[0] + 1
    assert not score(s, bad)
    assert score(s, np.array(ans))


def test_fill_blank_answer_from_earlier_record():
    s = generate("fill_blank", 5, 3000, 1.0)
    text = TOK.decode(s.prompt, skip_special=False)
    q = text.split("<query>")[1].split("<answer>")[0]
    assert (s.tokens == BLANK).sum() == 1
    before, after = q.split("<blank>")
    rec_id = before.split(":")[0]
    assert re.fullmatch(r"[A-Z]{3}", rec_id)
    record = re.search(re.escape(rec_id) + r": [^\n]*\n", text.split("<query>")[0]).group(0)
    assert record == before + TOK.decode(s.answer) + after + "\n"


def test_generate_errors():
    with pytest.raises(KeyError, match="unknown task"):
        generate("nope", 0, 100)
    with pytest.raises(ValueError, match="difficulty"):
        generate("copy", 0, 100, 1.5)
    with pytest.raises(ValueError, match="depth"):
        generate("needle", 0, 100, depth=2.0)


def test_collate_shift_and_padding():
    samples = [generate("copy", 0, 70, 0.0), generate("needle", 1, 100, 0.0)]
    b = collate(samples, pad_id=TOK.pad_id, pad_to_multiple=32)
    assert b["tokens"].shape == b["targets"].shape == b["loss_mask"].shape == (2, 128)
    assert b["tokens"].dtype == torch.long and b["loss_mask"].dtype == torch.bool
    assert b["lengths"].tolist() == [69, 99]
    for i, s in enumerate(samples):
        n = len(s) - 1
        np.testing.assert_array_equal(b["tokens"][i, :n].numpy(), s.tokens[:-1])
        assert (b["tokens"][i, n:] == TOK.pad_id).all()
        assert (b["targets"][i, n:] == -100).all() and not b["loss_mask"][i, n:].any()
        m = b["loss_mask"][i, :n].numpy()
        np.testing.assert_array_equal(m, s.loss_mask[1:])
        tgt = b["targets"][i, :n].numpy()
        np.testing.assert_array_equal(tgt[m], s.answer)   # the answer, shifted by one
        assert (tgt[~m] == -100).all()
        # Target at input position answer_start-1 is the first answer token.
        assert tgt[s.answer_start - 1] == s.answer[0]
    assert collate(samples, pad_id=0)["tokens"].shape == (2, 99)


# ------------------------------------------------------------------------------- corpus
def _write_corpus(fs_root: str):
    """A .txt, a nested .md and a Parquet file under ``fs_root`` (any fsspec URI)."""
    with fsspec.open(f"{fs_root}/a.txt", "w") as f:
        f.write("hello world")
    with fsspec.open(f"{fs_root}/sub/b.md", "w") as f:
        f.write("# title\nbody é")
    with fsspec.open(f"{fs_root}/ignored.bin", "wb") as f:
        f.write(b"\x00\x01")
    corpus.write_parquet(["row one", "row two", "row three"], f"{fs_root}/shard-0.parquet")


def test_corpus_local_dir_and_parquet(tmp_path):
    _write_corpus(str(tmp_path))
    files = corpus.resolve_paths(tmp_path)
    assert [f.rsplit("/", 1)[-1] for f in files] == ["a.txt", "shard-0.parquet", "b.md"]
    assert all(not f.startswith("file:") for f in files)
    docs = list(corpus.iter_documents(str(tmp_path)))
    assert docs == ["hello world", "row one", "row two", "row three", "# title\nbody é"]
    assert list(corpus.iter_documents(str(tmp_path / "*.parquet"))) == ["row one", "row two",
                                                                       "row three"]
    with pytest.raises(ValueError, match="no column 'content'"):
        list(corpus.iter_documents(str(tmp_path / "shard-0.parquet"), text_column="content"))
    with pytest.raises(FileNotFoundError):
        corpus.resolve_paths(str(tmp_path / "missing.txt"))


def test_corpus_parquet_written_with_pyarrow(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": [1, 2, 3], "content": ["alpha", None, "gamma"]})
    pq.write_table(table, tmp_path / "x.parquet")
    docs = list(corpus.iter_documents([tmp_path / "x.parquet"], text_column="content"))
    assert docs == ["alpha", "gamma"]


def test_corpus_memory_fs():
    root = "memory://dnc-test-corpus"
    _write_corpus(root)
    try:
        files = corpus.resolve_paths(root)
        assert all(f.startswith("memory://") for f in files) and len(files) == 3
        assert corpus.resolve_paths(f"{root}/*.txt") == [f"memory:///dnc-test-corpus/a.txt"]
        docs = list(corpus.iter_documents(root))
        assert "row two" in docs and "hello world" in docs and len(docs) == 5
    finally:
        fsspec.filesystem("memory").rm("/dnc-test-corpus", recursive=True)


def test_chunk_documents():
    docs = ["abc", "de", "fghij"]
    chunks = list(corpus.chunk_documents(docs, 4))
    flat = np.concatenate(chunks)
    expected = []
    for d in docs:
        expected += list(d.encode()) + [EOS]
    assert all(c.shape == (4,) and c.dtype == np.int32 for c in chunks)
    np.testing.assert_array_equal(flat, expected[: len(flat)])
    assert len(chunks) == len(expected) // 4
    tail = list(corpus.chunk_documents(docs, 4, drop_last=False))
    assert len(tail) == len(chunks) + 1 and tail[-1][-1] == TOK.pad_id


def test_stdlib_split():
    train = corpus.stdlib_source_files("train")
    ev = corpus.stdlib_source_files("eval")
    assert train and ev
    assert not set(train) & set(ev)
    assert len(ev) < len(train)
    assert train == corpus.stdlib_source_files("train")  # deterministic
    assert sorted(train + ev) == corpus.stdlib_source_files("all")
    assert not any("site-packages" in p for p in train + ev)
    doc = next(corpus.iter_documents(ev[:1]))
    assert len(doc) > 0


def test_bits_per_byte():
    assert corpus.bits_per_byte(np.log(2) * 100, 100) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        corpus.bits_per_byte(1.0, 0)


def test_no_ray_import():
    import subprocess

    code = "import dnc.data, sys; assert 'ray' not in sys.modules, 'dnc.data imported ray'"
    subprocess.run([sys.executable, "-c", code], check=True)
