"""Pieces shared by the SFT and distillation trainers: arguments, padding, token-mean loss, progress line."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

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
    save_steps: int | None = None,
    save_total_limit: int | None = None,
    max_steps: int = -1,
    optim: str = "adamw_torch",
    lr_scheduler_type: str = "cosine",
) -> TrainingArguments:
    """TrainingArguments for edgelm's trainers: no external loggers, checkpoints only on request.

    With `sequential=True` the Trainer reads examples in dataset order (a trainer that brings its
    own sampler ignores this). `save_steps` turns on checkpoints every that many optimizer steps
    in `output_dir`, keeping the newest `save_total_limit`; a checkpoint holds the model, the
    optimizer, the scheduler and the RNG states, which is what an exact resume needs.
    """
    return TrainingArguments(
        output_dir=output_dir,
        learning_rate=learning_rate,
        num_train_epochs=epochs,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        optim=optim,
        lr_scheduler_type=lr_scheduler_type,
        warmup_steps=warmup_steps,
        weight_decay=0.0,
        logging_steps=logging_steps,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        save_total_limit=save_total_limit,
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


# The Trainer writes this file last into each checkpoint, after the model, optimizer and scheduler.
TRAINER_STATE = "trainer_state.json"


def last_complete_checkpoint(folder: Path) -> str | None:
    """Return the newest checkpoint-N folder in `folder` that the Trainer finished writing, or None.

    A process killed while saving leaves a checkpoint without a readable trainer_state.json. Such
    folders are removed, with a message, so that resuming takes the previous checkpoint.
    """
    if not folder.is_dir():
        return None
    numbered = [(int(path.name.split("-")[1]), path) for path in folder.glob("checkpoint-*")
                if path.is_dir() and path.name.split("-")[1].isdigit()]
    for _, path in sorted(numbered, reverse=True):
        try:
            json.loads((path / TRAINER_STATE).read_text())
            return str(path)
        except (OSError, ValueError):
            log.warning("removing %s: its save was interrupted (no complete %s)", path, TRAINER_STATE)
            shutil.rmtree(path, ignore_errors=True)
    return None


def pad_batch(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-pad `input_ids` (with pad_token_id) and `labels` (with -100); add attention_mask and position_ids.

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


def answer_loss_sum(model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (summed cross-entropy over labelled tokens, number of labelled tokens).

    Logits are computed only at the positions that predict a label (a boolean `logits_to_keep`),
    because the LM head over a 49k vocabulary costs about as much as ten small decoder layers,
    and in fast-mode examples under a tenth of the tokens are labelled. Works for left-padded
    and for packed batches alike.
    """
    # Position i predicts token i + 1, so the logits kept are those one before each label.
    targets = inputs["labels"][:, 1:]
    labelled = targets != IGNORE_INDEX
    keep = torch.nn.functional.pad(labelled, (0, 1))
    model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
    # Without use_cache=False, transformers 5 builds a KV cache (config.use_cache defaults to True)
    # and then skips packed-sequence detection, so packed examples would attend to each other.
    logits = model(**model_inputs, logits_to_keep=keep, use_cache=False).logits  # (labelled tokens, vocab)
    loss = torch.nn.functional.cross_entropy(logits.float(), targets[labelled], reduction="sum")
    return loss, labelled.sum()


def answer_loss(model, inputs: dict[str, torch.Tensor], num_items_in_batch=None) -> torch.Tensor:
    """Cross-entropy over labelled tokens, divided by `num_items_in_batch` when given, else by this batch's count.

    `num_items_in_batch` is the number of labelled tokens over all gradient-accumulation
    micro-batches of one optimizer step, so 1x8 and 8x1 accumulation weight every token the same.
    """
    loss, count = answer_loss_sum(model, inputs)
    return loss / (num_items_in_batch if num_items_in_batch is not None else count.clamp(min=1))


class TokenMeanLossMixin:
    """Trainer mixin for a loss that is a mean over tokens of the whole accumulated batch.

    Put it before Trainer in the bases. Its `get_batch_samples` counts the loss tokens of all
    micro-batches of an optimizer step (`count_loss_tokens`, by default labels other than -100
    after the first column) and the Trainer passes that count to compute_loss as
    `num_items_in_batch`. compute_loss sums the per-token losses of its micro-batch and returns
    `self.token_mean(loss_sum, num_items_in_batch, inputs)`. The mixin sets
    `model_accepts_loss_kwargs` and `loss_is_scaled_for_ga`, so the Trainer does not divide by
    the accumulation steps again. A trainer whose batches keep targets under another key
    overrides `count_loss_tokens`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True

    def count_loss_tokens(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return (inputs["labels"][:, 1:] != IGNORE_INDEX).sum()

    def _averages_tokens_across_processes(self) -> bool:
        return bool(self.args.average_tokens_across_devices) and self.args.world_size > 1

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        count = torch.as_tensor(sum(int(self.count_loss_tokens(batch)) for batch in batch_samples), device=device)
        if self._averages_tokens_across_processes():
            count = self.accelerator.gather(count).sum()
        return batch_samples, count

    def token_mean(self, loss_sum: torch.Tensor, num_items_in_batch, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Divide a summed loss by the loss tokens of the accumulated batch (or of `inputs` outside training)."""
        if num_items_in_batch is None:
            return loss_sum / self.count_loss_tokens(inputs).clamp(min=1)
        # With the count summed over processes, each process's loss is a share of the global mean;
        # DDP averages gradients over processes, so scale back up by their number.
        scale = self.accelerator.num_processes if self._averages_tokens_across_processes() else 1
        return loss_sum * scale / torch.as_tensor(num_items_in_batch).clamp(min=1)


class AnswerLossTrainer(TokenMeanLossMixin, Trainer):
    """A Trainer whose loss is the token mean of `answer_loss_sum`, read in the order of `train_sampler`.

    With `packed=True` the batches come from `edgelm.train.packing.collate_packed`: their
    attention_mask only counts tokens and is dropped before the forward pass, so that the model
    builds the per-example mask from position_ids.
    """

    def __init__(self, *args, train_sampler: torch.utils.data.Sampler | None = None, packed: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.train_sampler = train_sampler
        self.packed = packed

    def _get_train_sampler(self, train_dataset=None):
        if self.train_sampler is not None:
            return self.train_sampler
        return super()._get_train_sampler(train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.packed:
            inputs = {key: value for key, value in inputs.items() if key != "attention_mask"}
        loss_sum, _ = answer_loss_sum(model, inputs)
        loss = self.token_mean(loss_sum, num_items_in_batch, inputs)
        return (loss, None) if return_outputs else loss


class ProgressLine(TrainerCallback):
    """Log one fixed-format line per logging step: stage, step, loss parts, lr, tokens/s.

    Tokens/s counts the non-padding tokens the model consumed since the previous line
    (`state.num_input_tokens_seen`, which needs include_num_input_tokens_seen="non_padding").
    """

    def __init__(self, stage: str):
        self.stage = stage
        self.last_tokens = 0
        self.start_tokens = 0
        self.last_time = time.perf_counter()
        self.history: list[dict] = []

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed run starts with the count restored from the checkpoint.
        self.start_tokens = self.last_tokens = state.num_input_tokens_seen
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
