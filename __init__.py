"""edgelm: post-train a small language model and ship it to an edge device.

Subpackages, one per pipeline stage:
    edgelm.train       curriculum SFT, rollout, teacher scoring, distillation, evaluation
    edgelm.export      ONNX export with KV cache, quantization, Ascend static variant
    edgelm.runtime     onnxruntime generator for edge apps (no torch)
    edgelm.edge_bench  latency and memory benchmark
"""

__version__ = "0.1.0"
