"""Train a student on a teacher's stored top-k log-probabilities (offline distillation).

The teacher is not loaded: its targets come from a logit store written by
edgelm.train.score.score_rows over the same rows file. The loss is
alpha * cross-entropy on the response tokens + (1 - alpha) * a top-k divergence to the teacher
(forward KL, reverse KL, generalized JSD or total variation; see edgelm.train.losses), summed
over target tokens and divided by the target tokens of the whole optimizer step, so gradient
accumulation and multiple processes give the gradient of one large batch.

Run it under `accelerate launch` for several processes: Trainer shards the batches, and
process 0 saves the model.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.utils import is_torch_npu_available
from transformers.trainer_pt_utils import LengthGroupedSampler

from edgelm.config import DISTILL_TARGETS, PRECISIONS
from edgelm.files import read_jsonl_with
from edgelm.train.distributed import gather_objects
from edgelm.train.logit_store import RESCORE, LogitStore
from edgelm.train.losses import IGNORE_INDEX, DistillationLoss, check_loss_settings, distillation_loss
from edgelm.train.models import load_model, save_model
from edgelm.train.preflight import check_same_tokenizer, max_positions, tokenizer_fingerprint
from edgelm.train.rollout import ROW_FIELDS, ROWS_FIX
from edgelm.train.score import output_vocab_size, row_key, row_sequence

log = logging.getLogger(__name__)

# Batch entries with the teacher's targets. compute_loss removes them before the forward pass.
# "labels" is there only so that Trainer counts the target tokens of each optimizer step
# (num_items_in_batch), which it reads from the already shifted "shift_labels".
TARGET_KEYS = ("labels", "shift_labels", "teacher_ids", "teacher_logprobs", "teacher_tail_logprob", "teacher_mask")


@dataclass(frozen=True)
class DistillExample:
    key: str
    input_ids: list[int]
    response_start: int
    source: str = "rollout"


@dataclass(frozen=True)
class LossSettings:
    """Loss options passed from distill() to the trainer."""

    alpha: float = 0.5
    loss: str = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0


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
            "topk_logprobs": targets.topk_logprobs[:num_targets],
            "tail_logprob": targets.tail_logprob[:num_targets],
        }


@dataclass
class DistillCollator:
    """Right-pad a list of DistillDataset items into model inputs and logit-aligned targets.

    Position t of shift_labels and of the teacher tensors contains the target for token t + 1,
    matching the logits at t. shift_labels is -100 on prompt positions and padding, so the
    cross-entropy covers the response tokens only. teacher_mask is True where a teacher target
    exists, which is the same set of positions. labels is the unshifted form of shift_labels.
    """

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch_size = len(features)
        length = max(len(feature["input_ids"]) for feature in features)
        top_k = features[0]["topk_ids"].shape[-1]
        batch = {
            "input_ids": torch.full((batch_size, length), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((batch_size, length), dtype=torch.long),
            "labels": torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long),
            "shift_labels": torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long),
            "teacher_ids": torch.zeros((batch_size, length, top_k), dtype=torch.long),
            "teacher_logprobs": torch.zeros((batch_size, length, top_k), dtype=torch.float32),
            "teacher_tail_logprob": torch.zeros((batch_size, length), dtype=torch.float32),
            "teacher_mask": torch.zeros((batch_size, length), dtype=torch.bool),
        }
        for row, feature in enumerate(features):
            input_ids = torch.tensor(feature["input_ids"], dtype=torch.long)
            start = feature["response_start"]
            batch["input_ids"][row, : len(input_ids)] = input_ids
            batch["attention_mask"][row, : len(input_ids)] = 1
            batch["labels"][row, start : len(input_ids)] = input_ids[start:]
            positions = slice(start - 1, len(input_ids) - 1)
            batch["shift_labels"][row, positions] = input_ids[start:]
            batch["teacher_ids"][row, positions] = torch.from_numpy(feature["topk_ids"])
            batch["teacher_logprobs"][row, positions] = torch.from_numpy(feature["topk_logprobs"])
            batch["teacher_tail_logprob"][row, positions] = torch.from_numpy(feature["tail_logprob"])
            batch["teacher_mask"][row, positions] = True
        return batch


class MixedBatchSampler(torch.utils.data.Sampler[int]):
    """Order example indices so that every block of `batch_size` has a share `label_fraction` of label rows.

    The per-batch label count alternates between floor and ceil of batch_size * label_fraction,
    so the running share stays within one row of the target. One epoch uses each rollout row
    once. Label rows are drawn in shuffled order and reused when the label pool runs out.
    """

    def __init__(self, sources: list[str], batch_size: int, label_fraction: float, seed: int) -> None:
        self.rollout_indices = [index for index, source in enumerate(sources) if source != "label"]
        self.label_indices = [index for index, source in enumerate(sources) if source == "label"]
        if not self.rollout_indices or not self.label_indices:
            raise ValueError(
                f"distill.targets 'mixed' needs rollout rows and label rows; got {len(self.rollout_indices)} rollout "
                f"and {len(self.label_indices)} label rows, so rerun the rollout stage with distill.targets: mixed"
            )
        self.batch_size = batch_size
        self.label_fraction = label_fraction
        self.seed = seed
        self.epoch = 0
        self._label_counts = self._plan()

    def _plan(self) -> list[int]:
        """Return the label rows per batch, until the rollout rows are used up."""
        counts, used_rollouts, index = [], 0, 0
        while used_rollouts < len(self.rollout_indices):
            labels = round((index + 1) * self.batch_size * self.label_fraction) - round(index * self.batch_size * self.label_fraction)
            labels = min(labels, self.batch_size - 1)
            counts.append(labels)
            used_rollouts += self.batch_size - labels
            index += 1
        return counts

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rollout_indices) + sum(self._label_counts)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        rollouts = [self.rollout_indices[i] for i in torch.randperm(len(self.rollout_indices), generator=generator)]
        labels: list[int] = []
        for label_count in self._label_counts:
            while len(labels) < label_count:
                labels += [self.label_indices[i] for i in torch.randperm(len(self.label_indices), generator=generator)]
            batch = rollouts[: self.batch_size - label_count] + labels[:label_count]
            rollouts, labels = rollouts[self.batch_size - label_count :], labels[label_count:]
            yield from batch


@dataclass
class LossTracker:
    """Token-weighted sums of the loss parts, for the progress line and the returned metrics."""

    settings: LossSettings = field(default_factory=LossSettings)
    window: dict = field(default_factory=lambda: {"ce": 0.0, "divergence": 0.0, "targets": 0, "tokens": 0})
    total: dict = field(default_factory=lambda: {"ce": 0.0, "divergence": 0.0, "targets": 0, "tokens": 0})
    last_window: dict = field(default_factory=dict)

    def add(self, parts: DistillationLoss, tokens: int) -> None:
        for sums in (self.window, self.total):
            sums["ce"] += float(parts.ce) * parts.tokens
            sums["divergence"] += float(parts.divergence) * parts.tokens
            sums["targets"] += parts.tokens
            sums["tokens"] += tokens

    def means(self, sums: dict) -> dict:
        """Return the per-target-token loss, ce and divergence of `sums`, and its input token count."""
        targets = max(sums["targets"], 1)
        ce, divergence = sums["ce"] / targets, sums["divergence"] / targets
        alpha = self.settings.alpha
        return {"loss": alpha * ce + (1 - alpha) * divergence, "ce": ce, "divergence": divergence, "tokens": sums["tokens"]}

    def take_window(self) -> dict:
        """Return the means since the last call, then reset them."""
        self.last_window = self.means(self.window)
        self.window = {"ce": 0.0, "divergence": 0.0, "targets": 0, "tokens": 0}
        return self.last_window


@contextmanager
def head_on_targets_only(model: PreTrainedModel, mask: torch.Tensor) -> Iterator[None]:
    """While active, the model's LM head receives only the hidden states where `mask` is True.

    `mask` is [B, T] over the positions the head would see. The head then returns [1, N, V]
    logits for the N masked positions, instead of [B, T, V] logits whose unmasked rows the loss
    discards: prompts of rows that start later, and padding. Whatever the model applies after
    its head (a scale, a soft cap) is applied per position, so the selected logits are the same.
    A model without an output embedding, or whose head receives another shape, is left as it is.
    """
    head = getattr(model, "module", model).get_output_embeddings()
    if head is None:
        yield
        return

    def select(module, args):
        # A head called with keyword arguments, or on another shape, runs unchanged.
        if not args or args[0].shape[:2] != mask.shape:
            return None
        return (args[0][mask].unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


def forward_distillation_loss(
    model: PreTrainedModel,
    inputs: dict,
    targets: dict,
    settings: LossSettings,
    num_items_in_batch: int | torch.Tensor | None = None,
    vocab_size: int | None = None,
) -> tuple:
    """Run the student on a DistillCollator batch and return (outputs, DistillationLoss).

    `inputs` contains input_ids and attention_mask, and `targets` the TARGET_KEYS entries.
    `vocab_size` cuts the student's logits to the store's width (padding rows; see
    edgelm.train.preflight).
    """
    # The logits over the vocabulary are the costliest part of a small model's step, so the
    # head runs only from the earliest response target on (prompts carry no targets), and
    # there only at the target positions.
    length = inputs["input_ids"].shape[1]
    mask = targets["teacher_mask"]
    first = int(mask.any(dim=0).nonzero()[0]) if mask.any() else 0
    mask = mask[:, first:]
    with head_on_targets_only(model, mask):
        outputs = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            use_cache=False,
            logits_to_keep=length - first,
        )
    logits = outputs.logits if vocab_size is None else outputs.logits[..., :vocab_size]
    aligned = {name: targets[name][:, first:] for name in ("shift_labels", "teacher_ids", "teacher_logprobs", "teacher_tail_logprob")}
    if logits.shape[:2] != mask.shape:
        # The head ran on the target positions only: select the same positions of the targets.
        aligned = {name: tensor[mask].unsqueeze(0) for name, tensor in aligned.items()}
        mask = torch.ones(logits.shape[:2], dtype=torch.bool, device=mask.device)
    parts = distillation_loss(
        logits,
        aligned["shift_labels"],
        aligned["teacher_ids"],
        aligned["teacher_logprobs"],
        mask,
        alpha=settings.alpha,
        loss=settings.loss,
        beta=settings.beta,
        temperature=settings.temperature,
        teacher_tail_logprob=aligned["teacher_tail_logprob"],
        num_items_in_batch=num_items_in_batch,
    )
    return outputs, parts


class DistillTrainer(Trainer):
    """Trainer whose loss is distillation_loss against the batch's stored teacher targets.

    The loss is a sum over target tokens divided by Trainer's num_items_in_batch (the target
    tokens of the whole optimizer step, over all processes), so 8 micro-batches of 1 sequence
    give the same gradient as 1 batch of 8.
    """

    def __init__(
        self, *args, settings: LossSettings, tracker: LossTracker, vocab_size: int | None = None,
        sampler: torch.utils.data.Sampler | None = None, **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.settings = settings
        self.tracker = tracker
        self.vocab_size = vocab_size
        self.sampler = sampler
        # Makes Trainer count num_items_in_batch and skip its division by the accumulation steps.
        self.model_accepts_loss_kwargs = True

    def _get_train_sampler(self, train_dataset=None):
        return self.sampler if self.sampler is not None else super()._get_train_sampler(train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        targets = {name: inputs.pop(name) for name in TARGET_KEYS}
        outputs, parts = forward_distillation_loss(
            model, inputs, targets, self.settings, num_items_in_batch, self.vocab_size
        )
        self.tracker.add(parts, tokens=int(inputs["attention_mask"].sum()))
        loss = parts.loss
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # num_items_in_batch counts the targets of every process, and DDP averages the
            # gradients over processes, so scale back up to a sum over all targets.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss


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
        if not state.is_world_process_zero:
            return
        learning_rate = lr_scheduler.get_last_lr()[0] if lr_scheduler is not None else float("nan")
        log.info(
            "distill step %d/%d | loss %.4f (ce %.2f %s %.2f) | lr %.1e | %.0f tok/s",
            step,
            state.max_steps,
            window["loss"],
            window["ce"],
            self.tracker.settings.loss,
            window["divergence"],
            learning_rate,
            tokens_per_s,
        )


def check_student(model: PreTrainedModel, tokenizer, store: LogitStore, max_length: int) -> int | None:
    """Run the pre-flight checks of the student against the store; return the width to cut logits to.

    Raises ValueError when the student's tokenizer differs from the teacher's fingerprint in the
    store, when the widths differ by more than padding, or when max_length exceeds the student's
    max_position_embeddings. Returns None when no cut is needed.
    """
    if store.tokenizer is not None:
        check_same_tokenizer(store.tokenizer, tokenizer_fingerprint(tokenizer))
    else:
        log.warning("logit store %s has no tokenizer fingerprint; the student's tokenizer is not checked", store.path)
    width = output_vocab_size(model)
    limit = max_positions(model)
    if limit is not None and max_length > limit:
        raise ValueError(
            f"max_length={max_length} exceeds the student's max_position_embeddings={limit}; lower max_length "
            f"(distill uses sft.max_length in the pipeline)"
        )
    if width == store.vocab_size:
        return None
    if width > store.vocab_size and len(tokenizer) <= store.vocab_size:
        log.info("student logits width %d cut to the store's vocab_size %d (padding rows)", width, store.vocab_size)
        return store.vocab_size
    raise ValueError(
        f"the student's logits have {width} entries and its tokenizer {len(tokenizer)} tokens, but logit store "
        f"{store.path} has vocab_size {store.vocab_size}; the student and teacher must share a tokenizer, and a "
        f"width difference is allowed only for padding rows beyond the last token id (rescore with the student's "
        f"width if the teacher's embedding is the wider one)"
    )


def load_examples(rows: list[dict], store: LogitStore, max_length: int) -> tuple[list[DistillExample], int]:
    """Check each row against the store and return its examples plus the count of rows dropped.

    A row is dropped (with a warning) when its prompt alone fills max_length. A row missing from
    the store, or scored from other input_ids, raises ValueError naming the row.
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
        examples.append(DistillExample(key, input_ids, response_start, row.get("source", "rollout")))
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(rows)} rows have no teacher targets in logit store {store.path} "
            f"(first: {missing[:3]}); {RESCORE}"
        )
    if too_long:
        log.warning("dropped %d rows whose prompt has max_length=%d tokens or more", too_long, max_length)
    return examples, too_long


