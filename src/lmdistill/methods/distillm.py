"""DistiLLM (Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language
Models", ICML 2024).

Two parts, both as in the paper's code (`finetune.py`, `--type adaptive-sfkl|adaptive-srkl`):

Skewed divergences (lambda = `skew`, default 0.1), averaged over response tokens:
    SKL(p_T, q_S)  = KL(p_T || lambda p_T + (1 - lambda) q_S)          (`loss: sfkl`)
    SRKL(q_S, p_T) = KL(q_S || lambda q_S + (1 - lambda) p_T)          (`loss: srkl`)

Adaptive off-policy generation. A threshold tau (starts at `init_threshold`) bounds the
share of student-generated responses; a replay buffer (capacity `capacity`) keeps them.
Each micro-batch draws r ~ U(0, 1) and, with s = tau (1 - step / steps):
  * r < s, or r < tau while the buffer is not yet full: the student samples responses
    for this batch's prompts; they go into the buffer and are trained on;
  * else r < tau: a batch drawn uniformly from the (full) buffer is trained on;
  * else: the dataset responses are trained on.
Every `valid_every` steps the student's cross-entropy on validation data is measured;
when it has risen by at least `loss_eps` over the reference loss, tau += 0.1 (at most
1) and the reference becomes the new loss: more on-policy data once the student starts
to over-fit the fixed data.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from dataclasses import dataclass
from typing import Optional

import torch

from lmdistill.config import SamplingConfig, ServedTeacherConfig, check, doc, expand_path
from lmdistill.data import Batch, DataError, TokenizedExample, collate
from lmdistill.forward import response_logits
from lmdistill.instruct.data import load_instruction_data, tokenize_examples
from lmdistill.losses import cross_entropy
from lmdistill.methods.base import DistillationMethod
from lmdistill.methods.targets import distill_loss

log = logging.getLogger("lmdistill")


@dataclass
class DistiLLMConfig(ServedTeacherConfig, SamplingConfig):
    """DistiLLM: skewed KL with adaptive off-policy student generation and a replay buffer."""

    method: str = doc("Training method.", default="distillm")
    loss_type: str = doc("`sfkl` (skewed forward KL) or `srkl` (skewed reverse KL).", default="sfkl")
    skew: float = doc("Skew lambda of the divergence, in [0, 1).", default=0.1)
    init_threshold: float = doc(
        "Initial share tau of student-generated batches (the paper's scripts: 0.0).", default=0.0
    )
    threshold_step: float = doc("How much tau rises when the validation loss stops improving.", default=0.1)
    loss_eps: float = doc("Validation-loss rise (nats) that counts as 'stopped improving'.", default=0.1)
    capacity: int = doc("Replay buffer capacity (responses); replay starts once it is full.", default=1000)
    valid_every: int = doc("Measure the validation loss every N steps (the paper: once per epoch).", default=50)
    valid_data: Optional[str] = doc(
        "Validation JSONL; default: the last `valid_examples` rows of the training data, held out from training.",
        default=None,
    )
    valid_examples: int = doc("Validation examples used.", default=32)

    def validate(self) -> None:
        super().validate()
        check(self.teacher is not None, "teacher", "a teacher model for DistiLLM", self.teacher)
        check(self.loss_type in ("sfkl", "srkl"), "loss_type", "sfkl or srkl", self.loss_type)
        check(0.0 <= self.skew < 1.0, "skew", "in [0, 1)", self.skew)
        check(0.0 <= self.init_threshold <= 1.0, "init_threshold", "in [0, 1]", self.init_threshold)
        check(0.0 <= self.threshold_step <= 1.0, "threshold_step", "in [0, 1]", self.threshold_step)
        check(self.loss_eps >= 0, "loss_eps", ">= 0", self.loss_eps)
        check(self.capacity >= self.batch_size, "capacity", f">= batch_size ({self.batch_size})", self.capacity)
        check(self.valid_every > 0, "valid_every", "> 0", self.valid_every)
        check(self.valid_examples > 0, "valid_examples", "> 0", self.valid_examples)


class ReplayBuffer:
    """FIFO store of student-generated (prompt, response) token lists; uniform sampling."""

    def __init__(self, capacity: int):
        self.items: deque[TokenizedExample] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def full(self) -> bool:
        return len(self.items) == self.items.maxlen

    def add(self, batch: Batch) -> None:
        """Store each row of a sampled batch without its padding."""
        P = batch.prompt_width
        for ids, attn, resp in zip(batch.input_ids.cpu(), batch.attention_mask.cpu(), batch.response_mask.cpu()):
            prompt = ids[:P][attn[:P].bool()].tolist()
            response = ids[P:][resp[P:].bool()].tolist()
            self.items.append(TokenizedExample(prompt, response, []))

    def sample(self, n: int) -> list[TokenizedExample]:
        return random.sample(list(self.items), n)

    def state_dict(self) -> dict:
        return {"prompts": [e.prompt for e in self.items], "responses": [e.response for e in self.items]}

    def load_state_dict(self, state: dict) -> None:
        self.items.clear()
        for p, r in zip(state["prompts"], state["responses"]):
            self.items.append(TokenizedExample(list(p), list(r), []))


class AdaptiveSchedule:
    """DistiLLM's threshold tau and the per-batch choice of data source."""

    def __init__(self, init_threshold: float, threshold_step: float, loss_eps: float):
        self.threshold = init_threshold
        self.threshold_step = threshold_step
        self.loss_eps = loss_eps
        self.reference_loss: Optional[float] = None

    def choose(self, r: float, step: int, total_steps: int, buffer_full: bool) -> str:
        """'generate', 'replay' or 'data' for a uniform draw r (the paper's decreasing replay ratio)."""
        generate_below = self.threshold * (1.0 - step / total_steps)
        if r < generate_below or (r < self.threshold and not buffer_full):
            return "generate"
        if r < self.threshold:
            return "replay"
        return "data"

    def update(self, valid_loss: float) -> bool:
        """Record a validation loss; raise tau when it rose by loss_eps. Returns whether tau rose."""
        if self.reference_loss is None:
            self.reference_loss = valid_loss
            return False
        if valid_loss >= self.reference_loss + self.loss_eps:
            self.threshold = min(1.0, self.threshold + self.threshold_step)
            self.reference_loss = valid_loss
            return True
        return False

    def state_dict(self) -> dict:
        return {"threshold": self.threshold, "reference_loss": self.reference_loss}

    def load_state_dict(self, state: dict) -> None:
        self.threshold = float(state["threshold"])
        self.reference_loss = state["reference_loss"]


