"""Collect a run's stage metrics into results.json and render report.md."""

from __future__ import annotations

import platform
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    from edgelm.pipeline import Run


def build_results(run: Run, stage_names: list[str]) -> dict:
    """Gather every completed stage's metrics, the config and a machine card."""
    stages = {name: run.metrics(name) for name in stage_names if run.is_done(name)}
    return {
        "run_dir": str(run.dir),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": psutil.cpu_count(logical=True),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(),
        },
        "config": run.config.to_dict(),
        "stage_seconds": {name: round(metrics.get("seconds", 0.0), 1) for name, metrics in stages.items()},
        "stages": stages,
    }


def _rate(metrics: dict):
    # SFT and rollout report tokens_per_second; scoring and distillation report tokens_per_s.
    return metrics.get("tokens_per_second", metrics.get("tokens_per_s"))


def _fmt(value, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def _eval_table(evaluations: dict) -> list[str]:
    loss_modes = sorted({mode for result in evaluations.values() if isinstance(result, dict) for mode in result.get("loss", {})})
    accuracy_modes = sorted({mode for result in evaluations.values() if isinstance(result, dict) for mode in result.get("accuracy", {})})
    header = ["model"] + [f"loss ({m})" for m in loss_modes] + [f"accuracy ({m})" for m in accuracy_modes]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, result in evaluations.items():
        if not isinstance(result, dict) or "loss" not in result:
            continue
        cells = [name] + [_fmt(result["loss"].get(m)) for m in loss_modes]
        cells += [_fmt(100 * result["accuracy"][m], ".1f") + "%" if m in result["accuracy"] else "–" for m in accuracy_modes]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _top1_cell(parity: dict) -> str:
    """Held-out top-1 agreement, or the parity-prompt one marked with an asterisk when that is all there is."""
    if "heldout_top1_agreement" in parity:
        return _fmt(parity["heldout_top1_agreement"])
    if "top1_agreement" in parity:
        return _fmt(parity["top1_agreement"]) + "\\*"
    return "–"


def _teacher_adaptation(evaluations: dict) -> list[str]:
    """Return one sentence comparing the teacher before and after it was adapted to the task."""
    before, after = evaluations.get("teacher"), evaluations.get("teacher-adapted")
    if not (isinstance(before, dict) and isinstance(after, dict)):
        return []
    parts = [f"{mode} loss {_fmt(before['loss'][mode])} -> {_fmt(after['loss'][mode])}"
             for mode in before.get("loss", {}) if mode in after.get("loss", {})]
    parts += [f"{mode} accuracy {100 * before['accuracy'][mode]:.1f}% -> {100 * after['accuracy'][mode]:.1f}%"
              for mode in before.get("accuracy", {}) if mode in after.get("accuracy", {})]
    return ["", "Teacher adaptation (held-out, before -> after): " + "; ".join(parts) + "."]


def render_report(results: dict) -> str:
    stages = results["stages"]
    machine = results["machine"]
    lines = [
        f"# edgelm run report: {results['run_dir']}",
        "",
        f"Machine: {machine['processor']}, {machine['cpu_count']} logical CPUs, {machine['memory_gb']} GiB, "
        f"Python {machine['python']}, {machine['platform']}.",
        "",
        "## Stage times",
        "",
        "| stage | seconds |",
        "|---|---|",
    ]
    lines += [f"| {name} | {seconds} |" for name, seconds in results["stage_seconds"].items()]
    lines += ["", f"Total: {sum(results['stage_seconds'].values()):.0f} s", ""]

    lines += ["## Training", "", "| stage | examples | steps | final loss | tokens/s |", "|---|---|---|---|---|"]
    for name, metrics in stages.items():
        if name.startswith("sft-") or name == "distill":
            lines.append(
                f"| {name} | {metrics.get('examples', metrics.get('rows', '–'))} | {metrics.get('steps', '–')} | "
                f"{_fmt(metrics.get('final_loss'))} | {_fmt(_rate(metrics), '.0f')} |"
            )
    if "rollout" in stages:
        rollout = stages["rollout"]
        lines += ["", f"Rollout: {rollout.get('rows')} sequences, "
                  f"{_fmt(100 * rollout['finished_fraction'], '.0f') if 'finished_fraction' in rollout else '–'}% ended with end of turn, "
                  f"{_fmt(_rate(rollout), '.0f')} new tokens/s."]
    if "score" in stages:
        score = stages["score"]
        lines += [f"Teacher scoring: {score.get('forward_tokens', '–')} tokens through the teacher in {_fmt(score.get('seconds'), '.0f')} s, "
                  f"{score.get('tokens', '–')} answer tokens stored at {_fmt(score.get('bytes_per_token'), '.0f')} bytes each."]

    if "eval" in stages:
        # The test file may have fewer records than eval.records.
        counts = {info["records"] for info in stages["eval"].values() if isinstance(info, dict) and "records" in info}
        evaluated = counts.pop() if len(counts) == 1 else results["config"]["eval"]["records"]
        lines += ["", "## Held-out loss and exact-match accuracy", "",
                  f"GSM8K test, first {evaluated} questions; loss is mean cross-entropy per "
                  "answer token (end of turn included); accuracy is greedy answer vs reference, exact number match.", ""]
        lines += _eval_table({k: v for k, v in stages["eval"].items() if k not in ("seconds", "work_seconds")})
        lines += _teacher_adaptation(stages["eval"])

    if "export" in stages or "quantize" in stages:
        lines += ["", "## Export", ""]
        variants = {"fp32": stages.get("export", {}), **{k: v for k, v in stages.get("quantize", {}).items() if isinstance(v, dict)}}
        ascend = stages.get("ascend", {})
        if isinstance(ascend.get("parity"), dict) and "heldout_top1_agreement" in ascend["parity"]:
            variants["ascend"] = ascend
        lines += ["Reference: PyTorch for fp32, the fp32 ONNX graph for the others. Top-1 agreement and perplexity "
                  "are measured under teacher forcing on held-out test transcripts; greedy agreement on chat prompts.", "",
                  "| variant | size (MB) | max logits diff | top-1 agreement | perplexity change | greedy agreement | passed |",
                  "|---|---|---|---|---|---|---|"]
        for name, info in variants.items():
            parity = info.get("parity", {}) if isinstance(info, dict) else {}
            size = info.get("file_size_bytes")
            ppl = parity.get("ppl_increase")
            lines.append(f"| {name} | {_fmt(size / 1e6 if size else None, '.1f')} | {_fmt(parity.get('max_logits_diff'), '.2e')} | "
                         f"{_top1_cell(parity)} | {'–' if ppl is None else format(100 * ppl, '+.2f') + '%'} | "
                         f"{_fmt(parity.get('greedy_token_agreement'))} | {parity.get('passed', '–')} |")
        if any("heldout_top1_agreement" not in info.get("parity", {}) and "top1_agreement" in info.get("parity", {})
               for info in variants.values() if isinstance(info, dict)):
            lines += ["", "\\* Top-1 agreement on the parity prompts' prefill and decode steps, not on held-out text: "
                      "the fused graph's interface differs from the one the held-out check drives."]
        failed = [name for name, info in variants.items()
                  if isinstance(info, dict) and info.get("parity", {}).get("passed") is False]
        if failed:
            lines += ["", f"**Parity check failed for {', '.join(failed)}**: see `parity.json` in each variant's folder for "
                      "the threshold broken and the `export.parity` key to relax."]
    if "ascend" in stages:
        ascend = stages["ascend"]
        if "skipped" in ascend:
            lines += ["", f"Ascend static variant: skipped ({ascend['skipped']})."]
        else:
            built = "OM built" if ascend.get("om_built") else "ONNX graphs and atc.sh written; ATC not run (not on PATH)"
            lines += ["", f"Ascend static variant: {built}; static-graph greedy tokens match the dynamic export: "
                      f"{ascend.get('parity', {}).get('greedy_match', '–')}."]
        if "samples" in ascend:
            lines += ["", f"Greedy answers of every variant on GSM8K test prompts: [{ascend['samples']['path']}]"
                      f"({ascend['samples']['path']})."]

    if "bench" in stages:
        from edgelm.edge_bench import format_table

        lines += ["", "## Latency and memory", "", format_table(stages["bench"])]
    return "\n".join(lines) + "\n"