def select_rows(rows: list[dict], targets: str) -> list[dict]:
    """Return the rows that distill.targets trains on: rollouts, label rows, or both for 'mixed'."""
    if targets not in DISTILL_TARGETS:
        raise ValueError(f"targets={targets!r} is not one of {DISTILL_TARGETS}")
    if targets == "mixed":
        return rows
    wanted = "label" if targets == "label" else "rollout"
    selected = [row for row in rows if row.get("source", "rollout") == wanted]
    if not selected:
        raise ValueError(
            f"distill.targets={targets!r} needs rows with source {wanted!r}, but the rows file has none; "
            f"rerun the rollout stage (`--from rollout`)"
        )
    return selected


def _precision_args(precision: str) -> dict:
    """Return the TrainingArguments flags for `precision`, checking that the device supports it."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}")
    if precision == "fp16" and not (torch.cuda.is_available() or is_torch_npu_available()):
        raise ValueError("precision='fp16' needs a CUDA or NPU device; use 'bf16' or 'fp32' on CPU")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def distill(
    student_dir: str | Path,
    rows_path: str | Path,
    store_dir: str | Path,
    out_dir: str | Path,
    *,
    alpha: float = 0.5,
    loss: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    targets: str = "on_policy",
    label_fraction: float = 0.25,
    learning_rate: float = 5e-5,
    epochs: float = 1.0,
    batch_size: int = 8,
    grad_accum: int = 1,
    max_length: int = 512,
    precision: str = "fp32",
    group_by_length: bool = True,
    seed: int = 0,
    logging_steps: int = 10,
    max_steps: int = -1,
) -> dict:
    """Train the student on the rows in `rows_path` against the teacher targets in `store_dir`.

    `targets` picks the rows: "on_policy" (the student's rollouts), "label" (reference answers)
    or "mixed" (both, with a share `label_fraction` of label rows in every batch).
    `group_by_length` batches sequences of similar length (transformers' LengthGroupedSampler:
    shuffled, then sorted inside groups of batches), which cuts padding; "mixed" ignores it. Sequences
    longer than max_length are cut to max_length tokens, and their targets with them. The
    trained model and tokenizer are saved to out_dir by process 0, replacing it atomically.

    Returns metrics: rows, dropped_rows, steps, train_loss, train_ce and train_divergence
    (token-weighted means over the whole run and all processes), final_loss, final_ce and
    final_divergence (the last logging window of this process), tokens (non-padding input tokens processed), seconds, tokens_per_s,
    processes and precision.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be between 0 and 1 (the weight of the cross-entropy term)")
    check_loss_settings(loss, beta, temperature)
    if not 0 < learning_rate < math.inf:
        raise ValueError(f"learning_rate={learning_rate} must be positive and finite")
    if not 0 < epochs < math.inf and max_steps <= 0:
        raise ValueError(f"epochs={epochs} must be positive and finite (or set max_steps)")
    if targets == "mixed" and not 0.0 < label_fraction < 1.0:
        raise ValueError(f"label_fraction={label_fraction} must be between 0 and 1 (exclusive) for targets 'mixed'")
    precision_args = _precision_args(precision)
    rows = select_rows(read_jsonl_with(rows_path, ROW_FIELDS, "rollout rows", ROWS_FIX), targets)
    store = LogitStore(store_dir)
    model, tokenizer = load_model(str(student_dir))
    vocab_size = check_student(model, tokenizer, store, max_length)
    examples, dropped = load_examples(rows, store, max_length)
    if not examples:
        raise ValueError(f"no rows to train on in {rows_path} ({len(rows)} rows, {dropped} longer than max_length)")
    log.info("distilling %s on %d rows from %s (teacher %s, %s)", student_dir, len(examples), rows_path, store.teacher_id, loss)

    set_seed(seed)
    settings = LossSettings(alpha=alpha, loss=loss, beta=beta, temperature=temperature)
    tracker = LossTracker(settings)
    sampler = None
    if targets == "mixed":
        sampler = MixedBatchSampler([example.source for example in examples], batch_size, label_fraction, seed)
    elif group_by_length:
        sampler = LengthGroupedSampler(batch_size, lengths=[min(len(e.input_ids), max_length) for e in examples],
                                       generator=torch.Generator().manual_seed(seed))
    with tempfile.TemporaryDirectory(prefix="edgelm-distill-") as trainer_dir:
        args = TrainingArguments(
            output_dir=trainer_dir,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=grad_accum,
            num_train_epochs=epochs,
            max_steps=max_steps,
            learning_rate=learning_rate,
            seed=seed,
            data_seed=seed,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            remove_unused_columns=False,
            dataloader_num_workers=0,
            use_cpu=not (torch.cuda.is_available() or is_torch_npu_available()),
            **precision_args,
        )
        trainer = DistillTrainer(
            model=model,
            args=args,
            train_dataset=DistillDataset(examples, store, max_length),
            data_collator=DistillCollator(pad_token_id=tokenizer.pad_token_id),
            callbacks=[DistillProgressCallback(tracker, logging_steps)],
            settings=settings,
            tracker=tracker,
            vocab_size=vocab_size,
            sampler=sampler,
        )
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start

    # Each process tracked its own batches; sum them so every process returns the same totals.
    summed = {name: sum(sums[name] for sums in gather_objects(tracker.total)) for name in tracker.total}
    final, total = tracker.last_window, tracker.means(summed)
    if not math.isfinite(total["loss"]):
        raise ValueError(f"the distillation loss is {total['loss']}, so the trained weights are not saved to {out_dir}; "
                         f"lower learning_rate={learning_rate} or check temperature={temperature} and the logit store")
    if trainer.is_world_process_zero():
        save_model(trainer.accelerator.unwrap_model(trainer.model), tokenizer, out_dir)
    trainer.accelerator.wait_for_everyone()
    metrics = {
        "rows": len(examples),
        "dropped_rows": dropped,
        "steps": trainer.state.global_step,
        "train_loss": total["loss"],
        "train_ce": total["ce"],
        "train_divergence": total["divergence"],
        "final_loss": final.get("loss", float("nan")),
        "final_ce": final.get("ce", float("nan")),
        "final_divergence": final.get("divergence", float("nan")),
        "tokens": total["tokens"],
        "seconds": round(seconds, 3),
        "tokens_per_s": round(total["tokens"] / seconds, 1) if seconds > 0 else 0.0,
        "processes": trainer.accelerator.num_processes,
        "precision": precision,
    }
    log.info("distillation finished, model saved to %s: %s", out_dir, metrics)
    return metrics
