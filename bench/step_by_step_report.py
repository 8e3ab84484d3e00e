"""Tables and the data-efficiency plot for Distilling step-by-step runs (docs/results.md).

Reads `<runs>/<dataset>/<method>-f<fraction>-s<seed>/test.json` (written by
`lmdistill eval --task <dataset> --out ...`) and `wall.json` beside it, prints a markdown
table per dataset (test accuracy mean ± std over seeds, the PaLM teacher's accuracy, wall
time) and writes `data_efficiency_<dataset>.png` (accuracy vs train_fraction) for every
dataset with more than one fraction.

    python bench/step_by_step_report.py runs/sbs --plot-dir docs
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

RUN_NAME = re.compile(r"(?P<method>[a-z_]+)-f(?P<fraction>[0-9.]+)-s(?P<seed>\d+)$")
METHODS = ("finetune", "distill", "step_by_step")


def collect(root: Path) -> dict:
    """{dataset: {(method, fraction): [(seed, accuracy, teacher_accuracy, train_s, eval_s, n)]}}"""
    found: dict = defaultdict(lambda: defaultdict(list))
    for result in sorted(root.glob("*/*/test.json")):
        match = RUN_NAME.match(result.parent.name)
        if not match:
            continue
        test = json.loads(result.read_text())
        wall_file = result.parent / "wall.json"
        wall = json.loads(wall_file.read_text()) if wall_file.exists() else {}
        key = (match["method"], float(match["fraction"]))
        found[test["dataset"]][key].append((int(match["seed"]), test["accuracy"], test.get("teacher_accuracy"),
                                            wall.get("train_s"), wall.get("eval_s"), test["n"]))
    return found


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def table(dataset: str, runs: dict) -> str:
    lines = [
        f"**{dataset}**",
        "",
        "| method | train_fraction | seeds | test accuracy (%) | per seed | PaLM teacher (%) | train s / eval s |",
        "|---|---|---|---|---|---|---|",
    ]
    order = sorted(runs, key=lambda k: (k[1], METHODS.index(k[0]) if k[0] in METHODS else 99))
    for method, fraction in order:
        rows = sorted(runs[(method, fraction)])
        accuracies = [r[1] for r in rows]
        teacher = rows[0][2]
        walls = ", ".join(f"{r[3]}/{r[4]}" for r in rows)
        lines.append(
            f"| {method} | {fraction:g} | {','.join(str(r[0]) for r in rows)} | {mean_std(accuracies)} | "
            f"{', '.join(f'{a:.1f}' for a in accuracies)} | "
            f"{'-' if teacher is None else f'{teacher:.1f}'} | {walls} |"
        )
    n = {r[5] for rows in runs.values() for r in rows}
    lines.append(f"\n{dataset} test examples: {', '.join(map(str, sorted(n)))}.")
    return "\n".join(lines)


def plot(dataset: str, runs: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for method in METHODS:
        points = sorted((f, [r[1] for r in rows]) for (m, f), rows in runs.items() if m == method)
        if not points:
            continue
        xs = [f for f, _ in points]
        means = [statistics.mean(a) for _, a in points]
        errs = [statistics.stdev(a) if len(a) > 1 else 0.0 for _, a in points]
        ax.errorbar(xs, means, yerr=errs, marker="o", capsize=3, label=method)
    teacher = next((r[2] for rows in runs.values() for r in rows if r[2] is not None), None)
    if teacher is not None:
        ax.axhline(teacher, color="grey", linestyle="--", label="PaLM 540B teacher (few-shot CoT)")
    ax.set_xlabel("train_fraction")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{dataset}: SmolLM2-135M-Instruct student")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="folder holding <dataset>/<method>-f<fraction>-s<seed>/test.json")
    parser.add_argument("--plot-dir", type=Path, default=None, help="where to write data_efficiency_<dataset>.png")
    args = parser.parse_args()
    found = collect(args.runs)
    if not found:
        raise SystemExit(f"{args.runs}: no <dataset>/<method>-f<fraction>-s<seed>/test.json found")
    for dataset, runs in sorted(found.items()):
        print(table(dataset, runs), end="\n\n")
        if args.plot_dir and len({f for _, f in runs}) > 1:
            args.plot_dir.mkdir(parents=True, exist_ok=True)
            out = args.plot_dir / f"data_efficiency_{dataset}.png"
            plot(dataset, runs, out)
            print(f"wrote {out}\n")


if __name__ == "__main__":
    main()
