"""Distilling step-by-step: one forward pass per task (`separate`) vs one concatenated batch
(`concat`), timed side by side on the real student.

Each round trains `step_by_step` on SVAMP for a few steps once per mode, each in its own
process (A B A B), and reads the seconds per optimiser step from metrics.jsonl (the first
step, warm-up, left out). Prints both modes per round and the concat/separate ratio.

    python bench/multitask_forward.py --rounds 2 --steps 6
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("separate", "concat")


def seconds_per_step(run_dir: Path) -> float:
    """Mean seconds per step after the first (warm-up); metrics rows carry cumulative tokens/s."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    total, elapsed = 0.0, []
    for row in rows:
        total += row["tokens"]
        elapsed.append(total / row["tokens_per_s"])  # seconds since the loop started
    return (elapsed[-1] - elapsed[0]) / (len(elapsed) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--recipe", default=str(ROOT / "configs" / "step_by_step_svamp.yaml"))
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="lmdistill-multitask-"))
    results = {mode: [] for mode in MODES}
    for round_ in range(args.rounds):
        for mode in MODES:
            run_dir = scratch / f"{mode}-{round_}"
            command = [sys.executable, "-m", "lmdistill.cli", "train", args.recipe, f"output_dir={run_dir}",
                       f"multitask_forward={mode}", f"steps={args.steps}", f"precision={args.precision}",
                       "progress=false", "save_every=0", "warmup_steps=0"]
            subprocess.run(command, check=True, cwd=ROOT, env=os.environ.copy(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            results[mode].append(seconds_per_step(run_dir))
            print(f"round {round_} {mode:8s} {results[mode][-1]:.2f} s/step", flush=True)
    ratios = [c / s for s, c in zip(results["separate"], results["concat"])]
    print(f"concat / separate seconds per step: x{statistics.mean(ratios):.2f} "
          f"(per round: {', '.join(f'{r:.2f}' for r in ratios)}); {args.precision}, batch size from the recipe")


if __name__ == "__main__":
    main()
