"""Read and check `edgelm_export.json`, the manifest of an exported ONNX model folder."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MANIFEST_NAME = "edgelm_export.json"
FORMAT_NAME = "edgelm-onnx"
SUPPORTED_FORMAT_VERSIONS = (1,)
KV_DTYPES = {"float32": np.float32, "float16": np.float16}
KV_CACHE_KINDS = ("dynamic", "buffer", "buffer-new", "gqa")

_REQUIRED_KEYS = ("model_file", "num_layers", "num_kv_heads", "head_dim", "vocab_size", "eos_token_ids")


@dataclass(frozen=True)
class ExportManifest:
    """The fields of `edgelm_export.json` that the runtime uses; `extra` keeps the rest."""

    model_file: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    variant: str = "fp32"
    model_type: str = ""
    kv_dtype: str = "float32"
    kv_cache: str = "dynamic"
    """KV cache interface: "dynamic" (onnx_export.py), "buffer" or "buffer-new" (kv_buffer.py), "gqa" (fused_graph.py)."""
    extra: dict = field(default_factory=dict)

    @property
    def kv_numpy_dtype(self) -> type:
        return KV_DTYPES[self.kv_dtype]


def read_manifest(export_dir: str | Path) -> ExportManifest:
    """Read `edgelm_export.json` from `export_dir`; raise ValueError naming any bad field."""
    path = Path(export_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; pass a folder written by edgelm.export.onnx_export.export_onnx"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"invalid JSON in {path}: {error}; re-export the model") from error

    if data.get("format") != FORMAT_NAME:
        raise ValueError(f"{path}: format is {data.get('format')!r}, expected {FORMAT_NAME!r}")
    version = data.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise ValueError(
            f"{path}: format_version {version!r} is not supported by this runtime "
            f"(supported: {list(SUPPORTED_FORMAT_VERSIONS)}); upgrade edgelm or re-export the model"
        )
    missing = [key for key in _REQUIRED_KEYS if key not in data]
    if missing:
        raise ValueError(f"{path}: missing fields {missing}; re-export the model")

    kv_dtype = data.get("kv_dtype", "float32")
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"{path}: kv_dtype {kv_dtype!r} is not supported; expected one of {sorted(KV_DTYPES)}")
    kv_cache = data.get("kv_cache", "dynamic")
    if kv_cache not in KV_CACHE_KINDS:
        raise ValueError(f"{path}: kv_cache {kv_cache!r} is not supported by this runtime; expected one of "
                         f"{list(KV_CACHE_KINDS)}. Upgrade edgelm or re-export the model")
    eos = data["eos_token_ids"]
    eos_ids = tuple(eos) if isinstance(eos, list) else (eos,)
    if not eos_ids:
        raise ValueError(f"{path}: eos_token_ids is empty; generation would never stop at end of turn")

    known = {"format", "format_version", "variant", "model_type", "kv_dtype", "kv_cache", "pad_token_id", "bos_token_id", *_REQUIRED_KEYS}
    return ExportManifest(
        model_file=data["model_file"],
        num_layers=int(data["num_layers"]),
        num_kv_heads=int(data["num_kv_heads"]),
        head_dim=int(data["head_dim"]),
        vocab_size=int(data["vocab_size"]),
        eos_token_ids=tuple(int(i) for i in eos_ids),
        pad_token_id=data.get("pad_token_id"),
        bos_token_id=data.get("bos_token_id"),
        variant=data.get("variant", "fp32"),
        model_type=data.get("model_type", ""),
        kv_dtype=kv_dtype,
        kv_cache=kv_cache,
        extra={key: value for key, value in data.items() if key not in known},
    )
