"""The `edgelm` command: one subcommand per stage, plus `pipeline` to run them all.

    edgelm pipeline configs/default.yaml        # every stage into runs/default, resumable
    edgelm generate runs/default/export/int4 "What is 12*7?"   # needs only the runtime install

Heavy libraries (torch, transformers) are imported inside the subcommands that need them, so
`edgelm generate` and `edgelm bench` on ONNX targets work on a runtime-only install.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from pathlib import Path


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text}")
    return value


def _print_json(data) -> None:
    """Print `data` as JSON, with null for NaN and infinities (which JSON cannot hold)."""
    print(json.dumps(_finite_or_none(data), indent=2, default=str))


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    return value


# ---------------------------------------------------------------- subcommands


def cmd_pipeline(args) -> int:
    from edgelm.config import load_config, resolve_config_path
    from edgelm.pipeline import resolved_config_text, run_pipeline

    config = load_config(resolve_config_path(args.config), args.set)
    logging.getLogger("edgelm").info("resolved config:\n%s", resolved_config_text(config))
    metrics = run_pipeline(config, start_from=args.start_from, stop_after=args.until)
    print(f"report: {config.run_dir}/report.md" if "report" in metrics else f"stopped after {list(metrics)[-1]}")
    return 0


def cmd_data(args) -> int:
    from edgelm.files import write_jsonl
    from edgelm.train.data import load_records

    records = load_records(args.input, args.split, limit=args.limit)
    write_jsonl(args.out, records)
    print(f"{len(records)} records -> {args.out}")
    return 0


# Fields of every record that `edgelm data` writes, and how to make a records file from raw data.
RECORD_FIELDS = ("id", "prompt", "reasoning", "answer")
RECORDS_FIX = "convert raw data first with `edgelm data --input FILE --out records.jsonl`"


def cmd_student(args) -> int:
    from edgelm.train.models import count_parameters, load_model, make_student, save_model

    teacher, tokenizer = load_model(args.teacher)
    student = make_student(teacher, args.keep_layers)
    save_model(student, tokenizer, args.out)
    print(f"student: {student.config.num_hidden_layers} of {teacher.config.num_hidden_layers} layers, "
          f"{count_parameters(student) / 1e6:.1f}M of {count_parameters(teacher) / 1e6:.1f}M parameters -> {args.out}")
    return 0


def cmd_sft(args) -> int:
    from edgelm.files import read_jsonl_with
    from edgelm.train.sft import run_sft_stage

    records = read_jsonl_with(args.data, RECORD_FIELDS, "records", RECORDS_FIX)[: args.records]
    metrics = run_sft_stage(
        args.model, records, args.out, mode=args.mode, fast_ratio=args.fast_ratio, epochs=args.epochs,
        learning_rate=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum, max_length=args.max_length,
        overlong=args.overlong, seed=args.seed, difficulty=args.difficulty,
        pacing="none" if args.no_curriculum else args.pacing, buckets=args.buckets,
        initial_competence=args.initial_competence, full_competence_at=args.full_competence_at,
        packing=args.packing, teacher=args.teacher, save_steps=args.save_steps, resume=args.resume,
    )
    _print_json({k: v for k, v in metrics.items() if k != "loss_history"})
    return 0


def cmd_rollout(args) -> int:
    from edgelm.files import read_jsonl_with
    from edgelm.train.rollout import rollout_for_targets

    records = read_jsonl_with(args.data, ("id", "prompt"), "records", RECORDS_FIX)[: args.records]
    _print_json(rollout_for_targets(
        args.model, records, args.out, targets=args.targets, mode=args.mode, samples_per_prompt=args.samples,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        batch_size=args.batch_size, seed=args.seed, engine=args.engine, chunk_rows=args.chunk_rows,
        precision=args.precision,
    ))
    return 0


def cmd_score(args) -> int:
    from edgelm.files import read_jsonl_with
    from edgelm.train.models import load_model, load_tokenizer, precision_dtype
    from edgelm.train.rollout import ROW_FIELDS, ROWS_FIX
    from edgelm.train.score import check_teacher_and_student, score_rows, teacher_identity

    rows = read_jsonl_with(args.rows, ROW_FIELDS, "rollout rows", ROWS_FIX)
    teacher, tokenizer = load_model(args.teacher, dtype=precision_dtype(args.precision))
    # The rows hold the student's token ids, so the student's tokenizer must be the teacher's.
    vocab_size = check_teacher_and_student(teacher, tokenizer, load_tokenizer(args.student), args.student)
    _print_json(score_rows(teacher, rows, args.out, top_k=args.top_k,
                           batch_size=args.batch_size, teacher_id=teacher_identity(args.teacher, teacher),
                           vocab_size=vocab_size, tokenizer=tokenizer))
    return 0


def cmd_distill(args) -> int:
    from edgelm.train.distill import distill

    _print_json(distill(
        args.student, args.rows, args.store, args.out, alpha=args.alpha, loss=args.loss, beta=args.beta,
        temperature=args.temperature, targets=args.targets, label_fraction=args.label_fraction,
        learning_rate=args.lr, epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
        max_length=args.max_length, precision=args.precision, seed=args.seed,
    ))
    return 0


def cmd_export(args) -> int:
    from edgelm.export.onnx_export import export_onnx

    _print_json(export_onnx(args.model, args.out, opset=args.opset, max_logits_diff=args.max_logits_diff))
    return 0


# Subcommands whose --out folder is replaced as a whole when they finish.
FOLDER_OUTPUTS = ("student", "sft", "distill", "export", "quantize", "ascend")


def _interrupted_message(args) -> str:
    """Return what to run after Ctrl-C, which depends on how the command resumes."""
    command = args.command
    if command == "pipeline":
        return "interrupted; finished pipeline stages are kept, so the same command resumes"
    if command == "sft" and not args.save_steps:
        return ("interrupted; no checkpoint was saved, so running the command again starts over "
                "(add --save-steps N to save checkpoints that --resume continues from)")
    if command == "sft":
        return "interrupted; add --resume to the same command to continue from its last checkpoint"
    if command in ("rollout", "score"):
        return "interrupted; rows already written are kept, so the same command skips them"
    return "interrupted"


def cmd_quantize(args) -> int:
    from edgelm.export.onnx_export import MANIFEST_NAME, read_manifest
    from edgelm.export.quantize import MORE_ACCURATE, quantize

    options = {}
    if args.scheme == "int4":
        options = {"block_size": args.block_size, "symmetric": not args.asymmetric, "lm_head": args.lm_head,
                   "method": args.method, "calibration_samples": args.calibration_samples}
        if args.accuracy_level is not None:
            options["accuracy_level"] = args.accuracy_level
    manifest_path = Path(args.onnx) / MANIFEST_NAME
    if manifest_path.is_file() and read_manifest(args.onnx).get("kv_cache") == "gqa":
        # The fused graph has its own parity check, against the fused fp32 graph.
        from edgelm.export.fused_graph import quantize_fused

        if args.scheme != "int4":
            logging.getLogger("edgelm").error("%s is a fused GroupQueryAttention export, which is quantized to int4 "
                                              "only; use --scheme int4, or quantize the `edgelm export` folder",
                                              args.onnx)
            return 2
        manifest = quantize_fused(args.onnx, args.out, **options)
    else:
        manifest = quantize(args.onnx, args.out, args.scheme, **options)
    _print_json(manifest)
    parity = manifest.get("parity") or {}
    if parity.get("passed") is False and not args.allow_parity_failure:
        logging.getLogger("edgelm").error(
            "the %s variant in %s failed its parity check: %s. The folder is kept (see parity.json); pass "
            "--allow-parity-failure to accept it with exit status 0, or choose more accurate settings%s",
            args.scheme, args.out, "; ".join(parity.get("failures", [])),
            f". Another scheme: {MORE_ACCURATE[args.scheme]}" if args.scheme in MORE_ACCURATE else "")
        return 1
    return 0


def cmd_ascend(args) -> int:
    from edgelm.export.ascend import export_ascend
    from edgelm.export.atc import AtcOptions

    options = AtcOptions(soc_version=args.soc_version, precision_mode_v2=args.precision_mode_v2,
                         prefill_gears=tuple(args.prefill_gears), te_parallel_compiler=args.te_parallel_compiler)
    options.validate()
    _print_json(export_ascend(
        args.model, args.out, max_prompt_len=args.max_prompt_len, kv_capacity=args.kv_capacity,
        soc_version=args.soc_version, opset=args.opset, dynamic_dir=args.dynamic_dir, atc_options=options,
    ))
    return 0


def cmd_generate(args) -> int:
    from edgelm.runtime import Generator

    generator = Generator.from_pretrained(args.export_dir)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed)
    if args.stream:
        for piece in generator.stream(args.prompt, **options):
            print(piece, end="", flush=True)
        print()
    else:
        print(generator.generate(args.prompt, **options))
    return 0


def cmd_eval(args) -> int:
    from edgelm.files import read_jsonl
    from edgelm.train.evaluate import OnnxBackend, TorchBackend, evaluate
    from edgelm.train.models import load_model, load_tokenizer

    records = read_jsonl(args.data)[: args.records]
    if records and "prompt" not in records[0]:
        raise ValueError(f"{args.data} does not contain records; convert it first with "
                         f"`edgelm data --input {args.data} --out records.jsonl`")
    if (Path(args.model) / "edgelm_export.json").is_file():
        tokenizer, backend = load_tokenizer(args.model), OnnxBackend(args.model)
    else:
        model, tokenizer = load_model(args.model)
        backend = TorchBackend(model, tokenizer)
    result = evaluate(backend, tokenizer, records, loss_modes=tuple(args.loss_modes),
                      accuracy_modes=tuple(args.accuracy_modes), max_length=args.max_length, name=args.model)
    _print_json(result)
    return 0


def cmd_bench(args) -> int:
    from edgelm.edge_bench import run_from_args

    return run_from_args(args)


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from edgelm.config import (ANSWER_MODES, DISTILL_LOSSES, DISTILL_TARGETS, PRECISIONS, QUANT_SCHEMES,
                               ROLLOUT_ENGINES, SFT_DIFFICULTIES, SFT_MODES, SFT_PACINGS)

    parser = argparse.ArgumentParser(prog="edgelm", description="Post-train a small language model and ship it to an edge device.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pipeline", help="run every stage from a YAML config, resuming a partial run")
    p.add_argument("config", help="pipeline YAML file, e.g. configs/default.yaml, or the name of a config shipped with edgelm (default)")
    p.add_argument("--from", dest="start_from", metavar="STAGE", help="re-run this stage and every later one")
    p.add_argument("--until", metavar="STAGE", help="stop after this stage")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set sft.batch_size=4 (repeatable)")
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("data", help="convert GSM8K-style or chat JSONL into training records")
    p.add_argument("--input", required=True, help="JSONL file, folder with SPLIT.jsonl, or hf:openai/gsm8k")
    p.add_argument("--split", default="train", help="split name when --input is a folder or hub id (default: train)")
    p.add_argument("--limit", type=positive_int, help="maximum records read (default: all)")
    p.add_argument("--out", required=True, help="output records JSONL")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("student", help="build a student by keeping evenly spaced layers of the teacher")
    p.add_argument("--teacher", required=True, help="teacher model source: HF folder, .gguf, pkg:PACKAGE/FILE.gguf or hub id")
    p.add_argument("--keep-layers", type=positive_int, default=10, help="decoder layers kept, first and last included (default: 10)")
    p.add_argument("--out", required=True, help="output HF model folder")
    p.set_defaults(func=cmd_student)

    p = sub.add_parser("sft", help="one curriculum SFT stage")
    p.add_argument("--model", required=True, help="model source: HF folder, .gguf, pkg:PACKAGE/FILE.gguf or hub id")
    p.add_argument("--data", required=True, help="records JSONL from `edgelm data`")
    p.add_argument("--out", required=True, help="output HF model folder")
    p.add_argument("--mode", choices=SFT_MODES, default="reasoning",
                   help="answer mode trained; mixed puts a --fast-ratio share of records in fast mode (default: reasoning)")
    p.add_argument("--fast-ratio", type=float, default=0.5, help="share of fast-mode records when --mode mixed (default: 0.5)")
    p.add_argument("--records", type=positive_int, help="use the first N records (default: all)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the records (default: 1)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default: 1e-4)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per step (default: 8)")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="gradient accumulation steps (default: 1)")
    p.add_argument("--max-length", type=positive_int, default=384, help="maximum tokens per example; longer ones are skipped (default: 384)")
    p.add_argument("--overlong", choices=["skip", "truncate"], default="skip",
                   help="examples longer than --max-length: skip them or cut them (default: skip)")
    p.add_argument("--difficulty", choices=SFT_DIFFICULTIES, default="steps",
                   help="difficulty score; teacher_loss needs --teacher, student_loss is refreshed every epoch (default: steps)")
    p.add_argument("--pacing", choices=SFT_PACINGS, default="buckets",
                   help="how harder examples join: buckets, linear or sqrt competence, none = shuffled (default: buckets)")
    p.add_argument("--buckets", type=positive_int, default=4, help="difficulty buckets for --pacing buckets (default: 4)")
    p.add_argument("--initial-competence", type=float, default=0.1,
                   help="easiest share of the data available at step 0 for linear/sqrt pacing (default: 0.1)")
    p.add_argument("--full-competence-at", type=float, default=1.0,
                   help="fraction of the steps after which all data is available (default: 1.0)")
    p.add_argument("--packing", action="store_true", help="pack several examples per row, no attention across them")
    p.add_argument("--teacher", help="model source that scores difficulty for --difficulty teacher_loss")
    p.add_argument("--save-steps", type=positive_int, help="write a resumable checkpoint every N optimizer steps (default: none)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out when the settings match")
    p.add_argument("--no-curriculum", action="store_true", help="shuffle instead of ordering easy to hard (same as --pacing none)")
    p.add_argument("--seed", type=int, default=0, help="seed for order and initialisation (default: 0)")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("rollout", help="have the student answer training prompts")
    p.add_argument("--model", required=True, help="student HF folder")
    p.add_argument("--data", required=True, help="records JSONL")
    p.add_argument("--out", required=True, help="output rows JSONL")
    p.add_argument("--mode", choices=["reasoning", "fast"], default="fast", help="answer mode (default: fast)")
    p.add_argument("--targets", choices=DISTILL_TARGETS, default="on_policy",
                   help="rows written for `edgelm distill --targets`: rollouts, reference answers (label) or both (default: on_policy)")
    p.add_argument("--records", type=positive_int, help="answer the first N records (default: all)")
    p.add_argument("--samples", type=positive_int, default=1, help="answers per prompt (default: 1)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature, 0 = greedy (default: 0.7)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default: 1.0, off)")
    p.add_argument("--max-new-tokens", type=positive_int, default=48, help="maximum generated tokens per answer (default: 48)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="prompts generated together (default: 32)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--engine", choices=ROLLOUT_ENGINES, default="hf",
                   help="hf: transformers generate (tested on CPU); vllm: vLLM when installed, for GPUs (default: hf)")
    p.add_argument("--chunk-rows", type=positive_int, default=256,
                   help="rows written per chunk file; an interrupted run keeps finished chunks (default: 256)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="dtype the student samples in. bf16 is faster on GPUs and on CPUs with AMX (default: fp32)")
    p.set_defaults(func=cmd_rollout)

    p = sub.add_parser("score", help="store the teacher's top-k logits for each row")
    p.add_argument("--teacher", required=True, help="teacher model source")
    p.add_argument("--student", required=True,
                   help="student model source; its tokenizer must match the teacher's (checked before scoring)")
    p.add_argument("--rows", required=True, help="rows JSONL from `edgelm rollout`")
    p.add_argument("--out", required=True, help="logit store folder")
    p.add_argument("--top-k", type=positive_int, default=32, help="logits kept per token (default: 32)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per forward pass (default: 8)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="dtype the teacher runs in. Its logits are cast to fp32 before top-k (default: fp32)")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("distill", help="train the student on stored teacher logits")
    p.add_argument("--student", required=True, help="student HF folder")
    p.add_argument("--rows", required=True, help="rows JSONL the store was scored from")
    p.add_argument("--store", required=True, help="logit store folder from `edgelm score`")
    p.add_argument("--out", required=True, help="output HF model folder")
    p.add_argument("--alpha", type=float, default=0.5, help="cross-entropy weight; 1 - alpha weights the divergence (default: 0.5)")
    p.add_argument("--loss", choices=DISTILL_LOSSES, default="forward_kl", help="divergence to the teacher (default: forward_kl)")
    p.add_argument("--beta", type=float, default=0.5, help="jsd mixture weight: 0 = forward KL, 1 = reverse KL (default: 0.5)")
    p.add_argument("--temperature", type=float, default=1.0, help="distillation temperature (default: 1.0)")
    p.add_argument("--targets", choices=DISTILL_TARGETS, default="on_policy",
                   help="rows trained on: on_policy (rollouts), label (reference answers) or mixed (default: on_policy)")
    p.add_argument("--label-fraction", type=float, default=0.25, help="share of label rows per batch when --targets mixed (default: 0.25)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="training precision; fp16 needs a GPU or NPU (default: fp32)")
    p.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (default: 5e-5)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the rows (default: 1)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per step (default: 8)")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="gradient accumulation steps (default: 1)")
    p.add_argument("--max-length", type=positive_int, default=512, help="maximum tokens per sequence (default: 512)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("export", help="export an HF model to ONNX with KV cache and check parity")
    p.add_argument("--model", required=True, help="HF model folder")
    p.add_argument("--out", required=True, help="output export folder")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    p.add_argument("--max-logits-diff", type=float, default=1e-3, help="largest allowed |PyTorch - ONNX| logits difference (default: 1e-3)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("quantize", help="write a quantized copy of an ONNX export")
    p.add_argument("--onnx", required=True, help="fp32 export folder from `edgelm export`")
    p.add_argument("--out", required=True, help="output export folder")
    p.add_argument("--scheme", choices=sorted(QUANT_SCHEMES), required=True,
                   help="int8 (dynamic: int8 weights and activations), int8-static (calibrated QDQ), int8-weight or "
                        "int4 (weight-only, fp32 activations), fp16")
    p.add_argument("--block-size", type=int, choices=[16, 32, 64, 128, 256], default=16,
                   help="int4: weights per scale block (default: 16)")
    p.add_argument("--asymmetric", action=argparse.BooleanOptionalAction, default=True,
                   help="int4: a zero point per block; --no-asymmetric for symmetric blocks (default: asymmetric)")
    p.add_argument("--accuracy-level", type=int, choices=range(5), default=4,
                   help="int4: MatMulNBits accuracy_level; 0 = onnxruntime's default, 4 = int8 activations, fastest (default: 4)")
    p.add_argument("--lm-head", choices=["int4", "int8", "fp32"], default="int8",
                   help="int4: precision of the output projection (default: int8)")
    p.add_argument("--method", choices=["rtn", "gptq"], default="rtn",
                   help="int4: rtn rounds to nearest; gptq (symmetric only, with --no-asymmetric) calibrates on "
                        "sequences the model samples itself, a few minutes more (default: rtn)")
    p.add_argument("--calibration-samples", type=int, default=32,
                   help="int4 with --method gptq: sampled sequences of 256 tokens to calibrate on (default: 32)")
    p.add_argument("--allow-parity-failure", action="store_true",
                   help="exit with status 0 even when the variant breaks a parity threshold (default: exit 1)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("ascend", help="static-shape ONNX graphs and the ATC command for Ascend NPUs")
    p.add_argument("--model", required=True, help="HF model folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--soc-version", default="Ascend310B1", help="ATC --soc_version (default: Ascend310B1)")
    p.add_argument("--max-prompt-len", type=positive_int, default=128, help="prefill length in tokens (default: 128)")
    p.add_argument("--kv-capacity", type=positive_int, default=256, help="KV cache slots in tokens (default: 256)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, at most 18 for ATC (default: 17)")
    p.add_argument("--dynamic-dir", type=Path, help="dynamic ONNX export to compare greedy tokens with (default: compare with PyTorch)")
    p.add_argument("--precision-mode-v2", default="mixed_float16",
                   help="ATC --precision_mode_v2; mixed_float16 keeps norms and reductions fp32 through a mix list (default: mixed_float16)")
    p.add_argument("--prefill-gears", type=positive_int, nargs="*", default=[],
                   help="extra prompt lengths for ATC --dynamic_dims gears (default: none)")
    p.add_argument("--te-parallel-compiler", type=positive_int,
                   help="TE_PARALLEL_COMPILER for atc: parallel operator compile jobs (default: ATC's)")
    p.set_defaults(func=cmd_ascend)

    p = sub.add_parser("generate", help="generate text from an ONNX export (runtime only, no torch)")
    p.add_argument("export_dir", help="export folder (edgelm_export.json inside)")
    p.add_argument("prompt", help="user message")
    p.add_argument("--max-new-tokens", type=positive_int, default=128, help="maximum generated tokens (default: 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature, 0 = greedy (default: 0)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens, 0 = off (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold, 1 = off (default: 1)")
    p.add_argument("--seed", type=int, help="sampling seed")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="held-out loss and exact-match accuracy of a model or export")
    p.add_argument("--model", required=True, help="model source or ONNX export folder")
    p.add_argument("--data", required=True, help="records JSONL (e.g. from `edgelm data --split test`)")
    p.add_argument("--records", type=positive_int, default=100, help="records evaluated (default: 100)")
    p.add_argument("--loss-modes", nargs="+", choices=ANSWER_MODES, default=["reasoning", "fast"], help="modes for held-out loss (default: reasoning fast)")
    p.add_argument("--accuracy-modes", nargs="+", choices=ANSWER_MODES, default=["fast"], help="modes for accuracy (default: fast)")
    p.add_argument("--max-length", type=positive_int, default=384, help="maximum tokens per example for the loss; longer ones are skipped and counted (default: 384, as sft.max_length)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="measure load time, TTFT, decode latency and peak memory of models",
                       epilog="`edgelm bench compare A.json B.json` prints two --out result files side by side.")
    from edgelm.edge_bench.bench import build_parser as add_bench_options

    add_bench_options(p)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["bench", "compare"]:
        # A sub-subcommand would clash with bench's required --target, so it is routed here.
        from edgelm.edge_bench.report import compare_main

        return compare_main(argv[2:])
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    import yaml

    try:
        if args.command in FOLDER_OUTPUTS:
            from edgelm.files import check_output_folder

            check_output_folder(args.out)
            for flag in ("model", "teacher", "student", "onnx"):
                source = getattr(args, flag, None)
                if source and Path(source).resolve() == Path(args.out).resolve():
                    raise ValueError(f"--out {args.out} is the --{flag} folder, which the output would replace; "
                                     f"write to another folder")
        return args.func(args)
    except KeyboardInterrupt:
        logging.getLogger("edgelm").error(_interrupted_message(args))
        return 130
    except RuntimeError as error:
        from edgelm.export.atc import AtcError
        from edgelm.export.parity import ParityError

        if not isinstance(error, (ParityError, AtcError)):
            raise
        # A variant that fails its checks, or ATC that fails: the message is the whole story.
        logging.getLogger("edgelm").error("%s: %s", type(error).__name__, error, exc_info=args.verbose)
        return 1
    except (ValueError, OSError, ImportError, yaml.YAMLError) as error:
        # Invalid input and missing files or packages: one line, the traceback only with -v.
        # ConfigError and DataError are ValueErrors.
        hint = flag_hint(str(error), parser, args.command)
        logging.getLogger("edgelm").error("%s: %s%s", type(error).__name__, error, hint, exc_info=args.verbose)
        return 2


# Function parameters that a subcommand sets from a flag of another name.
_PARAMETER_DESTS = {"learning_rate": "lr", "samples_per_prompt": "samples"}


def flag_hint(message: str, parser: argparse.ArgumentParser, command: str) -> str:
    """Return " (command-line flag: --x)" for the `name=value` settings in `message` that a flag of `command` sets.

    Errors come from the Python functions, so they name parameters (`top_p=1.5`); the hint
    names the flag a command-line user passes instead. "" when no flag matches.
    """
    subcommands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    flags = {
        action.dest: next((s for s in action.option_strings if s.startswith("--")), None)
        for action in subcommands.choices[command]._actions
    }
    found = []
    for name in re.findall(r"\b([a-z][a-z0-9_]*)=", message):
        flag = flags.get(_PARAMETER_DESTS.get(name, name))
        if flag and flag not in found and flag != "--help":
            found.append(flag)
    if not found:
        return ""
    return f" (command-line flag{'s' if len(found) > 1 else ''}: {', '.join(found)})"
