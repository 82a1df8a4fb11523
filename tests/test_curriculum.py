import math

import pytest

from edgelm.train.curriculum import CurriculumSampler, competence, curriculum_order, rank_by_difficulty, shuffled_order
from edgelm.train.packing import collate_packed, pack_examples


def test_curriculum_orders_easy_to_hard():
    difficulties = [3, 1, 2, 1, 3, 2, 1]
    order = curriculum_order(difficulties, seed=0)
    assert sorted(order) == list(range(len(difficulties)))
    assert [difficulties[i] for i in order] == sorted(difficulties)


def test_curriculum_is_seeded_and_shuffles_within_buckets():
    difficulties = [1] * 20 + [2] * 20
    assert curriculum_order(difficulties, seed=1) == curriculum_order(difficulties, seed=1)
    assert curriculum_order(difficulties, seed=1) != curriculum_order(difficulties, seed=2)
    assert curriculum_order(difficulties, shuffle_within_bucket=False) == list(range(40))


def test_shuffled_order_is_a_seeded_permutation():
    assert sorted(shuffled_order(10, seed=3)) == list(range(10))
    assert shuffled_order(10, seed=3) == shuffled_order(10, seed=3)


@pytest.mark.parametrize(("pacing", "step", "expected"), [
    ("none", 0, 1.0),
    ("linear", 0, 0.1),
    ("linear", 50, 0.55),
    ("linear", 100, 1.0),
    ("linear", 500, 1.0),
    ("sqrt", 0, 0.1),
    ("sqrt", 50, math.sqrt(0.01 + 0.99 * 0.5)),
    ("sqrt", 100, 1.0),
    ("buckets", 0, 0.25),
    ("buckets", 24, 0.25),
    ("buckets", 25, 0.5),
    ("buckets", 99, 1.0),
    ("buckets", 100, 1.0),
])
def test_competence_schedules(pacing, step, expected):
    value = competence(pacing, step, full_competence_step=100, initial_competence=0.1, buckets=4)
    assert value == pytest.approx(expected)


def test_competence_rejects_unknown_pacing():
    with pytest.raises(ValueError, match="unknown pacing 'cubic'"):
        competence("cubic", 0, 10)


def make_sampler(scores, **overrides):
    settings = dict(batch_size=4, grad_accum=1, total_steps=math.ceil(len(scores) / 4), pacing="sqrt",
                    initial_competence=0.1, full_competence_at=1.0, seed=0)
    settings.update(overrides)
    return CurriculumSampler(scores, **settings)


@pytest.mark.parametrize("pacing", ["none", "buckets", "linear", "sqrt"])
def test_sampler_epoch_is_permutation(pacing):
    scores = [i % 7 for i in range(50)]
    sampler = make_sampler(scores, pacing=pacing)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        assert sorted(sampler) == list(range(50))


def test_sampler_draws_first_batches_from_easy_pool():
    scores = list(range(100))  # index = difficulty rank
    sampler = make_sampler(scores, pacing="linear", initial_competence=0.1, full_competence_at=0.5)
    order = sampler.epoch_order(0)
    assert max(order[:4]) < 10  # c(0) = 0.1: the easiest 10 examples
    for batch in range(len(order) // 4):
        pool = math.ceil(sampler.competence_at(batch) * 100)
        assert max(order[batch * 4 : batch * 4 + 4]) < pool


def test_sampler_buckets_join_in_order():
    scores = list(range(40))
    sampler = make_sampler(scores, pacing="buckets", buckets=4)
    order = sampler.epoch_order(0)
    # 10 batches; bucket k joins at batch 2.5 * (k - 1), so the first two batches use bucket 1 only.
    assert max(order[:8]) < 10
    assert max(order[8:12]) < 20


def test_sampler_is_pure_function_of_seed_scores_epoch():
    scores = [i % 5 for i in range(30)]
    first, second = make_sampler(scores), make_sampler(scores)
    assert first.epoch_order(1) == second.epoch_order(1)
    assert first.epoch_order(0) != first.epoch_order(1)
    assert make_sampler(scores, seed=1).epoch_order(0) != first.epoch_order(0)
    second.set_scores([-score for score in scores])
    assert second.epoch_order(0) != first.epoch_order(0)


def test_sampler_grad_accum_uses_optimizer_steps():
    scores = list(range(64))
    # 16 micro-batches of 4, accumulated 4 at a time: 4 optimizer steps, step 0 covers 4 micro-batches.
    sampler = make_sampler(scores, pacing="linear", grad_accum=4, total_steps=4, initial_competence=0.25)
    order = sampler.epoch_order(0)
    assert max(order[:16]) < 16


@pytest.mark.parametrize("pacing", ["buckets", "linear", "sqrt"])
def test_sampler_same_steps_for_any_accumulation_split(pacing):
    scores = [i % 9 for i in range(50)]  # 50 is no multiple of 8: the last step is shorter
    orders = [make_sampler(scores, pacing=pacing, batch_size=size, grad_accum=8 // size, total_steps=14).epoch_order(1)
              for size in (1, 2, 8)]
    assert orders[0] == orders[1] == orders[2]


def test_sampler_step_count_matches_the_trainer():
    # 7 micro-batches accumulated 2 at a time: the Trainer runs 4 steps per epoch, the last one short.
    sampler = make_sampler(list(range(28)), pacing="linear", grad_accum=2, total_steps=8)
    assert sampler.steps_per_epoch == 4


def test_sampler_slow_competence_orders_easy_to_hard():
    scores = list(range(40))
    # Full competence only after 4 stage lengths: the pool widens one batch at a time.
    sampler = make_sampler(scores, pacing="linear", full_competence_at=4.0, initial_competence=0.01)
    order = sampler.epoch_order(0)
    assert sorted(order) == list(range(40))
    for batch in range(10):
        assert sorted(order[batch * 4 : batch * 4 + 4]) == list(range(batch * 4, batch * 4 + 4))


def test_sampler_rejects_wrong_score_count():
    sampler = make_sampler([1, 2, 3])
    with pytest.raises(ValueError, match="expected 3 scores, got 2"):
        sampler.set_scores([1, 2])


def test_rank_by_difficulty_breaks_ties_by_seed():
    scores = [1] * 10 + [0] * 10
    ranked = rank_by_difficulty(scores, seed=0)
    assert set(ranked[:10]) == set(range(10, 20))
    assert ranked != rank_by_difficulty(scores, seed=1)


def test_pack_examples_fits_rows_and_uses_each_once():
    lengths = [30, 70, 20, 50, 90, 10, 60, 40] * 3
    scores = list(range(len(lengths)))
    rows = pack_examples(lengths, scores, max_length=100, groups=3)
    assert sorted(index for row in rows for index in row) == list(range(len(lengths)))
    for row in rows:
        assert sum(lengths[index] for index in row) <= 100
    # Each row stays inside one of the three difficulty groups.
    for row in rows:
        assert len({index * 3 // len(lengths) for index in row}) == 1
    assert len(rows) < len(lengths)


def test_pack_examples_rejects_too_long():
    with pytest.raises(ValueError, match="120 tokens does not fit in max_length=100"):
        pack_examples([120], [0], max_length=100, groups=1)


def test_collate_packed_restarts_positions():
    rows = [[{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}],
            [{"input_ids": [1, 2], "labels": [-100, 2]}]]
    batch = collate_packed(rows, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [1, 2, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    # An example's first label is dropped: it would be predicted from the previous example.
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, 2, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
