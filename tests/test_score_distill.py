"""Tests for teacher scoring and the offline distillation trainer, on tiny random models."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgelm.files import write_jsonl
from edgelm.train.distill import (
    TARGET_KEYS,
    DistillCollator,
    DistillDataset,
    distill,
    forward_distillation_loss,
    load_examples,
)
from edgelm.train.logit_store import LogitStore
from edgelm.train.losses import distillation_loss
from edgelm.train.models import load_model
from edgelm.train.score import row_key, row_sequence, score_rows, teacher_identity

from conftest import SMOLLM2_GGUF, requires_smollm2

QUESTIONS = [
    ("Tom has 3 apples and buys 4 more. How many apples does he have?", "3 + 4 = 7. The answer is 7."),
    ("A book costs $12. How much do 5 books cost?", "12 * 5 = 60. The answer is 60."),
    ("Sara ran 2 km on Monday and 5 km on Tuesday. How far did she run?", "2 + 5 = 7 km. The answer is 7."),
    ("There are 20 birds and 8 fly away. How many are left?", "20 - 8 = 12. The answer is 12."),
    ("What is 9 times 6?", "9 * 6 = 54. The answer is 54."),
]


def make_rows(tokenizer) -> list[dict]:
    """Return rollout-style rows: chat-template prompt, short answer ending in the end-of-turn token."""
    rows = []
    for index, (question, answer) in enumerate(QUESTIONS):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(
            {
                "id": f"gsm8k-train-{index:05d}",
                "sample": 0,
                "source": "label",
                "mode": "fast",
                "prompt_ids": prompt_ids,
                "response_ids": response_ids,
                "text": answer,
                "finished": True,
            }
        )
    return rows


@pytest.fixture(scope="module")
def student_and_teacher(tiny_model_dir, tiny_model_factory):
    teacher_dir = tiny_model_factory("llama", seed=1)
    student, tokenizer = load_model(str(tiny_model_dir))
    teacher, _ = load_model(str(teacher_dir))
    return student, teacher, tokenizer, teacher_dir


def test_rows_end_with_end_of_turn(student_and_teacher):
    _, _, tokenizer, _ = student_and_teacher
    for row in make_rows(tokenizer):
        assert row["response_ids"][-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert tokenizer.decode(row["prompt_ids"]).endswith("<|im_start|>assistant\n")


def test_score_rows_stores_teacher_topk(student_and_teacher, tmp_path):
    _, teacher, tokenizer, teacher_dir = student_and_teacher
    rows = make_rows(tokenizer)
    teacher_id = teacher_identity(str(teacher_dir), teacher)
    stats = score_rows(teacher, rows, tmp_path, top_k=8, batch_size=2, teacher_id=teacher_id, rows_per_shard=2)

    response_tokens = sum(len(row["response_ids"]) for row in rows)
    assert stats["scored_rows"] == len(rows)
    assert stats["skipped_rows"] == 0
    assert stats["tokens"] == response_tokens
    assert stats["bytes_per_token"] == 8 * 2 + 8 * 2 + 4
    assert stats["disk_bytes"] > 0
    assert stats["tokens_per_s"] > 0

    store = LogitStore(tmp_path)
    assert store.teacher_id == teacher_id
    # Compare each row, scored in a padded batch, with an unpadded forward pass of that row alone.
    for row in rows:
        input_ids, response_start = row_sequence(row)
        targets = store.get(row_key(row))
        with torch.no_grad():
            logits = teacher(torch.tensor([input_ids])).logits[0, response_start - 1 : -1]
        values, ids = logits.topk(8, dim=-1)
        np.testing.assert_array_equal(targets.topk_ids[:, 0], ids[:, 0].numpy())
        logsumexp = torch.logsumexp(logits, -1).numpy()
        np.testing.assert_allclose(targets.logsumexp, logsumexp, atol=1e-4)
        # The store keeps fp16 log-probabilities, so the error scales with |logit - logsumexp|.
        logprobs = values.numpy() - logsumexp[:, None]
        assert np.all(np.abs(targets.topk_logits - values.numpy()) <= np.abs(logprobs) * 2**-11 + 1e-4)


def test_score_rows_skips_stored_rows(student_and_teacher, tmp_path):
    _, teacher, tokenizer, _ = student_and_teacher
    rows = make_rows(tokenizer)
    score_rows(teacher, rows[:2], tmp_path, top_k=4, teacher_id="t")
    stats = score_rows(teacher, rows, tmp_path, top_k=4, teacher_id="t")
    assert stats["skipped_rows"] == 2
    assert stats["scored_rows"] == 3
    assert len(LogitStore(tmp_path)) == 5


def test_score_rows_rejects_changed_row(student_and_teacher, tmp_path):
    _, teacher, tokenizer, _ = student_and_teacher
    rows = make_rows(tokenizer)
    score_rows(teacher, rows[:1], tmp_path, top_k=4, teacher_id="t")
    changed = dict(rows[0], response_ids=rows[0]["response_ids"][1:])
    with pytest.raises(ValueError, match=row_key(rows[0])):
        score_rows(teacher, [changed], tmp_path, top_k=4, teacher_id="t")


def test_stored_loss_matches_live_teacher(student_and_teacher, tmp_path):
    """With k == V the loss from stored targets equals KL against the teacher's live logits."""
    student, teacher, tokenizer, _ = student_and_teacher
    rows = make_rows(tokenizer)[:3]
    vocab = teacher.config.vocab_size
    score_rows(teacher, rows, tmp_path, top_k=vocab, batch_size=3, teacher_id="t")
    store = LogitStore(tmp_path)
    examples, _ = load_examples(rows, store, max_length=512)
    batch = DistillCollator(tokenizer.pad_token_id)([DistillDataset(examples, store, 512)[i] for i in range(3)])

    with torch.no_grad():
        student_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["teacher_mask"]
    stored = distillation_loss(
        student_logits,
        batch["target_ids"],
        batch["teacher_ids"],
        batch["teacher_logits"],
        batch["teacher_logsumexp"],
        mask,
        alpha=0.0,
    )
    log_q = F.log_softmax(student_logits[mask].double(), -1)
    log_p = F.log_softmax(teacher_logits[mask].double(), -1)
    live = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).mean()
    assert mask.sum() == sum(len(row["response_ids"]) for row in rows)
    assert stored.kl.item() == pytest.approx(live.item(), rel=1e-3)
    assert stored.loss.item() == pytest.approx(live.item(), rel=1e-3)

    # The cross-entropy targets are the response tokens, at the positions that predict them.
    expected_ce = F.cross_entropy(student_logits[mask], batch["input_ids"][:, 1:][mask[:, :-1]])
    assert stored.ce.item() == pytest.approx(expected_ce.item(), rel=1e-5)


def test_sliced_logits_loss_matches_full(student_and_teacher, tmp_path):
    """Asking the student only for logits from the first response position changes no loss value."""
    student, teacher, tokenizer, _ = student_and_teacher
    rows = make_rows(tokenizer)
    score_rows(teacher, rows, tmp_path, top_k=8, teacher_id="t")
    store = LogitStore(tmp_path)
    examples, _ = load_examples(rows, store, max_length=512)
    batch = DistillCollator(tokenizer.pad_token_id)([DistillDataset(examples, store, 512)[i] for i in range(5)])
    targets = {name: batch[name] for name in TARGET_KEYS}

    with torch.no_grad():
        outputs, sliced = forward_distillation_loss(student, batch, targets, alpha=0.4, temperature=1.0)
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    full = distillation_loss(logits, *(targets[name] for name in TARGET_KEYS), alpha=0.4)
    first_response = min(row_sequence(row)[1] for row in rows) - 1
    assert outputs.logits.shape[1] == batch["input_ids"].shape[1] - first_response
    assert sliced.loss.item() == pytest.approx(full.loss.item(), rel=1e-5)
    assert sliced.ce.item() == pytest.approx(full.ce.item(), rel=1e-5)
    assert sliced.kl.item() == pytest.approx(full.kl.item(), rel=1e-5)


def test_collator_aligns_targets(student_and_teacher, tmp_path):
    _, teacher, tokenizer, _ = student_and_teacher
    rows = make_rows(tokenizer)[:2]
    score_rows(teacher, rows, tmp_path, top_k=4, teacher_id="t")
    store = LogitStore(tmp_path)
    examples, _ = load_examples(rows, store, max_length=512)
    dataset = DistillDataset(examples, store, max_length=512)
    batch = DistillCollator(pad_token_id=-7)([dataset[0], dataset[1]])

    for index, row in enumerate(rows):
        input_ids, response_start = row_sequence(row)
        length = len(input_ids)
        assert batch["input_ids"][index, :length].tolist() == input_ids
        assert batch["attention_mask"][index].sum() == length
        assert batch["target_ids"][index, response_start - 1 : length - 1].tolist() == row["response_ids"]
        assert torch.all(batch["target_ids"][index, : response_start - 1] == -100)
        assert torch.all(batch["target_ids"][index, length - 1 :] == -100)
        assert batch["teacher_mask"][index].sum() == len(row["response_ids"])
        np.testing.assert_array_equal(
            batch["teacher_ids"][index, response_start - 1 : length - 1].numpy(), store.get(row_key(row)).topk_ids
        )


def test_dataset_cuts_to_max_length(student_and_teacher, tmp_path):
    _, teacher, tokenizer, _ = student_and_teacher
    row = make_rows(tokenizer)[0]
    score_rows(teacher, [row], tmp_path, top_k=4, teacher_id="t")
    store = LogitStore(tmp_path)
    _, response_start = row_sequence(row)
    max_length = response_start + 3

    examples, dropped = load_examples([row], store, max_length)
    item = DistillDataset(examples, store, max_length)[0]
    assert dropped == 0
    assert len(item["input_ids"]) == max_length
    assert item["topk_ids"].shape == (3, 4)
    batch = DistillCollator(0)([item])
    assert batch["teacher_mask"].sum() == 3
    assert batch["target_ids"][0, max_length - 1] == -100

    examples, dropped = load_examples([row], store, max_length=response_start)
    assert examples == []
    assert dropped == 1


def test_distill_trains_and_saves(student_and_teacher, tiny_model_dir, tmp_path, caplog):
    _, teacher, tokenizer, _ = student_and_teacher
    rows = make_rows(tokenizer)
    rows_path = tmp_path / "rows.jsonl"
    write_jsonl(rows_path, rows)
    store_dir = tmp_path / "store"
    score_rows(teacher, rows, store_dir, top_k=16, teacher_id="t")

    out_dir = tmp_path / "student"
    with caplog.at_level(logging.INFO, logger="edgelm.train.distill"):
        metrics = distill(
            tiny_model_dir,
            rows_path,
            store_dir,
            out_dir,
            learning_rate=3e-3,
            epochs=4,
            batch_size=5,
            logging_steps=2,
        )

    assert metrics["steps"] == 4
    assert metrics["rows"] == 5
    assert metrics["tokens"] == 4 * sum(len(row["prompt_ids"]) + len(row["response_ids"]) for row in rows)
    assert np.isfinite(metrics["final_loss"])
    assert metrics["final_loss"] < metrics["train_loss"]
    messages = [record.getMessage() for record in caplog.records]
    progress = [message for message in messages if message.startswith("distill step")]
    assert [line.split(" | ")[0] for line in progress] == ["distill step 2/4", "distill step 4/4"]
    assert " (ce " in progress[0]
    assert progress[0].endswith(" tok/s")

    saved, saved_tokenizer = load_model(str(out_dir))
    assert saved_tokenizer.eos_token == "<|im_end|>"
    original, _ = load_model(str(tiny_model_dir))
    assert not torch.equal(saved.model.embed_tokens.weight, original.model.embed_tokens.weight)


def test_distill_rejects_changed_rows(student_and_teacher, tiny_model_dir, tmp_path):
    _, teacher, tokenizer, _ = student_and_teacher
    rows = make_rows(tokenizer)[:2]
    store_dir = tmp_path / "store"
    score_rows(teacher, rows, store_dir, top_k=4, teacher_id="t")
    changed = [rows[0], dict(rows[1], response_ids=rows[1]["response_ids"][:-1])]
    rows_path = tmp_path / "rows.jsonl"
    write_jsonl(rows_path, changed)
    with pytest.raises(ValueError, match="sha256"):
        distill(tiny_model_dir, rows_path, store_dir, tmp_path / "out")

    write_jsonl(rows_path, make_rows(tokenizer))
    with pytest.raises(ValueError, match="no teacher targets"):
        distill(tiny_model_dir, rows_path, store_dir, tmp_path / "out")


def test_distill_rejects_vocab_mismatch(tiny_model_dir, tmp_path):
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    manifest = {
        "format": "edgelm-logit-store",
        "version": 1,
        "top_k": 4,
        "vocab_size": 1000,
        "teacher_id": "t",
        "ids_dtype": "uint16",
        "values": "logprob-float16",
        "shards": [],
        "rows": {},
    }
    (store_dir / "manifest.json").write_text(json.dumps(manifest))
    rows_path = tmp_path / "rows.jsonl"
    write_jsonl(rows_path, [])
    with pytest.raises(ValueError, match="1000") as error:
        distill(tiny_model_dir, rows_path, store_dir, tmp_path / "out")
    assert "49152" in str(error.value)


@requires_smollm2
@pytest.mark.smollm2
@pytest.mark.slow
def test_real_teacher_against_itself(tmp_path):
    """SmolLM2's stored top-32 targets give near-zero KL against its own live logits."""
    teacher, tokenizer = load_model(SMOLLM2_GGUF)
    rows = make_rows(tokenizer)[:2]
    score_rows(teacher, rows, tmp_path, top_k=32, teacher_id=teacher_identity(SMOLLM2_GGUF, teacher))
    store = LogitStore(tmp_path)
    examples, _ = load_examples(rows, store, max_length=512)
    batch = DistillCollator(tokenizer.pad_token_id)([DistillDataset(examples, store, 512)[i] for i in range(2)])
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    parts = distillation_loss(
        logits,
        batch["target_ids"],
        batch["teacher_ids"],
        batch["teacher_logits"],
        batch["teacher_logsumexp"],
        batch["teacher_mask"],
        alpha=0.0,
    )
    assert store.bytes_per_token() == 132
    assert parts.kl.item() < 1e-3
    # A trained model predicts these short answers far better than uniform (log 49152 = 10.8).
    assert parts.ce.item() < 5.0
