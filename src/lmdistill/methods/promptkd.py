"""PromptKD (Kim et al., "PromptKD: Distilling Student-Friendly Knowledge for Generative
Language Models via Prompt Tuning", EMNLP 2024 Findings).

The teacher T stays frozen. A few soft prompt embeddings P are prepended to its input
and tuned with student guidance, so that the prompted teacher p_T^P gives knowledge the
student q_S can absorb. Each step, on a batch of prompts x:

  1. The student samples responses y ~ q_S(. | x) (on-policy; temperature 1, top-p 1).
  2. Prompt update, student and plain teacher as fixed targets:
        L_prompt = KL(p_T^P || q_S) + (1 - step / total) * c_reg * KL(p_T^P || p_T)
     The regulariser keeps the prompted teacher close to the teacher early on and
     decays linearly to zero.
  3. Student update on the same samples, the (updated) prompted teacher as fixed target:
        L_student = KL(q_S || p_T^P)      (reverse KL)

Only the prompt (prompt_len x hidden size values) of the teacher's side trains.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmdistill.config import TrainConfig, check, doc
from lmdistill.chunked import chunked_divergence, fixed
from lmdistill.sampling import output_head, response_hidden, sample_responses
from lmdistill.trainer import Method

log = logging.getLogger("lmdistill")


@dataclass
class PromptKDConfig(TrainConfig):
    """PromptKD: soft-prompt tuning of a frozen teacher, on-policy reverse KL for the student."""

    method: str = doc("Training method.", default="promptkd")
    prompt_len: int = doc("Number of soft prompt tokens prepended to the teacher's input.", default=7)
    prompt_init_text: str = doc("Text whose token embeddings initialise the prompt (tiled or cut to prompt_len).",
                                default="Suppose you are a student.")
    prompt_lr: float = doc("Learning rate of the soft prompt (AdamW).", default=1e-3)
    reg_weight: float = doc("c_reg: initial weight of KL(p_T^P || p_T), decayed linearly to 0 over the run.", default=1.0)

    def validate(self) -> None:
        super().validate()
        check(self.teacher is not None, "teacher", "a teacher model for PromptKD", self.teacher)
        check(self.prompt_len > 0, "prompt_len", "> 0", self.prompt_len)
        check(bool(self.prompt_init_text.strip()), "prompt_init_text", "a non-empty text", self.prompt_init_text)
        check(self.prompt_lr > 0, "prompt_lr", "> 0", self.prompt_lr)
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


class PromptKD(Method):
    config_class = PromptKDConfig
    needs_teacher = True
    progress_key = "reverse_kl"

    def __init__(self, config: PromptKDConfig, models):
        super().__init__(config, models)
        init_ids = self.tokenizer(config.prompt_init_text, add_special_tokens=False)["input_ids"]
        self.soft_prompt = SoftPrompt.from_text(self.teacher.get_input_embeddings(), init_ids, config.prompt_len)
        n_prompt, n_teacher = self.soft_prompt.embeddings.numel(), sum(p.numel() for p in self.teacher.parameters())
        log.info("PromptKD: %d prompt parameters train (%.4f%% of the teacher's %d)",
                 n_prompt, 100 * n_prompt / n_teacher, n_teacher)

    def trainable(self):
        # Order matters: the prompt is updated first, then the student against the new prompt.
        return {"soft_prompt": self.config.prompt_lr, "student": self.config.lr}

    def prepare(self, batch, step):
        """Step 1: on-policy responses from the student for this batch's prompts."""
        c = self.config
        return sample_responses(self.unwrapped_student, batch.prompts(), self.tokenizer.eos_token_id,
                                self.tokenizer.pad_token_id, c.max_new_tokens, c.temperature, c.top_p)

    def regulariser_weight(self, step: int) -> float:
        return (1.0 - step / self.config.steps) * self.config.reg_weight

    def loss(self, name, samples, step):
        # Every KL below is computed from final hidden states, projected to the vocabulary in
        # chunks (`lmdistill.chunked`): chunked_divergence(q side, p side) = KL-type loss(p || q).
        _, mask = samples.targets()
        student_head, teacher_head = output_head(self.student), output_head(self.teacher)
        if name == "soft_prompt":  # step 2
            # The student is a fixed target here (the reference computes its logits under
            # torch.no_grad()): hidden states without a graph and a detached output layer, or
            # the chunked loss would hand the student's lm_head (tied to its embeddings) a
            # forward-KL gradient that does not belong to this update.
            with torch.inference_mode():
                student = response_hidden(self.student, samples)
                plain_teacher = response_hidden(self.teacher, samples)
            prompted = response_hidden(self.teacher, samples, prefix=self.soft_prompt())
            kl_to_student = chunked_divergence(student, fixed(student_head), prompted, teacher_head, mask)  # KL(p_T^P || q_S)
            kl_to_teacher = chunked_divergence(plain_teacher, teacher_head, prompted, teacher_head, mask)  # KL(p_T^P || p_T)
            weight = self.regulariser_weight(step)
            loss = kl_to_student + weight * kl_to_teacher
            return loss, {"prompt_loss": loss.item(), "prompt_kl_student": kl_to_student.item(),
                          "prompt_kl_teacher": kl_to_teacher.item(), "reg_weight": weight}
        with torch.inference_mode():  # step 3
            prompted = response_hidden(self.teacher, samples, prefix=self.soft_prompt())
        loss = chunked_divergence(response_hidden(self.student, samples), student_head, prompted, teacher_head, mask,
                                  "reverse_kl")  # KL(q_S || p_T^P)
        return loss, {"reverse_kl": loss.item(), "response_tokens": float(mask.sum())}

    def save(self, run_dir: Path) -> None:
        self.accelerator.unwrap_model(self.soft_prompt).save(run_dir / "soft_prompt.safetensors")
