"""Batched teacher-forced exact match (``dnc.training.exact_match``) against the greedy path it
replaces (``predict_answer`` with ``model.generate``, then ``score``), on a real tiny DNC.

The model memorises half of a pool of samples (every curriculum task, MQAR's many spans, markers
off, held-out phrasings) in a few dozen steps, so the verdicts are a mix: memorised samples right,
unseen ones wrong, and memorised ones with one answer token changed right up to that token and
wrong from it (the case where greedy decoding's later tokens depend on its own outputs)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from dnc.config import preset
from dnc.data import tasks as task_lib
from dnc.data.curriculum import Curriculum, Stage
from dnc.model import DNC
from dnc.training.evaluate import _stable_hash, greedy_predict_fn, task_accuracy
from dnc.training.exact_match import TeacherForcedScorer, answer_positions, span_hits

LENGTHS = (64, 96)           # 2-3 segments of the tiny preset: bank writes and reads happen
RETRIEVAL = ("needle", "kv_retrieval", "relational", "mqar")
ACC_TASKS = ("copy", "needle", "mqar")
ACC_SEED = 7


def stage() -> Stage:
    return Stage(name="all", tasks={t: 1.0 for t in task_lib.TASKS}, min_len=LENGTHS[0], max_len=LENGTHS[1],
                 task_kwargs={"mqar": {"n_pairs": 3}})


class Recorder:
    """A SampleScorer that keeps the samples it is asked about (and calls them all wrong)."""

    def score_samples(self, samples):
        self.samples = list(samples)
        return [False] * len(samples)


def corrupted(sample: task_lib.Sample, which: int) -> task_lib.Sample:
    """``sample`` with answer token ``which`` (not the ``<eos>``) replaced by another of its kind."""
    pos = answer_positions(sample)[which]
    toks = sample.tokens.copy()
    t = int(toks[pos])
    toks[pos] = ord("0") + (t - ord("0") + 1) % 10 if chr(t).isdigit() else (t - 32 + 1) % 94 + 32
    return dataclasses.replace(sample, tokens=toks, answer=toks[sample.loss_mask].copy())


def pool() -> tuple[list[task_lib.Sample], list[task_lib.Sample]]:
    """(samples to memorise, samples never trained on): the curriculum's eval set, task_accuracy's
    samples and worded variants of the retrieval tasks."""
    rec = Recorder()
    Curriculum([stage()], seed=0).evaluate(rec, n_per_task=1)
    samples = list(rec.samples)
    for task in ACC_TASKS:  # task_accuracy's draws: rng per (seed, task, length), difficulty 0.5
        rng = np.random.default_rng([ACC_SEED, _stable_hash(task), LENGTHS[1]])
        samples += [task_lib.generate(task, rng, LENGTHS[1], 0.5, **({"n_pairs": 3} if task == "mqar" else {}))
                    for _ in range(2)]
    rng = np.random.default_rng(1)
    for task in RETRIEVAL:
        for kw in ({"markers": False}, {"phrasing": "heldout", "filler": "stdlib_heldout"}):
            kw = dict(kw, **({"n_pairs": 3} if task == "mqar" else {}))
            samples += [task_lib.generate(task, rng, LENGTHS[1], 0.0, **kw) for _ in range(2)]
    return samples[::2], samples[1::2]


@pytest.fixture(scope="module")
def trained():
    """(model, memorised samples, unseen samples): a tiny DNC that has learnt the first set by heart."""
    torch.manual_seed(0)
    seen, unseen = pool()
    model = DNC(preset("tiny"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    b = task_lib.collate(seen)
    for _ in range(60):
        loss = model(b["tokens"], targets=b["targets"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), seen, unseen


def greedy(model, samples):
    predict = greedy_predict_fn(model, bf16=False)
    return [task_lib.predict_answer(s, predict) for s in samples]


def test_teacher_forcing_gives_greedy_verdicts_for_every_task(trained):
    model, seen, unseen = trained
    # memorised ones with a changed answer token: a late one (all but the last span right) and the first
    edits = [corrupted(s, len(answer_positions(s)) - 2) for s in seen] + [corrupted(s, 0) for s in seen[:6]]
    samples = seen + unseen + edits
    preds = greedy(model, samples)
    want = [task_lib.score(s, p) for s, p in zip(samples, preds)]
    scorer = TeacherForcedScorer(model, bf16=False)
    assert scorer.score_samples(samples) == want
    # a mix: most memorised samples right, most others wrong, and both for every task
    n_seen = len(seen)
    assert sum(want[:n_seen]) >= 0.8 * n_seen and sum(want[n_seen:]) <= 0.2 * (len(samples) - n_seen)
    for task in task_lib.TASKS:
        assert {v for s, v in zip(samples, want) if s.task == task} == {True, False}, task
    assert any(not s.meta.get("markers", True) for s, v in zip(samples, want) if v)
    assert any(s.meta.get("phrasing") == "heldout" for s, v in zip(samples, want) if v)
    # an edited sample is right exactly up to its edit: greedy's later tokens were its own
    hits = scorer.hits(edits)
    assert all(h[:-2].all() and not h[-2] for h, v in zip(hits[:n_seen], want[:n_seen]) if v)
    # MQAR's per-query counts: a span is right when greedy from the true prefix reproduced it
    for s, p, h in zip(samples, preds, scorer.hits(samples)):
        if s.task != "mqar":
            continue
        got, i = [], 0
        for a, e in s.meta["answer_spans"]:
            true = s.tokens[a:e][:-1] if s.tokens[e - 1] == task_lib.EOS else s.tokens[a:e]
            got.append(list(p[i:i + len(true)]) == [int(t) for t in true])
            i += e - a
        assert span_hits(s, h) == got


def test_curriculum_and_task_accuracy_agree_with_greedy(trained):
    model = trained[0]
    cur = Curriculum([stage()], seed=0)
    fast = cur.evaluate(TeacherForcedScorer(model, bf16=False), n_per_task=1)
    slow = cur.evaluate(greedy_predict_fn(model, bf16=False), n_per_task=1)
    assert fast == slow and 0 < sum(fast.values()) < len(fast)
    kw = dict(seed=ACC_SEED, difficulty=0.5, task_kwargs={"mqar": {"n_pairs": 3}})
    fast = task_accuracy(model, list(ACC_TASKS), [LENGTHS[1]], n=2, **kw)
    slow = task_accuracy(model, list(ACC_TASKS), [LENGTHS[1]], n=2, mode="greedy", **kw)
    assert fast == slow and any(a[LENGTHS[1]] > 0 for a in fast.values())
    assert model.training is False  # the mode it was in is restored


def test_batched_rows_do_not_leak_into_each_other(trained):
    """Rows of one forward are independent: changing one row's prompt changes its answer logits
    and leaves every other row's bit for bit; each row alone gives the same logits."""
    model, seen, unseen = trained
    batch = [s for s in seen + unseen if len(s) == LENGTHS[1]][:6]
    scorer = TeacherForcedScorer(model, bf16=False)
    base = scorer.answer_logits(batch)
    changed = dataclasses.replace(batch[2], tokens=batch[2].tokens.copy())
    changed.tokens[1:20] = np.asarray(task_lib.filler(np.random.default_rng(5), 19), dtype=np.int32)
    after = scorer.answer_logits(batch[:2] + [changed] + batch[3:])
    assert not torch.equal(after[2], base[2])
    for i in (0, 1, 3, 4, 5):
        assert torch.equal(after[i], base[i]), i
    for i, s in enumerate(batch):
        torch.testing.assert_close(scorer.answer_logits([s])[0], base[i])


