"""Run every stage of edgelm into one run folder, resuming at the first incomplete stage.

    edgelm pipeline configs/default.yaml              # run or resume
    edgelm pipeline configs/default.yaml --from distill   # redo distill and everything after it

Each stage writes its outputs atomically and then a marker `stages/<stage>.json` with its
metrics and wall time. A stage whose marker exists is skipped, so an interrupted run resumes
where it stopped and no stage reads half-written files.

Run folder:
    config.yaml          the resolved config the run started with
    data/                train.jsonl and test.jsonl records
    student-init/        the student before training (HF folder)
    sft/<stage>/         model after each curriculum SFT stage
    rollouts.jsonl       sequences the teacher scores (student answers, or references in label mode)
    teacher-topk/        stored teacher top-k logits, shards and manifest
    distill/             the distilled student
    export/onnx, export/int8, export/int4, export/fp16, export/fused-int4, export/ascend
    eval/<model>.json    held-out loss and accuracy per model
    stages/<stage>.json  each stage's metrics; stages/bench.json has latency and memory per backend
    report.md, results.json
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml

from edgelm.config import ConfigError, PipelineConfig
from edgelm.files import read_jsonl, write_json, write_jsonl, write_text

log = logging.getLogger(__name__)

# A file in the run folder that a running pipeline locks exclusively.
LOCK_FILE = ".lock"


class Run:
    """Paths and stage markers of one run folder."""

    def __init__(self, config: PipelineConfig):
        self.config = config
        self.dir = Path(config.run_dir)

    def path(self, *parts: str) -> Path:
        return self.dir.joinpath(*parts)

    def marker(self, stage: str) -> Path:
        return self.path("stages", f"{stage}.json")

    def is_done(self, stage: str) -> bool:
        return self.marker(stage).is_file()

    def metrics(self, stage: str) -> dict:
        return json.loads(self.marker(stage).read_text())

    @property
    def sft_final(self) -> Path:
        return self.path("sft", self.config.sft.stages[-1].name)

    def records(self, split: str) -> list[dict]:
        return read_jsonl(self.path("data", f"{split}.jsonl"))


# ---------------------------------------------------------------- stages


def stage_data(run: Run) -> dict:
    from edgelm.train.data import load_records

    # Whole files, so that later stages can take more or fewer records without redoing this one.
    config = run.config
    train = load_records(config.data.train, "train")
    test = load_records(config.data.test, "test")
    write_jsonl(run.path("data", "train.jsonl"), train)
    write_jsonl(run.path("data", "test.jsonl"), test)
    return {"train_records": len(train), "test_records": len(test)}


def stage_student(run: Run) -> dict:
    from edgelm.train.models import count_parameters, load_model, make_student, save_model

    config = run.config
    if config.student.source:
        student, tokenizer = load_model(config.student.source)
        teacher_parameters = None
    else:
        teacher, tokenizer = load_model(config.teacher)
        student = make_student(teacher, config.student.keep_layers)
        teacher_parameters = count_parameters(teacher)
    save_model(student, tokenizer, run.path("student-init"))
    return {"student_parameters": count_parameters(student), "teacher_parameters": teacher_parameters,
            "student_layers": student.config.num_hidden_layers}


def sft_settings(config: PipelineConfig) -> dict:
    """run_sft_stage keywords shared by the student's SFT stages and the teacher's adaptation."""
    sft = config.sft
    return dict(
        batch_size=sft.batch_size, grad_accum=sft.grad_accum, max_length=sft.max_length, overlong=sft.overlong,
        warmup_ratio=sft.warmup_ratio, seed=config.seed, difficulty=sft.difficulty, pacing=sft.resolved_pacing,
        buckets=sft.buckets, initial_competence=sft.initial_competence, full_competence_at=sft.full_competence_at,
        packing=sft.packing, teacher=config.teacher, scoring_batch_size=sft.scoring_batch_size,
        save_steps=sft.save_steps or None, save_total_limit=sft.save_total_limit,
    )


def make_sft_stage(index: int) -> Callable[[Run], dict]:
    def stage_sft(run: Run) -> dict:
        from edgelm.train.sft import run_sft_stage

        config = run.config
        stage = config.sft.stages[index]
        source = run.path("student-init") if index == 0 else run.path("sft", config.sft.stages[index - 1].name)
        records = run.records("train")[: stage.records]
        # resume=True continues from the stage folder's newest checkpoint when an earlier attempt
        # was interrupted with the same inputs and settings; otherwise the stage starts over.
        return run_sft_stage(
            str(source), records, run.path("sft", stage.name),
            mode=stage.mode, fast_ratio=stage.fast_ratio, stage_name=f"sft-{stage.name}", epochs=stage.epochs,
            learning_rate=stage.learning_rate, resume=True, **sft_settings(config),
        )

    return stage_sft


def stage_rollout(run: Run) -> dict:
    from edgelm.train.rollout import rollout_for_targets

    config = run.config
    return rollout_for_targets(
        str(run.sft_final), run.records("train")[: config.rollout.records], run.path("rollouts.jsonl"),
        targets=config.distill.targets, mode=config.rollout.mode,
        samples_per_prompt=config.rollout.samples_per_prompt, max_new_tokens=config.rollout.max_new_tokens,
        temperature=config.rollout.temperature, top_p=config.rollout.top_p, batch_size=config.rollout.batch_size,
        seed=config.seed, engine=config.rollout.engine, chunk_rows=config.rollout.chunk_rows,
        precision=config.rollout.precision,
    )


def stage_teacher_sft(run: Run) -> dict:
    """Adapt the teacher to the task's answer format (one SFT stage) before it scores."""
    from edgelm.train.sft import run_sft_stage

    config = run.config
    adapt = config.teacher_sft
    if not adapt.enabled:
        return {"skipped": "teacher_sft.enabled is false; the teacher scores as loaded"}
    records = run.records("train")[: adapt.records]
    # The same data order, packing and checkpointing as the student's SFT stages.
    return run_sft_stage(
        config.teacher, records, run.path("teacher-sft"), mode=adapt.mode, stage_name="teacher-sft",
        epochs=adapt.epochs, learning_rate=adapt.learning_rate, resume=True, **sft_settings(config),
    )


