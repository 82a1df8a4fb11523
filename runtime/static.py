"""Generation with the static Ascend export: onnxruntime (CPU or CANN) or compiled OM files.

The export (edgelm.export.ascend) writes two batch-1 graphs with fixed shapes, prefill.onnx
[1, P] and decode.onnx [1, 1] over a KV cache of C slots, and, where ATC ran, prefill.om and
decode.om. StaticGenerator gives them the text API of Generator:

    gen = StaticGenerator.from_pretrained("out/ascend", provider="cann")   # or "cpu", or "om"
    print(gen.generate("What is 12 * 7?", max_new_tokens=64))

The "om" backend runs the OM files through ais_bench's InferSession, which wraps pyACL.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from edgelm.runtime.chat_template import load_chat_template
from edgelm.runtime.decoders import past_names
from edgelm.runtime.generator import Generator, read_context_length
from edgelm.runtime.manifest import MANIFEST_NAME, ExportManifest
from edgelm.runtime.session import open_session

ASCEND_FORMAT = "edgelm-ascend"
BACKENDS = ("cpu", "cann", "om")


def read_static_manifest(export_dir: str | Path) -> dict:
    path = Path(export_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass a folder written by edgelm.export.ascend")
    return json.loads(path.read_text(encoding="utf-8"))


def is_static_export(export_dir: str | Path) -> bool:
    path = Path(export_dir) / MANIFEST_NAME
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == ASCEND_FORMAT
    except json.JSONDecodeError:
        return False


@dataclass
class StaticKVCache:
    past: list[np.ndarray]  # [1, kv_heads, C, head_dim] per layer and kind
    attention_mask: np.ndarray  # int64 [1, C]
    length: int


class OrtGraphs:
    """The two ONNX graphs in onnxruntime sessions (CPU or CANN provider)."""

    def __init__(self, export_dir: Path, graphs: dict, provider: str, threads: int | None):
        self.prefill = open_session(export_dir / graphs["prefill"], providers=provider, intra_op_threads=threads)
        self.decode = open_session(export_dir / graphs["decode"], providers=provider, intra_op_threads=threads)

    def run_prefill(self, feeds: dict) -> list[np.ndarray]:
        return self.prefill.run(None, feeds)

    def run_decode(self, feeds: dict) -> list[np.ndarray]:
        return self.decode.run(None, feeds)


class OmGraphs:
    """The compiled OM files run with ais_bench's InferSession on one Ascend device.

    NOTE: written against ais_bench's documented InferSession(device_id, model_path).infer(list)
    interface; no Ascend device was available to run it here.
    """

    def __init__(self, export_dir: Path, graphs: dict, device_id: int = 0):
        if "prefill_om" not in graphs or "decode_om" not in graphs:
            raise FileNotFoundError(
                f"{export_dir} has no OM files (manifest om_built is false); run its atc.sh on a machine "
                f"with the Huawei CANN toolkit, then update the manifest, or use provider='cann' or 'cpu'"
            )
        if importlib.util.find_spec("ais_bench") is None:
            hint = " pyACL (acl) is installed, but this runtime drives OM files through ais_bench." \
                if importlib.util.find_spec("acl") else ""
            raise ImportError("running OM files needs ais_bench (the Ascend inference tool that wraps pyACL); "
                              "install it from the CANN toolkit's ais_bench wheel." + hint)
        from ais_bench.infer.interface import InferSession

        self.prefill = InferSession(device_id, str(export_dir / graphs["prefill_om"]))
        self.decode = InferSession(device_id, str(export_dir / graphs["decode_om"]))
        self.prefill_order = ["input_ids", "attention_mask", "position_ids"]

    def run_prefill(self, feeds: dict) -> list[np.ndarray]:
        return self.prefill.infer([feeds[name] for name in self.prefill_order])

    def run_decode(self, feeds: dict) -> list[np.ndarray]:
        # ATC keeps the ONNX input order: the four step inputs, then the cache of each layer.
        return self.decode.infer(list(feeds.values()))


class StaticDecoder:
    """Prefill and decode steps over the static graphs, batch 1, with Generator's decoder interface."""

    kind = "static"

    def __init__(self, graphs, manifest: dict):
        self.graphs = graphs
        self.prompt_len = int(manifest["max_prompt_len"])
        self.capacity = int(manifest["kv_capacity"])
        self.pad_token_id = int(manifest["pad_token_id"])
        self.past_names = past_names(int(manifest["num_layers"]))

    def check_signature(self, input_names: set[str], output_names: set[str]) -> list[str]:
        return []

    def prefill(self, input_ids, attention_mask, position_ids, capacity: int) -> tuple[np.ndarray, StaticKVCache]:
        if input_ids.shape[0] != 1:
            raise ValueError(f"the static export runs batch 1; got a batch of {input_ids.shape[0]} prompts")
        length = input_ids.shape[1]
        if length > self.prompt_len:
            raise ValueError(f"prompt has {length} tokens; the static prefill graph takes at most "
                             f"{self.prompt_len} (re-export with a larger max_prompt_len)")
        if capacity > self.capacity + 1:
            raise ValueError(f"prompt plus new tokens need {capacity - 1} KV cache slots, but kv_capacity is "
                             f"{self.capacity}; lower max_new_tokens or re-export with a larger kv_capacity")
        ids = np.full((1, self.prompt_len), self.pad_token_id, dtype=np.int64)
        ids[0, :length] = input_ids[0]
        mask = np.zeros((1, self.prompt_len), dtype=np.int64)
        mask[0, :length] = 1
        positions = np.arange(self.prompt_len, dtype=np.int64)[None]
        outputs = self.graphs.run_prefill({"input_ids": ids, "attention_mask": mask, "position_ids": positions})
        cache_mask = np.zeros((1, self.capacity), dtype=np.int64)
        cache_mask[0, :length] = 1
        return outputs[0][:, length - 1, :], StaticKVCache(list(outputs[1:]), cache_mask, length)

    def decode(self, cache: StaticKVCache, tokens: np.ndarray) -> np.ndarray:
        slot = cache.length
        if slot >= self.capacity:
            raise ValueError(f"the static KV cache of {self.capacity} slots is full; lower max_new_tokens")
        cache.attention_mask[0, slot] = 1
        feeds = {"input_ids": np.asarray(tokens, dtype=np.int64).reshape(1, 1), "attention_mask": cache.attention_mask,
                 "position_ids": np.array([[slot]], dtype=np.int64), "cache_position": np.array([slot], dtype=np.int64)}
        feeds.update(zip(self.past_names, cache.past))
        outputs = self.graphs.run_decode(feeds)
        cache.past = list(outputs[1:])
        cache.length = slot + 1
        return outputs[0][:, -1, :]

    def score(self, input_ids: np.ndarray) -> np.ndarray:
        raise NotImplementedError("score() needs all-position logits of any length; use the dynamic export")


