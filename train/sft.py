"""Curriculum supervised fine-tuning: one stage = one answer mode, examples paced easy to hard.

The default pipeline runs two stages: first on reasoning targets (steps, then the answer), then on
fast targets (the answer alone). A stage:

1. encodes its records (loss on the assistant tokens only, end-of-turn token included, see
   `edgelm.train.chat.encode_example`) and writes a mask report before training;
2. scores every example's difficulty (`edgelm.train.difficulty`);
3. optionally packs examples into rows (`edgelm.train.packing`);
4. trains with a `CurriculumSampler` (`edgelm.train.curriculum`), whose data order is a pure
   function of (seed, scores, epoch), and saves checkpoints, so that a rerun with `resume=True`
   continues exactly where the interrupted run stopped.

Stage folder while training:
    mask_report.json        the pre-flight mask report
    sft_state.json          fingerprint of the stage's inputs and settings; checkpoints of other
                            inputs are discarded
    difficulty/epoch-N.json scores used in epoch N (only epoch 0 unless the scorer is self-paced)
    checkpoints/            Trainer checkpoints
When the stage finishes, the folder is replaced by the final model and mask_report.json.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
import statistics
import time
from collections import Counter
from functools import partial
from pathlib import Path

from transformers import PrinterCallback, TrainerCallback

from edgelm.config import SFT_RANGES
from edgelm.files import check_output_folder, write_json
from edgelm.train.chat import IGNORE_INDEX, check_mode, encode_example, has_generation_markers
from edgelm.train.curriculum import PACINGS, CurriculumSampler
from edgelm.train.difficulty import ScoringContext, get_scorer
from edgelm.train.models import load_model, save_model
from edgelm.train.packing import collate_packed, pack_examples
from edgelm.train.preflight import check_sequence_lengths, max_positions
from edgelm.train.trainer_setup import (
    AnswerLossTrainer,
    ProgressLine,
    last_complete_checkpoint,
    pad_batch,
    training_arguments,
)

log = logging.getLogger(__name__)

SFT_MODES = ("reasoning", "fast", "mixed")
MASK_REPORT = "mask_report.json"
STATE_FILE = "sft_state.json"


def check_stage_settings(settings: dict) -> None:
    """Raise ValueError for a numeric setting out of its range (config.SFT_RANGES), NaN included."""
    for name, (in_range, text) in SFT_RANGES.items():
        value = settings[name]
        try:
            valid = math.isfinite(value) and in_range(value)
        except TypeError:
            valid = False
        if not valid:
            raise ValueError(f"{name}={value!r} must be {text}")


def record_modes(count: int, mode: str, fast_ratio: float, seed: int) -> list[str]:
    """Return the answer mode of each record; 'mixed' makes round(fast_ratio * count) seeded picks fast."""
    if mode != "mixed":
        return [check_mode(mode)] * count
    if not 0 <= fast_ratio <= 1:
        raise ValueError(f"fast_ratio must be in [0, 1], got {fast_ratio}")
    fast = set(random.Random(seed).sample(range(count), round(fast_ratio * count)))
    return ["fast" if index in fast else "reasoning" for index in range(count)]


def encode_records(
    tokenizer, records: list[dict], modes: list[str], max_length: int, overlong: str = "skip"
) -> tuple[list[int], list[dict], dict]:
    """Encode records for training; return (kept record indices, their examples, mask report).

    `overlong` is 'skip' (drop examples longer than max_length) or 'truncate' (cut them).
    Examples without a trainable token are dropped. The report counts records, skipped,
    truncated and empty examples, and trained tokens per example (min/median/max).
    """
    if overlong not in ("skip", "truncate"):
        raise ValueError(f"overlong must be 'skip' or 'truncate', got {overlong!r}")
    kept, examples, trained_counts = [], [], []
    skipped = truncated = truncated_empty = empty = 0
    for index, (record, mode) in enumerate(zip(records, modes)):
        example = encode_example(tokenizer, record, mode, max_length, truncate=overlong == "truncate")
        if example is None:
            skipped += 1
            continue
        # The first token has no logits before it, so it can never be trained.
        trained = sum(label != IGNORE_INDEX for label in example["labels"][1:])
        if trained == 0:
            # Truncation can cut away the whole answer, which calls for a longer max_length.
            if example.get("truncated"):
                truncated_empty += 1
            else:
                empty += 1
            continue
        truncated += bool(example.get("truncated"))
        kept.append(index)
        examples.append(example)
        trained_counts.append(trained)

    report = {
        "records": len(records),
        "examples": len(examples),
        "mask_source": "template generation markers" if has_generation_markers(tokenizer) else "prompt prefix",
        "modes": dict(Counter(modes[index] for index in kept)),
        "max_length": max_length,
        "overlong": overlong,
        "skipped_too_long": skipped,
        "truncated": truncated,
        "truncated_to_no_answer": truncated_empty,
        "no_trainable_tokens": empty,
        "tokens": sum(len(example["input_ids"]) for example in examples),
        "trained_tokens": sum(trained_counts),
        "trained_tokens_per_example": {
            "min": min(trained_counts, default=0),
            "median": statistics.median(trained_counts) if trained_counts else 0,
            "max": max(trained_counts, default=0),
        },
    }
    return kept, examples, report


def check_model_limit(model, record_ids: list, examples: list[dict], max_length: int, packing: bool) -> None:
    """Raise ValueError when a training row would be longer than the model's max_position_embeddings."""
    limit = max_positions(model)
    if limit is None:
        return
    if packing and max_length > limit:
        raise ValueError(f"packed rows reach max_length={max_length} tokens, more than the model's "
                         f"max_position_embeddings={limit}; lower sft.max_length to {limit} or less")
    lengths = [(f"record {record_id}", len(example["input_ids"])) for record_id, example in zip(record_ids, examples)]
    check_sequence_lengths(lengths, limit, "model", fix=f"lower sft.max_length to {limit} or less, or drop the longest records")


