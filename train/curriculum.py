"""Order training examples from easy to hard.

Records are grouped into buckets by their difficulty score (for GSM8K, the number of reasoning
steps). Buckets run from the lowest score to the highest. Inside a bucket the order is shuffled
with a fixed seed, so two runs with the same seed train on the same sequence of examples.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence


def curriculum_order(difficulties: Sequence[float], seed: int = 0, shuffle_within_bucket: bool = True) -> list[int]:
    """Return example indices sorted by difficulty (easy first), shuffled inside each difficulty bucket."""
    buckets: dict[float, list[int]] = defaultdict(list)
    for index, difficulty in enumerate(difficulties):
        buckets[difficulty].append(index)
    rng = random.Random(seed)
    order: list[int] = []
    for difficulty in sorted(buckets):
        bucket = buckets[difficulty]
        if shuffle_within_bucket:
            rng.shuffle(bucket)
        order.extend(bucket)
    return order


def shuffled_order(count: int, seed: int = 0) -> list[int]:
    """Return a seeded random order: the no-curriculum baseline."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return order
