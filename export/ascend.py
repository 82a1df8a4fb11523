"""Export static-shape prefill and decode graphs for Huawei Ascend NPUs and build them with ATC.

ATC (the model compiler in the Huawei CANN toolkit) compiles fixed shapes, so the model
becomes two batch-1 ONNX graphs with a KV cache of fixed capacity C:

  prefill.onnx  input_ids, attention_mask, position_ids [1, P] (prompt right-padded to P)
                -> logits [1, P, V], present.{i}.key / .value [1, H, C, D]
                   (slots below the prompt length filled, the rest zero)
  decode.onnx   input_ids [1, 1], attention_mask [1, C] (1 for filled slots, the new one
                included), position_ids [1, 1], cache_position [1] (the slot to write),
                past_key_values.{i}.key / .value [1, H, C, D]
                -> logits [1, 1, V], present.{i}.key / .value [1, H, C, D]

Both graphs use standard ONNX ops only. Decode writes the new key and value with a
one-hot blend, `cache * (1 - onehot) + new * onehot`, instead of ScatterND, and masked
scores get MASK_VALUE, which fp16 can represent, instead of the fp32 minimum.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from transformers import PreTrainedModel

from edgelm.export.onnx_export import (
    MANIFEST_NAME,
    ModelGeometry,
    OnnxDecoder,
    ParityError,
    build_manifest,
    cache_keyword,
    compare_greedy,
    copy_model_files,
    load_for_export,
    parity_prompts,
    past_names,
    present_names,
    read_manifest,
    special_token_ids,
    torch_greedy,
)
from edgelm.files import atomic_dir, write_json, write_text

log = logging.getLogger(__name__)

ASCEND_FORMAT = "edgelm-ascend"
ASCEND_FORMAT_VERSION = 1
PREFILL_FILE = "prefill.onnx"
DECODE_FILE = "decode.onnx"
ATC_SCRIPT = "atc.sh"
MAX_OPSET = 18
# Added to the scores of masked slots: exp(-1e4) is 0 in fp16 and fp32, and -1e4 fits in fp16
# (max 65504), so ATC's mixed_float16 mode cannot turn it into -inf and produce NaN.
MASK_VALUE = -1.0e4


class _PrefillCache:
    """Cache stand-in for prefill: attention uses the prompt's own keys, and each layer's
    keys and values are stored zero-padded to the cache capacity."""

    def __init__(self, capacity: int, key_mask: torch.Tensor):
        self.capacity = capacity
        self.key_mask = key_mask  # [1, 1, P, 1], 1.0 for prompt tokens, 0.0 for right padding
        self.presents: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        batch, heads, length, dim = key_states.shape
        padding = key_states.new_zeros(batch, heads, self.capacity - length, dim)
        keys = torch.cat([key_states * self.key_mask, padding], dim=2)
        values = torch.cat([value_states * self.key_mask, padding], dim=2)
        self.presents[layer_idx] = (keys, values)
        return key_states, value_states


class _DecodeCache:
    """Cache stand-in for decode: writes the new key and value into slot `cache_position`
    of the fixed-size cache with a one-hot blend, and attends over all C slots."""

    def __init__(self, past: list[torch.Tensor], onehot: torch.Tensor):
        self.past = past
        self.onehot = onehot  # [1, 1, C, 1], 1.0 at the slot being written
        self.presents: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keep = 1.0 - self.onehot
        keys = self.past[2 * layer_idx] * keep + key_states * self.onehot
        values = self.past[2 * layer_idx + 1] * keep + value_states * self.onehot
        self.presents[layer_idx] = (keys, values)
        return keys, values


def _flat_presents(cache, num_layers: int) -> list[torch.Tensor]:
    flat = []
    for layer in range(num_layers):
        flat += list(cache.presents[layer])
    return flat


class StaticPrefill(torch.nn.Module):
    """Prefill of a right-padded prompt of length P into a KV cache of capacity C."""

    def __init__(self, model: PreTrainedModel, prompt_len: int, capacity: int):
        super().__init__()
        self.model = model
        self.prompt_len = prompt_len
        self.capacity = capacity
        self.num_layers = model.config.num_hidden_layers
        self.cache_keyword = cache_keyword(model)
        self.register_buffer("causal", torch.tril(torch.ones(prompt_len, prompt_len)), persistent=False)

    def forward(self, input_ids, attention_mask, position_ids):
        key_mask = attention_mask.to(torch.float32)[:, None, None, :]  # [1, 1, 1, P]
        allowed = self.causal[None, None] * key_mask
        # A 4D float mask is added to the scores as is; transformers builds no mask of its own.
        scores_mask = (1.0 - allowed) * MASK_VALUE
        cache = _PrefillCache(self.capacity, key_mask.transpose(2, 3))
        outputs = self.model(input_ids=input_ids, attention_mask=scores_mask, position_ids=position_ids,
                             use_cache=True, **{self.cache_keyword: cache})
        return (outputs.logits, *_flat_presents(cache, self.num_layers))


class StaticDecode(torch.nn.Module):
    """One decode step that writes slot `cache_position` of a KV cache of capacity C."""

    def __init__(self, model: PreTrainedModel, capacity: int):
        super().__init__()
        self.model = model
        self.capacity = capacity
        self.num_layers = model.config.num_hidden_layers
        self.cache_keyword = cache_keyword(model)
        self.register_buffer("slots", torch.arange(capacity), persistent=False)

    def forward(self, input_ids, attention_mask, position_ids, cache_position, *past):
        onehot = (self.slots == cache_position).to(torch.float32)[None, None, :, None]
        scores_mask = (1.0 - attention_mask.to(torch.float32))[:, None, None, :] * MASK_VALUE
        cache = _DecodeCache(list(past), onehot)
        outputs = self.model(input_ids=input_ids, attention_mask=scores_mask, position_ids=position_ids,
                             use_cache=True, **{self.cache_keyword: cache})
        return (outputs.logits, *_flat_presents(cache, self.num_layers))


def prefill_input_names() -> list[str]:
    return ["input_ids", "attention_mask", "position_ids"]


def decode_input_names(num_layers: int) -> list[str]:
    return ["input_ids", "attention_mask", "position_ids", "cache_position", *past_names(num_layers)]


def graph_output_names(num_layers: int) -> list[str]:
    return ["logits", *present_names(num_layers)]


def export_static_graphs(model: PreTrainedModel, out_dir: Path, prompt_len: int, capacity: int, opset: int) -> None:
    """Write PREFILL_FILE and DECODE_FILE for `model` into `out_dir` (TorchScript exporter, fixed shapes)."""
    geometry = ModelGeometry.from_config(model.config)
    cache_shape = (1, geometry.num_kv_heads, capacity, geometry.head_dim)
    prefill_args = (
        torch.zeros(1, prompt_len, dtype=torch.long),
        torch.ones(1, prompt_len, dtype=torch.long),
        torch.arange(prompt_len).unsqueeze(0),
    )
    decode_args = (
        torch.zeros(1, 1, dtype=torch.long),
        torch.ones(1, capacity, dtype=torch.long),
        torch.zeros(1, 1, dtype=torch.long),
        torch.zeros(1, dtype=torch.long),
        *[torch.zeros(cache_shape) for _ in range(2 * geometry.num_layers)],
    )
    jobs = (
        (StaticPrefill(model, prompt_len, capacity), prefill_args, prefill_input_names(), PREFILL_FILE),
        (StaticDecode(model, capacity), decode_args, decode_input_names(geometry.num_layers), DECODE_FILE),
    )
    for module, args, names, filename in jobs:
        with torch.no_grad():
            torch.onnx.export(module.eval(), args, str(out_dir / filename), input_names=names,
                              output_names=graph_output_names(geometry.num_layers), opset_version=opset,
                              dynamo=False)


def check_standard_ops(path: Path, max_opset: int = MAX_OPSET) -> None:
    """Raise ValueError if the graph uses a non-standard op domain or an opset above `max_opset`."""
    model = onnx.load(str(path), load_external_data=False)
    domains = {node.domain for node in model.graph.node if node.domain not in ("", "ai.onnx")}
    if domains:
        raise ValueError(f"{path.name} uses ops from {sorted(domains)}; ATC accepts only standard ONNX ops")
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx") and entry.version > max_opset:
            raise ValueError(f"{path.name} has opset {entry.version}; ATC needs opset <= {max_opset}")


# ---------------------------------------------------------------- numpy greedy loop


def static_greedy(out_dir: str | Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Generate greedily with the static graphs in onnxruntime CPU; return the new tokens.

    Generation stops after an eos token from the manifest. The prompt must fit in P
    tokens, and the prompt plus all but the last new token must fit in the cache of C.
    """
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    prompt_len, capacity = manifest["max_prompt_len"], manifest["kv_capacity"]
    if not 1 <= len(prompt_ids) <= prompt_len:
        raise ValueError(f"prompt has {len(prompt_ids)} tokens; the prefill graph takes 1 to {prompt_len} "
                         f"(re-export with a larger max_prompt_len)")
    if len(prompt_ids) + max_new_tokens - 1 > capacity:
        raise ValueError(f"prompt ({len(prompt_ids)} tokens) plus max_new_tokens={max_new_tokens} needs "
                         f"{len(prompt_ids) + max_new_tokens - 1} cache slots, but kv_capacity is {capacity}; "
                         f"lower max_new_tokens or re-export with a larger kv_capacity")
    eos = set(manifest["eos_token_ids"])
    num_layers = manifest["num_layers"]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    prefill = ort.InferenceSession(str(out_dir / PREFILL_FILE), options, providers=["CPUExecutionProvider"])
    decode = ort.InferenceSession(str(out_dir / DECODE_FILE), options, providers=["CPUExecutionProvider"])

    length = len(prompt_ids)
    input_ids = np.full((1, prompt_len), manifest["pad_token_id"], dtype=np.int64)
    input_ids[0, :length] = prompt_ids
    attention_mask = np.zeros((1, prompt_len), dtype=np.int64)
    attention_mask[0, :length] = 1
    position_ids = np.arange(prompt_len, dtype=np.int64)[None]
    outputs = prefill.run(None, {"input_ids": input_ids, "attention_mask": attention_mask,
                                 "position_ids": position_ids})
    token = int(outputs[0][0, length - 1].argmax())
    past = outputs[1:]
    generated = [token]

    cache_mask = np.zeros((1, capacity), dtype=np.int64)
    cache_mask[0, :length] = 1
    slot = length
    while len(generated) < max_new_tokens and token not in eos:
        cache_mask[0, slot] = 1
        feeds = {"input_ids": np.array([[token]], dtype=np.int64), "attention_mask": cache_mask,
                 "position_ids": np.array([[slot]], dtype=np.int64), "cache_position": np.array([slot], dtype=np.int64)}
        feeds.update(zip(past_names(num_layers), past))
        outputs = decode.run(None, feeds)
        token = int(outputs[0][0, -1].argmax())
        past = outputs[1:]
        generated.append(token)
        slot += 1
    return generated


