"""Open an onnxruntime InferenceSession with execution providers chosen by short or full name."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort

log = logging.getLogger(__name__)

# Short names accepted for `providers`; any full onnxruntime provider name is accepted as well.
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "cann": "CANNExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
}


def resolve_providers(providers: Sequence[str] | str | None) -> list[str]:
    """Map provider names or aliases to onnxruntime names; raise if one is not available.

    None selects the CPU provider only, so results do not depend on which GPU build is installed.
    """
    if providers is None:
        return ["CPUExecutionProvider"]
    if isinstance(providers, str):
        providers = [providers]
    available = ort.get_available_providers()
    resolved = []
    for name in providers:
        full = PROVIDER_ALIASES.get(name.lower(), name)
        if full not in available:
            raise ValueError(
                f"execution provider {name!r} ({full}) is not available in this onnxruntime build "
                f"{ort.__version__}; available providers: {available}. Install the matching "
                f"onnxruntime package (for example onnxruntime-gpu for CUDA) or pick one of these."
            )
        if full not in resolved:
            resolved.append(full)
    if not resolved:
        raise ValueError(f"providers is empty; pass None for the CPU provider or names from {available}")
    return resolved


def open_session(
    model_path: str | Path,
    providers: Sequence[str] | str | None = None,
    intra_op_threads: int | None = None,
) -> ort.InferenceSession:
    """Open `model_path` with all graph optimizations on; `intra_op_threads` None lets onnxruntime pick."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads is not None:
        if intra_op_threads < 1:
            raise ValueError(f"intra_op_threads={intra_op_threads} must be at least 1, or None for the default")
        options.intra_op_num_threads = intra_op_threads
    # The decoder graph is a single chain of operators, so parallel execution of nodes gains nothing.
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1

    resolved = resolve_providers(providers)
    session = ort.InferenceSession(str(model_path), sess_options=options, providers=resolved)
    log.info("opened %s with providers %s", model_path, session.get_providers())
    return session
