"""Tests for the helpers of the benchmark scripts under benchmarks/ (no models are built)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return load_script("runtime_vs_baselines")


def result(name: str, tokens_per_s: float, rss: float = 200.0) -> dict:
    return {"name": name, "prompt_tokens": 128, "new_tokens": 128, "decode_tokens_per_s": tokens_per_s,
            "peak_rss_mb": rss, "model_size_mb": 100.0}


def skipped(name: str) -> dict:
    return {"name": name, "prompt_tokens": 128, "new_tokens": 128, "skipped": "llama_cpp is not installed"}


def rounds() -> list[dict]:
    return [
        {"card": {}, "results": [result("edgelm-int4-gqa", 100.0, 240.0), result("genai-int4", 80.0),
                                 skipped("llamacpp-q4_1")]},
        {"card": {}, "results": [skipped("llamacpp-q4_1"), result("genai-int4", 100.0),
                                 result("edgelm-int4-gqa", 90.0, 250.0)]},
        {"card": {}, "results": [result("edgelm-int4-gqa", 120.0, 245.0), result("genai-int4", 110.0),
                                 skipped("llamacpp-q4_1")]},
    ]


def test_combine_rounds_takes_median_and_max_rss(script):
    merged = {r["name"]: r for r in script.combine_rounds(rounds())["results"]}

    assert merged["edgelm-int4-gqa"]["decode_tokens_per_s"] == 100.0
    assert merged["edgelm-int4-gqa"]["decode_tokens_per_s_rounds"] == [100.0, 90.0, 120.0]
    assert merged["edgelm-int4-gqa"]["peak_rss_mb"] == 250.0
    assert merged["genai-int4"]["decode_tokens_per_s"] == 100.0


def test_combine_rounds_keeps_skipped_target(script):
    merged = {r["name"]: r for r in script.combine_rounds(rounds())["results"]}

    assert merged["llamacpp-q4_1"]["skipped"] == "llama_cpp is not installed"
    assert "decode_tokens_per_s" not in merged["llamacpp-q4_1"]


def test_round_ratios_per_round(script):
    lines = script.round_ratios(rounds())

    assert lines == ["edgelm-int4-gqa / genai-int4 per round: 1.25, 0.90, 1.09"]


def test_format_ratios_skips_missing_targets(script):
    text = script.format_ratios(script.combine_rounds(rounds()))

    assert "edgelm-int4-gqa / genai-int4 decode tokens/s (prompt 128, new 128): 1.00" in text
    assert "llamacpp" not in text
    assert "peak RSS - model file (prompt 128): 150 MB" in text


def test_timed_adds_seconds_per_name():
    timed = load_script("distill_vs_trl").timed
    totals = {}
    double = timed(lambda x: 2 * x, totals, "double")
    assert double(3) == 6
    assert double(4) == 8
    assert set(totals) == {"double"}
    assert totals["double"] >= 0


def test_timed_counts_failed_calls():
    timed = load_script("distill_vs_trl").timed
    totals = {}
    with pytest.raises(ZeroDivisionError):
        timed(lambda: 1 / 0, totals, "fails")()
    assert "fails" in totals
