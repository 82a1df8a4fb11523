"""On-policy rollouts: the student answers the training prompts, and each answer is stored as token ids.

Rows (one JSON object per line) are what teacher scoring and distillation read:
    {"id", "sample", "source": "rollout" | "label", "mode", "checkpoint", "sampling", "prompt_ids",
     "response_ids", "text", "finished"}
`finished` is false when generation hit max_new_tokens before the end-of-turn token.
`checkpoint` is "PATH@HASH", the student that generated the row (HASH: 12 hex digits of the
SHA-256 of its weight files), and `sampling` the engine, temperature, top_p,
max_new_tokens and seed it used. Reference answers become rows of the same shape with source
"label" (`label_rows`), which is how the label-based and mixed distillation modes reuse the
same scoring and training code.

Rows are written in chunks while generating: numbered files in `<out>.chunks/`, each renamed
into place when complete, so a killed run leaves no partial line behind. A re-run skips the
(id, sample) pairs already in a chunk or in the output file, as long as they came from the same
checkpoint, mode and sampling settings. At the end the chunks are merged into the output file, atomically. Under
`accelerate launch` each process generates every world_size-th prompt and process 0 merges.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from edgelm.config import DISTILL_TARGETS
from edgelm.files import read_jsonl, write_jsonl
from edgelm.train.chat import prompt_ids, target_text
from edgelm.train.distributed import ProcessInfo, barrier, gather_objects, process_info, shard_for_rank
from edgelm.train.logit_store import same_model_id
from edgelm.train.models import load_model, load_tokenizer, precision_dtype, resolve_source
from edgelm.train.preflight import check_sequence_lengths, checkpoint_hash, max_positions

log = logging.getLogger(__name__)

ENGINES = ("hf", "vllm")
# vLLM's names for the precisions.
VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# Fields every row of a rollouts file has, and what to pass instead of another kind of file.
ROW_FIELDS = ("id", "sample", "prompt_ids", "response_ids")
ROWS_FIX = "pass the rows that `edgelm rollout` wrote"


class InverseCDFSampler(LogitsProcessor):
    """Draw the next token of each row from softmax(scores) and leave only that token selectable.

    transformers' sampling calls torch.multinomial, which on CPU draws one exponential random
    number per vocabulary entry: for 32 rows of SmolLM2's 49,152 tokens that took 55 ms a step,
    a third of the rollout. This draws one uniform number per row and finds it in the running
    sum of the probabilities (float64), an exact draw from the same distribution. The returned
    scores are 0 at the drawn token and -inf elsewhere, so generate(do_sample=False) takes it.

    Each row has its own random stream, seeded with its entry of `seeds`, so a row's sample
    does not depend on the other rows of its batch.
    """

    def __init__(self, seeds: list[int]) -> None:
        self.seeds = list(seeds)
        self.generators: list[torch.Generator] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if len(scores) != len(self.seeds):
            raise ValueError(
                f"InverseCDFSampler has {len(self.seeds)} seeds but received scores for {len(scores)} rows; "
                f"pass one seed per prompt"
            )
        if not self.generators:
            self.generators = [torch.Generator(scores.device).manual_seed(seed) for seed in self.seeds]
        cumulative = torch.softmax(scores.float(), dim=-1).double().cumsum(dim=-1)
        total = cumulative[:, -1:]
        uniform = torch.cat([
            torch.rand(1, dtype=torch.float64, device=scores.device, generator=generator) for generator in self.generators
        ]).unsqueeze(-1)
        # u < 1, but u * total can round up to total; stay below it so a token is always found.
        point = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
        tokens = torch.searchsorted(cumulative, point, right=True)
        chosen = torch.full_like(scores, float("-inf"))
        return chosen.scatter_(-1, tokens, 0.0)


def sampling_processors(temperature: float, top_p: float, seeds: list[int]) -> LogitsProcessorList:
    """Return the processors that turn greedy generate() into sampling at `temperature` and `top_p`.

    `seeds` has one seed per row of the batch. An empty list (greedy decoding) for temperature 0.
    """
    if temperature <= 0:
        return LogitsProcessorList()
    processors = [TemperatureLogitsWarper(temperature)]
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    return LogitsProcessorList([*processors, InverseCDFSampler(seeds)])


@torch.no_grad()
def generate_batch(
    model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float = 1.0,
    seeds: list[int] | None = None,
) -> list[tuple[list[int], bool]]:
    """Generate from left-padded prompt ids with the KV cache; return (response ids, finished) per prompt.

    temperature 0 decodes greedily; above 0 each token is drawn by InverseCDFSampler, prompt i
    with the random stream of seeds[i] (default: its index). Responses are cut after the first
    end-of-turn token, which is kept.
    """
    eos_id = tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    output = model.generate(
        input_ids=input_ids.to(model.device),
        attention_mask=attention_mask.to(model.device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        logits_processor=sampling_processors(temperature, top_p, seeds if seeds is not None else list(range(len(prompts)))),
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


def generate_vllm(
    model_source: str, prompts: list[list[int]], *, eos_id: int, max_new_tokens: int, temperature: float, top_p: float,
    seeds: list[int], precision: str = "fp32",
) -> list[tuple[list[int], bool]]:
    """Generate with vLLM; return (response ids, finished) per prompt, like generate_batch.

    NOTE: written against vLLM's LLM.generate with TokensPrompt inputs, but never run here
    (vLLM needs a CUDA machine). Prompt i is sampled with seeds[i].
    """
    try:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
    except ImportError as error:
        raise ImportError(
            f"rollout.engine is 'vllm' but vllm cannot be imported ({error}); install vllm on a CUDA "
            f"machine (`pip install vllm`) or use the hf engine (rollout.engine: hf, or --engine hf)"
        ) from error
    source = resolve_source(model_source)
    if source.gguf_file:
        raise ValueError(f"rollout.engine 'vllm' needs a Hugging Face model folder, got the GGUF file {model_source}")
    llm = LLM(model=source.location, seed=seeds[0] if seeds else 0, dtype=VLLM_DTYPES[precision])
    params = [
        SamplingParams(
            n=1, temperature=temperature, top_p=top_p if temperature > 0 else 1.0, max_tokens=max_new_tokens,
            stop_token_ids=[eos_id], seed=seed,
        )
        for seed in seeds
    ]
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=True)
    results = []
    for output in outputs:
        completion = output.outputs[0]
        response = list(completion.token_ids)
        finished = completion.finish_reason == "stop"
        # Keep the end-of-turn token, as generate_batch does, whether or not vLLM returned it.
        if finished and (not response or response[-1] != eos_id):
            response.append(eos_id)
        results.append((response, finished))
    return results


def checkpoint_id(model_source: str) -> str:
    """Return "SOURCE@HASH" for the model that generates rollouts (see edgelm.train.preflight.checkpoint_hash)."""
    return f"{model_source}@{checkpoint_hash(model_source)}"


def chunk_dir(out_path: str | Path) -> Path:
    """Return the folder of numbered chunk files next to `out_path`."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".chunks")