def test_chunks_and_batch_splits_give_the_same_hits(trained):
    """The chunked gather (chunks not aligned with segments, answers across chunk edges) and
    batches split by max_rows / max_batch_tokens do not change what is read."""
    model, seen, unseen = trained
    samples = seen + unseen
    ref = TeacherForcedScorer(model, bf16=False).hits(samples)
    for kw in ({"chunk": 7}, {"max_rows": 3}, {"max_batch_tokens": 200}):
        got = TeacherForcedScorer(model, bf16=False, **kw).hits(samples)
        assert all(np.array_equal(a, b) for a, b in zip(got, ref)), kw


def test_long_context_teacher_reader_gives_the_greedy_readers_answers(trained):
    """bench/long_context.py's two scorers: (exact match, queries right, queries) per sample agree,
    MQAR's per-query counts included, read in segment chunks."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from long_context_eval import GreedyReader, TeacherReader, answers

    model, seen, unseen = trained
    samples = seen + unseen + [corrupted(s, len(answer_positions(s)) - 2) for s in seen if s.task == "mqar"]
    cpu = torch.device("cpu")
    seg = model.config.segment_len
    fast = answers(TeacherReader(model, seg, cpu, max_rows=4), samples)
    assert fast == answers(GreedyReader(model, seg, cpu), samples)
    mq = [r for s, r in zip(samples, fast) if s.task == "mqar"]
    assert any(r[0] for r in mq) and any(0 < r[1] < r[2] for r in mq)  # all right, and some queries right


def test_long_context_cell_group_records_what_cell_by_cell_reading_records(trained, tmp_path):
    """The passkey depths of one length read in one batched call are recorded cell for cell as the
    greedy reader records them one cell at a time (only the timing fields differ)."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import long_context
    import long_context_eval as lc
    from long_context_report import Run

    model, seen, unseen = trained
    needles = [s for s in seen + unseen if s.task == "needle" and len(s) == LENGTHS[1]]
    cells = [(LENGTHS[1], needles[i::3], {"depth": float(i)}) for i in range(3)]
    cpu = torch.device("cpu")
    seg = model.config.segment_len
    recorded = []
    for tag, reader in (("teacher", lc.TeacherReader(model, seg, cpu)), ("greedy", lc.GreedyReader(model, seg, cpu))):
        args = long_context.build_parser().parse_args(["--out", str(tmp_path / tag), "--tag", tag, "--device", "cpu"])
        run = Run(args, [], cpu, {"baseline_max_len": 1024})
        lc.run_cell_group(run, {"dnc": model}, {"dnc": reader}, "passkey", cells)
        recorded.append(json.loads(run.json_path.read_text())["cells"])
    teacher, greedy_cells = recorded
    assert [c.pop("shared_call_cells") for c in teacher] == [3, 3, 3] and "shared_call_cells" not in greedy_cells[0]
    for c in teacher + greedy_cells:
        assert c.pop("seconds") >= 0
    assert teacher == greedy_cells and 0 < sum(c["correct"] for c in teacher) < len(needles)


