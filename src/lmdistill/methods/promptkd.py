"""PromptKD (Kim et al., "PromptKD: Distilling Student-Friendly Knowledge for Generative
Language Models via Prompt Tuning", EMNLP 2024 Findings).

The teacher T stays frozen. A few soft prompt embeddings P are prepended to its input
and tuned with student guidance, so that the prompted teacher p_T^P gives knowledge the
student q_S can absorb. Each step, on a batch of prompts x:

  1. The student samples responses y ~ q_S(. | x) (on-policy; temperature 1, top-p 1).
  2. Prompt update, student and plain teacher as fixed targets:
        L_prompt = KL(p_T^P || q_S) + (1 - step / total) * c_reg * KL(p_T^P || p_T)    (step = 1..total)
     The regulariser keeps the prompted teacher close to the teacher early on and
     decays linearly to zero.
  3. Student update on the same samples, the (updated) prompted teacher as fixed target:
        L_student = KL(q_S || p_T^P)      (reverse KL)

Only the prompt (prompt_len x hidden size values) of the teacher's side trains.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmdistill.config import SamplingConfig, check, doc
from lmdistill.forward import output_head, response_hidden
from lmdistill.losses.chunked import chunked_divergence, fixed
from lmdistill.methods.base import DistillationMethod, Update

log = logging.getLogger("lmdistill")


@dataclass
class PromptKDConfig(SamplingConfig):
    """PromptKD: soft-prompt tuning of a frozen teacher, on-policy reverse KL for the student.
    Defaults follow the authors' GPT-2 scripts (docs/fidelity.md)."""

    method: str = doc("Training method.", default="promptkd")
    local_teacher_reason: ClassVar[str] = ("PromptKD prepends a soft prompt to the teacher's input embeddings, so it "
                                           "needs the model itself")
    prompt_len: int = doc("Number of soft prompt tokens prepended to the teacher's input.", default=7)
    prompt_init_text: str = doc("Text whose token embeddings initialise the prompt (tokenised as the reference does, "
                                "with the tokenizer's default special tokens; tiled or cut to prompt_len).",
                                default="Suppose you are a student.")
    prompt_lr: Optional[float] = doc("Learning rate of the soft prompt (AdamW); null: the student's `lr`, as the "
                                     "reference scripts set TEACHER_LR = LR.", default=None)
    reg_weight: float = doc("c_reg: initial weight of KL(p_T^P || p_T), decayed linearly to 0 at the last step.",
                            default=1.0)
    weight_decay: float = doc("AdamW weight decay of the prompt and the student's matrices (the reference: 0.01; "
                              "biases and norm weights are never decayed).", default=0.01)
    lr_schedule: str = doc("Learning-rate schedule after warm-up (the reference: constant).", default="constant")
    warmup_steps: int = doc("Linear learning-rate warm-up steps (the reference: 100; a shorter run warms up "
                            "throughout).", default=100)

    def validate(self) -> None:
        super().validate()
        check(self.teacher is not None, "teacher", "a teacher model for PromptKD", self.teacher)
        check(self.prompt_len > 0, "prompt_len", "> 0", self.prompt_len)
        check(bool(self.prompt_init_text.strip()), "prompt_init_text", "a non-empty text", self.prompt_init_text)
        check(self.prompt_lr is None or self.prompt_lr > 0, "prompt_lr", "> 0 or null", self.prompt_lr)
        check(self.reg_weight >= 0, "reg_weight", ">= 0", self.reg_weight)


