"""The comparison recipe (`configs/compare_dolly.yaml`): which methods, the shared budget, the
protocol stages before them, and the evaluation.

The protocol is the references' (MiniLLM, PromptKD, DistiLLM; docs/fidelity.md "Comparison
protocol"): stage 0 fine-tunes the teacher on the training split, stage 1 builds the student's
SFT init, then each method trains from the start its reference uses, with its own optimiser
settings, selecting its checkpoint on a dev split held apart from training and test rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lmdistill.config import (SamplingConfig, TrainConfig, build_config, check, config_fields, doc, expand_path,
                              parse_overrides, read_recipe)
from lmdistill.methods import METHODS

# The shared `train` block is the budget: what every method must get the same of.
BUDGET_KEYS = frozenset({
    "train_data", "split", "prompt_field", "response_field", "messages_field", "max_train_examples", "steps",
    "batch_size", "grad_accum", "seed", "max_length", "max_prompt_length", "max_new_tokens", "prompt_format",
    "progress", "precision", "length_group", "dropout", "gradient_checkpointing", "report_to",
})
# Optimiser settings are each method's own (its reference's), never shared.
OPTIMISER_KEYS = ("lr", "prompt_lr", "lr_schedule", "warmup_steps", "weight_decay", "adam_betas", "max_grad_norm")
# Recipe keys that must be equal across methods for the comparison to be fair.
SHARED_KEYS = ("train_data", "steps", "batch_size", "grad_accum", "seed", "max_train_examples", "max_length",
               "max_prompt_length", "prompt_format")
# Shared `train` keys that only methods generating during training have (SamplingConfig's own).
SAMPLING_KEYS = frozenset(config_fields(SamplingConfig)) - frozenset(config_fields(TrainConfig))
# The references start these from the SFT'd student init and the others (sft, kd, seqkd) from the
# pre-trained model: DistiLLM scripts/gpt2/{gkd,imitkd,distillm}/*_base.sh (CKPT=.../train/init/...),
# MiniLLM/PromptKD scripts/gpt2/{minillm,promptkd}/*_base.sh (CKPT=.../minillm_init/...).
INIT_METHODS = ["gkd", "imitkd", "distillm", "minillm", "promptkd"]


@dataclass
class CompareConfig:
    """A comparison: methods, the shared budget, the protocol stages, evaluation sets and seeds."""

    output_dir: str = doc("Comparison folder: one sub-folder per method (and per stage) plus "
                          "comparison.md/.png/.json.", default="runs/compare")
    student: str = doc("The pre-trained student (folder, Hub id or alias): the start of the methods that their "
                       "references start from the pre-trained model, and of stage 1.", default="")
    teacher: str = doc("The teacher before stage 0 (evaluated as a reference row; with `teacher_sft` the "
                       "fine-tuned teacher is the one every method distils from).", default="")
    methods: list[str] = doc("Run names, trained in this order; a name is a method (`kd`, ...) unless its recipe "
                             "sets `method:`.", default_factory=list)
    recipes: dict = doc("name -> recipe YAML with that method's own keys and its reference's optimiser settings "
                        "(lr, schedule, warm-up, betas, weight decay; e.g. configs/kd_dolly.yaml).",
                        default_factory=dict)
    train: dict = doc("The budget every run shares: data, steps, batch, lengths, seed (keys: "
                      f"{', '.join(sorted(BUDGET_KEYS))}); optimiser settings are refused here (each method keeps "
                      "its recipe's).", default_factory=dict)
    method_overrides: dict = doc("name -> {key: value} for method-specific keys; may not change the shared keys "
                                 f"({', '.join(SHARED_KEYS)}).", default_factory=dict)
    teacher_sft: bool = doc("Stage 0: fine-tune the teacher on the training split first (MiniLLM/PromptKD "
                            "sft_xlarge.sh), with `teacher_sft_recipe`; false: distil from `teacher` as it is.",
                            default=True)
    teacher_sft_recipe: str = doc("Recipe of stage 0 (its optimiser settings; the budget is `train`'s, its steps "
                                  "`teacher_sft_steps`).", default="configs/teacher_sft_dolly.yaml")
    teacher_sft_steps: Optional[int] = doc("Steps of stage 0 (null: train.steps).", default=None)
    student_init: bool = doc("Stage 1: the student's SFT init (MiniLLM init_base.sh), the start of `init_methods`; "
                             "false: every method starts from `student`.", default=True)
    student_init_recipe: str = doc("Recipe of stage 1.", default="configs/student_init_dolly.yaml")
    student_init_steps: Optional[int] = doc("Steps of stage 1 (null: train.steps).", default=None)
    init_student: Optional[str] = doc("An SFT init built before (e.g. another training seed's stage 1, "
                                      "`<output_dir>/student_init/best`): the start of `init_methods`, in place of "
                                      "stage 1 (then `student_init` must be false).", default=None)
    init_methods: list[str] = doc("Methods that start from the stage-1 init, as their references do "
                                  f"(default {INIT_METHODS}); the others start from `student`.",
                                  default_factory=lambda: list(INIT_METHODS))
    dev_examples: int = doc("The first N training rows become the dev split (`<output_dir>/dev.jsonl`), which "
                            "the contamination guard then keeps out of every run's training; 0: no dev split.",
                            default=0)
    eval_every: int = doc("Every run (stages included) scores the dev split every N steps and keeps its best "
                          "checkpoint in best/, as the references select (0: no selection).", default=0)
    eval_data: list[str] = doc("Evaluation JSONL files (`${LMDISTILL_DATA_DIR}` expanded); the contamination "
                               "guard keeps their prompts out of every run's training.", default_factory=list)
    eval_seeds: list[int] = doc(
        "Sampling seeds; the table shows mean ± std over them.", default_factory=lambda: [10, 20, 30]
    )
    eval_max_examples: Optional[int] = doc("Evaluate on the first N examples of each set (None: all).", default=None)
    eval_max_new_tokens: Optional[int] = doc(
        "Cap on generated response tokens (MiniLLM/PromptKD: 256; None: up to eval_max_length).", default=256
    )
    eval_max_prompt_length: int = doc(
        "Prompts keep their first N tokens at evaluation (MiniLLM/PromptKD: 256).", default=256
    )
    eval_max_length: int = doc("Prompt + response token limit at evaluation.", default=512)
    evaluate_checkpoint: str = doc(
        "Which student of each method is evaluated: `best` (best/, the best dev checkpoint, when the run "
        "selected one; else student/) or `final` (student/).",
        default="best",
    )
    eval_batch_size: int = doc("Prompts per generation batch at evaluation.", default=8)
    eval_greedy: bool = doc(
        "Greedy decoding instead of sampling (then all seeds give the same numbers).", default=False
    )
    prompt_format: str = doc("Prompt format at evaluation: auto, chat or alpaca.", default="auto")
    include_teacher: bool = doc("Add the teacher (the one the methods distil from) as a reference row.",
                                default=True)
    include_initial_student: bool = doc("Add the pre-trained student (and the stage-1 init) as reference rows.",
                                        default=True)
    clean_checkpoints: bool = doc("Delete a finished run's checkpoints (its student/ and best/ stay).", default=True)
    exposure_bias_every: int = doc("Measure ExAccErr on a checkpoint every N steps (0: off).", default=0)
    exposure_bias_data: Optional[str] = doc("Prompts for ExAccErr (default: the first eval_data file).", default=None)
    exposure_bias_examples: int = doc("Prompts used for ExAccErr.", default=16)
    exposure_bias_length: int = doc(
        "Longest generation length l of ExAccErr(l); the plot over training uses it.", default=32
    )
    exposure_bias_samples: int = doc("Sampled responses per prompt for ExAccErr.", default=1)
    exposure_bias_no_repeat_ngram_size: int = doc(
        "n-gram blocking of both ExAccErr rollouts (PromptKD's script: 6; 0: plain ancestral samples).", default=6
    )
    exposure_bias_averaging: str = doc(
        "`expectation`: R(l), E(l) as expectations over samples; `running`: each "
        "position averaged over the samples still running there, as PromptKD's "
        "script.",
        default="expectation",
    )
    exposure_bias_oracle: str = doc(
        "`teacher`; `prompted_teacher`: for PromptKD runs the oracle is the teacher "
        "with the run's soft prompt, as the paper's analysis (other methods: the "
        "teacher).",
        default="teacher",
    )

    def validate(self) -> None:
        check(bool(self.student), "student", "the initial student model", self.student)
        check(bool(self.teacher), "teacher", "a teacher model", self.teacher)
        check(bool(self.methods), "methods", "a non-empty list of methods", self.methods)
        check(len(set(self.methods)) == len(self.methods), "methods", "distinct names", self.methods)
        for name in self.methods:
            check(name in METHODS or name in self.recipes, "methods",
                  f"method names from {sorted(METHODS)} (or names with a recipe)", name)
        for name in list(self.recipes) + list(self.method_overrides):
            check(name in self.methods, "recipes" if name in self.recipes else "method_overrides",
                  f"names listed in methods {self.methods}", name)
        for name, path in self.recipes.items():
            check(Path(expand_path(str(path))).is_file(), "recipes", f"an existing recipe file for '{name}'", path)
        for key, on, path in (("teacher_sft_recipe", self.teacher_sft, self.teacher_sft_recipe),
                              ("student_init_recipe", self.student_init, self.student_init_recipe)):
            check(not on or Path(expand_path(path)).is_file(), key, "an existing recipe file", path)
        for name, values in self.method_overrides.items():
            check(isinstance(values, dict), "method_overrides", f"a mapping of key: value for '{name}'", values)
            shared = sorted(set(values) & set(SHARED_KEYS))
            check(not shared, "method_overrides", f"no shared keys for '{name}' (every method must get the same)",
                  shared)
        check(not any(k in self.train for k in OPTIMISER_KEYS), "train",
              "the shared budget only: optimiser settings come from each method's recipe (its reference's); "
              "change one method's with method_overrides.<name>.<key>", sorted(set(self.train) & set(OPTIMISER_KEYS)))
        check(all(k in BUDGET_KEYS for k in self.train), "train", f"budget keys ({', '.join(sorted(BUDGET_KEYS))})",
              sorted(set(self.train) - BUDGET_KEYS))
        check(self.init_student is None or not self.student_init, "init_student",
              "null while student_init is true (stage 1 builds the init)", self.init_student)
        for key in ("teacher_sft_steps", "student_init_steps"):
            value = getattr(self, key)
            check(value is None or value > 0, key, "> 0 or null", value)
        check(self.dev_examples >= 0, "dev_examples", ">= 0", self.dev_examples)
        check(self.eval_every >= 0, "eval_every", ">= 0", self.eval_every)
        check(not self.eval_every or self.dev_examples > 0, "eval_every",
              "0 unless a dev split is held out (dev_examples > 0)", self.eval_every)
        check(bool(self.eval_data), "eval_data", "a non-empty list of evaluation files", self.eval_data)
        check(bool(self.eval_seeds), "eval_seeds", "a non-empty list of seeds", self.eval_seeds)
        check(self.eval_max_examples is None or self.eval_max_examples > 0, "eval_max_examples", "> 0 or null",
              self.eval_max_examples)
        check(self.eval_max_new_tokens is None or self.eval_max_new_tokens > 0, "eval_max_new_tokens",
              "> 0 or null", self.eval_max_new_tokens)
        check(self.eval_max_length > 0, "eval_max_length", "> 0", self.eval_max_length)
        check(self.eval_max_prompt_length > 0, "eval_max_prompt_length", "> 0", self.eval_max_prompt_length)
        check(self.evaluate_checkpoint in ("final", "best"), "evaluate_checkpoint", "final or best",
              self.evaluate_checkpoint)
        check(self.exposure_bias_oracle in ("teacher", "prompted_teacher"), "exposure_bias_oracle",
              "teacher or prompted_teacher", self.exposure_bias_oracle)
        check(self.exposure_bias_averaging in ("expectation", "running"), "exposure_bias_averaging",
              "expectation or running", self.exposure_bias_averaging)
        check(self.exposure_bias_no_repeat_ngram_size >= 0, "exposure_bias_no_repeat_ngram_size", ">= 0",
              self.exposure_bias_no_repeat_ngram_size)
        check(self.eval_batch_size > 0, "eval_batch_size", "> 0", self.eval_batch_size)
        check(self.prompt_format in ("auto", "chat", "alpaca"), "prompt_format", "auto, chat or alpaca",
              self.prompt_format)
        check(self.exposure_bias_every >= 0, "exposure_bias_every", ">= 0", self.exposure_bias_every)
        check(self.exposure_bias_examples > 0, "exposure_bias_examples", "> 0", self.exposure_bias_examples)
        check(self.exposure_bias_length > 0, "exposure_bias_length", "> 0", self.exposure_bias_length)
        check(self.exposure_bias_samples > 0, "exposure_bias_samples", "> 0", self.exposure_bias_samples)

    @property
    def out(self) -> Path:
        return Path(expand_path(self.output_dir))


def load_compare_config(path: str | Path | None, overrides: Optional[list[str]] = None) -> CompareConfig:
    """Read a comparison recipe; `key=value` overrides, `train.steps=5` for keys of the mappings."""
    values, where = read_recipe(path)
    for key, value in parse_overrides(overrides or []).items():
        if "." in key:
            outer, inner = key.split(".", 1)
            nested = dict(values.get(outer) or {})
            if "." in inner:  # method_overrides.kd.kd_ratio=0.3
                name, inner = inner.split(".", 1)
                nested[name] = {**(nested.get(name) or {}), inner: value}
            else:
                nested[inner] = value
            values[outer] = nested
            where[outer] = "command line"
        else:
            values[key] = value
            where[key] = "command line"
    return build_config(CompareConfig, values, where)
