"""On-policy rollouts: the student answers the training prompts, and each answer is stored as token ids.

Rows (one JSON object per line) are what teacher scoring and distillation read:
    {"id", "sample", "source": "rollout" | "label", "mode", "prompt_ids", "response_ids",
     "text", "finished"}
`finished` is false when generation hit max_new_tokens before the end-of-turn token.
Reference answers become rows of the same shape with source "label" (`label_rows`), which is how
the label-based distillation mode reuses the same scoring and training code.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from edgelm.files import write_jsonl
from edgelm.train.chat import prompt_ids, target_text
from edgelm.train.models import load_model

log = logging.getLogger(__name__)


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float = 1.0, seed: int = 0) -> list[tuple[list[int], bool]]:
    """Generate from left-padded prompt ids with the KV cache; return (response ids, finished) per prompt.

    Responses are cut after the first end-of-turn token, which is kept.
    """
    eos_id = tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    torch.manual_seed(seed)
    sampling = temperature > 0
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        temperature=temperature if sampling else None,
        top_p=top_p if sampling else None,
        top_k=None,
        eos_token_id=eos_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    results = []
    for row in output[:, width:].tolist():
        if eos_id in row:
            results.append((row[: row.index(eos_id) + 1], True))
        else:
            results.append((row, False))
    return results


def rollout(
    model_source: str,
    records: list[dict],
    out_path: str | Path,
    *,
    mode: str,
    samples_per_prompt: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 0.7,
    top_p: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
) -> dict:
    """Have the model at `model_source` answer each record's prompt; write rows to `out_path`."""
    model, tokenizer = load_model(model_source)
    model.eval()
    jobs = [(record, sample) for record in records for sample in range(samples_per_prompt)]
    # Similar prompt lengths in one batch waste less compute on padding.
    encoded = [(record, sample, prompt_ids(tokenizer, record, mode)) for record, sample in jobs]
    encoded.sort(key=lambda job: len(job[2]))

    rows, start = [], time.perf_counter()
    for offset in tqdm(range(0, len(encoded), batch_size), desc=f"rollout ({mode})", unit="batch"):
        batch = encoded[offset : offset + batch_size]
        outputs = generate_batch(
            model, tokenizer, [ids for _, _, ids in batch],
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed + offset,
        )
        for (record, sample, ids), (response, finished) in zip(batch, outputs):
            rows.append({
                "id": record["id"], "sample": sample, "source": "rollout", "mode": mode,
                "prompt_ids": ids, "response_ids": response,
                "text": tokenizer.decode(response, skip_special_tokens=True), "finished": finished,
            })
    seconds = time.perf_counter() - start
    rows.sort(key=lambda row: (row["id"], row["sample"]))
    write_jsonl(out_path, rows)
    new_tokens = sum(len(row["response_ids"]) for row in rows)
    stats = {
        "rows": len(rows),
        "finished_fraction": sum(row["finished"] for row in rows) / len(rows),
        "new_tokens": new_tokens,
        "seconds": seconds,
        "tokens_per_second": new_tokens / seconds,
    }
    log.info("rollout: %d rows, %.0f%% finished, %.1f new tokens/s", stats["rows"], 100 * stats["finished_fraction"], stats["tokens_per_second"])
    return stats


def label_rows(tokenizer, records: list[dict], mode: str) -> list[dict]:
    """Rows whose response is the reference answer, for label-based distillation."""
    eos_id = tokenizer.eos_token_id
    rows = []
    for record in records:
        text = target_text(record, mode)
        response = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos_id]
        rows.append({
            "id": record["id"], "sample": 0, "source": "label", "mode": mode,
            "prompt_ids": prompt_ids(tokenizer, record, mode), "response_ids": response,
            "text": text, "finished": True,
        })
    return rows
