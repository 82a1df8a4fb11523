"""Build a benchmark prompt of an exact token count from real text."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

# Used when no prompt file is given: a grade-school math word problem, like the GSM8K
# questions the models are trained on.
DEFAULT_TEXT = (
    "A bakery sells muffins for $3 each and cookies for $1.50 each. On Monday it sold 48 muffins "
    "and twice as many cookies as muffins. On Tuesday it sold 20% fewer muffins than on Monday, "
    "but 15 more cookies than on Monday. The ingredients for one muffin cost $0.80 and for one "
    "cookie $0.35, and the bakery pays $60 a day for rent and wages. How much profit did the "
    "bakery make over the two days? Explain each step of the calculation."
)


def read_prompt_text(prompt_file: str | Path | None) -> str:
    """Return the prompt source text: DEFAULT_TEXT, a text file, or the questions of a JSONL file.

    A `.jsonl` file is read as rows with a "question" field, as in GSM8K. The first 50
    questions are joined with blank lines, and prompt_ids repeats them if a prompt needs more.
    """
    if prompt_file is None:
        return DEFAULT_TEXT
    path = Path(prompt_file)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found")
    if path.suffix != ".jsonl":
        return path.read_text(encoding="utf-8")

    questions = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                if "question" not in row:
                    raise ValueError(f"{path}: a row has no 'question' field (keys: {sorted(row)}); pass a GSM8K-style JSONL file")
                questions.append(row["question"])
            if len(questions) >= 50:
                break
    if not questions:
        raise ValueError(f"{path} contains no rows")
    return "\n\n".join(questions)


def prompt_ids(tokenize: Callable[[str], list[int]], text: str, num_tokens: int) -> list[int]:
    """Tokenize `text`, repeated as needed, and cut it to exactly `num_tokens` ids."""
    if num_tokens < 1:
        raise ValueError(f"prompt length {num_tokens} must be at least 1 token")
    if not text.strip():
        raise ValueError("prompt text is empty")
    repeated = text
    ids = tokenize(repeated)
    while len(ids) < num_tokens:
        repeated += "\n\n" + text
        ids = tokenize(repeated)
    return ids[:num_tokens]
