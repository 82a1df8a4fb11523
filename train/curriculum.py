"""Order training examples from easy to hard: pacing functions and a sampler that applies them.

A pacing function gives the competence c(t) in (0, 1] at optimizer step t: the fraction of the
examples, easiest first, that batches may be drawn from. The pacings are:

    none     shuffle every epoch, no curriculum (the baseline); c(t) = 1
    buckets  split the examples into N equal-size buckets by score; bucket k joins the pool at
             step (k - 1) / N * T, so c(t) = min(1, (floor(N * t / T) + 1) / N)
    linear   c(t) = min(1, c0 + (1 - c0) * t / T)
    sqrt     c(t) = min(1, sqrt(c0^2 + (1 - c0^2) * t / T))

T is `full_competence_at` times the stage's optimizer steps and c0 is `initial_competence`.
linear and sqrt are the competence schedules of Platanios et al., "Competence-based Curriculum
Learning for Neural Machine Translation" (NAACL 2019).

Unlike that paper, which samples with replacement, `CurriculumSampler` draws without replacement
inside an epoch: each batch takes examples not yet seen in this epoch from the easiest c(t)
fraction. When that pool has fewer unseen examples than the batch needs, it widens to the next
easiest ones. Every epoch is therefore a permutation of the examples, and a curriculum run takes
the same number of steps as the baseline. A slow schedule tends to a strict easy-to-hard order.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch

PACINGS = ("buckets", "linear", "sqrt", "none")


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


def competence(
    pacing: str,
    step: int,
    full_competence_step: float,
    initial_competence: float = 0.1,
    buckets: int = 4,
) -> float:
    """Return c(step) for `pacing` (see the module docstring); 1 once step >= full_competence_step."""
    if pacing not in PACINGS:
        raise ValueError(f"unknown pacing {pacing!r}; expected one of {PACINGS}")
    if pacing == "none" or full_competence_step <= 0:
        return 1.0
    progress = min(1.0, step / full_competence_step)
    if pacing == "buckets":
        return min(1.0, (math.floor(buckets * progress) + 1) / buckets)
    if pacing == "linear":
        return min(1.0, initial_competence + (1 - initial_competence) * progress)
    return min(1.0, math.sqrt(initial_competence**2 + (1 - initial_competence**2) * progress))


def rank_by_difficulty(scores: Sequence[float], seed: int) -> list[int]:
    """Return indices from easiest to hardest; ties are broken by a seeded shuffle, not by position."""
    tiebreak = shuffled_order(len(scores), seed)
    position = {index: rank for rank, index in enumerate(tiebreak)}
    return sorted(range(len(scores)), key=lambda index: (scores[index], position[index]))


class CurriculumSampler(torch.utils.data.Sampler[int]):
    """Yield one epoch of dataset indices, paced easy to hard; a pure function of (seed, scores, epoch).

    Optimizer step s of epoch e is step e * steps_per_epoch + s of the stage. Its
    batch_size * grad_accum indices are drawn together from the easiest c(step) fraction of the
    examples, then split into micro-batches, so 1 x 8 and 8 x 1 train the same examples. The
    Trainer calls `set_epoch` before each epoch, and on resume it skips the batches already
    trained, so a resumed run reads exactly the batches the uninterrupted run would have read.
    `set_scores` replaces the difficulty scores (self-paced scoring recomputes them each epoch).
    """

    def __init__(
        self,
        scores: Sequence[float],
        *,
        batch_size: int,
        grad_accum: int,
        total_steps: int,
        pacing: str = "buckets",
        buckets: int = 4,
        initial_competence: float = 0.1,
        full_competence_at: float = 1.0,
        seed: int = 0,
    ):
        if pacing not in PACINGS:
            raise ValueError(f"unknown pacing {pacing!r}; expected one of {PACINGS}")
        if not scores:
            raise ValueError("CurriculumSampler needs at least one example")
        self.scores = list(scores)
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.total_steps = total_steps
        self.pacing = pacing
        self.buckets = buckets
        self.initial_competence = initial_competence
        self.full_competence_at = full_competence_at
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.scores)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_scores(self, scores: Sequence[float]) -> None:
        if len(scores) != len(self.scores):
            raise ValueError(f"expected {len(self.scores)} scores, got {len(scores)}")
        self.scores = list(scores)

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.scores) / self.batch_size)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch, as the Trainer counts them: a last, shorter step included."""
        return math.ceil(self.batches_per_epoch / self.grad_accum)

    def competence_at(self, step: int) -> float:
        return competence(self.pacing, step, self.full_competence_at * self.total_steps,
                          self.initial_competence, self.buckets)

    def epoch_order(self, epoch: int) -> list[int]:
        """Return the indices of `epoch` in the order they are trained."""
        count = len(self.scores)
        # Mix the epoch into the seed so that every epoch has its own order.
        rng = random.Random(self.seed * 1_000_003 + epoch)
        if self.pacing == "none":
            order = list(range(count))
            rng.shuffle(order)
            return order

        ranked = rank_by_difficulty(self.scores, self.seed)
        seen = [False] * count
        order: list[int] = []
        # One draw per optimizer step, split into micro-batches by the data loader, so that the
        # same examples make up a step whatever the split between batch_size and grad_accum.
        per_step = self.batch_size * self.grad_accum
        for step_in_epoch in range(self.steps_per_epoch):
            step = epoch * self.steps_per_epoch + step_in_epoch
            size = min(per_step, count - len(order))
            # The pool is the easiest c(step) fraction, widened to the next easiest examples when it
            # has fewer unseen ones than the step needs: an epoch never repeats an example.
            pool_size = max(math.ceil(self.competence_at(step) * count), len(order) + size)
            unseen = [index for index in ranked[:pool_size] if not seen[index]]
            chosen = rng.sample(unseen, size)
            for index in chosen:
                seen[index] = True
            order.extend(chosen)
        return order

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_order(self.epoch))
