"""Build and run ATC commands for the static Ascend graphs, check operators first, explain errors.

ATC is the model compiler of the Huawei CANN toolkit. It turns an ONNX graph into an
offline model (.om) for one chip, named by `--soc_version`. Nothing in this module needs
CANN: the commands are plain argument lists, the operator check reads cann_ops.json, and
`run_atc` runs whatever `atc` is first on PATH.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import onnx

log = logging.getLogger(__name__)

CANN_OPS_FILE = Path(__file__).resolve().parent / "cann_ops.json"
MIXLIST_FILE = "mixlist.json"

# --soc_version values of chips that the CANN 7 and 8 ATC documentation names. `npu-smi info` on
# the device shows the chip name; the value is "Ascend" followed by that name.
SOC_VERSIONS = (
    "Ascend310", "Ascend310B1", "Ascend310B2", "Ascend310B3", "Ascend310B4",
    "Ascend310P1", "Ascend310P3", "Ascend310P5", "Ascend310P7",
    "Ascend910", "Ascend910A", "Ascend910ProA", "Ascend910B", "Ascend910ProB", "Ascend910PremiumA",
    "Ascend910B1", "Ascend910B2", "Ascend910B3", "Ascend910B4",
)
# NOTE: newer chips (for example the Ascend910_93 series) are missing; add their exact
# --soc_version string here when a CANN release documents it.

# --precision_mode_v2 values from the ATC parameter reference (CANN 8.0).
PRECISION_MODES_V2 = ("fp16", "origin", "cube_fp16in_fp32out", "mixed_float16", "mixed_bfloat16",
                      "cube_hif8", "mixed_hif8")
LOG_LEVELS = ("debug", "info", "warning", "error", "null")

# Ascend IR op types kept in fp32 under mixed precision: the pieces of RMSNorm and LayerNorm,
# reductions and Softmax. x**2 and sums of squares overflow fp16 on residual streams.
# NOTE: ATC matches these against Ascend IR op types, which differ from ONNX names. The
# list follows the Ascend IR names in the CANN operator list and was not checked on a device.
FP32_OP_TYPES = ("Pow", "ReduceMean", "ReduceMeanD", "ReduceSum", "ReduceSumD", "Sqrt", "Rsqrt", "RealDiv",
                 "SoftmaxV2", "LayerNorm", "LayerNormV3", "RmsNorm")

# Error codes that ATC prints, with a plain explanation and the next step. EZ0501, EZ3002,
# EZ3003 and E19010 follow the "error code reference" pages of the CANN 5.0.4, 7.0 and 8.0
# documentation on hiascend.com. NOTE: the E10001 and E19999 texts are general readings
# (invalid option, internal error), not checked against a CANN page.
KNOWN_ERRORS = {
    "E10001": "an ATC option has an invalid value; check the option named in the message against `atc --help`",
    "E19010": "no ONNX parser is registered for an operator at this opset (unsupported operator, or an opset "
              "newer than this CANN accepts); re-export with a lower opset or check cann_ops.json",
    "EZ0501": "the operator has no Ascend IR registration in this CANN version (unsupported operator)",
    "EZ3002": "the operator exists but not with these input dtypes or shapes on this chip",
    "EZ3003": "no kernel or engine supports the operator on this chip (unsupported operator); check that the "
              "OPP component of CANN is installed, or remove the operator from the graph",
    "E19999": "ATC hit an internal error; read the lines before it and the plog files under ~/ascend/log for the cause",
}
ERROR_CODE = re.compile(r"\b(E[0-9A-Z]{5})\b")


class AtcError(RuntimeError):
    """ATC failed; the message lists each recognised error code with an explanation."""


@dataclass
class AtcOptions:
    """Settings passed to every atc call."""

    soc_version: str = "Ascend310B1"
    precision_mode_v2: str = "mixed_float16"
    keep_norms_fp32: bool = True
    log_level: str = "error"
    prefill_gears: tuple[int, ...] = ()
    te_parallel_compiler: int | None = None

    def validate(self) -> None:
        validate_soc_version(self.soc_version)
        if self.precision_mode_v2 not in PRECISION_MODES_V2:
            raise ValueError(f"precision_mode_v2={self.precision_mode_v2!r} is not an ATC value; "
                             f"use one of {PRECISION_MODES_V2}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level={self.log_level!r} is invalid; use one of {LOG_LEVELS}")
        if any(gear < 1 for gear in self.prefill_gears) or len(set(self.prefill_gears)) != len(self.prefill_gears):
            raise ValueError(f"prefill_gears={list(self.prefill_gears)} must be distinct positive lengths")
        if self.te_parallel_compiler is not None and self.te_parallel_compiler < 1:
            raise ValueError(f"te_parallel_compiler={self.te_parallel_compiler} must be >= 1")


def validate_soc_version(soc_version: str) -> None:
    if soc_version not in SOC_VERSIONS:
        raise ValueError(f"soc_version={soc_version!r} is not a known ATC chip name; run `npu-smi info` on the "
                         f"device and use 'Ascend' + the chip name, one of {', '.join(SOC_VERSIONS)}")


# ---------------------------------------------------------------- operator check


def load_cann_ops(path: Path = CANN_OPS_FILE) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def unsupported_nodes(model_path: Path, cann_ops: dict | None = None) -> list[str]:
    """Return one line per node that the operator table in cann_ops.json does not accept.

    A node fails when its domain is not the standard ONNX domain, its op type is missing from
    the table, or the graph's opset lies outside the op's supported range.
    """
    cann_ops = cann_ops or load_cann_ops()
    table = cann_ops["operators"]
    model = onnx.load(str(model_path), load_external_data=False)
    opset = next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))
    problems = []
    for node in model.graph.node:
        name = node.name or node.output[0]
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{name}: op {node.domain}::{node.op_type} is outside the standard ONNX domain")
            continue
        supported = table.get(node.op_type)
        if supported is None:
            problems.append(f"{name}: op {node.op_type} is not in the CANN {cann_ops['cann_version']} operator table")
        elif not supported["min_opset"] <= opset <= supported["max_opset"]:
            problems.append(f"{name}: op {node.op_type} at opset {opset}; CANN {cann_ops['cann_version']} "
                            f"supports opsets {supported['min_opset']} to {supported['max_opset']}")
    return problems


def count_int64_nodes(model_path: Path) -> dict:
    """Count nodes with an int64 output, by op type, after ONNX shape inference.

    Ascend deployment guides advise few int64 ops because many AI Core kernels lack int64
    support and fall back to the AI CPU. NOTE: that effect was not measured here.
    """
    model = onnx.shape_inference.infer_shapes(onnx.load(str(model_path), load_external_data=False))
    int64_values = {value.name for value in [*model.graph.value_info, *model.graph.output, *model.graph.input]
                    if value.type.tensor_type.elem_type == onnx.TensorProto.INT64}
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.INT64:
            int64_values.add(init.name)
    by_op: dict[str, int] = {}
    for node in model.graph.node:
        if any(out in int64_values for out in node.output):
            by_op[node.op_type] = by_op.get(node.op_type, 0) + 1
    return {"int64_nodes": sum(by_op.values()), "total_nodes": len(model.graph.node),
            "int64_nodes_by_op": dict(sorted(by_op.items()))}


# ---------------------------------------------------------------- commands


def mixlist() -> dict:
    """Return the --modify_mixlist JSON that moves FP32_OP_TYPES to the block list (kept in fp32)."""
    return {"black-list": {"to-add": list(FP32_OP_TYPES)}}


def input_shape_arg(shapes: list[str]) -> str:
    return "--input_shape=" + ";".join(shapes)


def atc_commands(prompt_len: int, capacity: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 soc_version: str, options: AtcOptions | None = None) -> list[list[str]]:
    """Return one `atc` argument list per graph (prefill, decode), every input shape fixed.

    With `options.prefill_gears`, the prefill command marks the sequence axis as -1 and
    lists the gears with --dynamic_dims.
    """
    from edgelm.export.onnx_export import past_names

    options = options or AtcOptions(soc_version=soc_version)
    options.soc_version = soc_version
    options.validate()
    if any(gear > prompt_len for gear in options.prefill_gears):
        raise ValueError(f"prefill_gears={list(options.prefill_gears)} has a gear above max_prompt_len={prompt_len}")
    cache = f"1,{num_kv_heads},{capacity},{head_dim}"
    seq = "-1" if options.prefill_gears else str(prompt_len)
    prefill_shapes = [f"input_ids:1,{seq}", f"attention_mask:1,{seq}", f"position_ids:1,{seq}"]
    decode_shapes = ["input_ids:1,1", f"attention_mask:1,{capacity}", "position_ids:1,1", "cache_position:1"]
    decode_shapes += [f"{name}:{cache}" for name in past_names(num_layers)]
    commands = []
    for stem, shapes in (("prefill", prefill_shapes), ("decode", decode_shapes)):
        command = [
            "atc",
            f"--model={stem}.onnx",
            "--framework=5",  # 5 = ONNX
            f"--output={stem}",
            f"--soc_version={soc_version}",
            input_shape_arg(shapes),
            f"--precision_mode_v2={options.precision_mode_v2}",
        ]
        if options.keep_norms_fp32 and options.precision_mode_v2.startswith("mixed"):
            command.append(f"--modify_mixlist={MIXLIST_FILE}")
        if stem == "prefill" and options.prefill_gears:
            # One gear per -1 axis in --input_shape: the three prefill inputs share the length.
            command.append("--dynamic_dims=" + ";".join(",".join([str(gear)] * 3) for gear in options.prefill_gears))
        command.append(f"--log={options.log_level}")
        commands.append(command)
    return commands


def atc_environment(options: AtcOptions) -> dict[str, str]:
    """Return the environment variables for atc: TE_PARALLEL_COMPILER sets parallel kernel builds."""
    return {} if options.te_parallel_compiler is None else {"TE_PARALLEL_COMPILER": str(options.te_parallel_compiler)}


def atc_script(commands: list[list[str]], environment: dict[str, str] | None = None) -> str:
    lines = [
        "#!/bin/sh",
        "# Compile the static graphs into Ascend offline models (.om) with ATC from the Huawei CANN",
        "# toolkit. Run on a machine with CANN installed, from this folder, after",
        "# `source <CANN install dir>/set_env.sh`.",
        "set -e",
        'cd "$(dirname "$0")"',
    ]
    lines += [f"export {key}={shlex.quote(value)}" for key, value in (environment or {}).items()]
    lines += [shlex.join(command) for command in commands]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- running ATC


def explain_atc_output(text: str) -> list[str]:
    """Return one plain line per distinct error code found in ATC's output, in order of appearance."""
    explanations = []
    for code in dict.fromkeys(ERROR_CODE.findall(text)):
        known = KNOWN_ERRORS.get(code)
        line = next((line.strip() for line in text.splitlines() if code in line), code)
        explanations.append(f"{code}: {known}. ATC: {line}" if known else f"{code} (no explanation stored): {line}")
    if "opset" in text.lower() and not any(code in ("E19010",) for code in ERROR_CODE.findall(text)):
        explanations.append("ATC reported an opset problem; the CANN ATC documentation lists ONNX opsets 9 to 18 "
                            "(CANN 7.0), so re-export with opset 18 or lower")
    return explanations


