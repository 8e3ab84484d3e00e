"""`make demo`'s choice of training precision (the demo itself runs in `make demo`, not here)."""

from __future__ import annotations

import pytest
import torch

from lmdistill import demo


@pytest.mark.parametrize("bf16_s, fp32_s, expected", [(1.0, 2.0, "bf16"), (2.0, 1.0, "fp32")])
def test_the_demo_trains_in_the_precision_timed_faster(bf16_s, fp32_s, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert demo.faster_precision({"bf16": bf16_s, "fp32": fp32_s}.__getitem__) == expected


def test_a_gpu_trains_in_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert demo.faster_precision(lambda precision: pytest.fail("a GPU needs no timing")) == "bf16"


def test_the_timed_step_runs_the_weight_gradient_in_each_precision():
    for precision in ("bf16", "fp32"):
        seconds = demo.linear_step_seconds(precision, rows=64, width=32, hidden=48)
        assert 0 < seconds < 5
