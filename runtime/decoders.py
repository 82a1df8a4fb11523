"""Prefill and decode steps over the ONNX decoder interfaces, each with its own KV cache.

DynamicDecoder drives the graph of onnx_export.py, which concatenates past and new keys inside
the graph. BufferDecoder drives the fixed-capacity graph of kv_buffer.py: the cache is a
preallocated buffer per layer, bound to the session with I/O binding, so a decode step
allocates nothing and copies only the new keys and values. GQADecoder drives the fused graph of
fused_graph.py, whose GroupQueryAttention appends to the same kind of buffer in place.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from edgelm.runtime.manifest import ExportManifest

log = logging.getLogger(__name__)

# Manifest values of `kv_cache` and the decoder class for each.
DYNAMIC = "dynamic"
BUFFER = "buffer"
BUFFER_NEW = "buffer-new"
GQA = "gqa"


def past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{layer}.{kind}" for layer in range(num_layers) for kind in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{layer}.{kind}" for layer in range(num_layers) for kind in ("key", "value")]


def left_pad(prompt_ids, pad_token_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return input_ids, attention_mask and position_ids [batch, length] of a left-padded batch."""
    batch = len(prompt_ids)
    length = max(len(ids) for ids in prompt_ids)
    input_ids = np.full((batch, length), pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((batch, length), dtype=np.int64)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, length - len(ids):] = ids
        attention_mask[row, length - len(ids):] = 1
    position_ids = np.clip(np.cumsum(attention_mask, axis=1) - 1, 0, None)
    return input_ids, attention_mask, position_ids


@dataclass
class KVCache:
    """Decoding state of the dynamic graph: past keys and values, attention mask and next position ids."""

    past: dict[str, np.ndarray | ort.OrtValue]  # ONNX input name -> [batch, kv_heads, past_seq, head_dim]
    attention_mask: np.ndarray  # int64 [batch, past_seq]; zeros mark left padding
    next_positions: np.ndarray  # int64 [batch]; position id of the next token per row

    @property
    def length(self) -> int:
        return self.attention_mask.shape[1]


