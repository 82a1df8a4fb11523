"""End to end on a tiny teacher: every stage runs, an interrupted run resumes, a finished run skips all."""

import json
import shutil

import pytest
import yaml

from edgelm import pipeline
from edgelm.config import ConfigError, load_config

pytestmark = pytest.mark.slow


def write_gsm8k(path, count, offset=0):
    with open(path, "w") as f:
        for i in range(offset, offset + count):
            steps = 1 + i % 3
            answer = "\n".join(f"Step {s}: {i} + {s} = <<{i}+{s}={i + s}>>{i + s}." for s in range(1, steps + 1))
            f.write(json.dumps({"question": f"What is {i} plus {steps}?", "answer": f"{answer}\n#### {i + steps}"}) + "\n")


@pytest.fixture(scope="module")
def tiny_config(tiny_model_factory, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    write_gsm8k(root / "train.jsonl", 12)
    write_gsm8k(root / "test.jsonl", 4, offset=100)
    config = {
        "run_dir": str(root / "run"),
        "teacher": str(tiny_model_factory("llama", num_hidden_layers=4)),
        "student": {"keep_layers": 2},
        "data": {"train": str(root / "train.jsonl"), "test": str(root / "test.jsonl")},
        "sft": {"stages": [{"name": "reasoning", "mode": "reasoning", "records": 8, "learning_rate": 1e-3},
                           {"name": "fast", "mode": "fast", "records": 12, "learning_rate": 1e-3}],
                "batch_size": 4, "max_length": 256},
        "teacher_sft": {"records": 8, "learning_rate": 1e-3},
        "rollout": {"records": 6, "max_new_tokens": 6, "batch_size": 4},
        "distill": {"top_k": 8, "batch_size": 4},
        "export": {"quantize": ["int8", "int4"]},
        "ascend": {"max_prompt_len": 128, "kv_capacity": 160},
        "bench": {"prompt_tokens": 16, "new_tokens": 4, "runs": 1},
        "eval": {"records": 3},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_pipeline_resumes_after_failure_and_skips_when_done(tiny_config, monkeypatch):
    config = load_config(tiny_config)

    def interrupted(run):
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(pipeline, "stage_distill", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_pipeline(config)
    run = pipeline.Run(config)
    assert run.is_done("score")
    assert not run.is_done("distill")
    assert not run.path("distill").exists()
    sft_marker_time = run.marker("sft-fast").stat().st_mtime_ns
    score_metrics = json.loads(run.marker("score").read_text())
    assert score_metrics["seconds"] >= score_metrics["work_seconds"], "the stage's wall time must include its work"

    monkeypatch.undo()
    metrics = pipeline.run_pipeline(config)
    assert run.marker("sft-fast").stat().st_mtime_ns == sft_marker_time
    assert list(metrics) == pipeline.stage_names(config)

    # Every artifact the report promises is there.
    for path in ["report.md", "results.json", "distill/config.json", "export/onnx/model.onnx",
                 "export/int8/model.onnx", "export/int4/model.onnx", "export/ascend/atc.sh",
                 "teacher-topk/manifest.json", "rollouts.jsonl"]:
        assert run.path(path).exists(), path
    results = json.loads(run.path("results.json").read_text())
    evaluations = results["stages"]["eval"]
    for name in ["teacher", "teacher-adapted", "student-init", "sft-reasoning", "sft-fast", "distill", "onnx-fp32", "onnx-int8", "onnx-int4"]:
        assert set(evaluations[name]["loss"]) == {"reasoning", "fast"}, name
        assert 0.0 <= evaluations[name]["accuracy"]["fast"] <= 1.0
    # The fp32 export is the distilled model, so their held-out losses agree.
    assert evaluations["onnx-fp32"]["loss"]["fast"] == pytest.approx(evaluations["distill"]["loss"]["fast"], rel=1e-4)
    report = run.path("report.md").read_text()
    assert "Held-out loss" in report
    assert "onnx-int4" in report
    assert "Teacher adaptation (held-out, before -> after)" in report
    # The adapted teacher, not the loaded one, scored the rollouts.
    assert "teacher-sft" in json.loads(run.path("teacher-topk", "manifest.json").read_text())["teacher_id"]

    # --from distill keeps the evaluations of models it does not rebuild.
    pipeline.run_pipeline(config, start_from="distill", stop_after="distill")
    assert run.path("eval", "sft-fast.json").is_file()
    assert not run.path("eval", "distill.json").exists()
    assert not run.path("eval", "onnx-int4.json").exists()
    pipeline.run_pipeline(config)

    # A finished run skips every stage.
    def must_not_run(run):
        raise AssertionError("a finished stage ran again")

    for name in ["stage_data", "stage_student", "stage_rollout", "stage_teacher_sft", "stage_score", "stage_distill", "stage_export", "stage_eval"]:
        monkeypatch.setattr(pipeline, name, must_not_run)
    pipeline.run_pipeline(config)

    # A finished stage whose output was deleted runs again.
    shutil.rmtree(run.path("student-init"))
    monkeypatch.setattr(pipeline, "stage_student", lambda run: run.path("student-init").mkdir() or {"rebuilt": True})
    pipeline.run_pipeline(config, stop_after="student")
    assert run.metrics("student")["rebuilt"] is True


def test_student_with_other_tokenizer_fails_before_training(tiny_model_factory, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    teacher = tiny_model_factory("llama", num_hidden_layers=4)
    student = tmp_path / "student"
    shutil.copytree(teacher, student)
    tokenizer = AutoTokenizer.from_pretrained(student)
    tokenizer.add_tokens(["<extra_one>", "<extra_two>"])
    tokenizer.save_pretrained(student)
    write_gsm8k(tmp_path / "train.jsonl", 4)
    data = {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "train.jsonl")}
    config = load_config(_write(tmp_path, {"run_dir": str(tmp_path / "run"), "data": data, "teacher": str(teacher),
                                           "student": {"source": str(student)}}))
    with pytest.raises(ConfigError, match="student.source .*tokenizers differ"):
        pipeline.run_pipeline(config)
    assert not list((tmp_path / "run").glob("stages/*.json")), "a stage ran before the tokenizer check"


def test_unknown_stage_name_is_rejected(tmp_path):
    config = load_config(_write(tmp_path, {"run_dir": str(tmp_path / "run")}))
    with pytest.raises(ConfigError, match="unknown stage"):
        pipeline.run_pipeline(config, start_from="nope")
    assert not (tmp_path / "run").exists()


def test_second_pipeline_in_one_run_folder_is_refused(tmp_path):
    import fcntl

    config = load_config(_write(tmp_path, {"run_dir": str(tmp_path / "run")}))
    (tmp_path / "run").mkdir()
    with open(tmp_path / "run" / pipeline.LOCK_FILE, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ConfigError, match="is in use by another edgelm pipeline"):
            pipeline.run_pipeline(config)
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == [pipeline.LOCK_FILE]


def test_ascend_prompt_length_is_checked_before_training(tiny_model_dir, tmp_path):
    config = load_config(_write(tmp_path, {"run_dir": str(tmp_path / "run"), "teacher": str(tiny_model_dir),
                                           "ascend": {"max_prompt_len": 16, "kv_capacity": 64}}))
    with pytest.raises(ConfigError, match=r"ascend.max_prompt_len: 16 is shorter than every parity prompt"):
        pipeline.run_pipeline(config)
    assert not pipeline.Run(config).is_done("data")
    # The rejected value is not saved as the run's config, so a corrected rerun is not reported as a change.
    assert not (tmp_path / "run" / "config.yaml").exists()


def _write(tmp_path, data):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_config_change_needs_from_stage(tmp_path):
    write_gsm8k(tmp_path / "train.jsonl", 4)
    data = {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "train.jsonl")}
    path = _write(tmp_path, {"run_dir": str(tmp_path / "run"), "data": data})
    pipeline.run_pipeline(load_config(path), stop_after="data")

    changed = load_config(path, ["distill.alpha=0.9"])
    with pytest.raises(ConfigError, match="--from distill"):
        pipeline.run_pipeline(changed, stop_after="data")
    with pytest.raises(ConfigError, match="--from rollout"):
        pipeline.run_pipeline(load_config(path, ["distill.targets=label"]), stop_after="data")
    # A moved run folder is not a config change.
    saved = (tmp_path / "run" / "config.yaml").read_text()
    (tmp_path / "run" / "config.yaml").write_text(saved.replace(str(tmp_path / "run"), "/elsewhere/run"))
    pipeline._check_same_config(pipeline.Run(load_config(path)), pipeline.stage_names(changed), None)

    # Redoing from the stage that reads the key accepts the change and saves it.
    pipeline._check_same_config(pipeline.Run(changed), pipeline.stage_names(changed), "distill")
    assert "alpha: 0.9" in (tmp_path / "run" / "config.yaml").read_text()


def test_until_before_from_is_rejected_without_side_effects(tmp_path):
    config = load_config(_write(tmp_path, {"run_dir": str(tmp_path / "run")}))
    with pytest.raises(ConfigError, match="comes before"):
        pipeline.run_pipeline(config, start_from="distill", stop_after="data")
    assert not (tmp_path / "run").exists()


def test_quantize_settings_redo_from_quantize():
    from edgelm.config import PACKAGED_CONFIGS

    names = pipeline.stage_names(load_config(PACKAGED_CONFIGS / "default.yaml"))
    assert pipeline.first_stage_reading("export.int4_accuracy_level", names) == "quantize"
    assert pipeline.first_stage_reading("export.quantize", names) == "quantize"
    assert pipeline.first_stage_reading("export.sample_prompts", names) == "ascend"
    assert pipeline.first_stage_reading("export.opset", names) == "export"


def test_precision_settings_redo_their_stage():
    from edgelm.config import PACKAGED_CONFIGS

    names = pipeline.stage_names(load_config(PACKAGED_CONFIGS / "default.yaml"))
    assert pipeline.first_stage_reading("rollout.precision", names) == "rollout"
    assert pipeline.first_stage_reading("distill.score_precision", names) == "score"
    assert pipeline.first_stage_reading("distill.precision", names) == "distill"
