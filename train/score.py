"""Score sequence rows with the teacher and save its top-k log-probabilities to a logit store.

A row is a dict from the rollout stage with at least `id`, `sample`, `prompt_ids` and
`response_ids`. The scored sequence is prompt_ids + response_ids, and the targets cover the
response tokens only. Rows sampled from the student (on-policy) and rows built from reference
answers (source "label") are scored the same way.

Under `accelerate launch` each process scores every world_size-th row of the length-sorted
list and writes its own shards. Process 0 merges the manifests after a barrier.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase

from edgelm.train.distributed import ProcessInfo, barrier, gather_objects, process_info, shard_for_rank
from edgelm.train.logit_store import LogitStore, LogitStoreWriter, finalize_store
from edgelm.train.models import resolve_source
from edgelm.train.preflight import (
    check_same_tokenizer,
    check_sequence_lengths,
    checkpoint_hash,
    max_positions,
    shared_vocab_size,
    tokenizer_fingerprint,
)

log = logging.getLogger(__name__)


def row_key(row: dict) -> str:
    """Return the store key of a row: "{id}/{sample}", or "{id}/label" for a reference-answer row.

    Label rows get their own key so that mixed mode can store a record's rollout (sample 0) and
    its reference answer side by side.
    """
    if row.get("source") == "label":
        return f"{row['id']}/label"
    return f"{row['id']}/{row['sample']}"


def row_sequence(row: dict) -> tuple[list[int], int]:
    """Return (input_ids, response_start) of a row; raise ValueError if it has no prompt or no response."""
    prompt_ids = list(row["prompt_ids"])
    response_ids = list(row["response_ids"])
    if not prompt_ids or not response_ids:
        raise ValueError(
            f"row {row_key(row)} has {len(prompt_ids)} prompt and {len(response_ids)} response tokens; "
            f"both must be non-empty to score it"
        )
    return prompt_ids + response_ids, len(prompt_ids)


def teacher_identity(source: str, model: PreTrainedModel) -> str:
    """Return "SOURCE@HASH", HASH being 12 hex digits of the SHA-256 of the weight files and the config.

    The store records this string, so a store scored by another teacher (or by the same folder
    after it was retrained, as teacher adaptation does) is not resumed by mistake. For a hub id
    the weights are not hashed, only the id and the config. The config's `_name_or_path` and
    `architectures` are left out: the first depends on how the path to the teacher was written,
    and save_pretrained fills in the second, which a GGUF load leaves empty.
    """
    config = json.loads(model.config.to_json_string(use_diff=False))
    config.pop("_name_or_path", None)
    config.pop("architectures", None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    digest.update(checkpoint_hash(source).encode())
    return f"{source}@{digest.hexdigest()[:12]}"


def output_vocab_size(model: PreTrainedModel) -> int:
    """Return the width of the model's logits (its output embedding rows)."""
    return int(model.get_output_embeddings().weight.shape[0])


def check_teacher_and_student(
    teacher: PreTrainedModel, teacher_tokenizer: PreTrainedTokenizerBase, student_tokenizer: PreTrainedTokenizerBase,
    student_source: str,
) -> int:
    """Check that teacher and student share a tokenizer and return the logits width to store.

    Raises ValueError naming the difference. The width is the smaller of the two models' logits
    widths when they differ only by padding rows (see edgelm.train.preflight.shared_vocab_size).
    """
    teacher_fingerprint = tokenizer_fingerprint(teacher_tokenizer)
    check_same_tokenizer(teacher_fingerprint, tokenizer_fingerprint(student_tokenizer))
    source = resolve_source(student_source)
    student_config = AutoConfig.from_pretrained(source.location, **source.from_pretrained_kwargs())
    return shared_vocab_size(output_vocab_size(teacher), int(student_config.vocab_size), teacher_fingerprint["length"])


