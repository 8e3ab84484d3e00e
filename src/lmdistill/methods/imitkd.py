"""ImitKD (Lin et al., "Autoregressive Knowledge Distillation through Imitation Learning",
EMNLP 2020), as the MiniLLM / DistiLLM baseline scripts run it (`--type mixed-fkl`,
`--mixed-alpha 1.0`, `--kd-ratio 1.0`, DistiLLM's `finetune.py` with its replay buffer).

ImitKD treats distillation as imitation learning: the student is trained on the states it
visits itself, with the teacher as the oracle, so that training and generation see the
same prefixes. For each micro-batch of prompts x:

  1. With probability `student_ratio` the student samples responses, y ~ q_S(. | x) (no
     gradient through the sampling); they are pushed into a replay buffer of the last
     `capacity` samples, and the micro-batch trained on is drawn uniformly from that buffer
     (`replay: false`: the fresh samples themselves). Otherwise the dataset responses are used.
  2. The student minimises the forward KL to the teacher on those responses:
        L = (1/|y|) sum_t KL(p_T(. | y_<t, x) || q_S(. | y_<t, x)).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from lmdistill.config import SamplingConfig, ServedTeacherConfig, check, doc
from lmdistill.data import collate
from lmdistill.methods.base import DistillationMethod
from lmdistill.methods.distillm import ReplayBuffer
from lmdistill.methods.targets import distill_loss


@dataclass
class ImitKDConfig(ServedTeacherConfig, SamplingConfig):
    """ImitKD: forward KL on student samples (through a replay buffer) and dataset responses."""

    method: str = doc("Training method.", default="imitkd")
    student_ratio: float = doc("Probability that a micro-batch is on-policy (student samples) instead of dataset "
                               "responses (DistiLLM's `--mixed-alpha`; its baseline scripts: 1.0).", default=1.0)
    replay: bool = doc("Train on a uniform draw from the replay buffer of student samples, as DistiLLM's "
                       "`mixed-fkl` (false: on the fresh samples only).", default=True)
    capacity: int = doc("Replay buffer capacity in responses (DistiLLM: 1000).", default=1000)

    def validate(self) -> None:
        super().validate()
        check(self.teacher is not None, "teacher", "a teacher model for ImitKD", self.teacher)
        check(0.0 <= self.student_ratio <= 1.0, "student_ratio", "in [0, 1]", self.student_ratio)
        check(self.capacity >= self.batch_size, "capacity", f">= batch_size ({self.batch_size})", self.capacity)


class ImitKD(DistillationMethod):
    config_class = ImitKDConfig
    description = "ImitKD: KD on a mix of dataset and student prefixes (Lin et al., EMNLP 2020)"
    turns = "last"  # it samples the student: chat data trains on the last assistant turn
    progress_key = "forward_kl"

    def __init__(self, config: ImitKDConfig, context):
        super().__init__(config, context)
        self.buffer = ReplayBuffer(config.capacity)

    def prepare(self, batch, step):
        """Step 1: on-policy with probability student_ratio, through the replay buffer."""
        c = self.config
        if random.random() >= c.student_ratio:
            return batch
        samples = self.sample_student(batch)
        if not c.replay:
            return samples
        self.buffer.add(samples)
        return collate(self.buffer.sample(batch.input_ids.shape[0]), self.tokenizer.pad_token_id).to(self.device)

    def loss(self, batch, step):
        _, mask = batch.targets()
        # KL(p_T || q_S), chunked (served: over the teacher's top k + the rest)
        loss, _, _ = distill_loss(self.student, self.teacher_source, batch, "forward_kl")
        return loss, {"forward_kl": loss.item(), "response_tokens": float(mask.sum()),
                      "buffer_size": float(len(self.buffer))}

    def state_dict(self):
        return {"buffer": self.buffer.state_dict()}

    def load_state_dict(self, state):
        self.buffer.load_state_dict(state["buffer"])
