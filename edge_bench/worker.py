"""Benchmark one target in this process and write its measurements as JSON.

Run by run_benchmark as `python -m edgelm.edge_bench.worker SPEC_JSON OUT_JSON`, one process per
target, so that the peak resident memory belongs to that target alone.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from pathlib import Path

import numpy as np

from edgelm.edge_bench.backends import make_backend
from edgelm.edge_bench.prompt import prompt_ids, read_prompt_text
from edgelm.files import write_json

log = logging.getLogger(__name__)


def peak_rss_mb() -> float:
    """Return this process's peak resident set size in MiB.

    On Linux this reads VmHWM, the high-water mark of the current address space. ru_maxrss is
    not used there because Linux carries it over from the parent through fork and exec, so a
    worker started by a 3 GB training process reported 3 GB whatever it loaded.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports ru_maxrss in KiB, macOS in bytes.
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def time_one_run(backend, ids: list[int], new_tokens: int) -> dict:
    """Prefill `ids`, then decode until `new_tokens` tokens exist; end of turn is ignored.

    TTFT covers the prefill and choosing the first token. Each decode step covers one forward
    pass with the KV cache and choosing the next token; `sample_s` is the token choice
    (greedy argmax over the logits) alone, so `decode_step_s - sample_s` is the model.
    """
    start = time.perf_counter()
    logits = backend.prefill(ids, len(ids) + new_tokens)
    token = int(np.argmax(logits))
    ttft = time.perf_counter() - start

    step_seconds, sample_seconds = [], []
    for _ in range(new_tokens - 1):
        step_start = time.perf_counter()
        logits = backend.decode(token)
        model_done = time.perf_counter()
        token = int(np.argmax(logits))
        end = time.perf_counter()
        step_seconds.append(end - step_start)
        sample_seconds.append(end - model_done)
    return {"ttft_s": ttft, "decode_step_s": step_seconds, "sample_s": sample_seconds,
            "total_s": time.perf_counter() - start}


def summarize(runs: list[dict], new_tokens: int) -> dict:
    """Aggregate timed runs: medians over runs, latency percentiles over all decode steps."""
    steps_ms = np.array([s * 1000 for run in runs for s in run["decode_step_s"]])
    sample_ms = np.array([s * 1000 for run in runs for s in run["sample_s"]])
    rates = [len(run["decode_step_s"]) / sum(run["decode_step_s"]) for run in runs if run["decode_step_s"]]
    return {
        "ttft_ms": float(np.median([run["ttft_s"] for run in runs]) * 1000),
        "decode_ms_median": float(np.median(steps_ms)) if steps_ms.size else None,
        "decode_ms_p90": float(np.percentile(steps_ms, 90)) if steps_ms.size else None,
        "sample_ms_median": float(np.median(sample_ms)) if sample_ms.size else None,
        "decode_tokens_per_s": float(np.median(rates)) if rates else None,
        "end_to_end_tokens_per_s": float(np.median([new_tokens / run["total_s"] for run in runs])),
    }


def benchmark_target(spec: dict) -> dict:
    """Load the target in `spec`, run warm-up and timed runs, and return its measurements.

    `load_s` includes importing the backend's libraries (onnxruntime or torch and transformers),
    because an app pays that cost at start-up too. `tokenize_ms` is the prompt's tokenization,
    timed apart from the model.
    """
    threads = spec.get("threads")
    start = time.perf_counter()
    backend = make_backend(spec["kind"], spec["path"], threads, spec.get("options"))
    load_s = time.perf_counter() - start
    rss_after_load = peak_rss_mb()

    text = read_prompt_text(spec.get("prompt_file"))
    tokenize_start = time.perf_counter()
    backend.tokenize(text)
    tokenize_ms = (time.perf_counter() - tokenize_start) * 1000
    ids = prompt_ids(backend.tokenize, text, spec["prompt_tokens"])
    for _ in range(spec["warmup"]):
        time_one_run(backend, ids, spec["new_tokens"])
    runs = [time_one_run(backend, ids, spec["new_tokens"]) for _ in range(spec["runs"])]

    # Read the peak before estimating weight bytes, which loads the model file once more.
    peak_rss = peak_rss_mb()
    try:
        weight_bytes = backend.weight_bytes_per_token()
    except ImportError as error:
        # The onnx package reads initializer sizes; the runtime-only install does not have it.
        log.warning("no bandwidth floor for %s: %s (pip install onnx to get it)", spec["path"], error)
        weight_bytes = None
    except (OSError, ValueError) as error:
        log.warning("could not estimate weight bytes per token of %s: %s", spec["path"], error)
        weight_bytes = None
    return {
        "name": spec["name"],
        "kind": spec["kind"],
        "path": str(spec["path"]),
        "load_s": load_s,
        "tokenize_ms": tokenize_ms,
        **summarize(runs, spec["new_tokens"]),
        "peak_rss_mb": peak_rss,
        "peak_rss_after_load_mb": rss_after_load,
        "model_size_mb": backend.model_size_bytes() / (1024 * 1024),
        "weight_bytes_per_token": weight_bytes,
        "prompt_tokens": len(ids),
        "new_tokens": spec["new_tokens"],
        "runs": [{"ttft_ms": r["ttft_s"] * 1000, "total_s": r["total_s"]} for r in runs],
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m edgelm.edge_bench.worker SPEC_JSON OUT_JSON", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    write_json(argv[1], benchmark_target(spec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
