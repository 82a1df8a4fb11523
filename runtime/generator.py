"""Text generation with an exported ONNX decoder, its KV cache and its tokenizer (no torch)."""

from __future__ import annotations

import json
import logging
import numbers
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from edgelm.runtime.chat_template import load_chat_template, render_chat_template
from edgelm.runtime.decoders import BufferKVCache, GQAKVCache, GQARowCaches, KVCache, left_pad, make_decoder
from edgelm.runtime.detokenize import TextStream
from edgelm.runtime.manifest import ExportManifest, read_manifest
from edgelm.runtime.sampling import SamplingSettings, apply_repetition_penalty, next_tokens
from edgelm.runtime.session import open_session, provider_name, session_device

# Keywords of from_pretrained that go on to open_session.
SESSION_OPTIONS = ("allow_spinning", "memory_arena", "optimization_level", "profile_prefix")

log = logging.getLogger(__name__)

Prompt = str | list[dict]

# KV cache slots that prefill() preallocates past the prompt when the caller gives no capacity.
DEFAULT_EXTRA_SLOTS = 256


class Generator:
    """Greedy or sampled generation from an edgelm ONNX export folder.

    Build it with `Generator.from_pretrained(export_dir)`. Text methods (`generate`, `stream`,
    `generate_batch`) take a prompt string (one user message) or a list of chat messages and
    apply the model's chat template. Token methods (`generate_ids`, `score`, `prefill`,
    `decode_step`) work on token ids and are what the benchmark and evaluation call.
    """

    def __init__(
        self,
        session: ort.InferenceSession,
        tokenizer: Tokenizer,
        manifest: ExportManifest,
        chat_template: str | None = None,
        special_tokens: dict[str, str] | None = None,
        context_length: int | None = None,
        decoder=None,
    ):
        self.session = session
        self.context_length = context_length
        self.tokenizer = tokenizer
        self.manifest = manifest
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})
        self.eos_token_ids = frozenset(manifest.eos_token_ids)
        self.pad_token_id = manifest.pad_token_id if manifest.pad_token_id is not None else manifest.eos_token_ids[0]

        if decoder is not None:
            self.device, self.decoder = "cpu", decoder
        else:
            self.device = session_device(session)
            self.decoder = make_decoder(session, manifest, self.device)
            self._check_graph_signature()

    @classmethod
    def from_pretrained(
        cls,
        export_dir: str | Path,
        providers: Sequence[str] | str | None = None,
        intra_op_threads: int | None = None,
        *,
        provider: Sequence[str] | str | None = None,
        threads: int | None = None,
        **session_options,
    ) -> Generator:
        """Load an export folder: manifest, ONNX session (CPU provider by default), tokenizer, chat template.

        `providers` (or `provider`) takes onnxruntime names or short aliases ("cpu", "cuda",
        ...), in priority order. `intra_op_threads` (or `threads`) None lets onnxruntime
        choose the thread count. Other keywords go to `open_session` (`allow_spinning`,
        `memory_arena`, `optimization_level`, `profile_prefix`).
        """
        if provider is not None:
            if providers is not None:
                raise TypeError("pass either providers or provider, not both")
            providers = provider
        if threads is not None:
            if intra_op_threads is not None:
                raise TypeError("pass either intra_op_threads or threads, not both")
            intra_op_threads = threads
        unknown = sorted(set(session_options) - set(SESSION_OPTIONS))
        if unknown:
            raise TypeError(f"from_pretrained() got unknown keyword arguments {unknown}; the session options "
                            f"are {list(SESSION_OPTIONS)}, and threads or intra_op_threads sets the thread count")
        export_dir = Path(export_dir)
        if not export_dir.is_dir():
            raise FileNotFoundError(f"export folder {export_dir} not found or not a folder; pass the folder that "
                                    f"`edgelm export` wrote (it contains edgelm_export.json and model.onnx)")
        check_static_export(export_dir, providers)
        manifest = read_manifest(export_dir)
        model_path = export_dir / manifest.model_file
        if not model_path.is_file():
            raise FileNotFoundError(f"{model_path} not found; edgelm_export.json names model_file={manifest.model_file!r}")
        tokenizer_path = export_dir / "tokenizer.json"
        if not tokenizer_path.is_file():
            raise FileNotFoundError(f"{tokenizer_path} not found; the export folder must contain the tokenizer files")

        try:
            session = open_session(model_path, providers=providers, intra_op_threads=intra_op_threads,
                                   **session_options)
        except (ValueError, FileNotFoundError):
            raise
        except Exception as error:  # onnxruntime raises its own classes (InvalidProtobuf, Fail)
            raise ValueError(f"onnxruntime could not load {model_path}: {error}; re-export the model") from error
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as error:  # tokenizers raises a plain Exception for a malformed file
            raise ValueError(f"invalid tokenizer file {tokenizer_path}: {error}") from error
        # Padding and truncation stored in tokenizer.json would change the prompt ids; the
        # generator pads batches itself.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        chat_template, special_tokens = load_chat_template(export_dir)
        return cls(session, tokenizer, manifest, chat_template, special_tokens, read_context_length(export_dir))

    def _check_graph_signature(self) -> None:
        inputs = {i.name for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        missing = self.decoder.check_signature(inputs, outputs)
        if missing:
            raise ValueError(
                f"the ONNX graph is missing inputs or outputs {missing[:4]}{' ...' if len(missing) > 4 else ''} "
                f"for kv_cache={self.manifest.kv_cache!r} and num_layers={self.manifest.num_layers} in the "
                f"manifest. Re-export the model."
            )
        unfed = sorted(inputs - self.decoder.step_inputs - set(self.decoder.past_names))
        if unfed:
            raise ValueError(
                f"the ONNX graph has inputs {unfed} that kv_cache={self.manifest.kv_cache!r} in the manifest "
                f"does not feed, so edgelm_export.json does not match the graph. Re-export the model, or set "
                f"kv_cache to the kind the graph was exported as ('dynamic', 'buffer', 'buffer-new' or 'gqa')."
            )

    # ----- prompts -----------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render chat messages with the model's template, as transformers' apply_chat_template(tokenize=False) does."""
        if self.chat_template is None:
            raise ValueError(
                "this export has no chat template (no chat_template.jinja and no chat_template in "
                "tokenizer_config.json); pass the prompt as a plain string or export an instruct model"
            )
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or not ("content" in message or "tool_calls" in message):
                raise ValueError(f"message {index} is {message!r}; each message must be a dict with 'role' and "
                                 f"'content' (or 'tool_calls')")
        return render_chat_template(self.chat_template, messages, add_generation_prompt, self.special_tokens)

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids for a prompt: a string is one user message, a list is chat messages.

        Without a chat template a string prompt is tokenized as it is, with the tokenizer's own
        special tokens (for example BOS) added.
        """
        if isinstance(prompt, str) and self.chat_template is None:
            return self.tokenizer.encode(prompt, add_special_tokens=True).ids
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if len(messages) == 0:
            raise ValueError("prompt is an empty list of messages; pass a string or at least one "
                             "{'role': ..., 'content': ...} message")
        text = self.apply_chat_template(messages, add_generation_prompt=True)
        # The template already writes the special tokens, as with transformers' tokenize=True.
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ----- model steps ----------------------------------------------------------------------------

    def prefill(self, prompt_ids: Sequence[Sequence[int]], capacity: int | None = None
                ) -> tuple[np.ndarray, KVCache | BufferKVCache | GQAKVCache | GQARowCaches]:
        """Run the prompts (left-padded to one length) and return (last-position logits [batch, vocab], cache).

        `capacity` is the number of KV cache slots to preallocate on a fixed-capacity export
        (prompt plus the tokens still to generate). None allocates the prompt plus
        DEFAULT_EXTRA_SLOTS, and the cache grows if decoding passes it. A dynamic export ignores it.
        """
        prompt_ids = _as_batch(prompt_ids)
        if any(len(ids) == 0 for ids in prompt_ids):
            raise ValueError("every prompt needs at least one token; got an empty prompt")
        length = self._check_prompt_ids(prompt_ids)
        input_ids, attention_mask, position_ids = left_pad(prompt_ids, self.pad_token_id)
        if capacity is None:
            capacity = length + DEFAULT_EXTRA_SLOTS
        return self.decoder.prefill(input_ids, attention_mask, position_ids, capacity)

    def decode_step(self, cache: KVCache | BufferKVCache | GQAKVCache | GQARowCaches, tokens: np.ndarray
                    ) -> np.ndarray:
        """Feed one token per row, update `cache` in place, and return next-token logits [batch, vocab].

        On a fixed-capacity or "gqa" export the returned array is reused by the next step; copy it to keep it.
        """
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.manifest.vocab_size):
            raise ValueError(f"token ids {tokens.tolist()} must be in [0, {self.manifest.vocab_size}), "
                             f"the export's vocab_size")
        return self.decoder.decode(cache, tokens)

    def score(self, input_ids: Sequence[int]) -> np.ndarray:
        """Return logits [seq, vocab] for one sequence in a single forward pass (for held-out loss)."""
        ids = np.asarray(input_ids, dtype=np.int64).reshape(1, -1)
        if ids.shape[1] == 0:
            raise ValueError("score() needs at least one token; got an empty sequence")
        self._check_prompt_ids([ids[0].tolist()])
        return self.decoder.score(ids)

    def _check_prompt_ids(self, prompt_ids: list[list[int]]) -> int:
        """Check every id against the vocabulary and the longest prompt against the context; return its length."""
        vocab_size = self.manifest.vocab_size
        for row, ids in enumerate(prompt_ids):
            bad = [i for i in ids if i < 0 or i >= vocab_size]
            if bad:
                raise ValueError(f"prompt {row} has token ids {bad[:5]} outside [0, {vocab_size}), the export's "
                                 f"vocab_size; encode the text with this export's tokenizer.json")
        length = max(len(ids) for ids in prompt_ids)
        if self.context_length is not None and length > self.context_length:
            raise ValueError(f"prompt has {length} tokens, more than the model's context length "
                             f"{self.context_length} (config.json max_position_embeddings); shorten the prompt")
        return length

    # ----- token generation ---------------------------------------------------------------------

    def _token_steps(
        self,
        prompt_ids: Sequence[Sequence[int]],
        max_new_tokens: int,
        settings: SamplingSettings,
        seed: int | None,
        ignore_eos: bool,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (tokens [batch], active [batch]) once per generated position.

        `active` marks the rows that the tokens belong to. It is the loop's own array: a
        caller may set `active[row] = False` to end that row (for example on a stop string).
        A row also ends after it yields an eos token, unless `ignore_eos`.
        """
        if not isinstance(max_new_tokens, numbers.Integral) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
        max_new_tokens = int(max_new_tokens)
        if seed is not None and (not isinstance(seed, numbers.Integral) or seed < 0):
            raise ValueError(f"seed={seed!r} must be a non-negative integer, or None for a random seed")
        if max_new_tokens == 0:
            return
        # Checked before the context warning below, which assumes the prompt fits.
        longest = self._check_prompt_ids(prompt_ids)
        if self.context_length is not None and longest + max_new_tokens > self.context_length:
            allowed = max(self.context_length - longest, 1)
            log.warning("max_new_tokens=%d would pass the context length %d after a %d-token prompt; "
                        "generating at most %d tokens", max_new_tokens, self.context_length, longest, allowed)
            max_new_tokens = allowed
        rng = np.random.default_rng(seed)
        eos = np.array(sorted(self.eos_token_ids), dtype=np.int64)
        seen = None
        if settings.repetition_penalty != 1.0:
            # seen[row, token]: the token is in the row's prompt or output, as transformers counts it.
            seen = np.zeros((len(prompt_ids), self.manifest.vocab_size), dtype=bool)
            for row, ids in enumerate(prompt_ids):
                seen[row, ids] = True

        logits, cache = self.prefill(prompt_ids, capacity=longest + max_new_tokens)
        active = np.ones(len(prompt_ids), dtype=bool)
        for step in range(max_new_tokens):
            if seen is not None:
                logits = apply_repetition_penalty(logits, seen, settings.repetition_penalty)
            tokens = next_tokens(logits, settings, rng)
            if seen is not None:
                seen[np.arange(len(tokens)), tokens] = True
            tokens[~active] = self.pad_token_id
            yield tokens, active

            if not ignore_eos:
                active &= ~np.isin(tokens, eos)
            if not active.any() or step == max_new_tokens - 1:
                return
            # Sampled tokens are in range, so the loop skips decode_step's input check.
            logits = self.decoder.decode(cache, tokens)

    def generate_ids(
        self,
        prompt_ids: Sequence[int] | Sequence[Sequence[int]],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        ignore_eos: bool = False,
        repetition_penalty: float = 1.0,
        on_token: Callable[[int, int], None] | None = None,
    ) -> list[list[int]]:
        """Generate new token ids for one prompt or a batch (left-padded); return one list per prompt.

        Each list ends with the eos token when the model produced one. `on_token(row, token_id)`
        is called for every new token as it is chosen. `ignore_eos` generates exactly
        `max_new_tokens` tokens, which the benchmark uses.
        """
        batch = _as_batch(prompt_ids)
        settings = SamplingSettings(temperature, top_k, top_p, repetition_penalty)
        outputs: list[list[int]] = [[] for _ in batch]
        for tokens, active in self._token_steps(batch, max_new_tokens, settings, seed, ignore_eos):
            for row in np.flatnonzero(active):
                token = int(tokens[row])
                outputs[row].append(token)
                if on_token is not None:
                    on_token(int(row), token)
        return outputs

    # ----- text generation ----------------------------------------------------------------------

    def stream(
        self,
        prompt: Prompt,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        repetition_penalty: float = 1.0,
    ) -> Iterator[str]:
        """Yield text pieces as tokens are decoded; stop at end of turn (eos) or a stop string.

        The text leaves out eos tokens, other special tokens and the stop string.
        `repetition_penalty` > 1 divides positive logits and multiplies negative ones of every
        token already in the prompt or the reply, as transformers does; 1.0 turns it off.
        """
        settings = SamplingSettings(temperature, top_k, top_p, repetition_penalty)
        ids = self.encode_prompt(prompt)
        text = TextStream(self.tokenizer, stop)
        for tokens, active in self._token_steps([ids], max_new_tokens, settings, seed, ignore_eos=False):
            if int(tokens[0]) in self.eos_token_ids:
                break  # an end-of-turn token need not be marked special, so keep it out of the text
            piece = text.push(int(tokens[0]))
            if piece:
                yield piece
            if text.stopped:
                active[0] = False
        tail = text.finish()
        if tail:
            yield tail

    def generate(
        self,
        prompt: Prompt,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        repetition_penalty: float = 1.0,
    ) -> str:
        """Return the reply text for one prompt; see `stream` for the arguments."""
        return "".join(self.stream(prompt, max_new_tokens, temperature, top_k, top_p, seed, stop, repetition_penalty))

    def generate_batch(
        self,
        prompts: Sequence[Prompt],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        repetition_penalty: float = 1.0,
    ) -> list[str]:
        """Return one reply per prompt, generated together in one left-padded batch."""
        if isinstance(prompts, str) or not prompts:
            raise TypeError("generate_batch takes a non-empty list of prompts; use generate() for one prompt")
        settings = SamplingSettings(temperature, top_k, top_p, repetition_penalty)
        batch = [self.encode_prompt(p) for p in prompts]
        texts = [TextStream(self.tokenizer, stop) for _ in batch]
        pieces: list[list[str]] = [[] for _ in batch]
        for tokens, active in self._token_steps(batch, max_new_tokens, settings, seed, ignore_eos=False):
            for row in np.flatnonzero(active):
                if int(tokens[row]) in self.eos_token_ids:
                    continue  # the loop ends this row after the eos token
                pieces[row].append(texts[row].push(int(tokens[row])))
                if texts[row].stopped:
                    active[row] = False
        return ["".join(p) + t.finish() for p, t in zip(pieces, texts)]


def _as_batch(prompt_ids: Sequence[int] | Sequence[Sequence[int]]) -> list[list[int]]:
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids is empty; pass token ids for at least one prompt")
    if isinstance(prompt_ids[0], (int, np.integer)):
        return [[int(i) for i in prompt_ids]]
    return [[int(i) for i in ids] for ids in prompt_ids]


def read_context_length(export_dir: Path) -> int | None:
    """Return max_position_embeddings from the export's config.json, or None when it is not there."""
    path = Path(export_dir) / "config.json"
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("max_position_embeddings")
    except json.JSONDecodeError:
        return None
    return int(value) if isinstance(value, int) and value > 0 else None


def check_static_export(export_dir: Path, providers) -> None:
    """Raise a clear error for a static Ascend export, or for CANN on a dynamic one.

    CANN compiles a graph for each new input shape, so it is only usable on the static
    Ascend variant, and that variant has its own two-graph layout (see static.py).
    """
    from edgelm.runtime.static import ASCEND_FORMAT, is_static_export

    entries = [providers] if isinstance(providers, (str, tuple)) else list(providers or [])
    wants_cann = any(provider_name(entry).lower() in ("cann", "cannexecutionprovider") for entry in entries)
    if is_static_export(export_dir):
        raise ValueError(
            f"{export_dir} is a static Ascend export ({ASCEND_FORMAT}); load it with "
            f"edgelm.runtime.StaticGenerator.from_pretrained, not Generator"
        )
    if wants_cann:
        raise ValueError(
            "the CANN execution provider recompiles the graph for every new input shape, so the runtime "
            "uses it only on the static Ascend export; export one with edgelm.export.ascend and load it "
            "with edgelm.runtime.StaticGenerator"
        )
