"""What a run is built from before its first step (`lmdistill.trainer.Trainer.__init__`).

- `make_accelerator`: the Accelerate state, and the launch checks (a multi-process launch that
  set up one process, FSDP asked for on CPU);
- `load_models`: the student (LoRA adapters when `student_lora` is set), its tokenizer and the
  frozen teacher (bf16 under `precision: bf16`), after the pre-flight check;
- `lm_term`: the pre-training corpus of the language-modelling term (`lm_data`);
- the trackers of `report_to` (TensorBoard, W&B, MLflow): made, started, given each row of
  metrics.jsonl, finished.

`TrainingError`, the error of a run that cannot start or go on, is defined here, the lowest of
the loop's modules, and raised by all of them (`lmdistill.trainer` exports it).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from lmdistill.check import CROSS_TOKENIZER_METHODS, TEXT_LEVEL_METHODS, preflight
from lmdistill.config import TrainConfig, config_to_dict, expand_path
from lmdistill.data import BatchOrder, DataError, corpus_blocks, read_corpus
from lmdistill.lora import add_adapter, parameter_counts
from lmdistill.methods.base import Context, Method
from lmdistill.models import ModelError, load_model, load_tokenizer, precision_dtype, same_vocabulary

log = logging.getLogger("lmdistill")


class TrainingError(RuntimeError):
    """A run that cannot continue (e.g. repeated non-finite losses); names step and loss term."""


def make_accelerator(config: TrainConfig, run_dir: Path):
    """The run's `accelerate.Accelerator`, logging to the trackers of `report_to`; a TrainingError
    when the launch and the set-up Accelerate made disagree."""
    from accelerate import Accelerator

    accelerator = Accelerator(log_with=trackers(config, run_dir) or None)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:
        raise TrainingError(
            f"launched as {launched} processes, but Accelerate set up single-process training, so each would "
            "train alone into the same output_dir. On CPU launch with: ACCELERATE_USE_CPU=1 accelerate launch "
            "--multi_gpu --num_processes N ... (gloo)"
        )
    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    if wants_fsdp and accelerator.distributed_type.value != "FSDP":
        # Accelerate applies FSDP only on GPU-type backends; on CPU it silently falls back to
        # DDP, where every process would hold the whole student and its optimiser state.
        raise TrainingError(
            f"the launch asks for FSDP, but Accelerate set up {accelerator.distributed_type.value} "
            "(Accelerate applies FSDP only on GPUs, not on CPU processes): launch on GPUs with "
            "configs/accelerate/fsdp_gpu.yaml, or drop FSDP for CPU data parallelism (DDP, a full replica "
            "per process)"
        )
    return accelerator


# ----- models -----

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
        dtype = precision_dtype(config.precision)
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


def parameter_summary(student: nn.Module, config: TrainConfig) -> dict[str, int]:
    """{"trainable", "total"} parameters of the student, logged (for the log and the model card)."""
    trainable, total = parameter_counts(student)
    log.info("student: %s of %s parameters train (%.4f%%)%s", f"{trainable:,}", f"{total:,}",
             100 * trainable / total, f", LoRA {config.student_lora}" if config.student_lora is not None else "")
    return {"trainable": trainable, "total": total}


# ----- data of the LM term -----

def lm_term(config: TrainConfig, tokenizer, processes: int) -> tuple[list, Optional[BatchOrder]]:
    """The language-modelling term on a pre-training corpus: its blocks and their order over
    `processes` processes (`[], None`: off without `lm_data`)."""
    if not config.lm_data:
        return [], None
    path, length = expand_path(config.lm_data), config.lm_block_length or config.max_length
    blocks = corpus_blocks(read_corpus(path), tokenizer, length)
    lm_batch = (config.lm_batch_size or config.batch_size) * config.grad_accum * processes
    if len(blocks) < lm_batch:
        raise DataError(
            f"{path}: {len(blocks)} blocks of {length} tokens for the LM term, fewer than "
            f"the {lm_batch} each step needs (config keys lm_block_length, lm_batch_size)"
        )
    order = BatchOrder([len(b.response) for b in blocks], lm_batch, config.seed + 1)
    log.info(
        "LM term: %d blocks of %d tokens from %s, weight lm_coef=%g",
        len(blocks),
        length,
        path,
        config.lm_coef,
    )
    return blocks, order


# ----- trackers (`report_to`) -----

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
            raise TrainingError(f"config key 'report_to': tracker {name} could not start ({tracker_problem(e)}); "
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


def tracker_problem(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


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


def start_trackers(accelerator, config: TrainConfig, run_dir: Path) -> None:
    """Start the trackers of `report_to` (if any); a TrainingError when one cannot."""
    if accelerator.log_with:  # the recipe, flattened, as the run's hyper-parameters
        try:
            accelerator.init_trackers(run_dir.name, config=flat_config(config_to_dict(config)))
        except Exception as e:  # a tracker's own error (server down, store unwritable): before step 1
            raise TrainingError(f"config key 'report_to': {', '.join(config.report_to)} could not start "
                                f"({tracker_problem(e)}); fix it, or set report_to: [none] "
                                "(metrics.jsonl is always written)") from None


def log_to_trackers(accelerator, values: dict[str, float], step: int) -> None:
    """`values` to every tracker; one that fails is dropped with a warning."""
    active = accelerator.trackers
    for tracker in list(active):  # what `accelerator.log` does, one tracker at a time
        try:
            tracker.log(values, step=step)
        except Exception as e:  # a tracker is a copy of metrics.jsonl: its failure must not stop training
            active.remove(tracker)
            log.warning("step %d: tracker %s failed (%s); training goes on without it, metrics.jsonl keeps "
                        "every step", step, tracker.name, tracker_problem(e))


def finish_trackers(accelerator) -> None:
    """The trackers write what they hold, also when the run stops early. Not
    `accelerator.end_training()`: it also destroys the process group, which a later run in the
    same launch (`lmdistill compare`, several recipes) still needs."""
    for tracker in accelerator.trackers:
        try:
            tracker.finish()
        except Exception as e:
            log.warning("tracker %s did not finish (%s); metrics.jsonl holds every step",
                        tracker.name, tracker_problem(e))
