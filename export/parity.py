"""Measure how far an exported or quantized graph is from its reference, and enforce thresholds.

Every variant gets the same four kinds of numbers:

- max |logits difference| over chat prompts (prefill and cached decode steps) and over
  held-out text;
- top-1 agreement under teacher forcing on a few hundred tokens of held-out text: both
  models see the same tokens, and a position agrees when both rank the same next token first;
- greedy continuation agreement: the share of greedy tokens that match, position by
  position, when each model decodes from the same chat prompts;
- relative perplexity change on the held-out text, (ppl_candidate - ppl_reference) / ppl_reference.

The reference is PyTorch for the fp32 export and the fp32 ONNX graph for quantized variants.
Thresholds are set per variant kind under `export.parity.<kind>` in the pipeline config.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from edgelm.files import write_json

class ParityError(RuntimeError):
    """The exported model's logits or greedy tokens differ from the reference beyond tolerance."""


log = logging.getLogger(__name__)

PARITY_FILE = "parity.json"

# Keys of a thresholds mapping: a `max_` value fails when exceeded, a `min_` value when undershot.
THRESHOLD_KEYS = ("max_logits_diff", "min_top1_agreement", "max_ppl_increase", "min_greedy_agreement")

# Held-out text used when the caller passes none: short arithmetic word problems with worked
# answers, written for edgelm, in the style of GSM8K but not taken from it.
DEFAULT_HELDOUT_TEXTS = (
    "A baker makes 24 muffins in the morning and 18 in the afternoon. She sells 30 of them. "
    "How many muffins are left? She made 24 + 18 = 42 muffins. After selling 30, 42 - 30 = 12 "
    "muffins are left. The answer is 12.",
    "A train travels 60 kilometres per hour for 3 hours, then 40 kilometres per hour for 2 "
    "hours. How far does it travel in total? First part: 60 * 3 = 180 km. Second part: "
    "40 * 2 = 80 km. Total: 180 + 80 = 260 km. The answer is 260.",
    "Maria buys 4 notebooks at 3 dollars each and a pen for 2 dollars. She pays with a "
    "20 dollar bill. How much change does she get? The notebooks cost 4 * 3 = 12 dollars. "
    "With the pen the total is 12 + 2 = 14 dollars. Her change is 20 - 14 = 6 dollars. "
    "The answer is 6.",
    "A garden has 5 rows of tomato plants with 8 plants in each row. Each plant gives 6 "
    "tomatoes. How many tomatoes does the garden give? There are 5 * 8 = 40 plants, so "
    "40 * 6 = 240 tomatoes. The answer is 240.",
    "Tom reads 15 pages a day. His book has 180 pages and he has already read 45. How many "
    "more days does he need to finish it? He has 180 - 45 = 135 pages left, and "
    "135 / 15 = 9 days. The answer is 9.",
    "A school orders 7 boxes of pencils with 12 pencils per box and gives 5 pencils to each "
    "of 16 students. How many pencils remain? It orders 7 * 12 = 84 pencils and gives away "
    "5 * 16 = 80, so 84 - 80 = 4 remain. The answer is 4.",
)


def heldout_token_ids(tokenizer, texts=None, max_tokens: int = 512, chunk_tokens: int = 128) -> list[list[int]]:
    """Tokenize held-out texts into chunks of at most `chunk_tokens`, `max_tokens` in total.

    Each text starts a new chunk, so no chunk crosses from one text into the next.
    """
    chunks: list[list[int]] = []
    total = 0
    for text in texts or DEFAULT_HELDOUT_TEXTS:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        for start in range(0, len(ids), chunk_tokens):
            piece = ids[start:start + chunk_tokens][: max_tokens - total]
            if len(piece) >= 2:
                chunks.append(piece)
                total += len(piece)
            if total >= max_tokens:
                return chunks
    return chunks