class DynamicDecoder:
    """Steps of the dynamic graph, whose present outputs are past plus the new tokens.

    Present outputs stay onnxruntime-owned OrtValues and are bound as the next step's past
    inputs, which saves converting every layer's cache to numpy and back. The graph still
    copies the whole cache into a new buffer at each step.
    """

    kind = DYNAMIC
    # Graph inputs this decoder binds besides the cache. A graph with any other input is rejected at load.
    step_inputs = frozenset({"input_ids", "attention_mask", "position_ids"})

    def __init__(self, session: ort.InferenceSession, manifest: ExportManifest, device: str = "cpu"):
        self.session = session
        self.manifest = manifest
        self.device = device
        self.past_names = past_names(manifest.num_layers)
        self.present_names = present_names(manifest.num_layers)
        self.has_position_ids = "position_ids" in {i.name for i in session.get_inputs()}

    def check_signature(self, input_names: set[str], output_names: set[str]) -> list[str]:
        missing = sorted({"input_ids", "attention_mask", *self.past_names} - input_names)
        return missing + sorted({"logits", *self.present_names} - output_names)

    def _run(self, input_ids, attention_mask, position_ids, past: dict) -> tuple[np.ndarray, dict]:
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("attention_mask", attention_mask)
        if self.has_position_ids:
            binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids))
        for name, value in past.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        logits = outputs[0].numpy()
        return logits, dict(zip(self.past_names, outputs[1:]))

    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        shape = (batch, self.manifest.num_kv_heads, 0, self.manifest.head_dim)
        empty = np.zeros(shape, dtype=self.manifest.kv_numpy_dtype)
        return {name: empty for name in self.past_names}

    def prefill(self, input_ids, attention_mask, position_ids, capacity: int) -> tuple[np.ndarray, KVCache]:
        del capacity  # the dynamic cache grows by one slot per step
        logits, past = self._run(input_ids, attention_mask, position_ids, self._empty_past(input_ids.shape[0]))
        cache = KVCache(past=past, attention_mask=attention_mask, next_positions=attention_mask.sum(axis=1))
        return logits[:, -1, :], cache

    def decode(self, cache: KVCache, tokens: np.ndarray) -> np.ndarray:
        batch = cache.attention_mask.shape[0]
        input_ids = np.asarray(tokens, dtype=np.int64).reshape(batch, 1)
        cache.attention_mask = np.concatenate([cache.attention_mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        position_ids = cache.next_positions.reshape(batch, 1)
        logits, cache.past = self._run(input_ids, cache.attention_mask, position_ids, cache.past)
        cache.next_positions = cache.next_positions + 1
        return logits[:, -1, :]

    def score(self, input_ids: np.ndarray) -> np.ndarray:
        mask = np.ones_like(input_ids)
        positions = np.arange(input_ids.shape[1], dtype=np.int64).reshape(1, -1)
        return self._run(input_ids, mask, positions, self._empty_past(1))[0][0]


@dataclass
class BufferKVCache:
    """Decoding state of the fixed-capacity graph.

    `past` contains one zero-initialised buffer per layer and kind, [batch, kv_heads, capacity,
    head_dim]. Slots below `length` are filled. `values` wraps the same memory as OrtValues
    (on the CPU) or contains device copies (on other providers).
    """

    past: dict[str, np.ndarray]
    values: dict[str, ort.OrtValue]
    attention_mask: np.ndarray  # int64 [batch, capacity]; 1 marks a filled slot of that row
    next_positions: np.ndarray  # int64 [batch]
    length: int
    binding: ort.IOBinding | None = None  # decode binding, built on the first decode step
    step_ids: np.ndarray | None = None  # int64 [batch, 1], bound once and overwritten per step
    step_positions: np.ndarray | None = None  # int64 [batch, 1]
    step_slot: np.ndarray | None = None  # int64 [1]
    step_logits: np.ndarray | None = None  # float32 [batch, 1, vocab]

    @property
    def capacity(self) -> int:
        return self.attention_mask.shape[1]


class BufferDecoder:
    """Steps of the fixed-capacity graph (`kv_cache` "buffer" or "buffer-new" in the manifest).

    With "buffer", each present output is bound to the OrtValue of its past input. The
    graph's ScatterElements then gets the same pointer as input and output, and
    onnxruntime's CPU kernel skips its input-to-output copy, so only the new slots are
    written. This was checked in onnxruntime 1.32: decode time does not grow with capacity
    and the logits match. With "buffer-new", the graph returns only the new keys and values and this class
    copies them into the buffer.
    """

    step_inputs = frozenset({"input_ids", "position_ids", "attention_mask", "cache_position", "logits_to_keep"})

    def __init__(self, session: ort.InferenceSession, manifest: ExportManifest, device: str = "cpu"):
        kind = manifest.kv_cache
        if kind not in (BUFFER, BUFFER_NEW):
            raise ValueError(f"BufferDecoder needs kv_cache 'buffer' or 'buffer-new', got {kind!r}")
        if kind == BUFFER_NEW and device != "cpu":
            raise ValueError(
                f"kv_cache 'buffer-new' places new keys from numpy, so it runs on the CPU provider only, "
                f"not on {device!r}; export with export_kv_buffer(layout='buffer') for this provider"
            )
        self.kind = kind
        self.session = session
        self.manifest = manifest
        self.device = device
        self.past_names = past_names(manifest.num_layers)
        self.present_names = present_names(manifest.num_layers)
        self.vocab_size = manifest.vocab_size

    def check_signature(self, input_names: set[str], output_names: set[str]) -> list[str]:
        required = {"input_ids", "position_ids", "attention_mask", "cache_position", "logits_to_keep", *self.past_names}
        return sorted(required - input_names) + sorted({"logits", *self.present_names} - output_names)

    def new_cache(self, batch: int, capacity: int) -> BufferKVCache:
        shape = (batch, self.manifest.num_kv_heads, capacity, self.manifest.head_dim)
        dtype = self.manifest.kv_numpy_dtype
        # Masked slots still enter the attention matmul with weight 0, so they must hold finite
        # numbers: np.zeros, never np.empty.
        past = {name: np.zeros(shape, dtype=dtype) for name in self.past_names}
        if self.device == "cpu":
            values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in past.items()}
        else:
            values = {name: ort.OrtValue.ortvalue_from_numpy(array, self.device, 0) for name, array in past.items()}
            past = {}  # the device copies are the cache; host buffers would only cost memory
        return BufferKVCache(past=past, values=values, attention_mask=np.zeros((batch, capacity), dtype=np.int64),
                             next_positions=np.zeros(batch, dtype=np.int64), length=0)

    def _bind_cache(self, binding: ort.IOBinding, cache: BufferKVCache) -> None:
        for past_name, present_name in zip(self.past_names, self.present_names):
            binding.bind_ortvalue_input(past_name, cache.values[past_name])
            if self.kind == BUFFER:
                binding.bind_ortvalue_output(present_name, cache.values[past_name])
            else:
                binding.bind_output(present_name, "cpu")

    def _place_new(self, binding: ort.IOBinding, cache: BufferKVCache, start: int, end: int) -> None:
        if self.kind != BUFFER_NEW:
            return
        for name, value in zip(self.past_names, binding.get_outputs()[1:]):
            cache.past[name][:, :, start:end] = value.numpy()

    def _grow(self, cache: BufferKVCache, needed: int) -> None:
        """Reallocate the buffers with at least `needed` slots, keeping the filled ones."""
        if self.device != "cpu":
            raise ValueError(f"the KV cache of {cache.capacity} slots is full on device {self.device!r}; "
                             f"pass a larger capacity to prefill()")
        capacity = max(needed, 2 * cache.capacity)
        bigger = self.new_cache(cache.attention_mask.shape[0], capacity)
        for name in self.past_names:
            bigger.past[name][:, :, : cache.length] = cache.past[name][:, :, : cache.length]
        bigger.attention_mask[:, : cache.capacity] = cache.attention_mask
        cache.past, cache.values, cache.attention_mask = bigger.past, bigger.values, bigger.attention_mask
        cache.binding = None

    def prefill(self, input_ids, attention_mask, position_ids, capacity: int) -> tuple[np.ndarray, BufferKVCache]:
        batch, length = input_ids.shape
        cache = self.new_cache(batch, max(capacity, length))
        cache.attention_mask[:, :length] = attention_mask
        logits = self._run_chunk(cache, input_ids, position_ids, logits_to_keep=1)
        cache.next_positions = attention_mask.sum(axis=1)
        return logits[:, -1, :], cache

    def _run_chunk(self, cache: BufferKVCache, input_ids, position_ids, logits_to_keep: int) -> np.ndarray:
        """Run `input_ids` into slots cache.length onward with a one-off binding; return logits."""
        start, end = cache.length, cache.length + input_ids.shape[1]
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", cache.attention_mask)
        binding.bind_cpu_input("cache_position", np.arange(start, end, dtype=np.int64))
        binding.bind_cpu_input("logits_to_keep", np.array([logits_to_keep], dtype=np.int64))
        # get_outputs() returns outputs in binding order, so logits go first.
        binding.bind_output("logits", "cpu")
        self._bind_cache(binding, cache)
        self.session.run_with_iobinding(binding)
        logits = binding.get_outputs()[0].numpy()
        self._place_new(binding, cache, start, end)
        cache.length = end
        return logits

    def _bind_step(self, cache: BufferKVCache) -> ort.IOBinding:
        """Bind the step inputs, the cache and the logits output of one decode step.

        On the CPU the input OrtValues share memory with the numpy arrays in `cache`, so the
        binding is built once and later steps only overwrite the arrays. Other devices copy
        host inputs at bind time, so they rebind every step.
        """
        if cache.step_ids is None:
            batch = cache.attention_mask.shape[0]
            cache.step_ids = np.zeros((batch, 1), dtype=np.int64)
            cache.step_positions = np.zeros((batch, 1), dtype=np.int64)
            cache.step_slot = np.zeros(1, dtype=np.int64)
            cache.step_logits = np.zeros((batch, 1, self.vocab_size), dtype=np.float32)
        binding = self.session.io_binding()
        for name, array in (("input_ids", cache.step_ids), ("position_ids", cache.step_positions),
                            ("attention_mask", cache.attention_mask), ("cache_position", cache.step_slot),
                            ("logits_to_keep", np.ones(1, dtype=np.int64))):
            if self.device == "cpu":
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
            else:
                binding.bind_cpu_input(name, array)
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(cache.step_logits))
        self._bind_cache(binding, cache)
        return binding

    def decode(self, cache: BufferKVCache, tokens: np.ndarray) -> np.ndarray:
        if cache.length >= cache.capacity:
            self._grow(cache, cache.length + 1)
        if cache.binding is None:
            cache.binding = self._bind_step(cache)
        slot = cache.length
        cache.attention_mask[:, slot] = 1
        cache.step_ids[:, 0] = tokens
        cache.step_positions[:, 0] = cache.next_positions
        cache.step_slot[0] = slot
        if self.device != "cpu":
            cache.binding = self._bind_step(cache)
        self.session.run_with_iobinding(cache.binding)
        self._place_new(cache.binding, cache, slot, slot + 1)
        cache.length = slot + 1
        cache.next_positions = cache.next_positions + 1
        return cache.step_logits[:, -1, :]

    def score(self, input_ids: np.ndarray) -> np.ndarray:
        length = input_ids.shape[1]
        cache = self.new_cache(1, length)
        cache.attention_mask[:, :] = 1
        positions = np.arange(length, dtype=np.int64).reshape(1, -1)
        return self._run_chunk(cache, input_ids, positions, logits_to_keep=length)[0]


