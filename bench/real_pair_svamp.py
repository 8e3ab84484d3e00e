"""A short real distillation: Qwen2.5-Coder-0.5B-Instruct from Qwen2.5-Coder-1.5B-Instruct on SVAMP.

    make real-models && python bench/real_pair_svamp.py                 # the table in docs/results.md
    python bench/real_pair_svamp.py --methods sft,kd --seeds 0 --steps 4  # a quick look

The task: write the SVAMP equation for a word problem. Every model reads the same chat
prompt (the problem plus one line asking for a single arithmetic expression, HINT below)
and decodes greedily; an answer is right when the safe equation evaluator gives the gold
value (`lmdistill.reasoning.arithmetic`), so "10 * 45" and "( 10.0 * 45.0 )" both count.

Rows: the first --train-rows of SVAMP's train split (after the 10% hold-out) to train
on, the first --test-rows of its test split to score. Each method trains the same student
from the same starting point (the released 0.5B instruct model, no SFT stage first) with
the same budget (--steps x --batch prompts, AdamW at --lr, constant): `sft` on the gold
equations; `kd` word-level KD on them (0.5 CE + 0.5 forward KL, the recipe default);
`gkd` on-policy half the time (lmbda 0.5, JSD beta 0.5); `promptkd` (7 soft-prompt
tokens, reverse KL on student samples). One seed = one data order, sampling stream and
initial prompt noise; the spread is over --seeds. Results: bench/results/real_pair_svamp-<UTC>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEACHER, STUDENT = "qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"
HINT = "Answer with one arithmetic expression over the numbers above that computes the answer, and nothing else."
METHOD_KEYS = {
    "sft": [],
    "kd": ["kd_ratio=0.5"],
    "gkd": ["lmbda=0.5", "beta=0.5", "temperature=1.0", "top_p=1.0"],
    "promptkd": ["prompt_len=7", "temperature=1.0", "top_p=1.0"],
}


def write_task_files(folder: Path, train_rows: int, test_rows: int) -> tuple[Path, Path]:
    """train.jsonl (instruction data: problem + HINT -> gold equation) and test.jsonl
    (reasoning JSONL: the same input, the gold equation as label)."""
    from lmdistill.reasoning.data import load_reasoning_dataset

    train = load_reasoning_dataset("svamp", "train").records[:train_rows]
    test = load_reasoning_dataset("svamp", "test").records[:test_rows]
    train_file, test_file = folder / "train.jsonl", folder / "test.jsonl"
    with open(train_file, "w") as f:
        for r in train:
            f.write(json.dumps({"instruction": f"{r.input}\n{HINT}", "output": r.label}) + "\n")
    with open(test_file, "w") as f:
        for r in test:
            f.write(json.dumps({"id": r.id, "input": f"{r.input}\n{HINT}", "label": r.label}) + "\n")
    return train_file, test_file


def accuracy(model: str, test_file: Path, args) -> dict:
    from lmdistill.reasoning.evaluate import evaluate_reasoning

    started = time.perf_counter()
    result = evaluate_reasoning(
        model,
        "jsonl",
        source=str(test_file),
        label_prefix="",
        prompt_format="chat",
        metric="equation",
        max_new_tokens=args.eval_new_tokens,
        batch_size=args.eval_batch,
    )
    return {"accuracy": result.accuracy, "n": result.n, "eval_s": time.perf_counter() - started,
            "samples": result.samples}


def train(method: str, seed: int, train_file: Path, out: Path, args) -> dict:
    from lmdistill.methods import load_config, method_class
    from lmdistill.trainer import Trainer

    overrides = [
        f"method={method}",
        f"student={STUDENT}",
        f"train_data={train_file}",
        f"output_dir={out}",
        "prompt_format=chat",
        "max_prompt_length=192",
        f"max_length={192 + args.sample_tokens}",
        f"steps={args.steps}",
        f"batch_size={args.batch}",
        f"lr={args.lr}",
        "lr_schedule=constant",
        "warmup_steps=0",
        "precision=bf16",
        "progress=false",
        f"seed={seed}",
    ] + METHOD_KEYS[method]
    if method != "sft":
        overrides.append(f"teacher={TEACHER}")
    if method in ("gkd", "promptkd"):
        overrides.append(f"max_new_tokens={args.sample_tokens}")
    started = time.perf_counter()
    Trainer(load_config(None, overrides)).train()
    wall = time.perf_counter() - started
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    key = method_class(method).progress_key  # the method's own objective (sft/kd: loss, gkd: jsd, ...)
    losses = [m[key] for m in metrics if key in m]
    return {"train_s": wall, "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "objective": key, "peak_rss_mb": max((m.get("peak_rss_mb", 0) for m in metrics), default=None)}


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default="sft,kd,gkd,promptkd")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--sample-tokens", type=int, default=32, help="on-policy tokens per student sample")
    parser.add_argument("--train-rows", type=int, default=256)
    parser.add_argument("--test-rows", type=int, default=100)
    parser.add_argument("--eval-new-tokens", type=int, default=40)
    parser.add_argument("--eval-batch", type=int, default=25)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--prior", default=None,
                        help="JSON of figures already measured with the same settings (teacher, student before, "
                             "runs): reused, only the missing (method, seed) runs are trained")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHOD_KEYS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {list(METHOD_KEYS)}")
    seeds = [int(s) for s in args.seeds.split(",")]

    import torch

    from lmdistill.model_zoo import chunked_model_installed

    for alias in (TEACHER, STUDENT):
        if not chunked_model_installed(alias):
            raise SystemExit(f"{alias} is not installed: run `make real-models` first")
    scratch = Path(tempfile.mkdtemp(prefix="lmdistill-svamp-"))
    train_file, test_file = write_task_files(scratch, args.train_rows, args.test_rows)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    result = {"args": vars(args), "hint": HINT, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    prior = json.loads(Path(args.prior).read_text()) if args.prior else {}
    for name, model in (("teacher", TEACHER), ("student before", STUDENT)):
        result[name] = prior.get(name) or accuracy(model, test_file, args)
        print(f"{name:15} {result[name]['accuracy']:5.1f}%  ({result[name]['eval_s']:.0f} s)", flush=True)
    result["runs"] = list(prior.get("runs", []))
    done = {(r["method"], r["seed"]) for r in result["runs"]}
    for seed in seeds:
        for method in methods:
            if (method, seed) in done:
                continue
            out = scratch / f"{method}-{seed}"
            run = {"method": method, "seed": seed, **train(method, seed, train_file, out, args)}
            run.update(accuracy(str(out / "student"), test_file, args))
            shutil.rmtree(out)  # ~10 GB each (student, final checkpoint with AdamW state): the disk is small
            result["runs"].append(run)
            print(
                f"{method:9} seed {seed}: {run['accuracy']:5.1f}%  {run['objective']} {run['first_loss']:.3f} -> "
                f"{run['last_loss']:.3f}  train {run['train_s']:.0f} s  eval {run['eval_s']:.0f} s",
                flush=True,
            )
    print()
    print(f"| model | SVAMP test accuracy, % (n = {result['teacher']['n']}) | train wall, s |")
    print("|---|---|---|")
    print(f"| teacher 1.5B | {result['teacher']['accuracy']:.1f} | |")
    print(f"| student 0.5B before | {result['student before']['accuracy']:.1f} | |")
    for method in methods:
        runs = [r for r in result["runs"] if r["method"] == method]
        print(f"| {method} | {spread([r['accuracy'] for r in runs])} | "
              f"{statistics.fmean(r['train_s'] for r in runs):.0f} |")
    path = Path(args.out) / f"real_pair_svamp-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"raw: {path}")


if __name__ == "__main__":
    main()
