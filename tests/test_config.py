from pathlib import Path

import pytest

from edgelm.config import ConfigError, PipelineConfig, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_default_yaml_matches_dataclass_defaults():
    assert load_config(CONFIGS / "default.yaml") == PipelineConfig()


@pytest.mark.parametrize("text, key", [
    ("sft:\n  batchsize: 3\n", "sft.batchsize: unknown key"),
    ("sft:\n  stages:\n    - name: a\n      mode: slow\n", "sft.stages[0].mode"),
    ("distill:\n  alpha: 1.5\n", "distill.alpha"),
    ("rollout:\n  records: many\n", "rollout.records: expected int"),
    ("export:\n  quantize: [int3]\n", "export.quantize"),
    ("ascend:\n  max_prompt_len: 256\n  kv_capacity: 128\n", "ascend.kv_capacity"),
    ("sft:\n  stages:\n    - name: a\n    - name: a\n", "sft.stages: stage names must be unique"),
    ("ascend:\n  soc_version: Foo123\n", "ascend.soc_version: must be one of"),
    ("export:\n  int4_method: awq\n", "export.int4_method: must be 'rtn' or 'gptq'"),
    ("export:\n  int4_method: gptq\n", "export.int4_method: gptq writes symmetric int4 only"),
    ("rollout:\n  precision: int8\n", "rollout.precision: must be one of"),
    ("distill:\n  score_precision: fp8\n", "distill.score_precision: must be one of"),
    ("distill:\n  temperature: .inf\n", "distill.temperature: must be a finite number"),
    ("sft:\n  stages:\n    - name: a\n      epochs: .nan\n", "sft.stages[0].epochs: must be a finite number"),
    ("seed: -1\n", "seed: must be in [0, 2**32 - 1]"),
    ("distill:\n  alpha: 0.3\ndistill:\n  beta: 0.1\n", "distill: given twice in one mapping (line 3)"),
])
def test_invalid_values_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, text))
    assert key in str(error.value)


def test_overrides_and_scientific_notation(tmp_path):
    config = load_config(write(tmp_path, "distill:\n  learning_rate: 3e-4\n"), ["sft.batch_size=4", "student.source=foo/bar"])
    assert config.distill.learning_rate == pytest.approx(3e-4)
    assert config.sft.batch_size == 4
    assert config.student.source == "foo/bar"


def test_one_threshold_override_keeps_the_kinds_other_thresholds(tmp_path):
    config = load_config(write(tmp_path, "export:\n  parity:\n    int4: {max_logits_diff: 40}\n"),
                         ["export.parity.int8.min_top1_agreement=0.5"])
    default = PipelineConfig().export.parity
    assert config.export.parity.int4.max_logits_diff == 40
    assert config.export.parity.int4.min_top1_agreement == default.int4.min_top1_agreement
    assert config.export.parity.int8.max_ppl_increase == default.int8.max_ppl_increase
    assert config.export.parity.int8.min_top1_agreement == 0.5


def test_yaml_merge_keys_still_work(tmp_path):
    text = "sft:\n  stages:\n    - &first {name: a, mode: reasoning, epochs: 2}\n    - {<<: *first, name: b}\n"
    stages = load_config(write(tmp_path, text)).sft.stages
    assert [(stage.name, stage.epochs) for stage in stages] == [("a", 2.0), ("b", 2.0)]


def test_atc_log_accepts_yaml_null(tmp_path):
    assert load_config(write(tmp_path, "ascend:\n  atc_log: null\n")).ascend.atc_log is None


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