def run_atc(commands: list[list[str]], cwd: Path, final_dir: Path | None = None,
            environment: dict[str, str] | None = None) -> bool:
    """Run each command if `atc` is on PATH; return whether .om files were built.

    Without `atc`, log a warning with the commands and return False. A failing `atc` raises
    AtcError with an explanation per known error code, then ATC's stdout and stderr.
    `final_dir` is the folder named in the warning when `cwd` is a temporary folder.
    """
    atc = shutil.which("atc")
    if atc is None:
        log.warning(
            "ATC (the model compiler from the Huawei CANN toolkit) was not found on PATH, so no .om "
            "files were built. On a CANN machine, run `sh atc.sh` in %s, or these commands:\n%s",
            final_dir or cwd, "\n".join(shlex.join(c) for c in commands),
        )
        return False
    env = {**os.environ, **(environment or {})}
    for command in commands:
        log.info("running %s", shlex.join(command))
        result = subprocess.run([atc, *command[1:]], cwd=cwd, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            output = f"{result.stdout}\n{result.stderr}"
            explanations = explain_atc_output(output) or ["no known error code in the output"]
            raise AtcError(
                f"atc failed with exit code {result.returncode} for {shlex.join(command)}\n"
                + "\n".join(f"  - {line}" for line in explanations)
                + f"\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
        output = next((arg.split("=", 1)[1] for arg in command if arg.startswith("--output=")), None)
        # ATC names the file <output>.om; some targets add a suffix before ".om".
        if output is not None and not list((cwd / output).parent.glob(f"{Path(output).name}*.om")):
            raise AtcError(f"atc exited with status 0 but wrote no {output}.om for {shlex.join(command)}; "
                           f"check its output:\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return True


def amct_status() -> str:
    """Describe whether the AMCT int8 route (amct_onnx, from the CANN toolkit) is available here."""
    try:
        import amct_onnx  # noqa: F401 - imported only to test availability
    except ImportError:
        return ("amct_onnx is not installed, so no AMCT int8 model was built. AMCT ships with the CANN toolkit "
                "(Ascend-cann-amct); on a CANN machine, calibrate prefill.onnx and decode.onnx with "
                "amct_onnx.quantize_model and compile the result with the same atc.sh")
    # NOTE: the AMCT calibration step itself is not implemented; only availability is reported.
    return "amct_onnx is importable; AMCT int8 calibration is not run by edgelm yet"
