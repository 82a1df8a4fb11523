"""Score sequence rows with the teacher and save its top-k logits to a logit store.

A row is a dict from the rollout stage with at least `id`, `sample`, `prompt_ids` and
`response_ids`. The scored sequence is prompt_ids + response_ids, and the targets cover the
response tokens only. Rows sampled from the student (on-policy) and rows built from reference
solutions are scored the same way.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from edgelm.train.logit_store import LogitStore, LogitStoreWriter

log = logging.getLogger(__name__)


def row_key(row: dict) -> str:
    """Return the store key of a row, "{id}/{sample}"."""
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
    """Return "SOURCE@HASH", HASH being the first 12 hex digits of the SHA-256 of the model's config JSON.

    The store records this string, so a store scored by another teacher is not resumed by mistake.
    """
    config_json = model.config.to_json_string(use_diff=False)
    return f"{source}@{hashlib.sha256(config_json.encode()).hexdigest()[:12]}"


def output_vocab_size(model: PreTrainedModel) -> int:
    """Return the width of the model's logits (its output embedding rows)."""
    return int(model.get_output_embeddings().weight.shape[0])


def score_rows(
    teacher: PreTrainedModel,
    rows: list[dict],
    out_dir: str | Path,
    top_k: int = 32,
    batch_size: int = 8,
    *,
    teacher_id: str,
    rows_per_shard: int = 256,
) -> dict:
    """Run the teacher over each row and store its top-k logits and log-sum-exp per response token.

    Rows whose key is already in the store at `out_dir` are skipped, after checking that they
    were scored from the same input_ids. The others are sorted by length, longest first, to cut
    padding and to hit an out-of-memory error on the first batch rather than the last. They are
    then run in right-padded batches of `batch_size` with one forward pass per batch.

    Returns stats: rows, scored_rows, skipped_rows, tokens (response tokens scored),
    forward_tokens (prompt and response), seconds, tokens_per_s (response tokens per second),
    disk_bytes (the whole store) and bytes_per_token.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    device = next(teacher.parameters()).device
    pad_id = teacher.config.pad_token_id if teacher.config.pad_token_id is not None else 0
    was_training = teacher.training
    teacher.eval()
    try:
        return _score_in_eval_mode(teacher, rows, out_dir, top_k, batch_size, teacher_id, rows_per_shard, pad_id, device)
    finally:
        teacher.train(was_training)


def _score_in_eval_mode(
    teacher: PreTrainedModel,
    rows: list[dict],
    out_dir: str | Path,
    top_k: int,
    batch_size: int,
    teacher_id: str,
    rows_per_shard: int,
    pad_id: int,
    device: torch.device,
) -> dict:
    vocab_size = output_vocab_size(teacher)
    start = time.perf_counter()
    scored_tokens = forward_tokens = 0
    with LogitStoreWriter(out_dir, top_k, vocab_size, teacher_id, rows_per_shard) as writer:
        pending, skipped = _rows_to_score(rows, writer)
        pending.sort(key=lambda item: len(item[1]), reverse=True)
        total_tokens = sum(len(input_ids) - response_start for _, input_ids, response_start in pending)
        log.info("scoring %d rows (%d response tokens), %d already stored", len(pending), total_tokens, skipped)

        with tqdm(total=total_tokens, unit="tok", desc="score") as progress:
            for begin in range(0, len(pending), batch_size):
                batch = pending[begin : begin + batch_size]
                logits = _forward(teacher, [input_ids for _, input_ids, _ in batch], pad_id, device)
                if logits.shape[-1] != vocab_size:
                    raise ValueError(
                        f"teacher logits have width {logits.shape[-1]} but its output embedding has "
                        f"{vocab_size} rows; the store needs the logits width"
                    )
                for row_index, (key, input_ids, response_start) in enumerate(batch):
                    # Logits at position t predict token t + 1, so the response starts one position early.
                    response_logits = logits[row_index, response_start - 1 : len(input_ids) - 1].float()
                    values, ids = response_logits.topk(top_k, dim=-1)
                    logsumexp = torch.logsumexp(response_logits, dim=-1)
                    writer.add(
                        key, input_ids, response_start, ids.cpu().numpy(), values.cpu().numpy(), logsumexp.cpu().numpy()
                    )
                    scored_tokens += len(input_ids) - response_start
                    forward_tokens += len(input_ids)
                    progress.update(len(input_ids) - response_start)

    seconds = time.perf_counter() - start
    store = LogitStore(out_dir)
    stats = {
        "rows": len(rows),
        "scored_rows": len(pending),
        "skipped_rows": skipped,
        "tokens": scored_tokens,
        "forward_tokens": forward_tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(scored_tokens / seconds, 1) if seconds > 0 else 0.0,
        "disk_bytes": store.disk_bytes(),
        "bytes_per_token": store.bytes_per_token(),
    }
    log.info("scored %d rows into %s: %s", len(pending), out_dir, stats)
    return stats


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
def _forward(model: PreTrainedModel, sequences: list[list[int]], pad_id: int, device: torch.device) -> torch.Tensor:
    """Return the logits [B, T, V] of right-padded sequences."""
    length = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for index, sequence in enumerate(sequences):
        input_ids[index, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[index, : len(sequence)] = 1
    output = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
    return output.logits
