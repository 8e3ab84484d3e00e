"""`lmdistill compare`: the papers' protocol, then every listed method, one table.

    stage 0  teacher_sft    the teacher fine-tuned on the training split      <out>/teacher_sft/
    stage 1  student_init   the student's SFT init                             <out>/student_init/
    methods                 each from the start its reference uses (`init_methods` from stage 1,
                            the others from the pre-trained student), with the shared budget
                            (`train`) and its own recipe's optimiser settings  <out>/<name>/

Every run selects its checkpoint on the dev split (`dev_examples` rows held out of training,
`eval_every`) when asked, and is evaluated with `lmdistill.instruct.evaluate.evaluate` on every
evaluation set with the same seeds. A finished stage or method is not rerun when the command is
repeated (an interrupted one resumes from its last checkpoint); a result made with other
settings stops the command instead of mixing budgets in one table. A method that fails is
reported with its error and the others go on. With `exposure_bias_every: N`, each method keeps
a checkpoint every N steps and ExAccErr (`lmdistill.instruct.exposure_bias`) is measured on
each, giving ExAccErr over training steps.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lmdistill import checkpoint as ckpt
from lmdistill.compare.config import SAMPLING_KEYS, CompareConfig
from lmdistill.compare.report import results_dict, write_outputs
from lmdistill.config import ConfigError, build_config, config_fields, config_to_dict, expand_path, read_recipe
from lmdistill.instruct.data import Columns, load_instruction_data
from lmdistill.instruct.evaluate import EvalResult, GenerationSettings, evaluate
from lmdistill.instruct.exposure_bias import measure_exposure_bias, tokenized_prompts
from lmdistill.methods import method_class
from lmdistill.models import load_model, load_tokenizer
from lmdistill.sampling import eos_token_ids
from lmdistill.trainer import Trainer

log = logging.getLogger("lmdistill")

TEACHER, INITIAL, INIT = "teacher", "initial student", "student init"
# Keys of a run's training config that only say where and how verbosely it runs.
_RUN_ONLY_KEYS = ("output_dir", "resume", "save_every", "keep_checkpoints", "progress")


@dataclass
class Protocol:
    """What the stages produced: the teacher every method distils from, the start of the
    `init_methods`, and the dev split (None when there is none)."""

    teacher: str
    init_student: str
    dev_file: Optional[str]

    def start(self, cc: CompareConfig, name: str) -> str:
        return self.init_student if name in cc.init_methods else cc.student


# ----- the dev split -----


def write_dev_split(cc: CompareConfig) -> Optional[str]:
    """The first `dev_examples` training rows as `<out>/dev.jsonl` (the guard then drops them from
    every run's training, since each run evaluates on them); None without a dev split."""
    if not cc.dev_examples:
        return None
    path = cc.out / "dev.jsonl"
    if not path.exists():
        t = cc.train
        columns = Columns(t.get("prompt_field"), t.get("response_field"), t.get("messages_field"))
        rows = load_instruction_data(expand_path(str(t["train_data"])), t.get("split", "train"), cc.dev_examples,
                                     columns)
        records = [{"messages": e.messages} if e.messages else
                   {"instruction": e.instruction, "prompt": e.alpaca_prompt, "output": e.references} for e in rows]
        partial = path.with_suffix(".partial")
        partial.write_text("".join(json.dumps(r) + "\n" for r in records))
        partial.rename(path)
    return str(path)


# ----- one run's config -----


def run_config(cc: CompareConfig, recipe: Optional[str], name: str, student: str, teacher: str,
               dev_file: Optional[str], steps: Optional[int] = None, overrides: Optional[dict] = None):
    """A recipe + the shared budget (`train`) + `overrides` + what the comparison decides: the
    output folder, the start, the teacher, the dev split and the test sets the guard keeps out.
    The recipe's warm-up is scaled with its steps to the budget's (the reference's fraction)."""
    values, where = read_recipe(Path(expand_path(recipe)) if recipe else None)
    recipe_steps = values.get("steps")
    for key in ("student", "teacher", "output_dir"):  # the comparison decides these
        values.pop(key, None)
    method = values.get("method", name)
    config_class = method_class(method, where.get("method", "compare recipe")).config_class
    fields = config_fields(config_class)
    budget = dict(cc.train, **({"steps": steps} if steps else {}))
    for source, extra in (("train", budget), (f"method_overrides.{name}", overrides or {})):
        for key, value in extra.items():
            if source == "train" and key not in fields and key in SAMPLING_KEYS:
                continue  # the shared sampling budget applies to the methods that generate
            values[key] = value
            where[key] = f"compare recipe, {source}"
    if recipe_steps and "steps" in budget and values.get("warmup_steps") and "warmup_steps" not in (overrides or {}):
        values["warmup_steps"] = round(int(values["warmup_steps"]) * int(budget["steps"]) / int(recipe_steps))
    values.update(method=method, student=student, teacher=teacher, output_dir=str(cc.out / name), resume=True,
                  test_data=[expand_path(f) for f in cc.eval_data])
    if dev_file and "valid_data" in fields and "valid_data" not in (overrides or {}):
        values["valid_data"] = dev_file  # DistiLLM's validation loss: the reference's dev split
    if dev_file and cc.eval_every:
        values.update(eval_data=dev_file, eval_every=cc.eval_every, eval_examples=cc.dev_examples,
                      eval_max_new_tokens=cc.eval_max_new_tokens or cc.eval_max_length)  # the budget's responses
    elif dev_file:
        values.update(test_data=values["test_data"] + [dev_file])  # held out all the same
    if cc.exposure_bias_every and overrides is not None:
        total = int(values.get("steps", config_class.steps))
        values.update(save_every=cc.exposure_bias_every, keep_checkpoints=total // cc.exposure_bias_every + 1)
    return build_config(config_class, values, where)


def method_config(cc: CompareConfig, name: str, protocol: Protocol):
    recipe = str(cc.recipes[name]) if name in cc.recipes else None
    return run_config(cc, recipe, name, protocol.start(cc, name), protocol.teacher, protocol.dev_file,
                      overrides=cc.method_overrides.get(name, {}))


def stage_configs(cc: CompareConfig, dev_file: Optional[str]) -> dict:
    """name -> config of the protocol stages asked for (stage 0, then stage 1)."""
    stages = {}
    if cc.teacher_sft:
        stages["teacher_sft"] = run_config(cc, cc.teacher_sft_recipe, "teacher_sft", cc.teacher, cc.teacher, dev_file,
                                           cc.teacher_sft_steps)
    if cc.student_init:
        stages["student_init"] = run_config(cc, cc.student_init_recipe, "student_init", cc.student, cc.teacher,
                                            dev_file, cc.student_init_steps)
    return stages


def train_method(config) -> Path:
    trainer = Trainer(config)
    try:
        return trainer.train()
    finally:
        del trainer
        gc.collect()


def selected_student(cc: CompareConfig, run_dir: Path) -> Path:
    """best/ when the run selected one and the comparison evaluates the selected checkpoints, else student/."""
    if cc.evaluate_checkpoint == "best" and (run_dir / "best" / "config.json").exists():
        return run_dir / "best"
    return run_dir / "student"


def run_stages(cc: CompareConfig) -> Protocol:
    """Stages 0 and 1 (each skipped when finished), giving the teacher and the init the methods use."""
    dev_file = write_dev_split(cc)
    teacher, init = cc.teacher, cc.init_student or cc.student
    for name, config in stage_configs(cc, dev_file).items():
        run_dir = cc.out / name
        if not (run_dir / "student" / "config.json").exists():
            log.info("compare: stage %s", name)
            train_method(config)
            clean(cc, run_dir)
        chosen = str(selected_student(cc, run_dir))
        if name == "teacher_sft":
            teacher = chosen
        else:
            init = chosen
    return Protocol(teacher, init, dev_file)


def clean(cc: CompareConfig, run_dir: Path) -> None:
    if cc.clean_checkpoints:
        for _, folder in ckpt.list_checkpoints(run_dir):
            shutil.rmtree(folder, ignore_errors=True)


# ----- evaluation -----


def eval_settings(cc: CompareConfig) -> GenerationSettings:
    return GenerationSettings(greedy=cc.eval_greedy, max_length=cc.eval_max_length,
                              max_prompt_length=cc.eval_max_prompt_length, max_new_tokens=cc.eval_max_new_tokens,
                              batch_size=cc.eval_batch_size)


def evaluate_model(cc: CompareConfig, spec: str) -> dict[str, EvalResult]:
    return evaluate(spec, [expand_path(f) for f in cc.eval_data], max_examples=cc.eval_max_examples,
                    seeds=list(cc.eval_seeds), prompt_format=cc.prompt_format, settings=eval_settings(cc),
                    progress=False)


def run_settings(cc: CompareConfig, config=None) -> dict:
    """What a cached result depends on: the evaluation keys, plus the run's resolved training
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
    if config is not None:
        training = {k: v for k, v in config_to_dict(config).items() if k not in _RUN_ONLY_KEYS}
    return json.loads(json.dumps({"evaluation": evaluation, "training": training}, default=str))


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
    return {k: EvalResult(v["dataset"], v["n"], v["seeds"], v["rougeL_per_seed"], v.get("samples", []))
            for k, v in data["results"].items()}


def _cached_eval(cc: CompareConfig, path: Path, spec: str, row: str, settings: dict):
    if path.exists():
        return _load_results(path, settings)
    try:
        results = evaluate_model(cc, spec)
    except Exception as e:  # noqa: BLE001 - a reference row that fails is reported, the rest goes on
        log.error("compare: evaluating %s failed: %s", row, _short_error(e))
        return _short_error(e)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": settings, "results": results_dict(results)}, indent=2))
    return results


def _short_error(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return text if len(text) <= 200 else text[:197] + "..."


# ----- exposure bias over training -----


def _exposure_bias(cc: CompareConfig, model_spec: str, tokenizer, teacher, teacher_prefix=None) -> dict:
    data = expand_path(cc.exposure_bias_data or cc.eval_data[0])
    examples = load_instruction_data(data, split="validation", limit=cc.exposure_bias_examples)
    prompts = tokenized_prompts(examples, tokenizer, cc.prompt_format)
    model = load_model(model_spec).eval()
    result = measure_exposure_bias(model, teacher, prompts, eos_token_ids(model, tokenizer), tokenizer.pad_token_id,
                                   cc.exposure_bias_length, cc.exposure_bias_samples, seed=0,
                                   batch_size=cc.eval_batch_size,
                                   no_repeat_ngram_size=cc.exposure_bias_no_repeat_ngram_size,
                                   averaging=cc.exposure_bias_averaging, teacher_prefix=teacher_prefix)
    del model
    return result.to_dict()


def exposure_bias_over_training(cc: CompareConfig, name: str, run_dir: Path, protocol: Protocol,
                                state: dict) -> dict[int, dict]:
    """ExAccErr on the method's start (step 0) and every kept checkpoint of a method."""
    start = protocol.start(cc, name)
    tokenizer = load_tokenizer(start)
    if "teacher_model" not in state:
        state["teacher_model"] = load_model(protocol.teacher).eval()
    initial_file = cc.out / ("student_init" if start == protocol.init_student and start != cc.student
                             else "initial_student") / "exposure_bias.json"
    if not initial_file.exists():
        initial_file.parent.mkdir(parents=True, exist_ok=True)
        initial_file.write_text(json.dumps(_exposure_bias(cc, start, tokenizer, state["teacher_model"])))
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


def run_summary(config, run_dir: Path, cc: CompareConfig) -> dict:
    """The settings table's row: the resolved config's start and optimiser keys, and what was evaluated."""
    summary = {k: getattr(config, k, None) for k in ("method", "student", "lr", "prompt_lr", "lr_schedule",
                                                     "warmup_steps", "weight_decay", "adam_betas", "steps")}
    best = run_dir / "best" / "best.json"
    if cc.evaluate_checkpoint == "best" and best.exists():
        chosen = json.loads(best.read_text())
        summary["evaluated"] = f"best/ (step {chosen['step']}, dev {chosen['metric']} {chosen['value']:.2f})"
    else:
        summary["evaluated"] = "student/ (final)"
    return summary


def fail(run_dir: Path, name: str, e: BaseException, rows: dict) -> None:
    log.error("compare: %s failed: %s", name, _short_error(e))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "error.txt").write_text(traceback.format_exc())
    rows[name] = _short_error(e)


def run_compare(cc: CompareConfig) -> Path:
    out = cc.out
    out.mkdir(parents=True, exist_ok=True)
    protocol = run_stages(cc)
    rows: dict[str, dict[str, EvalResult] | str] = {}
    runs: dict[str, dict] = {}
    curves: dict[str, dict[int, dict]] = {}
    shared_state: dict = {}

    references = []
    if cc.include_teacher:
        references.append((TEACHER, protocol.teacher, "teacher"))
    if cc.include_initial_student:
        references.append((INITIAL, cc.student, "initial_student"))
        if protocol.init_student != cc.student:
            references.append((INIT, protocol.init_student, "student_init"))
    for row, spec, folder in references:
        rows[row] = _cached_eval(cc, out / folder / "eval.json", spec, row, run_settings(cc))
    for stage, config in stage_configs(cc, protocol.dev_file).items():
        runs[stage] = run_summary(config, out / stage, cc)

    for name in cc.methods:
        run_dir = out / name
        done = run_dir / "eval.json"
        config = None
        try:
            config = method_config(cc, name, protocol)
        except Exception as e:  # noqa: BLE001 - a bad recipe fails its method, the others go on
            fail(run_dir, name, e, rows)
        if config is not None and done.exists():
            log.info("compare: %s already finished, reusing %s", name, done)
            rows[name] = _load_results(done, run_settings(cc, config))
        elif config is not None:
            try:
                if not (run_dir / "student" / "config.json").exists():
                    log.info("compare: training %s", name)
                    train_method(config)
                if cc.exposure_bias_every:
                    curves[name] = exposure_bias_over_training(cc, name, run_dir, protocol, shared_state)
                student = selected_student(cc, run_dir)
                log.info("compare: evaluating %s (%s)", name, student)
                results = evaluate_model(cc, str(student))
                done.write_text(json.dumps({"settings": run_settings(cc, config), "results": results_dict(results)},
                                           indent=2))
                (run_dir / "error.txt").unlink(missing_ok=True)
                rows[name] = results
                clean(cc, run_dir)
            except Exception as e:  # noqa: BLE001 - one method's failure must not stop the others
                fail(run_dir, name, e, rows)
            finally:
                gc.collect()
        if config is not None:
            runs[name] = run_summary(config, run_dir, cc)
        if name not in curves and (run_dir / "exposure_bias.json").exists():
            curves[name] = {int(k): v for k, v in json.loads((run_dir / "exposure_bias.json").read_text()).items()}
        write_outputs(cc, rows, curves, runs)  # after every method, so a long run shows progress
    return out
