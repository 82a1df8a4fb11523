"""Train a student on a teacher's stored top-k logits (offline distillation).

The teacher is not loaded: its targets come from a logit store written by
edgelm.train.score.score_rows over the same rows file. The loss is
alpha * cross-entropy on the response tokens + (1 - alpha) * top-k KL(teacher || student),
see edgelm.train.losses.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments, set_seed

from edgelm.files import read_jsonl
from edgelm.train.logit_store import LogitStore
from edgelm.train.losses import IGNORE_INDEX, DistillationLoss, distillation_loss
from edgelm.train.models import load_model, save_model
from edgelm.train.score import output_vocab_size, row_key, row_sequence

log = logging.getLogger(__name__)

# Batch entries with the teacher's targets. compute_loss removes them before the forward pass.
TARGET_KEYS = ("target_ids", "teacher_ids", "teacher_logits", "teacher_logsumexp", "teacher_mask")


@dataclass(frozen=True)
class DistillExample:
    key: str
    input_ids: list[int]
    response_start: int


class DistillDataset(torch.utils.data.Dataset):
    """Examples with their teacher targets, read from the store on access and cut to max_length tokens."""

    def __init__(self, examples: list[DistillExample], store: LogitStore, max_length: int) -> None:
        self.examples = examples
        self.store = store
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        example = self.examples[index]
        targets = self.store.get(example.key)
        length = min(len(example.input_ids), self.max_length)
        # Target i predicts input_ids[response_start + i], so keep the targets inside the cut sequence.
        num_targets = length - example.response_start
        return {
            "input_ids": example.input_ids[:length],
            "response_start": example.response_start,
            "topk_ids": targets.topk_ids[:num_targets],
            "topk_logits": targets.topk_logits[:num_targets],
            "logsumexp": targets.logsumexp[:num_targets],
        }


@dataclass
class DistillCollator:
    """Right-pad a list of DistillDataset items into model inputs and logit-aligned targets.

    Position t of target_ids and of the teacher tensors contains the target for token t + 1,
    matching the logits at t. target_ids is -100 on prompt positions and padding, so the
    cross-entropy covers the response tokens only. teacher_mask is True where a teacher target
    exists, which is the same set of positions.
    """

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch_size = len(features)
        length = max(len(feature["input_ids"]) for feature in features)
        top_k = features[0]["topk_ids"].shape[-1]
        batch = {
            "input_ids": torch.full((batch_size, length), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((batch_size, length), dtype=torch.long),
            "target_ids": torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long),
            "teacher_ids": torch.zeros((batch_size, length, top_k), dtype=torch.long),
            "teacher_logits": torch.zeros((batch_size, length, top_k), dtype=torch.float32),
            "teacher_logsumexp": torch.zeros((batch_size, length), dtype=torch.float32),
            "teacher_mask": torch.zeros((batch_size, length), dtype=torch.bool),
        }
        for row, feature in enumerate(features):
            input_ids = torch.tensor(feature["input_ids"], dtype=torch.long)
            batch["input_ids"][row, : len(input_ids)] = input_ids
            batch["attention_mask"][row, : len(input_ids)] = 1
            positions = slice(feature["response_start"] - 1, len(input_ids) - 1)
            batch["target_ids"][row, positions] = input_ids[feature["response_start"] :]
            batch["teacher_ids"][row, positions] = torch.from_numpy(feature["topk_ids"])
            batch["teacher_logits"][row, positions] = torch.from_numpy(feature["topk_logits"])
            batch["teacher_logsumexp"][row, positions] = torch.from_numpy(feature["logsumexp"])
            batch["teacher_mask"][row, positions] = True
        return batch


@dataclass
class LossTracker:
    """Sums of the loss parts and token counts, for the progress line and the returned metrics."""

    window: dict = field(default_factory=lambda: {"loss": 0.0, "ce": 0.0, "kl": 0.0, "batches": 0, "tokens": 0})
    total_loss: float = 0.0
    total_batches: int = 0
    total_tokens: int = 0
    last_window: dict = field(default_factory=dict)

    def add(self, parts: DistillationLoss, tokens: int) -> None:
        loss = float(parts.loss.detach())
        self.window["loss"] += loss
        self.window["ce"] += float(parts.ce)
        self.window["kl"] += float(parts.kl)
        self.window["batches"] += 1
        self.window["tokens"] += tokens
        self.total_loss += loss
        self.total_batches += 1
        self.total_tokens += tokens

    def take_window(self) -> dict:
        """Return the mean loss parts and the token count since the last call, then reset them."""
        batches = max(self.window["batches"], 1)
        means = {name: self.window[name] / batches for name in ("loss", "ce", "kl")}
        means["tokens"] = self.window["tokens"]
        self.window = {"loss": 0.0, "ce": 0.0, "kl": 0.0, "batches": 0, "tokens": 0}
        self.last_window = means
        return means


def forward_distillation_loss(
    model: PreTrainedModel, inputs: dict, targets: dict, alpha: float, temperature: float
) -> tuple:
    """Run the student on a DistillCollator batch and return (outputs, DistillationLoss).

    `inputs` contains input_ids and attention_mask, and `targets` the TARGET_KEYS entries.
    """
    # The logits over the vocabulary are the costliest part of a small model's step, so ask
    # only for the positions from the earliest response target on (prompts carry no targets).
    length = inputs["input_ids"].shape[1]
    first = int(targets["teacher_mask"].any(dim=0).nonzero()[0]) if targets["teacher_mask"].any() else 0
    outputs = model(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        use_cache=False,
        logits_to_keep=length - first,
    )
    sliced = {name: tensor[:, first:] for name, tensor in targets.items()}
    parts = distillation_loss(
        outputs.logits,
        sliced["target_ids"],
        sliced["teacher_ids"],
        sliced["teacher_logits"],
        sliced["teacher_logsumexp"],
        sliced["teacher_mask"],
        alpha=alpha,
        temperature=temperature,
    )
    return outputs, parts


class DistillTrainer(Trainer):
    """Trainer whose loss is distillation_loss against the batch's stored teacher targets."""

    def __init__(self, *args, alpha: float, temperature: float, tracker: LossTracker, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.alpha = alpha
        self.temperature = temperature
        self.tracker = tracker

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Each micro-batch loss is a mean over its own positions, and Trainer divides it by the
        # gradient accumulation steps because the batch has no "labels" to count items from.
        targets = {name: inputs.pop(name) for name in TARGET_KEYS}
        outputs, parts = forward_distillation_loss(model, inputs, targets, self.alpha, self.temperature)
        self.tracker.add(parts, tokens=int(inputs["attention_mask"].sum()))
        return (parts.loss, outputs) if return_outputs else parts.loss


class DistillProgressCallback(TrainerCallback):
    """Log one fixed-format progress line every `logging_steps` optimizer steps and at the last step."""

    def __init__(self, tracker: LossTracker, logging_steps: int) -> None:
        self.tracker = tracker
        self.logging_steps = max(logging_steps, 1)
        self._window_start = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self._window_start = time.perf_counter()

    def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
        step = state.global_step
        if step % self.logging_steps and step != state.max_steps:
            return
        now = time.perf_counter()
        window = self.tracker.take_window()
        tokens_per_s = window["tokens"] / max(now - self._window_start, 1e-9)
        self._window_start = now
        learning_rate = lr_scheduler.get_last_lr()[0] if lr_scheduler is not None else float("nan")
        log.info(
            "distill step %d/%d | loss %.4f (ce %.2f kl %.2f) | lr %.1e | %.0f tok/s",
            step,
            state.max_steps,
            window["loss"],
            window["ce"],
            window["kl"],
            learning_rate,
            tokens_per_s,
        )


def check_vocab_sizes(model: PreTrainedModel, tokenizer, store: LogitStore) -> None:
    """Raise ValueError unless the student's logits are as wide as the store's vocabulary.

    The tokenizer may have fewer tokens than the logits width (some models pad the embedding
    matrix), but never more.
    """
    width = output_vocab_size(model)
    if width != store.vocab_size:
        raise ValueError(
            f"the student's logits have {width} entries but logit store {store.path} has vocab_size "
            f"{store.vocab_size}; the student and teacher must share a tokenizer and vocabulary"
        )
    if len(tokenizer) > store.vocab_size:
        raise ValueError(
            f"the student's tokenizer has {len(tokenizer)} tokens but logit store {store.path} has vocab_size "
            f"{store.vocab_size}; the student and teacher must share a tokenizer"
        )


def load_examples(rows: list[dict], store: LogitStore, max_length: int) -> tuple[list[DistillExample], int]:
    """Check each row against the store and return its examples plus the count of rows dropped.

    A row is dropped (with a warning) when its prompt alone fills max_length. A row missing from
    the store, or scored from other input_ids, raises ValueError.
    """
    examples = []
    missing = []
    too_long = 0
    for row in rows:
        key = row_key(row)
        input_ids, response_start = row_sequence(row)
        if key not in store:
            missing.append(key)
            continue
        store.check_sequence(key, input_ids)
        if response_start >= max_length:
            too_long += 1
            continue
        examples.append(DistillExample(key, input_ids, response_start))
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(rows)} rows have no teacher targets in logit store {store.path} "
            f"(first: {missing[:3]}); score them with edgelm.train.score.score_rows first"
        )
    if too_long:
        log.warning("dropped %d rows whose prompt has max_length=%d tokens or more", too_long, max_length)
    return examples, too_long


