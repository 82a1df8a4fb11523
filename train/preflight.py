"""Checks run before teacher scoring and distillation, so a mismatch fails in seconds, not mid-training.

Offline distillation compares the teacher's and the student's distributions token id by token
id, so both models must use the same tokenizer: the same ids for the same text and the same
end-of-turn token. Their logits may differ in width only when one embedding matrix is padded
(extra rows that no token uses). Then both sides are cut to the shared width. Each sequence
must also fit in each model's max_position_embeddings.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from edgelm.files import sha256_of_files
from edgelm.train.models import end_of_turn_token, resolve_source

log = logging.getLogger(__name__)

# Texts whose token ids must agree between teacher and student. They cover digits, arithmetic,
# whitespace runs, code, non-ASCII text and the chat markup, where tokenizers of one family
# most often differ.
SAMPLE_TEXTS = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May.",
    "12 * 5 = 60. 3.75 + 0.25 = 4.0; 1,000,000 - 999,999 = 1. The answer is 72.",
    "    def add(a, b):\n        return a + b\n\n\t# tab-indented comment\n",
    "Größe, naïve café, 東京, Привет, emoji 🙂 and a long————dash.",
    "<|im_start|>user\nWhat is 9 times 6?<|im_end|>\n<|im_start|>assistant\n9 * 6 = 54.<|im_end|>\n",
    "  leading spaces, trailing spaces   \n\n\nblank lines",
)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def checkpoint_hash(spec: str | Path) -> str:
    """Return 12 hex digits of the SHA-256 of a checkpoint's weight files, or of its config.json.

    A .gguf source hashes that file. A folder hashes its weight files in name order, and its
    config.json when it has none. A hub id, which may not be downloaded yet, hashes the id itself.
    """
    source = resolve_source(str(spec))
    location = Path(source.location)
    if source.gguf_file:
        files = [location / source.gguf_file]
    elif location.is_dir():
        files = sorted(path for path in location.iterdir() if path.suffix in _WEIGHT_SUFFIXES)
        files = files or [location / "config.json"]
    else:
        return hashlib.sha256(str(spec).encode()).hexdigest()[:12]
    return sha256_of_files(files)[:12]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str] = SAMPLE_TEXTS) -> dict:
    """Return the facts two tokenizers must share: length, special tokens, end of turn, ids of `texts`.

    The logit store keeps the teacher's fingerprint, so distillation can check the student's
    tokenizer without loading the teacher.
    """
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    return {
        "length": len(tokenizer),
        "end_of_turn": end_of_turn_token(tokenizer),
        "special_tokens": {token: tokenizer.convert_tokens_to_ids(token) for token in sorted(tokenizer.all_special_tokens)},
        "sample_ids_sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest(),
    }


def check_same_tokenizer(teacher: dict, student: dict) -> None:
    """Raise ValueError naming the first difference between two tokenizer fingerprints."""
    for name in ("end_of_turn", "special_tokens", "length", "sample_ids_sha256"):
        if teacher.get(name) != student.get(name):
            what = "token ids of the sample texts" if name == "sample_ids_sha256" else name
            raise ValueError(
                f"teacher and student tokenizers differ in {what}: teacher {teacher.get(name)!r}, "
                f"student {student.get(name)!r}; distillation compares token ids, so both models "
                f"must use the same tokenizer"
            )


def shared_vocab_size(teacher_width: int, student_width: int, tokenizer_length: int) -> int:
    """Return the logits width both models are cut to, or raise ValueError naming both sizes.

    Widths may differ only by padding rows beyond the tokenizer's last id (check_same_tokenizer
    has already shown that both tokenizers are the same), because those rows are never a
    target and carry no probability that matters.
    """
    if teacher_width == student_width:
        return teacher_width
    shared = min(teacher_width, student_width)
    if tokenizer_length > shared:
        raise ValueError(
            f"the teacher's logits have {teacher_width} entries and the student's {student_width}, but the "
            f"shared tokenizer has {tokenizer_length} tokens; a width difference is allowed only when the "
            f"extra rows are padding beyond the last token id"
        )
    log.info(
        "teacher logits width %d and student width %d differ only by padding; both are cut to %d",
        teacher_width, student_width, shared,
    )
    return shared


def max_positions(model: PreTrainedModel) -> int | None:
    """Return the model's max_position_embeddings, or None when its config has none."""
    value = getattr(model.config, "max_position_embeddings", None)
    return int(value) if value is not None else None


def check_sequence_lengths(
    keys_and_lengths: Sequence[tuple[str, int]], limit: int | None, model_name: str,
    fix: str = "lower rollout.max_new_tokens, or drop the longest rows",
) -> None:
    """Raise ValueError naming the longest sequence over `limit` tokens (None: no limit) and `fix`."""
    if limit is None:
        return
    too_long = [(key, length) for key, length in keys_and_lengths if length > limit]
    if too_long:
        key, length = max(too_long, key=lambda item: item[1])
        raise ValueError(
            f"{len(too_long)} sequences are longer than the {model_name}'s max_position_embeddings={limit} "
            f"(longest: {key}, {length} tokens); {fix}"
        )
