"""Build a Llama-family decoder graph from onnxruntime's fused operators, without a tracer.

torch.onnx.export writes attention, rotary embedding and RMSNorm as dozens of small
operators per layer. This module writes the graph node by node with onnx.helper, using
the contrib operators that onnxruntime's CPU provider runs as single kernels:

    layer 0 input norm     SimplifiedLayerNormalization
    other norms            SkipSimplifiedLayerNormalization (com.microsoft): residual add + RMSNorm
    q, k, v projections    one MatMul over the concatenated weights [hidden, (heads + 2 * kv_heads) * head_dim]
    attention              GroupQueryAttention (com.microsoft) on the packed QKV, rotary embedding inside
    gate and up            one MatMul, then Split; SiLU written as x * Sigmoid(x)
    LM head                its own initializer, also for tied embeddings, so the quantizer finds a MatMul

Graph interface, recorded in the manifest as kv_cache "gqa":

  inputs   input_ids int64 [batch, seq]
           attention_mask int64 [batch, mask_length]: ones for the filled slots, new tokens
             included, from slot 0 on. Trailing zeros are allowed, so the runtime can keep
             one mask of `capacity` slots and set one more 1 per step.
           logits_to_keep int64 [1]: number of last positions whose logits are computed
           past_key_values.{i}.key / .value float32 [batch, kv_heads, capacity, head_dim]
  outputs  logits float32 [batch, logits_to_keep, vocab]
           present.{i}.key / .value, the same shape as the past buffers

GroupQueryAttention reads seqlens_k = ReduceSum(attention_mask) - 1 (int32, the index of
each row's last token) and total_sequence_length = max over rows of ReduceSum(mask). The
new keys and values go to slots seqlens_k - seq + 1 .. seqlens_k, and the rotary position
of a token is its slot. When the runtime binds each present output to the OrtValue of its
past input, onnxruntime's CPU kernel gets the same pointer and writes only the new slots
(checked with onnxruntime 1.32 in tests/test_fused_graph.py). Rows must therefore be
right-aligned with no left padding, so the runtime runs a batch one row at a time.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from edgelm.export.onnx_export import (
    MANIFEST_NAME,
    MODEL_FILE,
    ModelGeometry,
    ParityError,
    build_manifest,
    copy_model_files,
    load_for_export,
    model_size_bytes,
    parity_prompts,
    past_names,
    present_names,
)
from edgelm.files import atomic_dir, write_json

log = logging.getLogger(__name__)

KV_CACHE_KIND = "gqa"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# RoPE variants whose frequencies do not depend on the sequence length, so one cos/sin table fits all.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
OPSET = 21
MS_DOMAIN = "com.microsoft"
# accuracy_level 4 lets MatMulNBits compute with int8 activations on the CPU, as the
# onnxruntime-genai builder does for its int4 CPU models.
INT4_OPTIONS = {"accuracy_level": 4}


def input_names(num_layers: int) -> list[str]:
    return ["input_ids", "attention_mask", "logits_to_keep", *past_names(num_layers)]


def check_supported(config) -> None:
    """Raise ValueError unless the fused graph can represent a model with this config."""
    model_type = config.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type {model_type!r} has no fused GroupQueryAttention graph (supported: "
            f"{list(SUPPORTED_MODEL_TYPES)}); use edgelm.export.kv_buffer.export_kv_buffer or "
            f"edgelm.export.onnx_export.export_onnx instead"
        )
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", model_type == "mistral")
    if window and uses_window and window < config.max_position_embeddings:
        raise ValueError(
            f"sliding_window={window} (model_type {model_type!r}) is not supported by the fused graph; "
            f"use export_onnx, or set sliding_window to null when prompts never exceed it"
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={config.hidden_act!r} is not supported by the fused graph; only 'silu' is")
    if getattr(config, "mlp_bias", False):
        raise ValueError("mlp_bias=True is not supported by the fused graph; its MLP MatMuls have no bias input")
    if model_type in ("llama", "mistral") and getattr(config, "attention_bias", False):
        raise ValueError(f"attention_bias=True (model_type {model_type!r}) is not supported by the fused graph; "
                         f"only Qwen2's q/k/v biases are")


def rotary_tables(model, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """Return cos and sin tables [max_positions, rotary_dim / 2] for GroupQueryAttention.

    They equal the first half of what the model's own rotary module computes (the
    second half repeats it), including the attention scaling of llama3 and yarn RoPE.
    """
    rotary = model.model.rotary_emb
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_type {rope_type!r} is not supported by the fused graph (supported: "
            f"{list(SUPPORTED_ROPE_TYPES)}), because its frequencies change with the sequence length; "
            f"use export_onnx instead"
        )
    # Same float32 arithmetic as the module's forward, so the tables match PyTorch bit for bit.
    positions = torch.arange(max_positions, dtype=torch.float32)
    freqs = positions[:, None] * rotary.inv_freq.float()[None, :]
    cos = (freqs.cos() * rotary.attention_scaling).numpy().astype(np.float32)
    sin = (freqs.sin() * rotary.attention_scaling).numpy().astype(np.float32)
    return cos, sin


class _GraphBuilder:
    """Collect nodes and initializers; name every node after its output."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def weight(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op_type: str, inputs: list[str], outputs: list[str] | str, domain: str = "", **attributes
             ) -> list[str]:
        outputs = [outputs] if isinstance(outputs, str) else outputs
        name = next(o for o in outputs if o) + "/" + op_type
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, domain=domain, **attributes))
        return outputs