def scoring_teacher(run: Run) -> str:
    """Return the teacher that scores: the adapted one when teacher_sft is enabled."""
    return str(run.path("teacher-sft")) if run.config.teacher_sft.enabled else run.config.teacher


def stage_score(run: Run) -> dict:
    from edgelm.train.models import load_model, load_tokenizer, precision_dtype
    from edgelm.train.score import check_teacher_and_student, score_rows, teacher_identity

    config = run.config
    source = scoring_teacher(run)
    teacher, teacher_tokenizer = load_model(source, dtype=precision_dtype(config.distill.score_precision))
    # The rows were tokenized by the student, so its tokenizer must be the teacher's.
    vocab_size = check_teacher_and_student(
        teacher, teacher_tokenizer, load_tokenizer(str(run.sft_final)), str(run.sft_final)
    )
    return score_rows(
        teacher, read_jsonl(run.path("rollouts.jsonl")), run.path("teacher-topk"),
        top_k=config.distill.top_k, batch_size=config.distill.score_batch_size,
        teacher_id=teacher_identity(source, teacher), vocab_size=vocab_size, tokenizer=teacher_tokenizer,
    )


def stage_distill(run: Run) -> dict:
    from edgelm.train.distill import distill

    config = run.config.distill
    return distill(
        str(run.sft_final), run.path("rollouts.jsonl"), run.path("teacher-topk"), run.path("distill"),
        alpha=config.alpha, loss=config.loss, beta=config.beta, temperature=config.temperature,
        targets=config.targets, label_fraction=config.label_fraction, learning_rate=config.learning_rate,
        epochs=config.epochs, batch_size=config.batch_size, grad_accum=config.grad_accum,
        max_length=run.config.sft.max_length, precision=config.precision, group_by_length=config.group_by_length,
        seed=run.config.seed,
    )


def _heldout_texts(run: Run) -> list[str]:
    """Return chat transcripts of the last export.heldout_records test records, for parity teacher forcing."""
    from edgelm.export.parity import chat_heldout_texts
    from edgelm.train.models import load_tokenizer

    records = run.records("test")[-run.config.export.heldout_records:]
    return chat_heldout_texts(records, load_tokenizer(str(run.path("distill"))))