def _existing_rows(
    out_path: Path, origin: dict, wanted: set[tuple[str, int]], warn: bool = True
) -> dict[tuple[str, int], dict]:
    """Return the rows already written for `wanted` (id, sample) pairs with the same `origin`.

    `origin` maps row fields (checkpoint, mode, sampling) to the values of this run. A row
    generated with any other value is ignored, so changed settings never reuse old samples.
    `warn` logs how many rows were ignored and which settings differ.
    """
    files = sorted(chunk_dir(out_path).glob("*.jsonl"))
    if out_path.is_file():
        files.insert(0, out_path)
    rows: dict[tuple[str, int], dict] = {}
    stale = 0
    differences: dict[str, tuple] = {}
    for path in files:
        for row in read_jsonl(path):
            if row.get("source", "rollout") != "rollout":
                continue
            pair = (row["id"], row["sample"])
            if pair not in wanted:
                continue
            changed = _changed_settings(row, origin)
            if changed:
                stale += 1
                for name, values in changed.items():
                    differences.setdefault(name, values)
                continue
            rows[pair] = row
    if stale and warn:
        described = "; ".join(f"{name} {stored!r} in the rows, {current!r} now" for name, (stored, current) in sorted(differences.items()))
        log.warning("ignoring %d rollout rows generated with other settings than this run (%s); generating them again",
                    stale, described)
    return rows