def log_mask_report(stage_name: str, report: dict) -> None:
    per_example = report["trained_tokens_per_example"]
    log.info(
        "%s mask report: %d of %d records kept (%s), %d tokens, %d trained; trained per example min %d / median %s / max %d; "
        "%d skipped for max_length=%d, %d truncated, %d truncated to no answer token, %d without a trainable token; "
        "mask from the %s",
        stage_name, report["examples"], report["records"], report["modes"], report["tokens"], report["trained_tokens"],
        per_example["min"], per_example["median"], per_example["max"], report["skipped_too_long"], report["max_length"],
        report["truncated"], report["truncated_to_no_answer"], report["no_trainable_tokens"], report["mask_source"],
    )
    over = report["skipped_too_long"] + report["truncated"] + report["truncated_to_no_answer"]
    if over:
        log.warning("%s: %d examples exceed max_length=%d (%d skipped, %d truncated, %d truncated to no answer token); "
                    "raise sft.max_length to keep them whole", stage_name, over, report["max_length"],
                    report["skipped_too_long"], report["truncated"], report["truncated_to_no_answer"])


def check_trainable(report: dict) -> None:
    if report["trained_tokens"] > 0:
        return
    fixes = []
    if report["skipped_too_long"] or report["truncated_to_no_answer"]:
        fixes.append(f"raise sft.max_length above {report['max_length']}")
    if report["skipped_too_long"] and report["overlong"] == "skip":
        fixes.append("set sft.overlong=truncate")
    if report["no_trainable_tokens"]:
        fixes.append("check that the records have answers and that the chat template marks the assistant reply")
    raise ValueError(
        f"no trainable token in {report['records']} records: {report['skipped_too_long']} skipped for exceeding "
        f"max_length={report['max_length']}, {report['truncated_to_no_answer']} lost their whole answer to "
        f"truncation and {report['no_trainable_tokens']} have an empty assistant mask; {', or '.join(fixes)}"
    )