def padding_fraction(lengths: list[int], batch_size: int) -> float:
    """Return the share of padding tokens when `lengths` are batched in the given order."""
    padded = real = 0
    for begin in range(0, len(lengths), batch_size):
        batch = lengths[begin : begin + batch_size]
        padded += max(batch) * len(batch)
        real += sum(batch)
    return 1.0 - real / padded if padded else 0.0


def score_rows(
    teacher: PreTrainedModel,
    rows: list[dict],
    out_dir: str | Path,
    top_k: int = 32,
    batch_size: int = 8,
    *,
    teacher_id: str,
    rows_per_shard: int = 256,
    vocab_size: int | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    process: ProcessInfo | None = None,
) -> dict:
    """Run the teacher over each row and store, per response token, its top-k log-probabilities, tail mass and log-sum-exp.

    Rows whose key is already in the store at `out_dir` are skipped, after checking that they
    were scored from the same input_ids. The others are sorted by length, longest first, to cut
    padding and to hit an out-of-memory error on the first batch rather than the last. They are
    then run in right-padded batches of `batch_size` with one forward pass per batch.

    `vocab_size` cuts the teacher's logits to that width before top-k and log-sum-exp (for an
    embedding padded beyond the tokenizer; see check_teacher_and_student). `tokenizer`, the
    teacher's, is fingerprinted into the store so that distillation can check the student's.
    `process` defaults to the launched process (process_info()).

    Returns stats: rows, scored_rows, skipped_rows, tokens (response tokens scored),
    forward_tokens (prompt and response), padding_fraction_unsorted and padding_fraction
    (padding share of the forward batches in row order and as run), seconds, tokens_per_s
    (response tokens per second, all processes), processes, disk_bytes (the whole store) and
    bytes_per_token.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    process = process or process_info()
    width = output_vocab_size(teacher)
    vocab_size = vocab_size or width
    if vocab_size > width:
        raise ValueError(f"vocab_size={vocab_size} is larger than the teacher's logits width {width}")
    sequences = [(f"row {row_key(row)}", len(row_sequence(row)[0])) for row in rows]
    check_sequence_lengths(sequences, max_positions(teacher), "teacher")

    if teacher.device != process.device:
        teacher.to(process.device)
    was_training = teacher.training
    teacher.eval()
    fingerprint = tokenizer_fingerprint(tokenizer) if tokenizer is not None else None
    start = time.perf_counter()
    try:
        writer = LogitStoreWriter(
            out_dir, top_k, vocab_size, teacher_id, rows_per_shard,
            tokenizer=fingerprint, teacher_dtype=str(teacher.dtype).removeprefix("torch."),
            rank=process.rank, world_size=process.world_size,
        )
        pending, skipped = _rows_to_score(rows, writer)
        # Every process must split the same pending list, so none may write before all have read
        # the store: a row stored early by process 0 would otherwise vanish from process 1's list
        # and shift its share.
        barrier()
        unsorted_lengths = [len(input_ids) for _, input_ids, _ in pending]
        pending.sort(key=lambda item: len(item[1]), reverse=True)
        mine = shard_for_rank(pending, process)
        counts = _score_into(teacher, mine, writer, top_k, batch_size, vocab_size, process)
    finally:
        teacher.train(was_training)
    barrier()
    if process.is_main:
        finalize_store(out_dir)
    barrier()
    seconds = time.perf_counter() - start

    all_counts = gather_objects(counts)
    scored_tokens = sum(c["tokens"] for c in all_counts)
    store = LogitStore(out_dir)
    stats = {
        "rows": len(rows),
        "scored_rows": len(pending),
        "skipped_rows": skipped,
        "tokens": scored_tokens,
        "forward_tokens": sum(c["forward_tokens"] for c in all_counts),
        "padding_fraction_unsorted": round(padding_fraction(unsorted_lengths, batch_size), 4),
        "padding_fraction": round(
            sum(c["padded"] for c in all_counts) / max(sum(c["slots"] for c in all_counts), 1), 4
        ),
        "seconds": round(seconds, 3),
        "tokens_per_s": round(scored_tokens / seconds, 1) if seconds > 0 else 0.0,
        "processes": process.world_size,
        "disk_bytes": store.disk_bytes(),
        "bytes_per_token": store.bytes_per_token(),
    }
    log.info("scored %d rows into %s: %s", len(pending), out_dir, stats)
    return stats


def _score_into(
    teacher: PreTrainedModel,
    pending: list[tuple[str, list[int], int]],
    writer: LogitStoreWriter,
    top_k: int,
    batch_size: int,
    vocab_size: int,
    process: ProcessInfo,
) -> dict:
    """Score `pending` rows into `writer`; return token and padding counts of this process."""
    counts = {"tokens": 0, "forward_tokens": 0, "padded": 0, "slots": 0}
    total_tokens = sum(len(input_ids) - response_start for _, input_ids, response_start in pending)
    log.info("process %d scores %d rows (%d response tokens)", process.rank, len(pending), total_tokens)
    with writer, tqdm(total=total_tokens, unit="tok", desc="score", disable=not process.is_main) as progress:
        for begin in range(0, len(pending), batch_size):
            batch = pending[begin : begin + batch_size]
            lengths = [len(input_ids) for _, input_ids, _ in batch]
            counts["slots"] += max(lengths) * len(batch)
            counts["padded"] += max(lengths) * len(batch) - sum(lengths)
            # Logits at position t predict token t + 1, so a response starts one position early.
            # No row needs logits before the batch's earliest response, so the LM head skips them.
            first = min(response_start for *_, response_start in batch) - 1
            logits = _forward(teacher, [input_ids for _, input_ids, _ in batch], process.device, first)
            for row_index, (key, input_ids, response_start) in enumerate(batch):
                response_logits = logits[row_index, response_start - 1 - first : len(input_ids) - 1 - first, :vocab_size]
                response_logits = response_logits.float()
                logsumexp = torch.logsumexp(response_logits, dim=-1)
                values, ids = response_logits.topk(top_k, dim=-1)
                logprobs = values - logsumexp.unsqueeze(-1)
                # The tail mass comes from the logits themselves, never from 1 - sum(p_i).
                outside = response_logits.scatter(-1, ids, float("-inf"))
                tail_logprob = torch.logsumexp(outside, dim=-1) - logsumexp
                writer.add(
                    key, input_ids, response_start, ids.cpu().numpy(), logprobs.cpu().numpy(),
                    logsumexp.cpu().numpy(), tail_logprob.cpu().numpy(),
                )
                counts["tokens"] += len(input_ids) - response_start
                counts["forward_tokens"] += len(input_ids)
                progress.update(len(input_ids) - response_start)
    return counts


def _rows_to_score(rows: list[dict], writer: LogitStoreWriter) -> tuple[list[tuple[str, list[int], int]], int]:
    """Return the (key, input_ids, response_start) not yet stored, and the count of stored rows skipped."""
    pending: dict[str, tuple[str, list[int], int]] = {}
    skipped = 0
    for row in rows:
        key = row_key(row)
        input_ids, response_start = row_sequence(row)
        if writer.is_stored(key, input_ids):
            skipped += 1
            continue
        if key in pending:
            if pending[key][1] != input_ids:
                raise ValueError(f"rows contain key {key} twice with different input_ids; keys must be unique")
            continue
        pending[key] = (key, input_ids, response_start)
    return list(pending.values()), skipped


@torch.inference_mode()
def _forward(model: PreTrainedModel, sequences: list[list[int]], device: torch.device, first: int = 0) -> torch.Tensor:
    """Return the logits [B, T - first, V] of right-padded sequences from position `first` on.

    The pad id is irrelevant under the mask.
    """
    length = max(len(sequence) for sequence in sequences)
    input_ids = torch.zeros((len(sequences), length), dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for index, sequence in enumerate(sequences):
        input_ids[index, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[index, : len(sequence)] = 1
    output = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False,
                   logits_to_keep=length - first)
    return output.logits
