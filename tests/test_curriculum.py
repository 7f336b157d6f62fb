"""Curriculum: stage files, sampling, bucketing, adaptation, promotion, exact resume."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from dnc.data.curriculum import Curriculum, Stage, default_stage_dir, load_stages
from dnc.data.tasks import EOS

STAGE_NAMES = ["foundation", "basic_reasoning", "intermediate", "advanced", "expert"]


def _stages():
    return [
        Stage(name="a", tasks={"copy": 1.0, "kv_retrieval": 1.0}, min_len=64, max_len=128,
              difficulty=(0.0, 0.3), promote_at=0.8, min_steps=10, n_buckets=2),
        Stage(name="b", tasks={"needle": 1.0, "relational": 1.0}, min_len=128, max_len=512,
              difficulty=(0.2, 0.6), promote_at=0.8, min_steps=0,
              task_kwargs={"relational": {"hops": 1}}),
    ]


def test_default_stage_files_load_in_order():
    stages = load_stages()
    assert default_stage_dir().is_dir()
    assert [s.name for s in stages] == STAGE_NAMES
    # Lengths are in segments and grow stage by stage; the first already spans more than one.
    assert all(s.length_unit == "segments" for s in stages)
    assert 1 < stages[0].min_len and stages[0].max_len <= 8
    for a, b in zip(stages, stages[1:]):
        assert a.max_len <= b.max_len
    for seg in (32, 2048):  # tiny and small: every task fits its stage's min_len (checked on build)
        cur = Curriculum(segment_len=seg)
        assert cur.stage.name == "foundation"
        assert cur.stage.length_unit == "tokens" and cur.stage.min_len == round(stages[0].min_len * seg)


def test_stage_lengths_in_segments_need_a_segment_len():
    with pytest.raises(ValueError, match="segment_len"):
        Curriculum()
    st = Stage(name="s", tasks={"mqar": 1.0}, min_len=1.5, max_len=4, length_unit="segments")
    tok = st.in_tokens(32)
    assert (tok.min_len, tok.max_len, tok.length_unit) == (48, 128, "tokens")
    assert st.min_len == 1.5  # in_tokens returns a copy
    with pytest.raises(ValueError, match="length_unit"):
        Stage(name="s", tasks={"mqar": 1.0}, min_len=1, max_len=2, length_unit="lines")
    with pytest.raises(ValueError, match="whole numbers"):
        Stage(name="s", tasks={"mqar": 1.0}, min_len=64.5, max_len=128)


def test_stage_validation_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown tasks"):
        Stage(name="x", tasks={"nope": 1.0}, min_len=64, max_len=128)
    with pytest.raises(ValueError, match="min_len"):
        Stage(name="x", tasks={"copy": 1.0}, min_len=200, max_len=100)
    with pytest.raises(ValueError, match="does not fit"):
        Curriculum([Stage(name="x", tasks={"relational": 1.0}, min_len=64, max_len=128,
                          task_kwargs={"relational": {"hops": 3}})])
    (tmp_path / "s.yaml").write_text("name: s\ntasks: {copy: 1}\nmin_len: 64\nmax_len: 90\n"
                                     "bogus: 1\n")
    with pytest.raises(ValueError, match="unknown fields"):
        load_stages(tmp_path)


def test_custom_yaml_dir(tmp_path):
    (tmp_path / "two.yaml").write_text("order: 1\ntasks: {needle: 1}\nmin_len: 100\nmax_len: 200\n")
    (tmp_path / "one.yaml").write_text("order: 0\ntasks: {copy: 1}\nmin_len: 64\nmax_len: 96\n")
    cur = Curriculum(tmp_path)
    assert [s.name for s in cur.stages] == ["one", "two"]


def test_batch_shapes_and_bucketing():
    cur = Curriculum(_stages(), seed=1, pad_to_multiple=32)
    edges = cur.stage.bucket_edges()
    assert edges[0][0] == 64 and edges[-1][1] == 128 and len(edges) == 2
    seen_buckets = set()
    for _ in range(12):
        b = cur.sample_batch(6)
        lo, hi = edges[b["bucket"]]
        seen_buckets.add(b["bucket"])
        L = b["lengths"] + 1  # lengths are input positions (sample length - 1)
        assert ((L >= lo) & (L <= hi)).all(), "a batch shares one length bucket"
        T = b["tokens"].shape[1]
        assert T % 32 == 0 and T - int(b["lengths"].max()) < 32
        assert b["tokens"].shape == b["targets"].shape == (6, T)
        assert set(b["tasks"]) <= {"copy", "kv_retrieval"} and b["stage"] == "a"
        assert all(0.0 <= d <= 0.3 for d in b["difficulty"])
        # Every row has answer targets and they end with <eos>.
        for i in range(6):
            tgt = b["targets"][i][b["loss_mask"][i]]
            assert len(tgt) > 0 and tgt[-1] == EOS
    assert seen_buckets == {0, 1}


def test_state_dict_round_trip_reproduces_next_batches():
    cur = Curriculum(_stages(), seed=3, pad_to_multiple=16)
    for _ in range(3):
        cur.sample_batch(4)
    cur.record_losses({"copy": 2.5, "kv_retrieval": 0.7}, step=5)
    cur.adjust_difficulty({"copy": 0.95})
    state = json.loads(json.dumps(cur.state_dict()))  # must survive JSON exactly

    other = Curriculum(_stages(), seed=999, pad_to_multiple=16)
    other.load_state_dict(state)
    assert other.state_dict() == cur.state_dict()
    for _ in range(3):
        x, y = cur.sample_batch(4), other.sample_batch(4)
        for k in ("tokens", "targets", "loss_mask", "lengths"):
            assert torch.equal(x[k], y[k])
        assert x["tasks"] == y["tasks"] and x["difficulty"] == y["difficulty"]

    wrong = Curriculum(_stages()[:1])
    with pytest.raises(ValueError, match="stages"):
        wrong.load_state_dict(state)


def test_external_rng_leaves_state_untouched():
    cur = Curriculum(_stages(), seed=0)
    before = cur.state_dict()
    cur.sample_batch(2, rng=np.random.default_rng(5))
    assert cur.state_dict() == before


def test_loss_weighted_task_sampling():
    cur = Curriculum(_stages(), seed=0)
    p0 = cur.task_probabilities()
    assert p0 == pytest.approx({"copy": 0.5, "kv_retrieval": 0.5})
    cur.record_losses({"copy": 3.0, "kv_retrieval": 1.0})
    p = cur.task_probabilities()
    assert p["copy"] > 0.6 and sum(p.values()) == pytest.approx(1.0)
    counts = {"copy": 0, "kv_retrieval": 0}
    for _ in range(10):
        for t in cur.sample_batch(8)["tasks"]:
            counts[t] += 1
    assert counts["copy"] > counts["kv_retrieval"]
    cur.record_losses({"copy": float("nan")})  # ignored
    assert np.isfinite(cur.loss_ema["copy"])


def test_adjust_difficulty_within_stage_range():
    cur = Curriculum(_stages(), seed=0, difficulty_step=0.2)
    assert cur.difficulty == {"copy": 0.0, "kv_retrieval": 0.0}
    d = cur.adjust_difficulty({"copy": 1.0, "kv_retrieval": 0.2})
    assert d == {"copy": 0.2, "kv_retrieval": 0.0}
    d = cur.adjust_difficulty({"copy": 1.0})
    assert d["copy"] == 0.3  # capped at the stage's high end
    d = cur.adjust_difficulty({"copy": 0.1})
    assert d["copy"] == pytest.approx(0.1)
    d = cur.adjust_difficulty({"copy": 0.7})  # between thresholds: unchanged
    assert d["copy"] == pytest.approx(0.1)


def test_promotion():
    cur = Curriculum(_stages(), seed=0)
    assert not cur.maybe_promote(0.99, step=5)     # before min_steps
    assert not cur.maybe_promote(0.5, step=20)     # below promote_at
    assert cur.stage.name == "a"
    assert cur.maybe_promote({"copy": 0.9, "kv_retrieval": 0.85}, step=20)
    assert cur.stage.name == "b" and cur.stage_start_step == 20
    assert cur.difficulty == {"needle": 0.2, "relational": 0.2}  # restarts at the new low end
    assert cur.history[-1]["to"] == "b"
    b = cur.sample_batch(4)
    assert set(b["tasks"]) <= {"needle", "relational"}
    assert (b["lengths"] + 1 >= 128).all()
    assert not cur.maybe_promote(1.0, step=100)     # the last stage never promotes
    assert cur.is_last_stage


def test_max_steps_moves_a_stalled_stage_on():
    a, b = _stages()
    cur = Curriculum([dataclasses.replace(a, max_steps=30), b], seed=0)
    assert not cur.maybe_promote(0.1, step=29)      # below promote_at, before max_steps
    assert cur.maybe_promote(0.1, step=30)          # below promote_at, but the stage ran max_steps
    assert cur.stage.name == "b" and cur.history[-1]["reason"] == "max_steps"
    cur2 = Curriculum(_stages(), seed=0)
    assert cur2.maybe_promote(0.9, step=20) and cur2.history[-1]["reason"] == "promote_at"
    with pytest.raises(ValueError, match="max_steps"):
        dataclasses.replace(a, max_steps=5)         # below min_steps (10)


def test_replay_draws_a_share_of_batches_from_an_earlier_stage():
    a, b = _stages()
    cur = Curriculum([a, dataclasses.replace(b, replay={"a": 0.25})], seed=0)
    assert cur.maybe_promote(0.9, step=20) and cur.stage.name == "b"
    batches = [cur.sample_batch(4) for _ in range(400)]
    replayed = [x for x in batches if x["replay"]]
    assert 70 <= len(replayed) <= 130                       # ~25% of 400 (binomial sd ~8.7)
    for x in replayed:                                      # stage a's tasks and lengths, b's batch size
        assert x["stage"] == "a" and set(x["tasks"]) <= {"copy", "kv_retrieval"}
        assert int(x["lengths"].max()) <= a.max_len and x["tokens"].shape[0] == 4
    own = [x for x in batches if not x["replay"]]
    assert all(x["stage"] == "b" and set(x["tasks"]) <= {"needle", "relational"} for x in own)
    # a stage without replay samples exactly as before (no extra draw from the rng)
    plain, plain2 = Curriculum(_stages(), seed=3), Curriculum(_stages(), seed=3)
    assert plain.sample_batch(4)["tokens"].equal(plain2.sample_batch(4)["tokens"])


def test_replay_must_name_an_earlier_stage_with_a_share_below_one():
    a, b = _stages()
    with pytest.raises(ValueError, match="not earlier stages"):
        Curriculum([dataclasses.replace(a, replay={"b": 0.2}), b])
    with pytest.raises(ValueError, match="replay shares"):
        dataclasses.replace(b, replay={"a": 1.0})
    with pytest.raises(ValueError, match="itself"):
        dataclasses.replace(b, replay={"b": 0.1})


def test_replay_losses_do_not_bias_the_stage_task_mix():
    """The ablation curriculum's foundation stage replays its warm-up: such batches reach the
    trainer with ``replay/`` task names, and their losses stay out of the stage's loss EMA."""
    from dnc.training.config import TrainConfig
    from dnc.training.data import TaskSource

    cfg = TrainConfig(curriculum_dir="configs/ablations/local_replay", curriculum_start="foundation",
                      max_len=8192, batch_tokens=8192)
    src = TaskSource(cfg, rank=0, pad_to_multiple=64, segment_len=256)
    assert src.curriculum.stage.replay == {"local": 0.15}
    names = [src.next_batch()[1] for _ in range(40)]
    replayed = [n for n in names if n[0].startswith("replay/")]
    assert replayed and len(replayed) < len(names)
    src.record(replayed[0] + ["needle"], [9.0] * len(replayed[0]) + [1.0], step=1)
    assert src.curriculum.loss_ema == {"needle": 1.0}


