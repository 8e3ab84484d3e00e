"""Training methods: one file each. `METHODS` maps a recipe's `method:` to its class."""

from lmdistill.methods.distillm import DistiLLM
from lmdistill.methods.gkd import GKD
from lmdistill.methods.imitkd import ImitKD
from lmdistill.methods.kd import KD
from lmdistill.methods.minillm import MiniLLM
from lmdistill.methods.promptkd import PromptKD
from lmdistill.methods.rkl import RKL
from lmdistill.methods.seqkd import SeqKD
from lmdistill.methods.sft import SFT
from lmdistill.methods.step_by_step import Distill, Finetune, StepByStep

METHODS = {
    "sft": SFT,
    "promptkd": PromptKD,
    "kd": KD,
    "seqkd": SeqKD,
    "rkl": RKL,
    "gkd": GKD,
    "imitkd": ImitKD,
    "distillm": DistiLLM,
    "minillm": MiniLLM,
    "step_by_step": StepByStep,
    "finetune": Finetune,
    "distill": Distill,
}
