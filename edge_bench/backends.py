"""Model backends the benchmark worker can time: an edgelm ONNX export and a PyTorch model.

Each backend loads a model, tokenizes text, and exposes greedy `prefill` and `decode` steps
for one sequence. Only PyTorchBackend imports torch, and only when it loads a model.
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


class OnnxBackend:
    """An edgelm ONNX export run through edgelm.runtime."""

    def __init__(self, path: str | Path, threads: int | None):
        from edgelm.runtime import Generator

        self.path = Path(path)
        self.generator = Generator.from_pretrained(self.path, intra_op_threads=threads)
        self._cache = None

    def tokenize(self, text: str) -> list[int]:
        return self.generator.tokenizer.encode(text, add_special_tokens=False).ids

    def prefill(self, ids: list[int]) -> int:
        logits, self._cache = self.generator.prefill([ids])
        return int(logits[0].argmax())

    def decode(self, token: int) -> int:
        logits = self.generator.decode_step(self._cache, np.array([token], dtype=np.int64))
        return int(logits[0].argmax())

    def model_size_bytes(self) -> int:
        manifest_path = self.path / "edgelm_export.json"
        recorded = json.loads(manifest_path.read_text(encoding="utf-8")).get("file_size_bytes")
        return int(recorded) if recorded else folder_weight_bytes(self.path)


class PyTorchBackend:
    """A Hugging Face model folder run with PyTorch on the CPU, float32, with a KV cache."""

    def __init__(self, path: str | Path, threads: int | None):
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

    def prefill(self, ids: list[int]) -> int:
        torch = self._torch
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids]), use_cache=True)
        self._cache = getattr(out, self._cache_keyword)
        return int(out.logits[0, -1].argmax())

    def decode(self, token: int) -> int:
        torch = self._torch
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([[token]]), use_cache=True, **{self._cache_keyword: self._cache})
        self._cache = getattr(out, self._cache_keyword)
        return int(out.logits[0, -1].argmax())

    def model_size_bytes(self) -> int:
        return folder_weight_bytes(self.path)


BACKENDS = {
    "onnx": OnnxBackend,
    "pytorch": PyTorchBackend,
}


def make_backend(kind: str, path: str | Path, threads: int | None):
    if kind not in BACKENDS:
        raise ValueError(f"unknown target kind {kind!r}; expected one of {sorted(BACKENDS)}")
    return BACKENDS[kind](path, threads)
