"""LoRA student vs full fine-tuning, side by side: peak memory and tokens/s of one method.

    python bench/lora_vs_full.py [--workload smollm2|qwen-coder] [--method kd] [--rounds 2]

The demo pair by default: teacher SmolLM2-135M-Instruct, student its layers 0, 3, ..., 27
(as bench/vs_trl.py). Each run is its own process (peak RSS is per process), in the order
full, lora, full, lora, ... so drift on the shared machine hits both. A run: --steps steps
of `--method` (default kd, kd_ratio 1) on Dolly chat rows <= --max-length tokens, batch 4,
bf16 autocast, 2 torch threads; LoRA r 16, alpha 32 on every linear layer. Reported per
run: trainable parameters, peak RSS (MiB, the loop's last step), response tokens/s over the
steps after the first two (warm-up excluded); and the lora/full ratios of the round means.
Raw figures: bench/results/lora_vs_full-<UTC>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def child(args) -> None:
    """One run in this process; its figures as one JSON line on stdout."""
    import torch

    from lmdistill.methods import load_config
    from lmdistill.trainer import Trainer

    torch.set_num_threads(2)
    overrides = json.loads(args.child)
    trainer = Trainer(load_config(None, overrides))
    trainer.train()
    rows = [json.loads(line) for line in (Path(trainer.run_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "tokens" in r]
    # tokens_per_s is cumulative (all tokens so far / loop time so far): the rate after the
    # first two steps (warm-up) is the difference of the running totals
    done = [sum(r["tokens"] for r in steps[: i + 1]) for i in range(len(steps))]
    elapsed = [d / r["tokens_per_s"] for d, r in zip(done, steps)]
    rate = (done[-1] - done[1]) / (elapsed[-1] - elapsed[1])
    print(json.dumps({"trainable": trainer.parameters["trainable"], "total": trainer.parameters["total"],
                      "peak_rss_mb": steps[-1]["peak_rss_mb"], "tokens_per_s": rate,
                      "loss_first": steps[0].get("loss"), "loss_last": steps[-1].get("loss"),
                      "steps": len(steps)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", default="smollm2", choices=["smollm2", "qwen-coder"])
    parser.add_argument("--method", default="kd")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    from vs_trl import build_models
    from lmdistill.model_zoo import cache_dir

    teacher, student = build_models(args.workload, cache_dir() / "bench")
    data = Path(os.environ.get("LMDISTILL_DATA_DIR", ROOT.parent / "shared" / "data")) / "instruct/dolly/dev.jsonl"
    scratch = Path(tempfile.mkdtemp(prefix="lmdistill-lora-"))
    common = {"method": args.method, "teacher": teacher, "student": student, "train_data": str(data),
              "steps": args.steps, "batch_size": 4, "lr": 1e-4, "lr_schedule": "constant", "precision": "bf16",
              "max_length": args.max_length, "max_prompt_length": args.max_length - 64, "prompt_format": "chat",
              "progress": False, "seed": 0, "max_train_examples": 4 * args.steps, "report_to": ["none"]}
    if args.method == "kd":
        common["kd_ratio"] = 1.0
    variants = {"full": {}, "lora": {"student_lora": {"r": 16, "alpha": 32.0, "dropout": 0.0}}}
    runs = {name: [] for name in variants}
    for round_ in range(args.rounds):
        for name, extra in variants.items():
            run = scratch / f"{name}-{round_}"
            values = {**common, **extra, "output_dir": str(run)}
            config = json.dumps([f"{k}={json.dumps(v)}" for k, v in values.items()])
            out = subprocess.run([sys.executable, __file__, "--child", config], capture_output=True, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "2"})
            if out.returncode != 0:
                raise SystemExit(f"{name} run failed:\n{out.stderr[-3000:]}")
            figures = json.loads(out.stdout.strip().splitlines()[-1])
            runs[name].append(figures)
            print(f"round {round_} {name:4}: {figures['trainable']:>12,} of {figures['total']:,} parameters train, "
                  f"peak RSS {figures['peak_rss_mb']:7.0f} MiB, {figures['tokens_per_s']:7.1f} tokens/s, "
                  f"loss {figures['loss_first']:.3f} -> {figures['loss_last']:.3f}", flush=True)
            subprocess.run(["rm", "-rf", str(run)])  # checkpoints of large students fill the disk
    keys = ("peak_rss_mb", "tokens_per_s")
    mean = {n: {k: statistics.mean(r[k] for r in rs) for k in keys} for n, rs in runs.items()}
    ratios = {k: mean["lora"][k] / mean["full"][k] for k in keys}
    print(f"lora/full: peak RSS x{ratios['peak_rss_mb']:.2f}, tokens/s x{ratios['tokens_per_s']:.2f}")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%MZ")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"lora_vs_full-{args.workload}-{stamp}.json"
    path.write_text(json.dumps({"args": vars(args), "common": common, "runs": runs, "mean": mean, "ratios": ratios},
                               indent=2))
    print(f"raw figures: {path}")


if __name__ == "__main__":
    main()