def _changed_settings(row: dict, origin: dict) -> dict[str, tuple]:
    """Return {dotted name: (value in `row`, value in `origin`)} for the settings that differ.

    The checkpoint compares by its hash, so another spelling of the same model path matches.
    """
    changed = {}
    for name, value in origin.items():
        stored = row.get(name)
        if isinstance(value, dict) and isinstance(stored, dict):
            for key in sorted(set(value) | set(stored)):
                if stored.get(key) != value.get(key):
                    changed[f"{name}.{key}"] = (stored.get(key), value.get(key))
        elif name == "checkpoint" and isinstance(stored, str) and same_model_id(stored, value):
            continue
        elif stored != value:
            changed[name] = (stored, value)
    return changed


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
    engine: str = "hf",
    chunk_rows: int = 256,
    precision: str = "fp32",
    process: ProcessInfo | None = None,
) -> dict:
    """Have the model at `model_source` answer each record's prompt `samples_per_prompt` times; write rows to `out_path`.

    Rows already written by the same checkpoint are kept and not generated again. `engine` is
    "hf" (transformers generate, batched, left-padded, KV cache) or "vllm". `process` defaults to
    the launched process (process_info()). `precision` ("fp32", "bf16" or "fp16") is the dtype the
    model samples in. It is part of each row's sampling settings, so rows sampled at another
    precision are generated again.

    Returns stats: rows, generated_rows, reused_rows, finished_fraction, new_tokens (generated
    in this call), seconds, tokens_per_second, processes and checkpoint.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r} is not one of {ENGINES}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows} must be at least 1")
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature} must be 0 (greedy) or more")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be above 0 and at most 1 (1 samples from the whole distribution)")
    precision_dtype(precision)
    process = process or process_info()
    out_path = Path(out_path)
    checkpoint = checkpoint_id(model_source)
    sampling = {
        "engine": engine, "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed,
        "precision": precision,
    }
    origin = {"checkpoint": checkpoint, "mode": mode, "sampling": sampling}
    wanted = {(record["id"], sample) for record in records for sample in range(samples_per_prompt)}
    done = _existing_rows(out_path, origin, wanted)
    # Every process must split the same job list, so none may write a chunk before all have read.
    barrier()

    tokenizer = load_tokenizer(model_source)
    jobs = [(record, sample) for record in records for sample in range(samples_per_prompt) if (record["id"], sample) not in done]
    # Similar prompt lengths in one batch waste less compute on padding.
    encoded = sorted(
        ((record, sample, prompt_ids(tokenizer, record, mode)) for record, sample in jobs), key=lambda job: len(job[2])
    )
    mine = shard_for_rank(encoded, process)
    start = time.perf_counter()
    generated = _generate_rows(
        model_source, mine, out_path, process,
        origin=origin, batch_size=batch_size, chunk_rows=chunk_rows,
    )
    barrier()
    if process.is_main:
        rows = merge_chunks(out_path, origin, wanted)
    barrier()
    seconds = time.perf_counter() - start
    if not process.is_main:
        rows = read_jsonl(out_path)

    all_generated = gather_objects(generated)
    new_tokens = sum(count["new_tokens"] for count in all_generated)
    stats = {
        "rows": len(rows),
        "generated_rows": sum(count["rows"] for count in all_generated),
        "reused_rows": len(done),
        "finished_fraction": sum(row["finished"] for row in rows) / max(len(rows), 1),
        "new_tokens": new_tokens,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(new_tokens / seconds, 1) if seconds > 0 else 0.0,
        "processes": process.world_size,
        "checkpoint": checkpoint,
    }
    log.info(
        "rollout: %d rows (%d generated, %d reused), %.0f%% finished, %.1f new tokens/s",
        stats["rows"], stats["generated_rows"], stats["reused_rows"], 100 * stats["finished_fraction"],
        stats["tokens_per_second"],
    )
    return stats


def _generate_rows(
    model_source: str, jobs: list[tuple[dict, int, list[int]]], out_path: Path, process: ProcessInfo, *,
    origin: dict, batch_size: int, chunk_rows: int,
) -> dict:
    """Generate this process's jobs and write them as chunk files; return its row and token counts."""
    counts = {"rows": 0, "new_tokens": 0}
    sampling = origin["sampling"]
    engine, max_new_tokens = sampling["engine"], sampling["max_new_tokens"]
    temperature, top_p = sampling["temperature"], sampling["top_p"]

    if not jobs:
        return counts
    writer = _ChunkWriter(chunk_dir(out_path), process.rank, chunk_rows)
    if engine == "vllm":
        tokenizer = load_tokenizer(model_source)
        outputs = generate_vllm(
            model_source, [ids for _, _, ids in jobs], eos_id=tokenizer.eos_token_id,
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            seeds=[row_seed(sampling["seed"], record["id"], sample) for record, sample, _ in jobs],
            precision=sampling["precision"],
        )
        batches = [(jobs, outputs)]
    else:
        model, tokenizer = load_model(model_source, dtype=precision_dtype(sampling["precision"]))
        model.to(process.device).eval()
        longest = max(len(ids) for _, _, ids in jobs) + max_new_tokens
        check_sequence_lengths(
            [("the longest prompt plus max_new_tokens", longest)], max_positions(model), "student",
            fix="lower max_new_tokens (rollout.max_new_tokens, --max-new-tokens) or drop the longest prompts",
        )
        batches = _hf_batches(model, tokenizer, jobs, batch_size, process, max_new_tokens=max_new_tokens,
                              temperature=temperature, top_p=top_p, seed=sampling["seed"])

    for batch, outputs in batches:
        for (record, sample, ids), (response, finished) in zip(batch, outputs):
            writer.add({
                "id": record["id"], "sample": sample, "source": "rollout", **origin,
                "prompt_ids": ids, "response_ids": response,
                "text": tokenizer.decode(response, skip_special_tokens=True), "finished": finished,
            })
            counts["rows"] += 1
            counts["new_tokens"] += len(response)
    writer.flush()
    return counts


