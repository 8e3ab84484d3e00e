"""Across tokenizers, a real run: SmolLM2-135M-Instruct (49k vocabulary) from
Qwen2.5-Coder-1.5B-Instruct (152k) on SVAMP, SFT on gold vs the two cross-tokenizer methods.

    make real-models && python bench/cross_tokenizer_svamp.py       # the table in docs/results.md

The task and scoring are bench/real_pair_svamp.py's: every model reads its own chat prompt
(the problem plus HINT), decodes greedily, and is right when the safe equation evaluator
gives the gold value. The student trains from the released SmolLM2 instruct model with one
budget (--steps x --batch prompts of the first --train-rows SVAMP train rows, AdamW at --lr,
constant): `sft` on the gold equations; `uld` CE + ULD on them (the released code's defaults,
positions aligned); `gold` GKD's recipe across tokenizers (lmbda 0.5: half the micro-batches
the student's own samples, re-tokenized for the teacher; JSD beta 0.5 on the shared
vocabulary + ULD on the rest). Seeds: data order and sampling. Results:
bench/results/cross_tokenizer_svamp-<UTC>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
TEACHER, STUDENT = "qwen2.5-coder-1.5b-instruct", "smollm2-135m-instruct"
METHOD_KEYS = {
    "sft": [],
    "uld": ["ce_weight=1.0", "uld_weight=1.0", "alignment=positions"],
    "gold": ["lmbda=0.5", "beta=0.5", "temperature=1.0", "top_p=1.0"],
}


def train(method: str, seed: int, train_file: Path, out: Path, args) -> dict:
    from lmdistill.methods import load_config, method_class
    from lmdistill.trainer import Trainer

    overrides = [f"method={method}", f"student={STUDENT}", f"train_data={train_file}", f"output_dir={out}",
                 "prompt_format=chat", "max_prompt_length=192", f"max_length={192 + args.sample_tokens}",
                 f"steps={args.steps}", f"batch_size={args.batch}", f"lr={args.lr}", "lr_schedule=constant",
                 "warmup_steps=0", "precision=bf16", "progress=false", f"seed={seed}", "report_to=[none]"]
    overrides += METHOD_KEYS[method]
    if method != "sft":
        overrides += [f"teacher={TEACHER}", f"max_new_tokens={args.sample_tokens}"]
    started = time.perf_counter()
    Trainer(load_config(None, overrides)).train()
    wall = time.perf_counter() - started
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    key = method_class(method).progress_key
    losses = [m[key] for m in metrics if key in m]
    unaligned = sum(m.get("unaligned_rows", 0) for m in metrics)
    return {"train_s": wall, "first_loss": losses[0], "last_loss": losses[-1], "objective": key,
            "unaligned_rows": unaligned}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default="sft,uld,gold")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--sample-tokens", type=int, default=32)
    parser.add_argument("--train-rows", type=int, default=256)
    parser.add_argument("--test-rows", type=int, default=100)
    parser.add_argument("--eval-new-tokens", type=int, default=40)
    parser.add_argument("--eval-batch", type=int, default=25)
    parser.add_argument("--teacher-accuracy", type=float, default=None,
                        help="the teacher's accuracy on the same rows, if measured already (real_pair_svamp.py)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]

    from real_pair_svamp import accuracy, spread, write_task_files
    from lmdistill.model_zoo import chunked_model_installed

    if not chunked_model_installed(TEACHER):
        raise SystemExit(f"{TEACHER} is not installed: run `make real-models` first")
    scratch = Path(tempfile.mkdtemp(prefix="lmdistill-cross-"))
    train_file, test_file = write_task_files(scratch, args.train_rows, args.test_rows)
    result = {"args": vars(args), "runs": []}
    if args.teacher_accuracy is None:
        result["teacher"] = accuracy(TEACHER, test_file, args)
    else:
        result["teacher"] = {"accuracy": args.teacher_accuracy, "n": args.test_rows, "reused": True}
    result["student before"] = accuracy(STUDENT, test_file, args)
    for name in ("teacher", "student before"):
        print(f"{name:15} {result[name]['accuracy']:5.1f}%", flush=True)
    for seed in seeds:
        for method in methods:
            out = scratch / f"{method}-{seed}"
            run = {"method": method, "seed": seed, **train(method, seed, train_file, out, args)}
            run.update(accuracy(str(out / "student"), test_file, args))
            shutil.rmtree(out)
            result["runs"].append(run)
            print(f"{method:5} seed {seed}: {run['accuracy']:5.1f}%  {run['objective']} {run['first_loss']:.3f} -> "
                  f"{run['last_loss']:.3f}  train {run['train_s']:.0f} s  eval {run['eval_s']:.0f} s  "
                  f"unaligned rows {run['unaligned_rows']:.0f}", flush=True)
    print(f"\n| model | SVAMP test accuracy, % (n = {args.test_rows}) | seeds | train wall, s |\n|---|---|---|---|")
    print(f"| teacher Qwen2.5-Coder-1.5B-Instruct | {result['teacher']['accuracy']:.1f} | | |")
    print(f"| student SmolLM2-135M-Instruct before | {result['student before']['accuracy']:.1f} | | |")
    for method in methods:
        runs = [r for r in result["runs"] if r["method"] == method]
        per_seed = ", ".join(f"{r['accuracy']:.0f}" for r in runs)
        wall = statistics.fmean(r["train_s"] for r in runs)
        print(f"| {method} | {spread([r['accuracy'] for r in runs])} | {per_seed} | {wall:.0f} |")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = Path(args.out) / f"cross_tokenizer_svamp-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    for run in result["runs"]:
        run.pop("samples", None)
    path.write_text(json.dumps(result, indent=1, default=str))
    print(f"raw: {path}")


if __name__ == "__main__":
    main()
