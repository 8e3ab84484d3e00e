"""`lmdistill compare`: every listed method from the same student, one table.

For a comparison recipe (`configs/compare_dolly.yaml`), each listed method is trained in
turn from the same initial student, with the same `train` keys (data, steps, batch,
seed, lengths), then evaluated with `lmdistill.instruct.evaluate.evaluate` on every evaluation
set with the same seeds. The run folder gets

    comparison.md    method x dataset ROUGE-L mean ± std (plus teacher and initial student)
    comparison.png   the same as a grouped bar chart
    comparison.json  everything above, machine-readable
    <name>/          each method's run folder (metrics, student/, eval.json or error.txt)

A method that fails is reported with its error and the others go on; a method whose
`eval.json` exists is not rerun when the command is repeated (a failed or interrupted one
is, resuming from its last checkpoint). Each eval.json records the settings it was made
with; a repeat with other evaluation or training settings stops with an error naming them
rather than mixing budgets in one table. With `exposure_bias_every: N`, each method keeps a
checkpoint every N steps and ExAccErr (`lmdistill.instruct.exposure_bias`) is measured on each,
giving ExAccErr over training steps (`exposure_bias.md` / `.png`).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


from lmdistill import checkpoint as ckpt
from lmdistill.config import (ConfigError, SamplingConfig, TrainConfig, build_config, check, config_fields,
                              config_to_dict, doc, expand_path, parse_overrides, read_recipe)
from lmdistill.instruct.data import load_instruction_data
from lmdistill.instruct.evaluate import EvalResult, GenerationSettings, dataset_name, evaluate, format_cell
from lmdistill.instruct.exposure_bias import measure_exposure_bias, tokenized_prompts
from lmdistill.methods import METHODS, method_class
from lmdistill.models import load_model, load_tokenizer
from lmdistill.trainer import Trainer
from lmdistill.sampling import eos_token_ids

log = logging.getLogger("lmdistill")

# Recipe keys that must be equal across methods for the comparison to be fair.
SHARED_KEYS = ("student", "teacher", "train_data", "steps", "batch_size", "grad_accum", "seed", "max_train_examples",
               "max_length", "max_prompt_length", "prompt_format")
TEACHER, INITIAL = "teacher", "initial student"


@dataclass
class CompareConfig:
    """A comparison: methods, shared training keys, evaluation sets and seeds."""

    output_dir: str = doc("Comparison folder: one sub-folder per method plus comparison.md/.png/.json.",
                          default="runs/compare")
    student: str = doc("The initial student every method starts from (folder, Hub id or alias).", default="")
    teacher: str = doc("The teacher (evaluated as a reference row, and used by every distillation method).",
                       default="")
    methods: list[str] = doc("Run names, trained in this order; a name is a method (`kd`, ...) unless its recipe "
                             "sets `method:`.", default_factory=list)
    recipes: dict = doc("name -> recipe YAML with that method's own keys (e.g. configs/kd_dolly.yaml).",
                        default_factory=dict)
    train: dict = doc("Recipe keys applied to every method (train_data, steps, batch_size, lr, seed, ...).",
                      default_factory=dict)
    method_overrides: dict = doc("name -> {key: value} for method-specific keys; may not change the shared keys "
                                 f"({', '.join(SHARED_KEYS)}).", default_factory=dict)
    eval_data: list[str] = doc("Evaluation JSONL files (`${LMDISTILL_DATA_DIR}` expanded).", default_factory=list)
    eval_seeds: list[int] = doc(
        "Sampling seeds; the table shows mean ± std over them.", default_factory=lambda: [10, 20, 30]
    )
    eval_max_examples: Optional[int] = doc("Evaluate on the first N examples of each set (None: all).", default=None)
    eval_max_new_tokens: Optional[int] = doc(
        "Cap on generated response tokens (MiniLLM/PromptKD: 256; None: up to eval_max_length).", default=256
    )
    eval_max_prompt_length: int = doc(
        "Prompts keep their first N tokens at evaluation (MiniLLM/PromptKD: 256).", default=256
    )
    eval_max_length: int = doc("Prompt + response token limit at evaluation.", default=512)
    evaluate_checkpoint: str = doc(
        "Which student of each method is evaluated: `final` (student/) or `best` (best/, "
        "the best dev checkpoint of a run with eval_every; student/ when there is none).",
        default="final",
    )
    eval_batch_size: int = doc("Prompts per generation batch at evaluation.", default=8)
    eval_greedy: bool = doc(
        "Greedy decoding instead of sampling (then all seeds give the same numbers).", default=False
    )
    prompt_format: str = doc("Prompt format at evaluation: auto, chat or alpaca.", default="auto")
    include_teacher: bool = doc("Add the teacher as a reference row.", default=True)
    include_initial_student: bool = doc("Add the initial student as a reference row.", default=True)
    clean_checkpoints: bool = doc("Delete a finished method's checkpoints (its final student/ stays).", default=True)
    exposure_bias_every: int = doc("Measure ExAccErr on a checkpoint every N steps (0: off).", default=0)
    exposure_bias_data: Optional[str] = doc("Prompts for ExAccErr (default: the first eval_data file).", default=None)
    exposure_bias_examples: int = doc("Prompts used for ExAccErr.", default=16)
    exposure_bias_length: int = doc(
        "Longest generation length l of ExAccErr(l); the plot over training uses it.", default=32
    )
    exposure_bias_samples: int = doc("Sampled responses per prompt for ExAccErr.", default=1)
    exposure_bias_no_repeat_ngram_size: int = doc(
        "n-gram blocking of both ExAccErr rollouts (PromptKD's script: 6; 0: plain ancestral samples).", default=6
    )
    exposure_bias_averaging: str = doc(
        "`expectation`: R(l), E(l) as expectations over samples; `running`: each "
        "position averaged over the samples still running there, as PromptKD's "
        "script.",
        default="expectation",
    )
    exposure_bias_oracle: str = doc(
        "`teacher`; `prompted_teacher`: for PromptKD runs the oracle is the teacher "
        "with the run's soft prompt, as the paper's analysis (other methods: the "
        "teacher).",
        default="teacher",
    )

    def validate(self) -> None:
        check(bool(self.student), "student", "the initial student model", self.student)
        check(bool(self.teacher), "teacher", "a teacher model", self.teacher)
        check(bool(self.methods), "methods", "a non-empty list of methods", self.methods)
        check(len(set(self.methods)) == len(self.methods), "methods", "distinct names", self.methods)
        for name in self.methods:
            check(
                name in METHODS or name in self.recipes,
                "methods",
                f"method names from {sorted(METHODS)} (or names with a recipe)",
                name,
            )
        for name in list(self.recipes) + list(self.method_overrides):
            check(
                name in self.methods,
                "recipes" if name in self.recipes else "method_overrides",
                f"names listed in methods {self.methods}",
                name,
            )
        for name, path in self.recipes.items():
            check(Path(expand_path(str(path))).is_file(), "recipes", f"an existing recipe file for '{name}'", path)
        for name, values in self.method_overrides.items():
            check(isinstance(values, dict), "method_overrides", f"a mapping of key: value for '{name}'", values)
            shared = sorted(set(values) & set(SHARED_KEYS))
            check(
                not shared, "method_overrides", f"no shared keys for '{name}' (every method must get the same)", shared
            )
        check(
            all(k not in self.train for k in ("student", "teacher", "output_dir", "method")),
            "train",
            "no student/teacher/output_dir/method keys (set them at the top level)",
            sorted(self.train),
        )
        check(bool(self.eval_data), "eval_data", "a non-empty list of evaluation files", self.eval_data)
        check(bool(self.eval_seeds), "eval_seeds", "a non-empty list of seeds", self.eval_seeds)
        check(
            self.eval_max_examples is None or self.eval_max_examples > 0,
            "eval_max_examples",
            "> 0 or null",
            self.eval_max_examples,
        )
        check(
            self.eval_max_new_tokens is None or self.eval_max_new_tokens > 0,
            "eval_max_new_tokens",
            "> 0 or null",
            self.eval_max_new_tokens,
        )
        check(self.eval_max_length > 0, "eval_max_length", "> 0", self.eval_max_length)
        check(self.eval_max_prompt_length > 0, "eval_max_prompt_length", "> 0", self.eval_max_prompt_length)
        check(
            self.evaluate_checkpoint in ("final", "best"),
            "evaluate_checkpoint",
            "final or best",
            self.evaluate_checkpoint,
        )
        check(
            self.exposure_bias_oracle in ("teacher", "prompted_teacher"),
            "exposure_bias_oracle",
            "teacher or prompted_teacher",
            self.exposure_bias_oracle,
        )
        check(
            self.exposure_bias_averaging in ("expectation", "running"),
            "exposure_bias_averaging",
            "expectation or running",
            self.exposure_bias_averaging,
        )
        check(
            self.exposure_bias_no_repeat_ngram_size >= 0,
            "exposure_bias_no_repeat_ngram_size",
            ">= 0",
            self.exposure_bias_no_repeat_ngram_size,
        )
        check(self.eval_batch_size > 0, "eval_batch_size", "> 0", self.eval_batch_size)
        check(
            self.prompt_format in ("auto", "chat", "alpaca"),
            "prompt_format",
            "auto, chat or alpaca",
            self.prompt_format,
        )
        check(self.exposure_bias_every >= 0, "exposure_bias_every", ">= 0", self.exposure_bias_every)
        check(self.exposure_bias_examples > 0, "exposure_bias_examples", "> 0", self.exposure_bias_examples)
        check(self.exposure_bias_length > 0, "exposure_bias_length", "> 0", self.exposure_bias_length)
        check(self.exposure_bias_samples > 0, "exposure_bias_samples", "> 0", self.exposure_bias_samples)

    @property
    def out(self) -> Path:
        return Path(expand_path(self.output_dir))


def load_compare_config(path: str | Path | None, overrides: Optional[list[str]] = None) -> CompareConfig:
    """Read a comparison recipe; `key=value` overrides, `train.steps=5` for keys of the mappings."""
    values, where = read_recipe(path)
    for key, value in parse_overrides(overrides or []).items():
        if "." in key:
            outer, inner = key.split(".", 1)
            nested = dict(values.get(outer) or {})
            if "." in inner:  # method_overrides.kd.kd_ratio=0.3
                name, inner = inner.split(".", 1)
                nested[name] = {**(nested.get(name) or {}), inner: value}
            else:
                nested[inner] = value
            values[outer] = nested
            where[outer] = "command line"
        else:
            values[key] = value
            where[key] = "command line"
    return build_config(CompareConfig, values, where)


# ----- training one method -----


def method_config(cc: CompareConfig, name: str):
    """The method's recipe + the shared `train` keys + its overrides + the comparison's fixed keys."""
    values, where = read_recipe(Path(expand_path(str(cc.recipes[name]))) if name in cc.recipes else None)
    for key in ("student", "teacher", "output_dir"):  # the comparison decides these
        values.pop(key, None)
    method = values.get("method", name)
    config_class = method_class(method, where.get("method", "compare recipe")).config_class
    fields = config_fields(config_class)
    for source, extra in (("train", cc.train), (f"method_overrides.{name}", cc.method_overrides.get(name, {}))):
        for key, value in extra.items():
            if source == "train" and key not in fields and key in SAMPLING_KEYS:
                continue  # the shared sampling budget applies to the methods that generate
            values[key] = value
            where[key] = f"compare recipe, {source}"
    values.update(method=method, student=cc.student, teacher=cc.teacher, output_dir=str(cc.out / name), resume=True)
    if cc.exposure_bias_every:
        steps = int(values.get("steps", config_class.steps))
        values.update(save_every=cc.exposure_bias_every, keep_checkpoints=steps // cc.exposure_bias_every + 1)
    return build_config(config_class, values, where)


def train_method(cc: CompareConfig, name: str) -> Path:
    config = method_config(cc, name)
    trainer = Trainer(config)
    try:
        return trainer.train()
    finally:
        del trainer
        gc.collect()


# ----- evaluation -----


def eval_settings(cc: CompareConfig) -> GenerationSettings:
    return GenerationSettings(
        greedy=cc.eval_greedy,
        max_length=cc.eval_max_length,
        max_prompt_length=cc.eval_max_prompt_length,
        max_new_tokens=cc.eval_max_new_tokens,
        batch_size=cc.eval_batch_size,
    )


def evaluate_model(cc: CompareConfig, spec: str) -> dict[str, EvalResult]:
    files = [expand_path(f) for f in cc.eval_data]
    return evaluate(
        spec,
        files,
        max_examples=cc.eval_max_examples,
        seeds=list(cc.eval_seeds),
        prompt_format=cc.prompt_format,
        settings=eval_settings(cc),
        progress=False,
    )


# Shared `train` keys that only methods generating during training have (SamplingConfig's own).
SAMPLING_KEYS = frozenset(config_fields(SamplingConfig)) - frozenset(config_fields(TrainConfig))

# Keys of a method's training config that only say where and how verbosely it runs.
_RUN_ONLY_KEYS = ("output_dir", "resume", "save_every", "keep_checkpoints", "progress")


def run_settings(cc: CompareConfig, name: Optional[str] = None) -> dict:
    """What a cached result depends on: the evaluation keys, plus the method's resolved training
    config (None for the reference rows). Stored in eval.json and compared on a repeat."""
    evaluation = {
        "eval_data": [expand_path(f) for f in cc.eval_data],
        "eval_seeds": list(cc.eval_seeds),
        "eval_max_examples": cc.eval_max_examples,
        "eval_max_new_tokens": cc.eval_max_new_tokens,
        "eval_max_length": cc.eval_max_length,
        "eval_batch_size": cc.eval_batch_size,
        "eval_max_prompt_length": cc.eval_max_prompt_length,
        "evaluate_checkpoint": cc.evaluate_checkpoint,
        "exposure_bias_oracle": cc.exposure_bias_oracle,
        "eval_greedy": cc.eval_greedy,
        "prompt_format": cc.prompt_format,
    }
    training = None
    if name is not None:
        training = {k: v for k, v in config_to_dict(method_config(cc, name)).items() if k not in _RUN_ONLY_KEYS}
    return json.loads(json.dumps({"evaluation": evaluation, "training": training}, default=str))


def _results_dict(results: dict[str, EvalResult]) -> dict:
    return {k: r.to_dict() for k, r in results.items()}


def _results_to_json(results: dict[str, EvalResult], settings: dict) -> dict:
    return {"settings": settings, "results": _results_dict(results)}


def _load_results(path: Path, settings: dict) -> dict[str, EvalResult]:
    """A cached eval.json, refused when it was made with other settings (reusing it would put
    numbers from another budget or evaluation into this table)."""
    data = json.loads(path.read_text())
    stored = data.get("settings") or {}
    if stored != settings:
        changed = []
        for part in ("evaluation", "training"):
            old, new = stored.get(part) or {}, settings.get(part) or {}
            changed += [f"{part}.{key}" for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
        raise ConfigError(
            f"{path}: made with other settings than this comparison's "
            f"(differs in: {', '.join(changed) or 'no settings recorded'}); use a new output_dir, "
            f"or delete {path.parent} to redo it"
        )
    return {
        k: EvalResult(v["dataset"], v["n"], v["seeds"], v["rougeL_per_seed"], v.get("samples", []))
        for k, v in data["results"].items()
    }


def _short_error(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return text if len(text) <= 200 else text[:197] + "..."


# ----- exposure bias over training -----


def _exposure_bias(cc: CompareConfig, model_spec: str, tokenizer, teacher, teacher_prefix=None) -> dict:
    data = expand_path(cc.exposure_bias_data or cc.eval_data[0])
    examples = load_instruction_data(data, split="validation", limit=cc.exposure_bias_examples)
    prompts = tokenized_prompts(examples, tokenizer, cc.prompt_format)
    model = load_model(model_spec).eval()
    result = measure_exposure_bias(
        model,
        teacher,
        prompts,
        eos_token_ids(model, tokenizer),
        tokenizer.pad_token_id,
        cc.exposure_bias_length,
        cc.exposure_bias_samples,
        seed=0,
        batch_size=cc.eval_batch_size,
        no_repeat_ngram_size=cc.exposure_bias_no_repeat_ngram_size,
        averaging=cc.exposure_bias_averaging,
        teacher_prefix=teacher_prefix,
    )
    del model
    return result.to_dict()


def exposure_bias_over_training(cc: CompareConfig, name: str, run_dir: Path, state: dict) -> dict[int, dict]:
    """ExAccErr on the initial student (step 0, shared) and every kept checkpoint of a method."""
    tokenizer = load_tokenizer(cc.student)
    if "teacher_model" not in state:
        state["teacher_model"] = load_model(cc.teacher).eval()
    initial_file = cc.out / "initial_student" / "exposure_bias.json"
    if not initial_file.exists():
        initial_file.parent.mkdir(parents=True, exist_ok=True)
        initial_file.write_text(json.dumps(_exposure_bias(cc, cc.student, tokenizer, state["teacher_model"])))
    curve = {0: json.loads(initial_file.read_text())}
    for step, folder in ckpt.list_checkpoints(run_dir):
        log.info("compare: ExAccErr of %s at step %d", name, step)
        prefix = None
        if cc.exposure_bias_oracle == "prompted_teacher":  # PromptKD runs: that checkpoint's soft prompt
            soft_prompt = ckpt.load_module_state(folder, "soft_prompt")
            if soft_prompt is not None:
                weight = state["teacher_model"].get_input_embeddings().weight
                prefix = soft_prompt["embeddings"].to(weight.device, weight.dtype)
        curve[step] = _exposure_bias(cc, str(folder / "student"), tokenizer, state["teacher_model"], prefix)
    (run_dir / "exposure_bias.json").write_text(json.dumps({str(k): v for k, v in curve.items()}, indent=2))
    return curve


# ----- the whole comparison -----


def run_compare(cc: CompareConfig) -> Path:
    out = cc.out
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, EvalResult] | str] = {}
    curves: dict[str, dict[int, dict]] = {}
    shared_state: dict = {}

    references = ([(TEACHER, cc.teacher, "teacher")] if cc.include_teacher else []) + (
        [(INITIAL, cc.student, "initial_student")] if cc.include_initial_student else []
    )
    for row, spec, folder in references:
        rows[row] = _cached_eval(
            out / folder / "eval.json", lambda spec=spec: evaluate_model(cc, spec), row, run_settings(cc)
        )

    for name in cc.methods:
        run_dir = out / name
        done = run_dir / "eval.json"
        if done.exists():
            log.info("compare: %s already finished, reusing %s", name, done)
            rows[name] = _load_results(done, run_settings(cc, name))
        else:
            try:
                if not (run_dir / "student" / "config.json").exists():
                    log.info("compare: training %s", name)
                    train_method(cc, name)
                if cc.exposure_bias_every:
                    curves[name] = exposure_bias_over_training(cc, name, run_dir, shared_state)
                student = run_dir / "student"
                if cc.evaluate_checkpoint == "best" and (run_dir / "best" / "config.json").exists():
                    student = run_dir / "best"
                log.info("compare: evaluating %s (%s)", name, student)
                results = evaluate_model(cc, str(student))
                done.write_text(json.dumps(_results_to_json(results, run_settings(cc, name)), indent=2))
                (run_dir / "error.txt").unlink(missing_ok=True)
                rows[name] = results
                if cc.clean_checkpoints:
                    for _, folder in ckpt.list_checkpoints(run_dir):
                        shutil.rmtree(folder, ignore_errors=True)
            except Exception as e:  # noqa: BLE001 - one method's failure must not stop the others
                log.error("compare: %s failed: %s", name, _short_error(e))
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / "error.txt").write_text(traceback.format_exc())
                rows[name] = _short_error(e)
            finally:
                gc.collect()
        if name not in curves and (run_dir / "exposure_bias.json").exists():
            curves[name] = {int(k): v for k, v in json.loads((run_dir / "exposure_bias.json").read_text()).items()}
        write_outputs(cc, rows, curves)  # after every method, so a long run shows progress
    return out


def _cached_eval(path: Path, compute, row: str, settings: dict):
    if path.exists():
        return _load_results(path, settings)
    try:
        results = compute()
    except Exception as e:  # noqa: BLE001
        log.error("compare: evaluating %s failed: %s", row, _short_error(e))
        return _short_error(e)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_results_to_json(results, settings), indent=2))
    return results


# ----- outputs -----


def comparison_table(rows: dict[str, dict[str, EvalResult] | str], datasets: list[str]) -> str:
    """Markdown: one row per model, one column per dataset, 'mean ± std' or the error."""
    lines = ["| model | " + " | ".join(datasets) + " |", "|---|" + "---|" * len(datasets)]
    for name, results in rows.items():
        if isinstance(results, str):
            cells = [f"failed: {results.replace('|', '/')}"] + [""] * (len(datasets) - 1)
        else:
            cells = [format_cell(results[d]) if d in results else "-" for d in datasets]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def exposure_bias_table(curves: dict[str, dict[int, dict]], length: int) -> str:
    steps = sorted({s for c in curves.values() for s in c})
    lines = ["| method | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for name, curve in curves.items():
        cells = [f"{curve[s]['exacc_err'][length - 1]:.1f}" if s in curve else "-" for s in steps]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(cc: CompareConfig, rows: dict, curves: dict) -> None:
    out = cc.out
    datasets = [dataset_name(expand_path(f)) for f in cc.eval_data]
    seeds = ", ".join(str(s) for s in cc.eval_seeds)
    n = f"first {cc.eval_max_examples}" if cc.eval_max_examples else "all"
    text = [
        f"# Comparison: {', '.join(cc.methods)}",
        "",
        f"Teacher `{cc.teacher}`, initial student `{cc.student}`. Shared training keys: "
        + ", ".join(f"{k}={v}" for k, v in cc.train.items())
        + ".",
        f"ROUGE-L (F1 x 100, mean ± std over seeds {seeds}); {n} examples per set; "
        f"{'greedy' if cc.eval_greedy else 'sampled'} responses, max_new_tokens={cc.eval_max_new_tokens}.",
        "",
        comparison_table(rows, datasets),
        "",
    ]
    if curves:
        text += [
            f"## ExAccErr({cc.exposure_bias_length}) over training steps (%)",
            "",
            exposure_bias_table(curves, cc.exposure_bias_length),
            "",
        ]
        plot_exposure_bias_curves(curves, cc.exposure_bias_length, out / "exposure_bias.png")
    (out / "comparison.md").write_text("\n".join(text))
    (out / "comparison.json").write_text(
        json.dumps({name: (r if isinstance(r, str) else _results_dict(r)) for name, r in rows.items()}, indent=2)
    )
    plot_comparison(rows, datasets, out / "comparison.png")


def plot_comparison(rows: dict, datasets: list[str], path: Path) -> None:
    """Grouped bars: one group per dataset, one bar per model, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = {name: r for name, r in rows.items() if not isinstance(r, str)}
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(datasets) * max(1, len(ok)) / 3), 4))
    width = 0.8 / max(1, len(ok))
    for i, (name, results) in enumerate(ok.items()):
        xs = [d + (i - (len(ok) - 1) / 2) * width for d in range(len(datasets))]
        means = [results[d].mean if d in results else math.nan for d in datasets]
        stds = [results[d].std if d in results else 0.0 for d in datasets]
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=name)
    ax.set_xticks(range(len(datasets)), datasets)
    ax.set_ylabel("ROUGE-L")
    failed = [name for name, r in rows.items() if isinstance(r, str)]
    ax.set_title("ROUGE-L by method" + (f" (failed: {', '.join(failed)})" if failed else ""))
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_exposure_bias_curves(curves: dict[str, dict[int, dict]], length: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        steps = sorted(curve)
        ax.plot(steps, [curve[s]["exacc_err"][length - 1] for s in steps], marker="o", label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"ExAccErr({length}) (%)")
    ax.set_title("Exposure bias over training")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
