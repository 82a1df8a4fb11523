"""Quantize an exported ONNX folder and check each variant against the fp32 graph.

Schemes:

- `int8`: dynamic int8 (`quantize_dynamic`), MatMul weights QInt8 per output channel, the
  embedding Gather included; activations are quantized at run time.
- `int8-static`: static int8 in QDQ format (`quantize_static`), per-channel weights and
  activation ranges calibrated on prefill inputs built from training prompts.
- `int8-weight`: weight-only int8 (MatMulNBits with 8 bits), fp32 activations.
- `int4`: weight-only int4 (MatMulNBits), block-wise scales, the embedding as
  GatherBlockQuantized, and the LM head at int4, int8 or fp32 (`lm_head`).
- `fp16`: fp16 weights and compute with fp32 graph inputs and outputs. RMSNorm and
  LayerNorm patterns and Softmax stay in fp32.

Every scheme keeps the graph's input and output names and dtypes, so the runtime loads a
quantized folder exactly like the fp32 one. The parity check (edgelm.export.parity)
compares the quantized graph with the fp32 graph in onnxruntime. It records the numbers
and raises only with `strict=True`.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper, version_converter

from edgelm.export.onnx_export import (
    EXTERNAL_DATA_FILE,
    MANIFEST_NAME,
    ModelGeometry,
    OnnxDecoder,
    ParityError,
    graph_opset,
    measure_parity,
    model_size_bytes,
    parity_prompts,
    past_names,
    read_manifest,
)
from edgelm.config import ParityConfig
from edgelm.files import atomic_dir, write_json
from edgelm.train.models import load_tokenizer

log = logging.getLogger(__name__)

INT4_GATHER_OPSET = 21
LM_HEAD_PRECISIONS = ("int4", "int8", "fp32")
INT4_METHODS = ("rtn", "gptq")


@dataclass(frozen=True)
class Scheme:
    """One quantization recipe, its default options and its default parity thresholds."""

    description: str
    thresholds: dict
    options: dict = field(default_factory=dict)


# Default thresholds per scheme: export.parity in edgelm.config, so the library and the pipeline
# share one set (docs/export.md has the measurements behind them).
DEFAULT_THRESHOLDS = {name: ParityConfig().for_kind(name) for name in ("fp16", "int8", "int8-static", "int8-weight", "int4")}

# Added to a parity failure of these schemes: the more accurate scheme to try instead.
MORE_ACCURATE = {
    "int8": "int8-weight keeps activations in fp32 and was far more accurate on the 30-layer SmolLM2 "
            "(perplexity +0.09% against +51% for int8; docs/export.md)",
    "int8-static": "int8-weight keeps activations in fp32 and is the most accurate 8-bit scheme (docs/export.md)",
}


SCHEMES = {
    "int8": Scheme("dynamic int8: MatMul and embedding weights QInt8 per channel, activations quantized at run time",
                   DEFAULT_THRESHOLDS["int8"], {"per_channel": True, "quantize_embedding": True}),
    "int8-static": Scheme("static int8 QDQ: per-channel QInt8 weights, QUInt8 activations calibrated on training "
                          "prompts", DEFAULT_THRESHOLDS["int8-static"],
                          {"per_channel": True, "quantize_embedding": True, "calibration_samples": 16}),
    "int8-weight": Scheme("weight-only int8 (MatMulNBits, 8 bits), block-wise scales, fp32 activations",
                          DEFAULT_THRESHOLDS["int8-weight"],
                          {"block_size": 32, "symmetric": True, "accuracy_level": None, "quantize_embedding": False,
                           "bits": 8, "lm_head": "int8"}),
    "int4": Scheme("weight-only int4 (MatMulNBits), block-wise scales, fp32 activations",
                   DEFAULT_THRESHOLDS["int4"],
                   # Block 16, asymmetric, LM head int8: the most accurate setting measured on the
                   # 10-layer student (docs/export.md), at 88 MB against 58 MB for block 32 symmetric.
                   # accuracy_level 4 (int8 activations in the kernel): with the int8 LM head, the
                   # default level decoded 7 to 30 times slower on CPU (docs/export.md).
                   # method "gptq" rounds with edgelm.export.gptq on `calibration_samples` sequences.
                   {"block_size": 16, "symmetric": False, "accuracy_level": 4, "quantize_embedding": True,
                    "bits": 4, "lm_head": "int8", "method": "rtn", "calibration_samples": 32}),
    "fp16": Scheme("fp16 weights and compute; graph inputs and outputs, norms and Softmax in fp32",
                   DEFAULT_THRESHOLDS["fp16"], {"keep_fp32_norms": True}),
}


def untie_lm_head(model: onnx.ModelProto) -> int:
    """Give each MatMul fed by Transpose(initializer) its own pre-transposed initializer; return the count.

    The dynamo exporter keeps tied embeddings as one table and feeds the LM head
    MatMul through a Transpose, which MatMul quantizers skip because the weight is not
    a constant. The TorchScript exporter already stores a transposed copy.
    """
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    untied = 0
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        transpose = producers.get(node.input[1])
        if transpose is None or transpose.op_type != "Transpose" or transpose.input[0] not in initializers:
            continue
        weight = numpy_helper.to_array(initializers[transpose.input[0]])
        perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
        name = f"{transpose.input[0]}.transposed_for_{node.name or 'matmul'}"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.transpose(perm)), name))
        node.input[1] = name
        untied += 1
    if untied:
        # Drop Transpose nodes whose outputs no longer feed anything.
        used = {name for node in graph.node for name in node.input} | {out.name for out in graph.output}
        remaining_nodes = [node for node in graph.node
                           if node.op_type != "Transpose" or any(out in used for out in node.output)]
        del graph.node[:]
        graph.node.extend(remaining_nodes)
    return untied


def _load_fp32(onnx_dir: Path) -> onnx.ModelProto:
    model = onnx.load(str(onnx_dir / read_manifest(onnx_dir)["model_file"]), load_external_data=True)
    untied = untie_lm_head(model)
    if untied:
        log.info("gave %d MatMul(s) fed by a transposed initializer their own weight so they can be quantized", untied)
    return model


def _save(model: onnx.ModelProto, path: Path) -> None:
    # Weights always go to EXTERNAL_DATA_FILE: onnxruntime 1.32 parses a single-file model as one
    # protobuf first, which raised peak memory from 196 to 229 MB for the 99 MB int4 SmolLM2.
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=EXTERNAL_DATA_FILE, size_threshold=1024)


def _constant_weight_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    initializers = {init.name for init in model.graph.initializer}
    return [node for node in model.graph.node if node.op_type == "MatMul" and node.input[1] in initializers]


def _embedding_gathers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Return Gather nodes whose data is a 2-D initializer (the token embedding)."""
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    return [node for node in model.graph.node
            if node.op_type == "Gather" and len(shapes.get(node.input[0], ())) == 2]


