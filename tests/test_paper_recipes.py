"""The paper-scale recipes in configs/paper/ load and validate unchanged, and keep the values of
the reference scripts they cite (a user with GPUs runs them as they are)."""

from pathlib import Path

import pytest

from lmdistill.methods import load_config

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"


@pytest.mark.parametrize("recipe", sorted(PAPER.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_paper_recipe_validates(recipe):
    config = load_config(recipe)
    header = recipe.read_text().split("\nmethod:")[0]
    assert "docs/fidelity.md" in header and " at " in header, f"{recipe.name} does not cite its source script"
    assert config.output_dir.startswith("runs/paper/")


def test_paper_recipes_keep_the_reference_values():
    promptkd = load_config(PAPER / "promptkd_gpt2_xl_base_dolly.yaml")
    assert (promptkd.lr, promptkd.prompt_lr, promptkd.weight_decay, promptkd.warmup_steps, promptkd.lr_schedule,
            promptkd.prompt_len, promptkd.batch_size * promptkd.grad_accum * 8) == (5e-5, 5e-5, 0.01, 100, "constant",
                                                                                   7, 256)
    minillm = load_config(PAPER / "minillm_gpt2_xl_base_dolly.yaml")
    assert (minillm.adam_betas, minillm.gamma, minillm.reward_scaling, minillm.ppo_epochs, minillm.teacher_mix,
            minillm.steps) == ([0.9, 0.95], 0.95, 0.5, 4, 0.2, 5000)
    distillm = load_config(PAPER / "distillm_gpt2_xl_base_dolly.yaml")
    assert (distillm.skew, distillm.capacity, distillm.init_threshold, distillm.loss_type) == (0.1, 1000, 0.0, "sfkl")
    sbs = load_config(PAPER / "step_by_step_t5_base_svamp.yaml")
    assert (sbs.alpha, sbs.label_prefix, sbs.rationale_prefix, sbs.max_target_length, sbs.batch_size,
            sbs.steps) == (0.5, "predict: ", "explain: ", 256, 64, 10000)
