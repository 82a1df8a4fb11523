"""Quantize an exported ONNX folder (int8, int8-weight, int4 or fp16) and check it against the fp32 graph.

Every scheme keeps the graph's input and output names and dtypes, so the runtime loads a
quantized folder exactly like the fp32 one. The parity check compares the quantized graph
with the fp32 graph in onnxruntime (no PyTorch needed) and reports the numbers; it raises
only with `strict=True`.
"""

from __future__ import annotations

import copy
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
    PROTOBUF_LIMIT_BYTES,
    ModelGeometry,
    OnnxDecoder,
    ParityError,
    compare_greedy,
    compare_logits,
    graph_opset,
    model_size_bytes,
    read_manifest,
)
from edgelm.files import atomic_dir, write_json
from edgelm.train.models import load_tokenizer

log = logging.getLogger(__name__)

INT4_GATHER_OPSET = 21


@dataclass(frozen=True)
class Scheme:
    """One quantization recipe; `tolerance` is the logits difference above which parity reports a failure."""

    description: str
    tolerance: float
    options: dict = field(default_factory=dict)


SCHEMES = {
    "int8": Scheme("dynamic int8: MatMul weights QInt8 per output channel, activations quantized at run time",
                   tolerance=1.0, options={"per_channel": True}),
    "int8-weight": Scheme("weight-only int8 (MatMulNBits, 8 bits), block-wise scales, fp32 activations",
                          tolerance=2.0, options={"block_size": 32, "symmetric": True, "accuracy_level": None,
                                                  "quantize_embedding": False, "bits": 8}),
    "int4": Scheme("weight-only int4 (MatMulNBits), block-wise scales, fp32 activations",
                   tolerance=2.0, options={"block_size": 32, "symmetric": True, "accuracy_level": None,
                                           "quantize_embedding": True, "bits": 4}),
    "fp16": Scheme("fp16 weights and compute, fp32 graph inputs and outputs",
                   tolerance=0.1),
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
    large = model.ByteSize() >= PROTOBUF_LIMIT_BYTES
    onnx.save_model(model, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=EXTERNAL_DATA_FILE, size_threshold=1024)


def quantize_int8(model: onnx.ModelProto, path: Path, options: dict) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # NOTE: graphs over 2 GiB take the external-data path, which no test here runs.
    quantize_dynamic(model, str(path), op_types_to_quantize=["MatMul"], per_channel=options["per_channel"],
                     weight_type=QuantType.QInt8, use_external_data_format=model.ByteSize() >= PROTOBUF_LIMIT_BYTES)
    return {}


def quantize_nbits(model: onnx.ModelProto, path: Path, options: dict) -> dict:
    """Quantize MatMul weights (the LM head included) to `bits` bits and, if asked, the embedding Gather.

    The embedding uses GatherBlockQuantized (onnxruntime >= 1.20), which needs the graph at
    opset 21 and IR version 10 for int4 tensors. If that fails, the embedding stays fp32
    and the manifest records the error.
    """
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    notes: dict = {}
    op_types = ("MatMul", "Gather") if options["quantize_embedding"] else ("MatMul",)
    try:
        quantized = _run_nbits(nbits, model, op_types, options)
        _check_loads(quantized)
        notes["embedding_quantized"] = "Gather" in op_types
    except Exception as error:  # noqa: BLE001 - any failure of the optional Gather path falls back
        if "Gather" not in op_types:
            raise
        log.warning("quantized embedding (GatherBlockQuantized) failed, keeping the embedding in fp32: %s", error)
        notes["embedding_quantized"] = False
        notes["embedding_error"] = str(error)[:500]
        quantized = _run_nbits(nbits, model, ("MatMul",), options)
    counts = _op_counts(quantized)
    notes["matmul_nbits_nodes"] = counts.get("MatMulNBits", 0)
    notes["fp32_matmul_nodes_left"] = _constant_matmuls(quantized)
    _save(quantized, path)
    return notes


def _run_nbits(nbits, model: onnx.ModelProto, op_types: tuple[str, ...], options: dict) -> onnx.ModelProto:
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
    quantizer = nbits.MatMulNBitsQuantizer(model, algo_config=config)
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
    initializers = {init.name for init in model.graph.initializer}
    return sum(1 for node in model.graph.node if node.op_type == "MatMul" and node.input[1] in initializers)


def quantize_fp16(model: onnx.ModelProto, path: Path, options: dict) -> dict:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # keep_io_types leaves logits and the KV cache in fp32, so the runtime's feeds do not change.
    converted = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
    _save(converted, path)
    return {}


QUANTIZERS = {"int8": quantize_int8, "int8-weight": quantize_nbits, "int4": quantize_nbits, "fp16": quantize_fp16}


def check_onnx_parity(reference_path: Path, candidate_path: Path, geometry: ModelGeometry, tokenizer_dir: Path,
                      eos_ids, pad_id: int, tolerance: float, max_new_tokens: int = 16,
                      decode_steps: int = 4) -> dict:
    """Compare two ONNX graphs on the parity prompts: logits difference and greedy agreement."""
    from edgelm.export.onnx_export import parity_prompts

    prompts = parity_prompts(load_tokenizer(str(tokenizer_dir)))
    reference = OnnxDecoder(reference_path, geometry)
    candidate = OnnxDecoder(candidate_path, geometry)
    result = {"reference": "onnx-fp32", "prompts": len(prompts), "decode_steps": decode_steps,
              "max_new_tokens": max_new_tokens, "tolerance": tolerance}
    result.update(compare_logits(reference, candidate, prompts, decode_steps))
    reference_tokens = [reference.greedy([p], max_new_tokens, eos_ids, pad_id)[0] for p in prompts]
    candidate_tokens = [candidate.greedy([p], max_new_tokens, eos_ids, pad_id)[0] for p in prompts]
    result.update(compare_greedy(reference_tokens, candidate_tokens))
    result["passed"] = result["max_logits_diff"] <= tolerance
    return result


def quantize(onnx_dir: str | Path, out_dir: str | Path, scheme: str, check: bool = True,
             max_logits_diff: float | None = None, strict: bool = False, **options) -> dict:
    """Quantize the fp32 export in `onnx_dir` with `scheme` into a new folder; return its manifest.

    `options` override the scheme's defaults (int8: per_channel; int8-weight and int4:
    block_size, symmetric, accuracy_level, quantize_embedding, bits). With `check`, the manifest's `parity`
    entry compares against the fp32 graph. A logits difference over `max_logits_diff`
    (default: the scheme's tolerance) or a greedy mismatch is reported, and raises
    ParityError only when `strict` is True.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; use one of {sorted(SCHEMES)}")
    onnx_dir = Path(onnx_dir)
    source = read_manifest(onnx_dir)
    if source.get("variant") != "fp32":
        raise ValueError(f"{onnx_dir} contains variant {source.get('variant')!r}, but quantize() needs an fp32 "
                         f"export; pass the folder written by export_onnx")
    settings = SCHEMES[scheme]
    unknown = set(options) - set(settings.options)
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)} for scheme {scheme!r}; "
                         f"supported: {sorted(settings.options)}")
    merged = {**settings.options, **options}
    tolerance = settings.tolerance if max_logits_diff is None else max_logits_diff

    with atomic_dir(out_dir) as tmp:
        for item in onnx_dir.iterdir():
            if item.is_file() and item.name not in (source["model_file"], EXTERNAL_DATA_FILE, MANIFEST_NAME):
                shutil.copy2(item, tmp / item.name)
        log.info("quantizing %s with scheme %s (%s)", onnx_dir, scheme, merged)
        notes = QUANTIZERS[scheme](_load_fp32(onnx_dir), tmp / source["model_file"], merged)

        manifest = {**source, "variant": scheme, "source": str(onnx_dir)}
        manifest.pop("parity", None)
        manifest["opset"] = graph_opset(tmp / source["model_file"])
        manifest["quantization"] = {"scheme": scheme, "description": settings.description, **merged, **notes}
        manifest["file_size_bytes"] = model_size_bytes(tmp)
        manifest["fp32_file_size_bytes"] = source.get("file_size_bytes")
        if check:
            geometry = ModelGeometry(source["num_layers"], source["num_kv_heads"], source["head_dim"],
                                     source["vocab_size"])
            parity = check_onnx_parity(onnx_dir / source["model_file"], tmp / source["model_file"], geometry,
                                       onnx_dir, source["eos_token_ids"], source["pad_token_id"], tolerance)
            manifest["parity"] = parity
            level = logging.INFO if parity["passed"] else logging.WARNING
            log.log(level, "%s parity vs fp32 ONNX: max logits diff %.3g (tolerance %.3g), top-1 agreement "
                    "%.3f, greedy token agreement %.2f", scheme, parity["max_logits_diff"], tolerance,
                    parity["top1_agreement"], parity["greedy_token_agreement"])
            if strict and not (parity["passed"] and parity["greedy_match"]):
                raise ParityError(
                    f"{scheme} model differs from fp32: max logits diff {parity['max_logits_diff']:.3g} "
                    f"(tolerance {tolerance:.3g}), greedy match {parity['greedy_match']}; "
                    f"pass strict=False to keep it and read the numbers in the manifest"
                )
        write_json(tmp / MANIFEST_NAME, manifest)
    return manifest