class StaticGenerator(Generator):
    """Generator over a static Ascend export; batch 1, prompts up to max_prompt_len tokens."""

    @classmethod
    def from_pretrained(cls, export_dir: str | Path, provider: str = "cpu", threads: int | None = None,
                        device_id: int = 0) -> StaticGenerator:
        """Load the export with `provider` "cpu" or "cann" (onnxruntime) or "om" (ais_bench on the NPU)."""
        export_dir = Path(export_dir)
        if provider not in BACKENDS:
            raise ValueError(f"provider={provider!r} is not supported for the static export; use one of {BACKENDS}")
        data = read_static_manifest(export_dir)
        if data.get("format") != ASCEND_FORMAT:
            raise ValueError(f"{export_dir} has format {data.get('format')!r}, expected {ASCEND_FORMAT!r}; "
                             f"load a dynamic or fixed-capacity export with Generator.from_pretrained")
        if provider == "om":
            graphs = OmGraphs(export_dir, data["graphs"], device_id)
        else:
            graphs = OrtGraphs(export_dir, data["graphs"], provider, threads)
        manifest = ExportManifest(
            model_file=data["graphs"]["decode"], num_layers=int(data["num_layers"]),
            num_kv_heads=int(data["num_kv_heads"]), head_dim=int(data["head_dim"]),
            vocab_size=int(data["vocab_size"]), eos_token_ids=tuple(data["eos_token_ids"]),
            pad_token_id=data.get("pad_token_id"), bos_token_id=data.get("bos_token_id"),
            variant=data.get("variant", "ascend-static"), model_type=data.get("model_type", ""),
        )
        tokenizer = Tokenizer.from_file(str(export_dir / "tokenizer.json"))
        tokenizer.no_padding()
        tokenizer.no_truncation()
        chat_template, special_tokens = load_chat_template(export_dir)
        return cls(None, tokenizer, manifest, chat_template, special_tokens, read_context_length(export_dir),
                   decoder=StaticDecoder(graphs, data))
