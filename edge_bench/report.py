"""Compare two benchmark result files side by side, and plot latency and memory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Columns of format_comparison: header, result key, number format, whether higher is better.
COMPARE_COLUMNS = [
    ("TTFT ms", "ttft_ms", "{:.1f}", False),
    ("decode tokens/s", "decode_tokens_per_s", "{:.1f}", True),
    ("decode ms p90", "decode_ms_p90", "{:.2f}", False),
    ("peak RSS MB", "peak_rss_mb", "{:.0f}", False),
]


def _key(result: dict) -> tuple:
    return result["name"], result.get("prompt_tokens"), result.get("new_tokens")


def load_report(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark result file {path} not found; write one with --out")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"invalid JSON in {path}: {error}") from error
    if "results" not in report:
        raise ValueError(f"{path} has no 'results' list; pass a file written by the benchmark's --out")
    return report


def format_comparison(a: dict, b: dict, a_label: str = "A", b_label: str = "B") -> str:
    """Return a Markdown table of the results present in both reports, with B/A ratios.

    Rows are matched by target name, prompt length and generation length.
    """
    b_results = {_key(r): r for r in b["results"]}
    header = ["target", "prompt", "new"]
    for title, _, _, _ in COMPARE_COLUMNS:
        header += [f"{title} {a_label}", f"{title} {b_label}", f"{b_label}/{a_label}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in a["results"]:
        other = b_results.get(_key(result))
        if other is None:
            continue
        cells = [result["name"], str(result.get("prompt_tokens", "")), str(result.get("new_tokens", ""))]
        for _, key, fmt, _ in COMPARE_COLUMNS:
            left, right = result.get(key), other.get(key)
            cells += ["-" if left is None else fmt.format(left), "-" if right is None else fmt.format(right),
                      f"{right / left:.2f}" if left and right else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgelm bench compare",
                                     description="Print two benchmark result files side by side with ratios.")
    parser.add_argument("a", help="first result JSON file (written with --out)")
    parser.add_argument("b", help="second result JSON file")
    args = parser.parse_args(argv)
    try:
        a, b = load_report(args.a), load_report(args.b)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    a_label, b_label = _labels(Path(args.a), Path(args.b))
    print(format_comparison(a, b, a_label, b_label))
    a_keys, b_keys = {_key(r) for r in a["results"]}, {_key(r) for r in b["results"]}
    for keys, label in ((a_keys - b_keys, a_label), (b_keys - a_keys, b_label)):
        for name, prompt, new in sorted(keys, key=str):
            print(f"only in {label}: {name} (prompt {prompt}, new {new})")
    if not a_keys & b_keys:
        print("no target, prompt length and generation length is in both files, so nothing is compared")
        return 1
    return 0


def _labels(a: Path, b: Path) -> tuple[str, str]:
    """Return column labels for two result files: their names, or parent/name when the names are equal."""
    if a.stem != b.stem:
        return a.stem, b.stem
    a_label, b_label = f"{a.parent.name}/{a.stem}", f"{b.parent.name}/{b.stem}"
    return (a_label, b_label) if a_label != b_label else ("A", "B")


def plot_report(report: dict, prefix: str | Path) -> list[Path]:
    """Write PREFIX-latency.png (TTFT and decode latency against prompt length) and PREFIX-memory.png.

    Needs matplotlib; raises ImportError naming it when it is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("plots need matplotlib: pip install matplotlib") from error
    results = [r for r in report["results"] if "ttft_ms" in r]
    names = list(dict.fromkeys(r["name"] for r in results))
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)

    figure, (ttft_axis, decode_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        rows = sorted((r for r in results if r["name"] == name), key=lambda r: r["prompt_tokens"])
        lengths = [r["prompt_tokens"] for r in rows]
        ttft_axis.plot(lengths, [r["ttft_ms"] for r in rows], marker="o", label=name)
        decode_axis.plot(lengths, [r["decode_ms_median"] for r in rows], marker="o", label=name)
    ttft_axis.set(xlabel="prompt tokens", ylabel="TTFT (ms)", title="Time to first token")
    decode_axis.set(xlabel="prompt tokens", ylabel="decode ms/token (median)", title="Decode latency")
    decode_axis.legend()
    latency_path = prefix.with_name(prefix.name + "-latency.png")
    figure.tight_layout()
    figure.savefig(latency_path)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(7, 4))
    peaks = [max(r["peak_rss_mb"] for r in results if r["name"] == name) for name in names]
    sizes = [max(r["model_size_mb"] for r in results if r["name"] == name) for name in names]
    positions = range(len(names))
    axis.bar([p - 0.2 for p in positions], peaks, width=0.4, label="peak RSS")
    axis.bar([p + 0.2 for p in positions], sizes, width=0.4, label="model file")
    axis.set_xticks(list(positions), names, rotation=20, ha="right")
    axis.set(ylabel="MB", title="Peak process memory and model size")
    axis.legend()
    memory_path = prefix.with_name(prefix.name + "-memory.png")
    figure.tight_layout()
    figure.savefig(memory_path)
    plt.close(figure)
    return [latency_path, memory_path]
