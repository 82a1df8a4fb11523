"""Fuse RMSNorm and residual-add subgraphs of an exported folder into onnxruntime contrib ops.

onnxruntime's transformer optimizer (onnxruntime.transformers.optimizer) replaces each
Pow/ReduceMean/Sqrt/Div/Mul RMSNorm with SimplifiedLayerNormalization, and each residual Add
followed by one with SkipSimplifiedLayerNormalization. Attention is left as it is, because
its fusions expect the dynamic graph's layout. Run it after quantization: the int4 scheme
converts the graph to opset 21, and onnx's version converter has no schema for the contrib ops.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from edgelm.files import atomic_dir, write_json

log = logging.getLogger(__name__)

MANIFEST_NAME = "edgelm_export.json"


def fuse_export(export_dir: str | Path, out_dir: str | Path) -> dict:
    """Write a copy of `export_dir` with fused norms to `out_dir`; return the new manifest.

    The manifest gains `fusions`, the count of each fused operator. Logits should match the
    unfused graph to float rounding; the tests check greedy tokens on a tiny model.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    export_dir = Path(export_dir)
    manifest = json.loads((export_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
    model_file = manifest["model_file"]
    config = json.loads((export_dir / "config.json").read_text(encoding="utf-8"))
    options = FusionOptions("gpt2")
    options.enable_attention = False  # its patterns match the dynamic graph, not this one
    optimized = optimize_model(str(export_dir / model_file), model_type="gpt2",
                               num_heads=config["num_attention_heads"], hidden_size=config["hidden_size"],
                               optimization_options=options, opt_level=0, use_gpu=False)
    fusions = {op: count for op, count in optimized.get_fused_operator_statistics().items() if count}
    log.info("fused operators in %s: %s", export_dir, fusions)
    with atomic_dir(out_dir) as tmp:
        for item in export_dir.iterdir():
            if item.is_file() and item.name not in (model_file, model_file + ".data", MANIFEST_NAME):
                shutil.copy2(item, tmp / item.name)
        optimized.save_model_to_file(str(tmp / model_file))
        manifest = {**manifest, "fusions": fusions, "source": str(export_dir)}
        manifest["file_size_bytes"] = sum(p.stat().st_size for p in tmp.iterdir() if p.name.startswith(model_file))
        write_json(tmp / MANIFEST_NAME, manifest)
    return manifest
