"""Held-out loss and exact-match accuracy on GSM8K-style records, for PyTorch and ONNX models.

Loss: mean cross-entropy per assistant token (end-of-turn included) of the reference answer in
each mode, the same tokens SFT trains on. Accuracy: greedy answer in a mode, final number
extracted (`edgelm.train.chat.extract_answer`) and compared exactly with the reference answer.
The same prompt token ids go to every backend, so PyTorch and ONNX numbers are comparable.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from edgelm.train.chat import IGNORE_INDEX, answers_match, encode_example, extract_answer, prompt_ids
from edgelm.train.rollout import generate_batch

log = logging.getLogger(__name__)


class EvalBackend(Protocol):
    def sum_token_loss(self, input_ids: list[int], labels: list[int]) -> tuple[float, int]:
        """Return (summed cross-entropy over labelled positions, number of labelled positions)."""

    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Return greedy response ids per prompt, cut after end of turn."""


def _cross_entropy_sum(logits: np.ndarray | torch.Tensor, labels: list[int]) -> tuple[float, int]:
    # logits (seq, vocab): position t predicts token t + 1.
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float32)
    targets = torch.tensor(labels[1:])
    loss = torch.nn.functional.cross_entropy(logits[:-1], targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return float(loss), int((targets != IGNORE_INDEX).sum())


class TorchBackend:
    def __init__(self, model, tokenizer, batch_size: int = 16):
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size

    @torch.no_grad()
    def sum_token_loss(self, input_ids, labels):
        logits = self.model(input_ids=torch.tensor([input_ids])).logits[0]
        return _cross_entropy_sum(logits, labels)

    def greedy(self, prompts, max_new_tokens):
        outputs = []
        for offset in range(0, len(prompts), self.batch_size):
            batch = prompts[offset : offset + self.batch_size]
            outputs += [ids for ids, _ in generate_batch(self.model, self.tokenizer, batch, max_new_tokens=max_new_tokens, temperature=0.0)]
        return outputs


class OnnxBackend:
    """Evaluates an edgelm ONNX export through `edgelm.runtime` (no torch in the model path).

    Prompts go one at a time by default. Dynamic int8 quantizes activations with one scale per
    tensor, so in a padded batch a prompt's answer depends on its neighbours. On the default
    run, batching moved prefill logits by up to 3.3 and changed one answer.
    """

    def __init__(self, export_dir, batch_size: int = 1):
        from edgelm.runtime import Generator

        self.generator = Generator.from_pretrained(export_dir)
        self.batch_size = batch_size

    def sum_token_loss(self, input_ids, labels):
        return _cross_entropy_sum(self.generator.score(input_ids), labels)

    def greedy(self, prompts, max_new_tokens):
        outputs = []
        for offset in range(0, len(prompts), self.batch_size):
            batch = prompts[offset : offset + self.batch_size]
            outputs += self.generator.generate_ids(batch, max_new_tokens=max_new_tokens, temperature=0.0)
        return outputs


def evaluate(
    backend: EvalBackend,
    tokenizer,
    records: list[dict],
    *,
    loss_modes: tuple[str, ...] = ("reasoning", "fast"),
    accuracy_modes: tuple[str, ...] = ("fast",),
    max_new_tokens: dict[str, int] | None = None,
    max_length: int = 512,
    name: str = "model",
) -> dict:
    """Compute held-out loss per mode and greedy exact-match accuracy per mode on `records`."""
    max_new_tokens = {"fast": 24, "reasoning": 256, **(max_new_tokens or {})}
    eos_id = tokenizer.eos_token_id
    result: dict = {"name": name, "records": len(records), "loss": {}, "accuracy": {}, "examples": {}}
    start = time.perf_counter()

    result["loss_skipped_too_long"] = {}
    for mode in loss_modes:
        total, count, skipped = 0.0, 0, 0
        for record in tqdm(records, desc=f"eval loss {name} ({mode})", unit="rec", leave=False):
            example = encode_example(tokenizer, record, mode, max_length)
            if example is None:
                skipped += 1
                continue
            loss_sum, tokens = backend.sum_token_loss(example["input_ids"], example["labels"])
            total, count = total + loss_sum, count + tokens
        result["loss"][mode] = total / count if count else float("nan")
        result["loss_skipped_too_long"][mode] = skipped
        if skipped:
            log.warning("eval %s (%s): %d of %d records exceed max_length=%d and are left out of the loss",
                        name, mode, skipped, len(records), max_length)

    for mode in accuracy_modes:
        prompts = [prompt_ids(tokenizer, record, mode) for record in records]
        responses = backend.greedy(prompts, max_new_tokens[mode])
        correct, samples = 0, []
        for record, response in zip(records, responses):
            text = tokenizer.decode([t for t in response if t != eos_id], skip_special_tokens=True)
            predicted = extract_answer(text)
            is_correct = answers_match(predicted, record["answer"])
            correct += is_correct
            if len(samples) < 5:
                samples.append({"id": record["id"], "reference": record["answer"], "predicted": predicted, "text": text})
        result["accuracy"][mode] = correct / len(records)
        result["examples"][mode] = samples

    result["seconds"] = time.perf_counter() - start
    log.info(
        "eval %s: loss %s | accuracy %s | %.0f s", name,
        ", ".join(f"{m} {v:.3f}" for m, v in result["loss"].items()),
        ", ".join(f"{m} {100 * v:.1f}%" for m, v in result["accuracy"].items()),
        result["seconds"],
    )
    return result


