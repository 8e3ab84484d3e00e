"""One table from several `lmdistill compare` runs that differ only in the training seed.

Each run's `comparison.json` gives, per model and evaluation set, ROUGE-L per sampling seed.
For each training seed the sampling seeds are averaged; the table shows the mean ± sample
std of those per-training-seed means (the spread that matters when comparing methods),
and, per cell, the individual training-seed means.

    python bench/compare_seeds.py runs/issue3/compare_dolly runs/issue3/compare_dolly_seed1 ...
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def load(folder: Path) -> dict:
    path = folder / "comparison.json"
    if not path.exists():
        raise SystemExit(f"{path}: not found (run `lmdistill compare` into {folder} first)")
    data = json.loads(path.read_text())
    return data["results"] if "runs" in data else data  # older comparisons wrote the results alone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="comparison folders, one per training seed")
    args = parser.parse_args()
    runs = [load(folder) for folder in args.runs]
    models = list(runs[0])
    datasets = next(list(v) for v in runs[0].values() if isinstance(v, dict))
    print(f"ROUGE-L over {len(runs)} training runs: mean ± std of the per-run means (per-run means)\n")
    print("| model | " + " | ".join(datasets) + " |")
    print("|---|" + "---|" * len(datasets))
    for model in models:
        cells = []
        for dataset in datasets:
            means = [run[model][dataset]["rougeL_mean"] for run in runs
                     if isinstance(run.get(model), dict) and dataset in run[model]]
            if not means:
                cells.append("failed")
                continue
            spread = f" ± {statistics.stdev(means):.2f}" if len(means) > 1 else ""
            cells.append(f"{statistics.mean(means):.2f}{spread} ({', '.join(f'{m:.1f}' for m in means)})")
        print(f"| {model} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
