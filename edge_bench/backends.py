"""Model backends the benchmark worker can time: edgelm ONNX, PyTorch, onnxruntime-genai, llama.cpp.

Each backend loads a model, tokenizes text, and exposes `prefill` and `decode` steps for one
sequence that return next-token logits, so the worker times choosing the token apart from the
model. Each backend imports its library only when it loads a model.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np

# Files in a model folder that are tokenizer or configuration data, not weights.
NON_WEIGHT_SUFFIXES = {".json", ".jinja", ".txt", ".md", ".model"}


def folder_weight_bytes(folder: Path) -> int:
    """Sum the sizes of the files in `folder` that are not tokenizer or configuration files."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.suffix not in NON_WEIGHT_SUFFIXES)


def onnx_weight_bytes_per_token(model_path: Path) -> int:
    """Estimate the weight bytes one decode step reads from an ONNX file.

    Every initializer counts in full except embedding tables (inputs of Gather and
    GatherBlockQuantized), of which a step reads one row. External data files count too.
    """
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    gathered = {node.input[0] for node in model.graph.node if node.op_type in ("Gather", "GatherBlockQuantized")}
    gathered |= {node.input[2] for node in model.graph.node if node.op_type == "GatherBlockQuantized" and len(node.input) > 2}
    total = 0
    for tensor in model.graph.initializer:
        if tensor.name in gathered:
            continue
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            total += int(next((e.value for e in tensor.external_data if e.key == "length"), 0))
        else:
            total += len(tensor.raw_data) or onnx.numpy_helper.to_array(tensor).nbytes
    return total


class OnnxBackend:
    """An edgelm ONNX export run through edgelm.runtime (dynamic or fixed-capacity KV cache)."""

    def __init__(self, path: str | Path, threads: int | None, options: dict | None = None):
        from edgelm.runtime import Generator

        self.path = Path(path)
        self.generator = Generator.from_pretrained(self.path, intra_op_threads=threads, **(options or {}))
        self._cache = None

    def tokenize(self, text: str) -> list[int]:
        return self.generator.tokenizer.encode(text, add_special_tokens=False).ids

    def prefill(self, ids: list[int], capacity: int) -> np.ndarray:
        self._cache = None  # free the last run's KV cache first, as an app would
        logits, self._cache = self.generator.prefill([ids], capacity=capacity)
        return logits[0]

    def decode(self, token: int) -> np.ndarray:
        return self.generator.decode_step(self._cache, np.array([token], dtype=np.int64))[0]

    def model_size_bytes(self) -> int:
        manifest_path = self.path / "edgelm_export.json"
        recorded = json.loads(manifest_path.read_text(encoding="utf-8")).get("file_size_bytes")
        return int(recorded) if recorded else folder_weight_bytes(self.path)

    def weight_bytes_per_token(self) -> int:
        return onnx_weight_bytes_per_token(self.path / self.generator.manifest.model_file)


class PyTorchBackend:
    """A Hugging Face model folder run with PyTorch on the CPU, float32, with a KV cache."""

    def __init__(self, path: str | Path, threads: int | None, options: dict | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._torch = torch
        if threads is not None:
            torch.set_num_threads(threads)
        self.path = Path(path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32).eval()
        # transformers 5 renamed `past_key_values` to `cache` in forward() and its output; the
        # old name still works there but logs a deprecation warning.
        parameters = inspect.signature(self.model.forward).parameters
        self._cache_keyword = "cache" if "cache" in parameters else "past_key_values"
        self._cache = None

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prefill(self, ids: list[int], capacity: int) -> np.ndarray:
        torch = self._torch
        self._cache = None  # free the last run's KV cache first, as an app would
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        self._cache = getattr(out, self._cache_keyword)
        return out.logits[0, -1].numpy()

    def decode(self, token: int) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([[token]]), use_cache=True, **{self._cache_keyword: self._cache})
        self._cache = getattr(out, self._cache_keyword)
        return out.logits[0, -1].numpy()

    def model_size_bytes(self) -> int:
        return folder_weight_bytes(self.path)

    def weight_bytes_per_token(self) -> int:
        # Every fp32 parameter except the embedding table, of which a step reads one row. A tied
        # LM head reads the same table in full, so it then counts once.
        embedding = self.model.get_input_embeddings().weight
        total = sum(p.numel() * p.element_size() for p in self.model.parameters())
        tied = self.model.get_output_embeddings().weight is embedding
        return total if tied else total - embedding.numel() * embedding.element_size()


