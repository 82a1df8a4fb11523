"""Difficulty scorers for curriculum SFT: a higher score means a harder example.

    steps         reasoning steps of the record (`record["difficulty"]`, set by edgelm.train.data)
    length        trained tokens of the example (target + end-of-turn) in the student's tokenizer
    teacher_loss  the teacher's mean cross-entropy per target token, one no-grad pass at stage start
    student_loss  the current student's mean cross-entropy per target token, recomputed at the start
                  of every epoch (self-paced: the order follows what the student still finds hard)

Every scorer takes a `ScoringContext` and returns one float per example.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from edgelm.train.chat import IGNORE_INDEX, encode_example
from edgelm.train.preflight import check_sequence_lengths, max_positions

log = logging.getLogger(__name__)


@dataclass
class ScoringContext:
    """Inputs a scorer may use; `examples[i]` is the encoding of `records[i]` in `modes[i]`."""

    records: list[dict]
    examples: list[dict]
    modes: list[str]
    tokenizer: PreTrainedTokenizerBase
    max_length: int
    model: PreTrainedModel | None = None
    """The student being trained (student_loss)."""
    teacher: str | None = None
    """Teacher model source (teacher_loss), as accepted by edgelm.train.models.load_model."""
    batch_size: int = 16
    """Sequences per forward pass of the loss-based scorers."""


@dataclass(frozen=True)
class Scorer:
    """A named difficulty measure."""

    name: str
    score: Callable[[ScoringContext], list[float]]
    every_epoch: bool = False
    """Whether the scores change during training and are recomputed at the start of each epoch."""


def per_example_loss(model: PreTrainedModel, examples: list[dict], pad_token_id: int, batch_size: int = 16) -> list[float]:
    """Return each example's mean cross-entropy over its labelled tokens, in one no-grad pass.

    Examples are batched by length, so padding stays small. An example without labelled tokens
    scores 0.
    """
    from edgelm.train.trainer_setup import pad_batch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses = [0.0] * len(examples)
    by_length = sorted(range(len(examples)), key=lambda index: len(examples[index]["input_ids"]))
    try:
        with torch.inference_mode():
            for start in range(0, len(by_length), batch_size):
                indices = by_length[start : start + batch_size]
                batch = {key: value.to(device) for key, value in pad_batch([examples[i] for i in indices], pad_token_id).items()}
                targets = batch.pop("labels")[:, 1:]
                keep = torch.nn.functional.pad(targets != IGNORE_INDEX, (0, 1))
                logits = model(**batch, logits_to_keep=keep, use_cache=False).logits  # (labelled tokens, vocab)
                token_loss = torch.nn.functional.cross_entropy(logits.float(), targets[targets != IGNORE_INDEX], reduction="none")
                counts = (targets != IGNORE_INDEX).sum(dim=1)
                row_of_token = torch.repeat_interleave(torch.arange(len(indices), device=device), counts)
                sums = torch.zeros(len(indices), device=device).index_add_(0, row_of_token, token_loss)
                for row, index in enumerate(indices):
                    losses[index] = float(sums[row] / counts[row]) if counts[row] else 0.0
    finally:
        model.train(was_training)
    return losses


def score_steps(context: ScoringContext) -> list[float]:
    scores = []
    for index, record in enumerate(context.records):
        value = record.get("difficulty")
        try:
            score = float(value)
        except (TypeError, ValueError):
            score = math.nan
        if not math.isfinite(score):
            raise ValueError(
                f"record {record.get('id', index)} has difficulty={value!r}; the 'steps' scorer needs a number "
                f"(records from `edgelm data` have one), or choose another scorer (--difficulty length)"
            )
        scores.append(score)
    return scores


def score_length(context: ScoringContext) -> list[float]:
    return [float(sum(label != IGNORE_INDEX for label in example["labels"])) for example in context.examples]


def score_teacher_loss(context: ScoringContext) -> list[float]:
    from edgelm.train.models import load_model

    if not context.teacher:
        raise ValueError("sft.difficulty=teacher_loss needs a teacher model source; pass teacher=... to run_sft_stage")
    teacher, tokenizer = load_model(context.teacher)
    # The teacher may tokenize differently from the student, so encode the records again with its
    # tokenizer. Truncating keeps an example the student trains on scorable by the teacher.
    examples = [
        encode_example(tokenizer, record, mode, context.max_length, truncate=True)
        for record, mode in zip(context.records, context.modes)
    ]
    limit = max_positions(teacher)
    lengths = [(f"record {record.get('id', index)}", len(example["input_ids"]))
               for index, (record, example) in enumerate(zip(context.records, examples))]
    check_sequence_lengths(lengths, limit, "teacher",
                           fix=f"lower sft.max_length to {limit} or less, or choose another difficulty scorer")
    log.info("scoring %d examples with the teacher %s", len(examples), context.teacher)
    scores = per_example_loss(teacher, examples, tokenizer.pad_token_id, context.batch_size)
    del teacher
    return scores


def score_student_loss(context: ScoringContext) -> list[float]:
    if context.model is None:
        raise ValueError("sft.difficulty=student_loss needs the student model in the scoring context")
    return per_example_loss(context.model, context.examples, context.tokenizer.pad_token_id, context.batch_size)


SCORERS: dict[str, Scorer] = {
    scorer.name: scorer
    for scorer in (
        Scorer("steps", score_steps),
        Scorer("length", score_length),
        Scorer("teacher_loss", score_teacher_loss),
        Scorer("student_loss", score_student_loss, every_epoch=True),
    )
}


def get_scorer(name: str) -> Scorer:
    if name not in SCORERS:
        raise ValueError(f"unknown difficulty scorer {name!r}; expected one of {sorted(SCORERS)}")
    return SCORERS[name]
