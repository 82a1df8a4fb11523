"""Run the example apps in examples/ as a user would, on a tiny export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def chat_export_dir(tiny_model_factory, tmp_path_factory) -> Path:
    export_kv_buffer = pytest.importorskip("edgelm.export.kv_buffer").export_kv_buffer
    out = tmp_path_factory.mktemp("chat-export") / "onnx"
    export_kv_buffer(tiny_model_factory("llama", initializer_range=0.3), out, check=False)
    return out


# `make test` sets this to the Python of a second environment with edgelm's base install only
# (onnxruntime, tokenizers, numpy; no torch, no transformers).
RUNTIME_PYTHON = os.environ.get("EDGELM_RUNTIME_PYTHON")


def run_chat(export_dir: Path, stdin: str, *options: str, python: str = sys.executable) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT.parent), os.environ.get("PYTHONPATH", "")])}
    command = [python, str(REPO_ROOT / "examples" / "chat.py"), str(export_dir), "--threads", "1", *options]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=120, env=env)


def test_chat_replies_to_each_line(chat_export_dir):
    result = run_chat(chat_export_dir, "What is 2+2?\nAnd 3+3?\n", "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr
    replies = result.stdout.split("assistant> ")[1:]
    assert len(replies) == 2
    assert all(reply.strip() for reply in replies)


def test_chat_reset_and_exit(chat_export_dir):
    result = run_chat(chat_export_dir, "Hi\n/reset\n/exit\nnever read\n", "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert "(history cleared)" in result.stdout
    assert result.stdout.count("assistant> ") == 1


def test_chat_sampling_with_seed_is_reproducible(chat_export_dir):
    options = ("--max-new-tokens", "8", "--temperature", "0.8", "--top-k", "20", "--seed", "3")
    first = run_chat(chat_export_dir, "Hello\n", *options)
    second = run_chat(chat_export_dir, "Hello\n", *options)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout


def test_chat_runs_without_torch(chat_export_dir, tmp_path):
    # sitecustomize runs at start-up, so this blocks torch and transformers before chat.py imports anything.
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        "class BlockTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers'):\n"
        "            raise ImportError(name + ' is blocked by the test')\n"
        "sys.meta_path.insert(0, BlockTorch())\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO_ROOT.parent)])}
    command = [sys.executable, str(REPO_ROOT / "examples" / "chat.py"), str(chat_export_dir), "--threads", "1",
               "--max-new-tokens", "4"]
    result = subprocess.run(command, input="Hi\n", capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert "assistant> " in result.stdout


@pytest.mark.skipif(RUNTIME_PYTHON is None, reason="EDGELM_RUNTIME_PYTHON is not set; `make test` sets it")
def test_chat_runs_in_runtime_only_environment(chat_export_dir):
    probe = "import importlib.util as u; print([m for m in ('torch', 'transformers') if u.find_spec(m)])"
    installed = subprocess.run([RUNTIME_PYTHON, "-c", probe], capture_output=True, text=True, timeout=60)
    assert installed.stdout.strip() == "[]", installed.stdout + installed.stderr

    result = run_chat(chat_export_dir, "Hi\n", "--max-new-tokens", "4", python=RUNTIME_PYTHON)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("assistant> ") == 1


@pytest.mark.skipif(RUNTIME_PYTHON is None, reason="EDGELM_RUNTIME_PYTHON is not set; `make test` sets it")
def test_bench_runs_in_runtime_only_environment(chat_export_dir):
    # The base install has no onnx package, which only the bandwidth-floor estimate needs.
    command = [RUNTIME_PYTHON, "-m", "edgelm", "bench", "--target", f"tiny=onnx:{chat_export_dir}",
               "--prompt-tokens", "8", "--new-tokens", "2", "--runs", "1", "--warmup", "0", "--threads", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["results"][0]["decode_tokens_per_s"] > 0
