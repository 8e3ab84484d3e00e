"""Atomic, pickle-free checkpoints.

A checkpoint is a folder `checkpoint-<step>` holding the student in Hugging Face format
and one `state.safetensors` + `state.json` pair for everything else (optimisers,
schedulers, gradient scaler, RNG states, data position, the method's own state). Nested
state is flattened: tensors go to safetensors under their dotted path, everything else
to JSON, so nothing is ever unpickled.

Atomicity: a checkpoint is written to a hidden temporary folder, its files are fsync'ed,
a `COMPLETE` marker is written last, and the folder is renamed into place. A crash at
any point leaves the previous checkpoints untouched; only folders with the marker
count, and leftover temporary folders are removed by the next write.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

log = logging.getLogger("lmdistill")

_TENSOR = "__tensor__"
_TUPLE = "__tuple__"
_DICT = "__dict__"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-checkpoint-"
OLD_PREFIX = ".old-checkpoint-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read back; names the file."""


def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON skeleton of `obj`; its tensors are moved into `tensors` under dotted keys."""
    if isinstance(obj, torch.Tensor):
        key = prefix or "root"
        tensors[key] = obj.detach().cpu().contiguous()
        return {_TENSOR: key}
    if isinstance(obj, dict):
        # Keys keep their type (optimiser states are keyed by int), hence pairs, not a JSON object.
        return {_DICT: [[_flatten(k, f"{prefix}.k{i}", tensors), _flatten(v, f"{prefix}.{i}", tensors)]
                        for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        items = [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
        return {_TUPLE: items} if isinstance(obj, tuple) else items
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # numpy arrays (NumPy RNG state)
        return _flatten(torch.from_numpy(obj), prefix, tensors)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at '{prefix}' in a checkpoint")


def load_module_state(folder: Path, module: str, name: str = "state") -> Optional[dict]:
    """One trainable module's state dict from a checkpoint (e.g. PromptKD's soft prompt), reading
    only its own tensors, not the optimiser states; None when the checkpoint has no such module."""
    try:
        skeleton = json.loads((folder / f"{name}.json").read_text())
        pairs = skeleton[_DICT]
        modules = next(v for k, v in pairs if k == "modules")
        node = next((v for k, v in modules[_DICT] if k == module), None)
    except (OSError, ValueError, KeyError, TypeError, StopIteration) as e:
        raise CheckpointError(f"{folder / (name + '.json')}: damaged checkpoint state "
                              f"({type(e).__name__}: {e})") from None
    if node is None:
        return None
    with safe_open(str(folder / f"{name}.safetensors"), framework="pt") as f:
        return _unflatten(node, _LazyTensors(f))


class _LazyTensors:
    """`tensors[key]` read from an open safetensors file on access."""

    def __init__(self, handle):
        self.handle = handle

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.handle.get_tensor(key)


def _unflatten(obj: Any, tensors) -> Any:
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if _TUPLE in obj:
            return tuple(_unflatten(v, tensors) for v in obj[_TUPLE])
        return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj[_DICT]}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_state(state: dict, folder: Path, name: str = "state") -> None:
    """Write `state` (nested dicts/lists/tuples of tensors, arrays and JSON scalars) to `folder`."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, "", tensors)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(skeleton))


def load_state(folder: Path, name: str = "state") -> dict:
    """Read what `save_state` wrote; a missing or damaged file raises CheckpointError naming it."""
    tensor_file, skeleton_file = folder / f"{name}.safetensors", folder / f"{name}.json"
    try:
        tensors = load_file(str(tensor_file))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{tensor_file}: cannot read checkpoint tensors ({e})") from None
    try:
        skeleton = json.loads(skeleton_file.read_text())
        return _unflatten(skeleton, tensors)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{skeleton_file}: damaged checkpoint state ({type(e).__name__}: {e})") from None


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (a folder counts once it has its COMPLETE marker)."""
    if not run_dir.exists():
        return []
    found = []
    for child in run_dir.iterdir():
        match = CHECKPOINT_RE.match(child.name)
        if match and (child / "COMPLETE").exists():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def _fsync_tree(folder: Path) -> None:
    """Flush the folder's files and the folder itself to disk before it is renamed into place."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_leftovers(run_dir: Path) -> int:
    """Clean up after an interrupted write; return how many leftover folders were removed.

    A checkpoint that was set aside to be replaced (and whose replacement never landed)
    is moved back; half-written temporary folders are deleted.
    """
    if not run_dir.exists():
        return 0
    stale = [p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith((TMP_PREFIX, OLD_PREFIX))]
    for p in stale:
        if p.name.startswith(OLD_PREFIX):
            for inner in p.iterdir():
                target = run_dir / inner.name
                if CHECKPOINT_RE.match(inner.name) and (inner / "COMPLETE").exists() and not target.exists():
                    os.replace(inner, target)
        shutil.rmtree(p, ignore_errors=True)
    if stale:
        log.info("removed %d incomplete checkpoint folder(s) in %s", len(stale), run_dir)
    return len(stale)


def write_checkpoint(run_dir: Path, step: int, write_contents: Callable[[Path], None], keep: int) -> Path:
    """Call `write_contents(tmp_folder)`, then atomically rename it to `checkpoint-<step>`.

    Keeps the newest `keep` complete checkpoints. A checkpoint of the same step is replaced
    by renaming it aside first, so a crash at any moment leaves a complete one behind.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_leftovers(run_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{step}-", dir=run_dir))
    final = run_dir / f"checkpoint-{step}"
    try:
        write_contents(tmp)
        (tmp / "COMPLETE").write_text(str(step))
        _fsync_tree(tmp)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{OLD_PREFIX}{step}-", dir=run_dir))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, stale in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final
