import pytest
from transformers import AutoTokenizer

from edgelm.train.chat import (
    IGNORE_INDEX,
    answers_match,
    encode_example,
    extract_answer,
    has_generation_markers,
    prompt_ids,
    target_text,
)
from edgelm.train.models import end_of_turn_token

RECORD = {"id": "r1", "prompt": "What is 2+3?", "reasoning": "2+3 = 5", "answer": "5", "difficulty": 1}


def test_loss_mask_covers_exactly_assistant_tokens_and_eot(smollm2_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    eot_id = tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))
    for mode in ("reasoning", "fast"):
        example = encode_example(tokenizer, RECORD, mode, max_length=512)
        labels, input_ids = example["labels"], example["input_ids"]
        trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
        prompt_length = len(prompt_ids(tokenizer, RECORD, mode))

        assert trained == list(range(prompt_length, len(input_ids)))
        assert [input_ids[i] for i in trained] == [labels[i] for i in trained]
        assert input_ids[trained[-1]] == eot_id
        assert tokenizer.decode([input_ids[i] for i in trained]) == target_text(RECORD, mode) + "<|im_end|>"
        # The prompt ends with the assistant header, so nothing of the user turn is trained.
        assert tokenizer.decode(input_ids[:prompt_length]).endswith("<|im_start|>assistant\n")


def test_encode_example_rejects_too_long(smollm2_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    assert encode_example(tokenizer, RECORD, "reasoning", max_length=8) is None


def test_targets_per_mode():
    assert target_text(RECORD, "fast") == "The answer is 5."
    assert target_text(RECORD, "reasoning") == "2+3 = 5\nThe answer is 5."


def test_extract_answer():
    assert extract_answer("so 3 + 4 = 7\nThe answer is 7.") == "7"
    assert extract_answer("The answer is $1,250.") == "1250"
    assert extract_answer("I think 12 then 15") == "15"
    assert extract_answer("no digits here") is None
    assert extract_answer("The answer is -3.5") == "-3.5"


def test_answers_match():
    assert answers_match("72", "72")
    assert answers_match("72.0", "72")
    assert not answers_match("71", "72")
    assert not answers_match(None, "72")


# SmolLM2's template with the assistant reply wrapped in generation markers, in three placements
# of the end-of-turn token: inside the block, after it, and inside with a trailing newline.
MARKED_TEMPLATES = {
    "eot_inside": "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}",
    "eot_outside": "{% generation %}{{ message['content'] }}{% endgeneration %}{{ '<|im_end|>\\n' }}",
    "newline_inside": "{% generation %}{{ message['content'] + '<|im_end|>\\n' }}{% endgeneration %}",
}


def marked_template(assistant_part: str) -> str:
    return (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{% if message['role'] == 'assistant' %}" + assistant_part +
        "{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )


@pytest.mark.parametrize("placement", sorted(MARKED_TEMPLATES))
def test_loss_mask_from_generation_markers(smollm2_tokenizer_dir, placement):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    tokenizer.chat_template = marked_template(MARKED_TEMPLATES[placement])
    assert has_generation_markers(tokenizer)
    for mode in ("reasoning", "fast"):
        example = encode_example(tokenizer, RECORD, mode, max_length=512)
        input_ids, labels = example["input_ids"], example["labels"]
        trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]

        assert trained == list(range(trained[0], len(input_ids)))
        assert tokenizer.decode([input_ids[i] for i in trained]) == target_text(RECORD, mode) + "<|im_end|>"
        assert tokenizer.decode(input_ids[: trained[0]]).endswith("<|im_start|>assistant\n")
        # The template mask and the prefix method agree on this template.
        assert input_ids == prompt_ids(tokenizer, RECORD, mode) + [input_ids[i] for i in trained]


def test_smollm2_template_has_no_generation_markers(smollm2_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    assert not has_generation_markers(tokenizer)


def test_encode_example_truncates_on_request(smollm2_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    full = encode_example(tokenizer, RECORD, "reasoning", max_length=512)
    cut = encode_example(tokenizer, RECORD, "reasoning", max_length=len(full["input_ids"]) - 3, truncate=True)
    assert cut["truncated"] is True
    assert cut["input_ids"] == full["input_ids"][:-3]
    assert cut["labels"] == full["labels"][:-3]
    assert "truncated" not in full