def lm_head_node(model: onnx.ModelProto, vocab_size: int) -> onnx.NodeProto | None:
    """Return the MatMul whose constant weight ends in the vocabulary size, or None."""
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    heads = [node for node in _constant_weight_matmuls(model) if shapes[node.input[1]][-1] == vocab_size]
    return heads[-1] if heads else None


def quantize_int8(model: onnx.ModelProto, path: Path, options: dict) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    nodes = [node.name for node in _constant_weight_matmuls(model)]
    op_types = ["MatMul"]
    if options["quantize_embedding"]:
        nodes += [node.name for node in _embedding_gathers(model)]
        op_types.append("Gather")
    # Weights go to EXTERNAL_DATA_FILE, as in _save.
    quantize_dynamic(model, str(path), op_types_to_quantize=op_types, nodes_to_quantize=nodes,
                     per_channel=options["per_channel"], weight_type=QuantType.QInt8,
                     use_external_data_format=True)
    return _weight_notes(onnx.load(str(path), load_external_data=False))


class PrefillCalibrationReader:
    """Feed prefill inputs (batch 1, empty KV cache) for each calibration prompt to quantize_static."""

    def __init__(self, prompts: list[list[int]], num_layers: int, num_kv_heads: int, head_dim: int):
        empty = np.zeros((1, num_kv_heads, 0, head_dim), dtype=np.float32)
        self.feeds = []
        for prompt in prompts:
            input_ids = np.array([prompt], dtype=np.int64)
            feed = {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids),
                    "position_ids": np.arange(len(prompt), dtype=np.int64)[None]}
            feed.update({name: empty for name in past_names(num_layers)})
            self.feeds.append(feed)
        self.position = 0

    def get_next(self) -> dict | None:
        if self.position >= len(self.feeds):
            return None
        self.position += 1
        return self.feeds[self.position - 1]

    def rewind(self) -> None:
        self.position = 0