class GenaiBackend:
    """A model folder built by onnxruntime-genai's model builder, run with onnxruntime-genai.

    Each step appends one token and reads the logits back, so the benchmark chooses tokens
    itself (greedy, end of turn ignored) exactly as for the other backends.
    """

    def __init__(self, path: str | Path, threads: int | None, options: dict | None = None):
        try:
            import onnxruntime_genai as og
        except ImportError as error:
            raise ImportError("the genai target needs onnxruntime-genai: pip install onnxruntime-genai") from error
        self._og = og
        self.path = Path(path)
        config = og.Config(str(self.path))
        if threads is not None:
            overlay = {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}
            config.overlay(json.dumps(overlay))
        self.model = og.Model(config)
        self.tokenizer = og.Tokenizer(self.model)
        self.threads = threads
        self._generator = None

    def tokenize(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer.encode(text)]

    def prefill(self, ids: list[int], capacity: int) -> np.ndarray:
        og = self._og
        self._generator = None  # free the last run's KV cache first, as an app would
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=capacity + 1, min_length=capacity + 1, do_sample=False)
        self._generator = og.Generator(self.model, params)
        self._generator.append_tokens(np.asarray(ids, dtype=np.int32))
        return self._generator.get_logits()[0, -1]

    def decode(self, token: int) -> np.ndarray:
        self._generator.append_tokens(np.array([token], dtype=np.int32))
        return self._generator.get_logits()[0, -1]

    def model_size_bytes(self) -> int:
        return folder_weight_bytes(self.path)

    def weight_bytes_per_token(self) -> int:
        return onnx_weight_bytes_per_token(self.path / "model.onnx")


class LlamaCppBackend:
    """A GGUF file run with llama.cpp through llama-cpp-python, on the CPU."""

    def __init__(self, path: str | Path, threads: int | None, options: dict | None = None):
        try:
            from llama_cpp import Llama
        except ImportError as error:
            raise ImportError("the llamacpp target needs llama-cpp-python: pip install llama-cpp-python") from error
        self.path = Path(path)
        self.options = {"n_ctx": 2048, **(options or {})}
        self.llm = Llama(model_path=str(self.path), n_threads=threads, n_threads_batch=threads,
                         n_batch=512, verbose=False, n_gpu_layers=0, **self.options)

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def prefill(self, ids: list[int], capacity: int) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.asarray(self.llm.scores[self.llm.n_tokens - 1])

    def decode(self, token: int) -> np.ndarray:
        self.llm.eval([token])
        return np.asarray(self.llm.scores[self.llm.n_tokens - 1])

    def model_size_bytes(self) -> int:
        return self.path.stat().st_size

    def weight_bytes_per_token(self) -> int:
        # NOTE: an estimate: the whole file, because SmolLM2 ties the output layer to the token
        # embedding, which a step then reads in full. Untied models read less.
        return self.path.stat().st_size


BACKENDS = {
    "onnx": OnnxBackend,
    "pytorch": PyTorchBackend,
    "genai": GenaiBackend,
    "llamacpp": LlamaCppBackend,
}

# Module that each backend imports, to skip a target cleanly when it is not installed.
BACKEND_MODULES = {"onnx": "onnxruntime", "pytorch": "torch", "genai": "onnxruntime_genai", "llamacpp": "llama_cpp"}
BACKEND_PACKAGES = {"onnx": "onnxruntime", "pytorch": "torch transformers", "genai": "onnxruntime-genai",
                    "llamacpp": "llama-cpp-python"}
# Backends whose target path is a file rather than a folder.
FILE_BACKENDS = {"llamacpp"}


def missing_backend(kind: str) -> str | None:
    """Return an install hint when the library of `kind` is not importable, else None."""
    import importlib.util

    if importlib.util.find_spec(BACKEND_MODULES[kind]) is None:
        return f"{BACKEND_MODULES[kind]} is not installed (pip install {BACKEND_PACKAGES[kind]})"
    return None


def make_backend(kind: str, path: str | Path, threads: int | None, options: dict | None = None):
    if kind not in BACKENDS:
        raise ValueError(f"unknown target kind {kind!r}; expected one of {sorted(BACKENDS)}")
    return BACKENDS[kind](path, threads, options)
