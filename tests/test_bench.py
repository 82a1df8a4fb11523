"""Tests for edgelm.edge_bench on a tiny random Llama, as ONNX export and as PyTorch folder."""

from __future__ import annotations

import argparse
import json

import pytest

from edgelm.edge_bench import build_parser, format_table, main, parse_target, run_benchmark
from edgelm.edge_bench.prompt import DEFAULT_TEXT, prompt_ids, read_prompt_text

NUMBER_FIELDS = [
    "load_s",
    "ttft_ms",
    "decode_ms_median",
    "decode_ms_p90",
    "decode_tokens_per_s",
    "end_to_end_tokens_per_s",
    "peak_rss_mb",
    "peak_rss_after_load_mb",
    "model_size_mb",
]
CARD_FIELDS = ["cpu", "logical_cores", "memory_gb", "python", "onnxruntime", "onnxruntime_providers", "threads"]


@pytest.fixture(scope="session")
def bench_export_dir(tiny_model_dir, tmp_path_factory):
    export_onnx = pytest.importorskip("edgelm.export.onnx_export").export_onnx
    out = tmp_path_factory.mktemp("bench-export") / "onnx"
    export_onnx(tiny_model_dir, out, check=False)
    return out


@pytest.fixture(scope="session")
def report(bench_export_dir, tiny_model_dir):
    targets = [
        {"name": "tiny-onnx", "kind": "onnx", "path": str(bench_export_dir)},
        {"name": "tiny-pytorch", "kind": "pytorch", "path": str(tiny_model_dir)},
    ]
    return run_benchmark(targets, prompt_tokens=16, new_tokens=8, runs=1, warmup=1, threads=1)


@pytest.mark.parametrize("name", ["tiny-onnx", "tiny-pytorch"])
def test_result_fields_positive(report, name):
    result = next(r for r in report["results"] if r["name"] == name)
    assert "error" not in result, result.get("error")
    for field in NUMBER_FIELDS:
        assert result[field] > 0, f"{name}: {field} = {result[field]}"
    assert result["prompt_tokens"] == 16
    assert result["new_tokens"] == 8
    assert len(result["runs"]) == 1


def test_decode_percentiles_ordered(report):
    for result in report["results"]:
        assert result["decode_ms_p90"] >= result["decode_ms_median"]


def test_device_card_fields(report):
    card = report["card"]
    for field in CARD_FIELDS:
        assert card[field] is not None, field
    assert "CPUExecutionProvider" in card["onnxruntime_providers"]
    assert card["threads"] == 1


def test_report_is_json(report):
    assert json.loads(json.dumps(report)) == report


def test_format_table_rows(report):
    table = format_table(report).splitlines()
    assert table[0].startswith("| target | kind |")
    assert len(table) == 2 + len(report["results"])
    assert table[2].startswith("| tiny-onnx | onnx |")
    assert table[3].startswith("| tiny-pytorch | pytorch |")


def test_failed_target_reports_error(tmp_path):
    report = run_benchmark([{"name": "broken", "kind": "onnx", "path": str(tmp_path)}], prompt_tokens=4, new_tokens=2, runs=1, warmup=0)
    result = report["results"][0]
    assert "edgelm_export.json" in result["error"]
    assert "failed" in format_table(report)


def test_cli_writes_json(bench_export_dir, tmp_path, capsys):
    out = tmp_path / "results.json"
    argv = ["--target", f"tiny=onnx:{bench_export_dir}", "--prompt-tokens", "8", "--new-tokens", "4",
            "--runs", "1", "--warmup", "0", "--threads", "1", "--out", str(out)]
    assert main(argv) == 0
    written = json.loads(out.read_text())
    assert written["results"][0]["name"] == "tiny"
    assert written["settings"]["prompt_tokens"] == 8
    printed = capsys.readouterr().out.strip().splitlines()
    assert json.loads(printed[-1])["results"][0]["name"] == "tiny"
    assert any(line.startswith("| tiny | onnx |") for line in printed)


def test_parse_target():
    assert parse_target("a=onnx:/x/y:z") == {"name": "a", "kind": "onnx", "path": "/x/y:z"}
    for bad in ["onnx:/x", "a=/x", "a=tflite:/x", "=onnx:/x"]:
        with pytest.raises(argparse.ArgumentTypeError):
            parse_target(bad)


def test_every_option_has_help():
    for action in build_parser()._actions:
        assert action.help, f"option {action.option_strings} has no help text"


