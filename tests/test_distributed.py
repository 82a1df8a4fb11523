"""Scoring and distillation under 2 launched CPU processes match 1 process (gloo backend)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from edgelm.files import write_jsonl
from edgelm.train.logit_store import LogitStore
from edgelm.train.models import load_tokenizer

from test_score_distill import make_rows

# Runs rollout, score_rows and distill; process 0 writes the results as JSON to the last argument.
# Process 1 starts each step late, as a slow process would: process 0 must not write rows before
# process 1 has read what is stored, or the two split different lists and some rows are lost.
SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from edgelm.files import read_jsonl
    from edgelm.train.distill import distill
    from edgelm.train.distributed import process_info
    from edgelm.train.models import load_model
    from edgelm.train.rollout import rollout
    from edgelm.train.score import score_rows

    teacher_dir, student_dir, rows_path, store, out, result = sys.argv[1:]
    process = process_info()
    records = [{"id": f"r{i}", "prompt": f"What is {i} plus {i}?", "answer": str(2 * i), "reasoning": ""}
               for i in range(6)]
    if process.rank == 1:
        time.sleep(2)
    rolled = rollout(student_dir, records, out + "-rollouts.jsonl", mode="fast", max_new_tokens=3,
                     temperature=0.0, batch_size=1, chunk_rows=1)
    teacher, tokenizer = load_model(teacher_dir)
    if process.rank == 1:
        time.sleep(2)
    stats = score_rows(teacher, read_jsonl(rows_path), store, top_k=8, batch_size=2, teacher_id="t",
                       rows_per_shard=2, tokenizer=tokenizer)
    metrics = distill(student_dir, rows_path, store, out, batch_size=2, epochs=1, learning_rate=1e-3)
    if process.is_main:
        with open(result, "w") as f:
            json.dump({"rollout": rolled, "score": stats, "distill": metrics}, f)
    """
)


def launch(tmp_path, processes, teacher_dir, student_dir, rows_path, name):
    script = tmp_path / "run_score_distill.py"
    script.write_text(SCRIPT)
    result = tmp_path / f"{name}.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(script), str(teacher_dir), str(student_dir), str(rows_path), str(tmp_path / f"{name}-store"),
               str(tmp_path / f"{name}-model"), str(result)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(result.read_text())


def test_two_processes_match_one(tiny_model_dir, tiny_model_factory, tmp_path):
    teacher_dir = tiny_model_factory("llama", seed=1, tie_word_embeddings=False)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    rows = make_rows(tokenizer, 8)
    rows_path = tmp_path / "rows.jsonl"
    write_jsonl(rows_path, rows)

    single = launch(tmp_path, 1, teacher_dir, tiny_model_dir, rows_path, "one")
    double = launch(tmp_path, 2, teacher_dir, tiny_model_dir, rows_path, "two")

    assert double["rollout"]["processes"] == 2
    assert double["rollout"]["rows"] == single["rollout"]["rows"] == 6
    assert double["rollout"]["generated_rows"] == 6
    assert double["score"]["processes"] == 2
    assert double["score"]["tokens"] == single["score"]["tokens"]
    one_store, two_store = LogitStore(tmp_path / "one-store"), LogitStore(tmp_path / "two-store")
    assert sorted(two_store.keys()) == sorted(one_store.keys())
    assert {name.split("-")[1] for name in two_store.shard_keys()} == {"000", "001"}
    assert not list((tmp_path / "two-store").glob("manifest-part-*"))
    for key in one_store.keys():
        one, two = one_store.get(key), two_store.get(key)
        np.testing.assert_array_equal(two.topk_ids[:, 0], one.topk_ids[:, 0])
        np.testing.assert_allclose(two.topk_logprobs, one.topk_logprobs, atol=1e-3)

    assert double["distill"]["processes"] == 2
    assert double["distill"]["steps"] == 2
    assert single["distill"]["steps"] == 4
    assert np.isfinite(double["distill"]["train_loss"])
    assert double["distill"]["train_loss"] == pytest.approx(single["distill"]["train_loss"], rel=0.05)
    assert (tmp_path / "two-model" / "config.json").is_file()
