"""Plots the speed-up of kdloss over PyTorch eager and NumPy per shape and dtype, from a ``bench.py`` JSON report.

    python benchmarks/bench.py --json benchmarks/results.json      # measure (PyTorch optional)
    python benchmarks/plot_results.py benchmarks/results.json docs/_static/speedup.png

Needs matplotlib (``pip install '.[plot]'``). The documentation's performance page shows the PNG this writes and
the table of the same report (``--table`` prints it as Markdown).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
COMPETITORS = {"torch_over_1t": "PyTorch eager, 1 thread", "numpy_over_1t": "NumPy"}


def speedups(report: dict) -> list[tuple[str, dict[str, float]]]:
    """(shape and dtype, {competitor: its time over kdloss's on one thread}) per cell of the report."""
    rows = []
    for cell in report["results"]:
        ratios = {key: cell["ratios"].get(key) for key in COMPETITORS}
        rows.append((f"{cell['shape_text']}\n{cell['dtype']}", {k: v for k, v in ratios.items() if v is not None}))
    return rows


def markdown_table(report: dict) -> str:
    lines = [
        "| shape | dtype | kdloss, 1 thread | NumPy | PyTorch eager | PyTorch / kdloss |",
        "|---|---|---|---|---|---|",
    ]
    for cell in report["results"]:
        medians = cell["median_s"]
        torch_ratio = cell["ratios"].get("torch_over_1t")
        lines.append(
            f"| {cell['shape_text']} | {cell['dtype']} | {_time(medians['kdloss_1t'])} | {_time(medians['numpy'])} "
            f"| {_time(medians.get('torch'))} | {f'{torch_ratio:.1f}×' if torch_ratio else '—'} |"
        )
    return "\n".join(lines)


def _time(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def plot(report: dict, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = speedups(report)
    fig, ax = plt.subplots(figsize=(9, 4), dpi=110)
    width = 0.38
    for offset, (key, label) in enumerate(COMPETITORS.items()):
        xs = [i + (offset - 0.5) * width for i in range(len(rows))]
        ax.bar(xs, [ratios.get(key, 0.0) for _, ratios in rows], width, label=label)
    ax.set_xticks(range(len(rows)), [name for name, _ in rows], fontsize=8)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_ylabel("time / kdloss's time (1 thread)")
    build = report.get("machine", {}).get("kdloss_build_info") or {}
    ax.set_title(f"loss + gradient: how much longer the others take ({build.get('active_isa', '?')} kernels)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(output)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", nargs="?", default=str(HERE / "results.json"), help="bench.py's JSON report")
    parser.add_argument("output", nargs="?", default="speedup.png", help="the PNG to write")
    parser.add_argument("--table", action="store_true", help="print the report's table as Markdown instead")
    args = parser.parse_args()
    report = json.loads(Path(args.report).read_text())
    if args.table:
        print(markdown_table(report))
        return
    plot(report, Path(args.output))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
