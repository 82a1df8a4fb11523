"""Quantized variants of a tiny export: interface, parity report, fp16 safety, int4 and int8 options.

Tiny random models sit far from any trained weight distribution. These tests therefore
check mechanics and hard cases (fp16 mask overflow, norms kept fp32, LM head precision),
not the accuracy thresholds. docs/export.md has the numbers measured on the real student.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from edgelm.export.onnx_export import (
    MASK_VALUE,
    ModelGeometry,
    OnnxDecoder,
    ParityError,
    export_onnx,
    input_names,
    output_names,
    parity_prompts,
)
from edgelm.export.quantize import SCHEMES, lm_head_node, norm_node_names, quantize
from edgelm.train.models import load_tokenizer

try:
    import onnxruntime_genai as og
except ImportError:  # optional: the genai test skips without it
    og = None


@pytest.fixture(scope="module")
def llama_dir(tiny_model_factory):
    # initializer_range=0.2 so that greedy output varies (see tests/test_export.py).
    return tiny_model_factory("llama", initializer_range=0.2)


@pytest.fixture(scope="module")
def fp32_export(llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp32") / "llama-onnx"
    return out, export_onnx(llama_dir, out)


@pytest.fixture(scope="module")
def quantized_exports(fp32_export, tmp_path_factory):
    out, _ = fp32_export
    root = tmp_path_factory.mktemp("quantized")
    return {scheme: (root / scheme, quantize(out, root / scheme, scheme)) for scheme in SCHEMES}


def geometry_of(manifest: dict) -> ModelGeometry:
    return ModelGeometry(manifest["num_layers"], manifest["num_kv_heads"], manifest["head_dim"], manifest["vocab_size"])


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_variant_loads_and_runs(scheme, quantized_exports, fp32_export):
    _, fp32_manifest = fp32_export
    folder, manifest = quantized_exports[scheme]
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    layers = manifest["num_layers"]
    assert [i.name for i in session.get_inputs()] == input_names(layers)
    assert [o.name for o in session.get_outputs()] == output_names(layers)
    assert manifest["variant"] == scheme
    assert manifest["file_size_bytes"] < fp32_manifest["file_size_bytes"]
    files = [folder / "model.onnx", folder / "model.onnx.data"]
    assert manifest["file_size_bytes"] == sum(path.stat().st_size for path in files if path.is_file())
    assert (folder / "tokenizer.json").is_file()
    assert (folder / "genai_config.json").is_file()
    decoder = OnnxDecoder(folder / "model.onnx", geometry_of(manifest))
    tokens = decoder.greedy([[1, 2, 3, 4]], 5, manifest["eos_token_ids"], manifest["pad_token_id"])[0]
    assert 1 <= len(tokens) <= 5


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_variant_parity_report(scheme, quantized_exports):
    folder, manifest = quantized_exports[scheme]
    parity = json.loads((folder / "parity.json").read_text())
    assert parity == manifest["parity"]
    assert parity["reference"] == "onnx-fp32"
    assert parity["kind"] == scheme
    assert parity["thresholds"] == SCHEMES[scheme].thresholds
    assert parity["heldout_tokens"] >= 200
    for key in ("max_logits_diff", "heldout_top1_agreement", "ppl_increase", "greedy_token_agreement"):
        assert np.isfinite(parity[key]), key
    assert 0.0 <= parity["heldout_top1_agreement"] <= 1.0
    assert parity["passed"] == (parity["failures"] == [])


def test_strict_threshold_names_config_key(fp32_export, tmp_path):
    out, _ = fp32_export
    target = tmp_path / "int4"
    with pytest.raises(ParityError, match=r"export\.parity\.int4\.min_top1_agreement=1 but measured"):
        quantize(out, target, "int4", strict=True, thresholds={"min_top1_agreement": 1.0})
    assert not target.exists()


def test_int8_parity_failure_suggests_int8_weight(fp32_export, tmp_path):
    out, _ = fp32_export
    with pytest.raises(ParityError, match=r"another scheme: int8-weight keeps activations in fp32"):
        quantize(out, tmp_path / "int8", "int8", strict=True, thresholds={"min_top1_agreement": 1.0})


def test_int4_quantizes_lm_head_and_embedding(quantized_exports):
    folder, manifest = quantized_exports["int4"]
    notes = manifest["quantization"]
    assert notes["fp32_matmul_nodes_left"] == 0
    assert notes["embedding_quantized"] is True
    assert notes["lm_head_precision"] == "int8"
    assert (notes["block_size"], notes["symmetric"]) == (16, False)
    ops = {node.op_type for node in onnx.load(str(folder / "model.onnx")).graph.node}
    assert "MatMulNBits" in ops
    assert "GatherBlockQuantized" in ops


@pytest.mark.parametrize("lm_head, bits, fp32_left", [("int4", 4, 0), ("int8", 8, 0), ("fp32", None, 1)])
def test_int4_lm_head_precision(lm_head, bits, fp32_left, fp32_export, tmp_path):
    out, manifest = fp32_export
    result = quantize(out, tmp_path / lm_head, "int4", check=False, lm_head=lm_head)
    assert result["quantization"]["lm_head_precision"] == lm_head
    assert result["quantization"]["fp32_matmul_nodes_left"] == fp32_left
    model = onnx.load(str(tmp_path / lm_head / "model.onnx"))
    head = next(node for node in model.graph.node if "logits" in node.output or node.name == result["quantization"]["lm_head_node"])
    if bits is None:
        assert head.op_type == "MatMul"
    else:
        assert head.op_type == "MatMulNBits"
        assert next(a.i for a in head.attribute if a.name == "bits") == bits


def test_int4_options_recorded(fp32_export, tmp_path):
    out, _ = fp32_export
    result = quantize(out, tmp_path / "int4-b16", "int4", check=False, block_size=16, symmetric=False,
                      accuracy_level=4)
    notes = result["quantization"]
    assert (notes["block_size"], notes["symmetric"], notes["accuracy_level"]) == (16, False, 4)
    model = onnx.load(str(tmp_path / "int4-b16" / "model.onnx"))
    nbits = [node for node in model.graph.node if node.op_type == "MatMulNBits"]
    assert {next(a.i for a in node.attribute if a.name == "block_size") for node in nbits} == {16}
    assert {next(a.i for a in node.attribute if a.name == "accuracy_level") for node in nbits} == {4}
    assert all(len(node.input) >= 4 and node.input[3] for node in nbits)  # zero points when asymmetric


@pytest.mark.parametrize("scheme", ["int8", "int8-static"])
def test_int8_quantizes_lm_head_and_embedding(scheme, quantized_exports, fp32_export):
    folder, manifest = quantized_exports[scheme]
    assert manifest["quantization"]["fp32_matmul_nodes_left"] == 0
    model = onnx.load(str(folder / "model.onnx"))
    fp32_tables = [init for init in model.graph.initializer
                   if init.data_type == onnx.TensorProto.FLOAT and len(init.dims) == 2
                   and manifest["vocab_size"] in init.dims]
    assert fp32_tables == [], "the embedding table is still fp32"
    assert lm_head_node(model, manifest["vocab_size"]) is None  # no fp32 MatMul ends in the vocabulary


def test_int8_static_is_qdq_and_calibrated(quantized_exports):
    folder, manifest = quantized_exports["int8-static"]
    ops = [node.op_type for node in onnx.load(str(folder / "model.onnx")).graph.node]
    assert "QuantizeLinear" in ops
    assert "DequantizeLinear" in ops
    assert "MatMulInteger" not in ops
    # quantize() without calibration_texts calibrates on its 8 built-in questions.
    assert manifest["quantization"]["calibration_prompts"] == 8


def test_fp16_keeps_fp32_interface(quantized_exports):
    folder, _ = quantized_exports["fp16"]
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert {i.type for i in session.get_inputs() if i.name.startswith("past")} == {"tensor(float)"}
    assert {o.type for o in session.get_outputs()} == {"tensor(float)"}


def test_fp16_keeps_norms_and_softmax_fp32(fp32_export, quantized_exports):
    out, _ = fp32_export
    fp32_model = onnx.load(str(out / "model.onnx"))
    norm_nodes = set(norm_node_names(fp32_model))
    pow_count = sum(node.op_type == "Pow" for node in fp32_model.graph.node)
    assert pow_count >= 5  # 2 layers x 2 norms + final norm
    assert sum(name in norm_nodes for name in (n.name for n in fp32_model.graph.node if n.op_type == "Pow")) == pow_count
    folder, _ = quantized_exports["fp16"]
    model = onnx.shape_inference.infer_shapes(onnx.load(str(folder / "model.onnx")))
    types = {value.name: value.type.tensor_type.elem_type for value in model.graph.value_info}
    checked = 0
    for node in model.graph.node:
        if node.op_type in ("Pow", "ReduceMean", "Softmax"):
            assert types.get(node.input[0]) == onnx.TensorProto.FLOAT, node.name
            checked += 1
    assert checked >= 2 * pow_count


def test_fp16_left_padded_batch_is_finite(quantized_exports, llama_dir):
    folder, manifest = quantized_exports["fp16"]
    decoder = OnnxDecoder(folder / "model.onnx", geometry_of(manifest))
    eos, pad = manifest["eos_token_ids"], manifest["pad_token_id"]
    short, long = sorted(parity_prompts(load_tokenizer(str(llama_dir)))[:2], key=len)
    short = short[: len(long) - 7]
    from edgelm.export.onnx_export import left_pad

    input_ids, attention_mask, position_ids = left_pad([short, long], pad)
    logits, past = decoder.step(input_ids, attention_mask, position_ids, decoder.empty_past(2))
    assert np.isfinite(logits).all()
    assert all(np.isfinite(tensor).all() for tensor in past)
    batch = decoder.greedy([short, long], 8, eos, pad)
    assert batch[0] == decoder.greedy([short], 8, eos, pad)[0]


def test_fp16_mask_value_survives_fp16(quantized_exports):
    """An fp32-minimum mask fill overflows to -inf in fp16; MASK_VALUE plus a score stays finite."""
    with np.errstate(over="ignore"):
        assert np.isinf(np.float16(np.finfo(np.float32).min))
        # The fp16 converter clamps the fp32 minimum to -65504, and adding any score below -16 overflows.
        assert np.isinf(np.float16(-65504.0) + np.float16(-20.0))
    assert np.isfinite(np.float16(MASK_VALUE) + np.float16(-1000.0))
    assert np.exp(np.float16(MASK_VALUE)) == 0
    folder, _ = quantized_exports["fp16"]
    model = onnx.load(str(folder / "model.onnx"))
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.name == "value" and attribute.t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
                array = numpy_helper.to_array(attribute.t)
                assert np.isfinite(array).all(), node.name
                assert array.min(initial=0) >= MASK_VALUE, node.name


@pytest.mark.skipif(og is None, reason="onnxruntime-genai is not installed (pip install onnxruntime-genai)")
def test_int4_genai_matches_greedy(quantized_exports, llama_dir):
    folder, manifest = quantized_exports["int4"]
    prompt = parity_prompts(load_tokenizer(str(llama_dir)))[0]
    decoder = OnnxDecoder(folder / "model.onnx", geometry_of(manifest))
    expected = decoder.greedy([prompt], 8, manifest["eos_token_ids"], manifest["pad_token_id"])[0]
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + 8)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    assert tokens == expected


def test_quantize_rejects_unknown_scheme(fp32_export, tmp_path):
    out, _ = fp32_export
    with pytest.raises(ValueError, match="unknown quantization scheme 'int2'"):
        quantize(out, tmp_path / "q", "int2")
    with pytest.raises(ValueError, match="unknown options"):
        quantize(out, tmp_path / "q", "int8", block_size=16)
    with pytest.raises(ValueError, match="lm_head='int2'"):
        quantize(out, tmp_path / "q", "int4", check=False, lm_head="int2")


def test_fp16_norms_survive_large_activations(fp32_export, tmp_path):
    """Hidden states near 1000 overflow x**2 in fp16; the fp32 RMSNorm path keeps logits at fp32 values.

    onnxruntime CPU runs several fp16 ops in fp32 internally, so the unprotected graph does
    not overflow here either. The check guards the protected path: before the Cast round
    trips were removed, it gave logits 14.9 away from fp32.
    """
    import shutil

    out, manifest = fp32_export
    scaled = tmp_path / "scaled-onnx"
    shutil.copytree(out, scaled)
    model = onnx.load(str(scaled / "model.onnx"))
    for index, init in enumerate(model.graph.initializer):
        if len(init.dims) == 2 and init.dims[0] == manifest["vocab_size"]:
            table = numpy_helper.to_array(init) * 2000.0
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(table.astype(np.float32), init.name))
    onnx.save(model, str(scaled / "model.onnx"))

    prompt = np.array([[5, 6, 7, 8, 9, 10]], dtype=np.int64)
    feeds = (prompt, np.ones_like(prompt), np.arange(6, dtype=np.int64)[None])
    geometry = geometry_of(manifest)
    reference = OnnxDecoder(scaled / "model.onnx", geometry)
    expected, _ = reference.step(*feeds, reference.empty_past(1))
    result = quantize(scaled, tmp_path / "fp16", "fp16", check=False)
    assert result["quantization"]["fp16_round_trips_removed"] > 0
    decoder = OnnxDecoder(tmp_path / "fp16" / "model.onnx", geometry)
    logits, _ = decoder.step(*feeds, decoder.empty_past(1))
    assert float(np.abs(logits - expected).max()) < 0.5

    fp16_model = onnx.load(str(tmp_path / "fp16" / "model.onnx"))
    producers = {out: node for node in fp16_model.graph.node for out in node.output}
    for node in fp16_model.graph.node:
        if node.op_type == "ReduceMean":
            assert producers[node.input[0]].op_type == "Pow", node.name
