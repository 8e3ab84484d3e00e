"""Loading teachers and students, and making a student by keeping a subset of layers.

A model spec (Hub id, folder or alias) is resolved by `model_zoo.resolve_model`, which also
installs an alias's offline model the first time; `ModelError` is raised by both.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from lmdistill.model_zoo import ModelError, resolve_model


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    """The model's tokenizer, with a pad token (EOS when the model has none)."""
    from transformers import AutoTokenizer

    path = resolve_model(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load tokenizer for model '{spec}': {e}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def precision_dtype(precision: str) -> torch.dtype:
    """The weights' dtype for a `precision` setting: `bf16` -> bfloat16, anything else (`fp32`) -> float32."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def model_for_inference(model, tokenizer, caller: str, dtype: torch.dtype = torch.float32):
    """(model in eval mode, tokenizer) from a model object + its tokenizer, or from a spec (folder /
    Hub id / alias; loaded in `dtype`, on the GPU when there is one). `caller` names the function in
    errors."""
    if isinstance(model, str):
        tokenizer = tokenizer or load_tokenizer(model)
        model = load_model(model, dtype, device="cuda" if torch.cuda.is_available() else None)
    if tokenizer is None:
        raise ValueError(f"{caller}: pass `tokenizer` with a model object")
    return model.eval(), tokenizer


PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def load_model(
    spec: str,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
    allow_pickle: bool = False,
):
    """A causal LM (or, for encoder-decoder configs such as T5, a seq2seq LM) from a Hub id,
    folder or alias. Only safetensors weights are accepted unless `allow_pickle`: unpickling
    can run code. Even then torch's restricted `weights_only` unpickler is used."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    path = resolve_model(spec)
    folder = Path(path)
    from lmdistill.lora import is_adapter_folder

    if is_adapter_folder(folder):  # a LoRA run's student_adapter/: its base + the adapter, merged
        from lmdistill.lora import adapter_base, load_merged

        base = load_model(adapter_base(folder), dtype, trust_remote_code, device, allow_pickle)
        try:
            return load_merged(folder, base)
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"cannot apply the adapter '{spec}' to its base model: {e}") from None
    if not allow_pickle and folder.is_dir() and not any(folder.glob("*.safetensors")):
        pickled = sorted(p.name for pattern in PICKLED_WEIGHTS for p in folder.glob(pattern))
        if pickled:
            raise ModelError(
                f"model '{spec}': {folder / pickled[0]} holds pickled weights, which can run code when loaded; "
                "only safetensors are loaded by default. Convert the model to safetensors, or set "
                "allow_pickle: true if you trust its source"
            )
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
        model = auto.from_pretrained(
            path,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True,
            weights_only=True,
        )
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load causal LM '{spec}': {e}") from None
    if device is not None:
        model.to(device)
    return model


# Where common architectures keep their decoder layers, and the config field counting them.
_LAYER_PATHS = [
    ("model.layers", "num_hidden_layers"),  # Llama, Mistral, Qwen2, Gemma, Phi-3, OLMo
    ("transformer.h", "n_layer"),  # GPT-2, GPT-J, Falcon (num_hidden_layers alias)
    ("gpt_neox.layers", "num_hidden_layers"),  # Pythia / GPT-NeoX
    ("model.decoder.layers", "num_hidden_layers"),  # OPT
    ("transformer.blocks", "n_layers"),  # MPT
]


def decoder_layers(model: nn.Module) -> tuple[nn.Module, str, str]:
    """(parent module, attribute name, config field) of the model's decoder-layer list."""
    for dotted, config_field in _LAYER_PATHS:
        parent_path, _, attr = dotted.rpartition(".")
        parent = model
        for part in parent_path.split("."):
            parent = getattr(parent, part, None)
            if parent is None:
                break
        if parent is not None and isinstance(getattr(parent, attr, None), nn.ModuleList):
            return parent, attr, config_field
    raise ModelError(
        f"don't know where {type(model).__name__} keeps its decoder layers "
        f"(looked for {', '.join(p for p, _ in _LAYER_PATHS)})"
    )


def prune_layers(model: nn.Module, keep: list[int]) -> nn.Module:
    """Keep only the decoder layers listed in `keep` (in order); the vocabulary is untouched."""
    parent, attr, config_field = decoder_layers(model)
    layers = getattr(parent, attr)
    n = len(layers)
    if not keep:
        raise ModelError("--keep-layers: give at least one layer index")
    bad = [i for i in keep if not 0 <= i < n]
    if bad:
        raise ModelError(f"--keep-layers: indices {bad} out of range for a model with {n} layers (0..{n - 1})")
    if len(set(keep)) != len(keep) or sorted(keep) != list(keep):
        raise ModelError(f"--keep-layers: indices must be increasing and distinct, got {keep}")
    kept = nn.ModuleList([layers[i] for i in keep])
    for new_index, layer in enumerate(kept):
        # Attention modules record their index for the KV cache; it must follow the new order.
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    setattr(parent, attr, kept)
    config = model.config
    setattr(config, config_field, len(keep))
    if config_field != "num_hidden_layers" and hasattr(config, "num_hidden_layers"):
        try:
            config.num_hidden_layers = len(keep)
        except AttributeError:
            pass
    if getattr(config, "layer_types", None) is not None:  # per-layer attention kinds (Qwen2, Gemma...)
        config.layer_types = [config.layer_types[i] for i in keep]
    return model


def prune(spec: str, keep: list[int], out_dir: str | os.PathLike, trust_remote_code: bool = False) -> Path:
    """`lmdistill prune`: load `spec`, keep `keep` layers, save model and tokenizer to `out_dir`."""
    model = prune_layers(load_model(spec, trust_remote_code=trust_remote_code), keep)
    tokenizer = load_tokenizer(spec, trust_remote_code=trust_remote_code)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def parse_layer_list(text: str) -> list[int]:
    """'0,3,6' -> [0, 3, 6]; also 'a-b' ranges ('0-3,9' -> [0, 1, 2, 3, 9])."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = part.split("-")
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ModelError(f"--keep-layers: expected integers like 0,3,6 or ranges like 0-3, got {part!r}") from None
    return out


def embedding_rows(model_config) -> int:
    """Rows of the output embedding matrix a model config declares (`vocab_size`)."""
    text = getattr(model_config, "text_config", None) or model_config
    return int(text.vocab_size)


def same_vocabulary(tokenizer_a, tokenizer_b) -> bool:
    """Token-level KD needs the teacher and student to index the same vocabulary."""
    return tokenizer_a.get_vocab() == tokenizer_b.get_vocab()


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