def _linear_weight(linear: torch.nn.Linear) -> np.ndarray:
    """Return the weight as [in_features, out_features], the layout MatMul and MatMulNBits expect."""
    return linear.weight.detach().float().numpy().T


def _attention_block(graph: _GraphBuilder, layer, index: int, normed: str, config, geometry: ModelGeometry,
                     scale: float) -> str:
    attn = layer.self_attn
    prefix = f"layers.{index}.attn"
    qkv_weight = np.concatenate([_linear_weight(attn.q_proj), _linear_weight(attn.k_proj),
                                 _linear_weight(attn.v_proj)], axis=1)
    (qkv,) = graph.node("MatMul", [normed, graph.weight(f"{prefix}.qkv_proj.weight", qkv_weight)], f"{prefix}/qkv")
    if attn.q_proj.bias is not None:
        bias = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]).detach().float().numpy()
        (qkv,) = graph.node("Add", [qkv, graph.weight(f"{prefix}.qkv_proj.bias", bias)], f"{prefix}/qkv_bias")
    past_key, past_value = past_names(geometry.num_layers)[2 * index: 2 * index + 2]
    present_key, present_value = present_names(geometry.num_layers)[2 * index: 2 * index + 2]
    # Packed QKV: key and value inputs stay empty and GroupQueryAttention splits the query input.
    (attended, _, _) = graph.node(
        "GroupQueryAttention",
        [qkv, "", "", past_key, past_value, "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache"],
        [f"{prefix}/output", present_key, present_value], domain=MS_DOMAIN,
        num_heads=config.num_attention_heads, kv_num_heads=geometry.num_kv_heads, scale=float(scale),
        do_rotary=1, rotary_interleaved=0, local_window_size=-1,
    )
    (out,) = graph.node("MatMul", [attended, graph.weight(f"{prefix}.o_proj.weight", _linear_weight(attn.o_proj))],
                        f"{prefix}/o_proj")
    return out