def distill(
    student_dir: str | Path,
    rows_path: str | Path,
    store_dir: str | Path,
    out_dir: str | Path,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    learning_rate: float = 5e-5,
    epochs: int = 1,
    batch_size: int = 8,
    grad_accum: int = 1,
    max_length: int = 512,
    seed: int = 0,
    logging_steps: int = 10,
) -> dict:
    """Train the student on the rows in `rows_path` against the teacher targets in `store_dir`.

    Sequences longer than max_length are cut to max_length tokens, and their targets with them.
    The trained model and tokenizer are saved to out_dir, replacing it atomically.

    Returns metrics: rows, dropped_rows, steps, train_loss (mean over all micro-batches),
    final_loss, final_ce and final_kl (means over the last logging window), tokens (non-padding
    input tokens processed), seconds, tokens_per_s.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be between 0 and 1 (the weight of the cross-entropy term)")
    store = LogitStore(store_dir)
    model, tokenizer = load_model(str(student_dir))
    check_vocab_sizes(model, tokenizer, store)
    rows = read_jsonl(rows_path)
    examples, dropped = load_examples(rows, store, max_length)
    if not examples:
        raise ValueError(f"no rows to train on in {rows_path} ({len(rows)} rows, {dropped} longer than max_length)")
    log.info("distilling %s on %d rows from %s (teacher %s)", student_dir, len(examples), rows_path, store.teacher_id)

    set_seed(seed)
    tracker = LossTracker()
    with tempfile.TemporaryDirectory(prefix="edgelm-distill-") as trainer_dir:
        args = TrainingArguments(
            output_dir=trainer_dir,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=grad_accum,
            num_train_epochs=epochs,
            learning_rate=learning_rate,
            seed=seed,
            data_seed=seed,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            remove_unused_columns=False,
            dataloader_num_workers=0,
            use_cpu=not torch.cuda.is_available(),
        )
        trainer = DistillTrainer(
            model=model,
            args=args,
            train_dataset=DistillDataset(examples, store, max_length),
            data_collator=DistillCollator(pad_token_id=tokenizer.pad_token_id),
            callbacks=[DistillProgressCallback(tracker, logging_steps)],
            alpha=alpha,
            temperature=temperature,
            tracker=tracker,
        )
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start

    save_model(trainer.model, tokenizer, out_dir)
    final = tracker.last_window
    metrics = {
        "rows": len(examples),
        "dropped_rows": dropped,
        "steps": trainer.state.global_step,
        "train_loss": tracker.total_loss / max(tracker.total_batches, 1),
        "final_loss": final.get("loss", float("nan")),
        "final_ce": final.get("ce", float("nan")),
        "final_kl": final.get("kl", float("nan")),
        "tokens": tracker.total_tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tracker.total_tokens / seconds, 1) if seconds > 0 else 0.0,
    }
    log.info("distillation finished, model saved to %s: %s", out_dir, metrics)
    return metrics