@dataclass
class GQAKVCache:
    """Decoding state of one row of the fused GroupQueryAttention graph.

    `past` contains one zero-initialised buffer per layer and kind, [1, kv_heads, capacity,
    head_dim], and `values` wraps the same memory as OrtValues. The decode binding, the
    step input and the logits output are built once, so a decode step allocates nothing.
    """

    past: dict[str, np.ndarray]
    values: dict[str, ort.OrtValue]
    attention_mask: np.ndarray  # int64 [1, capacity]; ones for the filled slots, then zeros
    length: int = 0
    binding: ort.IOBinding | None = None
    step_ids: np.ndarray = field(default_factory=lambda: np.zeros((1, 1), dtype=np.int64))
    step_logits: np.ndarray | None = None  # float32 [1, 1, vocab], the decode output
    step_view: np.ndarray | None = None  # step_logits[:, -1, :], returned by every decode step

    @property
    def capacity(self) -> int:
        return self.attention_mask.shape[1]


@dataclass
class GQARowCaches:
    """Batch state of the fused graph: one batch-1 cache per row, run one after another."""

    rows: list[GQAKVCache]
    logits: np.ndarray  # float32 [batch, vocab], overwritten by each decode step


class GQADecoder:
    """Steps of the fused GroupQueryAttention graph (`kv_cache` "gqa", export/fused_graph.py).

    Each present output is bound to the OrtValue of its past input. GroupQueryAttention's CPU
    kernel then gets the same pointer and appends the new keys and values in place (checked
    with onnxruntime 1.32 by tests/test_fused_graph.py). The attention mask is `capacity`
    slots long, ones then zeros, and the graph reads each row's length from its sum, so the
    decode binding never changes shape and is built once per cache.

    The graph has no position ids: a token's rotary position is its slot. A left-padded
    batch would therefore get wrong positions, so a batch of more than one prompt runs as
    separate batch-1 caches, one row after another.

    A prompt runs through the graph `prefill_chunk` tokens at a time (None: all at once).
    The activations then stay the size of one chunk whatever the prompt length. On the
    30-layer SmolLM2 int4, a 128-token prompt in chunks of 64 peaked about 5 MB lower, with
    time to first token within 3% (onnxruntime 1.32, 2 cores).

    NOTE: with int4 MatMulNBits at accuracy level 4 the logits depend on the chunk size
    (up to 0.7 apart on SmolLM2 int4), because the kernel path depends on the row count.
    """

    kind = GQA
    step_inputs = frozenset({"input_ids", "attention_mask", "logits_to_keep"})
    prefill_chunk: int | None = 64

    def __init__(self, session: ort.InferenceSession, manifest: ExportManifest, device: str = "cpu"):
        if device != "cpu":
            raise ValueError(
                f"kv_cache 'gqa' runs on the CPU provider only, not on {device!r}: its fp32 "
                f"GroupQueryAttention has no kernel on GPU providers; use an export_kv_buffer folder there"
            )
        self.session = session
        self.manifest = manifest
        self.device = device
        self.past_names = past_names(manifest.num_layers)
        self.present_names = present_names(manifest.num_layers)
        self.vocab_size = manifest.vocab_size
        self.keep_one = np.ones(1, dtype=np.int64)
        self._warned_batch = False

    def check_signature(self, input_names: set[str], output_names: set[str]) -> list[str]:
        required = {"input_ids", "attention_mask", "logits_to_keep", *self.past_names}
        return sorted(required - input_names) + sorted({"logits", *self.present_names} - output_names)

    def new_cache(self, capacity: int) -> GQAKVCache:
        shape = (1, self.manifest.num_kv_heads, capacity, self.manifest.head_dim)
        dtype = self.manifest.kv_numpy_dtype
        past = {name: np.zeros(shape, dtype=dtype) for name in self.past_names}
        values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in past.items()}
        return GQAKVCache(past=past, values=values, attention_mask=np.zeros((1, capacity), dtype=np.int64))

    def _bind_cache(self, binding: ort.IOBinding, cache: GQAKVCache) -> None:
        for past_name, present_name in zip(self.past_names, self.present_names):
            value = cache.values[past_name]
            binding.bind_ortvalue_input(past_name, value)
            binding.bind_ortvalue_output(present_name, value)

    def _run_chunk(self, cache: GQAKVCache, input_ids: np.ndarray, logits_to_keep: int) -> np.ndarray:
        """Run `input_ids` [1, seq] into slots cache.length onward with a one-off binding; return logits."""
        start, end = cache.length, cache.length + input_ids.shape[1]
        cache.attention_mask[0, start:end] = 1
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", cache.attention_mask)
        binding.bind_cpu_input("logits_to_keep", np.array([logits_to_keep], dtype=np.int64))
        binding.bind_output("logits", "cpu")
        self._bind_cache(binding, cache)
        self.session.run_with_iobinding(binding)
        cache.length = end
        return binding.get_outputs()[0].numpy()

    def _prefill_row(self, ids: np.ndarray, capacity: int) -> tuple[np.ndarray, GQAKVCache]:
        ids = ids.reshape(1, -1)
        cache = self.new_cache(max(capacity, ids.shape[1]))
        chunk = ids.shape[1] if self.prefill_chunk is None else self.prefill_chunk
        if chunk < 1:
            raise ValueError(f"prefill_chunk={self.prefill_chunk} must be at least 1, or None for the whole prompt")
        for start in range(0, ids.shape[1], chunk):
            logits = self._run_chunk(cache, ids[:, start : start + chunk], logits_to_keep=1)
        return logits[:, -1, :], cache

    def prefill(self, input_ids, attention_mask, position_ids, capacity: int
                ) -> tuple[np.ndarray, GQAKVCache | GQARowCaches]:
        del position_ids  # the graph takes each token's position from its slot
        if input_ids.shape[0] == 1:
            return self._prefill_row(input_ids[:, attention_mask[0] > 0], capacity)
        if not self._warned_batch:
            log.info("kv_cache 'gqa' runs a batch of %d prompts as %d batch-1 caches, one after another",
                     input_ids.shape[0], input_ids.shape[0])
            self._warned_batch = True
        rows, logits = [], []
        for row in range(input_ids.shape[0]):
            row_logits, cache = self._prefill_row(input_ids[row:row + 1, attention_mask[row] > 0], capacity)
            rows.append(cache)
            logits.append(row_logits[0])
        return np.stack(logits), GQARowCaches(rows=rows, logits=np.stack(logits))

    def _grow(self, cache: GQAKVCache, needed: int) -> None:
        """Reallocate the buffers with at least `needed` slots, keeping the filled ones."""
        bigger = self.new_cache(max(needed, 2 * cache.capacity))
        for name in self.past_names:
            bigger.past[name][:, :, : cache.length] = cache.past[name][:, :, : cache.length]
        bigger.attention_mask[:, : cache.length] = 1
        cache.past, cache.values, cache.attention_mask = bigger.past, bigger.values, bigger.attention_mask
        cache.binding = None

    def _bind_step(self, cache: GQAKVCache) -> ort.IOBinding:
        """Bind the step input, the mask, the cache and the logits output of every decode step of `cache`.

        The input OrtValues share memory with the numpy arrays in `cache`, so later steps
        only overwrite those arrays.
        """
        if cache.step_logits is None:
            cache.step_logits = np.zeros((1, 1, self.vocab_size), dtype=np.float32)
            cache.step_view = cache.step_logits[:, -1, :]
        binding = self.session.io_binding()
        binding.bind_ortvalue_input("input_ids", ort.OrtValue.ortvalue_from_numpy(cache.step_ids))
        binding.bind_ortvalue_input("attention_mask", ort.OrtValue.ortvalue_from_numpy(cache.attention_mask))
        binding.bind_ortvalue_input("logits_to_keep", ort.OrtValue.ortvalue_from_numpy(self.keep_one))
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(cache.step_logits))
        self._bind_cache(binding, cache)
        return binding

    def _decode_row(self, cache: GQAKVCache, token) -> np.ndarray:
        if cache.length >= cache.capacity:
            self._grow(cache, cache.length + 1)
        if cache.binding is None:
            cache.binding = self._bind_step(cache)
        cache.step_ids[0, 0] = token
        cache.attention_mask[0, cache.length] = 1
        self.session.run_with_iobinding(cache.binding)
        cache.length += 1
        return cache.step_view

    def decode(self, cache: GQAKVCache | GQARowCaches, tokens: np.ndarray) -> np.ndarray:
        if isinstance(cache, GQAKVCache):
            return self._decode_row(cache, tokens[0])
        for row, row_cache in enumerate(cache.rows):
            cache.logits[row] = self._decode_row(row_cache, tokens[row])[0]
        return cache.logits

    def score(self, input_ids: np.ndarray) -> np.ndarray:
        length = input_ids.shape[1]
        return self._run_chunk(self.new_cache(length), input_ids, logits_to_keep=length)[0]


def make_decoder(session: ort.InferenceSession, manifest: ExportManifest, device: str = "cpu"):
    """Return the decoder for the manifest's `kv_cache` kind."""
    if manifest.kv_cache == DYNAMIC:
        return DynamicDecoder(session, manifest, device)
    if manifest.kv_cache == GQA:
        return GQADecoder(session, manifest, device)
    return BufferDecoder(session, manifest, device)
