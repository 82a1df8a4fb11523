"""Curriculum supervised fine-tuning: one stage = one answer mode, examples ordered easy to hard.

The default pipeline runs two stages: first on reasoning targets (steps, then the answer), then on
fast targets (the answer alone). Loss is computed on the assistant tokens only, end-of-turn
token included (see `edgelm.train.chat.encode_example`).
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path

from transformers import PrinterCallback

from edgelm.train.chat import encode_example
from edgelm.train.curriculum import curriculum_order, shuffled_order
from edgelm.train.models import load_model, save_model
from edgelm.train.trainer_setup import AnswerLossTrainer, ProgressLine, pad_batch, training_arguments

log = logging.getLogger(__name__)


def build_sft_examples(tokenizer, records: list[dict], mode: str, max_length: int, curriculum: bool, seed: int) -> tuple[list[dict], dict]:
    """Encode records in `mode` and order them; return the examples and mask statistics."""
    encoded, difficulties, too_long = [], [], 0
    for record in records:
        example = encode_example(tokenizer, record, mode, max_length)
        if example is None:
            too_long += 1
            continue
        encoded.append(example)
        difficulties.append(record["difficulty"])
    if not encoded:
        raise ValueError(f"no {mode} example fits in max_length={max_length} tokens; raise sft.max_length")
    order = curriculum_order(difficulties, seed) if curriculum else shuffled_order(len(encoded), seed)
    examples = [encoded[i] for i in order]
    trained_tokens = sum(sum(label != -100 for label in example["labels"]) for example in examples)
    stats = {
        "examples": len(examples),
        "skipped_too_long": too_long,
        "tokens": sum(len(example["input_ids"]) for example in examples),
        "trained_tokens": trained_tokens,
    }
    if too_long:
        log.warning("%d of %d %s examples exceed max_length=%d and were skipped", too_long, len(records), mode, max_length)
    return examples, stats


def run_sft_stage(
    model_source: str,
    records: list[dict],
    out_dir: str | Path,
    *,
    mode: str,
    stage_name: str = "sft",
    epochs: float = 1.0,
    learning_rate: float = 1e-4,
    batch_size: int = 8,
    grad_accum: int = 1,
    max_length: int = 384,
    warmup_ratio: float = 0.05,
    curriculum: bool = True,
    seed: int = 0,
    logging_steps: int = 10,
) -> dict:
    """Fine-tune `model_source` on `records` in answer `mode`; save the result to `out_dir`."""
    model, tokenizer = load_model(model_source)
    examples, stats = build_sft_examples(tokenizer, records, mode, max_length, curriculum, seed)
    steps = math.ceil(len(examples) / (batch_size * grad_accum) * epochs)
    log.info(
        "%s: %d %s examples (%d tokens, %d trained), %d optimizer steps",
        stage_name, stats["examples"], mode, stats["tokens"], stats["trained_tokens"], steps,
    )

    progress = ProgressLine(stage_name)
    with tempfile.TemporaryDirectory(prefix="edgelm-trainer-") as scratch:
        args = training_arguments(
            scratch,
            learning_rate=learning_rate,
            epochs=epochs,
            batch_size=batch_size,
            grad_accum=grad_accum,
            seed=seed,
            warmup_steps=max(0, round(warmup_ratio * steps)),
            logging_steps=logging_steps,
            sequential=True,
        )
        trainer = AnswerLossTrainer(
            model=model,
            args=args,
            train_dataset=examples,
            data_collator=lambda batch: pad_batch(batch, tokenizer.pad_token_id),
            callbacks=[progress],
        )
        trainer.remove_callback(PrinterCallback)  # ProgressLine logs instead of raw dicts
        start = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - start

    save_model(model, tokenizer, out_dir)
    return {
        **stats,
        "mode": mode,
        "curriculum": curriculum,
        "steps": result.global_step,
        "train_loss": result.training_loss,
        "final_loss": progress.history[-1]["loss"] if progress.history else result.training_loss,
        "seconds": seconds,
        "tokens_per_second": stats["tokens"] * epochs / seconds,
        "loss_history": [{"step": row["step"], "loss": row["loss"]} for row in progress.history],
    }
