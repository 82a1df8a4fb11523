"""The fused GroupQueryAttention graph: parity with PyTorch, in-place cache writes, int4, errors."""

from __future__ import annotations

import collections
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

from conftest import SMOLLM2_GGUF, requires_smollm2

torch = pytest.importorskip("torch")


def _op_counts(path) -> collections.Counter:
    return collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node)


@pytest.fixture(scope="module")
def fused_llama(tiny_model_factory, tmp_path_factory):
    from edgelm.export.fused_graph import export_fused

    model_dir = tiny_model_factory("llama")
    out = tmp_path_factory.mktemp("fused-llama") / "export"
    return model_dir, out, export_fused(model_dir, out)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_fused_export_matches_pytorch(tiny_model_factory, tmp_path, model_type):
    from edgelm.export.fused_graph import export_fused

    manifest = export_fused(tiny_model_factory(model_type), tmp_path / "export")
    assert manifest["kv_cache"] == "gqa"
    assert manifest["parity"]["max_logits_diff"] <= 1e-3
    assert manifest["parity"]["top1_agreement"] == 1.0


def test_fused_graph_operators(fused_llama):
    _, out, manifest = fused_llama
    counts = _op_counts(out / "model.onnx")
    layers = manifest["num_layers"]
    assert counts["GroupQueryAttention"] == layers
    assert counts["SkipSimplifiedLayerNormalization"] == 2 * layers
    assert counts["SimplifiedLayerNormalization"] == 1
    # q/k/v, o_proj, gate/up, down per layer, plus the LM head.
    assert counts["MatMul"] == 4 * layers + 1
    assert counts["Reshape"] == 0
    assert counts["Transpose"] == 0


def _teacher_forced_logits(model_dir, tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens])).logits[0].numpy()


def test_decode_writes_cache_in_place(fused_llama):
    from edgelm.runtime import Generator

    model_dir, out, _ = fused_llama
    generator = Generator.from_pretrained(out, threads=1)
    assert type(generator.decoder).__name__ == "GQADecoder"
    rng = np.random.default_rng(0)
    tokens = [int(t) for t in rng.integers(0, 1000, size=12)]
    prompt, forced = tokens[:7], tokens[7:]
    reference = _teacher_forced_logits(model_dir, tokens)

    logits, cache = generator.prefill([prompt], capacity=16)
    pointers = {name: value.data_ptr() for name, value in cache.values.items()}
    arrays = {name: array for name, array in cache.past.items()}
    assert np.abs(logits[0] - reference[6]).max() <= 1e-4
    for step, token in enumerate(forced[:-1]):
        logits = generator.decode_step(cache, np.array([token]))
        assert np.abs(logits[0] - reference[7 + step]).max() <= 1e-4

    assert cache.length == 11
    assert {name: value.data_ptr() for name, value in cache.values.items()} == pointers
    key = cache.past["past_key_values.0.key"]
    assert key is arrays["past_key_values.0.key"]
    # GroupQueryAttention wrote the new slots into the bound numpy buffer and nothing past them.
    assert np.abs(key[:, :, 10]).max() > 0
    assert np.abs(key[:, :, 11:]).max() == 0


def test_decode_grows_full_cache(fused_llama):
    from edgelm.runtime import Generator

    model_dir, out, _ = fused_llama
    generator = Generator.from_pretrained(out, threads=1)
    tokens = list(range(100, 112))
    reference = _teacher_forced_logits(model_dir, tokens)
    logits, cache = generator.prefill([tokens[:4]], capacity=5)
    for step, token in enumerate(tokens[4:]):
        logits = generator.decode_step(cache, np.array([token]))
        assert np.abs(logits[0] - reference[4 + step]).max() <= 1e-4
    assert cache.capacity >= 12


