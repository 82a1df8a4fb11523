"""Export a causal LM to ONNX with a KV cache, and check it against PyTorch.

The graph takes and returns the KV cache as flat tensors, named as Optimum and
onnxruntime-genai name them:

  inputs   input_ids [batch, seq], attention_mask [batch, past_seq + seq],
           position_ids [batch, seq], past_key_values.{i}.key / .value
           [batch, num_kv_heads, past_seq, head_dim]
  outputs  logits [batch, seq, vocab], present.{i}.key / .value
           [batch, num_kv_heads, past_seq + seq, head_dim]

Prefill passes past tensors with past_seq = 0. Batches are left-padded: the caller
puts zeros on the left of attention_mask and computes position_ids from the mask.

The default exporter is the TorchScript-based one (`torch.onnx.export(dynamo=False)`);
docs/export.md records why.
"""

from __future__ import annotations

import inspect
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from edgelm.export.parity import ParityError
from edgelm.files import atomic_dir, write_json
from edgelm.train.models import end_of_turn_token, load_model

log = logging.getLogger(__name__)

FORMAT_NAME = "edgelm-onnx"
FORMAT_VERSION = 1
MANIFEST_NAME = "edgelm_export.json"
MODEL_FILE = "model.onnx"
EXTERNAL_DATA_FILE = "model.onnx.data"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
EXPORTERS = ("torchscript", "dynamo")

# A protobuf message cannot exceed 2 GiB, so larger models keep their weights in EXTERNAL_DATA_FILE.
PROTOBUF_LIMIT_BYTES = 2**31 - 1

# Added to the attention scores of masked positions. transformers fills them with the fp32
# minimum (-3.4e38), which becomes -inf after an fp16 conversion. A query row whose keys are
# all masked (a left-padding position) then gives NaN in Softmax, and the NaN reaches the KV
# cache. -1e4 fits in fp16 (max 65504), and exp(-1e4) is 0 in fp16 and fp32.
MASK_VALUE = -1.0e4
# Scalars at or below this are taken to be the fp32-minimum mask fill.
MASK_FILL_THRESHOLD = -1.0e30

PARITY_QUESTIONS = (
    "What is 12 + 7?",
    "Name a color of the sky.",
    "Tom has 3 apples and buys 5 more. How many apples does he have?",
)


@dataclass(frozen=True)
class ModelGeometry:
    """The sizes of a decoder that the ONNX interface depends on."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def from_config(cls, config) -> ModelGeometry:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_hidden_layers, config.num_key_value_heads, head_dim, config.vocab_size)


def past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def input_names(num_layers: int) -> list[str]:
    return ["input_ids", "attention_mask", "position_ids", *past_names(num_layers)]


def output_names(num_layers: int) -> list[str]:
    return ["logits", *present_names(num_layers)]


def cache_keyword(model: PreTrainedModel) -> str:
    """Return the forward() keyword for the KV cache: `cache` in transformers >= 5.x, else `past_key_values`."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


class DecoderWithCache(torch.nn.Module):
    """Wrap a causal LM so that forward() takes and returns the KV cache as flat tensors."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model
        self.num_layers = model.config.num_hidden_layers
        self.cache_keyword = cache_keyword(model)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)]
        # Without `config`, every layer is a full DynamicLayer. With it, sliding-window layers
        # (Gemma 3) would crop their cache to the window, so present.N would stop growing as
        # the Optimum / onnxruntime-genai interface expects. The window still applies through
        # the attention mask that transformers builds from config.layer_types.
        cache = DynamicCache(ddp_cache_data=pairs)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self.cache_keyword: cache},
        )
        presents = []
        for layer in outputs.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return (outputs.logits, *presents)


def load_for_export(model_dir: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load an HF folder in fp32 eval mode with eager attention.

    Eager attention adds the padding mask to the scores as a tensor. With SDPA, both
    exporters bake mask shortcuts into the graph, and a left-padded batch then gave
    logits 0.6 away from PyTorch (torch 2.13, transformers 5.25, dynamo exporter).
    """
    model, tokenizer = load_model(str(model_dir), dtype=torch.float32)
    model.set_attn_implementation("eager")
    model.eval()
    return model, tokenizer