class SoftPrompt(nn.Module):
    """`length` trainable input embeddings, prepended to every teacher input."""

    def __init__(self, embeddings: torch.Tensor):
        super().__init__()
        self.embeddings = nn.Parameter(embeddings.detach().clone().float())

    @classmethod
    def from_text(cls, embedding: nn.Embedding, token_ids: list[int], length: int) -> "SoftPrompt":
        """Initialise from the embeddings of `token_ids`, tiled or cut to `length`."""
        if not token_ids:
            raise ValueError("SoftPrompt.from_text: the initialisation text has no tokens")
        ids = (token_ids * (length // len(token_ids) + 1))[:length]
        return cls(embedding.weight[torch.tensor(ids, device=embedding.weight.device)])

    def forward(self) -> torch.Tensor:
        return self.embeddings  # [prompt_len, hidden]

    def save(self, path: Path) -> None:
        save_file({"embeddings": self.embeddings.detach().cpu().contiguous()}, str(path))

    @classmethod
    def load(cls, path: Path) -> "SoftPrompt":
        return cls(load_file(str(path))["embeddings"])


def soft_prompt_embeddings(path: str | Path, teacher) -> torch.Tensor:
    """A saved soft prompt [n, H] (from `soft_prompt.safetensors`), checked against the teacher's width,
    in the teacher's dtype and device: the prefix of the prompted teacher p_T^P."""
    embeddings = SoftPrompt.load(Path(path)).embeddings.detach()
    width = teacher.get_input_embeddings().weight.shape[1]
    if embeddings.ndim != 2 or embeddings.shape[1] != width:
        raise ValueError(f"{path}: a soft prompt of shape {tuple(embeddings.shape)}, the teacher's embeddings "
                         f"are {width} wide")
    weight = teacher.get_input_embeddings().weight
    return embeddings.to(weight.device, weight.dtype)


@contextmanager
def training_mode(module: nn.Module, mode: bool):
    """`module` in train (`mode` True) or eval mode inside the block, its own mode restored after."""
    was = module.training
    module.train(mode)
    try:
        yield module
    finally:
        module.train(was)


class PromptKD(DistillationMethod):
    config_class = PromptKDConfig
    description = "PromptKD: student-friendly soft prompts on the frozen teacher (Kim et al., EMNLP 2024 Findings)"
    turns = "last"  # it samples the student: chat data trains on the last assistant turn
    progress_key = "reverse_kl"

    def __init__(self, config: PromptKDConfig, context):
        super().__init__(config, context)
        # The reference tokenises the text with the tokenizer's defaults (GPT-2: no special tokens).
        init_ids = self.tokenizer(config.prompt_init_text)["input_ids"]
        prompt = SoftPrompt.from_text(self.teacher.get_input_embeddings(), init_ids, config.prompt_len)
        n_prompt, n_teacher = prompt.embeddings.numel(), sum(p.numel() for p in self.teacher.parameters())
        log.info("PromptKD: %d prompt parameters train (%.4f%% of the teacher's %d)",
                 n_prompt, 100 * n_prompt / n_teacher, n_teacher)
        self.soft_prompt = context.prepare(prompt)

    def updates(self):
        """Step 2 (the prompt) then step 3 (the student, against the updated prompt), on the same samples."""
        c = self.config
        return [
            Update("soft_prompt", self.soft_prompt, c.lr if c.prompt_lr is None else c.prompt_lr, self.prompt_loss),
            Update("student", self.student, c.lr, self.student_loss),
        ]

    def prepare(self, batch, step):
        """Step 1: on-policy responses from the student for this batch's prompts."""
        return self.sample_student(batch)

    def regulariser_weight(self, step: int) -> float:
        """(1 - (step + 1) / steps) c_reg for the 0-based step: the reference counts steps from 1, so the
        weight starts just below c_reg and is 0 at the last step."""
        return (1.0 - (step + 1) / self.config.steps) * self.config.reg_weight

    # Every KL below is computed from final hidden states, projected to the vocabulary in chunks
    # (`lmdistill.losses.chunked`): chunked_divergence(q side, p side) = KL-type loss(p || q).

    def prompt_loss(self, samples, step):
        """Step 2: L_prompt = KL(p_T^P || q_S) + (1 - (step + 1) / steps) c_reg KL(p_T^P || p_T)."""
        _, mask = samples.targets()
        teacher_head = output_head(self.teacher)
        # The student and the plain teacher are fixed targets (the reference computes them under
        # torch.no_grad()): hidden states without a graph, and the student's output layer detached,
        # or the chunked loss would hand the student's lm_head (tied to its embeddings) a
        # forward-KL gradient that does not belong to this update.
        # Dropout modes as the reference's prompt step (train_promptkd.py at 383182f, lines 313, 356 and
        # 169): the student (the target) still in eval mode from sampling, the plain teacher in eval
        # mode, the prompted teacher in train mode (dropout on, when the recipe trains with dropout).
        with torch.inference_mode(), training_mode(self.student, False):
            student = response_hidden(self.student, samples)
            plain_teacher = response_hidden(self.teacher, samples)
        with training_mode(self.teacher, self.config.dropout):
            prompted = response_hidden(self.teacher, samples, prefix=self.soft_prompt())
        kl_to_student = chunked_divergence(student, fixed(output_head(self.student)), prompted, teacher_head, mask)
        kl_to_teacher = chunked_divergence(plain_teacher, teacher_head, prompted, teacher_head, mask)
        weight = self.regulariser_weight(step)
        loss = kl_to_student + weight * kl_to_teacher
        return loss, {
            "prompt_loss": loss.item(),
            "prompt_kl_student": kl_to_student.item(),
            "prompt_kl_teacher": kl_to_teacher.item(),
            "reg_weight": weight,
        }

    def student_loss(self, samples, step):
        """Step 3: L_student = KL(q_S || p_T^P), the updated prompted teacher as a fixed target (student
        in train mode, the teacher in eval mode: train_promptkd.py lines 382-383)."""
        _, mask = samples.targets()
        with torch.inference_mode():
            prompted = response_hidden(self.teacher, samples, prefix=self.soft_prompt())
        loss = chunked_divergence(
            response_hidden(self.student, samples),
            output_head(self.student),
            prompted,
            output_head(self.teacher),
            mask,
            "reverse_kl",
        )
        return loss, {"reverse_kl": loss.item(), "response_tokens": float(mask.sum())}

    def save(self, run_dir: Path) -> None:
        self.accelerator.unwrap_model(self.soft_prompt).save(run_dir / "soft_prompt.safetensors")
