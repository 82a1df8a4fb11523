"""Run latency and memory benchmarks over several targets, each in its own worker process."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import onnxruntime as ort
import psutil

from edgelm.edge_bench.backends import BACKENDS, FILE_BACKENDS, missing_backend
from edgelm.edge_bench.prompt import read_prompt_text
from edgelm.files import write_json

log = logging.getLogger(__name__)

# Columns of format_table: header, result key, number format.
TABLE_COLUMNS = [
    ("load s", "load_s", "{:.2f}"),
    ("TTFT ms", "ttft_ms", "{:.1f}"),
    ("decode ms/token (median)", "decode_ms_median", "{:.2f}"),
    ("decode ms/token (p90)", "decode_ms_p90", "{:.2f}"),
    ("decode tokens/s", "decode_tokens_per_s", "{:.1f}"),
    ("of floor", "floor_ratio", "{:.0%}"),
    ("sample ms", "sample_ms_median", "{:.3f}"),
    ("peak RSS MB", "peak_rss_mb", "{:.0f}"),
    ("model MB", "model_size_mb", "{:.1f}"),
]


def measure_memory_bandwidth(size_mb: int = 256, repeats: int = 5) -> float:
    """Return this machine's memory bandwidth in GB/s from the best of `repeats` large numpy copies.

    A copy reads and writes every byte, so it moves twice the array size. The array is far
    larger than any CPU cache, so the number is DRAM bandwidth for one process.
    """
    import time

    import numpy as np

    source = np.ones(size_mb * 1024 * 1024 // 8, dtype=np.float64)
    target = np.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - start)
    return 2 * source.nbytes / best / 1e9


def add_floor(result: dict, bandwidth_gb_s: float | None) -> dict:
    """Add the memory-bandwidth floor: the decode rate if every step only read the weights once."""
    weight_bytes = result.get("weight_bytes_per_token")
    if bandwidth_gb_s and weight_bytes and result.get("decode_tokens_per_s"):
        result["floor_tokens_per_s"] = bandwidth_gb_s * 1e9 / weight_bytes
        result["floor_ratio"] = result["decode_tokens_per_s"] / result["floor_tokens_per_s"]
    return result


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _package_version(name: str) -> str | None:
    # Reads installed metadata only, so torch is never imported in the parent process.
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_card(threads: int | None = None, bandwidth: bool = True) -> dict:
    """Describe the machine and software versions the benchmark ran on.

    With `bandwidth`, the card includes `memory_bandwidth_gb_s` from measure_memory_bandwidth.
    """
    return {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
        "numpy": _package_version("numpy"),
        "torch": _package_version("torch"),
        "transformers": _package_version("transformers"),
        "onnxruntime_genai": _package_version("onnxruntime-genai"),
        "llama_cpp_python": _package_version("llama-cpp-python"),
        "threads": threads,
        "memory_bandwidth_gb_s": round(measure_memory_bandwidth(), 2) if bandwidth else None,
    }


def _check_settings(targets: list[dict], prompt_tokens: int, new_tokens: int, runs: int, warmup: int, threads: int | None) -> None:
    if not targets:
        raise ValueError("no targets to benchmark; pass at least one {'name', 'kind', 'path'} target")
    for name, value, minimum in (("prompt_tokens", prompt_tokens, 1), ("new_tokens", new_tokens, 1), ("runs", runs, 1), ("warmup", warmup, 0)):
        if value < minimum:
            raise ValueError(f"{name}={value} must be at least {minimum}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads={threads} must be at least 1, or None for the library defaults")

    names = [t.get("name") for t in targets]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"target names must be unique; repeated: {duplicates}")
    for target in targets:
        missing = [key for key in ("name", "kind", "path") if not target.get(key)]
        if missing:
            raise ValueError(f"target {target} is missing {missing}")
        if target["kind"] not in BACKENDS:
            raise ValueError(f"target {target['name']!r}: unknown kind {target['kind']!r}; expected one of {sorted(BACKENDS)}")
        if target["kind"] in FILE_BACKENDS:
            if not Path(target["path"]).is_file():
                raise FileNotFoundError(f"target {target['name']!r}: model file {target['path']} not found")
        elif not Path(target["path"]).is_dir():
            raise FileNotFoundError(f"target {target['name']!r}: model folder {target['path']} not found")


def run_target(spec: dict, timeout_s: float | None = None) -> dict:
    """Run one target in a fresh `python -m edgelm.edge_bench.worker` process; return its result.

    A failed worker gives a result with an `error` field instead of raising, so one broken
    target does not lose the others' numbers. A target whose library is not installed gives a
    result with a `skipped` field and starts no worker.
    """
    missing = missing_backend(spec["kind"])
    if missing:
        log.warning("skipping %s: %s", spec["name"], missing)
        return {**_target_fields(spec), "skipped": missing}
    env = dict(os.environ)
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])  # PyTorch and MKL read it at import time
    with tempfile.TemporaryDirectory(prefix="edgelm-bench-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        command = [sys.executable, "-m", "edgelm.edge_bench.worker", str(spec_path), str(out_path)]
        log.info("benchmarking %s (%s, %s)", spec["name"], spec["kind"], spec["path"])
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
        except subprocess.TimeoutExpired:
            log.error("benchmark of %s timed out after %s s", spec["name"], timeout_s)
            return {**_target_fields(spec), "error": f"timed out after {timeout_s} s"}
        if done.returncode != 0 or not out_path.is_file():
            error = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else worker_exit_message(done.returncode)
            log.error("benchmark of %s failed (exit status %d): %s\n%s", spec["name"], done.returncode, error, done.stderr[-4000:])
            return {**_target_fields(spec), "error": error}
        return json.loads(out_path.read_text(encoding="utf-8"))


def worker_exit_message(returncode: int) -> str:
    """Describe a worker's exit status, naming the signal when a signal killed it."""
    if returncode >= 0:
        return f"exit status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        return f"killed by signal {-returncode}"
    if name == "SIGILL":
        # A native library built for another CPU, or for features a VM lists but does not run:
        # llama-cpp-python built with GGML_NATIVE=ON on a VM listing AMX and AVX512-FP16 died
        # this way, and a build with GGML_NATIVE=OFF (AVX2 and AVX-512, no AMX) ran.
        return ("killed by SIGILL (illegal instruction): the backend's native library uses CPU instructions this "
                "machine does not run; rebuild it for this CPU, for llama-cpp-python with "
                "CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DGGML_AVX2=ON\" pip install --force-reinstall --no-cache-dir llama-cpp-python")
    if name == "SIGKILL":
        return "killed by SIGKILL, often the out-of-memory killer: check free memory or lower the prompt length"
    return f"killed by {name}"


