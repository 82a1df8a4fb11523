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


GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


def has_generation_markers(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Return whether the chat template marks assistant text with `{% generation %}` blocks."""
    return bool(tokenizer.chat_template and GENERATION_MARKER.search(tokenizer.chat_template))


def encode_example(
    tokenizer: PreTrainedTokenizerBase,
    record: dict,
    mode: str,
    max_length: int,
    *,
    truncate: bool = False,
) -> dict | None:
    """Encode prompt + target + end-of-turn; labels are -100 everywhere but the assistant tokens.

    Templates with `{% generation %}` blocks mark the assistant tokens themselves
    (`encode_with_template_mask`). For other templates the prompt and the reply are tokenized
    apart and concatenated, which is exactly what the model sees at generation time, so the
    boundary between masked and trained tokens is exact. Either way the end-of-turn token is
    trained and nothing after it is kept.

    An example longer than `max_length` returns None, or with `truncate=True` is cut to
    `max_length` tokens and gets `"truncated": True`.
    """
    if has_generation_markers(tokenizer):
        input_ids, labels = encode_with_template_mask(tokenizer, record, mode)
    else:
        prompt = prompt_ids(tokenizer, record, mode)
        eot_id = tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))
        reply = tokenizer(target_text(record, mode), add_special_tokens=False)["input_ids"] + [eot_id]
        input_ids, labels = prompt + reply, [IGNORE_INDEX] * len(prompt) + reply
    if len(input_ids) <= max_length:
        return {"input_ids": input_ids, "labels": labels}
    if not truncate:
        return None
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length], "truncated": True}


def encode_with_template_mask(tokenizer: PreTrainedTokenizerBase, record: dict, mode: str) -> tuple[list[int], list[int]]:
    """Return (input_ids, labels) of the whole conversation, labels taken from the template's generation mask.

    Templates differ on whether the end-of-turn token sits inside the `{% generation %}` block,
    so the end-of-turn token that closes the reply is trained whether it is inside the block or
    right after it. The sequence ends there: later tokens (a newline, say) are never generated.
    """
    messages = prompt_messages(record, mode) + [{"role": "assistant", "content": target_text(record, mode)}]
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    input_ids = list(encoded["input_ids"])
    mask = list(encoded["assistant_masks"])
    trained = [i for i, flag in enumerate(mask) if flag]
    if not trained:
        return input_ids, [IGNORE_INDEX] * len(input_ids)
    eot_id = tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))
    end = trained[-1] + 1
    closing = next((i for i in range(trained[0], len(input_ids)) if input_ids[i] == eot_id), None)
    if closing is not None and closing <= end:
        mask[closing] = 1
        end = closing + 1
    input_ids = input_ids[:end]
    labels = [token if mask[i] else IGNORE_INDEX for i, token in enumerate(input_ids)]
    return input_ids, labels


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
