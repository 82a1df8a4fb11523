"""Choose the next token from logits: greedy, or sampling with temperature, top-k and top-p."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingSettings:
    """Decoding settings; temperature 0 means greedy (argmax), top_k 0, top_p 1.0 and
    repetition_penalty 1.0 turn those off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature={self.temperature} must be finite and >= 0 (0 = greedy)")
        if not isinstance(self.top_k, numbers.Integral) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 0 (0 = no top-k filter)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1.0 = no top-p filter)")
        if not 0 < self.repetition_penalty < float("inf"):
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0 (1.0 = no penalty)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """Return a copy of `logits` [batch, vocab] with the tokens marked in `seen` penalized.

    A positive logit is divided by `penalty` and a negative one multiplied, as in
    transformers' RepetitionPenaltyLogitsProcessor, so the token always becomes less likely
    for penalty > 1.
    """
    penalized = np.where(logits > 0, logits / penalty, logits * penalty)
    return np.where(seen, penalized, logits).astype(logits.dtype, copy=False)


def next_tokens(logits: np.ndarray, settings: SamplingSettings, rng: np.random.Generator) -> np.ndarray:
    """Pick one token per row of `logits` [batch, vocab]; return int64 ids [batch]."""
    if settings.greedy:
        return logits.argmax(axis=-1).astype(np.int64)
    return np.array([_sample_row(row, settings, rng) for row in logits], dtype=np.int64)


def _sample_row(logits: np.ndarray, settings: SamplingSettings, rng: np.random.Generator) -> int:
    scaled = logits.astype(np.float64) / settings.temperature
    vocab = scaled.shape[-1]

    # Candidates sorted by descending logit; a stable sort keeps ties in vocabulary order, so a
    # given seed always picks the same token.
    order = np.argsort(-scaled, kind="stable")
    if 0 < settings.top_k < vocab:
        order = order[: settings.top_k]
    candidate_logits = scaled[order]

    probs = np.exp(candidate_logits - candidate_logits[0])
    probs /= probs.sum()

    if settings.top_p < 1.0:
        # Keep the smallest prefix whose probability mass reaches top_p; the first token always stays.
        cumulative = np.cumsum(probs)
        keep = int(np.searchsorted(cumulative, settings.top_p) + 1)
        probs = probs[:keep] / probs[:keep].sum()
        order = order[:keep]

    return int(order[rng.choice(len(probs), p=probs)])
