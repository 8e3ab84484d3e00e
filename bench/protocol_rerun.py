"""The comparison under the papers' protocol, three training seeds (issue 23; docs/results.md).

    python bench/protocol_rerun.py                     # seeds 0, 1, 2 into runs/protocol_rerun/seed<s>
    python bench/protocol_rerun.py --report            # the table from bench/results/protocol_rerun/

Each seed is one `lmdistill compare configs/compare_dolly.yaml` (the recipe's budget and protocol;
`train.seed=<s>`). Seed 0 runs stages 0 and 1 (the teacher's SFT and the student's SFT init, each
selected on the dev split); the other seeds distil from the same fine-tuned teacher and start
from the same init, as the references run their stages once. The 10-layer SmolLM2 prune is made
first if missing. Resumable: a finished method is skipped, an interrupted one resumes from its
checkpoint. After each seed (and with --collect at any time) every finished run's eval.json is
copied to bench/results/protocol_rerun/seed<s>/<run>.json (small; committed), with the run's
resolved settings, its selected checkpoint and its wall time (training start to evaluation end).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "protocol_rerun"
RECIPE = ROOT / "configs" / "compare_dolly.yaml"
PRUNE = ["--model", "smollm2-135m-instruct", "--keep-layers", "0,3,6,9,12,15,18,21,24,27"]
ROWS = ["teacher", "initial_student", "student_init", "sft", "kd", "seqkd", "rkl", "gkd", "imitkd", "distillm",
        "minillm", "promptkd"]


def seed_overrides(out: Path, seed: int, first: Path, extra: list[str]) -> list[str]:
    overrides = [f"output_dir={out}", f"train.seed={seed}", f"student={ROOT / 'runs' / 'student10'}"] + extra
    if seed != 0:  # the stages of seed 0: one fine-tuned teacher, one init, as the references
        overrides += ["teacher_sft=false", f"teacher={first / 'teacher_sft' / 'best'}", "student_init=false",
                      f"init_student={first / 'student_init' / 'best'}"]
    return overrides


def collect(out: Path, seed: int) -> int:
    """Copy every finished run's eval.json (+ its wall time from metrics.jsonl) into bench/results."""
    target = RESULTS / f"seed{seed}"
    n = 0
    for row in ROWS:
        done = out / row / "eval.json"
        if not done.exists():
            continue
        data = json.loads(done.read_text())
        started = out / row / "config.yaml"  # written when training starts; eval.json after the evaluation
        data["wall_s"] = round(done.stat().st_mtime - started.stat().st_mtime) if started.exists() else None
        best = out / row / "best" / "best.json"
        data["best"] = json.loads(best.read_text()) if best.exists() else None
        for result in data["results"].values():
            result.pop("samples", None)
        target.mkdir(parents=True, exist_ok=True)
        (target / f"{row}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
        n += 1
    for stage in ("teacher_sft", "student_init"):
        best = out / stage / "best" / "best.json"
        if best.exists():
            target.mkdir(parents=True, exist_ok=True)
            (target / f"{stage}_best.json").write_text(best.read_text())
    return n


def report() -> str:
    """Markdown: ROUGE-L mean ± sample std over the training seeds finished, the per-seed values."""
    seeds = sorted(RESULTS.glob("seed*"))
    datasets = None
    lines = []
    for row in ROWS:
        per_seed = []
        for folder in seeds:
            path = folder / f"{row}.json"
            if path.exists():
                per_seed.append(json.loads(path.read_text())["results"])
        if not per_seed:
            continue
        datasets = datasets or list(per_seed[0])
        cells = []
        for d in datasets:
            means = [r[d]["rougeL_mean"] for r in per_seed if d in r]
            spread = f" ± {statistics.stdev(means):.2f}" if len(means) > 1 else ""
            cells.append(f"{statistics.mean(means):.2f}{spread} ({', '.join(f'{m:.1f}' for m in means)})")
        lines.append(f"| {row.replace('_', ' ')} | {len(per_seed)} | " + " | ".join(cells) + " |")
    head = ["| model | seeds | " + " | ".join(datasets or []) + " |", "|---|---|" + "---|" * len(datasets or [])]
    return "\n".join(head + lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "protocol_rerun")
    parser.add_argument("--collect", action="store_true", help="only copy finished results into bench/results")
    parser.add_argument("--report", action="store_true", help="only print the table of the collected results")
    parser.add_argument("overrides", nargs="*", help="extra compare overrides (e.g. train.steps=2 for a smoke run)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    first = args.out / "seed0"
    if args.report:
        print(report())
        return
    if args.collect:
        for seed in seeds:
            print(f"seed {seed}: {collect(args.out / f'seed{seed}', seed)} results")
        return
    if not (ROOT / "runs" / "student10" / "config.json").exists():
        subprocess.run([sys.executable, "-m", "lmdistill.cli", "prune", *PRUNE, "--out",
                        str(ROOT / "runs" / "student10")], check=True, cwd=ROOT)
    from lmdistill.compare.config import load_compare_config
    from lmdistill.compare.runner import run_compare

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    for seed in seeds:
        out = args.out / f"seed{seed}"
        started = time.time()
        run_compare(load_compare_config(RECIPE, seed_overrides(out, seed, first, args.overrides)))
        print(f"seed {seed}: {collect(out, seed)} results, {time.time() - started:.0f} s", flush=True)
    print(report())
    shutil.copy(args.out / f"seed{seeds[-1]}" / "comparison.md", args.out / "last_comparison.md")


if __name__ == "__main__":
    main()
