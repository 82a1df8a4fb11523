"""Static Ascend graphs: greedy parity in onnxruntime CPU, op and opset limits, and the ATC step.

No test here runs the real ATC or an Ascend device. The ATC tests put a stand-in `atc`
shell script on PATH that records its arguments, so they check only the commands that
edgelm builds and how it handles success and failure.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest

from edgelm.export.ascend import (
    DECODE_FILE,
    PREFILL_FILE,
    export_ascend,
    static_greedy,
)
from edgelm.export.atc import (
    CANN_OPS_FILE,
    AtcError,
    AtcOptions,
    atc_commands,
    explain_atc_output,
    load_cann_ops,
    run_atc,
    unsupported_nodes,
)
from edgelm.export.onnx_export import export_onnx, load_for_export, parity_prompts, torch_greedy

PROMPT_LEN = 64
CAPACITY = 96


@pytest.fixture(scope="module")
def llama_dir(tiny_model_factory):
    # initializer_range=0.2 so that greedy output varies (see tests/test_export.py).
    return tiny_model_factory("llama", initializer_range=0.2)


@pytest.fixture(scope="module")
def ascend_export(llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ascend") / "static"
    empty_bin = tmp_path_factory.mktemp("empty-bin")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PATH", str(empty_bin))  # no `atc` anywhere on PATH
        manifest = export_ascend(llama_dir, out, max_prompt_len=PROMPT_LEN, kv_capacity=CAPACITY)
    return out, manifest


def write_stand_in_atc(bin_dir: Path, exit_code: int = 0, message: str = "E19999: stand-in atc failure") -> Path:
    """Write an `atc` stand-in that records its call and checks its arguments like ATC would.

    It appends arguments, working folder and TE_PARALLEL_COMPILER to atc-calls.jsonl, exits 1
    when --model, --framework=5, --output, --soc_version or --input_shape is missing or the
    model or mixlist file does not exist, exits `exit_code` with `message` on stderr when
    `exit_code` is not 0, and otherwise creates <output>.om.
    """
    log_path = bin_dir / "atc-calls.jsonl"
    script = bin_dir / "atc"
    script.write_text(
        "#!/usr/bin/env python3\n"
        "import json, os, pathlib, sys\n"
        "args = dict(a[2:].split('=', 1) for a in sys.argv[1:] if a.startswith('--') and '=' in a)\n"
        f"with open({str(log_path)!r}, 'a') as f:\n"
        "    f.write(json.dumps({'args': sys.argv[1:], 'cwd': str(pathlib.Path.cwd()),\n"
        "                        'te_parallel_compiler': os.environ.get('TE_PARALLEL_COMPILER')}) + '\\n')\n"
        "missing = [k for k in ('model', 'output', 'soc_version', 'input_shape') if k not in args]\n"
        "if missing or args.get('framework') != '5' or not pathlib.Path(args['model']).is_file() \\\n"
        "        or ('modify_mixlist' in args and not pathlib.Path(args['modify_mixlist']).is_file()):\n"
        "    print(f'E10001: invalid arguments, missing {missing}', file=sys.stderr)\n"
        "    sys.exit(1)\n"
        f"if {exit_code}:\n"
        f"    print({message!r}, file=sys.stderr)\n"
        f"    sys.exit({exit_code})\n"
        "pathlib.Path(args['output'] + '.om').write_bytes(b'stand-in')\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return log_path


def read_calls(log_path: Path) -> list[dict]:
    return [json.loads(line) for line in log_path.read_text().splitlines()]


def test_static_greedy_equals_torch(ascend_export, llama_dir):
    out, manifest = ascend_export
    assert manifest["parity"]["reference"] == "pytorch"
    assert manifest["parity"]["greedy_match"], manifest["parity"]["greedy_mismatches"]
    model, tokenizer = load_for_export(llama_dir)
    eos, pad = manifest["eos_token_ids"], manifest["pad_token_id"]
    for prompt in parity_prompts(tokenizer):
        expected = torch_greedy(model, prompt, 20, eos, pad)
        assert static_greedy(out, prompt, 20) == expected
        assert len(set(expected)) > 1


def test_graphs_standard_ops_and_opset(ascend_export):
    out, _ = ascend_export
    for filename in (PREFILL_FILE, DECODE_FILE):
        model = onnx.load(str(out / filename))
        assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}, filename
        assert all(entry.version <= 18 for entry in model.opset_import if entry.domain in ("", "ai.onnx"))
        ops = {node.op_type for node in model.graph.node}
        assert "ScatterND" not in ops, filename


def test_graphs_have_static_shapes(ascend_export):
    out, manifest = ascend_export
    heads, dim = manifest["num_kv_heads"], manifest["head_dim"]
    prefill = ort.InferenceSession(str(out / PREFILL_FILE), providers=["CPUExecutionProvider"])
    decode = ort.InferenceSession(str(out / DECODE_FILE), providers=["CPUExecutionProvider"])
    assert [i.shape for i in prefill.get_inputs()] == [[1, PROMPT_LEN]] * 3
    assert prefill.get_outputs()[0].shape == [1, PROMPT_LEN, manifest["vocab_size"]]
    assert prefill.get_outputs()[1].shape == [1, heads, CAPACITY, dim]
    decode_inputs = {i.name: i.shape for i in decode.get_inputs()}
    assert decode_inputs["input_ids"] == [1, 1]
    assert decode_inputs["attention_mask"] == [1, CAPACITY]
    assert decode_inputs["cache_position"] == [1]
    assert decode_inputs["past_key_values.0.key"] == [1, heads, CAPACITY, dim]
    assert decode.get_outputs()[0].shape == [1, 1, manifest["vocab_size"]]


def test_without_atc_writes_script(ascend_export):
    out, manifest = ascend_export
    assert manifest["om_built"] is False
    assert manifest["variant"] == "ascend-static"
    assert (manifest["max_prompt_len"], manifest["kv_capacity"]) == (PROMPT_LEN, CAPACITY)
    assert manifest["soc_version"] == "Ascend310B1"
    script = (out / "atc.sh").read_text()
    assert script.count("\natc ") == 2
    assert "--model=prefill.onnx" in script
    assert "--model=decode.onnx" in script
    assert os.access(out / "atc.sh", os.X_OK)
    assert (out / "tokenizer.json").is_file()
    assert not list(out.glob("*.om"))


def test_atc_command_arguments():
    prefill, decode = atc_commands(128, 256, num_layers=2, num_kv_heads=3, head_dim=64, soc_version="Ascend310P3")
    assert prefill == [
        "atc", "--model=prefill.onnx", "--framework=5", "--output=prefill", "--soc_version=Ascend310P3",
        "--input_shape=input_ids:1,128;attention_mask:1,128;position_ids:1,128",
        "--precision_mode_v2=mixed_float16", "--modify_mixlist=mixlist.json", "--log=error",
    ]
    shapes = next(a for a in decode if a.startswith("--input_shape=")).split("=", 1)[1].split(";")
    assert shapes[:4] == ["input_ids:1,1", "attention_mask:1,256", "position_ids:1,1", "cache_position:1"]
    assert shapes[4:] == [f"past_key_values.{i}.{kind}:1,3,256,64" for i in range(2) for kind in ("key", "value")]


def test_stand_in_atc_runs_with_expected_arguments(ascend_export, tmp_path, monkeypatch):
    out, manifest = ascend_export
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log_path = write_stand_in_atc(bin_dir)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    commands = atc_commands(PROMPT_LEN, CAPACITY, manifest["num_layers"], manifest["num_kv_heads"],
                            manifest["head_dim"], "Ascend310B1")
    assert run_atc(commands, out) is True
    calls = read_calls(log_path)
    assert [call["args"] for call in calls] == [command[1:] for command in commands]
    assert all(call["cwd"] == str(out) for call in calls)


def test_export_with_stand_in_atc_sets_om_built(llama_dir, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log_path = write_stand_in_atc(bin_dir)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    dynamic_dir = tmp_path / "dynamic"
    export_onnx(llama_dir, dynamic_dir, check=False)
    out = tmp_path / "static"
    manifest = export_ascend(llama_dir, out, max_prompt_len=PROMPT_LEN, kv_capacity=CAPACITY,
                             soc_version="Ascend910B3", dynamic_dir=dynamic_dir, max_new_tokens=8,
                             atc_options=AtcOptions(te_parallel_compiler=4))
    assert manifest["om_built"] is True
    assert manifest["parity"]["reference"].startswith("onnx:")
    assert manifest["parity"]["greedy_match"]
    assert manifest["parity"]["max_logits_diff"] < 1e-3
    assert manifest["parity"]["heldout_top1_agreement"] == 1.0
    assert manifest["parity"]["passed"]
    assert (out / "parity.json").is_file()
    assert "export TE_PARALLEL_COMPILER=4" in (out / "atc.sh").read_text()
    assert (out / "prefill.om").is_file()
    assert (out / "decode.om").is_file()
    calls = read_calls(log_path)
    assert len(calls) == 2
    assert "--soc_version=Ascend910B3" in calls[0]["args"]
    assert {call["te_parallel_compiler"] for call in calls} == {"4"}


def test_atc_dynamic_dims_and_options():
    options = AtcOptions(precision_mode_v2="fp16", prefill_gears=(32, 64), log_level="info")
    prefill, decode = atc_commands(64, 96, num_layers=1, num_kv_heads=2, head_dim=16, soc_version="Ascend910B2",
                                   options=options)
    assert "--input_shape=input_ids:1,-1;attention_mask:1,-1;position_ids:1,-1" in prefill
    assert "--dynamic_dims=32,32,32;64,64,64" in prefill
    assert "--precision_mode_v2=fp16" in prefill
    assert not any(arg.startswith("--modify_mixlist") for arg in prefill)  # no mixed precision, no mixlist
    assert "--log=info" in decode
    assert not any(arg.startswith("--dynamic_dims") for arg in decode)


@pytest.mark.parametrize("kwargs, message", [
    ({"soc_version": "Ascend999"}, "soc_version='Ascend999' is not a known ATC chip"),
    ({"precision_mode_v2": "mixed"}, "precision_mode_v2='mixed'"),
    ({"prefill_gears": (0,)}, "prefill_gears"),
    ({"te_parallel_compiler": 0}, "te_parallel_compiler=0"),
])
def test_atc_options_rejected(kwargs, message):
    options = AtcOptions(**{k: v for k, v in kwargs.items() if k != "soc_version"})
    with pytest.raises(ValueError, match=message):
        atc_commands(64, 96, 1, 2, 16, soc_version=kwargs.get("soc_version", "Ascend310B1"), options=options)


def test_gear_above_prompt_length_rejected():
    with pytest.raises(ValueError, match="gear above max_prompt_len=64"):
        atc_commands(64, 96, 1, 2, 16, "Ascend310B1", AtcOptions(prefill_gears=(128,)))


def test_cann_ops_file_names_version_and_source():
    table = load_cann_ops()
    assert table["cann_version"]
    assert "hiascend.com" in table["source"]
    assert all(entry["max_opset"] <= 18 for entry in table["operators"].values())
    assert CANN_OPS_FILE.name == "cann_ops.json"


def test_operator_check_lists_unsupported_nodes(tmp_path):
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Einsum", ["x", "x"], ["y"], name="einsum_node", equation="ij,ij->ij"),
             helper.make_node("Relu", ["y"], ["z"], name="relu_node"),
             helper.make_node("FusedThing", ["z"], ["w"], name="custom_node", domain="com.example")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
                              [helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    onnx.save(model, str(tmp_path / "g.onnx"))
    problems = unsupported_nodes(tmp_path / "g.onnx")
    assert len(problems) == 2
    assert problems[0].startswith("einsum_node: op Einsum is not in the CANN")
    assert problems[1].startswith("custom_node: op com.example::FusedThing")
    high = helper.make_model(helper.make_graph([nodes[1]], "h", [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                                               [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])]),
                             opset_imports=[helper.make_opsetid("", 20)])
    onnx.save(high, str(tmp_path / "h.onnx"))
    assert unsupported_nodes(tmp_path / "h.onnx") == ["relu_node: op Relu at opset 20; CANN 7.0.0 supports opsets 9 to 18"]


def test_static_graphs_pass_operator_check_and_count_int64(ascend_export):
    out, manifest = ascend_export
    for filename in (PREFILL_FILE, DECODE_FILE):
        assert unsupported_nodes(out / filename) == []
        counts = manifest["operators"][filename]
        assert counts["int64_nodes"] <= 2, counts["int64_nodes_by_op"]
        assert counts["before_folding"]["int64_nodes"] > 10 * counts["int64_nodes"]
        assert counts["total_nodes"] < counts["before_folding"]["total_nodes"]
        assert sum(counts["int64_nodes_by_op"].values()) == counts["int64_nodes"]


def test_manifest_records_mixlist_and_amct(ascend_export):
    out, manifest = ascend_export
    mixlist = json.loads((out / "mixlist.json").read_text())
    assert "ReduceMean" in mixlist["black-list"]["to-add"]
    assert "SoftmaxV2" in mixlist["black-list"]["to-add"]
    assert "amct_onnx" in manifest["amct"]
    assert manifest["file_size_bytes"] > 0


@pytest.mark.parametrize("message, explanation", [
    ("EZ3003: No supported Ops kernel and engine are found for [Einsum], optype [Einsum].", "unsupported operator"),
    ("E19010: No parser is registered for Op [/Gather, optype [ai.onnx::19::Gather]].", "lower opset"),
    ("E19999: Inner Error!", "internal error"),
])
def test_explain_known_atc_errors(message, explanation):
    lines = explain_atc_output(f"ATC start working now, please wait for a moment.\n{message}\nATC run failed")
    assert len(lines) == 1
    assert explanation in lines[0]
    assert message.split(":")[0] in lines[0]


def test_stand_in_atc_failure_explained(ascend_export, tmp_path, monkeypatch):
    out, manifest = ascend_export
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_stand_in_atc(bin_dir, exit_code=2,
                       message="EZ3003: No supported Ops kernel and engine are found for [Trilu], optype [Trilu].")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    commands = atc_commands(PROMPT_LEN, CAPACITY, manifest["num_layers"], manifest["num_kv_heads"],
                            manifest["head_dim"], "Ascend310B1")
    with pytest.raises(AtcError, match="EZ3003: no kernel or engine supports the operator"):
        run_atc(commands, out)


def test_stand_in_atc_rejects_missing_model(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_stand_in_atc(bin_dir)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    commands = atc_commands(PROMPT_LEN, CAPACITY, 2, 2, 16, "Ascend310B1")
    with pytest.raises(AtcError, match="E10001: an ATC option has an invalid value"):
        run_atc(commands, tmp_path)  # no prefill.onnx in tmp_path


def test_atc_that_writes_no_om_file_fails(ascend_export, tmp_path, monkeypatch):
    out, manifest = ascend_export
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "atc").write_text("#!/bin/sh\necho compiled\n")
    (bin_dir / "atc").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    commands = atc_commands(PROMPT_LEN, CAPACITY, 2, 2, 16, "Ascend310B1")
    # The shared export may hold .om files from the other stand-in tests.
    fresh = tmp_path / "export"
    shutil.copytree(out, fresh, ignore=shutil.ignore_patterns("*.om"))
    with pytest.raises(AtcError, match="exited with status 0 but wrote no prefill.om"):
        run_atc(commands, fresh)


def test_failing_atc_raises_with_output(ascend_export, tmp_path, monkeypatch):
    out, manifest = ascend_export
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_stand_in_atc(bin_dir, exit_code=3)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    commands = atc_commands(PROMPT_LEN, CAPACITY, 2, 2, 16, "Ascend310B1")
    with pytest.raises(RuntimeError, match="exit code 3(.|\n)*E19999"):
        run_atc(commands, out)


def test_static_greedy_rejects_long_prompt(ascend_export):
    out, _ = ascend_export
    with pytest.raises(ValueError, match="prefill graph takes 1 to 64"):
        static_greedy(out, list(range(1, PROMPT_LEN + 2)), 4)
    with pytest.raises(ValueError, match="kv_capacity is 96"):
        static_greedy(out, list(range(1, 60)), 40)


def test_export_ascend_rejects_bad_sizes(llama_dir, tmp_path):
    with pytest.raises(ValueError, match="opset=19"):
        export_ascend(llama_dir, tmp_path / "a", opset=19)
    with pytest.raises(ValueError, match="max_prompt_len=300"):
        export_ascend(llama_dir, tmp_path / "a", max_prompt_len=300, kv_capacity=256)
    with pytest.raises(ValueError, match="soc_version='Ascend311'"):
        export_ascend(llama_dir, tmp_path / "a", soc_version="Ascend311")
