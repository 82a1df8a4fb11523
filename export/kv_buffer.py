"""Export a Llama-family decoder whose KV cache is a preallocated buffer updated in place.

The dynamic export (onnx_export.py) concatenates past and new keys inside the graph, so every
decode step allocates and copies the whole cache. The graph written here takes the cache as a
buffer of fixed capacity and writes the new keys and values at `cache_position`:

  inputs   input_ids [batch, seq], position_ids [batch, seq],
           attention_mask [batch, capacity] (1 = slot contains a token of this row, new ones included),
           cache_position [seq] (buffer slot of each new token, the same for every row),
           logits_to_keep [1] (number of last positions whose logits are computed),
           past_key_values.{i}.key / .value [batch, num_kv_heads, capacity, head_dim]
  outputs  logits [batch, logits_to_keep, vocab], and present.{i}.key / .value

Two output layouts, recorded in the manifest as `kv_cache`:

- "buffer": present.* is the updated buffer [batch, num_kv_heads, capacity, head_dim]. The
  runtime binds each present output to the OrtValue of its past input, so onnxruntime's
  scatter kernel gets the same pointer for input and output and writes only the new slots.
- "buffer-new": present.* is only the new keys and values [batch, num_kv_heads, seq, head_dim].
  Attention scores over the old slots and over the new tokens are computed apart and joined
  before the softmax, and the runtime copies the new keys and values into its buffer.

The capacity axis is dynamic, so the runtime sizes the buffer per request (prompt plus new
tokens) and prefill attends over that many slots only. Slots past the written ones are masked.

The forward pass is written here on top of the Hugging Face modules (projections, norms,
rotary embedding), so it supports the families that share Llama's layer layout: llama,
mistral (without sliding window), qwen2 and qwen3 are listed in SUPPORTED_MODEL_TYPES.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from edgelm.export.onnx_export import (
    MANIFEST_NAME,
    MODEL_FILE,
    ModelGeometry,
    ParityError,
    build_manifest,
    copy_model_files,
    graph_opset,
    load_for_export,
    model_size_bytes,
    parity_prompts,
)
from edgelm.files import atomic_dir, write_json

log = logging.getLogger(__name__)

KV_LAYOUTS = ("buffer", "buffer-new")
WRITE_MODES = ("scatter", "onehot")
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def input_names(num_layers: int) -> list[str]:
    return ["input_ids", "position_ids", "attention_mask", "cache_position", "logits_to_keep", *past_names(num_layers)]


class BufferDecoder(torch.nn.Module):
    """Llama-style forward pass over a fixed-capacity KV cache buffer; see the module docstring."""

    def __init__(self, model, layout: str = "buffer", write: str = "scatter"):
        super().__init__()
        if layout not in KV_LAYOUTS:
            raise ValueError(f"layout={layout!r} is not supported; use one of {KV_LAYOUTS}")
        if write not in WRITE_MODES:
            raise ValueError(f"write={write!r} is not supported; use one of {WRITE_MODES}")
        config = model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {config.model_type!r} has no fixed-capacity KV cache export (supported: "
                f"{SUPPORTED_MODEL_TYPES}); use edgelm.export.onnx_export.export_onnx for the dynamic graph"
            )
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) \
                and config.model_type == "mistral":
            raise ValueError("sliding-window attention is not supported by the fixed-capacity export; "
                             "use export_onnx for the dynamic graph")
        self.model = model
        self.layout = layout
        self.write = write
        self.geometry = ModelGeometry.from_config(config)
        self.num_heads = config.num_attention_heads
        self.groups = self.num_heads // self.geometry.num_kv_heads
        self.scale = getattr(model.model.layers[0].self_attn, "scaling", 1.0 / math.sqrt(self.geometry.head_dim))

    def forward(self, input_ids, position_ids, attention_mask, cache_position, logits_to_keep, *past):
        inner = self.model.model
        hidden = inner.embed_tokens(input_ids)
        cos, sin = inner.rotary_emb(hidden, position_ids)  # [batch, seq, head_dim]

        capacity = past[0].shape[2]
        slots = torch.arange(capacity, dtype=torch.int64)
        # allowed[b, i, j]: query i of row b may attend to slot j (the row's own tokens, causally).
        causal = slots[None, :] <= cache_position[:, None]  # [seq, capacity]
        allowed = (attention_mask[:, None, :] > 0) & causal[None, :, :]  # [batch, seq, capacity]
        min_value = torch.finfo(torch.float32).min
        bias = torch.where(allowed, 0.0, min_value)

        presents = []
        for index, layer in enumerate(inner.layers):
            residual = hidden
            attn_out, new_pair = self._attention(layer, layer.input_layernorm(hidden), cos, sin, bias,
                                                 cache_position, past[2 * index], past[2 * index + 1])
            hidden = residual + attn_out
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            presents += new_pair

        hidden = inner.norm(hidden)
        hidden = hidden[:, hidden.shape[1] - logits_to_keep[0]:, :]
        logits = self.model.lm_head(hidden)
        return (logits, *presents)

    def _project(self, attn, states, cos, sin):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        batch, seq, _ = states.shape
        head_dim = self.geometry.head_dim
        q = attn.q_proj(states).view(batch, seq, self.num_heads, head_dim).transpose(1, 2)
        k = attn.k_proj(states).view(batch, seq, self.geometry.num_kv_heads, head_dim).transpose(1, 2)
        v = attn.v_proj(states).view(batch, seq, self.geometry.num_kv_heads, head_dim).transpose(1, 2)
        if hasattr(attn, "q_norm"):  # qwen3 normalizes each head's query and key before the rotary embedding
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def _write(self, buffer, new, cache_position):
        if self.write == "scatter":
            index = cache_position.view(1, 1, -1, 1).expand_as(new)
            return torch.scatter(buffer, 2, index, new)
        # One-hot blend: reads and writes the whole buffer, kept to compare against the scatter.
        slots = torch.arange(buffer.shape[2], dtype=torch.int64)
        one_hot = (slots[:, None] == cache_position[None, :]).to(buffer.dtype)  # [capacity, seq]
        keep = 1.0 - one_hot.sum(dim=1)[None, None, :, None]
        return buffer * keep + torch.matmul(one_hot, new)

    def _attention(self, layer, states, cos, sin, bias, cache_position, past_key, past_value):
        attn = layer.self_attn
        batch, seq, _ = states.shape
        kv_heads, head_dim, groups = self.geometry.num_kv_heads, self.geometry.head_dim, self.groups
        q, k, v = self._project(attn, states, cos, sin)
        # Group query heads by their KV head instead of repeating the cache, which would copy it.
        # Query head h uses KV head h // groups, as in transformers' repeat_kv.
        q = q.reshape(batch, kv_heads, groups * seq, head_dim)

        if self.layout == "buffer":
            keys = self._write(past_key, k, cache_position)
            values = self._write(past_value, v, cache_position)
            scores = torch.matmul(q, keys.transpose(2, 3)) * self.scale  # [batch, kv, groups*seq, capacity]
            scores = scores.view(batch, kv_heads, groups, seq, -1) + bias[:, None, None, :, :]
            probs = torch.softmax(scores, dim=-1).view(batch, kv_heads, groups * seq, -1)
            out = torch.matmul(probs, values)
            new_pair = [keys, values]
        else:
            capacity = past_key.shape[2]
            # Old slots: everything before the first new token. New tokens: causal among themselves.
            slots = torch.arange(capacity, dtype=torch.int64)
            past_bias = bias + torch.where(slots < cache_position[0], 0.0, torch.finfo(torch.float32).min)
            new_bias = torch.gather(bias, 2, cache_position.view(1, 1, -1).expand(batch, seq, seq))
            past_scores = torch.matmul(q, past_key.transpose(2, 3)) * self.scale
            new_scores = torch.matmul(q, k.transpose(2, 3)) * self.scale
            past_scores = past_scores.view(batch, kv_heads, groups, seq, capacity) + past_bias[:, None, None]
            new_scores = new_scores.view(batch, kv_heads, groups, seq, seq) + new_bias[:, None, None]
            probs = torch.softmax(torch.cat([past_scores, new_scores], dim=-1), dim=-1)
            probs = probs.view(batch, kv_heads, groups * seq, capacity + seq)
            out = torch.matmul(probs[..., :capacity], past_value) + torch.matmul(probs[..., capacity:], v)
            new_pair = [k, v]

        out = out.view(batch, kv_heads * groups, seq, head_dim).transpose(1, 2).reshape(batch, seq, -1)
        return attn.o_proj(out), new_pair


def sample_inputs(geometry: ModelGeometry, batch: int = 2, seq: int = 3, capacity: int = 8) -> tuple:
    input_ids = torch.randint(0, min(geometry.vocab_size, 1000), (batch, seq))
    position_ids = torch.arange(2, 2 + seq).unsqueeze(0).expand(batch, -1).contiguous()
    attention_mask = torch.zeros(batch, capacity, dtype=torch.int64)
    attention_mask[:, : 2 + seq] = 1
    cache_position = torch.arange(2, 2 + seq)
    logits_to_keep = torch.tensor([1])
    shape = (batch, geometry.num_kv_heads, capacity, geometry.head_dim)
    past = [torch.zeros(shape) for _ in range(2 * geometry.num_layers)]
    return (input_ids, position_ids, attention_mask, cache_position, logits_to_keep, *past)


def export_graph(model, path: Path, layout: str, write: str, opset: int) -> None:
    """Trace BufferDecoder with the TorchScript exporter and save it to `path`."""
    wrapper = BufferDecoder(model, layout, write).eval()
    geometry = wrapper.geometry
    args = sample_inputs(geometry)
    new_axis = "capacity" if layout == "buffer" else "seq"
    dynamic_axes = {
        "input_ids": {0: "batch", 1: "seq"},
        "position_ids": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: "capacity"},
        "cache_position": {0: "seq"},
        "logits": {0: "batch", 1: "logits_to_keep"},
    }
    for name in past_names(geometry.num_layers):
        dynamic_axes[name] = {0: "batch", 2: "capacity"}
    for name in present_names(geometry.num_layers):
        dynamic_axes[name] = {0: "batch", 2: new_axis}
    raw_dir = path.parent / "raw-export"
    raw_dir.mkdir()
    with torch.no_grad():
        torch.onnx.export(wrapper, args, str(raw_dir / path.name), input_names=input_names(geometry.num_layers),
                          output_names=["logits", *present_names(geometry.num_layers)], dynamic_axes=dynamic_axes,
                          opset_version=opset, dynamo=False)
    _save_single_file(raw_dir / path.name, path)
    shutil.rmtree(raw_dir)


def _save_single_file(raw_path: Path, out_path: Path) -> None:
    """Move the traced graph to `out_path`, gathering the per-tensor files of a model over 2 GiB into one."""
    if not [p for p in raw_path.parent.iterdir() if p != raw_path]:
        shutil.move(raw_path, out_path)
        return
    # NOTE: only models over 2 GiB take this branch, and no test here exports one.
    model = onnx.load(str(raw_path), load_external_data=True)
    onnx.save_model(model, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=out_path.name + ".data", size_threshold=1024)


# ---------------------------------------------------------------- parity check


def _run_buffer_graph(session, layout: str, geometry: ModelGeometry, prompt: list[int], steps: int,
                      capacity: int) -> list[np.ndarray]:
    """Prefill `prompt`, then feed `steps` greedy tokens; return the last-position logits of every call."""
    shape = (1, geometry.num_kv_heads, capacity, geometry.head_dim)
    past = {name: np.zeros(shape, np.float32) for name in past_names(geometry.num_layers)}
    mask = np.zeros((1, capacity), np.int64)
    ids, start = list(prompt), 0
    logits_seen = []
    for _ in range(steps + 1):
        end = start + len(ids)
        mask[0, start:end] = 1
        feeds = {
            "input_ids": np.array([ids], np.int64),
            "position_ids": np.arange(start, end, dtype=np.int64)[None],
            "attention_mask": mask,
            "cache_position": np.arange(start, end, dtype=np.int64),
            "logits_to_keep": np.array([1], np.int64),
            **past,
        }
        outputs = session.run(None, feeds)
        logits_seen.append(outputs[0][0, -1])
        for name, value in zip(past_names(geometry.num_layers), outputs[1:]):
            if layout == "buffer":
                past[name] = value
            else:
                past[name][:, :, start:end] = value
        ids, start = [int(outputs[0][0, -1].argmax())], end
    return logits_seen


def compare_steps_with_torch(model, tokenizer, step_logits, max_logits_diff: float, label: str) -> dict:
    """Compare a graph's prefill and decode logits with PyTorch on the parity prompts.

    `step_logits(prompt)` runs the graph greedily and returns the logits of the prefill's last
    position followed by those of each decode step. PyTorch scores the same token sequence in one pass.
    """
    worst = 0.0
    top1_same = total = 0
    for prompt in parity_prompts(tokenizer):
        onnx_logits = step_logits(prompt)
        tokens = list(prompt) + [int(x.argmax()) for x in onnx_logits[:-1]]
        with torch.no_grad():
            reference = model(input_ids=torch.tensor([tokens])).logits[0].numpy()
        for step, logits in enumerate(onnx_logits):
            expected = reference[len(prompt) - 1 + step]
            worst = max(worst, float(np.abs(expected - logits).max()))
            top1_same += int(expected.argmax() == logits.argmax())
            total += 1
    result = {"reference": "pytorch", "max_logits_diff": worst, "top1_agreement": top1_same / total,
              "tolerance": max_logits_diff, "passed": worst <= max_logits_diff}
    log.info("%s vs PyTorch: max logits diff %.3g (tolerance %.3g)", label, worst, max_logits_diff)
    return result


def check_buffer_parity(model, tokenizer, model_path: Path, layout: str, max_logits_diff: float = 1e-3,
                        decode_steps: int = 4) -> dict:
    """Compare the buffer graph's logits with PyTorch on the parity prompts (prefill and decode steps)."""
    geometry = ModelGeometry.from_config(model.config)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])

    def step_logits(prompt):
        return _run_buffer_graph(session, layout, geometry, prompt, decode_steps, len(prompt) + decode_steps + 3)

    return compare_steps_with_torch(model, tokenizer, step_logits, max_logits_diff, "fixed-capacity KV cache graph")


