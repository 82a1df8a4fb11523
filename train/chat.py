"""Chat formatting shared by SFT, rollouts, teacher scoring and evaluation.

Each record can be asked in two modes, which differ in the instruction appended to the question
and in the target the model learns:
    reasoning: "<steps>\\nThe answer is 72."
    fast:      "The answer is 72."
"""

from __future__ import annotations

import re

from transformers import PreTrainedTokenizerBase

from edgelm.train.models import end_of_turn_token

INSTRUCTIONS = {
    "reasoning": "Solve it step by step, then give the final answer.",
    "fast": "Give only the final answer.",
}
IGNORE_INDEX = -100
NUMBER = r"-?\d[\d,]*(?:\.\d+)?"
ANSWER_PATTERN = re.compile(rf"answer is\s*\$?\s*({NUMBER})", re.IGNORECASE)


def check_mode(mode: str) -> str:
    if mode not in INSTRUCTIONS:
        raise ValueError(f"unknown answer mode {mode!r}; expected one of {sorted(INSTRUCTIONS)}")
    return mode


def prompt_messages(record: dict, mode: str) -> list[dict]:
    return [{"role": "user", "content": f"{record['prompt']}\n{INSTRUCTIONS[check_mode(mode)]}"}]


def target_text(record: dict, mode: str) -> str:
    if not record["answer"]:
        return record["reasoning"]  # a chat reply without a marked final answer
    final = f"The answer is {record['answer']}."
    if check_mode(mode) == "reasoning" and record["reasoning"]:
        return f"{record['reasoning']}\n{final}"
    return final


def prompt_ids(tokenizer: PreTrainedTokenizerBase, record: dict, mode: str) -> list[int]:
    """Token ids of the chat-templated prompt, ending with the assistant header."""
    text = tokenizer.apply_chat_template(prompt_messages(record, mode), tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_example(tokenizer: PreTrainedTokenizerBase, record: dict, mode: str, max_length: int) -> dict | None:
    """Encode prompt + target + end-of-turn; labels are -100 everywhere but the assistant tokens.

    The prompt and the reply are tokenized apart and concatenated, which is exactly what the
    model sees at generation time, so the boundary between masked and trained tokens is exact.
    Returns None when the example does not fit in `max_length` tokens.
    """
    prompt = prompt_ids(tokenizer, record, mode)
    eot_id = tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))
    reply = tokenizer(target_text(record, mode), add_special_tokens=False)["input_ids"] + [eot_id]
    if len(prompt) + len(reply) > max_length:
        return None
    return {
        "input_ids": prompt + reply,
        "labels": [IGNORE_INDEX] * len(prompt) + reply,
    }


def extract_answer(text: str) -> str | None:
    """Return the number after "answer is", else the last number in `text`, without commas."""
    match = ANSWER_PATTERN.search(text)
    if match is None:
        numbers = re.findall(NUMBER, text)
        if not numbers:
            return None
        value = numbers[-1]
    else:
        value = match.group(1)
    return value.replace(",", "").rstrip(".")


def answers_match(predicted: str | None, reference: str) -> bool:
    """Compare two numeric answers exactly (72 == 72.0), falling back to string equality."""
    if predicted is None:
        return False
    try:
        return float(predicted) == float(reference.replace(",", ""))
    except ValueError:
        return predicted.strip() == reference.strip()