def _mlp_block(graph: _GraphBuilder, layer, index: int, normed: str) -> str:
    mlp = layer.mlp
    prefix = f"layers.{index}.mlp"
    intermediate = mlp.gate_proj.out_features
    gate_up = np.concatenate([_linear_weight(mlp.gate_proj), _linear_weight(mlp.up_proj)], axis=1)
    (fused,) = graph.node("MatMul", [normed, graph.weight(f"{prefix}.gate_up_proj.weight", gate_up)],
                          f"{prefix}/gate_up")
    gate, up = graph.node("Split", [fused, "mlp_split_sizes"], [f"{prefix}/gate", f"{prefix}/up"], axis=-1)
    if index == 0:
        graph.weight("mlp_split_sizes", np.array([intermediate, intermediate], dtype=np.int64))
    (sigmoid,) = graph.node("Sigmoid", [gate], f"{prefix}/sigmoid")
    (silu,) = graph.node("Mul", [gate, sigmoid], f"{prefix}/silu")
    (product,) = graph.node("Mul", [silu, up], f"{prefix}/silu_times_up")
    (down,) = graph.node("MatMul", [product, graph.weight(f"{prefix}.down_proj.weight", _linear_weight(mlp.down_proj))],
                         f"{prefix}/down")
    return down


def _norm_weight(graph: _GraphBuilder, name: str, norm) -> str:
    return graph.weight(name, norm.weight.detach().float().numpy())


def _add_sequence_lengths(graph: _GraphBuilder) -> None:
    """Add seqlens_k (int32 [batch], last filled slot per row) and total_sequence_length (int32 scalar)."""
    graph.weight("axis_1", np.array([1], dtype=np.int64))
    graph.weight("one_int64", np.array(1, dtype=np.int64))
    (filled,) = graph.node("ReduceSum", ["attention_mask", "axis_1"], "mask/filled_slots", keepdims=0)
    (last,) = graph.node("Sub", [filled, "one_int64"], "mask/last_slot")
    graph.node("Cast", [last], "seqlens_k", to=TensorProto.INT32)
    (longest,) = graph.node("ReduceMax", [filled], "mask/longest_row", keepdims=0)
    graph.node("Cast", [longest], "total_sequence_length", to=TensorProto.INT32)


def build_fused_graph(model, max_positions: int | None = None) -> onnx.ModelProto:
    """Return the fp32 fused decoder graph of a loaded HF Llama, Mistral or Qwen2 model.

    `max_positions` sizes the rotary tables, so it bounds prompt plus generated tokens;
    None uses the config's max_position_embeddings.
    """
    config = model.config
    check_supported(config)
    geometry = ModelGeometry.from_config(config)
    inner = model.model
    max_positions = max_positions or config.max_position_embeddings
    eps = float(config.rms_norm_eps)
    scale = getattr(inner.layers[0].self_attn, "scaling", 1.0 / np.sqrt(geometry.head_dim))

    graph = _GraphBuilder()
    cos, sin = rotary_tables(model, max_positions)
    graph.weight("cos_cache", cos)
    graph.weight("sin_cache", sin)
    _add_sequence_lengths(graph)
    embedding = inner.embed_tokens.weight.detach().float().numpy()
    (hidden,) = graph.node("Gather", [graph.weight("embed_tokens.weight", embedding), "input_ids"], "embeddings",
                           axis=0)

    residual, update = hidden, None
    for index, layer in enumerate(inner.layers):
        norm_weight = _norm_weight(graph, f"layers.{index}.input_layernorm.weight", layer.input_layernorm)
        if update is None:
            (normed,) = graph.node("SimplifiedLayerNormalization", [residual, norm_weight],
                                   f"layers.{index}/input_norm", epsilon=eps, axis=-1, stash_type=1)
        else:
            normed, _, _, residual = graph.node(
                "SkipSimplifiedLayerNormalization", [residual, update, norm_weight],
                [f"layers.{index}/input_norm", "", "", f"layers.{index}/residual_in"], domain=MS_DOMAIN, epsilon=eps)
        attention = _attention_block(graph, layer, index, normed, config, geometry, scale)
        norm_weight = _norm_weight(graph, f"layers.{index}.post_attention_layernorm.weight",
                                   layer.post_attention_layernorm)
        normed, _, _, residual = graph.node(
            "SkipSimplifiedLayerNormalization", [residual, attention, norm_weight],
            [f"layers.{index}/post_attention_norm", "", "", f"layers.{index}/residual_mid"], domain=MS_DOMAIN,
            epsilon=eps)
        update = _mlp_block(graph, layer, index, normed)

    (final,) = graph.node("SkipSimplifiedLayerNormalization",
                          [residual, update, _norm_weight(graph, "norm.weight", inner.norm)],
                          "final_norm", domain=MS_DOMAIN, epsilon=eps)
    (keep_start,) = graph.node("Neg", ["logits_to_keep"], "logits/keep_start")
    graph.weight("int64_max", np.array([np.iinfo(np.int64).max], dtype=np.int64))
    (kept,) = graph.node("Slice", [final, keep_start, "int64_max", "axis_1"], "logits/kept_positions")
    # A copy of the embedding even when tied, so the quantizer can treat it as a MatMul weight.
    head = model.lm_head.weight.detach().float().numpy().T
    graph.node("MatMul", [kept, graph.weight("lm_head.weight", head)], "logits")

    return _make_model(graph, config, geometry)