# ---------------------------------------------------------------- entry point


def export_kv_buffer(model_dir: str | Path, out_dir: str | Path, layout: str = "buffer", write: str = "scatter",
                     opset: int = 17, check: bool = True, max_logits_diff: float = 1e-3, strict: bool = True) -> dict:
    """Export the HF folder `model_dir` with a fixed-capacity KV cache to `out_dir`; return the manifest.

    The folder has the same files as export_onnx writes, except genai_config.json, because
    onnxruntime-genai cannot drive this interface. The manifest's `kv_cache` is `layout`, which
    the runtime reads to choose its decode loop. With `check`, logits are compared with
    PyTorch, and a difference over `max_logits_diff` raises ParityError when `strict`.
    """
    if layout not in KV_LAYOUTS:
        raise ValueError(f"layout={layout!r} is not supported; use one of {KV_LAYOUTS}")
    model_dir = Path(model_dir)
    model, tokenizer = load_for_export(model_dir)
    with atomic_dir(out_dir) as tmp:
        log.info("exporting %s with a fixed-capacity KV cache (layout %s, write %s)", model_dir, layout, write)
        export_graph(model, tmp / MODEL_FILE, layout, write, opset)
        manifest = build_manifest(model, tokenizer, model_dir, "fp32", MODEL_FILE, graph_opset(tmp / MODEL_FILE))
        manifest.update({"exporter": "torchscript", "kv_cache": layout, "kv_write": write})
        manifest["file_size_bytes"] = model_size_bytes(tmp)
        copy_model_files(model, model_dir, tmp)
        if check:
            parity = check_buffer_parity(model, tokenizer, tmp / MODEL_FILE, layout, max_logits_diff)
            manifest["parity"] = parity
            if strict and not parity["passed"]:
                raise ParityError(
                    f"fixed-capacity KV cache export of {model_dir} differs from PyTorch: max logits diff "
                    f"{parity['max_logits_diff']:.3g} (tolerance {max_logits_diff:.3g}); pass strict=False "
                    f"to keep it and read the numbers in the manifest"
                )
        write_json(tmp / MANIFEST_NAME, manifest)
    return manifest
