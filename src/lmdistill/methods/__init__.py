"""Training methods: one file each. `METHODS` maps a recipe's `method:` to its class."""

from lmdistill.methods.promptkd import PromptKD
from lmdistill.methods.sft import SFT
from lmdistill.methods.step_by_step import Distill, Finetune, StepByStep

METHODS = {
    "sft": SFT,
    "promptkd": PromptKD,
    "step_by_step": StepByStep,
    "finetune": Finetune,
    "distill": Distill,
}