def quantize_int8_static(model: onnx.ModelProto, path: Path, options: dict) -> dict:
    """Quantize weights and activations to int8 in QDQ format with ranges calibrated on real prefills.

    Only MatMuls with a constant weight (and the embedding Gather) are quantized. The
    attention MatMuls between two activations stay fp32, because int8 attention scores
    shift the Softmax too much for a model this small.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    reader = options["calibration_reader"]
    nodes = [node.name for node in _constant_weight_matmuls(model)]
    op_types = ["MatMul"]
    if options["quantize_embedding"]:
        nodes += [node.name for node in _embedding_gathers(model)]
        op_types.append("Gather")
    quantize_static(model, str(path), reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=op_types,
                    nodes_to_quantize=nodes, per_channel=options["per_channel"], activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                    use_external_data_format=True)
    notes = _weight_notes(onnx.load(str(path), load_external_data=False))
    notes["calibration_prompts"] = len(reader.feeds)
    return notes


def _weight_notes(model: onnx.ModelProto) -> dict:
    counts = _op_counts(model)
    return {"fp32_matmul_nodes_left": _constant_matmuls(model),
            "quantized_op_counts": {op: counts[op] for op in sorted(counts)
                                    if op in ("MatMulInteger", "DynamicQuantizeLinear", "QuantizeLinear",
                                              "DequantizeLinear", "MatMulNBits", "GatherBlockQuantized")}}


def quantize_nbits(model: onnx.ModelProto, path: Path, options: dict) -> dict:
    """Quantize MatMul weights to `bits` bits, the LM head to `lm_head`, and, if asked, the embedding Gather.

    The embedding uses GatherBlockQuantized (onnxruntime >= 1.20), which needs the graph at
    opset 21 and IR version 10 for int4 tensors. If that fails, the embedding stays fp32
    and the manifest records the error.
    """
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    if options["lm_head"] not in LM_HEAD_PRECISIONS:
        raise ValueError(f"lm_head={options['lm_head']!r} is not supported; use one of {LM_HEAD_PRECISIONS}")
    head = lm_head_node(model, options["vocab_size"])
    head_name = head.name if head is not None else None
    notes: dict = {"lm_head_node": head_name}
    op_types = ("MatMul", "Gather") if options["quantize_embedding"] else ("MatMul",)
    exclude = [head_name] if head_name and options["lm_head"] != f"int{options['bits']}" else []
    if options.get("method", "rtn") == "gptq":
        quantized = _gptq_nbits(nbits, model, options, exclude, notes)
    else:
        try:
            quantized = _run_nbits(nbits, model, op_types, options, exclude=exclude)
            _check_loads(quantized)
            notes["embedding_quantized"] = "Gather" in op_types
        except Exception as error:  # noqa: BLE001 - any failure of the optional Gather path falls back
            if "Gather" not in op_types:
                raise
            _embedding_failed(notes, error)
            quantized = _run_nbits(nbits, model, ("MatMul",), options, exclude=exclude)
    if exclude and options["lm_head"] == "int8":
        # A second pass quantizes only the LM head, with 8 bits.
        quantized = _run_nbits(nbits, quantized, ("MatMul",), {**options, "bits": 8}, include=[head_name])
    notes["lm_head_precision"] = options["lm_head"] if head_name else "not found"
    notes.update(_weight_notes(quantized))
    notes["matmul_nbits_nodes"] = notes["quantized_op_counts"].get("MatMulNBits", 0)
    _save(quantized, path)
    return notes


def _embedding_failed(notes: dict, error: Exception) -> None:
    log.warning("quantized embedding (GatherBlockQuantized) failed, keeping the embedding in fp32: %s", error)
    notes["embedding_quantized"] = False
    notes["embedding_error"] = str(error)[:500]


def _gptq_nbits(nbits, model: onnx.ModelProto, options: dict, exclude: list[str], notes: dict) -> onnx.ModelProto:
    """Round the embedding with RTN (if asked), then every other MatMul weight but `exclude` with GPTQ.

    The embedding goes first, while the graph contains no MatMulNBits yet, because its pass
    converts the graph to opset 21. Its block is at most 32: a step reads one row of it, so
    a larger block would cost accuracy and save no decode time.
    """
    from edgelm.export.gptq import constant_matmuls, gptq_int4, input_hessians

    if options["quantize_embedding"]:
        try:
            embedded = _run_nbits(nbits, model, ("Gather",), {**options, "block_size": min(options["block_size"], 32)})
            _check_loads(embedded)
            model = embedded
            notes["embedding_quantized"] = True
        except Exception as error:  # noqa: BLE001 - the embedding then stays fp32, as for RTN
            _embedding_failed(notes, error)
    hessians, notes["calibration_tokens"] = input_hessians(model, options["calibration_feeds"],
                                                           constant_matmuls(model, exclude))
    return gptq_int4(model, hessians, options["block_size"], options["accuracy_level"], exclude)


def _run_nbits(nbits, model: onnx.ModelProto, op_types: tuple[str, ...], options: dict,
               exclude: list[str] | None = None, include: list[str] | None = None) -> onnx.ModelProto:
    # The quantizer edits the ModelProto in place, so a failed attempt must not touch `model`.
    model = copy.deepcopy(model)
    if "Gather" in op_types:
        # Int4 Gather data needs opset 21. The quantizer only relabels the opset, which leaves
        # opset-17 ReduceMean nodes invalid, so convert the graph properly first.
        model = version_converter.convert_version(model, INT4_GATHER_OPSET)
    config = nbits.DefaultWeightOnlyQuantConfig(
        block_size=options["block_size"],
        is_symmetric=options["symmetric"],
        accuracy_level=options["accuracy_level"],
        op_types_to_quantize=op_types,
        quant_axes=(("MatMul", 0), ("Gather", 1)),
        bits=options["bits"],
    )
    quantizer = nbits.MatMulNBitsQuantizer(model, nodes_to_exclude=exclude or None, nodes_to_include=include,
                                           algo_config=config)
    quantizer.process()
    return quantizer.model.model


def _check_loads(model: onnx.ModelProto) -> None:
    import onnxruntime as ort

    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _constant_matmuls(model: onnx.ModelProto) -> int:
    """Count MatMul nodes whose weight is still an fp32 initializer."""
    return len(_constant_weight_matmuls(model))


# Op types kept in fp32 by the fp16 conversion, on top of onnxruntime's default block list.
FP16_BLOCKED_OPS = ("Softmax", "LayerNormalization", "SimplifiedLayerNormalization",
                    "SkipLayerNormalization", "SkipSimplifiedLayerNormalization")
# The RMSNorm chain after ReduceMean, as the TorchScript exporter writes it for Llama-style models.
RMS_NORM_TAIL = (("Add",), ("Sqrt",), ("Div", "Reciprocal"), ("Mul",))


def norm_node_names(model: onnx.ModelProto) -> list[str]:
    """Return the nodes of each RMSNorm: Pow -> ReduceMean -> Add -> Sqrt -> Div/Reciprocal -> Mul.

    Kept in fp32 because x**2 overflows fp16 once |x| > 256, which residual streams reach.
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    names: list[str] = []
    for node in model.graph.node:
        pow_node = producers.get(node.input[0]) if node.op_type == "ReduceMean" else None
        if pow_node is None or pow_node.op_type != "Pow":
            continue
        chain = [pow_node, node]
        current = node
        for allowed in RMS_NORM_TAIL:
            following = [c for c in consumers.get(current.output[0], []) if c.op_type in allowed]
            if not following:
                break
            current = following[0]
            chain.append(current)
        # Constants feeding the chain (eps, the exponent 2) must stay fp32 as well, or Add
        # would get one fp32 and one fp16 input.
        constants = [producers[name] for n in chain for name in n.input
                     if name in producers and producers[name].op_type == "Constant"]
        names += [n.name for n in chain + constants]
    return names