def _make_model(graph: _GraphBuilder, config, geometry: ModelGeometry) -> onnx.ModelProto:
    cache_shape = ["batch", geometry.num_kv_heads, "capacity", geometry.head_dim]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "mask_length"]),
        helper.make_tensor_value_info("logits_to_keep", TensorProto.INT64, [1]),
        *[helper.make_tensor_value_info(name, TensorProto.FLOAT, cache_shape) for name in past_names(geometry.num_layers)],
    ]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "kept", geometry.vocab_size]),
        *[helper.make_tensor_value_info(name, TensorProto.FLOAT, cache_shape)
          for name in present_names(geometry.num_layers)],
    ]
    graph = helper.make_graph(graph.nodes, f"{config.model_type}-gqa-decoder", inputs, outputs, graph.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
                              producer_name="edgelm.export.fused_graph")
    model.ir_version = 10
    return model


# ---------------------------------------------------------------- parity check


def run_fused_graph(session: ort.InferenceSession, geometry: ModelGeometry, prompt: list[int], steps: int,
                    capacity: int) -> list[np.ndarray]:
    """Prefill `prompt`, then feed `steps` greedy tokens; return the last-position logits of every call.

    Uses plain session.run with numpy feeds and feeds each present buffer back as the next
    past, so it checks the graph without the runtime's in-place binding.
    """
    shape = (1, geometry.num_kv_heads, capacity, geometry.head_dim)
    past = {name: np.zeros(shape, np.float32) for name in past_names(geometry.num_layers)}
    mask = np.zeros((1, capacity), np.int64)
    ids, start = list(prompt), 0
    logits_seen = []
    for _ in range(steps + 1):
        end = start + len(ids)
        mask[0, start:end] = 1
        feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": mask,
                 "logits_to_keep": np.array([1], np.int64), **past}
        outputs = session.run(None, feeds)
        logits_seen.append(outputs[0][0, -1])
        past = dict(zip(past_names(geometry.num_layers), outputs[1:]))
        ids, start = [int(outputs[0][0, -1].argmax())], end
    return logits_seen


def check_fused_parity(model, tokenizer, model_path: Path, max_logits_diff: float = 1e-3, decode_steps: int = 4
                       ) -> dict:
    """Compare the fused graph's logits with PyTorch on the parity prompts (prefill and decode steps)."""
    from edgelm.export.kv_buffer import compare_steps_with_torch

    geometry = ModelGeometry.from_config(model.config)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])

    def step_logits(prompt):
        return run_fused_graph(session, geometry, prompt, decode_steps, len(prompt) + decode_steps + 3)

    return compare_steps_with_torch(model, tokenizer, step_logits, max_logits_diff, "fused GQA graph")


# ---------------------------------------------------------------- entry points


