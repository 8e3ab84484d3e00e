"""The training loop every method shares (built on Hugging Face Accelerate).

A method (one file in `lmdistill/methods/`, contract in `lmdistill.methods.base`) says *what*
to optimise; this loop does the rest: data order, gradient accumulation, one optimiser + LR
schedule per update, clipping, the non-finite guard, the guarantee that an update changes only
its own module, logging (progress bar, metrics.jsonl, the trackers), checkpoints, dev selection,
and saving the student in HF format. What it is built from lives beside it: `lmdistill.setup`
(accelerator, models, LM-term corpus, trackers) and `lmdistill.optim` (optimisers, schedules);
what it writes to resume from, `lmdistill.run_state` (checkpoints, resume, RNG state, best/).

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
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError

from lmdistill import checkpoint as ckpt
from lmdistill import run_state
from lmdistill.check import peak_rss_bytes
from lmdistill.config import TrainConfig, save_config
from lmdistill.data import Batch, BatchOrder, collate
from lmdistill.lora import merged_copy
from lmdistill.methods import load_config, method_class
from lmdistill.model_card import model_card
from lmdistill.optim import build_optimizers
from lmdistill.setup import (TrainingError, finish_trackers, lm_term, load_models, log_to_trackers, make_accelerator,
                             parameter_summary, start_trackers)
from lmdistill.teacher.openai_client import ServerError

log = logging.getLogger("lmdistill")

__all__ = ["Trainer", "TrainingError", "train"]


class Trainer:
    """Runs one method for `config.steps` optimiser steps. Use `lmdistill.train(config)`."""

    def __init__(self, config: TrainConfig):
        from accelerate.utils import set_seed

        self.config = config
        self.run_dir = Path(config.output_dir)
        run_state.check_output_dir(config, self.run_dir)
        self.accelerator = make_accelerator(config, self.run_dir)
        self.device = self.accelerator.device
        set_seed(config.seed, device_specific=True)  # processes sample independently
        method_cls = method_class(config.method)
        context = load_models(config, method_cls, self.accelerator)
        self.tokenizer = context.tokenizer
        self.method = method_cls(config, context)
        self.examples = self.method.load_examples()
        if config.max_train_examples is not None:
            self.examples = self.examples[: config.max_train_examples]
        self.updates, self.optimizers, self.schedulers = build_optimizers(self.method, config, self.accelerator)
        n = self.accelerator.num_processes
        self.order = BatchOrder(
            [self.method.example_length(e) for e in self.examples],
            config.batch_size * config.grad_accum * n,
            config.seed,
            config.length_group,
        )
        # The language-modelling term on a pre-training corpus (off without `lm_data`).
        self.lm_blocks, self.lm_order = lm_term(config, self.tokenizer, n)
        self.method.unwrapped_student.train(config.dropout)
        self.parameters = parameter_summary(self.method.unwrapped_student, config)  # for the log and the model card
        self.best: Optional[dict] = None  # {"step", "metric", "value"} of the best dev evaluation so far
        self.step = 0
        self.checkpointed_step = -1
        self.stop_requested = False
        self.nonfinite_in_a_row = 0
        self.skipped_steps = 0

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
                    f"stopping. {run_state.last_good(self.run_dir)}"
                )
        else:
            self.nonfinite_in_a_row = 0
        return logs

    # ----- the loop -----

    def train(self) -> Path:
        c, acc = self.config, self.accelerator
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if c.resume:
            run_state.resume(self)
        if acc.is_main_process:
            save_config(c, self.run_dir / "config.yaml")
            (self.run_dir / "parameters.json").write_text(json.dumps(self.parameters))
        start_trackers(acc, c, self.run_dir)
        try:
            self._train_loop()
        finally:
            finish_trackers(acc)  # also when the run stops early
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
                                            f"{run_state.last_good(self.run_dir)} "
                                            "(continue with --resume once it answers)") from None
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
                        run_state.save_checkpoint(self)
                    if self.step < c.steps and self._stop_requested_everywhere():
                        if self.checkpointed_step != self.step:
                            run_state.save_checkpoint(self)
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
                run_state.save_checkpoint(self)
            except ckpt.CheckpointError as e:
                lora = self.config.student_lora
                saved = self.run_dir / ("student" if lora is None or lora.save_merged else "student_adapter")
                raise ckpt.CheckpointError(f"{failed}; {e}" if failed else f"the student is saved in {saved}, "
                                           f"but {e}") from None
        if failed:
            raise TrainingError(f"{failed}. {run_state.last_good(self.run_dir)} "
                                "(--resume writes the student from it)")

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
        log_to_trackers(self.accelerator, {f"train/{k}": v for k, v in row.items() if k != "step"}, self.step)

    # ----- saving the student, dev selection -----

    def write_student(self, folder: Path, adapter: bool = False) -> None:
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
                    self.write_student(folder, adapter=True)
                if lora is None or lora.save_merged:
                    folder = self.run_dir / "student"
                    self.write_student(folder)
                self.method.save(self.run_dir)
            except (OSError, SafetensorError) as e:  # e.g. a full disk: `_train_loop` still writes the checkpoint
                return f"{folder}: cannot write the student ({run_state.write_problem(e)})"
        self.accelerator.wait_for_everyone()
        return None

    def evaluate_dev(self) -> None:
        """Score the student on the dev set (`Method.dev_score`), log it, and when it is the best so
        far write the student to `best/` (`run_state.save_if_best`). Training's random streams are
        left as they were."""
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
            run_state.save_if_best(self, metric, value)
        acc.wait_for_everyone()


def train(config: TrainConfig | str, overrides: Optional[list[str]] = None) -> Path:
    """Train from a config object or a YAML recipe path (+ `key=value` overrides); return the run folder."""
    if not isinstance(config, TrainConfig):
        config = load_config(config, overrides)
    elif overrides:
        raise ValueError("overrides apply to YAML recipes; set fields on the config object instead")
    return Trainer(config).train()
