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
one-hot blend, `cache * (1 - onehot) + new * onehot`, instead of ScatterND. The blend
is element-wise Mul and Add, which every ATC release supports in fp16 and fp32, while
ScatterND needs int64 indices and its ATC support depends on the CANN version and chip.
Masked scores get MASK_VALUE, which fp16 can represent, instead of the fp32 minimum.

Before ATC runs, every node is checked against cann_ops.json (edgelm.export.atc), and the
int64 nodes of each graph are counted into the manifest.
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from transformers import PreTrainedModel

from edgelm.export.atc import (
    MIXLIST_FILE,
    AtcOptions,
    amct_status,
    atc_commands,
    atc_environment,
    atc_script,
    count_int64_nodes,
    mixlist,
    run_atc,
    unsupported_nodes,
    validate_soc_version,
)
from edgelm.export.onnx_export import (
    MANIFEST_NAME,
    MASK_VALUE,
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
# The CANN 7.0 ATC guide lists ONNX opsets 9 to 18 (see cann_ops.json).
MAX_OPSET = 18


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


def fold_constants(path: Path) -> None:
    """Rewrite the graph at `path` with onnxruntime's basic optimizations (constant folding).

    With fixed shapes, the shape arithmetic that the exporter writes (Shape, Gather,
    ConstantOfShape, Where on int64) folds into constants. On the 10-layer student the
    prefill graph went from 1214 nodes, 366 of them int64, to 643 nodes with 1 int64 node.
    The basic level only folds and removes nodes, so the graph keeps standard ONNX ops.
    Opset imports of other domains, which onnxruntime adds unused, are dropped.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    folded = path.with_name(path.stem + ".folded.onnx")
    options.optimized_model_filepath = str(folded)
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    model = onnx.load(str(folded))
    used_domains = {node.domain for node in model.graph.node} | {""}
    imports = [entry for entry in model.opset_import if entry.domain in used_domains]
    del model.opset_import[:]
    model.opset_import.extend(imports)
    onnx.save(model, str(path))
    folded.unlink()


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
                  check: bool = True, max_new_tokens: int = 16, strict: bool = True,
                  atc_options: AtcOptions | None = None, heldout_texts=None, thresholds: dict | None = None) -> dict:
    """Export static prefill and decode graphs, check them, write atc.sh and run ATC if present.

    With `check`, static_greedy must reproduce the greedy tokens of the dynamic export in
    `dynamic_dir` (or of PyTorch when it is None) on the parity prompts, and with a
    `dynamic_dir` the prefill graph's logits are compared on held-out text against
    `thresholds`. A mismatch raises ParityError unless `strict` is False. Every node must
    pass the CANN operator table (ValueError lists the others). Returns the manifest
    written to edgelm_export.json.
    """
    if opset > MAX_OPSET:
        raise ValueError(f"opset={opset} is too new for ATC; use {MAX_OPSET} or lower")
    if not 1 <= max_prompt_len <= kv_capacity:
        raise ValueError(f"max_prompt_len={max_prompt_len} must be between 1 and kv_capacity={kv_capacity}")
    options = atc_options or AtcOptions(soc_version=soc_version)
    options.soc_version = soc_version
    validate_soc_version(soc_version)
    options.validate()
    model_dir = Path(model_dir)
    model, tokenizer = load_for_export(model_dir)
    geometry = ModelGeometry.from_config(model.config)
    tokens = special_token_ids(model, tokenizer)

    with atomic_dir(out_dir) as tmp:
        log.info("exporting static graphs for Ascend: P=%d, C=%d, opset %d", max_prompt_len, kv_capacity, opset)
        export_static_graphs(model, tmp, max_prompt_len, kv_capacity, opset)
        operator_report = {}
        for filename in (PREFILL_FILE, DECODE_FILE):
            unfolded = count_int64_nodes(tmp / filename)
            fold_constants(tmp / filename)
            check_standard_ops(tmp / filename)
            problems = unsupported_nodes(tmp / filename)
            if problems:
                raise ValueError(f"{filename} has {len(problems)} node(s) that CANN's ATC does not accept:\n"
                                 + "\n".join(problems))
            operator_report[filename] = {**count_int64_nodes(tmp / filename),
                                         "before_folding": {key: unfolded[key] for key in ("int64_nodes", "total_nodes")}}
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
            "operators": operator_report,
            "file_size_bytes": sum((tmp / name).stat().st_size for name in (PREFILL_FILE, DECODE_FILE)),
        })
        # static_greedy reads the manifest, so write it before the check and again after.
        write_json(tmp / MANIFEST_NAME, manifest)
        if check:
            manifest["parity"] = check_static_parity(model, tokenizer, tokens, tmp, max_new_tokens,
                                                      dynamic_dir, strict, heldout_texts, thresholds)
            write_json(tmp / "parity.json", manifest["parity"])

        commands = atc_commands(max_prompt_len, kv_capacity, geometry.num_layers, geometry.num_kv_heads,
                                geometry.head_dim, soc_version, options)
        environment = atc_environment(options)
        write_json(tmp / MIXLIST_FILE, mixlist())
        script = tmp / ATC_SCRIPT
        write_text(script, atc_script(commands, environment))
        script.chmod(0o755)
        manifest["atc_commands"] = [shlex.join(c) for c in commands]
        manifest["atc_environment"] = environment
        manifest["amct"] = amct_status()
        manifest["om_built"] = run_atc(commands, tmp, Path(out_dir), environment)
        if manifest["om_built"]:
            manifest["graphs"].update(prefill_om="prefill.om", decode_om="decode.om")
        write_json(tmp / MANIFEST_NAME, manifest)
    return manifest


class StaticPrefillDecoder:
    """The prefill graph behind the step() interface of OnnxDecoder, for teacher forcing only.

    step() right-pads the tokens to P, runs prefill and returns the logits of the real
    positions; it takes no past, so it cannot decode.
    """

    def __init__(self, folder: Path):
        manifest = read_manifest(folder)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(Path(folder) / PREFILL_FILE), options,
                                            providers=["CPUExecutionProvider"])
        self.prompt_len = manifest["max_prompt_len"]
        self.pad_id = manifest["pad_token_id"]

    def empty_past(self, batch: int) -> list:
        return []

    def step(self, input_ids, attention_mask, position_ids, past):
        length = input_ids.shape[1]
        padded = np.full((1, self.prompt_len), self.pad_id, dtype=np.int64)
        padded[0, :length] = input_ids[0]
        mask = np.zeros((1, self.prompt_len), dtype=np.int64)
        mask[0, :length] = 1
        positions = np.arange(self.prompt_len, dtype=np.int64)[None]
        logits = self.session.run(["logits"], {"input_ids": padded, "attention_mask": mask,
                                               "position_ids": positions})[0]
        return logits[:, :length], []


# Static graphs in fp32 onnxruntime differ from the dynamic export only by float rounding.
ASCEND_THRESHOLDS = {"max_logits_diff": 1e-3, "min_top1_agreement": 0.99, "max_ppl_increase": 0.001,
                     "min_greedy_agreement": 1.0}


def check_static_parity(model, tokenizer, tokens: dict, folder: Path, max_new_tokens: int,
                        dynamic_dir: Path | None, strict: bool, heldout_texts=None,
                        thresholds: dict | None = None) -> dict:
    """Compare static_greedy with the reference greedy tokens, and prefill logits on held-out text.

    The logits comparison needs `dynamic_dir`; without it only greedy tokens are compared.
    """
    from edgelm.export.parity import apply_thresholds, failure_message, heldout_token_ids, teacher_forcing

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
    if dynamic_dir is not None:
        dynamic = read_manifest(dynamic_dir)
        geometry = ModelGeometry(dynamic["num_layers"], dynamic["num_kv_heads"], dynamic["head_dim"],
                                 dynamic["vocab_size"])
        chunks = heldout_token_ids(tokenizer, heldout_texts, chunk_tokens=min(128, manifest["max_prompt_len"]))
        reference = OnnxDecoder(Path(dynamic_dir) / dynamic["model_file"], geometry)
        result.update(teacher_forcing(reference, StaticPrefillDecoder(folder), chunks))
        result["max_logits_diff"] = result["heldout_max_logits_diff"]
        apply_thresholds(result, thresholds or ASCEND_THRESHOLDS, "ascend")
        if strict and not result["passed"]:
            raise ParityError(failure_message(result, "static Ascend export"))
    if strict and not result["greedy_match"]:
        raise ParityError(f"static Ascend graphs give other greedy tokens than {reference_name}: "
                          f"{result['greedy_mismatches']}; pass strict=False to keep the export")
    return result