# ---------------------------------------------------------------- ATC


def atc_commands(prompt_len: int, capacity: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 soc_version: str) -> list[list[str]]:
    """Return one `atc` argument list per graph, with every input shape fixed."""
    cache = f"1,{num_kv_heads},{capacity},{head_dim}"
    prefill_shapes = [f"input_ids:1,{prompt_len}", f"attention_mask:1,{prompt_len}", f"position_ids:1,{prompt_len}"]
    decode_shapes = ["input_ids:1,1", f"attention_mask:1,{capacity}", "position_ids:1,1", "cache_position:1"]
    decode_shapes += [f"{name}:{cache}" for name in past_names(num_layers)]
    commands = []
    for filename, shapes in ((PREFILL_FILE, prefill_shapes), (DECODE_FILE, decode_shapes)):
        commands.append([
            "atc",
            f"--model={filename}",
            "--framework=5",  # 5 = ONNX
            f"--output={Path(filename).stem}",
            f"--soc_version={soc_version}",
            f"--input_shape={';'.join(shapes)}",
            "--precision_mode_v2=mixed_float16",
            "--log=error",
        ])
    return commands


def atc_script(commands: list[list[str]]) -> str:
    lines = [
        "#!/bin/sh",
        "# Compile the static graphs into Ascend offline models (.om) with ATC from the Huawei CANN",
        "# toolkit. Run on a machine with CANN installed, from this folder, after",
        "# `source <CANN install dir>/set_env.sh`.",
        "set -e",
        'cd "$(dirname "$0")"',
    ]
    lines += [shlex.join(command) for command in commands]
    return "\n".join(lines) + "\n"


