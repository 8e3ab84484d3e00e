"""Word-level knowledge distillation (Hinton et al., "Distilling the Knowledge in a Neural
Network", 2015; for sequence models Kim & Rush, "Sequence-Level Knowledge Distillation",
EMNLP 2016, Sec. 3.1), the `KD` baseline of MiniLLM, DistiLLM and PromptKD.

On the dataset responses y of a batch of prompts x, the student q_S is pulled towards the
teacher's next-token distribution p_T at every response position, mixed with ordinary
cross-entropy on y:

    L = (1 - kd_ratio) * CE(y; q_S) + kd_ratio * (1/|y|) sum_t KL(p_T(. | y_<t, x) || q_S(. | y_<t, x))

(`divergence: tvd` puts the total variation distance TV(p_T, q_S) in place of the KL: DistillSpec's
objective for a student that will draft for its teacher; `reverse_kl` the reverse KL.)

kd_ratio = 1 is pure distillation; kd_ratio = 0 is SFT. The loss is computed from final
hidden states in vocabulary chunks (`lmdistill.losses.chunked`); with `teacher_cache` the teacher
is read from its top-k cache (`lmdistill cache-teacher`) and never loaded; with
`teacher: openai:URL#MODEL` a server scores the batches (top-k + rest, `lmdistill.teacher.served`).
"""

from __future__ import annotations

from dataclasses import dataclass

from lmdistill.config import TeacherCacheConfig, check, doc
from lmdistill.methods.base import DistillationMethod
from lmdistill.methods.targets import distill_loss


@dataclass
class KDConfig(TeacherCacheConfig):
    """Word-level KD: forward KL to the teacher on dataset responses, mixed with cross-entropy."""

    method: str = doc("Training method.", default="kd")
    kd_ratio: float = doc(
        "Weight of the divergence; (1 - kd_ratio) weights the cross-entropy on the data.", default=0.5
    )
    divergence: str = doc("The token-level divergence D: `forward_kl` (KL(p_T || q_S), word-level KD), `tvd` "
                          "(total variation, DistillSpec's objective for draft models: 1 - TV is the token "
                          "acceptance rate of speculative decoding) or `reverse_kl`.", default="forward_kl")

    def validate(self) -> None:
        super().validate()
        check(0.0 <= self.kd_ratio <= 1.0, "kd_ratio", "in [0, 1]", self.kd_ratio)
        check(self.divergence in KD_DIVERGENCES, "divergence", " or ".join(KD_DIVERGENCES), self.divergence)


KD_DIVERGENCES = ("forward_kl", "tvd", "reverse_kl")


def kd_loss(student, teacher, batch, kd_ratio: float, divergence: str = "forward_kl"):
    """(loss, logs) of (1 - kd_ratio) CE + kd_ratio D(p_T, q_S) on `batch`'s responses (D: forward KL by
    default), one chunked pass over the student's vocabulary (`teacher`: any `lmdistill.teacher.local.Teacher`)."""
    loss, d, ce = distill_loss(student, teacher, batch, divergence, ce_weight=1.0 - kd_ratio, report_ce=True)
    return loss, {"loss": loss.item(), divergence: d.item(), "ce": ce.item()}


class KD(DistillationMethod):
    config_class = KDConfig
    description = "word-level KD: forward KL to the teacher's next-token distributions (Hinton et al. 2015)"

    def loss(self, batch, step):
        return kd_loss(self.student, self.teacher_source, batch, self.config.kd_ratio, self.config.divergence)
