from edgelm.train.curriculum import curriculum_order, shuffled_order


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
