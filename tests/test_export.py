"""ONNX export with KV cache: interface, parity with PyTorch per family, onnxruntime-genai loading.

Tiny models use initializer_range=0.2: with the default 0.02, random models greedily
repeat one token, and a left-padding bug could not change their output.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

try:
    import onnxruntime_genai as og
except ImportError:  # optional: the genai tests skip without it
    og = None

from edgelm.export.onnx_export import (
    MASK_VALUE,
    ModelGeometry,
    OnnxDecoder,
    ParityError,
    export_onnx,
    input_names,
    load_for_export,
    output_names,
    parity_prompts,
    torch_greedy,
)
from edgelm.export.quantize import quantize
from edgelm.train.models import end_of_turn_token, load_tokenizer

from conftest import SMOLLM2_GGUF, requires_smollm2


@pytest.fixture(scope="module")
def llama_dir(tiny_model_factory):
    return tiny_model_factory("llama", initializer_range=0.2)


@pytest.fixture(scope="module")
def llama_export(llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "llama-onnx"
    manifest = export_onnx(llama_dir, out)
    return out, manifest


def geometry_of(manifest: dict) -> ModelGeometry:
    return ModelGeometry(manifest["num_layers"], manifest["num_kv_heads"], manifest["head_dim"], manifest["vocab_size"])


def test_interface_names_and_axes(llama_export):
    out, manifest = llama_export
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    layers = manifest["num_layers"]
    assert [i.name for i in session.get_inputs()] == input_names(layers)
    assert [o.name for o in session.get_outputs()] == output_names(layers)
    inputs = {i.name: i for i in session.get_inputs()}
    assert inputs["input_ids"].type == "tensor(int64)"
    assert inputs["attention_mask"].type == "tensor(int64)"
    assert inputs["position_ids"].type == "tensor(int64)"
    past = inputs["past_key_values.0.key"]
    assert past.type == "tensor(float)"
    assert isinstance(past.shape[0], str)
    assert isinstance(past.shape[2], str)
    assert past.shape[1] == manifest["num_kv_heads"]
    assert past.shape[3] == manifest["head_dim"]
    assert all(isinstance(d, str) for d in inputs["input_ids"].shape)


def test_output_shapes_prefill_and_decode(llama_export):
    out, manifest = llama_export
    decoder = OnnxDecoder(out / "model.onnx", geometry_of(manifest))
    ids = np.array([[5, 6, 7, 8], [9, 10, 11, 12]], dtype=np.int64)
    logits, past = decoder.step(ids, np.ones_like(ids), np.tile(np.arange(4), (2, 1)), decoder.empty_past(2))
    assert logits.shape == (2, 4, manifest["vocab_size"])
    assert len(past) == 2 * manifest["num_layers"]
    assert past[0].shape == (2, manifest["num_kv_heads"], 4, manifest["head_dim"])
    logits, past = decoder.step(ids[:, :1], np.ones((2, 5), dtype=np.int64), np.full((2, 1), 4), past)
    assert logits.shape == (2, 1, manifest["vocab_size"])
    assert past[1].shape == (2, manifest["num_kv_heads"], 5, manifest["head_dim"])


def test_folder_files_and_manifest(llama_export, llama_dir):
    out, manifest = llama_export
    for name in ("model.onnx", "tokenizer.json", "tokenizer_config.json", "config.json",
                 "generation_config.json", "genai_config.json", "edgelm_export.json"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "edgelm_export.json").read_text())
    assert on_disk == manifest
    assert manifest["format"] == "edgelm-onnx"
    assert manifest["format_version"] == 1
    assert manifest["variant"] == "fp32"
    assert manifest["model_type"] == "llama"
    assert (manifest["num_layers"], manifest["num_kv_heads"], manifest["head_dim"]) == (2, 2, 16)
    tokenizer = load_tokenizer(str(llama_dir))
    assert tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer)) in manifest["eos_token_ids"]
    assert manifest["opset"] == 17
    assert manifest["file_size_bytes"] == (out / "model.onnx").stat().st_size


def test_parity_report_written(llama_export):
    out, manifest = llama_export
    parity = json.loads((out / "parity.json").read_text())
    assert parity == manifest["parity"]
    assert parity["kind"] == "fp32"
    assert parity["heldout_tokens"] >= 200
    assert parity["heldout_top1_agreement"] == 1.0
    assert abs(parity["ppl_increase"]) < 1e-4
    assert parity["greedy_token_agreement"] == 1.0
    assert parity["failures"] == []
    assert set(parity["thresholds"]) == {"max_logits_diff", "min_top1_agreement", "max_ppl_increase",
                                         "min_greedy_agreement"}


def test_mask_fill_is_fp16_safe(llama_export):
    out, manifest = llama_export
    assert manifest["mask_fill_constants_replaced"] >= 1
    model = onnx.load(str(out / "model.onnx"))
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.name == "value" and attribute.t.data_type == onnx.TensorProto.FLOAT:
                assert numpy_helper.to_array(attribute.t).min() >= MASK_VALUE, node.name


def test_external_data_with_small_threshold(llama_dir, tmp_path):
    out = tmp_path / "external-onnx"
    manifest = export_onnx(llama_dir, out, external_data_threshold=1024)
    assert manifest["external_data"] is True
    assert (out / "model.onnx.data").is_file()
    assert (out / "model.onnx").stat().st_size < 200_000
    assert manifest["file_size_bytes"] == (out / "model.onnx").stat().st_size + (out / "model.onnx.data").stat().st_size
    assert manifest["parity"]["passed"]


def test_genai_config_names(llama_export):
    out, manifest = llama_export
    config = json.loads((out / "genai_config.json").read_text())["model"]
    assert config["decoder"]["filename"] == "model.onnx"
    assert config["decoder"]["inputs"]["past_key_names"] % 0 == "past_key_values.0.key"
    assert config["decoder"]["outputs"]["present_value_names"] % 1 == "present.1.value"
    assert config["eos_token_id"] == manifest["eos_token_ids"]


def test_parity_logits_and_greedy(llama_export):
    _, manifest = llama_export
    parity = manifest["parity"]
    assert parity["max_logits_diff_prefill"] < 1e-3
    assert parity["max_logits_diff_decode"] < 1e-3
    assert parity["greedy_match"], parity["greedy_mismatches"]
    assert parity["passed"]


def test_greedy_tokens_equal_torch(llama_export, llama_dir):
    out, manifest = llama_export
    model, tokenizer = load_for_export(llama_dir)
    decoder = OnnxDecoder(out / "model.onnx", geometry_of(manifest))
    eos, pad = manifest["eos_token_ids"], manifest["pad_token_id"]
    for prompt in parity_prompts(tokenizer):
        expected = torch_greedy(model, prompt, 16, eos, pad)
        assert decoder.greedy([prompt], 16, eos, pad)[0] == expected
        assert len(set(expected)) > 1, "degenerate model: greedy output repeats one token"


def test_left_padded_batch_equals_single(llama_export, llama_dir):
    out, manifest = llama_export
    tokenizer = load_tokenizer(str(llama_dir))
    decoder = OnnxDecoder(out / "model.onnx", geometry_of(manifest))
    eos, pad = manifest["eos_token_ids"], manifest["pad_token_id"]
    short, long = sorted(parity_prompts(tokenizer)[:2], key=len)
    short = short[: len(long) - 7]  # at least 7 pad tokens on the left of the short prompt
    batch = decoder.greedy([short, long], 12, eos, pad)
    assert batch[0] == decoder.greedy([short], 12, eos, pad)[0]
    assert batch[1] == decoder.greedy([long], 12, eos, pad)[0]


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral", "gemma3_text"])
def test_family_export_parity(family, tiny_model_factory, tmp_path):
    # gemma3_text's sliding_window=8 is shorter than the parity prompts, so its window mask is exercised.
    model_dir = tiny_model_factory(family, initializer_range=0.2)
    manifest = export_onnx(model_dir, tmp_path / f"{family}-onnx")
    assert manifest["model_type"] == family
    assert manifest["parity"]["max_logits_diff"] < 1e-3
    assert manifest["parity"]["greedy_match"], manifest["parity"]["greedy_mismatches"]
    if og is not None:
        assert genai_greedy(tmp_path / f"{family}-onnx", 8) == onnx_greedy(tmp_path / f"{family}-onnx", 8)


def onnx_greedy(folder, max_new_tokens: int) -> list[int]:
    manifest = json.loads((folder / "edgelm_export.json").read_text())
    prompt = parity_prompts(load_tokenizer(str(folder)))[0]
    decoder = OnnxDecoder(folder / "model.onnx", geometry_of(manifest))
    return decoder.greedy([prompt], max_new_tokens, manifest["eos_token_ids"], manifest["pad_token_id"])[0]


def genai_greedy(folder, max_new_tokens: int) -> list[int]:
    """Greedy tokens from onnxruntime-genai loading the folder's genai_config.json."""
    prompt = parity_prompts(load_tokenizer(str(folder)))[0]
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + max_new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


