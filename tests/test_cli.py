"""The `edgelm` command: help for every subcommand, and one-line errors for bad input."""

import json
import subprocess
import sys

import pytest

from edgelm.cli import build_parser, flag_hint, main

SUBCOMMANDS = ["pipeline", "data", "student", "sft", "rollout", "score", "distill", "export", "quantize", "ascend",
               "generate", "eval", "bench"]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_option_has_help(command):
    parser = build_parser()
    subparser = parser._subparsers._group_actions[0].choices[command]
    for action in subparser._actions:
        if action.dest != "help":
            assert action.help, f"edgelm {command} {action.option_strings or action.dest} has no help text"


def test_help_runs_without_torch():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "from edgelm.cli import main\n"
            "try:\n    main(['generate', '--help'])\nexcept SystemExit as e:\n    sys.exit(e.code)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "export_dir" in result.stdout


def test_missing_config_is_one_line_error(tmp_path, caplog):
    assert main(["pipeline", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in caplog.text
    assert "Traceback" not in caplog.text


def test_bad_yaml_and_bad_override(tmp_path, caplog):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft: [unclosed\n")
    assert main(["pipeline", str(bad)]) == 2
    assert "invalid YAML" in caplog.text

    good = tmp_path / "good.yaml"
    good.write_text(f"run_dir: {tmp_path / 'run'}\nsft:\n  stages:\n    - name: a\n")
    assert main(["pipeline", str(good), "--set", "sft.stages.0.records=3"]) == 2
    assert "sft.stages is not a mapping" in caplog.text


def test_malformed_data_names_line(tmp_path, caplog):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n{broken\n")
    assert main(["data", "--input", str(data), "--out", str(tmp_path / "records.jsonl")]) == 2
    assert f"{data}:2:" in caplog.text
    assert not (tmp_path / "records.jsonl").exists()


def test_nonpositive_counts_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["data", "--input", "x", "--out", "y", "--limit", "0"])
    assert "must be a whole number >= 1" in capsys.readouterr().err


def test_packaged_default_config_resolves():
    from edgelm.config import load_config, resolve_config_path

    assert load_config(resolve_config_path("default")).student.keep_layers == 10


def test_student_subcommand(tiny_model_factory, tmp_path, capsys):
    teacher = tiny_model_factory("llama", num_hidden_layers=4)
    assert main(["student", "--teacher", str(teacher), "--keep-layers", "2", "--out", str(tmp_path / "student")]) == 0
    assert "2 of 4 layers" in capsys.readouterr().out
    assert json.loads((tmp_path / "student" / "config.json").read_text())["num_hidden_layers"] == 2


def test_error_names_the_flag_of_a_parameter(tmp_path, caplog):
    """An error about a function parameter also names the flag that sets it."""
    args = ["distill", "--student", "s", "--rows", "r", "--store", "x", "--out", str(tmp_path / "o"), "--alpha", "2"]
    assert main(args) == 2
    assert "alpha=2.0 must be between 0 and 1" in caplog.text
    assert "(command-line flag: --alpha)" in caplog.text


def test_flag_hint_maps_renamed_parameters():
    parser = build_parser()
    assert flag_hint("learning_rate=-1 must be positive", parser, "distill") == " (command-line flag: --lr)"
    assert flag_hint("samples_per_prompt=0 and top_p=2", parser, "rollout") == " (command-line flags: --samples, --top-p)"
    # Names that no flag of the command sets get no hint.
    assert flag_hint("max_length=900 exceeds max_position_embeddings=512", parser, "distill") == (
        " (command-line flag: --max-length)")
    assert flag_hint("sft.batch_size=0 must be at least 1", parser, "pipeline") == ""


def test_printed_metrics_are_valid_json(capsys):
    from edgelm.cli import _print_json

    _print_json({"final_loss": float("nan"), "parts": [1.5, float("inf")], "name": "x"})
    assert json.loads(capsys.readouterr().out) == {"final_loss": None, "parts": [1.5, None], "name": "x"}


def test_interrupt_is_one_line(monkeypatch, caplog):
    import edgelm.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_data", interrupted)
    assert main(["data", "--input", "x", "--out", "y"]) == 130
    assert "interrupted" in caplog.text
    assert "Traceback" not in caplog.text


def test_interrupted_sft_names_resume(monkeypatch, caplog):
    import edgelm.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_sft", interrupted)
    assert main(["sft", "--model", "m", "--data", "d", "--out", "o", "--save-steps", "5"]) == 130
    assert "add --resume to the same command" in caplog.text
    caplog.clear()
    assert main(["sft", "--model", "m", "--data", "d", "--out", "o"]) == 130
    assert "no checkpoint was saved" in caplog.text


def test_out_folder_of_other_files_is_refused(tmp_path, caplog):
    (tmp_path / "records.jsonl").write_text("{}\n")
    assert main(["sft", "--model", "m", "--data", str(tmp_path / "records.jsonl"), "--out", str(tmp_path)]) == 2
    assert "contains files that edgelm did not write (records.jsonl)" in caplog.text
    assert (tmp_path / "records.jsonl").is_file()


@pytest.mark.parametrize("extra, status", [([], 1), (["--allow-parity-failure"], 0)])
def test_quantize_parity_failure_exit_status(monkeypatch, caplog, extra, status):
    import edgelm.export.quantize as quantize_module

    failed = {"variant": "int4", "parity": {"passed": False, "failures": ["top1_agreement 0.25 < 0.8"]}}
    monkeypatch.setattr(quantize_module, "quantize", lambda *args, **kwargs: failed)
    assert main(["quantize", "--onnx", "in", "--out", "out", "--scheme", "int4", *extra]) == status
    assert ("failed its parity check: top1_agreement 0.25 < 0.8" in caplog.text) == (status == 1)


def test_quantize_int8_parity_failure_names_int8_weight(monkeypatch, caplog):
    import edgelm.export.quantize as quantize_module

    failed = {"variant": "int8", "parity": {"passed": False, "failures": ["ppl_increase 0.5 > 0.25"]}}
    monkeypatch.setattr(quantize_module, "quantize", lambda *args, **kwargs: failed)
    assert main(["quantize", "--onnx", "in", "--out", "out", "--scheme", "int8"]) == 1
    assert "Another scheme: int8-weight keeps activations in fp32" in caplog.text


def test_parity_error_is_one_line(monkeypatch, caplog):
    import edgelm.export.quantize as quantize_module
    from edgelm.export.parity import ParityError

    def failing(*args, **kwargs):
        raise ParityError("int8 quantization of in failed its parity check")

    monkeypatch.setattr(quantize_module, "quantize", failing)
    assert main(["quantize", "--onnx", "in", "--out", "out", "--scheme", "int8"]) == 1
    assert "ParityError: int8 quantization of in failed" in caplog.text
    assert "Traceback" not in caplog.text


def test_out_folder_must_not_be_the_input(tmp_path, caplog):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert main(["export", "--model", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "is the --model folder" in caplog.text
    assert (tmp_path / "model.safetensors").is_file()


def test_out_folder_with_only_config_json(tmp_path, caplog):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["student", "--teacher", "t", "--out", str(tmp_path)]) == 2
    assert "contains files that edgelm did not write" in caplog.text


def test_quantize_passes_gptq_options(monkeypatch):
    import edgelm.export.quantize as quantize_module

    seen = {}

    def record(onnx_dir, out_dir, scheme, **options):
        seen.update(options)
        return {"variant": scheme, "parity": {"passed": True}}

    monkeypatch.setattr(quantize_module, "quantize", record)
    command = ["quantize", "--onnx", "in", "--out", "out", "--scheme", "int4", "--no-asymmetric", "--block-size", "128",
               "--method", "gptq", "--calibration-samples", "8"]
    assert main(command) == 0
    assert seen["method"] == "gptq"
    assert seen["calibration_samples"] == 8
    assert seen["symmetric"] is True
    assert seen["block_size"] == 128


@pytest.mark.parametrize("command, option, fields", [
    ("sft", "--data", "['id', 'prompt', 'reasoning']"),
    ("rollout", "--data", "['id', 'prompt']"),
    ("score", "--rows", "['id', 'sample', 'prompt_ids', 'response_ids']"),
    ("distill", "--rows", "['id', 'sample', 'prompt_ids', 'response_ids']"),
])
def test_wrong_jsonl_kind_is_one_line_error(tmp_path, caplog, command, option, fields):
    raw = tmp_path / "train.jsonl"
    raw.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n")
    required = {"sft": ["--model", "m", "--out", "o"], "rollout": ["--model", "m", "--out", "o"],
                "score": ["--teacher", "t", "--student", "s", "--out", "o"],
                "distill": ["--student", "s", "--store", "x", "--out", "o"]}[command]
    assert main([command, option, str(raw), *required]) == 2
    assert f"row 1 has no {fields} field" in caplog.text
    assert "Traceback" not in caplog.text


def test_eval_rejects_raw_gsm8k(tmp_path, caplog):
    raw = tmp_path / "test.jsonl"
    raw.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n")
    assert main(["eval", "--model", str(tmp_path), "--data", str(raw)]) == 2
    assert "edgelm data --input" in caplog.text


def test_bench_compare_is_routed_to_edge_bench(tmp_path, capsys):
    result = {"name": "tiny", "kind": "onnx", "prompt_tokens": 16, "new_tokens": 4, "ttft_ms": 10.0,
              "decode_tokens_per_s": 50.0, "decode_ms_median": 20.0, "decode_ms_p90": 22.0, "peak_rss_mb": 100.0}
    faster = {**result, "decode_tokens_per_s": 100.0}
    (tmp_path / "a.json").write_text(json.dumps({"card": {}, "results": [result]}))
    (tmp_path / "b.json").write_text(json.dumps({"card": {}, "results": [faster]}))
    assert main(["bench", "compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    assert "| 2.00 |" in capsys.readouterr().out
