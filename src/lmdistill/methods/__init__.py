"""Training methods: one file each. `METHODS` maps a recipe's `method:` to its class."""

from lmdistill.methods.promptkd import PromptKD
from lmdistill.methods.sft import SFT

METHODS = {
    "sft": SFT,
    "promptkd": PromptKD,
}