def keep_norms_fp32(model: onnx.ModelProto) -> list[str]:
    """Prepare `model` so that its RMSNorms stay fp32 under the fp16 conversion; return the nodes to block.

    The norm input (fp16 after conversion) reaches Pow and the final Mul through a new
    Cast to fp32, which joins the block list. The exporter's own Cast cannot be blocked,
    because its output also feeds the residual Add, which runs in fp16.
    """
    names = norm_node_names(model)
    blocked = set(names)
    nodes = list(model.graph.node)
    new_nodes = []
    cast_for: dict[str, str] = {}
    for node in nodes:
        if node.name in blocked and node.op_type in ("Pow", "Mul"):
            source = node.input[0]
            if source not in cast_for:
                cast_for[source] = f"{source}/fp32_for_norm"
                cast = onnx.helper.make_node("Cast", [source], [cast_for[source]], to=onnx.TensorProto.FLOAT,
                                             name=f"{source}/cast_fp32_for_norm")
                new_nodes.append(cast)
                names.append(cast.name)
            node.input[0] = cast_for[source]
        new_nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    return names


def remove_fp16_round_trips(model: onnx.ModelProto) -> int:
    """Remove Cast-to-fp16 followed by Cast-to-fp32 pairs, wiring the consumer to the fp32 value.

    onnxruntime's fp16 converter (1.32) casts the output of every blocked node to fp16 and
    back before the next blocked node, so x**2 in an RMSNorm still passes through fp16
    and overflows. Returns the number of Cast-to-fp32 nodes removed.
    """
    graph_outputs = {output.name for output in model.graph.output}
    casts_to = {node.output[0]: node for node in model.graph.node
                if node.op_type == "Cast" and onnx.helper.get_attribute_value(node.attribute[0]) == onnx.TensorProto.FLOAT16}
    rename: dict[str, str] = {}
    removed: set[str] = set()
    for node in model.graph.node:
        to_fp32 = node.op_type == "Cast" and onnx.helper.get_attribute_value(node.attribute[0]) == onnx.TensorProto.FLOAT
        if to_fp32 and node.input[0] in casts_to and node.output[0] not in graph_outputs:
            rename[node.output[0]] = casts_to[node.input[0]].input[0]
            removed.add(node.name)
    kept = []
    for node in model.graph.node:
        if node.name in removed:
            continue
        for index, name in enumerate(node.input):
            if name in rename:
                node.input[index] = rename[name]
        kept.append(node)
    # A Cast-to-fp16 whose output nothing reads any more goes too.
    used = {name for node in kept for name in node.input} | graph_outputs
    kept = [node for node in kept if not (node.output[0] in casts_to and node.output[0] not in used)]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    stale = set(rename) | {name for name in casts_to if name not in used}
    value_info = [value for value in model.graph.value_info if value.name not in stale]
    del model.graph.value_info[:]
    model.graph.value_info.extend(value_info)
    return len(removed)