def stage_export(run: Run) -> dict:
    from edgelm.export.onnx_export import export_onnx

    config = run.config.export
    thresholds = config.parity.for_kind("fp32")
    thresholds["max_logits_diff"] = min(thresholds["max_logits_diff"], config.max_logits_diff)
    return export_onnx(run.path("distill"), run.path("export", "onnx"), opset=config.opset,
                       thresholds=thresholds, heldout_texts=_heldout_texts(run))


def stage_quantize(run: Run) -> dict:
    from edgelm.export.quantize import quantize

    config = run.config.export
    heldout = _heldout_texts(run)
    options = {
        "int4": {"block_size": config.int4_block_size, "symmetric": config.int4_symmetric,
                 "accuracy_level": config.int4_accuracy_level, "lm_head": config.int4_lm_head,
                 "method": config.int4_method},
        "int8-static": {"calibration_samples": config.calibration_samples},
    }
    calibration = [record["prompt"] for record in run.records("train")[: config.calibration_samples]]
    results = {}
    for scheme in config.quantize:
        results[scheme] = quantize(run.path("export", "onnx"), run.path("export", scheme), scheme, strict=True,
                                   thresholds=config.parity.for_kind(scheme), heldout_texts=heldout,
                                   calibration_texts=calibration, **options.get(scheme, {}))
    if config.fused_int4:
        results["fused-int4"] = _fused_int4(run, options["int4"])
    return results


def _fused_int4(run: Run, int4_options: dict) -> dict:
    """Build the fused GroupQueryAttention graph in fp32, then keep only its int4 copy."""
    from transformers import AutoConfig

    from edgelm.export.fused_graph import check_supported, export_fused, quantize_fused

    try:
        check_supported(AutoConfig.from_pretrained(run.path("distill")))
    except ValueError as error:
        log.info("no fused-int4 variant: %s", error)
        return {"skipped": str(error)}
    options = {key: value for key, value in int4_options.items() if value is not None}
    # A killed run leaves its temporary fp32 graph behind. The run folder's lock rules out a live one.
    for stale in run.path("export").glob("fused-fp32-*"):
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="fused-fp32-", dir=run.path("export")) as fp32_dir:
        export_fused(run.path("distill"), fp32_dir)
        return quantize_fused(fp32_dir, run.path("export", "fused-int4"), **options)


def stage_ascend(run: Run) -> dict:
    """Export the static Ascend graphs (when enabled), then write export/samples.md for every variant."""
    from edgelm.export.ascend import export_ascend
    from edgelm.export.atc import AtcOptions
    from edgelm.export.samples import SAMPLES_FILE, greedy_samples, write_samples

    config = run.config.ascend
    export_config = run.config.export
    if config.enabled:
        options = AtcOptions(soc_version=config.soc_version, precision_mode_v2=config.precision_mode_v2,
                             keep_norms_fp32=config.keep_norms_fp32, log_level=config.atc_log or "null",
                             prefill_gears=tuple(config.prefill_gears),
                             te_parallel_compiler=config.te_parallel_compiler)
        result = export_ascend(
            run.path("distill"), run.path("export", "ascend"), max_prompt_len=config.max_prompt_len,
            kv_capacity=config.kv_capacity, soc_version=config.soc_version, opset=export_config.opset,
            dynamic_dir=run.path("export", "onnx"), atc_options=options, heldout_texts=_heldout_texts(run),
            thresholds=export_config.parity.for_kind("ascend"),
        )
    else:
        result = {"skipped": "ascend.enabled is false"}
    if export_config.sample_prompts:
        variants = {"onnx-fp32": run.path("export", "onnx")}
        variants.update({f"onnx-{scheme}": run.path("export", scheme) for scheme in export_config.quantize})
        samples = greedy_samples(run.path("distill"), variants, run.path("export", "ascend") if config.enabled else None,
                                 run.records("test")[: export_config.sample_prompts], export_config.sample_new_tokens)
        write_samples(run.path("export", SAMPLES_FILE), samples)
        # Relative to the run folder, where report.md links it, so a copied run folder keeps the link.
        result["samples"] = {"path": f"export/{SAMPLES_FILE}", "agreement": samples["agreement"]}
    return result


