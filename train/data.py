"""Turn GSM8K-style or chat JSONL into training records.

A record is a dict with:
    id          stable string id, e.g. "gsm8k-train-00012" (file stem plus line number)
    prompt      the question, as the user message
    reasoning   the worked steps, calculator marks `<<48/2=24>>` removed
    answer      the final answer, e.g. "72"
    difficulty  number of reasoning steps (non-empty lines of `reasoning`)

Two input formats are accepted, detected per line:
    GSM8K: {"question": ..., "answer": "step\\nstep\\n#### 72"}
    chat:  {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}; the last user
           message is the prompt, the assistant message after it the reasoning, and the final
           answer is taken from a trailing "#### N". Without it, `answer` is "" and the reply is
           the target in both answer modes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

CALCULATOR_MARK = re.compile(r"<<[^>]*>>")
FINAL_ANSWER = re.compile(r"\n?####\s*(\S.*?)\s*$", re.DOTALL)
HUB_PREFIX = "hf:"


class DataError(ValueError):
    """A malformed input line; the message names the file, the line number and the reason."""


def _clean_steps(text: str) -> str:
    return CALCULATOR_MARK.sub("", text).strip()


def _record(record_id: str, prompt: str, reply: str) -> dict:
    match = FINAL_ANSWER.search(reply)
    if match:
        reasoning = _clean_steps(reply[: match.start()])
        answer = match.group(1).strip().replace(",", "")
    else:
        # No final-answer marker: the reply is the whole target and there is no short answer.
        reasoning = _clean_steps(reply)
        answer = ""
    steps = [line for line in reasoning.splitlines() if line.strip()]
    return {"id": record_id, "prompt": prompt.strip(), "reasoning": reasoning, "answer": answer, "difficulty": len(steps)}


def parse_line(row: dict, record_id: str) -> dict:
    """Build a record from one parsed JSON object; raise ValueError with the reason when malformed."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    if "question" in row or "answer" in row:
        question, answer = row.get("question"), row.get("answer")
        if not isinstance(question, str) or not question.strip():
            raise ValueError("'question' is missing or empty")
        if not isinstance(answer, str) or not FINAL_ANSWER.search(answer):
            raise ValueError("'answer' must be a string ending in '#### <final answer>'")
        return _record(record_id, question, answer)
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise ValueError("'messages' must be a list of {'role', 'content'} objects")
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if not users:
            raise ValueError("'messages' has no user message")
        last_user = users[-1]
        replies = [m for m in messages[last_user + 1 :] if m["role"] == "assistant"]
        if not replies:
            raise ValueError("'messages' has no assistant message after the last user message")
        return _record(record_id, messages[last_user]["content"], replies[0]["content"])
    raise ValueError(f"unknown format: expected keys 'question'/'answer' or 'messages', got {sorted(row)}")


def read_records(path: str | Path, limit: int | None = None, id_prefix: str | None = None) -> list[dict]:
    """Read up to `limit` records from a JSONL file; raise DataError on the first malformed line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    prefix = id_prefix or path.stem
    records = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if limit is not None and len(records) >= limit:
                break
            if not line.strip():
                continue
            try:
                records.append(parse_line(json.loads(line), f"{prefix}-{line_number:05d}"))
            except (json.JSONDecodeError, ValueError) as error:
                raise DataError(f"{path}:{line_number}: {error}") from None
    if not records:
        raise DataError(f"{path}: no records found")
    return records


def load_records(source: str, split: str, limit: int | None = None) -> list[dict]:
    """Load records from a JSONL path, a folder holding `{split}.jsonl`, or `hf:openai/gsm8k` (online)."""
    if source.startswith(HUB_PREFIX):
        return _load_from_hub(source[len(HUB_PREFIX) :], split, limit)
    path = Path(source)
    if path.is_dir():
        path = path / f"{split}.jsonl"
    return read_records(path, limit, id_prefix=f"{path.parent.name}-{split}" if path.stem == split else None)


def _load_from_hub(dataset_id: str, split: str, limit: int | None) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"loading {dataset_id!r} from the hub needs `pip install datasets`; or pass a JSONL path") from None
    config = "main" if dataset_id == "openai/gsm8k" else None
    rows = datasets.load_dataset(dataset_id, config, split=split)
    records = []
    for index, row in enumerate(rows):
        if limit is not None and len(records) >= limit:
            break
        try:
            records.append(parse_line(dict(row), f"{dataset_id.split('/')[-1]}-{split}-{index + 1:05d}"))
        except ValueError as error:
            raise DataError(f"{dataset_id} [{split}] row {index}: {error}") from None
    return records
