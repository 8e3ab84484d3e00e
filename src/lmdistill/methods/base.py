"""What a method is, for the shared training loop (`lmdistill.trainer`).

A method says *what* to optimise; the loop does the rest. The contract, per optimiser step:

    method.begin_step(step)                      # once per step (e.g. a new rollout, a validation pass)
    work = [method.prepare(mb, step) for mb in micro_batches]   # e.g. on-policy samples, shared by all updates
    for update in method.updates():              # in the listed order, e.g. PromptKD: prompt, then student
        loss = mean over micro-batches of update.loss(work_i, step)
        one optimiser step of update.module only (its gradients alone; the loop enforces it)

A single-update method (most of them) writes `loss(work, step)`; the default `updates()`
trains the student with it at `config.lr`. A method with its own trainable module (PromptKD's
soft prompt) builds it in `__init__`, passes it through `context.prepare` (distributed
wrapping) and lists it in `updates()`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from lmdistill.config import TrainConfig, is_served
from lmdistill.data import Batch, collate
from lmdistill.forward import output_head, response_hidden
from lmdistill.instruct.data import load_training_data, tokenize_examples
from lmdistill.instruct.evaluate import GenerationSettings, evaluate
from lmdistill.losses.chunked import chunked_cross_entropy
from lmdistill.sampling import NextTokenMixture, eos_token_ids, extra_eos_ids, sample_responses
from lmdistill.teacher.local import LocalTeacher, Teacher, teacher_for
from lmdistill.teacher.reuse import ReusedTopKTeacher

log = logging.getLogger("lmdistill")

LossFn = Callable[[Any, int], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class Update:
    """One optimiser update of a step: minimise `loss(work, step)` over `module`'s parameters
    at learning rate `lr`. `name` keys its optimiser, scheduler, logs and checkpoint state."""

    name: str
    module: nn.Module
    lr: float
    loss: LossFn


@dataclass
class Context:
    """What a method is built from: the (distributed-wrapped) student, the frozen teacher (or
    None), the student's tokenizer, the device, and the Accelerator."""

    student: nn.Module
    teacher: Optional[nn.Module]
    tokenizer: Any
    device: torch.device
    accelerator: Any
    teacher_tokenizer: Any = None  # the teacher's own, for methods across tokenizers (None: the student's)

    def prepare(self, module: nn.Module) -> nn.Module:
        """Wrap a method-owned trainable module for distributed training (DDP/FSDP)."""
        return self.accelerator.prepare(module)