@pytest.mark.parametrize("chunk", [1, 3, None])
def test_chunked_prefill_matches_pytorch(fused_llama, chunk):
    from edgelm.runtime import Generator

    model_dir, out, _ = fused_llama
    generator = Generator.from_pretrained(out, threads=1)
    generator.decoder.prefill_chunk = chunk
    tokens = list(range(500, 511))
    reference = _teacher_forced_logits(model_dir, tokens)
    logits, cache = generator.prefill([tokens[:8]], capacity=16)
    assert np.abs(logits[0] - reference[7]).max() <= 1e-4
    for step, token in enumerate(tokens[8:]):
        logits = generator.decode_step(cache, np.array([token]))
        assert np.abs(logits[0] - reference[8 + step]).max() <= 1e-4


def test_zero_prefill_chunk_rejected(fused_llama):
    from edgelm.runtime import Generator

    _, out, _ = fused_llama
    generator = Generator.from_pretrained(out, threads=1)
    generator.decoder.prefill_chunk = 0
    with pytest.raises(ValueError, match="prefill_chunk=0 must be at least 1"):
        generator.prefill([[500, 501, 502]])


def test_batch_runs_rows_separately(fused_llama):
    from edgelm.runtime import Generator

    _, out, _ = fused_llama
    generator = Generator.from_pretrained(out, threads=1)
    prompts = [list(range(200, 209)), list(range(300, 304))]
    batched = generator.generate_ids(prompts, max_new_tokens=6, ignore_eos=True)
    single = [generator.generate_ids(prompt, max_new_tokens=6, ignore_eos=True)[0] for prompt in prompts]
    assert batched == single


def test_score_matches_pytorch(fused_llama):
    from edgelm.runtime import Generator

    model_dir, out, _ = fused_llama
    tokens = list(range(400, 420))
    scored = Generator.from_pretrained(out, threads=1).score(tokens)
    assert scored.shape[0] == len(tokens)
    assert np.abs(scored - _teacher_forced_logits(model_dir, tokens)).max() <= 1e-4


def test_int4_quantizes_fused_graph(fused_llama, tmp_path):
    from edgelm.export.fused_graph import quantize_fused

    _, out, manifest = fused_llama
    quantized = quantize_fused(out, tmp_path / "int4")
    counts = _op_counts(tmp_path / "int4" / "model.onnx")
    assert counts["MatMulNBits"] == 4 * manifest["num_layers"] + 1
    assert counts["GatherBlockQuantized"] == 1
    assert counts["GroupQueryAttention"] == manifest["num_layers"]
    assert quantized["kv_cache"] == "gqa"
    assert quantized["quantization"]["accuracy_level"] == 4
    assert quantized["parity"]["top1_agreement"] >= 0.9


def test_unsupported_model_type_raises():
    from edgelm.export.fused_graph import check_supported

    config = SimpleNamespace(model_type="gpt2", max_position_embeddings=1024)
    with pytest.raises(ValueError, match="model_type 'gpt2'.*llama"):
        check_supported(config)


def test_sliding_window_raises():
    from edgelm.export.fused_graph import check_supported

    config = SimpleNamespace(model_type="mistral", sliding_window=64, max_position_embeddings=1024)
    with pytest.raises(ValueError, match="sliding_window=64"):
        check_supported(config)


def test_dynamic_rope_raises():
    from edgelm.export.fused_graph import rotary_tables

    rotary = SimpleNamespace(rope_type="dynamic", inv_freq=torch.ones(4), attention_scaling=1.0)
    model = SimpleNamespace(model=SimpleNamespace(rotary_emb=rotary))
    with pytest.raises(ValueError, match="rope_type 'dynamic'"):
        rotary_tables(model, 16)


@requires_smollm2
def test_smollm2_fused_matches_pytorch(tmp_path):
    from edgelm.export.fused_graph import export_fused
    from edgelm.train.models import load_model, save_model

    model, tokenizer = load_model(SMOLLM2_GGUF)
    save_model(model, tokenizer, tmp_path / "hf")
    del model
    manifest = export_fused(tmp_path / "hf", tmp_path / "export")
    assert manifest["parity"]["max_logits_diff"] <= 1e-3
    assert manifest["parity"]["top1_agreement"] == 1.0
