"""Helpers shared by the KD-baseline method tests (tiny random-weight teacher and student)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmdistill.config import config_fields
from lmdistill.methods import load_config, method_class
from lmdistill.trainer import Trainer


def make_trainer(method: str, teacher: Path, student: Path, data: Path, run_dir: Path, **extra) -> Trainer:
    """A Trainer for `method` with small, fast settings; `extra` overrides recipe keys."""
    overrides = {"student": student, "teacher": teacher, "train_data": data, "output_dir": run_dir, "steps": 3,
                 "batch_size": 2, "max_new_tokens": 8, "prompt_format": "alpaca", "progress": "false",
                 "lr": 3e-3, "lr_schedule": "constant", "warmup_steps": 0, "max_length": 160, "max_prompt_length": 128}
    overrides.update(extra)
    if "max_new_tokens" not in config_fields(method_class(method).config_class):  # methods that do not sample
        overrides.pop("max_new_tokens")
    return Trainer(load_config(None, [f"method={method}"] + [f"{k}={v}" for k, v in overrides.items()]))


def objective_drops(trainer: Trainer, work, objective, updates: int = 5) -> tuple[float, float]:
    """Objective on the fixed `work` before and after `updates` optimiser steps on it."""
    def value() -> float:
        with torch.no_grad():
            return float(objective(work))

    before = value()
    for _ in range(updates):
        logs = trainer.update("student", [work])
        assert logs["_finite"] == 1.0, logs
    return before, value()


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
