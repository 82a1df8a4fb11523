"""Tests for the bit-packed on-disk teacher logit store."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgelm.train.logit_store import (
    LogitStore,
    LogitStoreWriter,
    PackedLayout,
    finalize_store,
    sequence_sha256,
)

VOCAB = 49152
TOP_K = 32
TEACHER = "tiny-teacher@abc123"


def make_row(seed: int, prompt_len: int = 5, response_len: int = 7, top_k: int = TOP_K, vocab: int = VOCAB):
    """Return (input_ids, response_start, topk_ids, topk_logprobs, logsumexp) for a fake row."""
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(0, vocab, prompt_len + response_len).tolist()
    topk_ids = np.stack([rng.choice(vocab, top_k, replace=False) for _ in range(response_len)])
    # A real distribution over top_k + 100 tokens, so the top-k leave a tail of mass.
    logits = rng.normal(0, 3, (response_len, top_k + 100))
    full = np.sort(logits - np.log(np.exp(logits).sum(-1, keepdims=True)), axis=-1)[:, ::-1]
    logprobs = np.ascontiguousarray(full[:, :top_k], dtype=np.float32)
    logsumexp = rng.normal(12, 3, response_len).astype(np.float32)
    return input_ids, prompt_len, topk_ids, logprobs, logsumexp


def write_rows(out_dir, seeds, rows_per_shard=2, **kwargs):
    with LogitStoreWriter(out_dir, TOP_K, VOCAB, TEACHER, rows_per_shard=rows_per_shard, **kwargs) as writer:
        for seed in seeds:
            writer.add(f"row-{seed}/0", *make_row(seed))


def test_layout_is_128_bytes_at_k32():
    layout = PackedLayout(TOP_K, VOCAB)
    assert layout.id_bits == 16
    assert layout.entry_bits == 31
    assert layout.packed_bytes == 124
    assert layout.bytes_per_token == 128
    assert PackedLayout(32, 32768).bytes_per_token == 32 * 30 // 8 + 4
    assert PackedLayout(8, 151_936).id_bits == 18


@pytest.mark.parametrize("vocab", [2, 1000, 32768, VOCAB, 151_936])
def test_pack_round_trip(vocab):
    layout = PackedLayout(TOP_K if vocab > TOP_K else 2, vocab)
    rng = np.random.default_rng(vocab)
    n, k = 9, layout.top_k
    ids = rng.integers(0, vocab, (n, k))
    ids[0, 0] = vocab - 1
    logits = rng.normal(0, 3, (n, k + 5))
    logits[1, -1] = 12.0  # a token with 99% of the mass
    full = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    logprobs = -np.sort(-full, axis=-1)[:, :k].astype(np.float32)
    tail = np.log(np.exp(-np.sort(-full, axis=-1)[:, k:]).sum(-1)).astype(np.float32)
    logsumexp = rng.normal(0, 20, n).astype(np.float32)

    records = layout.pack(ids, logprobs, logsumexp, tail)
    assert records.shape == (n, layout.bytes_per_token)
    unpacked_ids, unpacked_logprobs, unpacked_lse, unpacked_tail = layout.unpack(records)
    np.testing.assert_array_equal(unpacked_ids, ids)
    # The flag bit changes the float32 log-sum-exp by at most one unit in the last place.
    np.testing.assert_allclose(unpacked_lse, logsumexp, rtol=2**-22)
    # Entries 1 to k - 1 round through float16; the larger of top-1 and tail is rebuilt from the rest.
    np.testing.assert_array_equal(unpacked_logprobs[:, 1:], logprobs[:, 1:].astype(np.float16).astype(np.float32))
    tail_stored = tail <= logprobs[:, 0]
    np.testing.assert_array_equal(unpacked_tail[tail_stored], tail[tail_stored].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(
        unpacked_logprobs[~tail_stored, 0], logprobs[~tail_stored, 0].astype(np.float16).astype(np.float32)
    )
    np.testing.assert_allclose(unpacked_logprobs[:, 0], logprobs[:, 0], rtol=2e-3)
    np.testing.assert_allclose(unpacked_tail, tail, rtol=2e-3)
    total = np.exp(unpacked_logprobs.astype(np.float64)).sum(-1) + np.exp(unpacked_tail.astype(np.float64))
    np.testing.assert_allclose(total, 1.0, atol=1e-6)


def test_pack_keeps_no_tail_and_zero_logprob():
    layout = PackedLayout(2, 2)
    records = layout.pack(np.array([[1, 0]]), np.array([[0.0, -np.inf]], dtype=np.float32),
                          np.zeros(1, np.float32), np.array([-np.inf], np.float32))
    _, logprobs, _, tail = layout.unpack(records)
    assert logprobs[0, 0] == 0.0
    assert logprobs[0, 1] == -np.inf
    assert tail[0] == -np.inf


def test_store_round_trip(tmp_path):
    write_rows(tmp_path, range(5))
    store = LogitStore(tmp_path)

    assert sorted(store.keys()) == sorted(f"row-{seed}/0" for seed in range(5))
    assert store.top_k == TOP_K
    assert store.vocab_size == VOCAB
    assert store.teacher_id == TEACHER
    for seed in range(5):
        input_ids, response_start, topk_ids, logprobs, logsumexp = make_row(seed)
        targets = store.get(f"row-{seed}/0")
        assert targets.response_start == response_start
        assert targets.input_ids_sha256 == sequence_sha256(input_ids)
        assert targets.topk_ids.dtype == np.int64
        np.testing.assert_array_equal(targets.topk_ids, topk_ids)
        np.testing.assert_allclose(targets.logsumexp, logsumexp, rtol=2**-22)
        # float16 keeps 11 significant bits of -log p; the top-1 value is rebuilt from the others.
        assert np.all(np.abs(targets.topk_logprobs[:, 1:] - logprobs[:, 1:]) <= np.abs(logprobs[:, 1:]) * 2**-11 + 1e-7)
        np.testing.assert_allclose(targets.topk_logprobs[:, 0], logprobs[:, 0], rtol=1e-3)
        np.testing.assert_allclose(targets.topk_logits, targets.topk_logprobs + targets.logsumexp[:, None])
        store.check_sequence(f"row-{seed}/0", input_ids)


def test_manifest_lists_shards_and_layout(tmp_path):
    write_rows(tmp_path, range(5), rows_per_shard=2, tokenizer={"length": 3})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["version"] == 2
    assert manifest["layout"]["bytes_per_token"] == 128
    assert manifest["tokenizer"] == {"length": 3}
    assert [shard["keys"] for shard in manifest["shards"]] == [["row-0/0", "row-1/0"], ["row-2/0", "row-3/0"], ["row-4/0"]]
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "manifest.json", "shard-000-00000.npy", "shard-000-00001.npy", "shard-000-00002.npy",
    ]
    store = LogitStore(tmp_path)
    assert store.num_tokens() == 5 * 7
    assert store.shard_keys()["shard-000-00002"] == ["row-4/0"]
    assert store.tokenizer == {"length": 3}


def test_store_bytes_per_token(tmp_path):
    write_rows(tmp_path, range(3))
    store = LogitStore(tmp_path)
    assert store.bytes_per_token() == 128
    # Shards add a .npy header (128 bytes) each; the manifest adds the rest.
    shard_bytes = sum(path.stat().st_size for path in tmp_path.glob("shard-*.npy"))
    assert shard_bytes == 3 * 7 * 128 + 2 * 128
    assert store.disk_bytes() > shard_bytes


def test_resume_skips_stored_rows(tmp_path):
    write_rows(tmp_path, range(4))
    with LogitStoreWriter(tmp_path, TOP_K, VOCAB, TEACHER, rows_per_shard=2) as writer:
        assert "row-0/0" in writer
        assert writer.add("row-0/0", *make_row(0)) is False
        assert writer.add("row-9/0", *make_row(9)) is True
    store = LogitStore(tmp_path)
    assert len(store) == 5
    np.testing.assert_array_equal(store.get("row-9/0").topk_ids, make_row(9)[2])


def test_resume_after_crash_mid_shard(tmp_path):
    """A writer killed mid-shard loses only the unlisted rows; leftover files are ignored."""
    writer = LogitStoreWriter(tmp_path, TOP_K, VOCAB, TEACHER, rows_per_shard=2)
    for seed in range(3):
        writer.add(f"row-{seed}/0", *make_row(seed))
    # Simulate a kill during the second shard: a temporary file and an unlisted shard file remain,
    # and manifest.json was never written because close() never ran.
    (tmp_path / ".shard-000-00001.npy.abcd1234.tmp").write_bytes(b"partial")
    (tmp_path / "shard-000-00001.npy").write_bytes(b"garbage from an unfinished shard")
    del writer
    assert not (tmp_path / "manifest.json").exists()

    with LogitStoreWriter(tmp_path, TOP_K, VOCAB, TEACHER, rows_per_shard=2) as writer:
        added = [writer.add(f"row-{seed}/0", *make_row(seed)) for seed in range(4)]
    assert added == [False, False, True, True]
    assert not list(tmp_path.glob(".shard-*.tmp"))
    assert not list(tmp_path.glob("manifest-part-*"))
    store = LogitStore(tmp_path)
    assert sorted(store.keys()) == [f"row-{seed}/0" for seed in range(4)]
    np.testing.assert_array_equal(store.get("row-2/0").topk_ids, make_row(2)[2])


def test_ranks_write_their_own_shards(tmp_path):
    """Two writers (ranks 0 and 1) write apart; finalize_store merges their parts into one manifest."""
    for rank, seeds in ((0, [0, 2, 4]), (1, [1, 3])):
        write_rows(tmp_path, seeds, rank=rank, world_size=2)
    assert not (tmp_path / "manifest.json").exists()
    assert sorted(path.name for path in tmp_path.glob("manifest-part-*")) == [
        "manifest-part-000.json", "manifest-part-001.json",
    ]
    assert finalize_store(tmp_path) == 5
    assert not list(tmp_path.glob("manifest-part-*"))
    store = LogitStore(tmp_path)
    assert sorted(store.shard_keys()) == ["shard-000-00000", "shard-000-00001", "shard-001-00000"]
    for seed in range(5):
        np.testing.assert_array_equal(store.get(f"row-{seed}/0").topk_ids, make_row(seed)[2])
    assert finalize_store(tmp_path) == 5


def test_writer_rejects_other_teacher(tmp_path):
    write_rows(tmp_path, range(1))
    with pytest.raises(ValueError, match="other-teacher"):
        LogitStoreWriter(tmp_path, TOP_K, VOCAB, "other-teacher")
    with pytest.raises(ValueError, match="top_k"):
        LogitStoreWriter(tmp_path, 16, VOCAB, TEACHER)


def test_writer_accepts_other_path_spelling(tmp_path):
    write_rows(tmp_path, range(1))
    # The same weights under another spelling of the path: only the hash after "@" is compared.
    with LogitStoreWriter(tmp_path, TOP_K, VOCAB, "./tiny-teacher/@abc123") as writer:
        writer.add("row-1/0", *make_row(1))
    store = LogitStore(tmp_path)
    assert len(store) == 2
    assert store.teacher_id == TEACHER
    with pytest.raises(ValueError, match="tiny-teacher@abc124"):
        LogitStoreWriter(tmp_path, TOP_K, VOCAB, "tiny-teacher@abc124")
    # An id without "@" is compared whole, never with the other id's hash.
    with pytest.raises(ValueError, match="'abc123'"):
        LogitStoreWriter(tmp_path, TOP_K, VOCAB, "abc123")


def test_changed_sequence_raises_with_row_name(tmp_path):
    write_rows(tmp_path, range(2))
    input_ids = make_row(1)[0]
    changed = input_ids[:-1] + [input_ids[-1] + 1]
    with pytest.raises(ValueError, match="row-1/0"):
        LogitStore(tmp_path).check_sequence("row-1/0", changed)
    with LogitStoreWriter(tmp_path, TOP_K, VOCAB, TEACHER) as writer:
        with pytest.raises(ValueError, match="sha256"):
            writer.is_stored("row-1/0", changed)


def test_old_layout_rejected_with_fix(tmp_path):
    manifest = {"format": "edgelm-logit-store", "version": 1, "top_k": 32, "vocab_size": VOCAB, "shards": [], "rows": {}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="--from score"):
        LogitStore(tmp_path)
    with pytest.raises(ValueError, match="version 1"):
        LogitStoreWriter(tmp_path, TOP_K, VOCAB, TEACHER)


def test_missing_store_and_row(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        LogitStore(tmp_path / "nothing")
    write_rows(tmp_path, range(1))
    with pytest.raises(KeyError, match="row-7/0"):
        LogitStore(tmp_path).get("row-7/0")


def test_add_rejects_bad_rows(tmp_path):
    input_ids, response_start, topk_ids, logprobs, logsumexp = make_row(0)
    with LogitStoreWriter(tmp_path, TOP_K, VOCAB, TEACHER) as writer:
        with pytest.raises(ValueError, match="shape"):
            writer.add("a/0", input_ids, response_start + 1, topk_ids, logprobs, logsumexp)
        with pytest.raises(ValueError, match="response_start"):
            writer.add("a/0", input_ids, 0, topk_ids, logprobs, logsumexp)
        with pytest.raises(ValueError, match="vocabulary"):
            writer.add("a/0", input_ids, response_start, topk_ids + VOCAB, logprobs, logsumexp)
        with pytest.raises(ValueError, match="raw logits"):
            writer.add("a/0", input_ids, response_start, topk_ids, logprobs + 5.0, logsumexp)
        with pytest.raises(ValueError, match="NaN"):
            writer.add("a/0", input_ids, response_start, topk_ids, logprobs * np.nan, logsumexp)
