import pytest
import torch
from transformers import AutoTokenizer

from edgelm.train.models import end_of_turn_token, kept_layer_indices, load_model, make_student, resolve_source, save_model


def test_kept_layer_indices_spread_evenly():
    assert kept_layer_indices(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert kept_layer_indices(4, 1) == [0]
    assert kept_layer_indices(4, 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="keep_layers=5"):
        kept_layer_indices(4, 5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_student_drops_layers_and_generates_with_cache(tiny_model_factory, tmp_path, family):
    teacher, tokenizer = load_model(str(tiny_model_factory(family, num_hidden_layers=4)))
    student = make_student(teacher, keep_layers=2)
    assert student.config.num_hidden_layers == 2
    assert teacher.config.num_hidden_layers == 4
    # Kept layers are the teacher's first and last, with cache indices renumbered.
    assert torch.equal(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[3].mlp.up_proj.weight)
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    input_ids = torch.tensor([[1, 2, 3, 4]])
    with_cache = student.generate(input_ids, max_new_tokens=5, do_sample=False, use_cache=True)
    without_cache = student.generate(input_ids, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without_cache)

    save_model(student, tokenizer, tmp_path / "student")
    reloaded, _ = load_model(str(tmp_path / "student"))
    assert reloaded.config.num_hidden_layers == 2


def test_resolve_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not installed"):
        resolve_source("pkg:no_such_package_xyz/model.gguf")
    with pytest.raises(FileNotFoundError, match="GGUF model file not found"):
        resolve_source(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_source(str(tmp_path / "empty"))
    assert resolve_source("HuggingFaceTB/SmolLM2-135M-Instruct").location == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_end_of_turn_read_from_template(smollm2_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    tokenizer.eos_token = "<|im_start|>"  # what SmolLM2's GGUF metadata claims
    assert end_of_turn_token(tokenizer) == "<|im_end|>"