def sample_inputs(geometry: ModelGeometry, batch: int = 2, seq: int = 5, past_seq: int = 3) -> tuple[torch.Tensor, ...]:
    """Build example inputs for tracing; past_seq > 0 so the trace keeps the cache concatenation."""
    input_ids = torch.randint(0, min(geometry.vocab_size, 1000), (batch, seq))
    attention_mask = torch.ones(batch, past_seq + seq, dtype=torch.long)
    position_ids = torch.arange(past_seq, past_seq + seq).unsqueeze(0).expand(batch, -1).contiguous()
    shape = (batch, geometry.num_kv_heads, past_seq, geometry.head_dim)
    past = [torch.zeros(shape) for _ in range(2 * geometry.num_layers)]
    return (input_ids, attention_mask, position_ids, *past)


def _export_torchscript(wrapper, args, path: Path, geometry: ModelGeometry, opset: int) -> None:
    dynamic_axes = {
        "input_ids": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: "total_seq"},
        "position_ids": {0: "batch", 1: "seq"},
        "logits": {0: "batch", 1: "seq"},
    }
    for name in past_names(geometry.num_layers):
        dynamic_axes[name] = {0: "batch", 2: "past_seq"}
    for name in present_names(geometry.num_layers):
        dynamic_axes[name] = {0: "batch", 2: "total_seq"}
    torch.onnx.export(
        wrapper,
        args,
        str(path),
        input_names=input_names(geometry.num_layers),
        output_names=output_names(geometry.num_layers),
        dynamic_axes=dynamic_axes,
        opset_version=opset,
        dynamo=False,
    )


def _export_dynamo(wrapper, args, path: Path, geometry: ModelGeometry, opset: int) -> None:
    from torch.export import Dim

    batch, seq, past_seq, total_seq = Dim("batch"), Dim("seq"), Dim("past_seq"), Dim("total_seq")
    past_shapes = tuple({0: batch, 2: past_seq} for _ in range(2 * geometry.num_layers))
    dynamic_shapes = ({0: batch, 1: seq}, {0: batch, 1: total_seq}, {0: batch, 1: seq}, past_shapes)
    # The dynamo exporter builds opset 18 graphs; its down-conversion to 17 failed on
    # ReduceMean axes (onnx 1.23), so lower requests are raised to 18.
    program = torch.onnx.export(
        wrapper,
        args,
        input_names=input_names(geometry.num_layers),
        output_names=output_names(geometry.num_layers),
        dynamic_shapes=dynamic_shapes,
        opset_version=max(opset, 18),
        dynamo=True,
    )
    program.save(str(path))


def replace_mask_fill(model: onnx.ModelProto, value: float = MASK_VALUE) -> int:
    """Set every scalar Constant or initializer at or below MASK_FILL_THRESHOLD to `value`; return the count."""
    replaced = 0
    for node in model.graph.node:
        if node.op_type != "Constant":
            continue
        for attribute in node.attribute:
            if attribute.name == "value" and _is_mask_fill(attribute.t):
                array = numpy_helper.to_array(attribute.t)
                attribute.t.CopyFrom(numpy_helper.from_array(np.full_like(array, value), attribute.t.name))
                replaced += 1
    for index, initializer in enumerate(model.graph.initializer):
        if _is_mask_fill(initializer):
            array = numpy_helper.to_array(initializer)
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(np.full_like(array, value), initializer.name))
            replaced += 1
    return replaced


def _is_mask_fill(tensor: onnx.TensorProto) -> bool:
    if tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE) or np.prod(tensor.dims) > 1:
        return False
    array = numpy_helper.to_array(tensor)
    return bool(array.size == 1 and array.reshape(-1)[0] <= MASK_FILL_THRESHOLD)


