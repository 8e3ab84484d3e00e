"""Training methods: one file each. `METHODS` maps a recipe's `method:` to its class;
`load_config` reads a recipe into that method's config dataclass."""

from __future__ import annotations

import os
from typing import Any

from lmdistill.config import ConfigError, TrainConfig, build_config, read_recipe
from lmdistill.methods.distillm import DistiLLM
from lmdistill.methods.gkd import GKD
from lmdistill.methods.gold import GOLD
from lmdistill.methods.imitkd import ImitKD
from lmdistill.methods.kd import KD
from lmdistill.methods.minillm import MiniLLM
from lmdistill.methods.opd import OPD
from lmdistill.methods.promptkd import PromptKD
from lmdistill.methods.rkl import RKL
from lmdistill.methods.seqkd import SeqKD
from lmdistill.methods.sft import SFT
from lmdistill.methods.step_by_step import Distill, Finetune, StepByStep
from lmdistill.methods.uld import ULD

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
    "opd": OPD,
    "uld": ULD,
    "gold": GOLD,
    "step_by_step": StepByStep,
    "finetune": Finetune,
    "distill": Distill,
}


def method_class(name: Any, where: str = "config"):
    """The method class for a recipe's `method:` value, or a ConfigError naming where it came from."""
    if name not in METHODS:
        raise ConfigError(
            f"{where}: config key 'method': expected one of {sorted(METHODS)}, got {name!r}", key="method"
        )
    return METHODS[name]


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None, **extra: Any) -> TrainConfig:
    """Read a YAML recipe, apply `key=value` overrides, pick the method's config class, validate."""
    values, where = read_recipe(path, overrides, **extra)
    cls = method_class(values.get("method", "sft"), where.get("method", "config")).config_class
    return build_config(cls, values, where)
