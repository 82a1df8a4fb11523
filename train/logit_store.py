"""On-disk store of a teacher's top-k log-probabilities per response token, for offline distillation.

Layout version 2 of a store folder:
  manifest.json                   layout, top_k, vocab_size, teacher_id, the teacher's tokenizer
                                  fingerprint, the shards with their row keys, one entry per row
  shard-RRR-NNNNN.npy             uint8 [tokens, bytes_per_token], written by process RRR
  manifest-part-RRR.json          rows committed by process RRR and not yet merged into manifest.json

One token is one fixed-size record of bytes_per_token bytes:
  * k entries of (id_bits + 15) bits each, bit-packed big-endian with numpy.packbits, then
    zero-padded to a whole byte. id_bits = ceil(log2(vocab_size)), 16 for a vocabulary of
    49,152. The 15 value bits are a -log p as float16 without its sign bit, which is always 0
    because log p <= 0. Entries are in descending probability.
  * the log-sum-exp of the teacher's logits over the full vocabulary, float32 little-endian,
    whose lowest mantissa bit is replaced by a flag (a relative change of at most 2^-23).
At k = 32 and vocab_size 49,152: ceil(32 * 31 / 8) + 4 = 124 + 4 = 128 bytes per token.

The k top-k probabilities and the tail mass p_tail (outside the top-k) sum to 1, so one of
them is stored implicitly: the largest of the top-1 probability and p_tail, rebuilt by the
reader as 1 minus the others. Flag 0: the top-1 is implicit, and entry 0 contains the top-1 id
with -log p_tail as its value. Flag 1: p_tail is implicit and every entry stores its own value.
Rebuilding the largest class keeps the cancellation error small relative to it. Rebuilding a
small tail instead, as p_tail = 1 - sum(p_i), would be wrong by tens of percent when the top-k
contains 99.99% of the mass, because each p_i carries fp16 rounding.

Rows are identified by a key ("{id}/{sample}" from the rollout stage). A row's tokens sit
contiguously in one shard. Token i of a row is the teacher's distribution for
input_ids[response_start + i], taken from the logits at position response_start + i - 1.

Writes are crash-safe and allow one writer per process rank. A writer buffers rows and writes
them as one shard under a temporary name, renames it, and only then rewrites its part manifest
(also atomically), which is its commit point. A crash loses at most the rows not yet in a listed
shard. close() (one process) or finalize_store() (process 0, after a barrier) merges the part
manifests into manifest.json, which is all a reader reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgelm.files import atomic_path, write_json

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
PART_PREFIX = "manifest-part-"
FORMAT_NAME = "edgelm-logit-store"
FORMAT_VERSION = 2
VALUE_BITS = 15
LSE_BYTES = 4

# Memory maps keep a file descriptor open, so only this many shards stay mapped at once.
_MAX_OPEN_SHARDS = 64
# The header's torch dtype names, mapped to the names that --precision and the config take.
_PRECISION_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}

# How to score again, for both ways of running the score stage.
RESCORE = (
    "score again: `edgelm pipeline CONFIG --from score`, or `edgelm score` into a new folder "
    "(or after deleting this one)"
)


def sequence_sha256(input_ids: Sequence[int] | np.ndarray) -> str:
    """Return the SHA-256 hex digest of the token ids as little-endian int32 bytes."""
    return hashlib.sha256(np.asarray(input_ids, dtype="<i4").tobytes()).hexdigest()


@dataclass(frozen=True)
class PackedLayout:
    """Bit layout of one token record: k (id, -log p) entries, then a float32 log-sum-exp."""

    top_k: int
    vocab_size: int

    @property
    def id_bits(self) -> int:
        return max(1, math.ceil(math.log2(self.vocab_size)))

    @property
    def entry_bits(self) -> int:
        return self.id_bits + VALUE_BITS

    @property
    def packed_bytes(self) -> int:
        return math.ceil(self.top_k * self.entry_bits / 8)

    @property
    def bytes_per_token(self) -> int:
        return self.packed_bytes + LSE_BYTES

    def describe(self) -> dict:
        return {
            "id_bits": self.id_bits,
            "value": "-logprob as float16 without the sign bit",
            "value_bits": VALUE_BITS,
            "lse": "float32 little-endian, last 4 bytes; lowest bit: 1 when the tail is implicit",
            "bytes_per_token": self.bytes_per_token,
        }

    def pack(self, ids: np.ndarray, logprobs: np.ndarray, logsumexp: np.ndarray, tail_logprob: np.ndarray) -> np.ndarray:
        """Return uint8 [n, bytes_per_token] records.

        ids and logprobs are [n, k] in descending probability, logsumexp and tail_logprob
        (log of the mass outside the top-k, -inf for none) are [n].
        """
        n = ids.shape[0]
        tail_is_implicit = tail_logprob > logprobs[:, 0]
        first = np.where(tail_is_implicit, logprobs[:, 0], tail_logprob)
        logprobs = np.concatenate([first[:, None], logprobs[:, 1:]], axis=-1)
        # Big-endian bytes, so unpackbits yields the most significant bit first.
        id_bits = np.unpackbits(ids.astype(">u4").view(np.uint8).reshape(n, self.top_k, 4), axis=-1)
        id_bits = id_bits[..., 32 - self.id_bits :]
        # abs() turns -0.0 into 0.0, so the dropped sign bit is 0 for every value.
        negated = np.abs(np.maximum(-logprobs, 0.0)).astype(">f2")
        value_bits = np.unpackbits(negated.view(np.uint8).reshape(n, self.top_k, 2), axis=-1)[..., 1:]
        entries = np.concatenate([id_bits, value_bits], axis=-1).reshape(n, self.top_k * self.entry_bits)
        packed = np.packbits(entries, axis=-1)
        lse_bits = np.ascontiguousarray(logsumexp, dtype="<f4").view("<u4")
        lse_bits = (lse_bits & np.uint32(0xFFFFFFFE)) | tail_is_implicit.astype("<u4")
        return np.concatenate([packed, lse_bits.view(np.uint8).reshape(n, LSE_BYTES)], axis=-1)

    def unpack(self, records: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Return ids int64 [n, k], logprobs float32 [n, k], logsumexp and tail_logprob float32 [n]."""
        n = records.shape[0]
        records = np.ascontiguousarray(records)
        bits = np.unpackbits(records[:, : self.packed_bytes], axis=-1, count=self.top_k * self.entry_bits)
        bits = bits.reshape(n, self.top_k, self.entry_bits)
        id_bits = np.zeros((n, self.top_k, 32), dtype=np.uint8)
        id_bits[..., 32 - self.id_bits :] = bits[..., : self.id_bits]
        ids = np.packbits(id_bits, axis=-1).view(">u4")[..., 0].astype(np.int64)
        value_bits = np.zeros((n, self.top_k, 16), dtype=np.uint8)
        value_bits[..., 1:] = bits[..., self.id_bits :]
        logprobs = -np.packbits(value_bits, axis=-1).view(">f2")[..., 0].astype(np.float64)
        lse_bits = records[:, self.packed_bytes :].copy().view("<u4")[:, 0]
        tail_is_implicit = (lse_bits & 1).astype(bool)
        logsumexp = (lse_bits & np.uint32(0xFFFFFFFE)).view("<f4").astype(np.float32)

        # The implicit class is what the stored ones leave of 1 (in float64).
        rest = np.exp(logprobs[:, 1:]).sum(-1)
        with np.errstate(divide="ignore"):
            implicit_top = np.log(np.maximum(1.0 - np.exp(logprobs[:, 0]) - rest, np.exp(logprobs[:, 1:2]).max(-1, initial=0.0)))
            implicit_tail = np.log(np.maximum(1.0 - np.exp(logprobs[:, 0]) - rest, 0.0))
        tail_logprob = np.where(tail_is_implicit, implicit_tail, logprobs[:, 0])
        logprobs[:, 0] = np.where(tail_is_implicit, logprobs[:, 0], implicit_top)
        return ids, logprobs.astype(np.float32), logsumexp, tail_logprob.astype(np.float32)