def save_graph(model: onnx.ModelProto, out_path: Path, external_data_threshold: int = PROTOBUF_LIMIT_BYTES) -> bool:
    """Save `model` as `out_path`; return whether its weights went to EXTERNAL_DATA_FILE.

    Weights go to one external file beside the graph when the serialized model reaches
    `external_data_threshold` bytes (default: the 2 GiB protobuf limit).
    """
    external = model.ByteSize() >= external_data_threshold
    onnx.save_model(model, str(out_path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=EXTERNAL_DATA_FILE, size_threshold=1024)
    return external


def export_graph(model: PreTrainedModel, path: Path, opset: int, exporter: str,
                 external_data_threshold: int = PROTOBUF_LIMIT_BYTES) -> dict:
    """Write `model` wrapped in DecoderWithCache to the ONNX file `path`; return notes for the manifest.

    The fp32-minimum mask fill is replaced by MASK_VALUE so that fp16 variants stay finite.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter={exporter!r} is not supported; use one of {EXPORTERS}")
    geometry = ModelGeometry.from_config(model.config)
    wrapper = DecoderWithCache(model).eval()
    args = sample_inputs(geometry)
    raw_dir = path.parent / "raw-export"
    raw_dir.mkdir()
    with torch.no_grad():
        if exporter == "torchscript":
            _export_torchscript(wrapper, args, raw_dir / path.name, geometry, opset)
        else:
            _export_dynamo(wrapper, args, raw_dir / path.name, geometry, opset)
    # The TorchScript exporter writes one file per tensor for models over 2 GiB; loading with
    # external data gathers them so that save_graph can write a single data file.
    graph = onnx.load(str(raw_dir / path.name), load_external_data=True)
    replaced = replace_mask_fill(graph)
    external = save_graph(graph, path, external_data_threshold)
    shutil.rmtree(raw_dir)
    return {"mask_value": MASK_VALUE, "mask_fill_constants_replaced": replaced, "external_data": external}


def graph_opset(path: str | Path) -> int:
    """Return the default-domain opset of an ONNX file (the dynamo exporter may raise the requested one)."""
    model = onnx.load(str(path), load_external_data=False)
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def special_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> dict:
    """Return eos (a list that always includes the end-of-turn token), pad and bos token ids."""
    eos_ids = [tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))]
    for source in (model.config.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        for token_id in source if isinstance(source, list) else [source]:
            if token_id is not None and token_id not in eos_ids:
                eos_ids.append(int(token_id))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else model.config.bos_token_id
    return {"eos_token_ids": eos_ids, "pad_token_id": pad_id, "bos_token_id": bos_id}


def copy_model_files(model: PreTrainedModel, model_dir: Path, out_dir: Path) -> None:
    """Copy the tokenizer files and write config.json and generation_config.json next to the graph."""
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out_dir / name)
    model.config.save_pretrained(out_dir)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out_dir)


def genai_config(model: PreTrainedModel, geometry: ModelGeometry, tokens: dict, model_file: str) -> dict:
    """Build genai_config.json in the layout that onnxruntime-genai (0.18 tested) loads with og.Model."""
    config = model.config
    context_length = int(getattr(config, "max_position_embeddings", 2048))
    return {
        "model": {
            "bos_token_id": tokens["bos_token_id"],
            "context_length": context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": model_file,
                "head_size": geometry.head_dim,
                "hidden_size": config.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": config.num_attention_heads,
                "num_hidden_layers": geometry.num_layers,
                "num_key_value_heads": geometry.num_kv_heads,
            },
            "eos_token_id": tokens["eos_token_ids"],
            "pad_token_id": tokens["pad_token_id"],
            "type": config.model_type,
            "vocab_size": geometry.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


# ---------------------------------------------------------------- numpy decoding over ONNX


class OnnxDecoder:
    """An onnxruntime CPU session over an exported graph, with a numpy greedy loop for checks."""

    def __init__(self, model_path: str | Path, geometry: ModelGeometry, kv_dtype=np.float32):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self.geometry = geometry
        self.kv_dtype = kv_dtype
        self.output_names = output_names(geometry.num_layers)

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.geometry.num_kv_heads, 0, self.geometry.head_dim)
        return [np.zeros(shape, dtype=self.kv_dtype) for _ in range(2 * self.geometry.num_layers)]

    def step(self, input_ids, attention_mask, position_ids, past) -> tuple[np.ndarray, list[np.ndarray]]:
        """Run one forward pass; return logits and the present KV tensors."""
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        feeds.update(zip(past_names(self.geometry.num_layers), past))
        outputs = self.session.run(self.output_names, feeds)
        return outputs[0], outputs[1:]

    def greedy(self, prompts: list[list[int]], max_new_tokens: int, eos_ids, pad_id: int) -> list[list[int]]:
        """Generate greedily for a left-padded batch; return each row's new tokens, cut after its first eos."""
        return greedy_generate(self.step, self.empty_past, prompts, max_new_tokens, eos_ids, pad_id)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return input_ids, attention_mask and position_ids for a left-padded batch."""
    width = max(len(p) for p in prompts)
    input_ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = prompt
        attention_mask[row, width - len(prompt):] = 1
    position_ids = np.clip(np.cumsum(attention_mask, axis=1) - 1, 0, None)
    return input_ids, attention_mask, position_ids


def greedy_generate(step, empty_past, prompts, max_new_tokens: int, eos_ids, pad_id: int) -> list[list[int]]:
    """Greedy loop over any `step(input_ids, attention_mask, position_ids, past)` with numpy arrays."""
    eos = set(int(i) for i in eos_ids)
    input_ids, attention_mask, position_ids = left_pad(prompts, pad_id)
    past = empty_past(len(prompts))
    generated: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    for _ in range(max_new_tokens):
        logits, past = step(input_ids, attention_mask, position_ids, past)
        next_ids = logits[:, -1, :].argmax(axis=-1)
        for row, token in enumerate(next_ids.tolist()):
            if not finished[row]:
                generated[row].append(token)
                finished[row] = token in eos
        if all(finished):
            break
        # Finished rows keep decoding pad tokens so the batch stays rectangular; their output is already cut.
        next_ids = np.where(finished, pad_id, next_ids)
        input_ids = next_ids[:, None].astype(np.int64)
        attention_mask = np.concatenate([attention_mask, np.ones((len(prompts), 1), dtype=np.int64)], axis=1)
        position_ids = position_ids[:, -1:] + 1
    return generated


class TorchDecoder:
    """DecoderWithCache behind the same numpy step() interface as OnnxDecoder."""

    def __init__(self, model: PreTrainedModel):
        self.wrapper = DecoderWithCache(model).eval()
        self.geometry = ModelGeometry.from_config(model.config)

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.geometry.num_kv_heads, 0, self.geometry.head_dim)
        return [np.zeros(shape, dtype=np.float32) for _ in range(2 * self.geometry.num_layers)]

    def step(self, input_ids, attention_mask, position_ids, past) -> tuple[np.ndarray, list[np.ndarray]]:
        tensors = [torch.from_numpy(np.ascontiguousarray(x)) for x in (input_ids, attention_mask, position_ids, *past)]
        with torch.no_grad():
            outputs = self.wrapper(*tensors)
        return outputs[0].numpy(), [t.numpy() for t in outputs[1:]]


def torch_greedy(model: PreTrainedModel, prompt: list[int], max_new_tokens: int, eos_ids, pad_id: int) -> list[int]:
    """Return the new tokens of `model.generate(do_sample=False)` for one prompt."""
    input_ids = torch.tensor([prompt])
    with torch.no_grad():
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=list(eos_ids),
            pad_token_id=pad_id,
        )
    new_tokens = output[0, len(prompt):].tolist()
    eos = set(eos_ids)
    for index, token in enumerate(new_tokens):
        if token in eos:
            return new_tokens[: index + 1]
    return new_tokens


# ---------------------------------------------------------------- parity check


def parity_prompts(tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Token ids of short chat prompts, ready for the assistant's reply."""
    prompts = []
    for question in PARITY_QUESTIONS:
        messages = [{"role": "user", "content": question}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        prompts.append(list(ids))
    return prompts


def compare_logits(reference, candidate, prompts: list[list[int]], decode_steps: int) -> dict:
    """Return the max absolute logits difference in prefill and in decode steps with the cache,
    and the top-1 agreement over all those positions.

    Both decoders keep their own KV cache. Each decode step feeds both the reference's
    greedy token, so one early difference does not change every later input.
    """
    prefill_diff = decode_diff = 0.0
    top1_same = top1_total = 0
    for prompt in prompts:
        input_ids = np.array([prompt], dtype=np.int64)
        attention_mask = np.ones_like(input_ids)
        position_ids = np.arange(len(prompt), dtype=np.int64)[None]
        ref_logits, ref_past = reference.step(input_ids, attention_mask, position_ids, reference.empty_past(1))
        cand_logits, cand_past = candidate.step(input_ids, attention_mask, position_ids, candidate.empty_past(1))
        prefill_diff = max(prefill_diff, float(np.abs(ref_logits - cand_logits).max()))
        top1_same += int((ref_logits.argmax(-1) == cand_logits.argmax(-1)).sum())
        top1_total += len(prompt)
        for _ in range(decode_steps):
            next_id = np.array([[ref_logits[0, -1].argmax()]], dtype=np.int64)
            attention_mask = np.ones((1, attention_mask.shape[1] + 1), dtype=np.int64)
            position_ids = position_ids[:, -1:] + 1
            ref_logits, ref_past = reference.step(next_id, attention_mask, position_ids, ref_past)
            cand_logits, cand_past = candidate.step(next_id, attention_mask, position_ids, cand_past)
            decode_diff = max(decode_diff, float(np.abs(ref_logits - cand_logits).max()))
            top1_same += int(ref_logits[0, -1].argmax() == cand_logits[0, -1].argmax())
            top1_total += 1
    # top1_agreement: share of positions (every prompt position, then each decode step) where
    # both models rank the same token first, with the same inputs fed to both.
    return {"max_logits_diff_prefill": prefill_diff, "max_logits_diff_decode": decode_diff,
            "max_logits_diff": max(prefill_diff, decode_diff), "top1_agreement": top1_same / top1_total}


def compare_greedy(reference_tokens: list[list[int]], candidate_tokens: list[list[int]]) -> dict:
    """Return whether greedy outputs match, the first differing index per prompt, and token agreement."""
    mismatches = []
    agree = total = 0
    for index, (ref, cand) in enumerate(zip(reference_tokens, candidate_tokens)):
        total += max(len(ref), len(cand))
        agree += sum(a == b for a, b in zip(ref, cand))
        if ref != cand:
            first = next((i for i, (a, b) in enumerate(zip(ref, cand)) if a != b), min(len(ref), len(cand)))
            mismatches.append({"prompt": index, "first_diff_at": first, "reference": ref, "candidate": cand})
    return {"greedy_match": not mismatches, "greedy_token_agreement": agree / total if total else 1.0,
            "greedy_mismatches": mismatches}


# Thresholds for the fp32 export against PyTorch. Only float rounding separates the two, so
# every check is strict. The pipeline reads its values from `export.parity.fp32`.
FP32_THRESHOLDS = {"max_logits_diff": 1e-3, "min_top1_agreement": 0.99, "max_ppl_increase": 0.001,
                   "min_greedy_agreement": 1.0}


def measure_parity(reference, candidate, prompts: list[list[int]], heldout_chunks: list[list[int]],
                   reference_tokens: list[list[int]], candidate_tokens: list[list[int]],
                   decode_steps: int) -> dict:
    """Combine the prompt logits check, teacher forcing on held-out text and greedy agreement."""
    from edgelm.export.parity import teacher_forcing

    result = compare_logits(reference, candidate, prompts, decode_steps)
    result.update(teacher_forcing(reference, candidate, heldout_chunks))
    result["max_logits_diff"] = max(result["max_logits_diff"], result["heldout_max_logits_diff"])
    result.update(compare_greedy(reference_tokens, candidate_tokens))
    return result


def check_torch_parity(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, model_path: Path,
                       max_logits_diff: float = 1e-3, max_new_tokens: int = 16, decode_steps: int = 4,
                       strict: bool = True, thresholds: dict | None = None, heldout_texts=None,
                       heldout_tokens: int = 512) -> dict:
    """Compare the ONNX graph at `model_path` with PyTorch and apply the fp32 thresholds.

    Logits are compared on PARITY_QUESTIONS in prefill and `decode_steps` cached steps, and on
    `heldout_tokens` tokens of held-out text under teacher forcing. Greedy tokens come from
    `model.generate(do_sample=False)` and from OnnxDecoder.greedy. `thresholds` defaults to
    FP32_THRESHOLDS with `max_logits_diff` replaced. With `strict`, a broken threshold raises
    ParityError naming the `export.parity.fp32` key to relax.
    """
    from edgelm.export.parity import apply_thresholds, failure_message, heldout_token_ids

    limits = dict(thresholds) if thresholds is not None else {**FP32_THRESHOLDS, "max_logits_diff": max_logits_diff}
    geometry = ModelGeometry.from_config(model.config)
    tokens = special_token_ids(model, tokenizer)
    prompts = parity_prompts(tokenizer)
    onnx_decoder = OnnxDecoder(model_path, geometry)
    eos, pad = tokens["eos_token_ids"], tokens["pad_token_id"]
    reference = [torch_greedy(model, p, max_new_tokens, eos, pad) for p in prompts]
    candidate = [onnx_decoder.greedy([p], max_new_tokens, eos, pad)[0] for p in prompts]
    chunks = heldout_token_ids(tokenizer, heldout_texts, heldout_tokens)
    result = {"reference": "pytorch", "prompts": len(prompts), "decode_steps": decode_steps,
              "max_new_tokens": max_new_tokens, "tolerance": limits.get("max_logits_diff")}
    result.update(measure_parity(TorchDecoder(model), onnx_decoder, prompts, chunks, reference, candidate,
                                 decode_steps))
    apply_thresholds(result, limits, "fp32")
    if strict and not result["passed"]:
        raise ParityError(failure_message(result, f"ONNX export of {model_path}"))
    return result


# ---------------------------------------------------------------- entry point


def build_manifest(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, model_dir: Path,
                   variant: str, model_file: str, opset: int) -> dict:
    geometry = ModelGeometry.from_config(model.config)
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "variant": variant,
        "model_file": model_file,
        "model_type": model.config.model_type,
        "num_layers": geometry.num_layers,
        "num_kv_heads": geometry.num_kv_heads,
        "head_dim": geometry.head_dim,
        "vocab_size": geometry.vocab_size,
        **special_token_ids(model, tokenizer),
        "kv_dtype": "float32",
        "opset": opset,
        "source": str(model_dir),
    }


def export_onnx(model_dir: str | Path, out_dir: str | Path, opset: int = 17, check: bool = True,
                max_logits_diff: float = 1e-3, strict: bool = True, exporter: str = "torchscript",
                thresholds: dict | None = None, heldout_texts=None,
                external_data_threshold: int = PROTOBUF_LIMIT_BYTES) -> dict:
    """Export the HF folder `model_dir` to an ONNX folder at `out_dir`; return the manifest.

    The folder contains model.onnx (plus model.onnx.data when the graph reaches
    `external_data_threshold` bytes), the tokenizer files, config.json,
    generation_config.json, genai_config.json, edgelm_export.json and, with `check`,
    parity.json. The manifest's `parity` entry is check_torch_parity's result. A broken
    threshold raises ParityError unless `strict` is False. The folder is replaced only
    after everything succeeded.
    """
    from edgelm.export.parity import write_parity

    model_dir = Path(model_dir)
    model, tokenizer = load_for_export(model_dir)
    geometry = ModelGeometry.from_config(model.config)
    with atomic_dir(out_dir) as tmp:
        log.info("exporting %s to ONNX with the %s exporter, opset %d", model_dir, exporter, opset)
        notes = export_graph(model, tmp / MODEL_FILE, opset, exporter, external_data_threshold)
        manifest = build_manifest(model, tokenizer, model_dir, "fp32", MODEL_FILE, graph_opset(tmp / MODEL_FILE))
        manifest["exporter"] = exporter
        manifest.update(notes)
        manifest["file_size_bytes"] = model_size_bytes(tmp)
        copy_model_files(model, model_dir, tmp)
        tokens = {key: manifest[key] for key in ("eos_token_ids", "pad_token_id", "bos_token_id")}
        write_json(tmp / "genai_config.json", genai_config(model, geometry, tokens, MODEL_FILE))
        if check:
            manifest["parity"] = check_torch_parity(model, tokenizer, tmp / MODEL_FILE, max_logits_diff=max_logits_diff,
                                                    strict=strict, thresholds=thresholds, heldout_texts=heldout_texts)
            write_parity(tmp, manifest["parity"])
        write_json(tmp / MANIFEST_NAME, manifest)
    return manifest


def model_size_bytes(folder: Path) -> int:
    """Return the size of model.onnx plus its external data file, if any."""
    return sum((folder / name).stat().st_size for name in (MODEL_FILE, EXTERNAL_DATA_FILE) if (folder / name).exists())


def read_manifest(folder: str | Path) -> dict:
    return json.loads((Path(folder) / MANIFEST_NAME).read_text(encoding="utf-8"))