def chat_heldout_texts(records: list[dict], tokenizer, mode: str = "reasoning") -> list[str]:
    """Format data records as full chat transcripts (question in `mode`, reference answer), as SFT trains on them."""
    from edgelm.train.chat import prompt_messages, target_text

    texts = []
    for record in records:
        messages = [*prompt_messages(record, mode), {"role": "assistant", "content": target_text(record, mode)}]
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
    return texts


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def teacher_forcing(reference, candidate, chunks: list[list[int]]) -> dict:
    """Run each chunk through both decoders in one prefill pass and compare next-token predictions.

    Returns the max |logits difference|, the top-1 agreement over all predicted positions and
    both perplexities on the chunks' own next tokens.
    """
    max_diff = 0.0
    agree = positions = 0
    reference_nll = candidate_nll = 0.0
    for chunk in chunks:
        input_ids = np.array([chunk], dtype=np.int64)
        attention_mask = np.ones_like(input_ids)
        position_ids = np.arange(len(chunk), dtype=np.int64)[None]
        ref_logits, _ = reference.step(input_ids, attention_mask, position_ids, reference.empty_past(1))
        cand_logits, _ = candidate.step(input_ids, attention_mask, position_ids, candidate.empty_past(1))
        ref_logits = np.asarray(ref_logits, dtype=np.float32)[0]
        cand_logits = np.asarray(cand_logits, dtype=np.float32)[0]
        max_diff = max(max_diff, float(np.abs(ref_logits - cand_logits).max()))
        # Position t predicts token t + 1, so the last position has no target.
        targets = np.array(chunk[1:])
        agree += int((ref_logits[:-1].argmax(-1) == cand_logits[:-1].argmax(-1)).sum())
        positions += len(targets)
        rows = np.arange(len(targets))
        reference_nll -= float(_log_softmax(ref_logits[:-1])[rows, targets].sum())
        candidate_nll -= float(_log_softmax(cand_logits[:-1])[rows, targets].sum())
    if positions == 0:
        raise ValueError("the held-out text gave no chunk of 2 or more tokens; pass longer heldout_texts")
    reference_ppl = float(np.exp(reference_nll / positions))
    candidate_ppl = float(np.exp(candidate_nll / positions))
    return {
        "heldout_tokens": positions,
        "heldout_max_logits_diff": max_diff,
        "heldout_top1_agreement": agree / positions,
        "reference_ppl": reference_ppl,
        "candidate_ppl": candidate_ppl,
        "ppl_increase": (candidate_ppl - reference_ppl) / reference_ppl,
    }


def threshold_failures(result: dict, thresholds: dict, key_prefix: str) -> list[str]:
    """Return one message per threshold that `result` breaks, naming the config key to change."""
    failures = []
    checks = (
        ("max_logits_diff", result["max_logits_diff"], lambda value, limit: value <= limit),
        ("min_top1_agreement", result["heldout_top1_agreement"], lambda value, limit: value >= limit),
        ("max_ppl_increase", result["ppl_increase"], lambda value, limit: value <= limit),
        ("min_greedy_agreement", result["greedy_token_agreement"], lambda value, limit: value >= limit),
    )
    for key, value, within in checks:
        limit = thresholds.get(key)
        if limit is not None and not within(value, limit):
            failures.append(f"{key_prefix}.{key}={limit:g} but measured {value:.4g}")
    return failures


def summarize(result: dict) -> str:
    return (f"max logits diff {result['max_logits_diff']:.3g}, held-out top-1 agreement "
            f"{result['heldout_top1_agreement']:.3f}, perplexity {result['reference_ppl']:.3f} -> "
            f"{result['candidate_ppl']:.3f} ({100 * result['ppl_increase']:+.2f}%), greedy token agreement "
            f"{result['greedy_token_agreement']:.3f}")


def apply_thresholds(result: dict, thresholds: dict, kind: str, key_prefix: str = "export.parity") -> dict:
    """Add `thresholds`, `failures` and `passed` to `result` for variant kind `kind`; return it."""
    prefix = f"{key_prefix}.{kind.replace('-', '_')}"
    result["kind"] = kind
    result["thresholds"] = dict(thresholds)
    result["failures"] = threshold_failures(result, thresholds, prefix)
    result["passed"] = not result["failures"]
    level = logging.INFO if result["passed"] else logging.WARNING
    log.log(level, "%s parity vs %s: %s%s", kind, result.get("reference", "reference"), summarize(result),
            "" if result["passed"] else "; failed: " + "; ".join(result["failures"]))
    return result


def failure_message(result: dict, subject: str) -> str:
    """Build the ParityError text: the numbers, each broken threshold and the keys to relax."""
    measured = [result.get(key) for key in ("max_logits_diff", "ppl_increase", "candidate_ppl")]
    if any(isinstance(value, float) and math.isnan(value) for value in measured):
        advice = ("The variant's logits contain NaN, which no threshold accepts: look for an overflow "
                  "(fp16 range) or a broken graph.")
    else:
        advice = ("If this accuracy is acceptable, relax the named keys in the config (from Python, strict=False "
                  "keeps the output and its parity.json).")
    return (f"{subject} failed its parity check against {result.get('reference', 'the reference')}: "
            f"{'; '.join(result['failures'])}. Measured: {summarize(result)}. {advice}")


def write_parity(folder: Path, result: dict) -> None:
    write_json(Path(folder) / PARITY_FILE, result)
