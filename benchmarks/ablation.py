"""Ablation of the training recipe on a finished default run: which step earns what.

Rows (held-out loss per answer token and fast-mode exact-match accuracy):
  teacher, adapted teacher          the scorers, before and after teacher adaptation
  SFT(reasoning)                    the first curriculum stage alone
  SFT(reasoning) + SFT(fast)        both curriculum stages
  + distill, raw teacher            distillation scored by the teacher as loaded
  + distill, adapted teacher        distillation scored by the adapted teacher (the default)
  shuffled SFT                      both SFT stages without curriculum (random order)

The base run supplies every row it already evaluated. The two extra variants run in new run
folders that reuse the base run's finished stages (data, student, SFT, rollouts), so only what
differs is recomputed:

    edgelm pipeline configs/default.yaml            # the base run (make demo)
    python benchmarks/ablation.py --base runs/default --out runs/ablation
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

log = logging.getLogger("ablation")


def copy_stages(base: Path, target: Path, outputs: list[str], stages: list[str]) -> None:
    """Seed `target` with the base run's outputs and markers of `stages`, and its config."""
    target.mkdir(parents=True, exist_ok=True)
    (target / "stages").mkdir(exist_ok=True)
    shutil.copy2(base / "config.yaml", target / "config.yaml")
    for name in outputs:
        source = base / name
        if not (target / name).exists():
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, target / name)
    for stage in stages:
        shutil.copy2(base / "stages" / f"{stage}.json", target / "stages" / f"{stage}.json")


def run_variant(base: Path, target: Path, overrides: list[str], outputs: list[str], done: list[str],
                start: str, stop: str) -> None:
    from edgelm import pipeline
    from edgelm.config import load_config

    copy_stages(base, target, outputs, done)
    config = load_config(base / "config.yaml", [f"run_dir={target}", *overrides])
    pipeline.run_pipeline(config, start_from=start, stop_after=stop)


def evaluate_model(model_dir: Path, base: Path, cache: Path) -> dict:
    """Held-out loss and accuracy of one PyTorch model, with the base run's eval settings."""
    from edgelm.config import load_config
    from edgelm.files import read_jsonl, write_json
    from edgelm.train.evaluate import TorchBackend, evaluate
    from edgelm.train.models import load_model

    if cache.is_file():
        return json.loads(cache.read_text())
    config = load_config(base / "config.yaml", [f"run_dir={base}"])
    records = read_jsonl(base / "data" / "test.jsonl")[: config.eval.records]
    model, tokenizer = load_model(str(model_dir))
    result = evaluate(TorchBackend(model, tokenizer), tokenizer, records, loss_modes=tuple(config.eval.loss_modes),
                      accuracy_modes=tuple(config.eval.accuracy_modes), max_length=config.sft.max_length,
                      name=str(model_dir))
    write_json(cache, result)
    return result


def table(rows: list[tuple[str, dict]]) -> str:
    lines = ["| recipe | loss (fast) | loss (reasoning) | accuracy (fast) |", "|---|---|---|---|"]
    for name, result in rows:
        loss, accuracy = result.get("loss", {}), result.get("accuracy", {})
        fast_acc = accuracy.get("fast")
        lines.append(f"| {name} | {loss.get('fast', float('nan')):.3f} | {loss.get('reasoning', float('nan')):.3f} | "
                     f"{'–' if fast_acc is None else format(100 * fast_acc, '.0f') + '%'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="runs/default", help="finished default pipeline run (teacher_sft enabled)")
    parser.add_argument("--out", default="runs/ablation", help="folder for the extra variants' runs and the table")
    parser.add_argument("--shuffled", default="sft.pacing=none",
                        help="config override that turns the curriculum off (default: sft.pacing=none)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    base, out = Path(args.base), Path(args.out)
    evaluations = json.loads((base / "results.json").read_text())["stages"]["eval"]
    missing = [name for name in ("teacher", "teacher-adapted", "sft-reasoning", "sft-fast", "distill") if name not in evaluations]
    if missing:
        raise SystemExit(f"{base} has no evaluation of {missing}; finish the default run first "
                         f"(`edgelm pipeline configs/default.yaml`, teacher_sft.enabled true)")
    sft_stages = [name for name in json.loads((base / "results.json").read_text())["stage_seconds"] if name.startswith("sft-")]

    # Distillation scored by the raw teacher: same student, same rollouts, no teacher adaptation.
    raw = out / "raw-teacher"
    run_variant(base, raw, ["teacher_sft.enabled=false"], ["data", "student-init", "sft", "rollouts.jsonl"],
                ["data", "student", *sft_stages, "rollout"], start="teacher-sft", stop="distill")
    # Both SFT stages in random order.
    shuffled = out / "shuffled"
    run_variant(base, shuffled, [args.shuffled], ["data", "student-init"], ["data", "student"],
                start=sft_stages[0], stop=sft_stages[-1])

    rows = [
        ("teacher (as loaded)", evaluations["teacher"]),
        ("teacher, adapted", evaluations["teacher-adapted"]),
        ("SFT(reasoning)", evaluations["sft-reasoning"]),
        ("SFT(reasoning) + SFT(fast)", evaluations["sft-fast"]),
        ("+ distill(fast), raw teacher", evaluate_model(raw / "distill", base, out / "eval-raw-teacher.json")),
        ("+ distill(fast), adapted teacher", evaluations["distill"]),
        ("shuffled SFT(reasoning) + SFT(fast)", evaluate_model(shuffled / "sft" / sft_stages[-1].removeprefix("sft-"), base, out / "eval-shuffled.json")),
    ]
    text = table(rows)
    (out / "ablation.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
