"""On-disk store of a teacher's top-k logits per response token, for offline distillation.

Layout of a store folder:
  manifest.json                 top_k, vocab_size, teacher_id, the shards and one entry per row
  shard-00000.ids.npy           [tokens, k] top-k token ids (uint16 when vocab_size <= 65536, else int32)
  shard-00000.logprobs.npy      [tokens, k] float16, the top-k log-probabilities (logit - logsumexp)
  shard-00000.lse.npy           [tokens] float32, log-sum-exp of the logits over the full vocabulary
  ...

Rows are identified by a key (the rollout stage uses "{id}/{sample}"). A row's tokens sit
contiguously in its shard, at the offset the manifest gives. Token i of a row is the teacher's
distribution for input_ids[response_start + i], taken from the logits at position
response_start + i - 1.

Values are stored as log-probabilities rather than raw logits because fp16 is most precise
near 0, where the tokens with most of the teacher's mass are. The reader adds the fp32
log-sum-exp back, so TeacherTargets.topk_logits are logits again.

The manifest is the commit point. Each shard's files are written under temporary names and
renamed, and only then is the manifest rewritten (also atomically) to list the shard. A crash
loses at most the rows not yet in a listed shard. Shard files that the manifest does not list
are ignored and overwritten by the next writer. Only one writer may use a store at a time.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgelm.files import atomic_path, write_json

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "edgelm-logit-store"
FORMAT_VERSION = 1
ARRAY_SUFFIXES = ("ids", "logprobs", "lse")
VALUE_DTYPE = np.float16
LSE_DTYPE = np.float32

# Memory maps keep a file descriptor open, so only this many shards stay mapped at once.
_MAX_OPEN_SHARDS = 64


def sequence_sha256(input_ids: Sequence[int] | np.ndarray) -> str:
    """Return the SHA-256 hex digest of the token ids as little-endian int32 bytes."""
    return hashlib.sha256(np.asarray(input_ids, dtype="<i4").tobytes()).hexdigest()


def ids_dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)


@dataclass(frozen=True)
class TeacherTargets:
    """Teacher targets of one row, one entry per response token."""

    topk_ids: np.ndarray  # [n, k] int64
    topk_logits: np.ndarray  # [n, k] float32
    logsumexp: np.ndarray  # [n] float32
    response_start: int
    input_ids_sha256: str

    @property
    def num_tokens(self) -> int:
        return int(self.logsumexp.shape[0])


class LogitStoreWriter:
    """Append rows of teacher targets to a store, resuming an existing one.

    Rows are buffered and written as one shard every `rows_per_shard` rows. Call close(), or
    use the writer as a context manager, to write the last, partial shard. Opening a folder that
    already contains a store checks that top_k, vocab_size and teacher_id match. Then add()
    skips the rows that are already stored.
    """

    def __init__(
        self,
        out_dir: str | Path,
        top_k: int,
        vocab_size: int,
        teacher_id: str,
        rows_per_shard: int = 256,
    ) -> None:
        if top_k < 1 or top_k > vocab_size:
            raise ValueError(f"top_k={top_k} must be between 1 and vocab_size={vocab_size}")
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard={rows_per_shard} must be at least 1")
        self.out_dir = Path(out_dir)
        self.top_k = top_k
        self.vocab_size = vocab_size
        self.teacher_id = teacher_id
        self.rows_per_shard = rows_per_shard
        self._ids_dtype = ids_dtype_for(vocab_size)
        self._pending: list[tuple[str, dict, np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending_keys: dict[str, str] = {}

        manifest_path = self.out_dir / MANIFEST_NAME
        if manifest_path.is_file():
            self._manifest = _read_manifest(manifest_path)
            self._check_compatible()
            log.info("resuming logit store %s with %d rows", self.out_dir, len(self._manifest["rows"]))
        else:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._manifest = {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "top_k": top_k,
                "vocab_size": vocab_size,
                "teacher_id": teacher_id,
                "ids_dtype": self._ids_dtype.name,
                "values": "logprob-float16",
                "shards": [],
                "rows": {},
            }
        self._remove_stale_temp_files()

    def _check_compatible(self) -> None:
        stored = {name: self._manifest[name] for name in ("top_k", "vocab_size", "teacher_id")}
        requested = {"top_k": self.top_k, "vocab_size": self.vocab_size, "teacher_id": self.teacher_id}
        if stored != requested:
            raise ValueError(
                f"logit store {self.out_dir} was written with {stored}, but this writer uses {requested}; "
                f"score into a new folder or delete the old store"
            )

    def _remove_stale_temp_files(self) -> None:
        # Temporary files from a writer that was killed mid-shard; atomic_path names them ".NAME.*.tmp".
        for stale in self.out_dir.glob(".shard-*.tmp"):
            log.info("removing temporary file %s left by an interrupted writer", stale)
            stale.unlink(missing_ok=True)

    def __contains__(self, key: str) -> bool:
        return key in self._manifest["rows"] or key in self._pending_keys

    def is_stored(self, key: str, input_ids: Sequence[int] | np.ndarray) -> bool:
        """Return whether `key` is stored or buffered; raise ValueError if it was scored from other input_ids."""
        stored_sha = self._manifest["rows"].get(key, {}).get("input_ids_sha256") or self._pending_keys.get(key)
        if stored_sha is None:
            return False
        sha = sequence_sha256(input_ids)
        if sha != stored_sha:
            raise ValueError(_mismatch_message(key, sha, stored_sha, self.out_dir))
        return True

    def add(
        self,
        key: str,
        input_ids: Sequence[int] | np.ndarray,
        response_start: int,
        topk_ids: np.ndarray,
        topk_logits: np.ndarray,
        logsumexp: np.ndarray,
    ) -> bool:
        """Buffer one row's targets; return False (and store nothing) if the row is already stored.

        Args:
            key: the row key.
            input_ids: the full sequence, prompt and response.
            response_start: index of the first response token in input_ids (at least 1).
            topk_ids: [n, k] top-k token ids, n = len(input_ids) - response_start.
            topk_logits: [n, k] the teacher's logits for those ids.
            logsumexp: [n] log-sum-exp of the teacher's logits over the full vocabulary.
        """
        if self.is_stored(key, input_ids):
            return False
        topk_ids = np.asarray(topk_ids)
        topk_logits = np.asarray(topk_logits, dtype=np.float32)
        logsumexp = np.asarray(logsumexp, dtype=np.float32)
        self._check_row(key, len(input_ids), response_start, topk_ids, topk_logits, logsumexp)

        sha = sequence_sha256(input_ids)
        entry = {"response_start": int(response_start), "tokens": int(logsumexp.shape[0]), "input_ids_sha256": sha}
        logprobs = (topk_logits - logsumexp[:, None]).astype(VALUE_DTYPE)
        self._pending.append((key, entry, topk_ids.astype(self._ids_dtype), logprobs, logsumexp.astype(LSE_DTYPE)))
        self._pending_keys[key] = sha
        if len(self._pending) >= self.rows_per_shard:
            self.flush()
        return True

    def _check_row(
        self,
        key: str,
        length: int,
        response_start: int,
        topk_ids: np.ndarray,
        topk_logits: np.ndarray,
        logsumexp: np.ndarray,
    ) -> None:
        num_tokens = length - response_start
        if not 1 <= response_start < length:
            raise ValueError(
                f"row {key}: response_start={response_start} must be at least 1 and less than the "
                f"sequence length {length}, so the row has a prompt token and at least one response token"
            )
        expected = (num_tokens, self.top_k)
        if topk_ids.shape != expected or topk_logits.shape != expected or logsumexp.shape != (num_tokens,):
            raise ValueError(
                f"row {key}: expected topk_ids and topk_logits of shape {expected} and logsumexp of shape "
                f"({num_tokens},) for {num_tokens} response tokens; got {topk_ids.shape}, {topk_logits.shape} "
                f"and {logsumexp.shape}"
            )
        if topk_ids.min() < 0 or topk_ids.max() >= self.vocab_size:
            raise ValueError(
                f"row {key}: top-k ids range from {topk_ids.min()} to {topk_ids.max()}, "
                f"outside the vocabulary [0, {self.vocab_size})"
            )

    def flush(self) -> None:
        """Write the buffered rows as one shard, then list it in the manifest."""
        if not self._pending:
            return
        shards = self._manifest["shards"]
        index = max((shard["index"] for shard in shards), default=-1) + 1
        name = f"shard-{index:05d}"
        keys = [key for key, *_ in self._pending]
        arrays = {
            "ids": np.concatenate([ids for _, _, ids, _, _ in self._pending]),
            "logprobs": np.concatenate([values for _, _, _, values, _ in self._pending]),
            "lse": np.concatenate([lse for *_, lse in self._pending]),
        }
        for suffix, array in arrays.items():
            with atomic_path(self.out_dir / f"{name}.{suffix}.npy") as tmp, open(tmp, "wb") as f:
                np.save(f, array)

        offset = 0
        for key, entry, *_ in self._pending:
            self._manifest["rows"][key] = {"shard": index, "offset": offset, **entry}
            offset += entry["tokens"]
        shards.append({"index": index, "name": name, "tokens": offset, "keys": keys})
        write_json(self.out_dir / MANIFEST_NAME, self._manifest)
        log.debug("wrote %s with %d rows, %d tokens", name, len(keys), offset)
        self._pending.clear()
        self._pending_keys.clear()

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> LogitStoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Buffered rows are complete, so they are worth keeping even when scoring failed later.
        self.close()


class LogitStore:
    """Read-only view of a logit store written by LogitStoreWriter; shards are memory-mapped."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST_NAME
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"no logit store at {self.path}: {MANIFEST_NAME} not found; score the rows first "
                f"(edgelm.train.score.score_rows)"
            )
        self._manifest = _read_manifest(manifest_path)
        self._shard_names = {shard["index"]: shard["name"] for shard in self._manifest["shards"]}
        self._open_shards: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()

    @property
    def top_k(self) -> int:
        return int(self._manifest["top_k"])

    @property
    def vocab_size(self) -> int:
        return int(self._manifest["vocab_size"])

    @property
    def teacher_id(self) -> str:
        return str(self._manifest["teacher_id"])

    def keys(self) -> list[str]:
        return list(self._manifest["rows"])

    def __contains__(self, key: str) -> bool:
        return key in self._manifest["rows"]

    def __len__(self) -> int:
        return len(self._manifest["rows"])

    def num_tokens(self) -> int:
        return sum(int(shard["tokens"]) for shard in self._manifest["shards"])

    def _row(self, key: str) -> dict:
        try:
            return self._manifest["rows"][key]
        except KeyError:
            raise KeyError(
                f"row {key!r} is not in logit store {self.path}; score it first (edgelm.train.score.score_rows)"
            ) from None

    def _shard_arrays(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if index in self._open_shards:
            self._open_shards.move_to_end(index)
            return self._open_shards[index]
        name = self._shard_names[index]
        arrays = tuple(np.load(self.path / f"{name}.{suffix}.npy", mmap_mode="r") for suffix in ARRAY_SUFFIXES)
        self._open_shards[index] = arrays
        if len(self._open_shards) > _MAX_OPEN_SHARDS:
            self._open_shards.popitem(last=False)
        return arrays

    def get(self, key: str) -> TeacherTargets:
        """Return one row's targets as in-memory arrays (ids int64, logits and log-sum-exp fp32)."""
        row = self._row(key)
        ids, logprobs, lse = self._shard_arrays(row["shard"])
        rows = slice(row["offset"], row["offset"] + row["tokens"])
        row_lse = np.array(lse[rows], dtype=np.float32)
        return TeacherTargets(
            topk_ids=np.array(ids[rows], dtype=np.int64),
            topk_logits=np.array(logprobs[rows], dtype=np.float32) + row_lse[:, None],
            logsumexp=row_lse,
            response_start=int(row["response_start"]),
            input_ids_sha256=row["input_ids_sha256"],
        )

    def check_sequence(self, key: str, input_ids: Sequence[int] | np.ndarray) -> None:
        """Raise ValueError unless `input_ids` hash to the sequence the row was scored from."""
        stored_sha = self._row(key)["input_ids_sha256"]
        sha = sequence_sha256(input_ids)
        if sha != stored_sha:
            raise ValueError(_mismatch_message(key, sha, stored_sha, self.path))

    def bytes_per_token(self) -> int:
        """Return the array bytes stored per response token (ids, values and log-sum-exp; no file headers)."""
        ids_bytes = np.dtype(self._manifest["ids_dtype"]).itemsize
        return self.top_k * (ids_bytes + np.dtype(VALUE_DTYPE).itemsize) + np.dtype(LSE_DTYPE).itemsize

    def disk_bytes(self) -> int:
        """Return the size of the manifest and of every shard file it lists."""
        files = [self.path / MANIFEST_NAME]
        for name in self._shard_names.values():
            files += [self.path / f"{name}.{suffix}.npy" for suffix in ARRAY_SUFFIXES]
        return sum(path.stat().st_size for path in files)


def _read_manifest(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT_NAME or manifest.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} is not a version-{FORMAT_VERSION} {FORMAT_NAME} manifest "
            f"(format={manifest.get('format')!r}, version={manifest.get('version')!r}); re-score into a new folder"
        )
    return manifest


def _mismatch_message(key: str, sha: str, stored_sha: str, store_path: Path) -> str:
    return (
        f"row {key}: input_ids sha256 {sha} does not match the sha256 {stored_sha} stored in logit store "
        f"{store_path}; the rows changed since they were scored, so re-score them into a new store folder"
    )