def quantize_fp16(model: onnx.ModelProto, path: Path, options: dict) -> dict:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    node_block_list = keep_norms_fp32(model) if options["keep_fp32_norms"] else []
    op_block_list = list(DEFAULT_OP_BLOCK_LIST) + (list(FP16_BLOCKED_OPS) if options["keep_fp32_norms"] else [])
    # keep_io_types leaves logits and the KV cache in fp32, so the runtime's feeds do not change.
    # Shape inference stays on: the converter needs the value types to insert Casts around
    # blocked nodes, and without them blocked nodes silently run in fp16.
    converted = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False,
                                         op_block_list=op_block_list, node_block_list=node_block_list)
    round_trips = remove_fp16_round_trips(converted)
    _save(converted, path)
    return {"fp32_nodes": len(node_block_list), "fp16_round_trips_removed": round_trips,
            "fp32_op_types": sorted(set(op_block_list) - set(DEFAULT_OP_BLOCK_LIST))}


QUANTIZERS = {"int8": quantize_int8, "int8-static": quantize_int8_static, "int8-weight": quantize_nbits,
              "int4": quantize_nbits, "fp16": quantize_fp16}


def check_onnx_parity(reference_path: Path, candidate_path: Path, geometry: ModelGeometry, tokenizer_dir: Path,
                      eos_ids, pad_id: int, thresholds: dict, kind: str, max_new_tokens: int = 16,
                      decode_steps: int = 4, heldout_texts=None, heldout_tokens: int = 512) -> dict:
    """Compare two ONNX graphs (prompts, held-out text, greedy tokens) and apply `thresholds`."""
    from edgelm.export.parity import apply_thresholds, heldout_token_ids

    tokenizer = load_tokenizer(str(tokenizer_dir))
    prompts = parity_prompts(tokenizer)
    reference = OnnxDecoder(reference_path, geometry)
    candidate = OnnxDecoder(candidate_path, geometry)
    reference_tokens = [reference.greedy([p], max_new_tokens, eos_ids, pad_id)[0] for p in prompts]
    candidate_tokens = [candidate.greedy([p], max_new_tokens, eos_ids, pad_id)[0] for p in prompts]
    chunks = heldout_token_ids(tokenizer, heldout_texts, heldout_tokens)
    result = {"reference": "onnx-fp32", "prompts": len(prompts), "decode_steps": decode_steps,
              "max_new_tokens": max_new_tokens, "tolerance": thresholds.get("max_logits_diff")}
    result.update(measure_parity(reference, candidate, prompts, chunks, reference_tokens, candidate_tokens,
                                 decode_steps))
    return apply_thresholds(result, thresholds, kind)