def export_fused(model_dir: str | Path, out_dir: str | Path, check: bool = True, max_logits_diff: float = 1e-3,
                 strict: bool = True, max_positions: int | None = None) -> dict:
    """Export the HF folder `model_dir` as the fp32 fused GQA graph to `out_dir`; return the manifest.

    The folder has the same files as export_kv_buffer writes, with kv_cache "gqa" in the
    manifest. With `check`, logits are compared with PyTorch, and a difference over
    `max_logits_diff` raises ParityError when `strict`.
    """
    model_dir = Path(model_dir)
    model, tokenizer = load_for_export(model_dir)
    check_supported(model.config)
    with atomic_dir(out_dir) as tmp:
        log.info("building the fused GroupQueryAttention graph of %s", model_dir)
        graph = build_fused_graph(model, max_positions)
        # Graphs over 2 GiB need external data; NOTE: no model here is that large, so that path is untested.
        large = graph.ByteSize() >= 2**31 - 1
        onnx.save_model(graph, str(tmp / MODEL_FILE), save_as_external_data=large, all_tensors_to_one_file=True,
                        location=MODEL_FILE + ".data", size_threshold=1024)
        manifest = build_manifest(model, tokenizer, model_dir, "fp32", MODEL_FILE, OPSET)
        manifest.update({"exporter": "edgelm.export.fused_graph", "kv_cache": KV_CACHE_KIND,
                         "max_positions": max_positions or model.config.max_position_embeddings})
        manifest["file_size_bytes"] = model_size_bytes(tmp)
        copy_model_files(model, model_dir, tmp)
        if check:
            parity = check_fused_parity(model, tokenizer, tmp / MODEL_FILE, max_logits_diff)
            manifest["parity"] = parity
            if strict and not parity["passed"]:
                raise ParityError(
                    f"fused GQA export of {model_dir} differs from PyTorch: max logits diff "
                    f"{parity['max_logits_diff']:.3g} (tolerance {max_logits_diff:.3g}); pass strict=False "
                    f"to keep it and read the numbers in the manifest"
                )
        write_json(tmp / MANIFEST_NAME, manifest)
    return manifest


def quantize_fused(fp32_dir: str | Path, out_dir: str | Path, check: bool = True, **options) -> dict:
    """Quantize a fused fp32 export to int4 with edgelm.export.quantize; return the manifest.

    `options` go to quantize()'s int4 scheme (block_size, symmetric, lm_head, ...), on top of
    accuracy_level 4. quantize()'s own parity check drives the dynamic-cache interface, so
    it is off here. With `check`, this function records greedy-token agreement and the
    max logits difference against the fp32 fused graph in the manifest's `parity`.
    """
    from edgelm.export.quantize import quantize

    fp32_dir, out_dir = Path(fp32_dir), Path(out_dir)
    manifest = quantize(fp32_dir, out_dir, "int4", check=False, **{**INT4_OPTIONS, **options})
    if check:
        manifest["parity"] = compare_fused_graphs(fp32_dir / MODEL_FILE, out_dir / MODEL_FILE, fp32_dir, manifest)
        write_json(out_dir / MANIFEST_NAME, manifest)
    return manifest


def compare_fused_graphs(reference_path: Path, candidate_path: Path, tokenizer_dir: Path, manifest: dict,
                         decode_steps: int = 8) -> dict:
    """Return max logits difference and top-1 agreement of two fused graphs on the parity prompts."""
    from edgelm.train.models import load_tokenizer

    geometry = ModelGeometry(manifest["num_layers"], manifest["num_kv_heads"], manifest["head_dim"],
                             manifest["vocab_size"])
    tokenizer = load_tokenizer(str(tokenizer_dir))
    reference = ort.InferenceSession(str(reference_path), providers=["CPUExecutionProvider"])
    candidate = ort.InferenceSession(str(candidate_path), providers=["CPUExecutionProvider"])
    worst, same, total = 0.0, 0, 0
    for prompt in parity_prompts(tokenizer):
        capacity = len(prompt) + decode_steps + 1
        expected = run_fused_graph(reference, geometry, prompt, decode_steps, capacity)
        # Each graph follows its own greedy tokens, so agreement also counts diverging continuations.
        actual = run_fused_graph(candidate, geometry, prompt, decode_steps, capacity)
        for a, b in zip(expected, actual):
            worst = max(worst, float(np.abs(a - b).max()))
            same += int(a.argmax() == b.argmax())
            total += 1
    return {"reference": "onnx-fp32-fused", "max_logits_diff": worst, "top1_agreement": same / total}
