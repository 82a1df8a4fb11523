"""Latency and memory benchmark for exported models and their PyTorch sources.

    from edgelm.edge_bench import run_benchmark, format_table
    report = run_benchmark([{"name": "onnx-fp32", "kind": "onnx", "path": "out/export"}], threads=2)
    print(format_table(report))

Each target runs in its own worker process, so peak memory is measured per target.
"""

from edgelm.edge_bench.bench import build_parser, device_card, format_card, format_table, main, parse_target, run_benchmark, run_from_args

__all__ = ["build_parser", "device_card", "format_card", "format_table", "main", "parse_target", "run_benchmark", "run_from_args"]
