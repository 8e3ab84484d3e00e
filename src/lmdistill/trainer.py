"""The training loop every method shares (built on Hugging Face Accelerate).

A method (one file in `lmdistill/methods/`, contract in `lmdistill.methods.base`) says *what*
to optimise; this loop does the rest: data order, gradient accumulation, one optimiser + LR
schedule per update, clipping, the non-finite guard, the guarantee that an update changes only
its own module, logging (progress bar, TensorBoard, metrics.jsonl), checkpoints and resume,
and saving the student in HF format.

Each optimiser step (`Trainer.train_step`):
    method.begin_step(step)
    work = [method.prepare(micro_batch, step) for each micro-batch]
    for update in method.updates():  Trainer.update(update.name, work)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors import SafetensorError
from torch import nn

from lmdistill import checkpoint as ckpt
from lmdistill.check import CROSS_TOKENIZER_METHODS, TEXT_LEVEL_METHODS, peak_rss_bytes, preflight
from lmdistill.config import ConfigError, TrainConfig, config_to_dict, expand_path, save_config
from lmdistill.data import Batch, BatchOrder, DataError, collate, corpus_blocks, read_corpus
from lmdistill.methods import load_config, method_class
from lmdistill.methods.base import Context, Method, Update
from lmdistill.lora import add_adapter, is_adapted, load_adapter_folder, merged_copy, parameter_counts
from lmdistill.model_card import model_card
from lmdistill.teacher.openai_client import ServerError
from lmdistill.models import ModelError, load_model, load_tokenizer, same_vocabulary

log = logging.getLogger("lmdistill")

# Recipe keys a resumed run may change: read afresh at each step, or (the learning-rate
# schedule) put into the restored schedules by `Trainer._apply_learning_rate`. Any other
# changed key is refused, so config.yaml and the model card never state a value not used.
RESUME_CHANGEABLE = {
    "resume", "output_dir", "steps", "lr", "prompt_lr", "warmup_steps", "lr_schedule", "max_grad_norm", "lm_coef",
    "log_every", "save_every", "keep_checkpoints", "max_nonfinite_steps", "progress", "eval_every", "eval_examples",
    "eval_max_new_tokens", "report_to", "tracker_project", "trust_remote_code", "allow_pickle",
    "teacher_timeout", "teacher_retries", "teacher_backoff", "teacher_concurrency", "api_key_env",
}


class TrainingError(RuntimeError):
    """A run that cannot continue (e.g. repeated non-finite losses); names step and loss term."""


def load_models(config: TrainConfig, method_cls: type[Method], accelerator) -> Context:
    """The student (wrapped for distributed training), its tokenizer and, when the method needs
    one, the frozen teacher (bf16 under `precision: bf16`)."""
    device = accelerator.device
    tokenizer = load_tokenizer(config.student, config.trust_remote_code)
    student = load_model(
        config.student, torch.float32, config.trust_remote_code, device, allow_pickle=config.allow_pickle
    )
    teacher = teacher_tokenizer = None
    if method_cls.needs_teacher(config):
        if not config.teacher:
            raise ModelError(f"method '{config.method}' needs a teacher: set config key 'teacher'")
        teacher_tokenizer = load_tokenizer(config.teacher, config.trust_remote_code)
        if not same_vocabulary(tokenizer, teacher_tokenizer) and not method_cls.cross_tokenizer:
            raise ModelError(
                f"method '{config.method}' compares token distributions, so teacher '{config.teacher}' and "
                f"student '{config.student}' must share one vocabulary; their tokenizers differ: across "
                f"tokenizers use {', '.join(CROSS_TOKENIZER_METHODS)} (they align the two tokenizations by text) "
                f"or a text-level method ({', '.join(TEXT_LEVEL_METHODS)})"
            )
        dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
        teacher = load_model(config.teacher, dtype, config.trust_remote_code, device, allow_pickle=config.allow_pickle)
        teacher.eval().requires_grad_(False)
    # The pre-flight check (`lmdistill check`): its findings in the log, its errors stop the run.
    report = preflight(config, student, teacher, tokenizer, teacher_tokenizer)
    for finding in report.findings:
        (log.warning if finding.level != "ok" else log.info)("check %s: %s", finding.topic, finding.message)
    if report.errors:
        raise ModelError("; ".join(f.message for f in report.errors))
    if config.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.student_lora is not None:
        if config.gradient_checkpointing:  # the frozen embeddings' output must carry a gradient to the adapters
            student.enable_input_require_grads()
        student = add_adapter(student, config.student_lora)
    return Context(accelerator.prepare(student), teacher, tokenizer, device, accelerator, teacher_tokenizer)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
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


class Trainer:
    """Runs one method for `config.steps` optimiser steps. Use `lmdistill.train(config)`."""

    def __init__(self, config: TrainConfig):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.config = config
        self.run_dir = Path(config.output_dir)
        existing = ckpt.latest_checkpoint(self.run_dir)
        if existing is not None and not config.resume:
            # Starting over would mix two runs' metrics and, on a later resume, their checkpoints.
            raise ConfigError(
                f"config key 'output_dir': {self.run_dir} already holds checkpoints of a run ({existing.name}); "
                "set resume=true (or --resume) to continue it, or choose another output_dir"
            )
        self.accelerator = Accelerator(log_with=trackers(config, self.run_dir) or None)
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and self.accelerator.num_processes == 1:
            raise TrainingError(
                f"launched as {launched} processes, but Accelerate set up single-process training, so each would "
                "train alone into the same output_dir. On CPU launch with: ACCELERATE_USE_CPU=1 accelerate launch "
                "--multi_gpu --num_processes N ... (gloo)"
            )
        wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
        if wants_fsdp and self.accelerator.distributed_type.value != "FSDP":
            # Accelerate applies FSDP only on GPU-type backends; on CPU it silently falls back to
            # DDP, where every process would hold the whole student and its optimiser state.
            raise TrainingError(
                f"the launch asks for FSDP, but Accelerate set up {self.accelerator.distributed_type.value} "
                "(Accelerate applies FSDP only on GPUs, not on CPU processes): launch on GPUs with "
                "configs/accelerate/fsdp_gpu.yaml, or drop FSDP for CPU data parallelism (DDP, a full replica "
                "per process)"
            )
        self.device = self.accelerator.device
        set_seed(config.seed, device_specific=True)  # processes sample independently
        method_cls = method_class(config.method)
        context = load_models(config, method_cls, self.accelerator)
        self.tokenizer = context.tokenizer
        self.method = method_cls(config, context)
        self.examples = self.method.load_examples()
        if config.max_train_examples is not None:
            self.examples = self.examples[: config.max_train_examples]

        # The method's updates, in step order; their modules are already wrapped for distributed
        # training, so each optimiser is built on the wrapped parameters (as FSDP needs).
        self.updates: dict[str, Update] = {}
        self.optimizers, self.schedulers = {}, {}
        for update in self.method.updates():
            if update.name in self.updates:
                raise TrainingError(f"method '{config.method}' lists the update '{update.name}' twice")
            params = [p for p in update.module.parameters() if p.requires_grad]
            # The fused kernel updates each tensor in one pass: ~8x faster than the default
            # foreach AdamW on CPU, and without its parameter-sized temporaries.
            fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
            # Weight decay on matrices only (embeddings and the soft prompt included), never on
            # biases or norm weights, as the reference trainers group their parameters.
            groups = [
                {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
            ]
            optimizer = torch.optim.AdamW(
                [g for g in groups if g["params"]], lr=update.lr, betas=tuple(config.adam_betas), fused=fused or None
            )
            self.updates[update.name] = update
            self.optimizers[update.name] = self.accelerator.prepare(optimizer)
            self.schedulers[update.name] = self._scheduler(self.optimizers[update.name])
        if config.warmup_steps > config.steps:
            log.warning(
                "warmup_steps=%d > steps=%d: the learning rate rises throughout the run and never reaches lr",
                config.warmup_steps,
                config.steps,
            )
        n = self.accelerator.num_processes
        self.order = BatchOrder(
            [self.method.example_length(e) for e in self.examples],
            config.batch_size * config.grad_accum * n,
            config.seed,
            config.length_group,
        )
        # The language-modelling term on a pre-training corpus (off without `lm_data`).
        self.lm_blocks, self.lm_order = [], None
        if config.lm_data:
            path, length = expand_path(config.lm_data), config.lm_block_length or config.max_length
            self.lm_blocks = corpus_blocks(read_corpus(path), self.tokenizer, length)
            lm_batch = (config.lm_batch_size or config.batch_size) * config.grad_accum * n
            if len(self.lm_blocks) < lm_batch:
                raise DataError(
                    f"{path}: {len(self.lm_blocks)} blocks of {length} tokens for the LM term, fewer than "
                    f"the {lm_batch} each step needs (config keys lm_block_length, lm_batch_size)"
                )
            self.lm_order = BatchOrder([len(b.response) for b in self.lm_blocks], lm_batch, config.seed + 1)
            log.info(
                "LM term: %d blocks of %d tokens from %s, weight lm_coef=%g",
                len(self.lm_blocks),
                length,
                path,
                config.lm_coef,
            )
        self.method.unwrapped_student.train(config.dropout)
        trainable, total = parameter_counts(self.method.unwrapped_student)
        self.parameters = {"trainable": trainable, "total": total}  # for the log and the model card
        log.info("student: %s of %s parameters train (%.4f%%)%s", f"{trainable:,}", f"{total:,}",
                 100 * trainable / total, f", LoRA {config.student_lora}" if config.student_lora is not None else "")
        self.best: Optional[dict] = None  # {"step", "metric", "value"} of the best dev evaluation so far
        self.step = 0
        self.checkpointed_step = -1
        self.stop_requested = False
        self.nonfinite_in_a_row = 0
        self.skipped_steps = 0

    # ----- set-up -----

    def _scheduler(self, optimizer):
        from transformers import get_scheduler

        name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[self.config.lr_schedule]
        return get_scheduler(
            name, optimizer, num_warmup_steps=self.config.warmup_steps, num_training_steps=self.config.steps
        )

    # ----- checkpoints -----

    def state_dict(self, per_process: Optional[list[dict]] = None) -> dict:
        """Everything a resumed run needs besides the student weights.

        `per_process`: each process's {"rng": ..., "method": ...} (they sample independently,
        and a method's state, e.g. a replay buffer, is per process); default: this process's.
        """
        per_process = per_process or [{"rng": _rng_state(), "method": self.method.state_dict()}]
        scaler = self.accelerator.scaler
        return {
            "method_name": self.config.method,
            "config": config_to_dict(self.config),  # what a resume compares its recipe with
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "order": {**self.order.state_dict(), "global_batch": self.order.global_batch},
            "lm_order": self.lm_order.state_dict() if self.lm_order is not None else None,
            "best": self.best,
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "scaler": scaler.state_dict() if scaler is not None else None,
            "modules": {
                name: self.accelerator.unwrap_model(u.module).state_dict()
                for name, u in self.updates.items()
                if name != "student"
            },
            "method": [p["method"] for p in per_process],
            "rng": [p["rng"] for p in per_process],
        }

    def save_checkpoint(self) -> None:
        for name, update in self.updates.items():  # never let a diverged model replace a good checkpoint
            module = self.accelerator.unwrap_model(update.module)
            bad = next((n for n, p in module.named_parameters() if not torch.isfinite(p).all()), None)
            if bad is not None:
                raise TrainingError(
                    f"step {self.step}: {name} parameter '{bad}' is non-finite; not writing a "
                    f"checkpoint. {self._last_good()}"
                )
        from accelerate.utils import gather_object

        per_process = gather_object([{"rng": _rng_state(), "method": self.method.state_dict()}])
        if self.accelerator.is_main_process:

            def contents(folder: Path) -> None:
                self.method.unwrapped_student.save_pretrained(folder / "student", safe_serialization=True)
                ckpt.save_state(self.state_dict(per_process), folder)

            try:
                ckpt.write_checkpoint(self.run_dir, self.step, contents, self.config.keep_checkpoints)
            except (OSError, SafetensorError) as e:  # e.g. a full disk: earlier checkpoints are untouched
                raise ckpt.CheckpointError(
                    f"{self.run_dir / f'checkpoint-{self.step}'}: cannot write the checkpoint of step {self.step} "
                    f"({_write_problem(e)}). {self._last_good()}"
                ) from None
        self.accelerator.wait_for_everyone()
        self.checkpointed_step = self.step

    def _last_good(self) -> str:
        latest = ckpt.latest_checkpoint(self.run_dir)
        return (
            f"The last good checkpoint is {latest}." if latest else f"No checkpoint was written yet in {self.run_dir}."
        )

    def resume(self) -> bool:
        """Load the newest readable complete checkpoint; False when there is none."""
        if self.accelerator.is_main_process:
            ckpt.remove_leftovers(self.run_dir)
        self.accelerator.wait_for_everyone()
        state, folder, damaged = None, None, []
        candidates = [c for _, c in reversed(ckpt.list_checkpoints(self.run_dir))]
        for candidate in candidates:
            try:
                state = ckpt.load_state(candidate)
                self._check_resumable(state, candidate)
                _load_student_weights(self.method.unwrapped_student, candidate / "student")
                folder = candidate
                break
            except (ckpt.CheckpointError, SafetensorError, OSError) as e:  # e.g. a disk error: the one before
                state = None
                damaged.append(candidate)
                log.warning("resume: %s is damaged (%s); falling back to the checkpoint before it", candidate, e)
        if state is None and damaged:
            raise ckpt.CheckpointError(f"{self.run_dir}: every checkpoint is damaged "
                                       f"({', '.join(c.name for c in damaged)}); nothing to resume from")
        if state is None:
            log.info("resume: no complete checkpoint in %s yet; starting from step 0", self.run_dir)
            return False
        if damaged:
            log.warning("resume: %s is damaged, resuming from the previous complete checkpoint %s",
                        ", ".join(str(c) for c in damaged), folder)
        for name, module_state in state["modules"].items():
            self.accelerator.unwrap_model(self.updates[name].module).load_state_dict(module_state)
        for name, opt_state in state["optimizers"].items():
            self.optimizers[name].load_state_dict(opt_state)
        for name, sched_state in state["schedulers"].items():
            self.schedulers[name].load_state_dict(sched_state)
            self._apply_learning_rate(name)
        if state.get("scaler") is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.order.load_state_dict(state["order"])
        if self.lm_order is not None and state.get("lm_order"):
            self.lm_order.load_state_dict(state["lm_order"])
        self.best = state.get("best")
        saved_best = self.run_dir / "best" / "best.json"
        if saved_best.exists():  # a best/ written after this checkpoint stays the one to beat
            on_disk = json.loads(saved_best.read_text())
            if self.best is None or on_disk["value"] > self.best["value"]:
                self.best = on_disk
        rank = self.accelerator.process_index
        self.method.load_state_dict(state["method"][rank % len(state["method"])])
        _set_rng_state(state["rng"][rank % len(state["rng"])])
        self.step, self.skipped_steps = int(state["step"]), int(state["skipped_steps"])
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
        self.checkpointed_step = self.step
        if self.accelerator.is_main_process:
            self._truncate_metrics(self.step)
        log.info("resumed from %s at step %d", folder, self.step)
        return True

    def _check_resumable(self, state: dict, folder: Path) -> None:
        """TrainingError naming each setting that differs from the checkpoint's and that a resumed
        run cannot apply; the ones it applies (RESUME_CHANGEABLE) are logged."""
        if state.get("method_name", self.config.method) != self.config.method:
            raise TrainingError(
                f"{folder}: written by method '{state['method_name']}', "
                f"cannot resume it as method '{self.config.method}'"
            )
        saved_batch = state["order"].get("global_batch", self.order.global_batch)
        if saved_batch != self.order.global_batch:
            raise TrainingError(
                f"{folder}: written with a global batch of {saved_batch} examples, this run has "
                f"{self.order.global_batch} (batch_size x grad_accum x processes); resume needs the same"
            )
        saved = state.get("config")
        if saved is None and (self.run_dir / "config.yaml").exists():  # checkpoints written before "config"
            import yaml

            saved = yaml.safe_load((self.run_dir / "config.yaml").read_text())
        if not isinstance(saved, dict):
            return
        before, now = flat_config(saved), flat_config(config_to_dict(self.config))
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

    def _apply_learning_rate(self, name: str) -> None:
        """Put update `name`'s learning rate (the recipe's, maybe changed since the checkpoint) into
        its restored schedule, at the restored position: an unchanged recipe gives the very values
        the checkpoint holds, a changed `lr`, `steps`, `warmup_steps` or `lr_schedule` is used."""
        scheduler, optimizer = self.schedulers[name], self.optimizers[name]
        if not hasattr(scheduler, "lr_lambdas"):
            return
        scheduler.base_lrs = [self.updates[name].lr] * len(optimizer.param_groups)
        for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["initial_lr"], group["lr"] = base, base * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]

    def _truncate_metrics(self, step: int) -> None:
        """Drop metrics logged after the checkpoint (and a line cut short by the crash)."""
        path = self.run_dir / "metrics.jsonl"
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

    # ----- one step -----

    def _my_micro_batches(self, order: BatchOrder, size: int, make) -> list:
        """This process's share of `order`'s next global batch as `grad_accum` micro-batches of `size`
        indices each, each built by `make(indices)` and moved to the device."""
        indices = order.next()
        share = size * self.config.grad_accum
        rank = self.accelerator.process_index
        mine = indices[rank * share : (rank + 1) * share]
        return [make(mine[k : k + size]).to(self.device) for k in range(0, share, size)]

    def micro_batches(self) -> list[Batch]:
        """This process's micro-batches of the next optimiser step, in the run's data order."""
        return self._my_micro_batches(self.order, self.config.batch_size,
                                      lambda ids: self.method.collate([self.examples[i] for i in ids]))

    def lm_micro_batches(self) -> list[Optional[Batch]]:
        """This process's pre-training blocks for the LM term, one micro-batch per data micro-batch
        (Nones without `lm_data`)."""
        c = self.config
        if self.lm_order is None:
            return [None] * c.grad_accum
        pad = self.tokenizer.pad_token_id
        return self._my_micro_batches(self.lm_order, c.lm_batch_size or c.batch_size,
                                      lambda ids: collate([self.lm_blocks[i] for i in ids], pad))

    def _autocast(self):
        if self.config.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def update(
        self, name: str, work: list[Any], lm_batches: Optional[list[Optional[Batch]]] = None
    ) -> dict[str, float]:
        """Accumulate update `name`'s loss over the micro-batches' `work` and take one optimiser step
        of its module; returns the logs (loss terms averaged over the micro-batches, grad norm).
        The student update adds `lm_coef` x the method's `lm_loss` on `lm_batches` (one per micro-batch).

        The non-finite guard: if any process sees a non-finite loss or gradient, every
        process skips this optimiser step (weights and optimiser state untouched).
        """
        update, optimizer = self.updates[name], self.optimizers[name]
        module = update.module
        # An update changes, and leaves gradients in, its own module only: start from clean
        # gradients everywhere, so nothing from an earlier update (or a method's own forward
        # passes) can reach this optimiser step.
        self._clear_gradients()
        logs: dict[str, float] = {}
        bad_term = None
        for i, w in enumerate(work):
            sync = contextlib.nullcontext() if i == len(work) - 1 else self.accelerator.no_sync(module)
            with sync:
                with self._autocast():
                    loss, terms = update.loss(w, self.step)
                    lm_batch = lm_batches[i] if lm_batches is not None and name == "student" else None
                    if lm_batch is not None:
                        lm_loss = self.method.lm_loss(lm_batch)
                        terms = {**terms, "lm_loss": lm_loss.item()}
                        loss = loss + self.config.lm_coef * lm_loss
                # Backward even a non-finite loss: every process must join the gradient all-reduce.
                self.accelerator.backward(loss / len(work))
            if bad_term is None and not torch.isfinite(loss.detach()):
                bad_term = next((k for k, v in terms.items() if not math.isfinite(v)), f"{name} loss")
            for k, v in terms.items():
                logs[k] = logs.get(k, 0.0) + v / len(work)
        self._check_no_leak(name)
        # With max_grad_norm None the threshold is infinite: the norm is measured, grads are untouched.
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm is not None else math.inf
        norm = self.accelerator.clip_grad_norm_(module.parameters(), max_norm)
        if norm is not None:
            logs[f"{name}_grad_norm"] = float(norm)
            if bad_term is None and not math.isfinite(float(norm)):
                bad_term = f"{name} gradient"
        finite = bad_term is None
        if self.accelerator.num_processes > 1:  # all processes must agree to step or to skip
            flag = torch.tensor([0.0 if finite else 1.0], device=self.device)
            finite = float(self.accelerator.reduce(flag, reduction="sum")) == 0.0
            if not finite and bad_term is None:
                bad_term = f"{name} loss on another process"
        if finite:
            optimizer.step()
        else:
            logs["nonfinite_term"] = bad_term
        self._clear_gradients()
        with warnings.catch_warnings():  # a skipped first step is no scheduler misuse
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
            self.schedulers[name].step()
        logs["_finite"] = float(finite)
        return logs

    def _clear_gradients(self) -> None:
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)

    def _check_no_leak(self, name: str) -> None:
        """Fail loudly when update `name`'s loss put gradients into another trainable module:
        that gradient would be a different objective's (the classic bug of two-update methods
        such as PromptKD), so the method must compute that module's outputs as fixed targets."""
        for other, update in self.updates.items():
            if other == name:
                continue
            module = self.accelerator.unwrap_model(update.module)
            leaked = next((n for n, p in module.named_parameters() if p.grad is not None), None)
            if leaked is not None:
                raise TrainingError(
                    f"step {self.step + 1}: the '{name}' update put a gradient into '{other}' parameter '{leaked}'. "
                    f"An update may only change its own module: compute '{other}' outputs in the '{name}' loss "
                    "as fixed targets (under torch.no_grad(), with detached weights)."
                )

    def train_step(self) -> dict[str, float]:
        """One optimiser step of every update (the method contract above); returns its logs.
        `self.step` is advanced by the caller (`train`)."""
        self.method.begin_step(self.step)
        micro = self.micro_batches()
        lm_batches = self.lm_micro_batches()
        with self._autocast():
            work = [self.method.prepare(mb, self.step) for mb in micro]
        logs: dict[str, Any] = {}
        finite = True
        for name in self.updates:
            out = self.update(name, work, lm_batches)
            finite = finite and bool(out.pop("_finite"))
            if "nonfinite_term" in logs:
                out.pop("nonfinite_term", None)  # report the first bad term of the step
            logs.update(out)
            logs[f"lr_{name}"] = self.schedulers[name].get_last_lr()[0]
        logs["tokens"] = float(sum(getattr(w, "num_tokens", 0) for w in work))
        if not finite:
            self.skipped_steps += 1
            self.nonfinite_in_a_row += 1
            logs["skipped"] = 1.0
            log.warning("step %d: non-finite %s, step skipped", self.step + 1, logs.get("nonfinite_term"))
            if self.nonfinite_in_a_row > self.config.max_nonfinite_steps:
                raise TrainingError(
                    f"step {self.step + 1}: non-finite {logs.get('nonfinite_term', 'loss')} for "
                    f"{self.nonfinite_in_a_row} steps in a row "
                    f"(max_nonfinite_steps={self.config.max_nonfinite_steps}); "
                    f"stopping. {self._last_good()}"
                )
        else:
            self.nonfinite_in_a_row = 0
        return logs

    # ----- the loop -----

    def train(self) -> Path:
        c, acc = self.config, self.accelerator
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if c.resume:
            self.resume()
        if acc.is_main_process:
            save_config(c, self.run_dir / "config.yaml")
            (self.run_dir / "parameters.json").write_text(json.dumps(self.parameters))
        if acc.log_with:  # the recipe, flattened, as the run's hyper-parameters
            try:
                acc.init_trackers(self.run_dir.name, config=flat_config(config_to_dict(c)))
            except Exception as e:  # a tracker's own error (server down, store unwritable): before step 1
                raise TrainingError(f"config key 'report_to': {', '.join(c.report_to)} could not start "
                                    f"({_tracker_problem(e)}); fix it, or set report_to: [none] "
                                    "(metrics.jsonl is always written)") from None
        try:
            self._train_loop()
        finally:
            # The trackers write what they hold, also when the run stops early. Not
            # `acc.end_training()`: it also destroys the process group, which a later run in
            # the same launch (`lmdistill compare`, several recipes) still needs.
            for tracker in acc.trackers:
                try:
                    tracker.finish()
                except Exception as e:
                    log.warning("tracker %s did not finish (%s); metrics.jsonl holds every step",
                                tracker.name, _tracker_problem(e))
        return self.run_dir

    def _train_loop(self) -> None:
        c, acc = self.config, self.accelerator
        from tqdm.auto import tqdm

        bar = tqdm(
            total=c.steps,
            initial=self.step,
            desc=c.method,
            disable=not (c.progress and acc.is_main_process),
            dynamic_ncols=True,
        )
        tokens, started = 0.0, time.perf_counter()
        try:
            with self._stop_on_signal():
                while self.step < c.steps:
                    try:
                        logs = self.train_step()
                    except ServerError as e:  # the served teacher, after its timeouts and retries
                        raise TrainingError(f"step {self.step + 1}: the served teacher failed: {e}. "
                                            f"{self._last_good()} (continue with --resume once it answers)") from None
                    self.step += 1
                    tokens += logs["tokens"]
                    elapsed = time.perf_counter() - started
                    logs["tokens_per_s"] = tokens / max(elapsed, 1e-9)
                    logs["peak_rss_mb"] = peak_rss_bytes() / 2**20  # to check `lmdistill check`'s prediction
                    if self.device.type == "cuda":
                        logs["peak_cuda_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
                    main_loss = logs.get(self.method.progress_key)
                    bar.set_postfix(
                        {
                            "loss": f"{main_loss:.4f}" if main_loss is not None else "-",
                            "tok/s": f"{logs['tokens_per_s']:.0f}",
                        }
                    )
                    bar.update(1)
                    if acc.is_main_process and (self.step % c.log_every == 0 or self.step == c.steps):
                        self._log(logs)
                    if c.eval_every and (self.step % c.eval_every == 0 or self.step == c.steps):
                        self.evaluate_dev()
                    if c.save_every and self.step % c.save_every == 0 and self.step < c.steps:
                        self.save_checkpoint()
                    if self.step < c.steps and self._stop_requested_everywhere():
                        if self.checkpointed_step != self.step:
                            self.save_checkpoint()
                        raise KeyboardInterrupt(
                            f"stopped after step {self.step}; checkpoint written to {self.run_dir}"
                        )
        finally:
            bar.close()
        # The student first (what the user wants), then the last checkpoint: a disk that fills up
        # on the larger checkpoint loses neither the student nor the previous checkpoint.
        failed = self.save_final()
        if self.checkpointed_step != self.step:  # a run resumed at its last step has it already
            try:
                self.save_checkpoint()
            except ckpt.CheckpointError as e:
                lora = self.config.student_lora
                saved = self.run_dir / ("student" if lora is None or lora.save_merged else "student_adapter")
                raise ckpt.CheckpointError(f"{failed}; {e}" if failed else f"the student is saved in {saved}, "
                                           f"but {e}") from None
        if failed:
            raise TrainingError(f"{failed}. {self._last_good()} (--resume writes the student from it)")

    # ----- stopping cleanly -----

    @contextlib.contextmanager
    def _stop_on_signal(self):
        """Ctrl-C (SIGINT) or SIGTERM (a machine being reclaimed) lets the current step finish and
        writes a checkpoint before stopping; a second signal stops at once."""
        self.stop_requested = False
        if threading.current_thread() is not threading.main_thread():  # handlers live in the main thread
            yield
            return

        def request_stop(signum, frame):
            if self.stop_requested:
                raise KeyboardInterrupt
            self.stop_requested = True
            log.warning(
                "%s: finishing step %d, then writing a checkpoint (send it again to stop at once)",
                signal.Signals(signum).name,
                self.step + 1,
            )

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                if handler is not None:
                    signal.signal(sig, handler)

    def _stop_requested_everywhere(self) -> bool:
        stop = self.stop_requested
        if self.accelerator.num_processes > 1:  # every process must stop after the same step
            flag = torch.tensor([float(stop)], device=self.device)
            stop = float(self.accelerator.reduce(flag, reduction="sum")) > 0
        return stop

    def _log(self, logs: dict[str, float]) -> None:
        """A row of metrics.jsonl, and the same values to the recipe's trackers (`report_to`)."""
        row = {"step": self.step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        values = {f"train/{k}": v for k, v in row.items() if k != "step"}
        trackers = self.accelerator.trackers
        for tracker in list(trackers):  # what `accelerator.log` does, one tracker at a time
            try:
                tracker.log(values, step=self.step)
            except Exception as e:  # a tracker is a copy of metrics.jsonl: its failure must not stop training
                trackers.remove(tracker)
                log.warning("step %d: tracker %s failed (%s); training goes on without it, metrics.jsonl keeps "
                            "every step", self.step, tracker.name, _tracker_problem(e))

    def _write_student(self, folder: Path, adapter: bool = False) -> None:
        """The student in Hugging Face format (weights, config, tokenizer, the method's files). A
        LoRA student is written merged (a plain model), or as its adapter alone when `adapter`
        (or when the recipe turns merged copies off)."""
        student, lora = self.method.unwrapped_student, self.config.student_lora
        as_adapter = lora is not None and (adapter or not lora.save_merged)
        if lora is not None and not as_adapter:
            student = merged_copy(student)
        student.save_pretrained(folder, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)
        self.method.save_student_files(folder)
        card = model_card(self.config, self.run_dir, adapter=as_adapter, parameters=self.parameters)
        (folder / "README.md").write_text(card, encoding="utf-8")

    def save_final(self) -> Optional[str]:
        """The final student (`student/`; a LoRA run: `student_adapter/` and, unless turned off, the
        merged `student/`) and the method's run artifacts, after the last step. Returns why the
        student could not be written (e.g. a full disk), None when it was."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            lora = self.config.student_lora
            folder = self.run_dir / "student_adapter"
            try:
                if lora is not None:
                    self._write_student(folder, adapter=True)
                if lora is None or lora.save_merged:
                    folder = self.run_dir / "student"
                    self._write_student(folder)
                self.method.save(self.run_dir)
            except (OSError, SafetensorError) as e:  # e.g. a full disk: `_train_loop` still writes the checkpoint
                return f"{folder}: cannot write the student ({_write_problem(e)})"
        self.accelerator.wait_for_everyone()
        return None

    # ----- model selection -----

    def evaluate_dev(self) -> None:
        """Score the student on the dev set (`Method.dev_score`), log it, and when it is the best so
        far write the student to `best/` (with best.json: step, metric, value), as the references
        keep their best dev checkpoint. Training's random streams are left as they were."""
        acc = self.accelerator
        if acc.is_main_process:
            student = self.method.unwrapped_student
            was_training = student.training
            started = time.perf_counter()
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                metric, value = self.method.dev_score()
            student.train(was_training)
            log.info("step %d: dev %s %.4f (%.0f s)", self.step, metric, value, time.perf_counter() - started)
            self._log({f"dev_{metric}": value})
            if self.best is None or value > self.best["value"]:
                new_best = {"step": self.step, "metric": metric, "value": value}
                best, partial = self.run_dir / "best", self.run_dir / "best.partial"
                shutil.rmtree(partial, ignore_errors=True)
                try:
                    self._write_student(partial)
                    (partial / "best.json").write_text(json.dumps(new_best, indent=2))
                except (OSError, SafetensorError) as e:  # e.g. a full disk: the previous best/ is kept
                    shutil.rmtree(partial, ignore_errors=True)
                    raise TrainingError(f"{best}: cannot write the best student so far (step {self.step}, {metric} "
                                        f"{value:.4f}: {_write_problem(e)}); the previous best/ is kept. "
                                        f"{self._last_good()}") from None
                self.best = new_best
                shutil.rmtree(best, ignore_errors=True)
                partial.rename(best)  # a crash leaves the previous best/ or a complete new one
        acc.wait_for_everyone()


def _write_problem(e: Exception) -> str:
    """Why a write failed, in a few words: 'File too large' (OSError, or safetensors' I/O error)."""
    text = getattr(e, "strerror", None) or str(e)
    return text.removeprefix("Error while serializing: ").removeprefix("I/O error: ")


def _tracker_problem(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def _check_mlflow_server(uri: str) -> None:
    """TrainingError unless the MLflow server at `uri` answers within seconds (MLflow itself
    retries a dead server for minutes before the first step)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10).close()
    except urllib.error.HTTPError:
        pass  # it answers (a proxy without /health, or auth): MLflow's own calls say more
    except (OSError, ValueError) as e:
        raise TrainingError(f"config key 'report_to': mlflow: the server $MLFLOW_TRACKING_URI={uri} does not answer "
                            f"({getattr(e, 'reason', e)}); start it, or set report_to: [none] (metrics.jsonl is "
                            "always written)") from None


def trackers(config: TrainConfig, run_dir: Path) -> list:
    """Accelerate trackers for `report_to`: TensorBoard in `run_dir/tensorboard`; W&B (its mode,
    e.g. WANDB_MODE=offline, from the environment; files under `run_dir`); MLflow at
    $MLFLOW_TRACKING_URI, else a file store in `run_dir/mlruns`. A tracker that cannot start is a
    TrainingError naming it (before step 1)."""
    out = []
    for name in config.report_to:
        try:
            tracker = _make_tracker(name, config, run_dir)
        except TrainingError:
            raise
        except Exception as e:  # e.g. wandb not installed or not logged in
            raise TrainingError(f"config key 'report_to': tracker {name} could not start ({_tracker_problem(e)}); "
                                "fix it, or set report_to: [none] (metrics.jsonl is always written)") from None
        if tracker is not None:
            out.append(tracker)
    return out


def _make_tracker(name: str, config: TrainConfig, run_dir: Path):
    """One Accelerate tracker of `report_to` (None for `none`)."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    if name == "tensorboard":
        return TensorBoardTracker("tensorboard", run_dir)
    if name == "wandb":
        return WandBTracker(config.tracker_project, dir=str(run_dir), name=run_dir.name)
    if name == "mlflow":
        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        if uri.startswith(("http://", "https://")):
            _check_mlflow_server(uri)
            # Short retries: a server that dies later stalls one log call, not minutes of them.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        if not uri:
            import mlflow

            # MLflow 3 keeps file stores only on request; a run folder needs no server.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((run_dir.resolve() / "mlruns").as_uri())
        return MLflowTracker(config.tracker_project, run_name=run_dir.name)
    return None


def flat_config(values: dict, prefix: str = "") -> dict:
    """A recipe as flat scalars (nested blocks as `a.b`, lists and None as text), as trackers
    take hyper-parameters."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def train(config: TrainConfig | str, overrides: Optional[list[str]] = None) -> Path:
    """Train from a config object or a YAML recipe path (+ `key=value` overrides); return the run folder."""
    if not isinstance(config, TrainConfig):
        config = load_config(config, overrides)
    elif overrides:
        raise ValueError("overrides apply to YAML recipes; set fields on the config object instead")
    return Trainer(config).train()
