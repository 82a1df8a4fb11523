from transformers import AutoTokenizer

from edgelm.train.chat import IGNORE_INDEX, answers_match, encode_example, extract_answer, prompt_ids, target_text
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
