from transformers import AutoTokenizer

from edgelm.train.models import load_model
from edgelm.train.sft import build_sft_examples, run_sft_stage


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


def test_examples_ordered_easy_to_hard(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    records = make_records(12)
    examples, stats = build_sft_examples(tokenizer, records, "reasoning", max_length=256, curriculum=True, seed=0)
    lengths = [len(example["input_ids"]) for example in examples]
    # More steps make longer answers, so easy-to-hard order shows as non-decreasing length per bucket.
    buckets = [lengths[i * 3 : (i + 1) * 3] for i in range(4)]
    assert max(buckets[0]) < min(buckets[-1])
    assert stats["examples"] == 12
    assert stats["skipped_too_long"] == 0
    assert 0 < stats["trained_tokens"] < stats["tokens"]


def test_sft_stage_lowers_loss_and_saves(tiny_model_dir, tmp_path):
    records = make_records(8)
    metrics = run_sft_stage(str(tiny_model_dir), records, tmp_path / "sft", mode="fast", epochs=3,
                            learning_rate=5e-3, batch_size=4, logging_steps=1)
    history = [row["loss"] for row in metrics["loss_history"]]
    assert metrics["steps"] == 6
    assert history[-1] < history[0]
    model, tokenizer = load_model(str(tmp_path / "sft"))
    assert tokenizer.eos_token == "<|im_end|>"


def test_answer_loss_equals_full_logits_loss(tiny_model_dir):
    import torch

    from edgelm.train.chat import encode_example
    from edgelm.train.trainer_setup import answer_loss, pad_batch

    model, tokenizer = load_model(str(tiny_model_dir))
    examples = [encode_example(tokenizer, record, mode, 256) for record, mode in zip(make_records(3), ["fast", "reasoning", "fast"])]
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