def _hf_batches(model, tokenizer, jobs, batch_size: int, process: ProcessInfo, **sampling):
    """Yield (batch, outputs) pairs, generating one batch at a time with generate_batch."""
    seed = sampling.pop("seed")
    for offset in tqdm(range(0, len(jobs), batch_size), desc="rollout", unit="batch", disable=not process.is_main):
        batch = jobs[offset : offset + batch_size]
        seeds = [row_seed(seed, record["id"], sample) for record, sample, _ in batch]
        yield batch, generate_batch(model, tokenizer, [ids for _, _, ids in batch], seeds=seeds, **sampling)


def row_seed(seed: int, record_id: str, sample: int) -> int:
    """Return the seed of one (record, sample) draw: 63 bits of SHA-256 over the run seed, id and sample.

    A row's random stream then depends on nothing else, so a resumed run or another process
    count draws the same samples as one uninterrupted run, up to the rounding differences that
    another batch's padding causes.
    """
    digest = hashlib.sha256(f"{seed}\0{record_id}\0{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class _ChunkWriter:
    """Write rows to numbered chunk files RANK-INDEX.jsonl, each complete before it is renamed into place."""

    def __init__(self, folder: Path, rank: int, chunk_rows: int) -> None:
        self.folder = folder
        self.prefix = f"{rank:03d}-"
        self.chunk_rows = chunk_rows
        self.rows: list[dict] = []
        used = [int(path.stem[len(self.prefix) :]) for path in folder.glob(f"{self.prefix}*.jsonl")]
        self.next_index = max(used, default=-1) + 1

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.chunk_rows:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        write_jsonl(self.folder / f"{self.prefix}{self.next_index:05d}.jsonl", self.rows)
        self.next_index += 1
        self.rows = []


def merge_chunks(out_path: str | Path, origin: dict, wanted: set[tuple[str, int]]) -> list[dict]:
    """Write the wanted rows of `origin` from the output file and all chunks to `out_path`; delete the chunks.

    Run by one process after every writer has finished. Returns the rows written, sorted by
    (id, sample).
    """
    out_path = Path(out_path)
    # rollout() already warned about the ignored rows.
    rows = sorted(_existing_rows(out_path, origin, wanted, warn=False).values(), key=lambda row: (row["id"], row["sample"]))
    missing = len(wanted) - len(rows)
    if missing:
        raise RuntimeError(f"{missing} of {len(wanted)} rollouts are missing after generation; rerun the rollout to fill them")
    write_jsonl(out_path, rows)
    shutil.rmtree(chunk_dir(out_path), ignore_errors=True)
    return rows


def rollout_for_targets(model_source: str, records: list[dict], out_path: str | Path, *, targets: str, mode: str, **settings) -> dict:
    """Write the rows that distillation with `targets` trains on, and return rollout()'s stats.

    "on_policy": the model's rollouts (rollout() with `settings`). "label": one row per record
    with the reference answer, nothing generated. "mixed": the rollouts followed by the label
    rows, so scoring and training read both from one file.
    """
    if targets not in DISTILL_TARGETS:
        raise ValueError(f"invalid targets={targets!r}; use one of {DISTILL_TARGETS}")
    labels = []
    if targets in ("label", "mixed"):
        labels = label_rows(load_tokenizer(model_source), records, mode)
    if targets == "label":
        write_jsonl(out_path, labels)
        return {"rows": len(labels), "label_rows": len(labels), "source": "label"}
    stats = rollout(model_source, records, out_path, mode=mode, **settings)
    if labels:
        rollouts = [row for row in read_jsonl(out_path) if row.get("source") != "label"]
        write_jsonl(out_path, rollouts + labels)
        stats = {**stats, "rows": len(rollouts) + len(labels), "label_rows": len(labels)}
    return stats


def label_rows(tokenizer, records: list[dict], mode: str) -> list[dict]:
    """Rows whose response is the reference answer, for label-based and mixed distillation."""
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