def _check_int4_options(options: dict) -> None:
    block_size = options["block_size"]
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size={block_size!r} is not supported; MatMulNBits needs a power of two of at least 16 "
                         f"(16, 32, 64, 128, 256)")
    samples = options["calibration_samples"]
    if isinstance(samples, bool) or not isinstance(samples, int):
        raise ValueError(f"calibration_samples={samples!r} must be an integer")
    method = options["method"]
    if method not in INT4_METHODS:
        raise ValueError(f"method={method!r} is not an int4 method; use one of {INT4_METHODS}")
    if method == "gptq" and not options["symmetric"]:
        raise ValueError("method='gptq' writes symmetric int4 only; set symmetric=True (int4_symmetric: true)")
    if method == "gptq" and options["calibration_samples"] < 1:
        raise ValueError(f"calibration_samples={options['calibration_samples']} must be at least 1 for method='gptq'")


def _gptq_calibration_feeds(onnx_dir: Path, source: dict, samples: int, sequences=None):
    """Return the GPTQ prefill feeds of the given sequences, or of `samples` sequences sampled from the export.

    The export is checked before the sampling, so a wrong export fails in seconds, not minutes.
    """
    from edgelm.export.gptq import (SAMPLE_TOKENS, calibration_feeds, check_calibration_export, check_sequences,
                                    sample_sequences)

    check_calibration_export(source)
    max_positions = _max_positions(onnx_dir, source)
    if sequences is None:
        sequences = sample_sequences(onnx_dir, samples, tokens=min(SAMPLE_TOKENS, max_positions or SAMPLE_TOKENS))
    sequences = check_sequences(sequences, source["vocab_size"], max_positions)
    return calibration_feeds(source, sequences)


def _max_positions(onnx_dir: Path, manifest: dict) -> int | None:
    """Return the positions the export supports: the manifest's max_positions, else config.json's limit."""
    if manifest.get("max_positions"):
        return int(manifest["max_positions"])
    config_path = onnx_dir / "config.json"
    if config_path.is_file():
        limit = json.loads(config_path.read_text(encoding="utf-8")).get("max_position_embeddings")
        return int(limit) if limit else None
    return None


