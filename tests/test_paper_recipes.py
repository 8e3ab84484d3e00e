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


DOLLY_RECIPES = sorted(PAPER.glob("*_dolly.yaml"))


@pytest.fixture(scope="module")
def stand_in_dolly(tmp_path_factory):
    """A small stand-in for databricks/databricks-dolly-15k with the Hub's column names: its first rows are
    test rows (Dolly valid.jsonl, as the Hub's first rows are), then dev rows (dev.jsonl), then 12 rows
    that belong to neither: only those may be trained on."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from conftest import DATA_DIR

    def hub_rows(path, n):
        rows = [json.loads(line) for line in (DATA_DIR / path).read_text().splitlines()][:n]
        return [{"instruction": r["instruction"], "context": r.get("input", ""), "response": r["output"],
                 "category": r.get("topic", "")} for r in rows]

    train = [{"instruction": f"Name {i + 2} prime numbers.", "context": "", "response": "2, 3, 5.",
              "category": "brainstorming"} for i in range(12)]
    rows = hub_rows("instruct/dolly/valid.jsonl", 30) + hub_rows("instruct/dolly/dev.jsonl", 30) + train
    path = tmp_path_factory.mktemp("hub") / "dolly.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path, [r["instruction"] for r in train]


@pytest.mark.parametrize("recipe", DOLLY_RECIPES, ids=lambda p: p.stem)
def test_paper_recipes_train_on_the_references_split_and_select_on_dev(recipe, stand_in_dolly):
    """No evaluation (test) or dev row trains: with the stand-in as train_data exactly its 12 other rows
    remain; every recipe keeps its best dev checkpoint, selected on the dev split, not a test set."""
    from lmdistill.instruct.data import load_training_data

    path, train_instructions = stand_in_dolly
    config = load_config(recipe, [f"train_data={path}"])
    assert [e.instruction for e in load_training_data(config)] == train_instructions
    assert config.eval_every > 0 and config.eval_data_path.endswith("instruct/dolly/dev.jsonl")
    assert not any(f.endswith("dev.jsonl") for f in config.test_data)
    assert config.length_group == 1  # random batches, as the references
