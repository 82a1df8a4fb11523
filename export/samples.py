"""Write every variant's greedy answers to GSM8K prompts beside the PyTorch answers, as markdown."""

from __future__ import annotations

import logging
from pathlib import Path

from edgelm.files import write_text

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.md"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip() or "(empty)"


def greedy_samples(model_dir: Path, onnx_variants: dict[str, Path], ascend_dir: Path | None,
                   records: list[dict], max_new_tokens: int, mode: str = "fast") -> dict:
    """Decode each record's prompt greedily with PyTorch, every ONNX variant and the static Ascend graphs.

    Returns {"prompts": [...], "answers": {variant: [text, ...]}, "agreement": {variant: share equal
    to PyTorch}}. A prompt longer than the Ascend prefill length gets None in the Ascend column.
    """
    from edgelm.export.ascend import static_greedy
    from edgelm.export.onnx_export import ModelGeometry, OnnxDecoder, load_for_export, read_manifest, torch_greedy
    from edgelm.train.chat import prompt_ids

    model, tokenizer = load_for_export(model_dir)
    prompts = [prompt_ids(tokenizer, record, mode) for record in records]
    first = read_manifest(next(iter(onnx_variants.values()))) if onnx_variants else None
    eos = first["eos_token_ids"] if first else [tokenizer.eos_token_id]
    pad = first["pad_token_id"] if first else tokenizer.pad_token_id
    tokens: dict[str, list] = {"pytorch": [torch_greedy(model, p, max_new_tokens, eos, pad) for p in prompts]}
    for name, folder in onnx_variants.items():
        manifest = read_manifest(folder)
        geometry = ModelGeometry(manifest["num_layers"], manifest["num_kv_heads"], manifest["head_dim"],
                                 manifest["vocab_size"])
        decoder = OnnxDecoder(Path(folder) / manifest["model_file"], geometry)
        tokens[name] = [decoder.greedy([p], max_new_tokens, eos, pad)[0] for p in prompts]
    if ascend_dir is not None:
        manifest = read_manifest(ascend_dir)
        fits = manifest["max_prompt_len"]
        tokens["ascend"] = [static_greedy(ascend_dir, p, min(max_new_tokens, manifest["kv_capacity"] - len(p) + 1))
                            if len(p) <= fits else None for p in prompts]
    answers = {name: [None if ids is None else tokenizer.decode(ids, skip_special_tokens=True) for ids in rows]
               for name, rows in tokens.items()}
    agreement = {}
    for name, rows in tokens.items():
        pairs = [(a, b) for a, b in zip(tokens["pytorch"], rows) if b is not None]
        agreement[name] = sum(a == b for a, b in pairs) / len(pairs) if pairs else None
    return {"prompts": [record["prompt"] for record in records], "answers": answers, "agreement": agreement,
            "mode": mode, "max_new_tokens": max_new_tokens}


def render_samples(samples: dict) -> str:
    """Render greedy_samples' result as a markdown page: an agreement table, then one table per prompt."""
    names = list(samples["answers"])
    lines = [
        "# Greedy answers per export variant",
        "",
        f"GSM8K test prompts in {samples['mode']} mode, greedy decoding, up to {samples['max_new_tokens']} new tokens. "
        "Agreement is the share of prompts whose tokens equal the PyTorch tokens exactly.",
        "",
        "| variant | same tokens as PyTorch |",
        "|---|---|",
    ]
    for name in names:
        share = samples["agreement"][name]
        lines.append(f"| {name} | {'–' if share is None else f'{100 * share:.0f}%'} |")
    for index, prompt in enumerate(samples["prompts"]):
        lines += ["", f"## {index + 1}. {_cell(prompt)}", "", "| variant | answer |", "|---|---|"]
        for name in names:
            answer = samples["answers"][name][index]
            lines.append(f"| {name} | {'(prompt longer than the prefill graph)' if answer is None else _cell(answer)} |")
    return "\n".join(lines) + "\n"


def write_samples(path: Path, samples: dict) -> None:
    write_text(path, render_samples(samples))