@pytest.mark.skipif(og is None, reason="onnxruntime-genai is not installed (pip install onnxruntime-genai)")
def test_genai_loads_and_matches_greedy(llama_export):
    out, _ = llama_export
    expected = onnx_greedy(out, 10)
    assert genai_greedy(out, 10) == expected
    assert len(set(expected)) > 1


def test_dynamo_exporter_parity(llama_dir, tmp_path):
    manifest = export_onnx(llama_dir, tmp_path / "dynamo-onnx", exporter="dynamo")
    assert manifest["exporter"] == "dynamo"
    assert manifest["opset"] == 18
    assert manifest["parity"]["greedy_match"]
    # The dynamo graph feeds the tied LM head through a Transpose; int4 must still quantize it.
    quantized = quantize(tmp_path / "dynamo-onnx", tmp_path / "dynamo-int4", "int4", check=False)
    assert quantized["quantization"]["fp32_matmul_nodes_left"] == 0


def test_parity_failure_raises(llama_dir, tmp_path):
    out = tmp_path / "strict-onnx"
    with pytest.raises(ParityError, match="max logits diff"):
        export_onnx(llama_dir, out, max_logits_diff=0.0)
    assert not out.exists()
    manifest = export_onnx(llama_dir, out, max_logits_diff=0.0, strict=False)
    assert manifest["parity"]["passed"] is False


def test_unknown_exporter_rejected(llama_dir, tmp_path):
    with pytest.raises(ValueError, match="exporter"):
        export_onnx(llama_dir, tmp_path / "x", exporter="tracing")


# ---------------------------------------------------------------- real SmolLM2


@requires_smollm2
@pytest.mark.smollm2
@pytest.mark.slow
def test_smollm2_student_export_parity(tmp_path):
    from edgelm.train.models import load_model, make_student, save_model

    teacher, tokenizer = load_model(SMOLLM2_GGUF)
    student = make_student(teacher, 2)
    del teacher
    save_model(student, tokenizer, tmp_path / "student")
    manifest = export_onnx(tmp_path / "student", tmp_path / "student-onnx")
    assert manifest["num_layers"] == 2
    assert manifest["head_dim"] == 64
    assert manifest["parity"]["max_logits_diff"] < 1e-3
    assert manifest["parity"]["greedy_match"]