@dataclass(frozen=True)
class TeacherTargets:
    """Teacher targets of one row, one entry per response token."""

    topk_ids: np.ndarray  # [n, k] int64
    topk_logprobs: np.ndarray  # [n, k] float32, log p over the full vocabulary
    logsumexp: np.ndarray  # [n] float32
    tail_logprob: np.ndarray  # [n] float32, log of the mass outside the top-k (-inf for none)
    response_start: int
    input_ids_sha256: str

    @property
    def topk_logits(self) -> np.ndarray:
        """The teacher's logits for topk_ids, rebuilt as log p + log-sum-exp."""
        return self.topk_logprobs + self.logsumexp[:, None]

    @property
    def num_tokens(self) -> int:
        return int(self.logsumexp.shape[0])


def _header(top_k: int, vocab_size: int, teacher_id: str, tokenizer: dict | None, teacher_dtype: str | None) -> dict:
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "top_k": top_k,
        "vocab_size": vocab_size,
        "teacher_id": teacher_id,
        "teacher_dtype": teacher_dtype,
        "tokenizer": tokenizer,
        "layout": PackedLayout(top_k, vocab_size).describe(),
    }


def same_model_id(stored: str | None, requested: str) -> bool:
    """Return True when two "PATH@HASH" ids name one model: equal hashes after "@", or equal strings.

    Two spellings of one path ("runs/a/teacher" and "./runs/a/teacher") then compare equal.
    """
    if stored is None or "@" not in stored or "@" not in requested:
        return stored == requested
    return stored.rsplit("@", 1)[1] == requested.rsplit("@", 1)[1]