class Method:
    """Default behaviour: one update of the student on dataset batches with `loss`."""

    config_class: type = TrainConfig
    description: str = ""  # one line for model cards: what the method trains on, and its paper
    progress_key: str = "loss"  # the log entry shown on the progress bar
    # Chat data: the assistant turns trained on. "all" (off-policy methods), or "last" for methods
    # that sample the student: earlier turns become the prompt and the student samples the last.
    turns: str = "all"
    # Whether the method takes a teacher with another tokenizer (it aligns the two by text).
    cross_tokenizer: bool = False

    @classmethod
    def needs_teacher(cls, config: TrainConfig) -> bool:
        """Whether the loop must load `config.teacher` for this run (distillation methods: yes,
        unless they read the teacher from a cache)."""
        return False

    def __init__(self, config: TrainConfig, context: Context):
        self.config = config
        self.student = context.student
        self.teacher = context.teacher
        self.tokenizer = context.tokenizer
        self.device = context.device
        self.accelerator = context.accelerator
        self.eos_ids = eos_token_ids(self.unwrapped_student, self.tokenizer) + extra_eos_ids(config, self.tokenizer)

    # ----- the step contract -----

    def updates(self) -> list[Update]:
        """The updates of one step, in order."""
        return [Update("student", self.student, self.config.lr, self.loss)]

    def begin_step(self, step: int) -> None:
        """Called once per optimiser step, before the micro-batches are prepared."""

    def prepare(self, batch: Batch, step: int) -> Any:
        """The per-micro-batch work all updates of the step share (default: the batch itself)."""
        return batch

    def loss(self, work: Any, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """(scalar loss, {log name: float}) of the student update on one micro-batch's work."""
        raise NotImplementedError(f"{type(self).__name__} must define loss() or updates()")

    # ----- state and artifacts -----

    def state_dict(self) -> dict:
        """Per-process state a resumed run needs (e.g. a replay buffer)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def save(self, run_dir: Path) -> None:
        """Write method-specific artifacts of the run (e.g. the soft prompt) into the run folder."""

    def save_student_files(self, folder: Path) -> None:
        """Write files that travel with every saved student (`student/`, `best/`), e.g. how inputs are built."""

    # ----- model selection: the dev-set score of `eval_every` -----

    def dev_score(self) -> tuple[str, float]:
        """(metric name, value; higher is better) of the student on the dev set: ROUGE-L on the first
        `eval_examples` prompts of `eval_data`, sampled (seed `seed`) as the references' dev evaluation:
        T 1, top-p 1, no n-gram blocking (PromptKD train_promptkd.py / MiniLLM finetune.py `evaluate`),
        at most `eval_max_new_tokens` within 512 tokens."""
        c = self.config
        settings = GenerationSettings(max_new_tokens=c.eval_max_new_tokens, batch_size=c.batch_size,
                                      no_repeat_ngram_size=0)
        results = evaluate(self.unwrapped_student, c.eval_data_path, self.tokenizer, max_examples=c.eval_examples,
                           seeds=[c.seed], prompt_format=c.prompt_format, settings=settings, progress=False,
                           keep_samples=0)
        return "rougeL", next(iter(results.values())).mean

    def lm_loss(self, batch: Batch) -> torch.Tensor:
        """The language-modelling term on a pre-training batch (`lm_data`): cross-entropy on every
        token after the first. MiniLLM mixes in its teacher (see its override)."""
        labels, mask = batch.targets()
        return chunked_cross_entropy(response_hidden(self.student, batch), output_head(self.student), labels, mask)

    # ----- data: instruction data by default; methods with other data (step-by-step) override these -----

    def load_examples(self) -> list:
        """Tokenised training examples (dropped/truncated counts go to the log)."""
        return self.tokenize(load_training_data(self.config))

    def tokenize(self, raw: list) -> list:
        """The recipe's training records tokenised for the student (its prompt format, lengths and
        `turns`); dropped/truncated counts go to the log."""
        c = self.config
        examples, stats = tokenize_examples(raw, self.tokenizer, c.prompt_format, c.max_prompt_length, c.max_length,
                                            turns=self.turns)
        log.info("training data %s: %s", c.train_data_path, stats.describe())
        return examples

    def example_length(self, example) -> int:
        """Token length, used to group similar lengths into batches."""
        return len(example.prompt) + len(example.response)

    def collate(self, examples: list) -> Any:
        """A micro-batch (with `.to(device)` and `.num_tokens`) from examples."""
        return collate(examples, self.tokenizer.pad_token_id)

    # ----- on-policy data: the one place methods sample from the student -----

    def sample_student(self, batch: Batch, mixture: Optional[NextTokenMixture] = None) -> Batch:
        """Student responses to `batch`'s prompts at the recipe's temperature / top-p, at most
        `max_new_tokens` and within `max_length`; `mixture` changes the sampling distribution."""
        c = self.config
        room = max(1, min(c.max_new_tokens, c.max_length - batch.prompt_width))
        return sample_responses(self.unwrapped_student, batch.prompts(), self.eos_ids, self.tokenizer.pad_token_id,
                                room, c.temperature, c.top_p, mixture=mixture, vocab_size=len(self.tokenizer))

    @property
    def unwrapped_student(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.student)


class DistillationMethod(Method):
    """A method that reads the teacher: the loop loads it, unless the teacher's top-k stands in
    (`teacher_cache`, or a served teacher; the recipe's validation says which methods take
    which). Losses read it through `self.teacher_source` (`lmdistill.teacher.local.Teacher`:
    the local model, the cache or the server; the local model's remembered top-k after an
    example's first batch with `teacher_reuse_top_k`); `self.teacher` is the model, None when
    not loaded."""

    @classmethod
    def needs_teacher(cls, config: TrainConfig) -> bool:
        return getattr(config, "teacher_cache", None) is None and not is_served(config.teacher)

    def __init__(self, config: TrainConfig, context: Context):
        super().__init__(config, context)
        self.teacher_source: Optional[Teacher] = teacher_for(config, self.tokenizer, self.teacher)
        if getattr(config, "teacher_reuse_top_k", 0) and isinstance(self.teacher_source, LocalTeacher):
            self.teacher_source = ReusedTopKTeacher(self.teacher_source, config.teacher_reuse_top_k)
