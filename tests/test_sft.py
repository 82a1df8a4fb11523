import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, TrainerCallback

from edgelm.train.chat import IGNORE_INDEX, encode_example
from edgelm.train.difficulty import ScoringContext, get_scorer, per_example_loss
from edgelm.train.models import load_model
from edgelm.train.packing import collate_packed
from edgelm.train.sft import encode_records, record_modes, run_sft_stage
from edgelm.train.trainer_setup import (
    TRAINER_STATE,
    AnswerLossTrainer,
    answer_loss,
    last_complete_checkpoint,
    pad_batch,
    training_arguments,
)


def make_records(count):
    records = []
    for i in range(count):
        steps = 1 + i % 4
        records.append({
            "id": f"r{i}", "prompt": f"What is {i} plus {steps}?",
            "reasoning": "\n".join(f"step {s}: {i} + {s} = {i + s}" for s in range(1, steps + 1)),
            "answer": str(i + steps), "difficulty": steps,
        })
    return records


def mixed_examples(tokenizer, count):
    modes = ["fast", "reasoning"] * count
    return [encode_example(tokenizer, record, mode, 256) for record, mode in zip(make_records(count), modes)]


def test_encode_records_mask_report(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    records = make_records(8)
    lengths = [len(encode_example(tokenizer, record, "reasoning", 1024)["input_ids"]) for record in records]
    limit = sorted(lengths)[4]  # about half the examples are longer
    prompt_length = len(encode_example(tokenizer, records[0], "fast", 1024)["input_ids"]) - 7

    kept, examples, report = encode_records(tokenizer, records, ["reasoning"] * 8, limit, "skip")
    assert report["records"] == 8
    assert report["skipped_too_long"] == sum(length > limit for length in lengths)
    assert report["examples"] == len(kept) == len(examples) == 8 - report["skipped_too_long"]
    per_example = [sum(label != IGNORE_INDEX for label in example["labels"]) for example in examples]
    assert report["trained_tokens_per_example"]["min"] == min(per_example)
    assert report["trained_tokens_per_example"]["max"] == max(per_example)
    assert report["trained_tokens"] == sum(per_example)
    assert report["mask_source"] == "prompt prefix"

    _, examples, report = encode_records(tokenizer, records, ["reasoning"] * 8, limit, "truncate")
    assert report["examples"] == 8
    assert report["truncated"] == sum(length > limit for length in lengths)
    assert all(len(example["input_ids"]) <= limit for example in examples)

    # Cut inside the prompt, nothing of the reply is left to train.
    _, _, report = encode_records(tokenizer, records[:1], ["fast"], prompt_length - 2, "truncate")
    assert report["truncated_to_no_answer"] == 1
    assert report["no_trainable_tokens"] == 0
    assert report["examples"] == 0


def test_steps_scorer_missing_difficulty():
    records = make_records(3)
    del records[1]["difficulty"]
    context = ScoringContext(records=records, examples=[], modes=[], tokenizer=None, max_length=64, model=None)
    with pytest.raises(ValueError, match=r"record r1 has difficulty=None.*--difficulty length"):
        get_scorer("steps").score(context)


@pytest.mark.parametrize("settings, message", [
    ({"epochs": 0}, "epochs=0 must be > 0"),
    ({"learning_rate": float("nan")}, "learning_rate=nan must be in"),
    ({"grad_accum": 0}, "grad_accum=0 must be >= 1"),
    ({"initial_competence": -3}, "initial_competence=-3 must be in"),
])
def test_sft_stage_invalid_settings(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        run_sft_stage("no-such-model", make_records(2), tmp_path / "sft", mode="fast", **settings)
    assert not (tmp_path / "sft").exists()


def test_sft_stage_foreign_out_folder(tiny_model_dir, tmp_path):
    (tmp_path / "records.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="contains files that edgelm did not write"):
        run_sft_stage(str(tiny_model_dir), make_records(2), tmp_path, mode="fast")
    with pytest.raises(ValueError, match="is the input model's folder"):
        run_sft_stage(str(tiny_model_dir), make_records(2), tiny_model_dir, mode="fast")
    assert (tmp_path / "records.jsonl").is_file()


def test_resume_skips_broken_checkpoint(tmp_path):
    for step, state in ((5, "{}"), (10, None), (15, '{"global_step"')):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_text("x")
        if state is not None:
            (folder / TRAINER_STATE).write_text(state)
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-5")
    assert not (tmp_path / "checkpoint-10").exists()
    assert not (tmp_path / "checkpoint-15").exists()
    assert last_complete_checkpoint(tmp_path / "none") is None


def test_record_modes_mixed_is_seeded():
    modes = record_modes(10, "mixed", 0.3, seed=0)
    assert modes.count("fast") == 3
    assert modes == record_modes(10, "mixed", 0.3, seed=0)
    assert record_modes(4, "fast", 0.3, seed=0) == ["fast"] * 4
    with pytest.raises(ValueError, match="unknown answer mode 'slow'"):
        record_modes(4, "slow", 0.3, seed=0)


def test_sft_stage_without_trainable_tokens_fails(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="no trainable token in 4 records: 4 skipped for exceeding max_length=16"):
        run_sft_stage(str(tiny_model_dir), make_records(4), tmp_path / "sft", mode="fast", max_length=16)
    report = json.loads((tmp_path / "sft" / "mask_report.json").read_text())
    assert report["skipped_too_long"] == 4
    assert report["trained_tokens"] == 0


@pytest.mark.parametrize("packing, message", [
    (False, "longer than the model's max_position_embeddings=16"),
    (True, "max_length=256 tokens, more than the model's max_position_embeddings=16"),
])
def test_sft_stage_rejects_rows_over_model_limit(smollm2_tokenizer_dir, tmp_path, packing, message):
    from conftest import build_tiny_model

    short = build_tiny_model(smollm2_tokenizer_dir, tmp_path / "short", max_position_embeddings=16)
    with pytest.raises(ValueError, match=message):
        run_sft_stage(str(short), make_records(4), tmp_path / "sft", mode="reasoning", max_length=256,
                      packing=packing)


def test_sft_stage_lowers_loss_and_saves(tiny_model_dir, tmp_path):
    records = make_records(8)
    metrics = run_sft_stage(str(tiny_model_dir), records, tmp_path / "sft", mode="mixed", fast_ratio=0.5, epochs=3,
                            learning_rate=5e-3, batch_size=4, logging_steps=1, pacing="sqrt", save_steps=2)
    history = [row["loss"] for row in metrics["loss_history"]]
    assert metrics["steps"] == 6
    assert history[-1] < history[0]
    assert metrics["tokens_per_second"] > 0
    model, tokenizer = load_model(str(tmp_path / "sft"))
    assert tokenizer.eos_token == "<|im_end|>"
    report = json.loads((tmp_path / "sft" / "mask_report.json").read_text())
    assert report["modes"] == {"fast": 4, "reasoning": 4}
    # The final save replaces the folder, so the checkpoints are gone.
    assert not (tmp_path / "sft" / "checkpoints").exists()


def test_answer_loss_equals_full_logits_loss(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    examples = mixed_examples(tokenizer, 2)[:3]
    batch = pad_batch(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        fast = answer_loss(model, batch)
        # Reference: each example alone, unpadded, full logits, transformers' own loss.
        total, count = 0.0, 0
        for example in examples:
            labels = torch.tensor([example["labels"]])
            output = model(input_ids=torch.tensor([example["input_ids"]]), labels=labels)
            tokens = int((labels[:, 1:] != -100).sum())
            total, count = total + float(output.loss) * tokens, count + tokens
    torch.testing.assert_close(float(fast), total / count, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_logits_equal_unpacked(tiny_model_dir, attention):
    model, tokenizer = load_model(str(tiny_model_dir))
    model.set_attn_implementation(attention)
    model.eval()
    examples = mixed_examples(tokenizer, 2)[:3]
    rows = [examples[:2], examples[2:]]
    batch = collate_packed(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        # use_cache=False as in training: with a cache, transformers does not detect packed rows.
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        offsets = [(0, 0), (0, len(examples[0]["input_ids"])), (1, 0)]
        for example, (row, start) in zip(examples, offsets):
            alone = model(input_ids=torch.tensor([example["input_ids"]])).logits[0]
            piece = packed[row, start : start + len(example["input_ids"])]
            torch.testing.assert_close(piece, alone, rtol=1e-5, atol=1e-5)


def test_packed_loss_equals_padded_loss(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    examples = mixed_examples(tokenizer, 3)
    packed = collate_packed([examples[:3], examples[3:]], tokenizer.pad_token_id)
    packed.pop("attention_mask")
    with torch.no_grad():
        torch.testing.assert_close(answer_loss(model, packed), answer_loss(model, pad_batch(examples, tokenizer.pad_token_id)),
                                   rtol=1e-5, atol=1e-5)


class PerMicroBatchMeanTrainer(AnswerLossTrainer):
    """The usual mistake: a mean per micro-batch, divided again by the accumulation steps."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_is_scaled_for_ga = False

    def token_mean(self, loss_sum, num_items_in_batch, inputs):
        return loss_sum / self.count_loss_tokens(inputs)


def one_sgd_step(model_dir, examples, pad_token_id, batch_size, grad_accum, output_dir, trainer_class=AnswerLossTrainer):
    model, _ = load_model(str(model_dir))
    args = training_arguments(str(output_dir), learning_rate=1.0, epochs=1, max_steps=1, batch_size=batch_size,
                              grad_accum=grad_accum, seed=0, warmup_steps=0, logging_steps=1, sequential=True,
                              optim="sgd", lr_scheduler_type="constant")
    trainer = trainer_class(model=model, args=args, train_dataset=examples,
                            data_collator=lambda batch: pad_batch(batch, pad_token_id))
    trainer.train()
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


def test_token_mean_same_for_batch_and_accumulation(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = mixed_examples(tokenizer, 4)  # 8 examples with 6 to 60 trained tokens each
    whole = one_sgd_step(tiny_model_dir, examples, tokenizer.pad_token_id, 8, 1, tmp_path / "a")
    accumulated = one_sgd_step(tiny_model_dir, examples, tokenizer.pad_token_id, 1, 8, tmp_path / "b")
    naive = one_sgd_step(tiny_model_dir, examples, tokenizer.pad_token_id, 1, 8, tmp_path / "c", PerMicroBatchMeanTrainer)
    initial = dict(load_model(str(tiny_model_dir))[0].named_parameters())
    for name, value in whole.items():
        assert not torch.equal(value, initial[name].detach()), name
        torch.testing.assert_close(accumulated[name], value, rtol=0, atol=1e-6)
    # The test can fail: a per-micro-batch mean moves the weights elsewhere.
    assert max(float((naive[name] - whole[name]).abs().max()) for name in whole) > 1e-4


class StopAtStep(TrainerCallback):
    """Simulate a crash once `step` optimizer steps (and their checkpoint) are done."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"simulated interruption after step {self.step}")


@pytest.mark.parametrize("settings", [
    {"difficulty": "student_loss", "pacing": "sqrt", "batch_size": 4},
    {"difficulty": "length", "pacing": "buckets", "packing": True, "batch_size": 1},
], ids=["self-paced", "packed"])
def test_resume_matches_uninterrupted(tiny_model_dir, tmp_path, settings):
    common = dict(mode="mixed", epochs=2, learning_rate=3e-3, max_length=256, save_steps=2, logging_steps=1, **settings)
    records = make_records(16)
    full = run_sft_stage(str(tiny_model_dir), records, tmp_path / "full", **common)
    steps = full["steps"]
    assert steps == 2 * full["rows"] // common["batch_size"]
    assert steps >= 6
    # Stop inside the second epoch, after the self-paced scores of that epoch were computed.
    stop = steps - 2

    stopped = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        run_sft_stage(str(tiny_model_dir), records, stopped, resume=True, callbacks=[StopAtStep(stop)], **common)
    assert (stopped / "checkpoints" / f"checkpoint-{stop}").is_dir()
    resumed = run_sft_stage(str(tiny_model_dir), records, stopped, resume=True, **common)

    assert resumed["resumed_from_step"] == stop
    assert resumed["steps"] == steps
    assert not (stopped / "checkpoints").exists()
    assert [row["step"] for row in resumed["loss_history"]] == list(range(1, steps + 1))
    expected = load_file(tmp_path / "full" / "model.safetensors")
    actual = load_file(stopped / "model.safetensors")
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=0, atol=1e-6)


def test_resume_ignores_checkpoints_of_other_settings(tiny_model_dir, tmp_path):
    records = make_records(8)
    common = dict(mode="fast", batch_size=2, save_steps=1, logging_steps=1)
    with pytest.raises(KeyboardInterrupt):
        run_sft_stage(str(tiny_model_dir), records, tmp_path / "sft", resume=True, callbacks=[StopAtStep(2)], **common)
    metrics = run_sft_stage(str(tiny_model_dir), records, tmp_path / "sft", resume=True, learning_rate=2e-4, **common)
    assert metrics["resumed_from_step"] is None
    assert metrics["steps"] == 4


def scoring_context(model_dir, **overrides):
    model, tokenizer = load_model(str(model_dir))
    records = make_records(6)
    modes = ["reasoning"] * 6
    examples = [encode_example(tokenizer, record, "reasoning", 256) for record in records]
    return ScoringContext(records=records, examples=examples, modes=modes, tokenizer=tokenizer, max_length=256,
                          model=model, batch_size=4, **overrides)


def test_difficulty_scorers(tiny_model_dir):
    context = scoring_context(tiny_model_dir, teacher=str(tiny_model_dir))
    assert get_scorer("steps").score(context) == [1.0, 2.0, 3.0, 4.0, 1.0, 2.0]
    lengths = get_scorer("length").score(context)
    assert lengths == [float(sum(label != -100 for label in e["labels"])) for e in context.examples]
    assert lengths[3] > lengths[0]
    teacher = get_scorer("teacher_loss").score(context)
    student = get_scorer("student_loss").score(context)
    # The teacher here is the student's own starting point, so both scorers agree.
    torch.testing.assert_close(teacher, student, rtol=1e-5, atol=1e-5)
    assert get_scorer("student_loss").every_epoch
    assert not get_scorer("teacher_loss").every_epoch
    with pytest.raises(ValueError, match="unknown difficulty scorer 'entropy'"):
        get_scorer("entropy")


def test_per_example_loss_matches_full_logits(tiny_model_dir):
    context = scoring_context(tiny_model_dir)
    losses = per_example_loss(context.model, context.examples, context.tokenizer.pad_token_id, batch_size=4)
    with torch.no_grad():
        for example, loss in zip(context.examples, losses):
            reference = context.model(input_ids=torch.tensor([example["input_ids"]]), labels=torch.tensor([example["labels"]])).loss
            assert loss == pytest.approx(float(reference), rel=1e-5)


def test_teacher_loss_needs_teacher(tiny_model_dir):
    with pytest.raises(ValueError, match="needs a teacher model source"):
        get_scorer("teacher_loss").score(scoring_context(tiny_model_dir))


def test_teacher_loss_position_limit(tiny_model_dir, tiny_model_factory):
    short_teacher = tiny_model_factory("llama", max_position_embeddings=32)
    context = scoring_context(tiny_model_dir, teacher=str(short_teacher))
    with pytest.raises(ValueError, match=r"longer than the teacher's max_position_embeddings=32.*choose another"):
        get_scorer("teacher_loss").score(context)


def test_student_loss_rescored_every_epoch(tiny_model_dir, tmp_path, monkeypatch):
    from edgelm.train import sft

    computed = {}
    original = sft.DifficultyScores.for_epoch

    def recording(self, epoch):
        scores = original(self, epoch)
        computed.setdefault(epoch, scores)
        return scores

    monkeypatch.setattr(sft.DifficultyScores, "for_epoch", recording)
    run_sft_stage(str(tiny_model_dir), make_records(8), tmp_path / "sft", mode="fast", epochs=3, batch_size=4,
                  learning_rate=5e-3, difficulty="student_loss", pacing="linear")
    assert sorted(computed) == [0, 1, 2]
    assert computed[2] != computed[0]
    # Training lowers the student's own loss on its training examples.
    assert sum(computed[2]) < sum(computed[0])