def eval_targets(run: Run) -> list[tuple[str, str, Path | str, str]]:
    """Return (name, kind, location, stage that builds it) of every model evaluated, in report order."""
    config = run.config
    targets = [("teacher", "pytorch", config.teacher, "student")]
    if config.teacher_sft.enabled:
        targets.append(("teacher-adapted", "pytorch", run.path("teacher-sft"), "teacher-sft"))
    targets.append(("student-init", "pytorch", run.path("student-init"), "student"))
    targets += [(f"sft-{stage.name}", "pytorch", run.path("sft", stage.name), f"sft-{stage.name}") for stage in config.sft.stages]
    targets += [("distill", "pytorch", run.path("distill"), "distill"),
                ("onnx-fp32", "onnx", run.path("export", "onnx"), "export")]
    targets += [(f"onnx-{scheme}", "onnx", run.path("export", scheme), "quantize") for scheme in config.export.quantize]
    if config.export.fused_int4 and run.path("export", "fused-int4", "edgelm_export.json").is_file():
        targets.append(("onnx-fused-int4", "onnx", run.path("export", "fused-int4"), "quantize"))
    return targets


def stage_eval(run: Run) -> dict:
    from edgelm.train.evaluate import OnnxBackend, TorchBackend, evaluate
    from edgelm.train.models import load_model, load_tokenizer

    config = run.config
    records = run.records("test")[: config.eval.records]
    tokenizer = load_tokenizer(str(run.path("distill")))
    # A cached result is reused only when it was computed with these settings.
    settings = {"record_ids": [record.get("id", index) for index, record in enumerate(records)],
                "loss_modes": list(config.eval.loss_modes), "accuracy_modes": list(config.eval.accuracy_modes),
                "max_length": config.sft.max_length}
    results = {}
    for name, kind, location, _ in eval_targets(run):
        cached = run.path("eval", f"{name}.json")
        if cached.is_file():
            result = json.loads(cached.read_text())
            if result.get("settings") == settings:
                results[name] = result
                continue
            log.info("evaluating %s again: its cached result used other settings", name)
        if kind == "pytorch":
            model, _ = load_model(str(location))
            backend = TorchBackend(model, tokenizer)
        else:
            backend = OnnxBackend(location)
        results[name] = evaluate(
            backend, tokenizer, records, loss_modes=tuple(config.eval.loss_modes),
            accuracy_modes=tuple(config.eval.accuracy_modes), max_length=config.sft.max_length, name=name,
        )
        results[name]["settings"] = settings
        write_json(cached, results[name])
    return results


def stage_bench(run: Run) -> dict:
    from edgelm.edge_bench import run_benchmark

    config = run.config.bench
    targets = [{"name": "pytorch-fp32", "kind": "pytorch", "path": str(run.path("distill"))},
               {"name": "onnx-fp32", "kind": "onnx", "path": str(run.path("export", "onnx"))}]
    targets += [{"name": f"onnx-{scheme}", "kind": "onnx", "path": str(run.path("export", scheme))}
                for scheme in run.config.export.quantize]
    if run.config.export.fused_int4 and run.path("export", "fused-int4", "edgelm_export.json").is_file():
        targets.append({"name": "onnx-fused-int4", "kind": "onnx", "path": str(run.path("export", "fused-int4"))})
    return run_benchmark(targets, prompt_tokens=config.prompt_tokens, new_tokens=config.new_tokens,
                         runs=config.runs, threads=config.threads)


def stage_report(run: Run) -> dict:
    from edgelm.report import build_results, render_report

    results = build_results(run, stage_names(run.config))
    write_json(run.path("results.json"), results)
    write_text(run.path("report.md"), render_report(results))
    return {"report": str(run.path("report.md"))}


# ---------------------------------------------------------------- driver


def stages(config: PipelineConfig) -> list[tuple[str, Callable[[Run], dict]]]:
    """Return the ordered (name, function) pairs of the stages that `config` runs."""
    plan = [("data", stage_data), ("student", stage_student)]
    plan += [(f"sft-{stage.name}", make_sft_stage(i)) for i, stage in enumerate(config.sft.stages)]
    plan += [("rollout", stage_rollout), ("teacher-sft", stage_teacher_sft), ("score", stage_score), ("distill", stage_distill),
             ("export", stage_export), ("quantize", stage_quantize), ("ascend", stage_ascend),
             ("eval", stage_eval), ("bench", stage_bench), ("report", stage_report)]
    return plan