def test_long_samples_never_build_logits_beyond_a_chunk():
    """A sample of many segments goes through the model one chunk per call: no call returns more
    than ``[B, chunk, V]`` logits, whatever the sample length (1M-token samples stay bounded)."""
    torch.manual_seed(0)
    model = DNC(preset("tiny")).eval()
    samples = [task_lib.generate("needle", np.random.default_rng(i), 2048, 0.0) for i in range(3)]
    shapes = []
    hook = model.register_forward_hook(lambda mod, args, out: shapes.append(tuple(out.logits.shape)))
    try:
        hits = TeacherForcedScorer(model, bf16=False).hits(samples)
    finally:
        hook.remove()
    seg = model.config.segment_len
    assert len(shapes) == -(-2047 // seg) and max(s[1] for s in shapes) == seg and {s[0] for s in shapes} == {3}
    assert [len(h) for h in hits] == [len(s.answer) for s in samples]


def test_answers_that_break_the_equivalence_are_refused():
    s = task_lib.generate("kv_retrieval", 0, 64, 0.5)
    toks = s.tokens.copy()
    a, e = s.meta["answer_spans"][0]
    toks[a] = task_lib.EOS  # an <eos> inside the answer: greedy would stop there, teacher forcing not
    bad = dataclasses.replace(s, tokens=toks, answer=toks[s.loss_mask].copy())
    with pytest.raises(ValueError, match="only <eos>"):
        answer_positions(bad)
    with pytest.raises(ValueError, match="answer_spans"):
        answer_positions(dataclasses.replace(s, meta={}))
    with pytest.raises(ValueError, match="mode must be"):
        task_accuracy(DNC(preset("tiny")), ["copy"], [64], n=1, mode="sampled")
