"""The checkpoint format (pickle-free round trip) and atomic writes, in-process."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from lmdistill import checkpoint as ckpt
from lmdistill.run_state import rng_state, set_rng_state


def test_nested_state_round_trips_exactly_with_types_kept(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.9))
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = {
        "optimizer": optimizer.state_dict(),  # int keys, tuples (betas), tensors, None
        "numbers": [1, 2.5, float("inf"), None, True, "text"],
        "tuple": (1, (2, "x")),
        7: {"__tensor__": "not a tensor"},  # user keys that look like the format's markers
        "buffer": {"prompts": [[1, 2], [3]], "responses": [[4], []]},
        "ints": torch.arange(5, dtype=torch.int64),
        "bf16": torch.randn(3).to(torch.bfloat16),
    }
    ckpt.save_state(state, tmp_path)
    loaded = ckpt.load_state(tmp_path)

    assert loaded[7] == {"__tensor__": "not a tensor"}
    assert loaded["numbers"] == state["numbers"] and loaded["tuple"] == state["tuple"]
    assert loaded["buffer"] == state["buffer"]
    assert torch.equal(loaded["ints"], state["ints"]) and loaded["bf16"].dtype == torch.bfloat16
    assert torch.equal(loaded["bf16"], state["bf16"])
    restored = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1.0)
    restored.load_state_dict(loaded["optimizer"])
    assert restored.param_groups[0]["betas"] == (0.8, 0.9) and restored.param_groups[0]["lr"] == 0.1
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(restored.state_dict()["state"][0][key], optimizer.state_dict()["state"][0][key])
    # Nothing but safetensors and JSON on disk.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.safetensors"]
    json.loads((tmp_path / "state.json").read_text())


def test_rng_states_round_trip_and_replay_the_same_numbers(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ckpt.save_state({"rng": rng_state()}, tmp_path)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(ckpt.load_state(tmp_path)["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_objects_that_would_need_pickle_are_refused(tmp_path):
    with pytest.raises(TypeError, match="cannot store set"):
        ckpt.save_state({"a": {1, 2}}, tmp_path)


@pytest.mark.parametrize("damage", ["truncate_tensors", "garbage_json", "missing_json"])
def test_damaged_state_raises_checkpoint_error_naming_the_file(damage, tmp_path):
    ckpt.save_state({"w": torch.ones(100), "step": 3}, tmp_path)
    if damage == "truncate_tensors":
        data = (tmp_path / "state.safetensors").read_bytes()
        (tmp_path / "state.safetensors").write_bytes(data[: len(data) // 2])
        name = "state.safetensors"
    elif damage == "garbage_json":
        (tmp_path / "state.json").write_text('{"__dict__": [[')
        name = "state.json"
    else:
        (tmp_path / "state.json").unlink()
        name = "state.json"
    with pytest.raises(ckpt.CheckpointError, match=name):
        ckpt.load_state(tmp_path)


def write(run_dir, step, keep=2, fail=False):
    def contents(folder):
        (folder / "weights.txt").write_text(f"step {step}")
        if fail:
            raise KeyboardInterrupt  # e.g. Ctrl-C half-way through the write
        ckpt.save_state({"step": step}, folder)

    return ckpt.write_checkpoint(run_dir, step, contents, keep)


def test_interrupted_write_leaves_previous_checkpoint_as_latest(tmp_path):
    write(tmp_path, 2)
    with pytest.raises(KeyboardInterrupt):
        write(tmp_path, 4, fail=True)
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert ckpt.load_state(tmp_path / "checkpoint-2")["step"] == 2
    assert not list(tmp_path.glob(".tmp-*")) and not (tmp_path / "checkpoint-4").exists()


def test_leftovers_of_a_killed_write_are_ignored_then_cleaned(tmp_path):
    write(tmp_path, 2)
    half = tmp_path / ".tmp-checkpoint-4-abc"  # what SIGKILL mid-write leaves behind
    half.mkdir()
    (half / "weights.txt").write_text("half")
    unmarked = tmp_path / "checkpoint-6"  # a folder without the COMPLETE marker never counts
    unmarked.mkdir()
    assert ckpt.list_checkpoints(tmp_path) == [(2, tmp_path / "checkpoint-2")]
    assert ckpt.remove_leftovers(tmp_path) == 1 and not half.exists()


def test_replacing_a_checkpoint_of_the_same_step_is_atomic(tmp_path, monkeypatch):
    write(tmp_path, 2)
    write(tmp_path, 4)
    assert (tmp_path / "checkpoint-4" / "weights.txt").read_text() == "step 4"
    # A crash after the old copy was set aside but before the new one landed:
    real_replace = ckpt.os.replace
    calls = []

    def crash_on_second(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash_on_second)
    with pytest.raises(OSError):
        write(tmp_path, 4)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    ckpt.remove_leftovers(tmp_path)  # what resume does first: the set-aside copy comes back
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 4]
    assert ckpt.load_state(tmp_path / "checkpoint-4")["step"] == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_only_the_newest_keep_checkpoints_remain(tmp_path):
    for step in (1, 2, 3, 4):
        write(tmp_path, step, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 4]
    write(tmp_path, 5, keep=1)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [5]


def test_one_modules_state_is_read_alone(tmp_path):
    """PromptKD's soft prompt from a checkpoint without reading the optimiser states."""
    prompt = torch.randn(3, 4)
    state = {"step": 2, "optimizers": {"student": {"state": {0: {"exp_avg": torch.randn(5)}}}},
             "modules": {"soft_prompt": {"embeddings": prompt}}}
    ckpt.save_state(state, tmp_path)
    assert torch.equal(ckpt.load_module_state(tmp_path, "soft_prompt")["embeddings"], prompt)
    assert ckpt.load_module_state(tmp_path, "other") is None
    (tmp_path / "state.json").write_text("{")
    with pytest.raises(ckpt.CheckpointError, match="state.json"):
        ckpt.load_module_state(tmp_path, "soft_prompt")