def test_evaluate_with_oracle_and_wrong_model():
    cur = Curriculum(_stages(), seed=0)
    holder = {}

    def make_oracle():
        # A "model" that knows the answers: it looks the prefix up in the samples the curriculum
        # generates, by regenerating the same fixed eval set.
        from dnc.data.tasks import generate

        rng = np.random.default_rng(1234)
        for t in ("copy", "kv_retrieval"):
            for L in (64, 128):
                for _ in range(3):
                    s = generate(t, rng, L, cur.difficulty[t])
                    holder[s.prompt.tobytes()] = s

        def predict(prefix, max_new):
            s = holder[np.asarray(prefix, dtype=np.int32).tobytes()]
            return s.answer.tolist()[:max_new]

        return predict

    acc = cur.evaluate(make_oracle(), n_per_task=3)
    assert acc == {"copy": 1.0, "kv_retrieval": 1.0}
    acc = cur.evaluate(lambda prefix, max_new: [EOS], n_per_task=3, lengths=[100])
    assert acc == {"copy": 0.0, "kv_retrieval": 0.0}


@pytest.mark.parametrize("name", ["local_first", "template_first", "local_template_first", "local_replay", "time_boxed",
                                  "stdlib_tail", "time_boxed_stdlib", "time_boxed_short"])
def test_ablation_curricula_load_for_small(name):
    """The ablation stage dirs (issue 11) build a curriculum for small's 512-token segments."""
    d = default_stage_dir().parent / "ablations" / name
    stages = load_stages(d, segment_len=512)
    assert [s.name for s in stages][-5:] == STAGE_NAMES  # the default stages follow
    cur = Curriculum(stages, seed=0)
    b = cur.sample_batch(4)
    assert (b["lengths"] <= stages[0].max_len).all()