class DistiLLM(DistillationMethod):
    config_class = DistiLLMConfig
    description = "DistiLLM: skewed KL with adaptive off-policy replay (Ko et al., ICML 2024)"
    turns = "last"  # it samples the student: chat data trains on the last assistant turn
    progress_key = "skewed_kl"

    def __init__(self, config: DistiLLMConfig, context):
        super().__init__(config, context)
        self.buffer = ReplayBuffer(config.capacity)
        self.schedule = AdaptiveSchedule(config.init_threshold, config.threshold_step, config.loss_eps)
        self.valid_examples: list[TokenizedExample] = []
        self.last_valid_loss = float("nan")

    def load_examples(self):
        c = self.config
        examples = super().load_examples()
        if c.valid_data:
            raw = load_instruction_data(expand_path(c.valid_data), limit=c.valid_examples)
            self.valid_examples, _ = tokenize_examples(
                raw, self.tokenizer, c.prompt_format, c.max_prompt_length, c.max_length, turns=self.turns
            )
        else:
            if len(examples) <= c.valid_examples:
                raise DataError(
                    f"{c.train_data_path}: {len(examples)} examples, too few to hold out "
                    f"valid_examples={c.valid_examples} for validation (set valid_data)"
                )
            examples, self.valid_examples = examples[: -c.valid_examples], examples[-c.valid_examples :]
        return examples

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Student cross-entropy on the validation responses (the paper's `evaluate` loss)."""
        student = self.unwrapped_student
        was_training = student.training
        student.eval()
        total, count = 0.0, 0
        for start in range(0, len(self.valid_examples), self.config.batch_size):
            batch = collate(
                self.valid_examples[start : start + self.config.batch_size], self.tokenizer.pad_token_id
            ).to(self.device)
            labels, mask = batch.targets()
            total += cross_entropy(response_logits(student, batch), labels, mask).item() * int(mask.sum())
            count += int(mask.sum())
        student.train(was_training)
        return total / max(count, 1)

    def begin_step(self, step):
        """Every valid_every steps: the validation loss, and tau raised if it rose."""
        if step % self.config.valid_every == 0:
            self.last_valid_loss = self.validation_loss()
            if self.schedule.update(self.last_valid_loss):
                log.info(
                    "DistiLLM step %d: validation loss %.4f rose, threshold now %.2f",
                    step,
                    self.last_valid_loss,
                    self.schedule.threshold,
                )

    def prepare(self, batch, step):
        c = self.config
        source = self.schedule.choose(random.random(), step, c.steps, self.buffer.full)
        if source == "generate":
            batch = self.sample_student(batch)
            self.buffer.add(batch)
        elif source == "replay":
            batch = collate(self.buffer.sample(batch.input_ids.shape[0]), self.tokenizer.pad_token_id).to(self.device)
        return batch

    def loss(self, batch, step):
        c = self.config
        # sfkl: KL(p || l p + (1-l) q); srkl: KL(q || l q + (1-l) p); chunked over the vocabulary.
        divergence = "skewed_forward_kl" if c.loss_type == "sfkl" else "skewed_reverse_kl"
        loss, _, _ = distill_loss(
            self.student, self.teacher_source, batch, divergence, skew=c.skew
        )
        return loss, {
            "skewed_kl": loss.item(),
            "threshold": self.schedule.threshold,
            "buffer_size": float(len(self.buffer)),
            "valid_loss": self.last_valid_loss,
        }

    def state_dict(self):
        return {
            "schedule": self.schedule.state_dict(),
            "buffer": self.buffer.state_dict(),
            "last_valid_loss": self.last_valid_loss,
        }

    def load_state_dict(self, state):
        self.schedule.load_state_dict(state["schedule"])
        self.buffer.load_state_dict(state["buffer"])
        self.last_valid_loss = float(state["last_valid_loss"])