def source_identity(model_source: str) -> dict:
    """Return sizes and modification times of the model source's files, to detect a changed input model."""
    path = Path(model_source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
    elif path.is_file():
        files = [path]
    else:
        files = []  # a hub id or pkg: source; only its name enters the fingerprint
    return {"source": model_source, "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}}


def stage_fingerprint(model_source: str, records: list[dict], settings: dict) -> str:
    """Return a hash of the input model's files, the records and the settings that shape training."""
    records_hash = hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()
    content = {"settings": settings, "records": records_hash, "model": source_identity(model_source)}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def prepare_stage_dir(out_dir: Path, fingerprint: str, resume: bool) -> bool:
    """Keep the stage folder's checkpoints only when resuming with the same fingerprint; return whether kept."""
    state_path = out_dir / STATE_FILE
    saved = json.loads(state_path.read_text())["fingerprint"] if state_path.is_file() else None
    if resume and saved == fingerprint:
        return True
    if resume and saved is not None:
        log.warning("%s: inputs or settings changed since the checkpoints were written; training from the start", out_dir)
    for name in ("checkpoints", "difficulty"):
        shutil.rmtree(out_dir / name, ignore_errors=True)
    write_json(state_path, {"fingerprint": fingerprint})
    return False


class DifficultyScores:
    """Scores per epoch, cached in the stage folder so that a resumed run uses the scores of the first run."""

    def __init__(self, folder: Path, scorer, context: ScoringContext):
        self.folder = folder
        self.scorer = scorer
        self.context = context

    def for_epoch(self, epoch: int) -> list[float]:
        if not self.scorer.every_epoch:
            epoch = 0
        path = self.folder / f"epoch-{epoch}.json"
        if path.is_file():
            return json.loads(path.read_text())["scores"]
        start = time.perf_counter()
        scores = self.scorer.score(self.context)
        log.info("difficulty %s for epoch %d: %d examples scored in %.1f s (min %.3g, max %.3g)",
                 self.scorer.name, epoch, len(scores), time.perf_counter() - start, min(scores), max(scores))
        write_json(path, {"scorer": self.scorer.name, "epoch": epoch, "scores": scores})
        return scores


class SelfPacedScoring(TrainerCallback):
    """Rescore the examples with the current model at the start of every epoch and hand the scores to the sampler."""

    def __init__(self, scores: DifficultyScores, sampler: CurriculumSampler, rows: list[list[int]] | None, steps_per_epoch: int):
        self.scores = scores
        self.sampler = sampler
        self.rows = rows
        self.steps_per_epoch = steps_per_epoch

    def on_epoch_begin(self, args, state, control, **kwargs):
        # global_step // steps_per_epoch is the epoch the Trainer is starting (or resuming) as well.
        epoch = state.global_step // self.steps_per_epoch
        self.sampler.set_scores(item_scores(self.scores.for_epoch(epoch), self.rows))


def item_scores(scores: list[float], rows: list[list[int]] | None) -> list[float]:
    """Return the score of each training item: an example's own score, or a packed row's mean."""
    if rows is None:
        return scores
    return [sum(scores[index] for index in row) / len(row) for row in rows]


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
    curriculum: bool | None = None,
    seed: int = 0,
    logging_steps: int = 10,
    fast_ratio: float = 0.5,
    difficulty: str = "steps",
    pacing: str = "buckets",
    buckets: int = 4,
    initial_competence: float = 0.1,
    full_competence_at: float = 1.0,
    packing: bool = False,
    overlong: str = "skip",
    teacher: str | None = None,
    scoring_batch_size: int = 16,
    save_steps: int | None = None,
    save_total_limit: int | None = 2,
    resume: bool = False,
    optim: str = "adamw_torch",
    callbacks: list[TrainerCallback] | None = None,
) -> dict:
    """Fine-tune `model_source` on `records` in answer `mode`; save the model to `out_dir`.

    `mode` is 'reasoning', 'fast' or 'mixed' (a seeded `fast_ratio` share of the records in fast
    mode). `curriculum=False` is an alias for `pacing='none'`. With `save_steps`, checkpoints go
    to `out_dir/checkpoints`; `resume=True` continues from the newest one if the inputs and
    settings are unchanged. With `packing`, `batch_size` counts rows of up to `max_length`
    tokens. Returns the mask report, the loss history and timing.
    """
    if mode not in SFT_MODES:
        raise ValueError(f"unknown SFT mode {mode!r}; expected one of {SFT_MODES}")
    if curriculum is False:
        pacing = "none"
    if pacing not in PACINGS:
        raise ValueError(f"unknown pacing {pacing!r}; expected one of {PACINGS}")
    scorer = get_scorer(difficulty)
    out_dir = Path(out_dir)
    if Path(model_source).resolve() == out_dir.resolve():
        raise ValueError(f"out_dir {out_dir} is the input model's folder; write the stage to another folder")
    check_output_folder(out_dir, "out_dir")

    settings = {
        "mode": mode, "fast_ratio": fast_ratio, "epochs": epochs, "learning_rate": learning_rate,
        "batch_size": batch_size, "grad_accum": grad_accum, "max_length": max_length, "warmup_ratio": warmup_ratio,
        "seed": seed, "difficulty": difficulty, "pacing": pacing, "buckets": buckets,
        "initial_competence": initial_competence, "full_competence_at": full_competence_at, "packing": packing,
        "overlong": overlong, "teacher": teacher, "optim": optim,
    }
    check_stage_settings({**settings, "scoring_batch_size": scoring_batch_size})
    out_dir.mkdir(parents=True, exist_ok=True)
    resuming = prepare_stage_dir(out_dir, stage_fingerprint(model_source, records, settings), resume)

    model, tokenizer = load_model(model_source)
    modes = record_modes(len(records), mode, fast_ratio, seed)
    kept, examples, report = encode_records(tokenizer, records, modes, max_length, overlong)
    report["stage"] = stage_name
    write_json(out_dir / MASK_REPORT, report)
    log_mask_report(stage_name, report)
    check_trainable(report)
    check_model_limit(model, [records[index].get("id", index) for index in kept], examples, max_length, packing)

    context = ScoringContext(
        records=[records[i] for i in kept], examples=examples, modes=[modes[i] for i in kept], tokenizer=tokenizer,
        max_length=max_length, model=model, teacher=teacher, batch_size=scoring_batch_size,
    )
    scores = DifficultyScores(out_dir / "difficulty", scorer, context)
    first_scores = scores.for_epoch(0)

    rows = None
    dataset = examples
    collator = partial(pad_batch, pad_token_id=tokenizer.pad_token_id)
    if packing:
        rows = pack_examples([len(example["input_ids"]) for example in examples], first_scores, max_length,
                             groups=buckets, seed=seed)
        dataset = [[examples[index] for index in row] for row in rows]
        collator = partial(collate_packed, pad_token_id=tokenizer.pad_token_id)
        log.info("%s: packed %d examples into %d rows of up to %d tokens", stage_name, len(examples), len(rows), max_length)

    batches_per_epoch = math.ceil(len(dataset) / batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / grad_accum)
    steps = max(1, math.ceil(steps_per_epoch * epochs))
    sampler = CurriculumSampler(
        item_scores(first_scores, rows), batch_size=batch_size, grad_accum=grad_accum, total_steps=steps,
        pacing=pacing, buckets=buckets, initial_competence=initial_competence,
        full_competence_at=full_competence_at, seed=seed,
    )
    log.info("%s: %d %s examples (%d tokens, %d trained), %d optimizer steps, difficulty %s, pacing %s",
             stage_name, len(examples), mode, report["tokens"], report["trained_tokens"], steps, difficulty, pacing)

    checkpoints = out_dir / "checkpoints"
    resume_from = last_complete_checkpoint(checkpoints) if resuming else None
    if resume_from:
        log.info("%s: resuming from %s", stage_name, resume_from)

    progress = ProgressLine(stage_name)
    stage_callbacks = [progress, *(callbacks or [])]
    if scorer.every_epoch:
        stage_callbacks.append(SelfPacedScoring(scores, sampler, rows, steps_per_epoch))
    args = training_arguments(
        str(checkpoints),
        learning_rate=learning_rate,
        epochs=epochs,
        max_steps=steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        seed=seed,
        warmup_steps=max(0, round(warmup_ratio * steps)),
        logging_steps=logging_steps,
        sequential=True,
        save_steps=save_steps,
        save_total_limit=save_total_limit,
        optim=optim,
    )
    trainer = AnswerLossTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        callbacks=stage_callbacks,
        train_sampler=sampler,
        packed=packing,
    )
    trainer.remove_callback(PrinterCallback)  # ProgressLine logs instead of raw dicts
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - start
    tokens_seen = trainer.state.num_input_tokens_seen - progress.start_tokens

    # Replacing the folder also removes the checkpoints and the cached scores.
    save_model(model, tokenizer, out_dir)
    write_json(out_dir / MASK_REPORT, report)
    history = [{"step": row["step"], "loss": row["loss"]} for row in trainer.state.log_history if "loss" in row]
    return {
        **{key: report[key] for key in ("examples", "skipped_too_long", "truncated", "no_trainable_tokens", "tokens", "trained_tokens")},
        "mode": mode,
        "difficulty": difficulty,
        "pacing": pacing,
        "packing": packing,
        "rows": len(dataset),
        "steps": result.global_step,
        "resumed_from_step": int(Path(resume_from).name.split("-")[-1]) if resume_from else None,
        "train_loss": result.training_loss,
        "final_loss": history[-1]["loss"] if history else result.training_loss,
        "seconds": seconds,
        "tokens_per_second": tokens_seen / seconds,
        "loss_history": history,
    }