class LogitStoreWriter:
    """Append rows of teacher targets to a store, resuming an existing one.

    Rows are buffered and written as one shard every `rows_per_shard` rows. Call close(), or
    use the writer as a context manager, to write the last, partial shard. With world_size 1,
    close() also merges the part manifest into manifest.json. With more processes, each rank
    opens its own writer and process 0 calls finalize_store() after a barrier.

    Opening a folder that already contains rows checks that top_k, vocab_size and teacher_id
    match. Then add() skips the rows that any process already committed.
    """

    def __init__(
        self,
        out_dir: str | Path,
        top_k: int,
        vocab_size: int,
        teacher_id: str,
        rows_per_shard: int = 256,
        *,
        tokenizer: dict | None = None,
        teacher_dtype: str | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if top_k < 1 or top_k > vocab_size:
            raise ValueError(f"top_k={top_k} must be between 1 and vocab_size={vocab_size}")
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard={rows_per_shard} must be at least 1")
        self.out_dir = Path(out_dir)
        self.top_k = top_k
        self.vocab_size = vocab_size
        self.teacher_id = teacher_id
        self.teacher_dtype = teacher_dtype
        self.rows_per_shard = rows_per_shard
        self.rank = rank
        self.world_size = world_size
        self.layout = PackedLayout(top_k, vocab_size)
        self._pending: list[tuple[str, dict, np.ndarray]] = []
        self._pending_keys: dict[str, str] = {}

        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temp_files()
        committed = _read_committed(self.out_dir)
        for header in committed.headers:
            self._check_compatible(header)
        self._stored_rows: dict[str, dict] = committed.rows
        self._shard_names = {shard["name"] for shard in committed.shards}
        part_path = self._part_path()
        self._part = _read_json(part_path) if part_path.is_file() else {
            **_header(top_k, vocab_size, teacher_id, tokenizer, teacher_dtype), "shards": [], "rows": {},
        }
        if self._stored_rows:
            log.info("resuming logit store %s with %d rows", self.out_dir, len(self._stored_rows))

    def _part_path(self) -> Path:
        return self.out_dir / f"{PART_PREFIX}{self.rank:03d}.json"

    def _check_compatible(self, header: dict) -> None:
        stored = {name: header.get(name) for name in ("top_k", "vocab_size", "teacher_id")}
        requested = {"top_k": self.top_k, "vocab_size": self.vocab_size, "teacher_id": self.teacher_id}
        same_teacher = same_model_id(stored["teacher_id"], self.teacher_id)
        if not same_teacher or stored["top_k"] != self.top_k or stored["vocab_size"] != self.vocab_size:
            stored_dtype = header.get("teacher_dtype")
            dtype_note = ""
            same_shape = stored["top_k"] == self.top_k and stored["vocab_size"] == self.vocab_size
            if same_shape and stored_dtype and self.teacher_dtype and stored_dtype != self.teacher_dtype:
                # The id hashes the precision with the weights, so only the dtypes can be compared here.
                stored_name = _PRECISION_NAMES.get(stored_dtype, stored_dtype)
                current_name = _PRECISION_NAMES.get(self.teacher_dtype, self.teacher_dtype)
                dtype_note = (f"; the store was scored with the teacher in {stored_name} ({stored_dtype}) and this run "
                              f"scores in {current_name}: if the teacher is otherwise the same, scoring in "
                              f"{stored_name} again resumes the store (`edgelm score --precision {stored_name}`, "
                              f"or distill.score_precision: {stored_name} in the pipeline)")
            raise ValueError(
                f"logit store {self.out_dir} was written with {stored}, but this writer uses {requested} "
                f"(the teacher id changes with the teacher's weights, config and the precision it scores in)"
                f"{dtype_note}; score into a new folder or delete the old store"
            )

    def _remove_stale_temp_files(self) -> None:
        # Temporary files from a killed writer of this rank; atomic_path names them ".NAME.*.tmp".
        # Other ranks' temporary files may belong to writers that are running now.
        patterns = (f".shard-{self.rank:03d}-*.tmp", f".{PART_PREFIX}{self.rank:03d}.json.*.tmp")
        for pattern in patterns:
            for stale in self.out_dir.glob(pattern):
                log.info("removing temporary file %s left by an interrupted writer", stale)
                stale.unlink(missing_ok=True)

    def __contains__(self, key: str) -> bool:
        return key in self._stored_rows or key in self._pending_keys

    def is_stored(self, key: str, input_ids: Sequence[int] | np.ndarray) -> bool:
        """Return whether `key` is stored or buffered; raise ValueError if it was scored from other input_ids."""
        stored_sha = self._stored_rows.get(key, {}).get("input_ids_sha256") or self._pending_keys.get(key)
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
        topk_logprobs: np.ndarray,
        logsumexp: np.ndarray,
        tail_logprob: np.ndarray | None = None,
    ) -> bool:
        """Buffer one row's targets; return False (and store nothing) if the row is already stored.

        Args:
            key: the row key.
            input_ids: the full sequence, prompt and response.
            response_start: index of the first response token in input_ids (at least 1).
            topk_ids: [n, k] top-k token ids, n = len(input_ids) - response_start.
            topk_logprobs: [n, k] the teacher's log-probabilities (logit - logsumexp) for those ids.
            logsumexp: [n] log-sum-exp of the teacher's logits over the full vocabulary.
            tail_logprob: [n] log of the teacher's mass outside the top-k, computed from the full
                logits. None derives it as log(1 - sum(p_i)), which is imprecise for small tails.
        """
        if self.is_stored(key, input_ids):
            return False
        topk_ids = np.asarray(topk_ids)
        topk_logprobs = np.asarray(topk_logprobs, dtype=np.float32)
        logsumexp = np.asarray(logsumexp, dtype=np.float32)
        self._check_row(key, len(input_ids), response_start, topk_ids, topk_logprobs, logsumexp)
        if tail_logprob is None:
            with np.errstate(divide="ignore"):
                tail_logprob = np.log(np.maximum(1.0 - np.exp(topk_logprobs.astype(np.float64)).sum(-1), 0.0))
        tail_logprob = np.asarray(tail_logprob, dtype=np.float32)
        # Entry 0 must be the top-1 token, whose value the reader rebuilds.
        order = np.argsort(-topk_logprobs, axis=-1, kind="stable")
        topk_ids = np.take_along_axis(topk_ids, order, axis=-1)
        topk_logprobs = np.take_along_axis(topk_logprobs, order, axis=-1)

        sha = sequence_sha256(input_ids)
        entry = {"response_start": int(response_start), "tokens": int(logsumexp.shape[0]), "input_ids_sha256": sha}
        self._pending.append((key, entry, self.layout.pack(topk_ids, topk_logprobs, logsumexp, tail_logprob)))
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
        topk_logprobs: np.ndarray,
        logsumexp: np.ndarray,
    ) -> None:
        num_tokens = length - response_start
        if not 1 <= response_start < length:
            raise ValueError(
                f"row {key}: response_start={response_start} must be at least 1 and less than the "
                f"sequence length {length}, so the row has a prompt token and at least one response token"
            )
        expected = (num_tokens, self.top_k)
        if topk_ids.shape != expected or topk_logprobs.shape != expected or logsumexp.shape != (num_tokens,):
            raise ValueError(
                f"row {key}: expected topk_ids and topk_logprobs of shape {expected} and logsumexp of shape "
                f"({num_tokens},) for {num_tokens} response tokens; got {topk_ids.shape}, {topk_logprobs.shape} "
                f"and {logsumexp.shape}"
            )
        if topk_ids.min() < 0 or topk_ids.max() >= self.vocab_size:
            raise ValueError(
                f"row {key}: top-k ids range from {topk_ids.min()} to {topk_ids.max()}, "
                f"outside the vocabulary [0, {self.vocab_size})"
            )
        if np.isnan(topk_logprobs).any() or np.isnan(logsumexp).any():
            raise ValueError(f"row {key}: the teacher's log-probabilities contain NaN; check the teacher's logits")
        if (topk_logprobs > 1e-3).any():
            raise ValueError(
                f"row {key}: log-probabilities up to {topk_logprobs.max():.4g} are above 0; pass logit - logsumexp, "
                f"not raw logits"
            )

    def flush(self) -> None:
        """Write the buffered rows as one shard, then list it in this rank's part manifest."""
        if not self._pending:
            return
        name = self._next_shard_name()
        records = np.concatenate([packed for *_, packed in self._pending])
        with atomic_path(self.out_dir / f"{name}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, records)

        offset = 0
        keys = []
        for key, entry, _ in self._pending:
            row = {"shard": name, "offset": offset, **entry}
            self._part["rows"][key] = row
            self._stored_rows[key] = row
            keys.append(key)
            offset += entry["tokens"]
        self._part["shards"].append({"name": name, "tokens": offset, "keys": keys})
        self._shard_names.add(name)
        write_json(self._part_path(), self._part)
        log.debug("wrote %s with %d rows, %d tokens", name, len(keys), offset)
        self._pending.clear()
        self._pending_keys.clear()

    def _next_shard_name(self) -> str:
        prefix = f"shard-{self.rank:03d}-"
        used = [int(name[len(prefix) :]) for name in self._shard_names if name.startswith(prefix)]
        return f"{prefix}{max(used, default=-1) + 1:05d}"

    def close(self) -> None:
        self.flush()
        if self.world_size == 1:
            finalize_store(self.out_dir)

    def __enter__(self) -> LogitStoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Buffered rows are complete, so they are worth keeping even when scoring failed later.
        self.flush()
        if exc_type is None and self.world_size == 1:
            finalize_store(self.out_dir)


@dataclass
class _Committed:
    headers: list[dict]
    shards: list[dict]
    rows: dict[str, dict]


def _read_committed(out_dir: Path) -> _Committed:
    """Return the headers, shards and rows of manifest.json and of every part manifest."""
    manifests = []
    if (out_dir / MANIFEST_NAME).is_file():
        manifests.append(_read_manifest(out_dir / MANIFEST_NAME))
    manifests += [_read_manifest(path) for path in sorted(out_dir.glob(f"{PART_PREFIX}*.json"))]
    committed = _Committed([], [], {})
    for manifest in manifests:
        committed.headers.append({key: value for key, value in manifest.items() if key not in ("shards", "rows")})
        committed.shards += manifest["shards"]
        committed.rows.update(manifest["rows"])
    return committed


def finalize_store(out_dir: str | Path) -> int:
    """Merge every part manifest into manifest.json, delete the parts, and return the row count.

    Call it from one process, after every writer has closed (under `accelerate launch`: process
    0, after a barrier). Calling it again without new parts changes nothing.
    """
    out_dir = Path(out_dir)
    parts = sorted(out_dir.glob(f"{PART_PREFIX}*.json"))
    manifest_path = out_dir / MANIFEST_NAME
    if not parts:
        return len(_read_manifest(manifest_path)["rows"]) if manifest_path.is_file() else 0
    committed = _read_committed(out_dir)
    header = committed.headers[0]
    merged = {**header, "shards": [], "rows": {}}
    # Later manifests win, so a row scored again (only possible after a crash between a shard's
    # rename and its listing) points to one shard, and every listed shard keeps a row.
    merged["rows"] = committed.rows
    names_in_use = {row["shard"] for row in committed.rows.values()}
    seen = set()
    for shard in committed.shards:
        if shard["name"] in names_in_use and shard["name"] not in seen:
            merged["shards"].append(shard)
            seen.add(shard["name"])
    write_json(manifest_path, merged)
    for part in parts:
        part.unlink(missing_ok=True)
    log.info("logit store %s: %d rows in %d shards", out_dir, len(merged["rows"]), len(merged["shards"]))
    return len(merged["rows"])


class LogitStore:
    """Read-only view of a finalized logit store; shards are memory-mapped."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST_NAME
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"no logit store at {self.path}: {MANIFEST_NAME} not found; score the rows first "
                f"(`edgelm score`, or the pipeline's score stage)"
            )
        self._manifest = _read_manifest(manifest_path)
        self.layout = PackedLayout(self.top_k, self.vocab_size)
        self._open_shards: OrderedDict[str, np.ndarray] = OrderedDict()

    @property
    def top_k(self) -> int:
        return int(self._manifest["top_k"])

    @property
    def vocab_size(self) -> int:
        return int(self._manifest["vocab_size"])

    @property
    def teacher_id(self) -> str:
        return str(self._manifest["teacher_id"])

    @property
    def tokenizer(self) -> dict | None:
        """The teacher tokenizer's fingerprint (edgelm.train.preflight), or None when scoring had none."""
        return self._manifest.get("tokenizer")

    def keys(self) -> list[str]:
        return list(self._manifest["rows"])

    def __contains__(self, key: str) -> bool:
        return key in self._manifest["rows"]

    def __len__(self) -> int:
        return len(self._manifest["rows"])

    def num_tokens(self) -> int:
        return sum(int(shard["tokens"]) for shard in self._manifest["shards"])

    def shard_keys(self) -> dict[str, list[str]]:
        """Return each shard's name and the keys of the rows it contains."""
        return {shard["name"]: list(shard["keys"]) for shard in self._manifest["shards"]}

    def _row(self, key: str) -> dict:
        try:
            return self._manifest["rows"][key]
        except KeyError:
            raise KeyError(f"row {key!r} is not in logit store {self.path}; score it first") from None

    def _shard_records(self, name: str) -> np.ndarray:
        if name in self._open_shards:
            self._open_shards.move_to_end(name)
            return self._open_shards[name]
        records = np.load(self.path / f"{name}.npy", mmap_mode="r")
        if records.ndim != 2 or records.shape[1] != self.layout.bytes_per_token:
            raise ValueError(
                f"{self.path / name}.npy has shape {records.shape}, expected [tokens, {self.layout.bytes_per_token}]; "
                f"the store is damaged, so {RESCORE}"
            )
        self._open_shards[name] = records
        if len(self._open_shards) > _MAX_OPEN_SHARDS:
            self._open_shards.popitem(last=False)
        return records

    def get(self, key: str) -> TeacherTargets:
        """Return one row's targets as in-memory arrays (ids int64, log-probabilities and log-sum-exp fp32)."""
        row = self._row(key)
        records = self._shard_records(row["shard"])[row["offset"] : row["offset"] + row["tokens"]]
        ids, logprobs, logsumexp, tail_logprob = self.layout.unpack(records)
        return TeacherTargets(
            topk_ids=ids,
            topk_logprobs=logprobs,
            logsumexp=logsumexp,
            tail_logprob=tail_logprob,
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
        """Return the shard bytes stored per response token (no .npy header or manifest)."""
        return self.layout.bytes_per_token

    def disk_bytes(self) -> int:
        """Return the size of the manifest and of every shard file it lists."""
        files = [self.path / MANIFEST_NAME]
        files += [self.path / f"{shard['name']}.npy" for shard in self._manifest["shards"]]
        return sum(path.stat().st_size for path in files)


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read_manifest(path: Path) -> dict:
    manifest = _read_json(path)
    if manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not an {FORMAT_NAME} manifest (format={manifest.get('format')!r})")
    if manifest.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"logit store {path.parent} uses layout version {manifest.get('version')!r}, but this edgelm reads "
            f"version {FORMAT_VERSION} (bit-packed, 128 bytes per token at k=32); {RESCORE}"
        )
    return manifest


def _mismatch_message(key: str, sha: str, stored_sha: str, store_path: Path) -> str:
    return (
        f"row {key}: input_ids sha256 {sha} does not match the sha256 {stored_sha} stored in logit store "
        f"{store_path}; the rows changed since they were scored, so {RESCORE}"
    )
