"""A run's state on disk, and resuming from it.

- `state_dict` / `save_checkpoint`: everything a resumed run needs besides the student weights
  (optimisers, schedules, data position, RNG streams, the method's own state), written with the
  student as one atomic, pickle-free `checkpoint-<step>` (`lmdistill.checkpoint`; the newest
  `keep_checkpoints` are kept);
- `resume`: the newest readable complete checkpoint back into a Trainer, refusing recipe changes
  it could not apply (`RESUME_CHANGEABLE`), and dropping metrics logged after it;
- `save_if_best`: the best dev student so far in `best/` (with best.json), which a resume keeps
  as the one to beat.

The functions take the `lmdistill.trainer.Trainer` whose state they read or restore.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors import SafetensorError
from torch import nn

from lmdistill import checkpoint as ckpt
from lmdistill.config import ConfigError, TrainConfig, config_to_dict
from lmdistill.lora import is_adapted, load_adapter_folder
from lmdistill.optim import apply_learning_rate
from lmdistill.setup import TrainingError, flat_config

log = logging.getLogger("lmdistill")

# Recipe keys a resumed run may change: read afresh at each step, or (the learning-rate
# schedule) put into the restored schedules by `lmdistill.optim.apply_learning_rate`. Any other
# changed key is refused, so config.yaml and the model card never state a value not used.
RESUME_CHANGEABLE = {
    "resume", "output_dir", "steps", "lr", "prompt_lr", "warmup_steps", "lr_schedule", "max_grad_norm", "lm_coef",
    "log_every", "save_every", "keep_checkpoints", "max_nonfinite_steps", "progress", "eval_every", "eval_examples",
    "eval_max_new_tokens", "report_to", "tracker_project", "trust_remote_code", "allow_pickle",
    "teacher_timeout", "teacher_retries", "teacher_backoff", "teacher_concurrency", "api_key_env",
}


def check_output_dir(config: TrainConfig, run_dir: Path) -> None:
    """A ConfigError when a fresh run (not `resume`) would start in a folder holding checkpoints."""
    existing = ckpt.latest_checkpoint(run_dir)
    if existing is not None and not config.resume:
        # Starting over would mix two runs' metrics and, on a later resume, their checkpoints.
        raise ConfigError(
            f"config key 'output_dir': {run_dir} already holds checkpoints of a run ({existing.name}); "
            "set resume=true (or --resume) to continue it, or choose another output_dir"
        )


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _load_student_weights(student: nn.Module, folder: Path) -> None:
    from safetensors.torch import load_file

    if is_adapted(student):  # a LoRA student's checkpoint holds its adapters only
        load_adapter_folder(student, folder)
        return
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(file)))
    missing, unexpected = student.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k or "embed" in k}
    if set(missing) - tied or unexpected:
        raise TrainingError(
            f"{folder}: checkpoint does not match the student (missing {missing}, unexpected {unexpected})"
        )


def write_problem(e: Exception) -> str:
    """Why a write failed, in a few words: 'File too large' (OSError, or safetensors' I/O error)."""
    text = getattr(e, "strerror", None) or str(e)
    return text.removeprefix("Error while serializing: ").removeprefix("I/O error: ")


def last_good(run_dir: Path) -> str:
    """Where a run that stops can be resumed from, in one sentence for its error line."""
    latest = ckpt.latest_checkpoint(run_dir)
    return f"The last good checkpoint is {latest}." if latest else f"No checkpoint was written yet in {run_dir}."


# ----- checkpoints -----

def state_dict(trainer, per_process: Optional[list[dict]] = None) -> dict:
    """Everything a resumed run needs besides the student weights.

    `per_process`: each process's {"rng": ..., "method": ...} (they sample independently,
    and a method's state, e.g. a replay buffer, is per process); default: this process's.
    """
    per_process = per_process or [{"rng": rng_state(), "method": trainer.method.state_dict()}]
    scaler = trainer.accelerator.scaler
    return {
        "method_name": trainer.config.method,
        "config": config_to_dict(trainer.config),  # what a resume compares its recipe with
        "step": trainer.step,
        "skipped_steps": trainer.skipped_steps,
        "nonfinite_in_a_row": trainer.nonfinite_in_a_row,
        "order": {**trainer.order.state_dict(), "global_batch": trainer.order.global_batch},
        "lm_order": trainer.lm_order.state_dict() if trainer.lm_order is not None else None,
        "best": trainer.best,
        "optimizers": {k: o.state_dict() for k, o in trainer.optimizers.items()},
        "schedulers": {k: s.state_dict() for k, s in trainer.schedulers.items()},
        "scaler": scaler.state_dict() if scaler is not None else None,
        "modules": {
            name: trainer.accelerator.unwrap_model(u.module).state_dict()
            for name, u in trainer.updates.items()
            if name != "student"
        },
        "method": [p["method"] for p in per_process],
        "rng": [p["rng"] for p in per_process],
    }


def save_checkpoint(trainer) -> None:
    """`checkpoint-<step>`: the student and `state_dict` of every process, written atomically."""
    for name, update in trainer.updates.items():  # never let a diverged model replace a good checkpoint
        module = trainer.accelerator.unwrap_model(update.module)
        bad = next((n for n, p in module.named_parameters() if not torch.isfinite(p).all()), None)
        if bad is not None:
            raise TrainingError(
                f"step {trainer.step}: {name} parameter '{bad}' is non-finite; not writing a "
                f"checkpoint. {last_good(trainer.run_dir)}"
            )
    from accelerate.utils import gather_object

    per_process = gather_object([{"rng": rng_state(), "method": trainer.method.state_dict()}])
    if trainer.accelerator.is_main_process:

        def contents(folder: Path) -> None:
            trainer.method.unwrapped_student.save_pretrained(folder / "student", safe_serialization=True)
            ckpt.save_state(state_dict(trainer, per_process), folder)

        try:
            ckpt.write_checkpoint(trainer.run_dir, trainer.step, contents, trainer.config.keep_checkpoints)
        except (OSError, SafetensorError) as e:  # e.g. a full disk: earlier checkpoints are untouched
            raise ckpt.CheckpointError(
                f"{trainer.run_dir / f'checkpoint-{trainer.step}'}: cannot write the checkpoint of step "
                f"{trainer.step} ({write_problem(e)}). {last_good(trainer.run_dir)}"
            ) from None
    trainer.accelerator.wait_for_everyone()
    trainer.checkpointed_step = trainer.step


# ----- resume -----

def resume(trainer) -> bool:
    """Load the newest readable complete checkpoint; False when there is none."""
    run_dir, accelerator = trainer.run_dir, trainer.accelerator
    if accelerator.is_main_process:
        ckpt.remove_leftovers(run_dir)
    accelerator.wait_for_everyone()
    state, folder, damaged = None, None, []
    candidates = [c for _, c in reversed(ckpt.list_checkpoints(run_dir))]
    for candidate in candidates:
        try:
            state = ckpt.load_state(candidate)
            _check_resumable(trainer, state, candidate)
            _load_student_weights(trainer.method.unwrapped_student, candidate / "student")
            folder = candidate
            break
        except (ckpt.CheckpointError, SafetensorError, OSError) as e:  # e.g. a disk error: the one before
            state = None
            damaged.append(candidate)
            log.warning("resume: %s is damaged (%s); falling back to the checkpoint before it", candidate, e)
    if state is None and damaged:
        raise ckpt.CheckpointError(f"{run_dir}: every checkpoint is damaged "
                                   f"({', '.join(c.name for c in damaged)}); nothing to resume from")
    if state is None:
        log.info("resume: no complete checkpoint in %s yet; starting from step 0", run_dir)
        return False
    if damaged:
        log.warning("resume: %s is damaged, resuming from the previous complete checkpoint %s",
                    ", ".join(str(c) for c in damaged), folder)
    for name, module_state in state["modules"].items():
        accelerator.unwrap_model(trainer.updates[name].module).load_state_dict(module_state)
    for name, opt_state in state["optimizers"].items():
        trainer.optimizers[name].load_state_dict(opt_state)
    for name, sched_state in state["schedulers"].items():
        trainer.schedulers[name].load_state_dict(sched_state)
        apply_learning_rate(trainer.schedulers[name], trainer.optimizers[name], trainer.updates[name].lr)
    if state.get("scaler") is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    trainer.order.load_state_dict(state["order"])
    if trainer.lm_order is not None and state.get("lm_order"):
        trainer.lm_order.load_state_dict(state["lm_order"])
    trainer.best = state.get("best")
    saved_best = run_dir / "best" / "best.json"
    if saved_best.exists():  # a best/ written after this checkpoint stays the one to beat
        on_disk = json.loads(saved_best.read_text())
        if trainer.best is None or on_disk["value"] > trainer.best["value"]:
            trainer.best = on_disk
    rank = accelerator.process_index
    trainer.method.load_state_dict(state["method"][rank % len(state["method"])])
    set_rng_state(state["rng"][rank % len(state["rng"])])
    trainer.step, trainer.skipped_steps = int(state["step"]), int(state["skipped_steps"])
    trainer.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
    trainer.checkpointed_step = trainer.step
    if accelerator.is_main_process:
        _truncate_metrics(run_dir, trainer.step)
    log.info("resumed from %s at step %d", folder, trainer.step)
    return True


def _check_resumable(trainer, state: dict, folder: Path) -> None:
    """TrainingError naming each setting that differs from the checkpoint's and that a resumed
    run cannot apply; the ones it applies (RESUME_CHANGEABLE) are logged."""
    config, order = trainer.config, trainer.order
    if state.get("method_name", config.method) != config.method:
        raise TrainingError(
            f"{folder}: written by method '{state['method_name']}', "
            f"cannot resume it as method '{config.method}'"
        )
    saved_batch = state["order"].get("global_batch", order.global_batch)
    if saved_batch != order.global_batch:
        raise TrainingError(
            f"{folder}: written with a global batch of {saved_batch} examples, this run has "
            f"{order.global_batch} (batch_size x grad_accum x processes); resume needs the same"
        )
    saved = state.get("config")
    if saved is None and (trainer.run_dir / "config.yaml").exists():  # checkpoints written before "config"
        import yaml

        saved = yaml.safe_load((trainer.run_dir / "config.yaml").read_text())
    if not isinstance(saved, dict):
        return
    before, now = flat_config(saved), flat_config(config_to_dict(config))
    blocks = {k.split(".")[0] for k in before}
    changed = [k for k in now if (k in before or k.split(".")[0] in blocks) and before.get(k, "unset") != now[k]]
    changed += [k for k in before if k not in now]
    changes = {k: f"{k} ({before.get(k, 'unset')} -> {now.get(k, 'unset')})" for k in changed}
    refused = [changes[k] for k in changed if k not in RESUME_CHANGEABLE]
    if refused:
        raise TrainingError(
            f"{folder}: this run differs from the checkpoint in settings a resumed run cannot change: "
            f"{', '.join(refused)}; resume with the checkpoint's values, or start a new output_dir"
        )
    if changes:
        log.warning("resume: changed since %s, applied from step %s on: %s", folder.name, state["step"],
                    ", ".join(changes.values()))


def _truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics logged after the checkpoint (and a line cut short by the crash)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


# ----- the best dev student -----

def save_if_best(trainer, metric: str, value: float) -> None:
    """When `value` beats the best dev score so far (`trainer.best`), write the student to `best/`
    (with best.json: step, metric, value), as the references keep their best dev checkpoint."""
    if trainer.best is None or value > trainer.best["value"]:
        new_best = {"step": trainer.step, "metric": metric, "value": value}
        best, partial = trainer.run_dir / "best", trainer.run_dir / "best.partial"
        shutil.rmtree(partial, ignore_errors=True)
        try:
            trainer.write_student(partial)
            (partial / "best.json").write_text(json.dumps(new_best, indent=2))
        except (OSError, SafetensorError) as e:  # e.g. a full disk: the previous best/ is kept
            shutil.rmtree(partial, ignore_errors=True)
            raise TrainingError(f"{best}: cannot write the best student so far (step {trainer.step}, {metric} "
                                f"{value:.4f}: {write_problem(e)}); the previous best/ is kept. "
                                f"{last_good(trainer.run_dir)}") from None
        trainer.best = new_best
        shutil.rmtree(best, ignore_errors=True)
        partial.rename(best)  # a crash leaves the previous best/ or a complete new one
