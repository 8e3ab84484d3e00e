"""LoRA students (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022)
through `peft`: the student's weights stay frozen and each adapted linear layer learns
W + (alpha / r) B A, with A [r, in] and B [out, r] (B starts at zero, so step 0 is the base model).

`student_lora: {r, alpha, dropout, target_modules}` in any recipe turns it on. Every method
trains the same way (the loop optimises whatever requires a gradient: the adapters). A run
writes the adapter (`student_adapter/`: adapter_config.json + adapter_model.safetensors) and,
unless `save_merged: false`, the merged student (`student/`, a plain Hugging Face model);
checkpoints hold the adapter only. `lmdistill.models.load_model` reads either folder.
"""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
from pathlib import Path

from torch import nn

from lmdistill.config import LoraSettings, check

ADAPTER_CONFIG = "adapter_config.json"


def add_adapter(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """`model` wrapped by peft with fresh LoRA adapters; only they require a gradient."""
    from peft import LoraConfig, get_peft_model

    targets = settings.target_modules
    if targets != ["all-linear"]:
        check_targets(model, targets)
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=targets[0] if targets == ["all-linear"] else list(targets),
                        task_type="CAUSAL_LM", bias="none")
    try:
        with _quiet_peft():
            return get_peft_model(model, config)
    except ValueError as e:  # e.g. no module matches target_modules
        check(False, "student_lora.target_modules", f"names of linear layers of the student ({e})", targets)


def check_targets(model: nn.Module, targets: list[str]) -> None:
    """ConfigError naming every target that matches no module of `model` (peft matches a name or
    a name suffix `.target`), and every target that is the output head or the input embeddings:
    the chunked losses read the head's weight directly (`forward.output_head`), so an adapter
    there would not train, and a tied student's merged copy would differ from its adapter."""
    from lmdistill.config import ConfigError

    names = {name: module for name, module in model.named_modules() if name}
    key = "config key 'student_lora.target_modules'"
    matches = {t: [m for n, m in names.items() if _matches(n, [t])] for t in targets}
    unmatched = [t for t, found in matches.items() if not found]
    if unmatched:
        head = model.get_output_embeddings()
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in names.items() if isinstance(m, nn.Linear) and m is not head})
        verb = "matches" if len(unmatched) == 1 else "match"
        raise ConfigError(f"{key}: {', '.join(repr(t) for t in unmatched)} {verb} no layer of the student "
                          f"(its linear layers: {', '.join(linear)})", key="student_lora.target_modules")
    special = {"output head": model.get_output_embeddings(), "input embeddings": model.get_input_embeddings()}
    for target, found in matches.items():
        for what, module in special.items():
            if module is not None and any(m is module for m in found):
                raise ConfigError(
                    f"{key}: {target!r} is the student's {what}; an adapter there would not train as reported (the "
                    "losses read the base head's weight, and a tied head shares the embeddings): adapt the layers "
                    "inside the model (e.g. q_proj, v_proj or all-linear)", key="student_lora.target_modules")


def adapter_parameters(model: nn.Module, r: int, target_modules: list[str]) -> int:
    """The trainable parameters LoRA will add to `model` (predicted before it is added): r x (in + out)
    per adapted linear layer, `all-linear` meaning every nn.Linear but the output layer (as peft)."""
    head = model.get_output_embeddings()
    return sum(r * (module.in_features + module.out_features) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and module is not head
               and (target_modules == ["all-linear"] or _matches(name, target_modules)))


def _matches(name: str, targets: list[str]) -> bool:
    """Whether peft adapts module `name` for `targets`: the name itself or its suffix `.target`."""
    return any(name == t or name.endswith("." + t) for t in targets)


def is_adapted(model: nn.Module) -> bool:
    return hasattr(getattr(model, "module", model), "peft_config")


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def load_adapter_folder(model: nn.Module, folder: Path) -> None:
    """Set an adapted model's adapters to those saved in `folder` (checkpoint or student_adapter/)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(Path(folder) / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(getattr(model, "module", model), state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"{folder}: adapter weights that the student does not have: {unexpected[:3]}")


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain Hugging Face model with the adapters folded into its weights; `model` is unchanged."""
    return copy.deepcopy(getattr(model, "module", model)).merge_and_unload()


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | Path) -> str:
    """The base model an adapter folder was trained on (`base_model_name_or_path`)."""
    return json.loads((Path(path) / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]


def load_merged(path: str | Path, base: nn.Module) -> nn.Module:
    """`base` with the adapter of folder `path` applied and merged (for evaluation)."""
    from peft import PeftModel

    with _quiet_peft():
        return PeftModel.from_pretrained(base, str(path)).merge_and_unload()


@contextlib.contextmanager
def _quiet_peft():
    """peft reads `model.is_gradient_checkpointing`, which transformers 5 deprecates: a FutureWarning
    on every LoRA run that is peft's to fix, not the user's; other warnings still show."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield
