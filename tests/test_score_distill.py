"""Tests for rollouts, teacher scoring, pre-flight checks and the distillation trainer, on tiny random models."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import TrainerCallback, TrainingArguments

from edgelm.files import read_jsonl, write_jsonl
from edgelm.train.distill import (
    TARGET_KEYS,
    DistillCollator,
    DistillDataset,
    DistillTrainer,
    LossSettings,
    LossTracker,
    MixedBatchSampler,
    check_student,
    distill,
    forward_distillation_loss,
    load_examples,
)
from edgelm.train.logit_store import LogitStore
from edgelm.train.losses import LOSS_NAMES, distillation_loss, topk_divergence
from edgelm.train.models import load_model
from edgelm.train.preflight import check_same_tokenizer, shared_vocab_size, tokenizer_fingerprint
from edgelm.train.rollout import (
    InverseCDFSampler,
    chunk_dir,
    generate_batch,
    generate_vllm,
    label_rows,
    rollout,
    sampling_processors,
)
from edgelm.train.score import check_teacher_and_student, row_key, row_sequence, score_rows, teacher_identity

from conftest import SMOLLM2_GGUF, requires_smollm2

QUESTIONS = [
    ("Tom has 3 apples and buys 4 more. How many apples does he have?", "3 + 4 = 7. The answer is 7."),
    ("A book costs $12. How much do 5 books cost?", "12 * 5 = 60. The answer is 60."),
    ("Sara ran 2 km on Monday and 5 km on Tuesday. How far did she run?", "2 + 5 = 7 km. The answer is 7."),
    ("There are 20 birds and 8 fly away. How many are left?", "20 - 8 = 12. The answer is 12."),
    ("What is 9 times 6?", "9 * 6 = 54. The answer is 54."),
    ("A train travels 60 km per hour for 3 hours. How far does it go?", "60 * 3 = 180 km. The answer is 180."),
    ("Ann has 15 pens and gives away 6. How many are left?", "15 - 6 = 9. The answer is 9."),
    ("What is 100 divided by 4?", "100 / 4 = 25. The answer is 25."),
]
# Multiplies the tiny teacher's output head so its distributions are as peaked as a trained
# LM's: top-1 probability about 0.5 and top-32 mass about 0.98.
PEAKED_SCALE = 60.0


def make_rows(tokenizer, count: int = 5, source: str = "rollout") -> list[dict]:
    """Return rows of the rollout stage's shape: chat-template prompt, short answer ending in end of turn."""
    rows = []
    for index, (question, answer) in enumerate(QUESTIONS[:count]):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append({
            "id": f"gsm8k-train-{index:05d}", "sample": 0, "source": source, "mode": "fast",
            "prompt_ids": prompt_ids, "response_ids": response_ids, "text": answer, "finished": True,
        })
    return rows


@pytest.fixture(scope="module")
def student_and_teacher(tiny_model_dir, tiny_model_factory):
    teacher_dir = tiny_model_factory("llama", seed=1, tie_word_embeddings=False)
    student, tokenizer = load_model(str(tiny_model_dir))
    teacher, _ = load_model(str(teacher_dir))
    return student, teacher, tokenizer, teacher_dir


@pytest.fixture(scope="module")
def peaked_teacher(student_and_teacher):
    _, teacher, _, teacher_dir = student_and_teacher
    peaked, _ = load_model(str(teacher_dir))
    with torch.no_grad():
        peaked.lm_head.weight.mul_(PEAKED_SCALE)
    return peaked


def exact_targets(teacher_logits: torch.Tensor, k: int):
    """Return the top-k log-probabilities, ids and tail log-mass computed in fp32 from full logits."""
    logprobs = torch.log_softmax(teacher_logits.float(), -1)
    values, ids = logprobs.topk(k, dim=-1)
    tail = torch.logsumexp(logprobs.scatter(-1, ids, float("-inf")), dim=-1)
    return values, ids, tail


def batch_for(rows, store, tokenizer, max_length=512):
    examples, _ = load_examples(rows, store, max_length)
    dataset = DistillDataset(examples, store, max_length)
    return DistillCollator(tokenizer.pad_token_id)([dataset[i] for i in range(len(examples))])


# ---------------------------------------------------------------- rollout


def test_rollout_samples_chunks_and_resumes(tiny_model_dir, tmp_path, caplog):
    records = [{"id": f"r{i}", "prompt": f"What is {i} plus {i}?", "answer": str(2 * i), "reasoning": ""} for i in range(3)]
    out = tmp_path / "rollouts.jsonl"
    stats = rollout(str(tiny_model_dir), records, out, mode="fast", samples_per_prompt=2, max_new_tokens=4,
                    temperature=1.0, top_p=0.9, batch_size=4, chunk_rows=2)
    rows = read_jsonl(out)
    assert [(row["id"], row["sample"]) for row in rows] == [(f"r{i}", s) for i in range(3) for s in range(2)]
    assert stats["generated_rows"] == 6
    assert not chunk_dir(out).exists()
    checkpoint = rows[0]["checkpoint"]
    assert checkpoint.startswith(f"{tiny_model_dir}@")
    assert len(checkpoint.split("@")[1]) == 12
    assert rows[0]["sampling"] == {"engine": "hf", "temperature": 1.0, "top_p": 0.9, "max_new_tokens": 4, "seed": 0,
                                   "precision": "fp32"}
    assert all(1 <= len(row["response_ids"]) <= 4 for row in rows)

    # A re-run with one more record generates only its two samples.
    records.append({"id": "r3", "prompt": "What is 3 plus 3?", "answer": "6", "reasoning": ""})
    stats = rollout(str(tiny_model_dir), records, out, mode="fast", samples_per_prompt=2, max_new_tokens=4,
                    temperature=1.0, top_p=0.9, batch_size=4)
    assert stats["reused_rows"] == 6
    assert stats["generated_rows"] == 2
    assert read_jsonl(out)[:6] == rows

    # Other sampling settings never reuse the old rows.
    with caplog.at_level(logging.WARNING, logger="edgelm.train.rollout"):
        stats = rollout(str(tiny_model_dir), records[:1], out, mode="fast", max_new_tokens=4, temperature=0.0)
    assert stats["generated_rows"] == 1
    assert "sampling.temperature 1.0 in the rows, 0.0 now; sampling.top_p 0.9 in the rows, 1.0 now" in caplog.text
    assert caplog.text.count("ignoring") == 1

    # Nor does another precision.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edgelm.train.rollout"):
        stats = rollout(str(tiny_model_dir), records[:1], out, mode="fast", max_new_tokens=4, temperature=0.0,
                        precision="bf16")
    assert stats["generated_rows"] == 1
    assert "sampling.precision 'fp32' in the rows, 'bf16' now" in caplog.text
    assert read_jsonl(out)[0]["sampling"]["precision"] == "bf16"


def test_rollout_resumes_through_another_path_spelling(tiny_model_dir, tmp_path, monkeypatch, caplog):
    """The checkpoint compares by hash, as the logit store's teacher does."""
    records = [{"id": "r0", "prompt": "What is 1 plus 1?", "answer": "2", "reasoning": ""}]
    out = tmp_path / "rollouts.jsonl"
    rollout(str(tiny_model_dir), records, out, mode="fast", max_new_tokens=3, temperature=0.0)
    monkeypatch.chdir(tiny_model_dir.parent)
    with caplog.at_level(logging.WARNING, logger="edgelm.train.rollout"):
        stats = rollout(f"./{tiny_model_dir.name}/", records, out, mode="fast", max_new_tokens=3, temperature=0.0)
    assert stats["reused_rows"] == 1
    assert stats["generated_rows"] == 0
    assert "ignoring" not in caplog.text


@pytest.mark.parametrize("setting, message", [
    ({"temperature": -1.0}, "temperature=-1.0 must be 0"), ({"temperature": float("nan")}, "temperature=nan"),
    ({"top_p": 0.0}, "top_p=0.0 must be above 0"), ({"top_p": 1.5}, "top_p=1.5"), ({"top_p": float("nan")}, "top_p=nan"),
])
def test_rollout_rejects_bad_sampling_settings(tiny_model_dir, tmp_path, setting, message):
    with pytest.raises(ValueError, match=message):
        rollout(str(tiny_model_dir), [], tmp_path / "rows.jsonl", mode="fast", **setting)


def test_rollout_rejects_unknown_precision(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="precision='int8'"):
        rollout(str(tiny_model_dir), [], tmp_path / "rows.jsonl", mode="fast", precision="int8")


def test_rollout_reads_complete_chunks_after_kill(tiny_model_dir, tmp_path):
    """Chunk files of a killed run are reused; a temporary file of an unfinished chunk is not read."""
    records = [{"id": f"r{i}", "prompt": f"What is {i} plus 1?", "answer": str(i + 1), "reasoning": ""} for i in range(2)]
    out = tmp_path / "rollouts.jsonl"
    rollout(str(tiny_model_dir), records[:1], out, mode="fast", max_new_tokens=3, temperature=0.0)
    finished = read_jsonl(out)
    out.unlink()
    write_jsonl(chunk_dir(out) / "000-00000.jsonl", finished)
    (chunk_dir(out) / ".000-00001.jsonl.x1.tmp").write_text('{"id": "r1", "sample": 0, "half a li')
    stats = rollout(str(tiny_model_dir), records, out, mode="fast", max_new_tokens=3, temperature=0.0)
    assert stats["reused_rows"] == 1
    assert stats["generated_rows"] == 1
    assert [row["id"] for row in read_jsonl(out)] == ["r0", "r1"]


def test_vllm_engine_missing_is_clear_error(tiny_model_dir):
    pytest.importorskip("pytest")
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="rollout.engine: hf"):
            generate_vllm(str(tiny_model_dir), [[1, 2]], eos_id=2, max_new_tokens=2, temperature=0.0, top_p=1.0, seeds=[0])
    else:
        pytest.skip("vllm is installed, so the missing-package error cannot be tested")


def test_inverse_cdf_sampler_draws_from_softmax():
    """The draws follow softmax(scores): frequencies match, and a token at -inf is never drawn."""
    scores = torch.tensor([[2.0, 1.0, 0.0, float("-inf"), -1.0]]).repeat(20_000, 1)
    chosen = InverseCDFSampler(seeds=range(20_000))(torch.zeros((20_000, 1), dtype=torch.long), scores)
    tokens = chosen.argmax(-1)
    assert torch.isinf(chosen).sum(-1).eq(4).all()
    assert chosen.amax(-1).eq(0).all()
    frequencies = torch.bincount(tokens, minlength=5).double() / len(tokens)
    expected = torch.softmax(scores[0].double(), -1)
    assert frequencies[3] == 0
    # Five standard errors of a proportion of 20,000 draws are below 0.02.
    torch.testing.assert_close(frequencies, expected, atol=0.02, rtol=0)


def test_inverse_cdf_sampler_row_seeds():
    """A row's draws depend on its own seed only, not on the rows beside it."""
    scores = torch.randn(4, 50).repeat(2, 1)

    def draws(seeds, rows=slice(None)):
        sampler = InverseCDFSampler(seeds)
        return torch.stack([sampler(None, scores[rows]).argmax(-1) for _ in range(6)], dim=1)

    together = draws([10, 11, 12, 13, 20, 21, 22, 23])
    assert torch.equal(together[:4], draws([10, 11, 12, 13], slice(0, 4)))
    assert torch.equal(together[2], draws([12], slice(2, 3))[0])
    assert not torch.equal(together[:4], together[4:])
    with pytest.raises(ValueError, match="2 seeds but received scores for 8 rows"):
        InverseCDFSampler([1, 2])(None, scores)


def test_sampling_processors_order_and_greedy():
    assert len(sampling_processors(0.0, 0.9, seeds=[0])) == 0
    names = [type(processor).__name__ for processor in sampling_processors(0.7, 0.9, seeds=[0])]
    assert names == ["TemperatureLogitsWarper", "TopPLogitsWarper", "InverseCDFSampler"]
    assert "TopPLogitsWarper" not in [type(p).__name__ for p in sampling_processors(0.7, 1.0, seeds=[0])]


def test_generate_batch_samples_at_temperature(tiny_model_dir):
    """Sampling gives other tokens than greedy decoding, the same tokens for the same seed."""
    model, tokenizer = load_model(str(tiny_model_dir))
    prompts = [[5, 6, 7], [8, 9]]
    settings = {"max_new_tokens": 12, "temperature": 1.5, "top_p": 1.0}
    greedy = generate_batch(model, tokenizer, prompts, max_new_tokens=12, temperature=0.0)
    sampled = generate_batch(model, tokenizer, prompts, seeds=[4, 5], **settings)
    assert sampled == generate_batch(model, tokenizer, prompts, seeds=[4, 5], **settings)
    assert sampled != greedy
    assert sampled != generate_batch(model, tokenizer, prompts, seeds=[6, 7], **settings)
    assert generate_batch(model, tokenizer, prompts[:1], seeds=[4], **settings) == sampled[:1]


def test_resumed_rollout_draws_the_samples_of_one_run(tiny_model_dir, tmp_path):
    """Each (id, sample) has its own seed, so rows generated across a resume equal one uninterrupted run."""
    records = [{"id": f"r{i}", "prompt": f"What is {i} plus {i}?", "answer": str(2 * i), "reasoning": ""} for i in range(4)]
    settings = {"mode": "fast", "samples_per_prompt": 2, "max_new_tokens": 6, "temperature": 1.5, "batch_size": 8}
    rollout(str(tiny_model_dir), records, tmp_path / "whole.jsonl", **settings)
    rollout(str(tiny_model_dir), records[1:3], tmp_path / "resumed.jsonl", **settings)
    rollout(str(tiny_model_dir), records, tmp_path / "resumed.jsonl", **settings)
    whole, resumed = read_jsonl(tmp_path / "whole.jsonl"), read_jsonl(tmp_path / "resumed.jsonl")
    assert [row["response_ids"] for row in resumed] == [row["response_ids"] for row in whole]
    # The two samples of one prompt differ.
    assert whole[0]["response_ids"] != whole[1]["response_ids"]


def test_label_rows_have_own_keys(student_and_teacher):
    _, _, tokenizer, _ = student_and_teacher
    records = [{"id": "r0", "prompt": "What is 2 plus 2?", "answer": "4", "reasoning": ""}]
    (row,) = label_rows(tokenizer, records, "fast")
    assert row_key(row) == "r0/label"
    assert row["response_ids"][-1] == tokenizer.eos_token_id
    assert row_key({**row, "source": "rollout"}) == "r0/0"


@pytest.mark.parametrize("targets, sources", [
    ("on_policy", ["rollout", "rollout"]), ("label", ["label", "label"]), ("mixed", ["rollout", "rollout", "label", "label"]),
])
def test_rollout_command_writes_rows_for_each_target(tiny_model_dir, tmp_path, targets, sources):
    """`edgelm rollout --targets` writes the rows `edgelm distill --targets` trains on."""
    from edgelm.cli import main

    records = [{"id": f"r{i}", "prompt": f"What is {i} plus 2?", "answer": str(i + 2), "reasoning": ""} for i in range(2)]
    write_jsonl(tmp_path / "records.jsonl", records)
    out = tmp_path / "rows.jsonl"
    assert main(["rollout", "--model", str(tiny_model_dir), "--data", str(tmp_path / "records.jsonl"), "--out", str(out),
                 "--targets", targets, "--max-new-tokens", "3"]) == 0
    assert [row.get("source") for row in read_jsonl(out)] == sources


# ---------------------------------------------------------------- scoring


def test_score_rows_stores_teacher_topk(student_and_teacher, tmp_path):
    _, teacher, tokenizer, teacher_dir = student_and_teacher
    rows = make_rows(tokenizer)
    teacher_id = teacher_identity(str(teacher_dir), teacher)
    stats = score_rows(teacher, rows, tmp_path, top_k=8, batch_size=2, teacher_id=teacher_id, rows_per_shard=2,
                       tokenizer=tokenizer)

    response_tokens = sum(len(row["response_ids"]) for row in rows)
    assert stats["scored_rows"] == len(rows)
    assert stats["skipped_rows"] == 0
    assert stats["tokens"] == response_tokens
    assert stats["bytes_per_token"] == 31 + 4
    assert stats["padding_fraction"] <= stats["padding_fraction_unsorted"]
    assert stats["processes"] == 1

    store = LogitStore(tmp_path)
    assert store.teacher_id == teacher_id
    assert store.tokenizer == tokenizer_fingerprint(tokenizer)
    # Compare each row, scored in a padded batch, with an unpadded forward pass of that row alone.
    for row in rows:
        input_ids, response_start = row_sequence(row)
        targets = store.get(row_key(row))
        with torch.no_grad():
            logits = teacher(torch.tensor([input_ids])).logits[0, response_start - 1 : -1]
        logprobs = torch.log_softmax(logits, -1)
        values, ids = logprobs.topk(8, dim=-1)
        np.testing.assert_array_equal(targets.topk_ids[:, 0], ids[:, 0].numpy())
        np.testing.assert_allclose(targets.logsumexp, torch.logsumexp(logits, -1).numpy(), atol=1e-4)
        assert np.all(np.abs(targets.topk_logprobs - values.numpy()) <= np.abs(values.numpy()) * 2**-11 + 1e-4)
        tail = torch.logsumexp(logprobs.scatter(-1, ids, float("-inf")), -1).numpy()
        assert np.all(np.abs(targets.tail_logprob - tail) <= np.abs(tail) * 2**-11 + 1e-5)


def test_teacher_identity_ignores_path_spelling(student_and_teacher, monkeypatch):
    _, teacher, _, teacher_dir = student_and_teacher
    monkeypatch.chdir(teacher_dir.parent)
    relative, _ = load_model(teacher_dir.name)
    absolute_id = teacher_identity(str(teacher_dir), teacher)
    relative_id = teacher_identity(teacher_dir.name, relative)
    assert absolute_id.split("@")[1] == relative_id.split("@")[1]


def test_score_rows_in_bf16(student_and_teacher, tmp_path):
    _, teacher, tokenizer, teacher_dir = student_and_teacher
    rows = make_rows(tokenizer)
    bf16_teacher, _ = load_model(str(teacher_dir), dtype=torch.bfloat16)
    bf16_id = teacher_identity(str(teacher_dir), bf16_teacher)
    # The precision is part of the teacher identity, so one store never mixes the two.
    assert bf16_id != teacher_identity(str(teacher_dir), teacher)
    score_rows(bf16_teacher, rows, tmp_path / "bf16", top_k=8, teacher_id=bf16_id)
    score_rows(teacher, rows, tmp_path / "fp32", top_k=8, teacher_id="fp32")

    bf16_store, fp32_store = LogitStore(tmp_path / "bf16"), LogitStore(tmp_path / "fp32")
    for row in rows:
        low, full = bf16_store.get(row_key(row)), fp32_store.get(row_key(row))
        np.testing.assert_allclose(low.logsumexp, full.logsumexp, atol=0.05)
        # A tiny random model's distribution is nearly flat, so only the top value is compared.
        np.testing.assert_allclose(low.topk_logprobs[:, 0], full.topk_logprobs[:, 0], atol=0.05)
    assert json.loads((tmp_path / "bf16" / "manifest.json").read_text())["teacher_dtype"] == "bfloat16"
    with pytest.raises(ValueError, match=r"scored with the teacher in bf16 \(bfloat16\) and this run scores in fp32.*--precision bf16"):
        score_rows(teacher, rows, tmp_path / "bf16", top_k=8, teacher_id="fp32")
    # With top_k changed too, scoring in bf16 again would not resume the store, so no advice.
    with pytest.raises(ValueError) as error:
        score_rows(teacher, rows, tmp_path / "bf16", top_k=4, teacher_id="fp32")
    assert "--precision" not in str(error.value)


def test_padding_fraction_drops_when_sorted(student_and_teacher, tmp_path):
    _, teacher, tokenizer, _ = student_and_teacher
    rows = make_rows(tokenizer, 8)
    # Alternate long and short rows, the worst order for batches of 2.
    rows = [{**row, "prompt_ids": row["prompt_ids"] * (1 + index % 2)} for index, row in enumerate(rows)]
    stats = score_rows(teacher, rows, tmp_path, top_k=4, batch_size=2, teacher_id="t")
    assert stats["padding_fraction_unsorted"] > 0.2
    assert stats["padding_fraction"] < stats["padding_fraction_unsorted"] / 2


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


def test_score_rows_checks_max_positions(student_and_teacher, tmp_path):
    _, teacher, tokenizer, _ = student_and_teacher
    row = make_rows(tokenizer, 1)[0]
    long_row = {**row, "prompt_ids": row["prompt_ids"] * 40}
    with pytest.raises(ValueError, match="max_position_embeddings=512"):
        score_rows(teacher, [long_row], tmp_path, top_k=4, teacher_id="t")


def test_score_cuts_padded_vocab(student_and_teacher, tmp_path):
    """A teacher whose embedding has padding rows is cut to the shared width before top-k."""
    _, teacher, tokenizer, _ = student_and_teacher
    rows = make_rows(tokenizer, 2)
    score_rows(teacher, rows, tmp_path, top_k=4, teacher_id="t", vocab_size=49000)
    store = LogitStore(tmp_path)
    assert store.vocab_size == 49000
    targets = store.get(row_key(rows[0]))
    assert targets.topk_ids.max() < 49000
    # The log-probabilities are renormalised over the shared ids.
    assert np.all(targets.topk_logprobs <= 0)


# ---------------------------------------------------------------- pre-flight


def test_preflight_tokenizers(student_and_teacher, tiny_model_dir):
    student, teacher, tokenizer, _ = student_and_teacher
    fingerprint = tokenizer_fingerprint(tokenizer)
    check_same_tokenizer(fingerprint, tokenizer_fingerprint(tokenizer))
    assert fingerprint["end_of_turn"] == "<|im_end|>"
    with pytest.raises(ValueError, match="end_of_turn"):
        check_same_tokenizer(fingerprint, {**fingerprint, "end_of_turn": "</s>"})
    with pytest.raises(ValueError, match="sample texts"):
        check_same_tokenizer(fingerprint, {**fingerprint, "sample_ids_sha256": "0" * 64})
    assert check_teacher_and_student(teacher, tokenizer, tokenizer, str(tiny_model_dir)) == 49152


def test_preflight_vocab_sizes():
    assert shared_vocab_size(49152, 49152, 49152) == 49152
    assert shared_vocab_size(49280, 49152, 49152) == 49152
    with pytest.raises(ValueError, match="49152 entries and the student's 32000"):
        shared_vocab_size(49152, 32000, 49152)


def test_check_student_cuts_padded_student(student_and_teacher, tiny_model_dir, tmp_path):
    _, teacher, tokenizer, _ = student_and_teacher
    rows = make_rows(tokenizer, 2)
    score_rows(teacher, rows, tmp_path / "store", top_k=4, teacher_id="t", tokenizer=tokenizer)
    store = LogitStore(tmp_path / "store")
    padded, _ = load_model(str(tiny_model_dir))
    # 64 padding rows beyond the tokenizer's last id, as some models ship.
    padded.resize_token_embeddings(49216)
    assert check_student(padded, tokenizer, store, max_length=256) == 49152
    with pytest.raises(ValueError, match="max_position_embeddings=512"):
        check_student(padded, tokenizer, store, max_length=1024)

    batch = batch_for(rows, store, tokenizer)
    targets = {name: batch[name] for name in TARGET_KEYS}
    with torch.no_grad():
        _, parts = forward_distillation_loss(padded, batch, targets, LossSettings(), vocab_size=49152)
    assert torch.isfinite(parts.loss)


def test_distill_rejects_other_tokenizer(student_and_teacher, tiny_model_dir, tmp_path):
    _, teacher, tokenizer, _ = student_and_teacher
    rows = make_rows(tokenizer, 1)
    write_jsonl(tmp_path / "rows.jsonl", rows)
    score_rows(teacher, rows, tmp_path / "store", top_k=4, teacher_id="t", tokenizer=tokenizer)
    manifest_path = tmp_path / "store" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["tokenizer"]["end_of_turn"] = "<|endoftext|>"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="end_of_turn"):
        distill(tiny_model_dir, tmp_path / "rows.jsonl", tmp_path / "store", tmp_path / "out")


# ---------------------------------------------------------------- losses from the store


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_stored_loss_within_1e3_of_exact(student_and_teacher, peaked_teacher, tmp_path, loss):
    """The compact store changes the top-32 loss by less than 1e-3 relative, on peaked teacher logits."""
    student, _, tokenizer, _ = student_and_teacher
    rows = make_rows(tokenizer)
    score_rows(peaked_teacher, rows, tmp_path, top_k=32, teacher_id="peaked")
    store = LogitStore(tmp_path)
    batch = batch_for(rows, store, tokenizer)
    mask = batch["teacher_mask"]
    with torch.no_grad():
        student_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        teacher_logits = peaked_teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    exact_logprobs, exact_ids, exact_tail = exact_targets(teacher_logits, 32)
    assert torch.equal(batch["teacher_ids"][mask][:, 0], exact_ids[mask][:, 0])

    for beta in (0.1, 0.5, 0.9) if loss == "jsd" else (0.5,):
        stored = topk_divergence(student_logits, batch["teacher_ids"], batch["teacher_logprobs"], mask, loss, beta,
                                 teacher_tail_logprob=batch["teacher_tail_logprob"]).mean()
        exact = topk_divergence(student_logits, exact_ids, exact_logprobs, mask, loss, beta,
                                teacher_tail_logprob=exact_tail).mean()
        relative = abs(stored.item() - exact.item()) / exact.item()
        print(f"{loss} beta={beta}: stored {stored.item():.6f} exact {exact.item():.6f} relative error {relative:.2e}")
        assert relative < 1e-3


def test_stored_full_vocab_loss_matches_live_teacher(student_and_teacher, peaked_teacher, tmp_path):
    """With k == V the loss from the store equals the full-vocabulary KL to the live teacher."""
    student, _, tokenizer, _ = student_and_teacher
    rows = make_rows(tokenizer, 2)
    vocab = peaked_teacher.config.vocab_size
    score_rows(peaked_teacher, rows, tmp_path, top_k=vocab, batch_size=2, teacher_id="t")
    batch = batch_for(rows, LogitStore(tmp_path), tokenizer)
    mask = batch["teacher_mask"]
    with torch.no_grad():
        student_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        teacher_logits = peaked_teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    stored = distillation_loss(
        student_logits, batch["shift_labels"], batch["teacher_ids"], batch["teacher_logprobs"], mask, alpha=0.0,
        teacher_tail_logprob=batch["teacher_tail_logprob"],
    )
    log_q = F.log_softmax(student_logits[mask].double(), -1)
    log_p = F.log_softmax(teacher_logits[mask].double(), -1)
    live = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).mean()
    assert mask.sum() == sum(len(row["response_ids"]) for row in rows)
    assert stored.divergence.item() == pytest.approx(live.item(), rel=1e-3)

    # The cross-entropy targets are the response tokens, at the positions that predict them.
    expected_ce = F.cross_entropy(student_logits[mask], batch["input_ids"][:, 1:][mask[:, :-1]])
    assert stored.ce.item() == pytest.approx(expected_ce.item(), rel=1e-5)


def test_head_on_target_positions_matches_full_logits(student_and_teacher, tmp_path):
    """Running the LM head on the target positions only changes no loss value and no gradient."""
    student, teacher, tokenizer, _ = student_and_teacher
    rows = make_rows(tokenizer)
    score_rows(teacher, rows, tmp_path, top_k=8, teacher_id="t")
    batch = batch_for(rows, LogitStore(tmp_path), tokenizer)
    targets = {name: batch[name] for name in TARGET_KEYS}
    settings = LossSettings(alpha=0.4, loss="jsd", beta=0.3)

    outputs, selected = forward_distillation_loss(student, batch, targets, settings)
    selected.loss.backward()
    selected_grads = [param.grad.clone() for param in student.parameters()]
    student.zero_grad()
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    full = distillation_loss(
        logits, batch["shift_labels"], batch["teacher_ids"], batch["teacher_logprobs"], batch["teacher_mask"],
        alpha=0.4, loss="jsd", beta=0.3, teacher_tail_logprob=batch["teacher_tail_logprob"],
    )
    full.loss.backward()
    full_grads = [param.grad.clone() for param in student.parameters()]
    student.zero_grad()

    targets_count = int(batch["teacher_mask"].sum())
    assert outputs.logits.shape == (1, targets_count, student.config.vocab_size)
    assert selected.tokens == full.tokens == targets_count
    assert selected.loss.item() == pytest.approx(full.loss.item(), rel=1e-5)
    assert selected.ce.item() == pytest.approx(full.ce.item(), rel=1e-5)
    assert selected.divergence.item() == pytest.approx(full.divergence.item(), rel=1e-5)
    for ours, reference in zip(selected_grads, full_grads):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-6)
    # The hook is removed after the forward pass.
    assert student(input_ids=batch["input_ids"]).logits.shape[:2] == batch["input_ids"].shape


def test_head_selection_skips_a_model_without_output_embeddings(student_and_teacher, tmp_path, monkeypatch):
    """A model whose head cannot be found gets the full logits, and the loss selects the positions."""
    student, teacher, tokenizer, _ = student_and_teacher
    rows = make_rows(tokenizer)
    score_rows(teacher, rows, tmp_path, top_k=8, teacher_id="t")
    batch = batch_for(rows, LogitStore(tmp_path), tokenizer)
    targets = {name: batch[name] for name in TARGET_KEYS}
    settings = LossSettings(alpha=0.4, loss="forward_kl")

    with torch.no_grad():
        _, selected = forward_distillation_loss(student, batch, targets, settings)
        monkeypatch.setattr(student, "get_output_embeddings", lambda: None)
        outputs, sliced = forward_distillation_loss(student, batch, targets, settings)
    first_response = min(row_sequence(row)[1] for row in rows) - 1
    assert outputs.logits.shape[:2] == (len(rows), batch["input_ids"].shape[1] - first_response)
    assert sliced.loss.item() == pytest.approx(selected.loss.item(), rel=1e-5)


def test_collator_aligns_targets(student_and_teacher, tmp_path):
    _, teacher, tokenizer, _ = student_and_teacher
    rows = make_rows(tokenizer, 2)
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
        assert batch["shift_labels"][index, response_start - 1 : length - 1].tolist() == row["response_ids"]
        assert batch["labels"][index, response_start:length].tolist() == row["response_ids"]
        assert torch.all(batch["shift_labels"][index, : response_start - 1] == -100)
        assert torch.all(batch["shift_labels"][index, length - 1 :] == -100)
        assert batch["teacher_mask"][index].sum() == len(row["response_ids"])
        np.testing.assert_array_equal(
            batch["teacher_ids"][index, response_start - 1 : length - 1].numpy(), store.get(row_key(row)).topk_ids
        )


def test_dataset_cuts_to_max_length(student_and_teacher, tmp_path):
    _, teacher, tokenizer, _ = student_and_teacher
    row = make_rows(tokenizer, 1)[0]
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
    assert batch["shift_labels"][0, max_length - 1] == -100

    examples, dropped = load_examples([row], store, max_length=response_start)
    assert examples == []
    assert dropped == 1


# ---------------------------------------------------------------- training


class GradientRecorder(TrainerCallback):
    """Copy every parameter's accumulated gradient just before the optimizer step."""

    def __init__(self):
        self.gradients = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.gradients = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def one_step(student_dir, store, rows, tokenizer, batch_size, grad_accum, tmp_path):
    model, _ = load_model(str(student_dir))
    examples, _ = load_examples(rows, store, 512)
    settings = LossSettings(alpha=0.3, loss="reverse_kl")
    tracker = LossTracker(settings)
    recorder = GradientRecorder()
    args = TrainingArguments(
        output_dir=str(tmp_path / f"trainer-{batch_size}x{grad_accum}"), per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum, max_steps=1, learning_rate=1e-3, max_grad_norm=0.0,
        report_to=[], save_strategy="no", logging_strategy="no", remove_unused_columns=False, use_cpu=True, seed=0,
    )
    trainer = DistillTrainer(
        model=model, args=args, train_dataset=DistillDataset(examples, store, 512),
        data_collator=DistillCollator(tokenizer.pad_token_id), callbacks=[recorder], settings=settings, tracker=tracker,
    )
    trainer.train()
    return recorder.gradients, tracker.means(tracker.total)


def test_grad_accumulation_1x8_equals_8x1(student_and_teacher, tiny_model_dir, tmp_path):
    """Micro-batches of different token counts are weighted by tokens, so 1x8 and 8x1 give one gradient."""
    _, teacher, tokenizer, _ = student_and_teacher
    rows = make_rows(tokenizer, 8)
    assert len({len(row["response_ids"]) for row in rows}) > 1
    score_rows(teacher, rows, tmp_path / "store", top_k=8, teacher_id="t")
    store = LogitStore(tmp_path / "store")

    one_batch, one_loss = one_step(tiny_model_dir, store, rows, tokenizer, 8, 1, tmp_path)
    accumulated, accumulated_loss = one_step(tiny_model_dir, store, rows, tokenizer, 1, 8, tmp_path)
    assert one_loss["loss"] == pytest.approx(accumulated_loss["loss"], rel=1e-5)
    assert one_batch.keys() == accumulated.keys()
    for name, gradient in one_batch.items():
        torch.testing.assert_close(accumulated[name], gradient, rtol=1e-4, atol=1e-7, msg=name)


def test_mixed_sampler_label_share():
    sources = ["rollout"] * 10 + ["label"] * 3
    sampler = MixedBatchSampler(sources, batch_size=4, label_fraction=0.25, seed=0)
    order = list(sampler)
    assert len(order) == len(sampler)
    batches = [order[i : i + 4] for i in range(0, len(order), 4)]
    assert sorted(index for index in order if sources[index] == "rollout") == list(range(10))
    assert all(sum(sources[index] == "label" for index in batch) == 1 for batch in batches[:-1])
    sampler.set_epoch(1)
    assert list(sampler) != order
    with pytest.raises(ValueError, match="label rows"):
        MixedBatchSampler(["rollout"] * 3, batch_size=2, label_fraction=0.5, seed=0)


def test_distill_trains_and_saves(student_and_teacher, tiny_model_dir, tmp_path, caplog):
    _, teacher, tokenizer, _ = student_and_teacher
    rows = make_rows(tokenizer)
    rows_path = tmp_path / "rows.jsonl"
    write_jsonl(rows_path, rows)
    store_dir = tmp_path / "store"
    score_rows(teacher, rows, store_dir, top_k=16, teacher_id="t", tokenizer=tokenizer)

    out_dir = tmp_path / "student"
    with caplog.at_level(logging.INFO, logger="edgelm.train.distill"):
        metrics = distill(tiny_model_dir, rows_path, store_dir, out_dir, learning_rate=3e-3, epochs=4,
                          batch_size=5, logging_steps=2, loss="jsd", beta=0.5)

    assert metrics["steps"] == 4
    assert metrics["rows"] == 5
    assert metrics["tokens"] == 4 * sum(len(row["prompt_ids"]) + len(row["response_ids"]) for row in rows)
    assert np.isfinite(metrics["final_loss"])
    assert metrics["final_loss"] < metrics["train_loss"]
    progress = [record.getMessage() for record in caplog.records if record.getMessage().startswith("distill step")]
    assert [line.split(" | ")[0] for line in progress] == ["distill step 2/4", "distill step 4/4"]
    assert " (ce " in progress[0]
    assert " jsd " in progress[0]
    assert progress[0].endswith(" tok/s")

    saved, saved_tokenizer = load_model(str(out_dir))
    assert saved_tokenizer.eos_token == "<|im_end|>"
    original, _ = load_model(str(tiny_model_dir))
    assert not torch.equal(saved.model.embed_tokens.weight, original.model.embed_tokens.weight)


def test_distill_mixed_and_bf16(student_and_teacher, tiny_model_dir, tmp_path):
    _, teacher, tokenizer, _ = student_and_teacher
    rows = make_rows(tokenizer, 4) + make_rows(tokenizer, 2, source="label")
    rows_path = tmp_path / "rows.jsonl"
    write_jsonl(rows_path, rows)
    score_rows(teacher, rows, tmp_path / "store", top_k=8, teacher_id="t", tokenizer=tokenizer)
    assert len(LogitStore(tmp_path / "store")) == 6

    metrics = distill(tiny_model_dir, rows_path, tmp_path / "store", tmp_path / "out", targets="mixed",
                      label_fraction=0.5, batch_size=2, precision="bf16", loss="tv")
    assert metrics["rows"] == 6
    # Each batch of 2 is one rollout and one label row, so the 4 rollouts make 4 steps.
    assert metrics["steps"] == 4
    assert np.isfinite(metrics["train_loss"])
    label_only = distill(tiny_model_dir, rows_path, tmp_path / "store", tmp_path / "out", targets="label", batch_size=2)
    assert label_only["rows"] == 2
    with pytest.raises(ValueError, match="fp16"):
        if not torch.cuda.is_available():
            distill(tiny_model_dir, rows_path, tmp_path / "store", tmp_path / "out", precision="fp16")
        else:
            raise ValueError("fp16 is available on CUDA; nothing to reject")


@pytest.mark.parametrize("setting, message", [
    ({"learning_rate": -1.0}, "learning_rate=-1.0 must be positive"), ({"epochs": 0}, "epochs=0 must be positive"),
    ({"temperature": float("nan")}, "temperature=nan must be a positive finite"),
    ({"temperature": float("inf")}, "temperature=inf must be a positive finite"),
])
def test_distill_rejects_bad_settings_before_loading(tmp_path, setting, message):
    with pytest.raises(ValueError, match=message):
        distill(tmp_path / "student", tmp_path / "rows.jsonl", tmp_path / "store", tmp_path / "out", **setting)


def test_distill_rejects_changed_rows(student_and_teacher, tiny_model_dir, tmp_path):
    _, teacher, tokenizer, _ = student_and_teacher
    rows = make_rows(tokenizer, 2)
    store_dir = tmp_path / "store"
    score_rows(teacher, rows, store_dir, top_k=4, teacher_id="t")
    changed = [rows[0], dict(rows[1], response_ids=rows[1]["response_ids"][:-1])]
    rows_path = tmp_path / "rows.jsonl"
    write_jsonl(rows_path, changed)
    with pytest.raises(ValueError, match=f"row {row_key(rows[1])}: input_ids sha256"):
        distill(tiny_model_dir, rows_path, store_dir, tmp_path / "out")

    write_jsonl(rows_path, make_rows(tokenizer))
    with pytest.raises(ValueError, match="no teacher targets"):
        distill(tiny_model_dir, rows_path, store_dir, tmp_path / "out")


def test_distill_rejects_vocab_mismatch(student_and_teacher, tiny_model_dir, tmp_path):
    _, teacher, tokenizer, _ = student_and_teacher
    rows = make_rows(tokenizer, 1)
    write_jsonl(tmp_path / "rows.jsonl", rows)
    score_rows(teacher, rows, tmp_path / "store", top_k=4, teacher_id="t", vocab_size=1000)
    with pytest.raises(ValueError, match="1000") as error:
        distill(tiny_model_dir, tmp_path / "rows.jsonl", tmp_path / "store", tmp_path / "out")
    assert "49152" in str(error.value)


@requires_smollm2
@pytest.mark.smollm2
@pytest.mark.slow
def test_real_teacher_store_error(tmp_path):
    """SmolLM2's stored top-32 targets change the loss by under 1e-3 relative and give near-zero self-KL."""
    teacher, tokenizer = load_model(SMOLLM2_GGUF)
    rows = make_rows(tokenizer, 3)
    stats = score_rows(teacher, rows, tmp_path, top_k=32, teacher_id=teacher_identity(SMOLLM2_GGUF, teacher),
                       tokenizer=tokenizer)
    assert stats["bytes_per_token"] == 128
    batch = batch_for(rows, LogitStore(tmp_path), tokenizer)
    mask = batch["teacher_mask"]
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    exact_logprobs, exact_ids, exact_tail = exact_targets(logits, 32)
    stored_tail = batch["teacher_tail_logprob"]
    # A student that is the teacher with noise on its logits.
    student_logits = logits + torch.randn(logits.shape, generator=torch.Generator().manual_seed(0)) * 2.0
    for loss in LOSS_NAMES:
        stored = topk_divergence(student_logits, batch["teacher_ids"], batch["teacher_logprobs"], mask, loss,
                                 teacher_tail_logprob=stored_tail).mean()
        exact = topk_divergence(student_logits, exact_ids, exact_logprobs, mask, loss,
                                teacher_tail_logprob=exact_tail).mean()
        relative = abs(stored.item() - exact.item()) / exact.item()
        print(f"SmolLM2 {loss}: stored {stored.item():.6f} exact {exact.item():.6f} relative error {relative:.2e}")
        assert relative < 1e-3
    self_kl = topk_divergence(logits, batch["teacher_ids"], batch["teacher_logprobs"], mask,
                              teacher_tail_logprob=stored_tail).mean()
    assert self_kl.item() < 1e-3