def calibration_prompts(tokenizer, texts, samples: int) -> list[list[int]]:
    """Token ids of up to `samples` chat prompts (user turn plus generation prompt) from `texts`."""
    prompts = []
    for text in list(texts)[:samples]:
        messages = [{"role": "user", "content": text}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        prompts.append(list(ids))
    return prompts


# Used only when quantize() gets no calibration_texts; the pipeline passes training questions.
DEFAULT_CALIBRATION_TEXTS = (
    "A farmer has 17 sheep and buys 9 more. How many sheep does he have now?",
    "Lena saves 5 dollars a week for 12 weeks. How much has she saved?",
    "A box holds 36 eggs. How many boxes are needed for 180 eggs?",
    "Sam ran 3.5 km on Monday and twice as far on Tuesday. How far did he run in total?",
    "A shop sells pens at 2 for 3 dollars. How much do 14 pens cost?",
    "There are 28 students and each table seats 4. How many tables are needed?",
    "A recipe needs 250 g of flour per cake. How much flour do 6 cakes need?",
    "Kim had 120 stickers and gave a quarter of them away. How many are left?",
)


def quantize(onnx_dir: str | Path, out_dir: str | Path, scheme: str, check: bool = True,
             max_logits_diff: float | None = None, strict: bool = False, thresholds: dict | None = None,
             heldout_texts=None, calibration_texts=None, calibration_sequences=None, **options) -> dict:
    """Quantize the fp32 export in `onnx_dir` with `scheme` into a new folder; return its manifest.

    `options` override the scheme's defaults (see SCHEMES). `thresholds` overrides the scheme's
    default parity thresholds, and `max_logits_diff` overrides that one key. With `check`, the
    manifest's `parity` entry and parity.json compare against the fp32 graph. A broken threshold
    is logged, and raises ParityError only when `strict` is True. `calibration_texts` are the
    user questions int8-static calibrates on. `calibration_sequences` are the token id lists
    int4 with method "gptq" calibrates on; without them it samples its own from the model
    (edgelm.export.gptq.sample_sequences).
    """
    from edgelm.export.parity import failure_message, write_parity

    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; use one of {sorted(SCHEMES)}")
    onnx_dir = Path(onnx_dir)
    if Path(out_dir).resolve() == onnx_dir.resolve():
        raise ValueError(f"out_dir {out_dir} is the fp32 export itself; write the quantized copy to another folder")
    source = read_manifest(onnx_dir)
    if source.get("variant") != "fp32":
        raise ValueError(f"{onnx_dir} contains variant {source.get('variant')!r}, but quantize() needs an fp32 "
                         f"export; pass the folder written by export_onnx")
    if check and source.get("kv_cache") == "gqa":
        raise ValueError(f"{onnx_dir} is a fused GroupQueryAttention export, and quantize()'s parity check drives "
                         f"the dynamic graph's inputs; use edgelm.export.fused_graph.quantize_fused (as `edgelm "
                         f"quantize` does), or pass check=False")
    settings = SCHEMES[scheme]
    unknown = set(options) - set(settings.options)
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)} for scheme {scheme!r}; "
                         f"supported: {sorted(settings.options)}")
    merged = {**settings.options, **options}
    limits = {**settings.thresholds, **(thresholds or {})}
    if max_logits_diff is not None:
        limits["max_logits_diff"] = max_logits_diff
    geometry = ModelGeometry(source["num_layers"], source["num_kv_heads"], source["head_dim"], source["vocab_size"])
    runtime_options = {**merged, "vocab_size": geometry.vocab_size}
    if scheme == "int8-static":
        tokenizer = load_tokenizer(str(onnx_dir))
        prompts = calibration_prompts(tokenizer, calibration_texts or DEFAULT_CALIBRATION_TEXTS,
                                      merged["calibration_samples"])
        runtime_options["calibration_reader"] = PrefillCalibrationReader(
            prompts, geometry.num_layers, geometry.num_kv_heads, geometry.head_dim)
    if scheme == "int4":
        _check_int4_options(merged)
    uses_gptq = scheme == "int4" and merged["method"] == "gptq"
    if uses_gptq:
        runtime_options["calibration_feeds"] = _gptq_calibration_feeds(onnx_dir, source, merged["calibration_samples"],
                                                                       calibration_sequences)
    elif calibration_sequences is not None:
        log.warning("calibration_sequences are used by int4 with method 'gptq' only, so scheme %s ignores them", scheme)

    with atomic_dir(out_dir) as tmp:
        for item in onnx_dir.iterdir():
            if item.is_file() and item.name not in (source["model_file"], EXTERNAL_DATA_FILE, MANIFEST_NAME,
                                                    "parity.json"):
                shutil.copy2(item, tmp / item.name)
        log.info("quantizing %s with scheme %s (%s)", onnx_dir, scheme, merged)
        notes = QUANTIZERS[scheme](_load_fp32(onnx_dir), tmp / source["model_file"], runtime_options)

        manifest = {**source, "variant": scheme, "source": str(onnx_dir)}
        manifest.pop("parity", None)
        manifest["opset"] = graph_opset(tmp / source["model_file"])
        manifest["quantization"] = {"scheme": scheme, "description": settings.description, **merged, **notes}
        manifest["file_size_bytes"] = model_size_bytes(tmp)
        manifest["fp32_file_size_bytes"] = source.get("file_size_bytes")
        if check:
            parity = check_onnx_parity(onnx_dir / source["model_file"], tmp / source["model_file"], geometry,
                                       onnx_dir, source["eos_token_ids"], source["pad_token_id"], limits, scheme,
                                       heldout_texts=heldout_texts)
            manifest["parity"] = parity
            write_parity(tmp, parity)
            if strict and not parity["passed"]:
                message = failure_message(parity, f"{scheme} quantization of {onnx_dir}")
                if scheme in MORE_ACCURATE:
                    message += f" Or quantize with another scheme: {MORE_ACCURATE[scheme]}."
                raise ParityError(message)
        write_json(tmp / MANIFEST_NAME, manifest)
    return manifest