def stage_names(config: PipelineConfig) -> list[str]:
    return [name for name, _ in stages(config)]


def stage_outputs(run: Run) -> dict[str, list[Path]]:
    """Return the files or folders that later stages read, for the stages that write them."""
    config = run.config
    outputs = {"data": [run.path("data", "train.jsonl"), run.path("data", "test.jsonl")],
               "student": [run.path("student-init")], "rollout": [run.path("rollouts.jsonl")],
               "score": [run.path("teacher-topk")], "distill": [run.path("distill")],
               "export": [run.path("export", "onnx")],
               "quantize": [run.path("export", scheme) for scheme in config.export.quantize]}
    outputs.update({f"sft-{stage.name}": [run.path("sft", stage.name)] for stage in config.sft.stages})
    if config.teacher_sft.enabled:
        outputs["teacher-sft"] = [run.path("teacher-sft")]
    if config.ascend.enabled:
        outputs["ascend"] = [run.path("export", "ascend")]
    return outputs


# Outputs that a stage fills incrementally and reuses on resume. `--from` deletes them, so a
# re-run stage starts empty instead of reusing results computed from older inputs.
RESUMABLE_OUTPUTS = {"score": "teacher-topk"}


def _changed_keys(saved, current, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = sorted(set(saved) | set(current))
        return [changed for key in keys for changed in _changed_keys(saved.get(key), current.get(key), f"{prefix}{key}.")]
    return [] if saved == current else [prefix.rstrip(".")]


def first_stage_reading(key: str, names: list[str]) -> str:
    """Return the earliest stage whose output depends on config `key` (dotted)."""
    section, _, field = key.partition(".")
    if section == "distill":
        stage = {"targets": "rollout", "top_k": "score", "score_batch_size": "score",
                 "score_precision": "score"}.get(field, "distill")
    elif section == "export" and (field == "quantize" or field.startswith(("int4_", "fused_", "calibration_"))):
        stage = "quantize"
    elif section == "export" and field.startswith("sample_"):
        stage = "ascend"  # the ascend stage writes export/samples.md for every variant
    elif section == "sft":
        stage = next(name for name in names if name.startswith("sft-"))
    else:
        stage = {"teacher": "student", "student": "student", "rollout": "rollout", "export": "export",
                 "ascend": "ascend", "eval": "eval", "bench": "bench", "teacher_sft": "teacher-sft"}.get(section, "data")
    return stage


def _check_same_config(run: Run, names: list[str], start_from: str | None) -> None:
    """Save the config on the first run; later, allow changes only from the stage that reads them on.

    run_dir is left out of the comparison, so a moved or copied run folder resumes.
    """
    saved_path = run.path("config.yaml")
    current = run.config.to_dict()
    if saved_path.is_file():
        saved = yaml.safe_load(saved_path.read_text())
        changed = [key for key in _changed_keys(saved, current) if key != "run_dir"]
        if not changed:
            return
        earliest = min((first_stage_reading(key, names) for key in changed), key=names.index)
        if start_from is None or names.index(start_from) > names.index(earliest):
            raise ConfigError(
                f"run_dir {run.dir} was started with a different config (changed: {', '.join(changed)}); "
                f"re-run with --from {earliest} to redo the stages that read these keys, set another run_dir, "
                f"or restore the settings saved in {saved_path}"
            )
        log.info("config changed (%s); stages from %s on run again", ", ".join(changed), start_from)
    write_text(saved_path, yaml.safe_dump(current, sort_keys=False))


def run_pipeline(config: PipelineConfig, start_from: str | None = None, stop_after: str | None = None) -> dict:
    """Run the stages in order, skipping those already complete; return each stage's metrics."""
    run = Run(config)
    names = stage_names(config)
    for option, value in (("--from", start_from), ("--until", stop_after)):
        if value is not None and value not in names:
            raise ConfigError(f"{option} {value!r}: unknown stage; stages are {', '.join(names)}")
    if start_from and stop_after and names.index(stop_after) < names.index(start_from):
        raise ConfigError(f"--until {stop_after} comes before --from {start_from}; stages run in the order {', '.join(names)}")
    run.dir.mkdir(parents=True, exist_ok=True)
    with _run_lock(run.dir):
        return _run_stages(config, run, names, start_from, stop_after)


@contextlib.contextmanager
def _run_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the run folder, so that two pipelines never share one."""
    with open(run_dir / LOCK_FILE, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"run_dir {run_dir} is in use by another edgelm pipeline (it has locked {run_dir / LOCK_FILE}); "
                              f"wait for that run to end, or set another run_dir") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run_stages(config: PipelineConfig, run: Run, names: list[str], start_from: str | None,
                stop_after: str | None) -> dict:
    # Checks of the config itself come before _check_same_config saves it as the run's config.
    if "ascend" in names and config.ascend.enabled and not run.is_done("ascend"):
        _check_ascend_prompt_len_early(config)
    _check_same_config(run, names, start_from)
    if start_from is not None:
        rerun = names[names.index(start_from) :]
        for name in rerun:
            run.marker(name).unlink(missing_ok=True)
            if name in RESUMABLE_OUTPUTS:
                shutil.rmtree(run.path(RESUMABLE_OUTPUTS[name]), ignore_errors=True)
        # Evaluations of models that no re-run stage rebuilds stay valid, unless eval itself is redone.
        for target, _, _, producer in eval_targets(run):
            if producer in rerun or start_from == "eval":
                run.path("eval", f"{target}.json").unlink(missing_ok=True)

    if "score" in names and not run.is_done("score"):
        _check_tokenizers_early(config)

    metrics = {}
    outputs = stage_outputs(run)
    for name, function in stages(config):
        missing = [path for path in outputs.get(name, []) if not path.exists()]
        if run.is_done(name) and missing and "skipped" not in run.metrics(name):
            log.warning("stage %s is marked complete but its output %s is missing; running it again", name, missing[0])
            run.marker(name).unlink()
        if run.is_done(name):
            log.info("stage %s: complete, skipped", name)
            metrics[name] = run.metrics(name)
        else:
            log.info("stage %s: started", name)
            start = time.perf_counter()
            result = dict(function(run) or {})
            seconds = time.perf_counter() - start
            # "seconds" is the stage's wall time. A stage that times part of its work keeps that as work_seconds.
            if "seconds" in result:
                result["work_seconds"] = result.pop("seconds")
            metrics[name] = {"seconds": seconds, **result}
            write_json(run.marker(name), metrics[name])
            log.info("stage %s: done in %.1f s", name, seconds)
        if name == stop_after:
            break
    return metrics


def _check_ascend_prompt_len_early(config: PipelineConfig) -> None:
    """Fail before training when no parity prompt fits the static graphs' ascend.max_prompt_len."""
    from edgelm.export.onnx_export import parity_prompts
    from edgelm.train.models import load_tokenizer

    shortest = min(len(prompt) for prompt in parity_prompts(load_tokenizer(config.student.source or config.teacher)))
    if config.ascend.max_prompt_len < shortest:
        raise ConfigError(f"ascend.max_prompt_len: {config.ascend.max_prompt_len} is shorter than every parity prompt "
                          f"(the shortest has {shortest} tokens), so the ascend stage could not check the static graphs; "
                          f"raise it to {shortest} or more")


def _check_tokenizers_early(config: PipelineConfig) -> None:
    """Compare a separately given student's tokenizer with the teacher's before any stage trains.

    The score stage checks this too, but only after SFT and rollout have run. A student built
    from the teacher (no student.source) shares its tokenizer, so nothing is loaded then.
    """
    if not config.student.source:
        return
    from edgelm.train.models import load_tokenizer
    from edgelm.train.preflight import check_same_tokenizer, tokenizer_fingerprint

    teacher = tokenizer_fingerprint(load_tokenizer(config.teacher))
    student = tokenizer_fingerprint(load_tokenizer(config.student.source))
    try:
        check_same_tokenizer(teacher, student)
    except ValueError as error:
        raise ConfigError(f"teacher {config.teacher!r} and student.source {config.student.source!r}: {error}") from error


def resolved_config_text(config: PipelineConfig) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)
