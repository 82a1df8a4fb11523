from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from edgelm.train.models import (
    ModelSource,
    _write_gguf_cache,
    cache_root,
    end_of_turn_token,
    gguf_cache_folder,
    kept_layer_indices,
    load_model,
    load_tokenizer,
    make_student,
    resolve_source,
    save_model,
)


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


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGELM_CACHE_DIR", str(tmp_path / "cache"))
    assert cache_root() == tmp_path / "cache"
    monkeypatch.setenv("EDGELM_CACHE_DIR", "off")
    assert cache_root() is None
    assert gguf_cache_folder(ModelSource(str(tmp_path), "model.gguf")) is None
    monkeypatch.delenv("EDGELM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "edgelm"


def test_cache_root_relative_setting(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EDGELM_CACHE_DIR", "my-cache")
    with caplog.at_level("WARNING"):
        assert cache_root() == tmp_path / "my-cache"
    assert "EDGELM_CACHE_DIR=my-cache is a relative path" in caplog.text


def test_cache_root_without_home_or_with_relative_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGELM_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "relative-xdg")
    assert cache_root() == Path.home() / ".cache" / "edgelm"
    monkeypatch.setenv("EDGELM_CACHE_DIR", "~no-such-user-edgelm/cache")
    assert cache_root() is None
    # A folder that is not a GGUF file never needs the cache, so a bad setting does not matter.
    assert gguf_cache_folder(ModelSource(str(tmp_path), None)) is None


def test_cache_folder_keys_on_gguf_content(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGELM_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "a.gguf").write_bytes(b"GGUF one")
    first = gguf_cache_folder(ModelSource(str(tmp_path), "a.gguf"))
    (tmp_path / "a.gguf").write_bytes(b"GGUF two")
    assert gguf_cache_folder(ModelSource(str(tmp_path), "a.gguf")) != first
    assert gguf_cache_folder(ModelSource(str(tmp_path))) is None  # a model folder is never cached


def test_cache_write_keeps_first_copy(tiny_model_dir, tmp_path):
    model, tokenizer = load_model(str(tiny_model_dir))
    folder = tmp_path / "gguf" / "tiny"
    _write_gguf_cache(model, tokenizer, folder)
    first = (folder / "model.safetensors").stat().st_mtime_ns
    _write_gguf_cache(model, tokenizer, folder)  # another process finishing second
    assert (folder / "model.safetensors").stat().st_mtime_ns == first
    assert sorted(path.name for path in folder.parent.iterdir()) == ["tiny"]


def test_failed_cache_save_only_logs(tiny_model_dir, tmp_path, caplog, monkeypatch):
    model, tokenizer = load_model(str(tiny_model_dir))

    def disk_full(*args, **kwargs):
        raise RuntimeError("I/O error: File too large")

    monkeypatch.setattr(model, "save_pretrained", disk_full)
    _write_gguf_cache(model, tokenizer, tmp_path / "gguf" / "tiny")
    assert "File too large" in caplog.text
    assert list((tmp_path / "gguf").iterdir()) == []


def test_damaged_cache_falls_back_to_source(tiny_model_dir, tmp_path, caplog, monkeypatch):
    import edgelm.train.models as models

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "config.json").write_text("{not json")
    monkeypatch.setattr(models, "gguf_cache_folder", lambda source: damaged)
    model, _ = load_model(str(tiny_model_dir))
    assert model.config.num_hidden_layers == 2
    assert "Delete that folder" in caplog.text
    caplog.clear()
    tokenizer = load_tokenizer(str(tiny_model_dir))
    assert tokenizer.eos_token == "<|im_end|>"
    assert "Delete that folder" in caplog.text


def test_unwritable_cache_only_logs(tiny_model_dir, tmp_path, caplog):
    model, tokenizer = load_model(str(tiny_model_dir))
    (tmp_path / "file").write_text("not a folder")
    _write_gguf_cache(model, tokenizer, tmp_path / "file" / "gguf" / "tiny")
    assert "EDGELM_CACHE_DIR" in caplog.text
