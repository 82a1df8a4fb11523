"""Tests for the on-disk teacher logit store."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgelm.train.logit_store import LogitStore, LogitStoreWriter, sequence_sha256

VOCAB = 49152
TOP_K = 32
TEACHER = "tiny-teacher@abc123"


def make_row(seed: int, prompt_len: int = 5, response_len: int = 7, top_k: int = TOP_K):
    """Return (input_ids, response_start, topk_ids, topk_logits, logsumexp) for a fake row."""
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(0, VOCAB, prompt_len + response_len).tolist()
    topk_ids = np.stack([rng.choice(VOCAB, top_k, replace=False) for _ in range(response_len)])
    topk_logits = np.sort(rng.normal(0, 4, (response_len, top_k)).astype(np.float32), axis=-1)[:, ::-1]
    logsumexp = (topk_logits.max(-1) + rng.uniform(0.1, 2.0, response_len)).astype(np.float32)
    return input_ids, prompt_len, topk_ids, np.ascontiguousarray(topk_logits), logsumexp


def write_rows(out_dir, seeds, rows_per_shard=2):
    with LogitStoreWriter(out_dir, TOP_K, VOCAB, TEACHER, rows_per_shard=rows_per_shard) as writer:
        for seed in seeds:
            writer.add(f"row-{seed}/0", *make_row(seed))


def test_store_round_trip(tmp_path):
    write_rows(tmp_path, range(5))
    store = LogitStore(tmp_path)

    assert sorted(store.keys()) == sorted(f"row-{seed}/0" for seed in range(5))
    assert store.top_k == TOP_K
    assert store.vocab_size == VOCAB
    assert store.teacher_id == TEACHER
    for seed in range(5):
        input_ids, response_start, topk_ids, topk_logits, logsumexp = make_row(seed)
        targets = store.get(f"row-{seed}/0")
        assert targets.response_start == response_start
        assert targets.input_ids_sha256 == sequence_sha256(input_ids)
        assert targets.topk_ids.dtype == np.int64
        np.testing.assert_array_equal(targets.topk_ids, topk_ids)
        np.testing.assert_array_equal(targets.logsumexp, logsumexp)
        # Values go through fp16 log-probabilities; the error is that of fp16 at |logprob|.
        logprobs = topk_logits - logsumexp[:, None]
        tolerance = np.abs(logprobs) * 2**-11 + 1e-6
        assert np.all(np.abs(targets.topk_logits - topk_logits) <= tolerance)
        store.check_sequence(f"row-{seed}/0", input_ids)


def test_store_shards_and_manifest(tmp_path):
    write_rows(tmp_path, range(5), rows_per_shard=2)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [len(shard["keys"]) for shard in manifest["shards"]] == [2, 2, 1]
    assert manifest["ids_dtype"] == "uint16"
    assert sorted(path.name for path in tmp_path.glob("shard-00000.*")) == [
        "shard-00000.ids.npy",
        "shard-00000.logprobs.npy",
        "shard-00000.lse.npy",
    ]
    assert LogitStore(tmp_path).num_tokens() == 5 * 7


def test_store_bytes_per_token(tmp_path):
    write_rows(tmp_path, range(3))
    store = LogitStore(tmp_path)
    # uint16 ids (2 B) and fp16 values (2 B) for 32 entries, plus one fp32 log-sum-exp.
    print(f"logit store bytes per token at k={TOP_K}: {store.bytes_per_token()}")
    assert store.bytes_per_token() == 32 * 2 + 32 * 2 + 4 == 132
    assert store.disk_bytes() > 3 * 7 * 132


def test_store_int32_ids_for_large_vocab(tmp_path):
    vocab = 70000
    with LogitStoreWriter(tmp_path, 2, vocab, TEACHER) as writer:
        writer.add("a/0", [1, 2, 3], 1, np.array([[69999, 0], [5, 6]]), np.zeros((2, 2)), np.ones(2))
    store = LogitStore(tmp_path)
    assert store.bytes_per_token() == 2 * 4 + 2 * 2 + 4
    np.testing.assert_array_equal(store.get("a/0").topk_ids, [[69999, 0], [5, 6]])


def test_store_resume_skips_stored_rows(tmp_path):
    write_rows(tmp_path, range(4))
    with LogitStoreWriter(tmp_path, TOP_K, VOCAB, TEACHER, rows_per_shard=2) as writer:
        assert "row-0/0" in writer
        assert writer.add("row-0/0", *make_row(0)) is False
        assert writer.add("row-9/0", *make_row(9)) is True
    store = LogitStore(tmp_path)
    assert len(store) == 5
    np.testing.assert_array_equal(store.get("row-9/0").topk_ids, make_row(9)[2])


def test_store_resume_after_crash_mid_shard(tmp_path):
    """A writer killed mid-shard loses only the unlisted rows; leftover files are ignored."""
    writer = LogitStoreWriter(tmp_path, TOP_K, VOCAB, TEACHER, rows_per_shard=2)
    for seed in range(3):
        writer.add(f"row-{seed}/0", *make_row(seed))
    # Simulate a kill during the second shard: a temporary file and an unlisted shard file remain.
    (tmp_path / ".shard-00001.ids.npy.abcd1234.tmp").write_bytes(b"partial")
    (tmp_path / "shard-00001.ids.npy").write_bytes(b"garbage from an unfinished shard")
    del writer

    store = LogitStore(tmp_path)
    assert sorted(store.keys()) == ["row-0/0", "row-1/0"]

    with LogitStoreWriter(tmp_path, TOP_K, VOCAB, TEACHER, rows_per_shard=2) as writer:
        added = [writer.add(f"row-{seed}/0", *make_row(seed)) for seed in range(4)]
    assert added == [False, False, True, True]
    assert not list(tmp_path.glob(".shard-*.tmp"))

    store = LogitStore(tmp_path)
    assert sorted(store.keys()) == [f"row-{seed}/0" for seed in range(4)]
    for seed in range(4):
        np.testing.assert_array_equal(store.get(f"row-{seed}/0").topk_ids, make_row(seed)[2])


def test_store_sequence_mismatch_error(tmp_path):
    write_rows(tmp_path, [0])
    store = LogitStore(tmp_path)
    input_ids = make_row(0)[0]
    changed = [*input_ids[:-1], (input_ids[-1] + 1) % VOCAB]
    with pytest.raises(ValueError) as error:
        store.check_sequence("row-0/0", changed)
    message = str(error.value)
    assert "row-0/0" in message
    assert sequence_sha256(changed) in message
    assert sequence_sha256(input_ids) in message


def test_writer_rejects_changed_sequence(tmp_path):
    write_rows(tmp_path, [0])
    _, response_start, topk_ids, topk_logits, logsumexp = make_row(0)
    changed = make_row(1)[0]
    with LogitStoreWriter(tmp_path, TOP_K, VOCAB, TEACHER) as writer:
        with pytest.raises(ValueError, match="row-0/0"):
            writer.add("row-0/0", changed, response_start, topk_ids, topk_logits, logsumexp)


def test_store_missing_key_error(tmp_path):
    write_rows(tmp_path, [0])
    with pytest.raises(KeyError, match="row-7/0"):
        LogitStore(tmp_path).get("row-7/0")


def test_store_missing_folder_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        LogitStore(tmp_path / "nowhere")


def test_writer_rejects_other_teacher(tmp_path):
    write_rows(tmp_path, [0])
    with pytest.raises(ValueError, match="other-teacher"):
        LogitStoreWriter(tmp_path, TOP_K, VOCAB, "other-teacher")
    with pytest.raises(ValueError, match="top_k"):
        LogitStoreWriter(tmp_path, 16, VOCAB, TEACHER)


def test_writer_rejects_bad_shapes(tmp_path):
    input_ids, response_start, topk_ids, topk_logits, logsumexp = make_row(0)
    with LogitStoreWriter(tmp_path, TOP_K, VOCAB, TEACHER) as writer:
        with pytest.raises(ValueError, match="shape"):
            writer.add("a/0", input_ids, response_start + 1, topk_ids, topk_logits, logsumexp)
        with pytest.raises(ValueError, match="response_start"):
            writer.add("a/0", input_ids, 0, topk_ids, topk_logits, logsumexp)
        with pytest.raises(ValueError, match="vocabulary"):
            writer.add("a/0", input_ids, response_start, topk_ids + VOCAB, topk_logits, logsumexp)
