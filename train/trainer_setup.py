"""Pieces shared by the SFT and distillation trainers: arguments, padding, progress line."""

from __future__ import annotations

import logging
import time

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from edgelm.train.chat import IGNORE_INDEX

log = logging.getLogger(__name__)


def training_arguments(
    output_dir: str,
    *,
    learning_rate: float,
    epochs: float,
    batch_size: int,
    grad_accum: int,
    seed: int,
    warmup_steps: int,
    logging_steps: int,
    sequential: bool,
    bf16: bool = False,
) -> TrainingArguments:
    """TrainingArguments for edgelm's trainers: no checkpoints, no external loggers.

    With `sequential=True` the Trainer reads examples in dataset order, which is how the
    curriculum order reaches the model.
    """
    return TrainingArguments(
        output_dir=output_dir,
        learning_rate=learning_rate,
        num_train_epochs=epochs,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        lr_scheduler_type="cosine",
        warmup_steps=warmup_steps,
        weight_decay=0.0,
        logging_steps=logging_steps,
        save_strategy="no",
        report_to=[],
        seed=seed,
        data_seed=seed,
        bf16=bf16,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        remove_unused_columns=False,
        train_sampling_strategy="sequential" if sequential else "random",
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
    )


def pad_batch(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-pad `input_ids` (with pad_token_id) and `labels` (with -100); add attention_mask and position_ids.

    Left padding puts every answer at the right edge of the batch, so the answer tokens of all
    rows fall in the last few columns and `answer_loss` computes logits for those columns only.
    Explicit position_ids keep each row's positions starting at 0 despite the padding.
    """
    width = max(len(example["input_ids"]) for example in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        start = width - len(example["input_ids"])
        input_ids[row, start:] = torch.tensor(example["input_ids"])
        labels[row, start:] = torch.tensor(example["labels"])
        attention_mask[row, start:] = 1
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "position_ids": position_ids}


def answer_loss(model, inputs: dict[str, torch.Tensor], num_items_in_batch=None) -> torch.Tensor:
    """Cross-entropy over labelled tokens, with logits computed only from the first labelled column on.

    The LM head over a 49k vocabulary costs about as much as ten small decoder layers, and in
    fast-mode examples under a tenth of the tokens are labelled, so skipping the other columns
    roughly halves the step time. With `num_items_in_batch` (labelled tokens over all
    gradient-accumulation micro-batches) the loss is a sum divided by that count, so 1x8 and 8x1
    accumulation weight every token the same.
    """
    labels = inputs["labels"]
    labelled = labels != IGNORE_INDEX
    # Column i predicts token i + 1, so logits start one column before the first label.
    first_label = int(labelled.any(dim=0).float().argmax())
    keep = labels.shape[1] - first_label + 1
    model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
    logits = model(**model_inputs, logits_to_keep=keep).logits  # (batch, keep, vocab)
    targets = labels[:, labels.shape[1] - keep + 1 :]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    count = num_items_in_batch if num_items_in_batch is not None else labelled.sum()
    return loss / count


class AnswerLossTrainer(Trainer):
    """A Trainer whose loss is `answer_loss`: LM-head work only where labels exist."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # answer_loss normalizes by num_items_in_batch itself; this flag makes the Trainer count
        # those items and stop dividing by the accumulation steps a second time.
        self.model_accepts_loss_kwargs = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = answer_loss(model, inputs, num_items_in_batch)
        return (loss, None) if return_outputs else loss


class ProgressLine(TrainerCallback):
    """Log one fixed-format line per logging step: stage, step, loss parts, lr, tokens/s.

    Tokens/s counts the non-padding tokens the model consumed since the previous line
    (`state.num_input_tokens_seen`, which needs include_num_input_tokens_seen="non_padding").
    """

    def __init__(self, stage: str):
        self.stage = stage
        self.last_tokens = 0
        self.last_time = time.perf_counter()
        self.history: list[dict] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_tokens = state.num_input_tokens_seen
        self.last_time = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        now = time.perf_counter()
        tokens_per_second = (state.num_input_tokens_seen - self.last_tokens) / max(now - self.last_time, 1e-9)
        self.last_tokens, self.last_time = state.num_input_tokens_seen, now
        parts = " ".join(f"{key.removeprefix('loss_')} {value:.3f}" for key, value in logs.items() if key.startswith("loss_"))
        parts = f" ({parts})" if parts else ""
        log.info(
            "%s step %d/%d | loss %.4f%s | lr %.2e | %.0f tok/s",
            self.stage, state.global_step, state.max_steps, logs["loss"], parts, logs.get("learning_rate", 0.0), tokens_per_second,
        )
        self.history.append({"step": state.global_step, **logs, "tokens_per_second": tokens_per_second})