@pytest.mark.parametrize("kwargs", [dict(prompt_tokens=0), dict(new_tokens=0), dict(runs=0), dict(warmup=-1), dict(threads=0)])
def test_invalid_settings(tmp_path, kwargs):
    with pytest.raises(ValueError):
        run_benchmark([{"name": "x", "kind": "onnx", "path": str(tmp_path)}], **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(new_lengths=[4, -3]), "new_tokens=-3"),
    (dict(prompt_lengths=[8, 0]), "prompt_tokens=0"),
    (dict(timeout_s=0), "timeout_s=0"),
])
def test_invalid_setting_named(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        run_benchmark([{"name": "x", "kind": "onnx", "path": str(tmp_path)}], **kwargs)


def test_missing_prompt_file_fails_before_workers(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompt file .*missing.txt not found"):
        run_benchmark([{"name": "x", "kind": "onnx", "path": str(tmp_path)}], prompt_file=tmp_path / "missing.txt")


def test_duplicate_target_names(tmp_path):
    target = {"name": "x", "kind": "onnx", "path": str(tmp_path)}
    with pytest.raises(ValueError, match="unique"):
        run_benchmark([target, target])


def test_prompt_exact_length():
    tokenize = lambda text: [ord(c) for c in text]  # noqa: E731 - one id per character
    assert len(prompt_ids(tokenize, "abc", 10)) == 10
    assert prompt_ids(tokenize, "abcdef", 3) == [ord("a"), ord("b"), ord("c")]


def test_prompt_from_jsonl(tmp_path, gsm8k_dir):
    text = read_prompt_text(gsm8k_dir / "test.jsonl")
    first = json.loads((gsm8k_dir / "test.jsonl").open().readline())["question"]
    assert text.startswith(first)
    assert read_prompt_text(None) == DEFAULT_TEXT


def test_edgelm_bench_subcommand(bench_export_dir, tmp_path):
    from edgelm.cli import main as edgelm_main

    out = tmp_path / "results.json"
    argv = ["bench", "--target", f"tiny=onnx:{bench_export_dir}", "--prompt-tokens", "8", "--new-tokens", "4",
            "--runs", "1", "--warmup", "0", "--out", str(out)]
    assert edgelm_main(argv) == 0
    assert json.loads(out.read_text())["results"][0]["name"] == "tiny"


def test_worker_peak_memory_excludes_parent():
    import subprocess
    import sys

    import numpy as np

    ballast = np.ones(300 * 2**20 // 8)  # 300 MiB resident in this process
    code = "from edgelm.edge_bench.worker import peak_rss_mb; print(peak_rss_mb())"
    child_peak = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert ballast.sum() > 0
    assert child_peak < 250, f"the worker reported {child_peak:.0f} MiB, inherited from the parent"


# ----- matrix, baselines, comparison and plots ----------------------------------------------


@pytest.fixture(scope="session")
def matrix_report(bench_export_dir):
    targets = [{"name": "tiny-onnx", "kind": "onnx", "path": str(bench_export_dir)}]
    return run_benchmark(targets, runs=1, warmup=0, threads=1, prompt_lengths=[8, 16], new_lengths=[4])


def test_matrix_runs_each_length(matrix_report):
    assert [(r["prompt_tokens"], r["new_tokens"]) for r in matrix_report["results"]] == [(8, 4), (16, 4)]


def test_floor_ratio_reported(matrix_report):
    assert matrix_report["card"]["memory_bandwidth_gb_s"] > 0
    for result in matrix_report["results"]:
        assert result["weight_bytes_per_token"] > 0
        assert result["floor_tokens_per_s"] > 0
        assert result["floor_ratio"] > 0


def test_sampling_and_tokenize_timed_apart(matrix_report):
    for result in matrix_report["results"]:
        assert 0 <= result["sample_ms_median"] < result["decode_ms_median"]
        assert result["tokenize_ms"] > 0


def test_missing_library_skips_target(bench_export_dir, tmp_path, monkeypatch):
    from edgelm.edge_bench import bench

    monkeypatch.setattr(bench, "missing_backend", lambda kind: "llama_cpp is not installed (pip install llama-cpp-python)")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    report = run_benchmark([{"name": "llama", "kind": "llamacpp", "path": str(gguf)}], prompt_tokens=8,
                           new_tokens=2, runs=1, warmup=0)
    assert "pip install llama-cpp-python" in report["results"][0]["skipped"]
    assert "skipped: " in format_table(report)


@pytest.mark.parametrize("kind", ["genai", "llamacpp"])
def test_baseline_kinds_parse(kind):
    assert parse_target(f"base={kind}:some/path")["kind"] == kind


def test_compare_reports(matrix_report, tmp_path, capsys):
    faster = json.loads(json.dumps(matrix_report))
    for result in faster["results"]:
        result["decode_tokens_per_s"] *= 2
    (tmp_path / "a.json").write_text(json.dumps(matrix_report))
    (tmp_path / "b.json").write_text(json.dumps(faster))
    assert main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    table = capsys.readouterr().out
    assert table.count("| tiny-onnx |") == 2
    assert "| 2.00 |" in table


def test_compare_labels_and_unmatched_rows(matrix_report, tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    other = json.loads(json.dumps(matrix_report))
    other["results"] = other["results"][:1]
    (tmp_path / "a" / "results.json").write_text(json.dumps(matrix_report))
    (tmp_path / "b" / "results.json").write_text(json.dumps(other))
    assert main(["compare", str(tmp_path / "a" / "results.json"), str(tmp_path / "b" / "results.json")]) == 0
    out = capsys.readouterr().out
    assert "TTFT ms a/results | TTFT ms b/results" in out
    assert "only in a/results: tiny-onnx (prompt 16, new 4)" in out


def test_compare_without_common_rows(matrix_report, tmp_path, capsys):
    other = json.loads(json.dumps(matrix_report))
    for result in other["results"]:
        result["name"] = "renamed"
    (tmp_path / "a.json").write_text(json.dumps(matrix_report))
    (tmp_path / "b.json").write_text(json.dumps(other))
    assert main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 1
    assert "nothing is compared" in capsys.readouterr().out


def test_compare_missing_file_is_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert exit_info.value.code == 2
    assert "a.json not found" in capsys.readouterr().err


def test_plots_written(matrix_report, tmp_path):
    pytest.importorskip("matplotlib")
    from edgelm.edge_bench.report import plot_report

    paths = plot_report(matrix_report, tmp_path / "plots" / "bench")
    assert [p.name for p in paths] == ["bench-latency.png", "bench-memory.png"]
    for path in paths:
        assert path.stat().st_size > 1000


@pytest.mark.parametrize("returncode, text", [
    (3, "exit status 3"),
    (-4, "killed by SIGILL (illegal instruction)"),
    (-9, "killed by SIGKILL"),
    (-15, "killed by SIGTERM"),
])
def test_worker_exit_message(returncode, text):
    from edgelm.edge_bench.bench import worker_exit_message

    assert worker_exit_message(returncode).startswith(text)
