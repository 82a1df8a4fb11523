"""Incremental detokenization and stop-string handling for streamed text."""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDecoder:
    """Turn token ids into text pieces as they arrive.

    Byte-level tokenizers can split one UTF-8 character over several tokens, so text that ends
    in U+FFFD (an incomplete character) is held back until the next token completes it.
    Decoding a window that starts a few tokens back, rather than each token alone, keeps the
    spaces that SentencePiece-style decoders drop at the start of a decoded sequence.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the window that gives context to the next piece
        self._read_offset = 0  # tokens before this offset have been emitted as text

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=self._skip_special)

    def push(self, token_id: int) -> str:
        """Add one token; return the new complete text (may be empty)."""
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        if len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT_CHAR):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full_text[len(prefix_text) :]

    def flush(self) -> str:
        """Return text still held back at the end of generation, incomplete characters included."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return full_text[len(prefix_text) :]


class StopStringFilter:
    """Pass streamed text through until a stop string appears; the stop string itself is dropped.

    Text that could be the start of a stop string is held back, so no piece already returned
    can turn out to belong to a stop string.
    """

    def __init__(self, stop: Sequence[str] | str | None):
        if isinstance(stop, str):
            stop = [stop]  # one stop string, not a sequence of one-character stops
        self._stops = [s for s in (stop or []) if s]
        self._pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Add decoded text; return the part that is safe to emit."""
        if self.stopped:
            return ""
        self._pending += text
        if not self._stops:
            out, self._pending = self._pending, ""
            return out

        cut = min((i for i in (self._pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self._pending = self._pending[:cut], ""
            return out

        hold = self._longest_stop_prefix_suffix()
        out = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(out) :]
        return out

    def flush(self) -> str:
        """Return held-back text at the end of generation (it did not complete a stop string)."""
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out

    def _longest_stop_prefix_suffix(self) -> int:
        # Length of the longest tail of the pending text that is a proper prefix of a stop string.
        longest = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(self._pending)), longest, -1):
                if self._pending.endswith(stop[:length]):
                    longest = length
                    break
        return longest


class TextStream:
    """Incremental decoder plus stop-string filter for one sequence."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] | None = None):
        self._decoder = IncrementalDecoder(tokenizer)
        self._filter = StopStringFilter(stop)

    @property
    def stopped(self) -> bool:
        return self._filter.stopped

    def push(self, token_id: int) -> str:
        return self._filter.push(self._decoder.push(token_id))

    def finish(self) -> str:
        return self._filter.push(self._decoder.flush()) + self._filter.flush()
