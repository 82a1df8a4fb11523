"""GPTQ int4: the MatMulNBits layout, the error it minimises, and quantize(method="gptq")."""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgelm.export.gptq import pack_int4, quantize_weight


def _correlated_inputs(rows: int, size: int, seed: int = 0) -> np.ndarray:
    """Inputs whose features are correlated and of unequal size, as a layer's inputs are."""
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((size, size)) * rng.uniform(0.1, 3.0, size)[:, None]
    return (rng.standard_normal((rows, size)) @ mixing).astype(np.float32)


def _dequantize(codes: np.ndarray, scales: np.ndarray, block_size: int) -> np.ndarray:
    """Return the weight [K, N] that codes [N, K] and scales [N, blocks] encode."""
    per_column = np.repeat(scales, block_size, axis=1)[:, : codes.shape[1]]
    return ((codes.astype(np.float32) - 8) * per_column).T


def _matmul_nbits(inputs: np.ndarray, codes: np.ndarray, scales: np.ndarray, block_size: int) -> np.ndarray:
    """Run one MatMulNBits node built from pack_int4's output in onnxruntime (fp32 compute)."""
    rows, size = codes.shape
    node = helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", K=size, N=rows, bits=4,
                            block_size=block_size)
    graph = helper.make_graph(
        [node], "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, rows])],
        [numpy_helper.from_array(pack_int4(codes, block_size), "b"), numpy_helper.from_array(scales.reshape(-1), "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": inputs})[0]


@pytest.mark.parametrize("size, block_size", [(96, 32), (80, 32), (64, 64)])
def test_packed_codes_run_in_matmul_nbits(size, block_size):
    # 80 is not a multiple of 32: the last block is padded with code 8, which is zero.
    inputs = _correlated_inputs(16, size)
    weight = np.random.default_rng(1).standard_normal((size, 24)).astype(np.float32)
    codes, scales = quantize_weight(weight, (inputs.T @ inputs).astype(np.float64), block_size)
    assert codes.shape == (24, size)
    assert codes.max() <= 15
    expected = inputs @ _dequantize(codes, scales, block_size)
    np.testing.assert_allclose(_matmul_nbits(inputs, codes, scales, block_size), expected, rtol=1e-4, atol=1e-3)


def test_gptq_output_error_below_round_to_nearest():
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    size, rows, block_size = 128, 32, 32
    inputs = _correlated_inputs(512, size)
    weight = np.random.default_rng(2).standard_normal((size, rows)).astype(np.float32)
    codes, scales = quantize_weight(weight, (inputs.T @ inputs).astype(np.float64) / len(inputs), block_size)
    gptq_error = np.square(inputs @ (_dequantize(codes, scales, block_size) - weight)).mean()

    blocks = size // block_size
    packed = np.zeros((rows, blocks, block_size // 2), np.uint8)
    rtn_scales = np.zeros((rows, blocks), np.float32)
    quantize_matmul_4bits(packed, weight, rtn_scales, np.zeros((rows, 1), np.uint8), block_size, rows, size, True)
    rtn_codes = np.stack([packed & 15, packed >> 4], axis=-1).reshape(rows, size)
    rtn_error = np.square(inputs @ (_dequantize(rtn_codes, rtn_scales, block_size) - weight)).mean()
    assert gptq_error < 0.7 * rtn_error


def test_dead_input_gets_zero_weight():
    inputs = _correlated_inputs(64, 32)
    inputs[:, 5] = 0.0  # an input that never fires: its weights cannot matter and must not break the inverse
    weight = np.random.default_rng(3).standard_normal((32, 8)).astype(np.float32)
    codes, scales = quantize_weight(weight, (inputs.T @ inputs).astype(np.float64), 32)
    assert np.all(_dequantize(codes, scales, 32)[5] == 0.0)
    assert np.isfinite(scales).all()


torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def fused_fp32(tiny_model_factory, tmp_path_factory):
    from edgelm.export.fused_graph import export_fused

    out = tmp_path_factory.mktemp("gptq-fused") / "fp32"
    return out, export_fused(tiny_model_factory("llama"), out)


def test_quantize_fused_with_gptq(fused_fp32, tmp_path):
    from edgelm.export.fused_graph import quantize_fused

    fp32_dir, fp32_manifest = fused_fp32
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, fp32_manifest["vocab_size"], 40).tolist() for _ in range(4)]
    manifest = quantize_fused(fp32_dir, tmp_path / "gptq", block_size=32, symmetric=True, lm_head="int4",
                              method="gptq", calibration_sequences=sequences)
    model = onnx.load(str(tmp_path / "gptq" / "model.onnx"))
    counts = collections.Counter(node.op_type for node in model.graph.node)
    assert counts["MatMulNBits"] == 4 * fp32_manifest["num_layers"] + 1
    assert counts["MatMul"] == 0
    assert counts["GatherBlockQuantized"] == 1
    assert {attribute.i for node in model.graph.node if node.op_type == "MatMulNBits"
            for attribute in node.attribute if attribute.name == "block_size"} == {32}
    quantization = manifest["quantization"]
    assert quantization["method"] == "gptq"
    assert quantization["calibration_tokens"] == 160
    assert manifest["parity"]["top1_agreement"] >= 0.9


def test_gptq_samples_its_own_calibration(fused_fp32, tmp_path):
    from edgelm.export.fused_graph import quantize_fused

    fp32_dir, fp32_manifest = fused_fp32
    manifest = quantize_fused(fp32_dir, tmp_path / "gptq", block_size=64, symmetric=True, lm_head="int8",
                              method="gptq", calibration_samples=2, check=False)
    assert manifest["quantization"]["calibration_tokens"] == 2 * 256
    assert manifest["quantization"]["lm_head_precision"] == "int8"


@pytest.mark.parametrize("options, message", [
    ({"method": "gptq", "symmetric": False}, "symmetric"),
    ({"method": "awq"}, "method='awq'"),
    ({"method": "gptq", "symmetric": True, "calibration_samples": 0}, "calibration_samples=0"),
    ({"method": "gptq", "symmetric": True, "calibration_samples": 1.5}, "calibration_samples=1.5 must be an integer"),
    ({"block_size": 48}, "block_size=48 is not supported"),
    ({"block_size": 0}, "block_size=0 is not supported"),
])
def test_bad_gptq_options_raise(fused_fp32, tmp_path, options, message):
    from edgelm.export.quantize import quantize

    with pytest.raises(ValueError, match=message):
        quantize(fused_fp32[0], tmp_path / "out", "int4", check=False, **options)
    assert not (tmp_path / "out").exists()


def test_gptq_on_dynamic_export(tiny_model_factory, tmp_path):
    from edgelm.export.onnx_export import export_onnx
    from edgelm.export.quantize import quantize

    fp32 = export_onnx(tiny_model_factory("llama"), tmp_path / "fp32")
    sequences = [list(range(100, 130)), list(range(200, 220))]
    manifest = quantize(tmp_path / "fp32", tmp_path / "gptq", "int4", symmetric=True, block_size=32, method="gptq",
                        calibration_sequences=sequences)
    assert manifest["quantization"]["calibration_tokens"] == 50
    assert manifest["quantization"]["fp32_matmul_nodes_left"] == 0
    assert manifest["quantization"]["matmul_nbits_nodes"] >= 7 * fp32["num_layers"]
    assert manifest["parity"]["top1_agreement"] >= 0.9


@pytest.mark.parametrize("sequences, message", [
    ([[1, 2, 49152]], "token id 49152, outside the vocabulary"),
    ([[1, -5, 3]], "token id -5, outside the vocabulary"),
    ([[1, 2, 3], []], "calibration sequence 1 is empty"),
    ([list(range(600))], "600 tokens, more than the model's 512 positions"),
])
def test_bad_calibration_sequences_raise(fused_fp32, tmp_path, sequences, message):
    from edgelm.export.quantize import quantize

    with pytest.raises(ValueError, match=message):
        quantize(fused_fp32[0], tmp_path / "out", "int4", check=False, symmetric=True, method="gptq",
                 calibration_sequences=sequences)
    assert not (tmp_path / "out").exists()


def test_fixed_capacity_export_rejected_before_sampling(tiny_model_factory, tmp_path, monkeypatch):
    import edgelm.export.gptq as gptq
    from edgelm.export.kv_buffer import export_kv_buffer
    from edgelm.export.quantize import quantize

    export_kv_buffer(tiny_model_factory("llama"), tmp_path / "kvbuf")
    monkeypatch.setattr(gptq, "sample_sequences", lambda *args, **kwargs: pytest.fail("sampled before the check"))
    with pytest.raises(ValueError, match="not kv_cache 'buffer"):
        quantize(tmp_path / "kvbuf", tmp_path / "out", "int4", check=False, symmetric=True, method="gptq")


def test_quantize_into_source_folder_rejected(fused_fp32):
    from edgelm.export.quantize import quantize

    with pytest.raises(ValueError, match="is the fp32 export itself"):
        quantize(fused_fp32[0], fused_fp32[0], "int4", check=False)


def test_parity_check_on_fused_export_names_quantize_fused(fused_fp32, tmp_path):
    from edgelm.export.quantize import quantize

    with pytest.raises(ValueError, match="quantize_fused"):
        quantize(fused_fp32[0], tmp_path / "out", "int4")


def test_cli_quantizes_fused_export_with_gptq(fused_fp32, tmp_path, capsys):
    from edgelm.cli import main

    out = tmp_path / "gptq"
    command = ["quantize", "--onnx", str(fused_fp32[0]), "--out", str(out), "--scheme", "int4", "--no-asymmetric",
               "--block-size", "32", "--lm-head", "int4", "--method", "gptq", "--calibration-samples", "2"]
    assert main(command) == 0
    manifest = json.loads((out / "edgelm_export.json").read_text())
    assert manifest["kv_cache"] == "gqa"
    assert manifest["quantization"]["method"] == "gptq"
    assert manifest["parity"]["reference"] == "onnx-fp32-fused"


def test_cli_rejects_int8_on_fused_export(fused_fp32, tmp_path, caplog):
    from edgelm.cli import main

    assert main(["quantize", "--onnx", str(fused_fp32[0]), "--out", str(tmp_path / "x"), "--scheme", "int8"]) == 2
    assert "use --scheme int4" in caplog.text