def _target_fields(spec: dict) -> dict:
    return {"name": spec["name"], "kind": spec["kind"], "path": str(spec["path"]),
            "prompt_tokens": spec.get("prompt_tokens"), "new_tokens": spec.get("new_tokens")}


def run_benchmark(
    targets: list[dict],
    prompt_tokens: int = 128,
    new_tokens: int = 128,
    runs: int = 3,
    warmup: int = 1,
    threads: int | None = None,
    prompt_file: str | Path | None = None,
    timeout_s: float | None = None,
    prompt_lengths: list[int] | None = None,
    new_lengths: list[int] | None = None,
) -> dict:
    """Benchmark each target (`{"name", "kind", "path"}`, kind in BACKENDS) in its own process.

    Every target prefills the same text cut to `prompt_tokens` tokens, then decodes exactly
    `new_tokens` tokens greedily, ignoring end of turn. `prompt_lengths` and `new_lengths`,
    when given, replace those two with a matrix: one worker per target and combination.
    `warmup` untimed runs come before `runs` timed ones. `threads` sets onnxruntime intra-op
    threads, torch.set_num_threads and llama.cpp's threads; None keeps each library's default.
    A target may carry `options` for its backend (for example Generator session options).
    Returns {"card", "settings", "results", "created"}.
    """
    prompt_lengths = list(prompt_lengths or [prompt_tokens])
    new_lengths = list(new_lengths or [new_tokens])
    for prompt_length in prompt_lengths:
        for new_length in new_lengths:
            _check_settings(targets, prompt_length, new_length, runs, warmup, threads)
    if timeout_s is not None and timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s} must be positive, or None for no limit")
    # A bad prompt file fails here, once, not in every worker after its model has loaded.
    read_prompt_text(prompt_file)
    settings = {
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "runs": runs,
        "warmup": warmup,
        "threads": threads,
        "prompt_file": str(prompt_file) if prompt_file else None,
    }
    settings.update(prompt_lengths=prompt_lengths, new_lengths=new_lengths)
    card = device_card(threads)
    results = []
    for target in targets:
        for length in prompt_lengths:
            for new in new_lengths:
                spec = {**_target_fields(target), **settings, "prompt_tokens": length, "new_tokens": new,
                        "options": target.get("options")}
                results.append(add_floor(run_target(spec, timeout_s), card["memory_bandwidth_gb_s"]))
    return {
        "card": card,
        "settings": settings,
        "results": results,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def format_table(results: list[dict] | dict) -> str:
    """Format benchmark results (the list, or run_benchmark's whole dict) as a Markdown table."""
    if isinstance(results, dict):
        results = results["results"]
    header = ["target", "kind", "prompt", "new", *(title for title, _, _ in TABLE_COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        cells = [result["name"], result["kind"], str(result.get("prompt_tokens", "")), str(result.get("new_tokens", ""))]
        if "error" in result or "skipped" in result:
            reason = ("failed: " + result["error"]) if "error" in result else ("skipped: " + result["skipped"])
            cells += [reason.replace("|", "/")] + [""] * (len(TABLE_COLUMNS) - 1)
        else:
            cells += ["-" if result.get(key) is None else fmt.format(result[key]) for _, key, fmt in TABLE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_card(card: dict) -> str:
    providers = ", ".join(card["onnxruntime_providers"])
    return "\n".join([
        f"- CPU: {card['cpu']} ({card['logical_cores']} logical cores, {card['physical_cores']} physical), {card['memory_gb']} GB memory",
        f"- OS: {card['os']}, Python {card['python']}",
        f"- onnxruntime {card['onnxruntime']} (providers: {providers}), numpy {card['numpy']}, "
        f"torch {card['torch'] or 'not installed'}, transformers {card['transformers'] or 'not installed'}",
        f"- onnxruntime-genai {card.get('onnxruntime_genai') or 'not installed'}, "
        f"llama-cpp-python {card.get('llama_cpp_python') or 'not installed'}",
        f"- threads: {card['threads'] if card['threads'] is not None else 'library default'}",
        f"- memory bandwidth (numpy copy): {card.get('memory_bandwidth_gb_s') or '-'} GB/s",
    ])


def parse_target(text: str) -> dict:
    """Parse `NAME=KIND:PATH`, for example `onnx-int4=onnx:out/export-int4`."""
    name, sep, rest = text.partition("=")
    kind, sep2, path = rest.partition(":")
    if not (sep and sep2 and name and kind and path):
        raise argparse.ArgumentTypeError(f"invalid target {text!r}; expected NAME=KIND:PATH, e.g. onnx-fp32=onnx:out/export")
    if kind not in BACKENDS:
        raise argparse.ArgumentTypeError(f"invalid target {text!r}: unknown kind {kind!r}; expected one of {sorted(BACKENDS)}")
    return {"name": name, "kind": kind, "path": path}


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Add the benchmark options to `parser` (a new one when None), so a CLI can mount them as a subcommand."""
    parser = parser or argparse.ArgumentParser(prog="edgelm bench", description="Measure load time, TTFT, decode latency and peak memory of exported models.")
    parser.add_argument("--target", action="append", type=parse_target, required=True, metavar="NAME=KIND:PATH",
                        help=f"a model to benchmark; KIND is one of {', '.join(sorted(BACKENDS))}; repeat for several targets")
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[128], help="prompt lengths in tokens; several make a matrix (default: 128)")
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[128], help="tokens generated per run, end of turn ignored; several make a matrix (default: 128)")
    parser.add_argument("--runs", type=int, default=3, help="number of timed runs per target (default: 3)")
    parser.add_argument("--warmup", type=int, default=1, help="number of untimed warm-up runs per target (default: 1)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for onnxruntime and torch (default: each library's default)")
    parser.add_argument("--prompt-file", default=None, help="text file, or GSM8K-style JSONL with a 'question' field, to build the prompt from (default: a built-in math word problem)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds allowed per target before its worker is stopped (default: no limit)")
    parser.add_argument("--out", default=None, help="path of the result JSON file to write (default: none)")
    parser.add_argument("--plot", default=None, metavar="PREFIX", help="write PREFIX-latency.png and PREFIX-memory.png (needs matplotlib; default: none)")
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark from parsed options; print the card, a Markdown table and one JSON line."""
    report = run_benchmark(
        args.target,
        prompt_tokens=args.prompt_tokens[0],
        new_tokens=args.new_tokens[0],
        runs=args.runs,
        warmup=args.warmup,
        threads=args.threads,
        prompt_file=args.prompt_file,
        timeout_s=args.timeout,
        prompt_lengths=args.prompt_tokens,
        new_lengths=args.new_tokens,
    )
    if args.out:
        write_json(args.out, report)
    if args.plot:
        from edgelm.edge_bench.report import plot_report

        for path in plot_report(report, args.plot):
            log.info("wrote %s", path)
    print(format_card(report["card"]))
    print()
    print(format_table(report))
    print()
    print(json.dumps(report, separators=(",", ":")))
    return 1 if any("error" in r for r in report["results"]) else 0


def main(argv: list[str] | None = None) -> int:
    """Run `python -m edgelm.edge_bench [options]`, or `... compare A.json B.json`."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if argv[:1] == ["compare"]:
        from edgelm.edge_bench.report import compare_main

        return compare_main(argv[1:])
    return run_from_args(build_parser().parse_args(argv))

