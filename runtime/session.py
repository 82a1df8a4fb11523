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


# pip package that brings each provider, for the error when one is missing.
PROVIDER_PACKAGES = {
    "CUDAExecutionProvider": "onnxruntime-gpu",
    "TensorrtExecutionProvider": "onnxruntime-gpu",
    "CANNExecutionProvider": "onnxruntime-cann",
    "OpenVINOExecutionProvider": "onnxruntime-openvino",
    "DmlExecutionProvider": "onnxruntime-directml",
    "QNNExecutionProvider": "onnxruntime-qnn",
    "ROCMExecutionProvider": "onnxruntime-rocm",
}


def resolve_providers(providers: Sequence[str | tuple[str, dict]] | str | None) -> list[str | tuple[str, dict]]:
    """Map provider names or aliases to onnxruntime names; raise if one is not available.

    An entry may also be a `(name, options)` pair, as onnxruntime takes it, for example
    `("cuda", {"device_id": 1})`; the pair keeps its options. None selects the CPU provider
    only, so results do not depend on which GPU build is installed.
    """
    if providers is None:
        return ["CPUExecutionProvider"]
    if isinstance(providers, (str, tuple)):
        providers = [providers]
    available = ort.get_available_providers()
    resolved, seen = [], set()
    for entry in providers:
        name, options = _provider_entry(entry)
        full = PROVIDER_ALIASES.get(name.lower(), name)
        if full not in available:
            package = PROVIDER_PACKAGES.get(full, "the onnxruntime package built with it")
            raise ValueError(
                f"execution provider {name!r} ({full}) is not available in this onnxruntime build "
                f"{ort.__version__}; available providers: {available}. Install {package} in place of "
                f"onnxruntime, or pick one of the available providers."
            )
        if full not in seen:
            seen.add(full)
            resolved.append(full if options is None else (full, options))
    if not resolved:
        raise ValueError(f"providers is empty; pass None for the CPU provider or names from {available}")
    return resolved


def provider_name(entry: str | tuple[str, dict]) -> str:
    """Return the name of a provider entry, which is a name or a (name, options) pair."""
    return _provider_entry(entry)[0]


def _provider_entry(entry) -> tuple[str, dict | None]:
    if isinstance(entry, str):
        return entry, None
    if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], dict):
        return entry[0], entry[1]
    raise ValueError(f"provider entry {entry!r} is invalid; pass a name such as 'cpu' or a (name, options dict) pair")


OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def open_session(
    model_path: str | Path,
    providers: Sequence[str] | str | None = None,
    intra_op_threads: int | None = None,
    allow_spinning: bool | None = None,
    memory_arena: bool = True,
    optimization_level: str = "all",
    profile_prefix: str | None = None,
) -> ort.InferenceSession:
    """Open `model_path` for single-stream generation.

    `intra_op_threads` None lets onnxruntime pick. `allow_spinning` None keeps onnxruntime's
    default (worker threads spin between operators). False makes idle threads sleep, which
    costs latency but frees the cores for other processes. `memory_arena` False turns off
    the CPU memory arena, which lowers peak memory at some cost in allocation time.
    `profile_prefix` turns on onnxruntime's per-operator profiling, written to a JSON file
    with that prefix when the session ends (see `session.end_profiling()`).
    """
    if optimization_level not in OPTIMIZATION_LEVELS:
        raise ValueError(f"optimization_level={optimization_level!r} is not one of {sorted(OPTIMIZATION_LEVELS)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization_level]
    if intra_op_threads is not None:
        if intra_op_threads < 1:
            raise ValueError(f"intra_op_threads={intra_op_threads} must be at least 1, or None for the default")
        options.intra_op_num_threads = intra_op_threads
    # The decoder graph is a single chain of operators, so parallel execution of nodes gains nothing.
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if allow_spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    options.enable_cpu_mem_arena = memory_arena
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix

    resolved = resolve_providers(providers)
    session = ort.InferenceSession(str(model_path), sess_options=options, providers=resolved)
    log.info("opened %s with providers %s", model_path, session.get_providers())
    return session


# Device type for OrtValues of each provider that keeps tensors in its own memory.
PROVIDER_DEVICES = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}


def session_device(session: ort.InferenceSession) -> str:
    """Return the OrtValue device type ("cpu" or "cuda") of the session's first provider."""
    return PROVIDER_DEVICES.get(session.get_providers()[0], "cpu")