def run_atc(commands: list[list[str]], cwd: Path, final_dir: Path | None = None) -> bool:
    """Run each command if `atc` is on PATH; return whether .om files were built.

    Without `atc`, log a warning with the commands and return False. A failing `atc`
    raises RuntimeError with its output. `final_dir` is the folder named in the warning,
    when `cwd` is a temporary folder that will be renamed.
    """
    atc = shutil.which("atc")
    if atc is None:
        log.warning(
            "ATC (the model compiler from the Huawei CANN toolkit) was not found on PATH, so no .om "
            "files were built. On a CANN machine, run `sh %s` in %s, or these commands:\n%s",
            ATC_SCRIPT, final_dir or cwd, "\n".join(shlex.join(c) for c in commands),
        )
        return False
    for command in commands:
        log.info("running %s", shlex.join(command))
        result = subprocess.run([atc, *command[1:]], cwd=cwd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"atc failed with exit code {result.returncode} for {shlex.join(command)}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
    return True


# ---------------------------------------------------------------- entry point


def reference_tokens(model: PreTrainedModel, tokens: dict, prompts: list[list[int]], max_new_tokens: int,
                     dynamic_dir: Path | None) -> tuple[str, list[list[int]]]:
    """Greedy tokens from the dynamic ONNX export if given, else from PyTorch generate()."""
    eos, pad = tokens["eos_token_ids"], tokens["pad_token_id"]
    if dynamic_dir is not None:
        manifest = read_manifest(dynamic_dir)
        geometry = ModelGeometry(manifest["num_layers"], manifest["num_kv_heads"], manifest["head_dim"],
                                 manifest["vocab_size"])
        decoder = OnnxDecoder(Path(dynamic_dir) / manifest["model_file"], geometry)
        return f"onnx:{dynamic_dir}", [decoder.greedy([p], max_new_tokens, eos, pad)[0] for p in prompts]
    return "pytorch", [torch_greedy(model, p, max_new_tokens, eos, pad) for p in prompts]


def export_ascend(model_dir: str | Path, out_dir: str | Path, max_prompt_len: int = 128, kv_capacity: int = 256,
                  soc_version: str = "Ascend310B1", opset: int = 17, dynamic_dir: Path | None = None,
                  check: bool = True, max_new_tokens: int = 16, strict: bool = True) -> dict:
    """Export static prefill and decode graphs, check them, write atc.sh and run ATC if present.

    With `check`, static_greedy must reproduce the greedy tokens of the dynamic export in
    `dynamic_dir` (or of PyTorch when it is None) on the parity prompts. A mismatch raises
    ParityError unless `strict` is False. Returns the manifest written to edgelm_export.json.
    """
    if opset > MAX_OPSET:
        raise ValueError(f"opset={opset} is too new for ATC; use {MAX_OPSET} or lower")
    if not 1 <= max_prompt_len <= kv_capacity:
        raise ValueError(f"max_prompt_len={max_prompt_len} must be between 1 and kv_capacity={kv_capacity}")
    model_dir = Path(model_dir)
    model, tokenizer = load_for_export(model_dir)
    geometry = ModelGeometry.from_config(model.config)
    tokens = special_token_ids(model, tokenizer)

    with atomic_dir(out_dir) as tmp:
        log.info("exporting static graphs for Ascend: P=%d, C=%d, opset %d", max_prompt_len, kv_capacity, opset)
        export_static_graphs(model, tmp, max_prompt_len, kv_capacity, opset)
        for filename in (PREFILL_FILE, DECODE_FILE):
            check_standard_ops(tmp / filename)
        copy_model_files(model, model_dir, tmp)
        manifest = build_manifest(model, tokenizer, model_dir, "ascend-static", model_file="", opset=opset)
        del manifest["model_file"]  # two graphs instead of one model file, listed under "graphs"
        manifest.update({
            "format": ASCEND_FORMAT,
            "format_version": ASCEND_FORMAT_VERSION,
            "max_prompt_len": max_prompt_len,
            "kv_capacity": kv_capacity,
            "soc_version": soc_version,
            "mask_value": MASK_VALUE,
            "graphs": {"prefill": PREFILL_FILE, "decode": DECODE_FILE},
        })
        # static_greedy reads the manifest, so write it before the check and again after.
        write_json(tmp / MANIFEST_NAME, manifest)
        if check:
            manifest["parity"] = check_static_parity(model, tokenizer, tokens, tmp, max_new_tokens,
                                                      dynamic_dir, strict)

        commands = atc_commands(max_prompt_len, kv_capacity, geometry.num_layers, geometry.num_kv_heads,
                                geometry.head_dim, soc_version)
        script = tmp / ATC_SCRIPT
        write_text(script, atc_script(commands))
        script.chmod(0o755)
        manifest["atc_commands"] = [shlex.join(c) for c in commands]
        manifest["om_built"] = run_atc(commands, tmp, Path(out_dir))
        if manifest["om_built"]:
            manifest["graphs"].update(prefill_om="prefill.om", decode_om="decode.om")
        write_json(tmp / MANIFEST_NAME, manifest)
    return manifest


def check_static_parity(model, tokenizer, tokens: dict, folder: Path, max_new_tokens: int,
                        dynamic_dir: Path | None, strict: bool) -> dict:
    """Compare static_greedy with the reference greedy tokens on the parity prompts."""
    manifest = read_manifest(folder)
    prompts = [p for p in parity_prompts(tokenizer) if len(p) <= manifest["max_prompt_len"]]
    if not prompts:
        raise ValueError(f"no parity prompt fits in max_prompt_len={manifest['max_prompt_len']}; raise it to 64 or more")
    # Shorten generation so that the longest prompt's tokens still fit in the cache.
    new_tokens = min(max_new_tokens, manifest["kv_capacity"] - max(len(p) for p in prompts) + 1)
    reference_name, expected = reference_tokens(model, tokens, prompts, new_tokens, dynamic_dir)
    actual = [static_greedy(folder, p, new_tokens) for p in prompts]
    result = {"reference": reference_name, "prompts": len(prompts), "max_new_tokens": new_tokens,
              **compare_greedy(expected, actual)}
    log.info("static graphs vs %s: greedy match %s", reference_name, result["greedy_match"])
    if strict and not result["greedy_match"]:
        raise ParityError(f"static Ascend graphs give other greedy tokens than {reference_name}: "
                          f"{result['greedy_mismatches']}; pass strict=False to keep the export")
    return result
