"""Distilling step-by-step (Hsieh et al., "Distilling Step-by-Step! Outperforming Larger
Language Models with Less Training Data and Smaller Model Sizes", ACL 2023 Findings),
and its two baselines.

A teacher LLM's few-shot chain-of-thought outputs are parsed into a rationale r_i and a
label y_i for every training input x_i (`lmdistill.reasoning.data`). The student f
learns two tasks from the same input, told apart by a prefix:

    L = alpha * L_label + (1 - alpha) * L_rationale        (alpha = 0.5, the released code; with
                                                            `rationale_weight`: L_label + lambda L_rationale)
    L_label     = CE(f("predict: " + x_i), label_i)        label_i = gold or teacher y_i
    L_rationale = CE(f("explain: " + x_i), r_i)

each CE the mean token negative log-likelihood of the target (the response tokens of a
causal LM, the decoder tokens of an encoder-decoder). At test time only the label task
runs, so no rationale is generated and no teacher is needed.

Baselines, the same code with no rationale task (the paper's "standard" models, which
have no prefix by default): `finetune` trains on gold labels, `distill` on the teacher's
labels. Rows whose teacher output did not parse are left out wherever a teacher label
or rationale is needed.

Both tasks go through one optimiser step. By default each task has its own forward pass
(`multitask_forward: separate`); `concat` stacks the label and rationale rows into one
padded batch and one pass. Both give the same loss (tests). Separate passes were faster
on the SmolLM2-135M student (docs/results.md, `bench/multitask_forward.py`: SVAMP, batch 8,
bf16, one thread, 6.6-7.2 vs 7.6-7.7 s/step, concat 1.12x slower): the joint batch pads
every label row to rationale length, and one bigger pass buys nothing on a CPU.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional

import torch

from lmdistill.config import TrainConfig, check, doc
from lmdistill.data import Batch, DataError, TokenizedExample, collate, normalise_whitespace
from lmdistill.forward import output_head, response_hidden
from lmdistill.losses import cross_entropy
from lmdistill.losses.chunked import chunked_cross_entropy
from lmdistill.methods.base import Method
from lmdistill.reasoning.data import DATASETS, load_reasoning_dataset, reasoning_input_ids
from lmdistill.reasoning.evaluate import (
    TASK_FILE,
    evaluate_reasoning,
)  # TASK_FILE: how `lmdistill eval` rebuilds inputs

log = logging.getLogger("lmdistill")


@dataclass
class StepByStepConfig(TrainConfig):
    """Distilling step-by-step: label + rationale multi-task training on teacher CoT outputs."""

    method: str = doc("Training method.", default="step_by_step")
    train_data: str = doc(
        "A dataset folder laid out as `${LMDISTILL_DATA_DIR}/step_by_step/<name>` "
        "(gold files + llm/ teacher outputs), or a JSONL file with input, label, optional "
        "rationale.",
        default="",
    )
    dataset: str = doc(
        "esnli, anli1, cqa, svamp or jsonl; `auto`: jsonl for a file, else the folder's name.", default="auto"
    )
    label_source: str = doc(
        "Labels to train on: `gold` (human) or `teacher` (the LLM's parsed labels).", default="teacher"
    )
    alpha: float = doc(
        "Loss weighting of the released code: L = alpha L_label + (1 - alpha) L_rationale.", default=0.5
    )
    rationale_weight: Optional[float] = doc(
        "The paper's text instead: L = L_label + lambda L_rationale with this lambda (null: use alpha).", default=None
    )
    label_prefix: str = doc("Text put before the input for the label task (the released code's).", default="predict: ")
    rationale_prefix: str = doc(
        "Text put before the input for the rationale task (the released code's).", default="explain: "
    )
    train_fraction: float = doc(
        "Fraction of the training split used, drawn with `seed` (data-efficiency runs).", default=1.0
    )
    max_target_length: int = doc(
        "Longest label / rationale target in tokens, EOS included (longer ones are cut; the released code: 256).",
        default=256,
    )
    subsample_first: bool = doc(
        "CQA/SVAMP: draw `train_fraction` before holding out the 10% validation rows, as "
        "the released code does (false: hold out first, then subsample).",
        default=True,
    )
    multitask_forward: str = doc(
        "`separate`: one forward pass per task (faster here); `concat`: both tasks in "
        "one padded batch, one forward pass.",
        default="separate",
    )
    prompt_format: str = doc(
        "Causal students: `chat` wraps the prefixed input in the chat template, `alpaca` in "
        "the Alpaca template, `auto` = chat when the tokenizer has one. Encoder-decoder "
        "students read the prefixed text as it is.",
        default="auto",
    )

    # Not config keys: the baselines switch the rationale task off and fix the label source.
    uses_rationales: ClassVar[bool] = True
    eval_data_required: ClassVar[bool] = False  # eval_data names a split; default `valid`
    fixed_label_source: ClassVar[Optional[str]] = None

    def validate(self) -> None:
        super().validate()
        check(
            self.dataset in ("auto", "jsonl") + DATASETS,
            "dataset",
            f"auto, jsonl or one of {list(DATASETS)}",
            self.dataset,
        )
        check(self.label_source in ("gold", "teacher"), "label_source", "gold or teacher", self.label_source)
        if self.fixed_label_source is not None:
            check(
                self.label_source == self.fixed_label_source,
                "label_source",
                f"'{self.fixed_label_source}' for method {self.method}",
                self.label_source,
            )
        check(0.0 <= self.alpha <= 1.0, "alpha", "in [0, 1]", self.alpha)
        check(
            self.rationale_weight is None or self.rationale_weight >= 0,
            "rationale_weight",
            ">= 0 or null",
            self.rationale_weight,
        )
        check(0 < self.train_fraction <= 1, "train_fraction", "in (0, 1]", self.train_fraction)
        check(self.max_target_length > 1, "max_target_length", "> 1", self.max_target_length)
        check(
            self.multitask_forward in ("separate", "concat"),
            "multitask_forward",
            "separate or concat",
            self.multitask_forward,
        )
        if self.uses_rationales:
            check(
                self.label_prefix != self.rationale_prefix,
                "rationale_prefix",
                f"a prefix different from label_prefix ({self.label_prefix!r})",
                self.rationale_prefix,
            )

    @property
    def dataset_name(self) -> str:
        if self.dataset != "auto":
            return self.dataset
        path = Path(self.train_data_path)
        return path.name if path.is_dir() and path.name in DATASETS else "jsonl"


@dataclass
class FinetuneConfig(StepByStepConfig):
    """Standard fine-tuning on gold labels (no rationales, no prefix)."""

    method: str = doc("Training method.", default="finetune")
    label_source: str = doc("Always `gold` for finetune.", default="gold")
    label_prefix: str = doc("Text put before the input (the paper's standard model has none).", default="")

    uses_rationales = False
    fixed_label_source = "gold"


@dataclass
class DistillConfig(StepByStepConfig):
    """Standard distillation on the teacher's labels (no rationales, no prefix)."""

    method: str = doc("Training method.", default="distill")
    label_source: str = doc("Always `teacher` for distill.", default="teacher")
    label_prefix: str = doc("Text put before the input (the paper's standard model has none).", default="")

    uses_rationales = False
    fixed_label_source = "teacher"


# ----- examples and batches -----


@dataclass
class ReasoningExample:
    """Token ids of one training input: the label task, and the rationale task (or empty)."""

    id: str
    label_prompt: list[int]
    label_target: list[int]
    rationale_prompt: list[int] = field(default_factory=list)
    rationale_target: list[int] = field(default_factory=list)


@dataclass
class Seq2SeqBatch:
    """Encoder inputs [B, S] (right-padded) and decoder targets [B, L] with their mask."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    label_mask: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum() + self.label_mask.sum())

    def to(self, device) -> "Seq2SeqBatch":
        return Seq2SeqBatch(
            *(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels, self.label_mask))
        )

    def targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.labels, self.label_mask


def collate_seq2seq(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> Seq2SeqBatch:
    S, L = max(len(p) for p, _ in pairs), max(len(t) for _, t in pairs)
    ids, attn = torch.full((len(pairs), S), pad_id), torch.zeros((len(pairs), S), dtype=torch.long)
    labels, mask = torch.full((len(pairs), L), pad_id), torch.zeros((len(pairs), L), dtype=torch.long)
    for i, (p, t) in enumerate(pairs):
        ids[i, : len(p)], attn[i, : len(p)] = torch.tensor(p), 1
        labels[i, : len(t)], mask[i, : len(t)] = torch.tensor(t), 1
    return Seq2SeqBatch(ids, attn, labels, mask)


@dataclass
class MultiTaskBatch:
    """One micro-batch of both tasks: `parts` maps task -> batch (`separate`), or holds
    one `joint` batch whose first `n_label` rows are the label task (`concat`)."""

    parts: dict
    n_label: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(b.num_tokens for b in self.parts.values())

    def to(self, device) -> "MultiTaskBatch":
        return MultiTaskBatch({k: b.to(device) for k, b in self.parts.items()}, self.n_label)


# ----- the method -----


class StepByStep(Method):
    config_class = StepByStepConfig
    description = "Distilling step-by-step: label + rationale multi-task training (Hsieh et al., ACL 2023 Findings)"
    progress_key = "loss"

    def __init__(self, config: StepByStepConfig, context):
        super().__init__(config, context)
        self.seq2seq = bool(getattr(self.unwrapped_student.config, "is_encoder_decoder", False))
        self.with_rationales = config.uses_rationales

    # data

    def load_examples(self) -> list[ReasoningExample]:
        c = self.config
        name = c.dataset_name
        data = load_reasoning_dataset(name, "train", c.train_data_path, c.train_fraction, c.seed, c.subsample_first)
        log.info("training data %s", data.describe())
        data.records = self.drop_test_inputs(data.records)
        examples, no_target, too_long = [], 0, 0
        cut = {"label": 0, "rationale": 0}  # targets that lost their end (EOS) to the length limit
        eos = self.tokenizer.eos_token_id
        for record in data.records:
            target = record.label if c.label_source == "gold" else record.teacher_label
            if target is None or (self.with_rationales and record.rationale is None):
                no_target += 1  # the teacher output did not parse: left out of training
                continue
            label_prompt = self.encode_input(c.label_prefix + record.input)
            example = ReasoningExample(record.id, label_prompt, self.encode_target(target, len(label_prompt)))
            if self.with_rationales:
                example.rationale_prompt = self.encode_input(c.rationale_prefix + record.input)
                example.rationale_target = self.encode_target(record.rationale, len(example.rationale_prompt))
            if max(len(example.label_prompt), len(example.rationale_prompt)) > c.max_prompt_length:
                too_long += 1
                continue
            examples.append(example)
            cut["label"] += example.label_target[-1] != eos
            cut["rationale"] += self.with_rationales and example.rationale_target[-1] != eos
        log.info(
            "%d training examples (%d left out: no parsed teacher output; %d: input over %d tokens); "
            "targets cut to max_target_length=%d: %d labels, %d rationales",
            len(examples),
            no_target,
            too_long,
            c.max_prompt_length,
            c.max_target_length,
            cut["label"],
            cut["rationale"],
        )
        if not examples:
            raise DataError(f"{c.train_data_path}: no usable training examples for method {c.method}")
        return examples

    def drop_test_inputs(self, records: list) -> list:
        """The contamination guard of reasoning data: training rows whose input equals (whitespace
        normalised) an input of the task's test split leave training (`contamination: drop`, counted
        in the log) or stop the run (`error`). A `jsonl` dataset has no test split to compare with."""
        c = self.config
        if c.dataset_name == "jsonl":
            return records
        test = load_reasoning_dataset(c.dataset_name, "test", c.train_data_path)
        heldout = {normalise_whitespace(r.input): r.id for r in test.records}
        kept = []
        for record in records:
            match = heldout.get(normalise_whitespace(record.input))
            if match is None:
                kept.append(record)
            elif c.contamination == "error":
                raise DataError(f"{c.train_data_path}: training row id {record.id} has the input of test row id "
                                f"{match} (config key 'contamination': error; `drop` leaves such rows out)")
        log.info("contamination guard: %d of %d training rows dropped, their input is a %s test input",
                 len(records) - len(kept), len(records), c.dataset_name)
        return kept

    def encode_input(self, text: str) -> list[int]:
        return reasoning_input_ids(text, self.tokenizer, self.config.prompt_format, self.seq2seq)

    def encode_target(self, text: str, prompt_length: int) -> list[int]:
        room = self.config.max_target_length
        if not self.seq2seq:
            room = min(room, self.config.max_length - prompt_length)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        return ids[: max(room, 1)]

    def example_length(self, example: ReasoningExample) -> int:
        return (
            len(example.label_prompt)
            + len(example.label_target)
            + len(example.rationale_prompt)
            + len(example.rationale_target)
        )

    def collate(self, examples: list[ReasoningExample]) -> MultiTaskBatch:
        tasks = {"label": [(e.label_prompt, e.label_target) for e in examples]}
        if self.with_rationales:
            tasks["rationale"] = [(e.rationale_prompt, e.rationale_target) for e in examples]
        if self.config.multitask_forward == "concat" and len(tasks) == 2:
            return MultiTaskBatch({"joint": self._collate_rows(tasks["label"] + tasks["rationale"])}, len(examples))
        return MultiTaskBatch({task: self._collate_rows(rows) for task, rows in tasks.items()})

    def _collate_rows(self, rows):
        pad = self.tokenizer.pad_token_id
        if self.seq2seq:
            return collate_seq2seq(rows, pad)

        return collate([TokenizedExample(p, t, []) for p, t in rows], pad)

    # loss

    def run_student(self, batch):
        """One forward pass over `batch`; returns nll(rows): the mean target-token negative
        log-likelihood of those rows (rows share the pass, as in the `concat` batch)."""
        labels, mask = batch.targets()
        if isinstance(batch, Batch):  # causal LM: final hidden states at the response positions
            hidden, head = response_hidden(self.student, batch), output_head(self.student)
            # = losses.cross_entropy(response_logits(...)), projected to the vocabulary in chunks
            return lambda rows: chunked_cross_entropy(hidden[rows], head, labels[rows], mask[rows])
        start = torch.full_like(labels[:, :1], self.unwrapped_student.config.decoder_start_token_id)
        logits = self.student(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            decoder_input_ids=torch.cat([start, labels[:, :-1]], dim=1),  # teacher forcing
            use_cache=False,
        ).logits
        return lambda rows: cross_entropy(logits[rows], labels[rows], mask[rows])

    def task_losses(self, batch: MultiTaskBatch) -> dict[str, torch.Tensor]:
        """Mean target-token cross-entropy of each task in the micro-batch."""
        if "joint" in batch.parts:  # one pass; the first n_label rows are the label task
            nll, n = self.run_student(batch.parts["joint"]), batch.n_label
            return {"label": nll(slice(0, n)), "rationale": nll(slice(n, None))}
        return {task: self.run_student(part)(slice(None)) for task, part in batch.parts.items()}

    def loss(self, batch: MultiTaskBatch, step):
        c = self.config
        losses = self.task_losses(batch)
        loss = losses["label"]
        logs = {"label_loss": losses["label"].item()}
        if "rationale" in losses:
            if c.rationale_weight is None:  # the released code: alpha L_label + (1 - alpha) L_rationale
                loss = c.alpha * loss + (1.0 - c.alpha) * losses["rationale"]
            else:  # the paper's text: L_label + lambda L_rationale
                loss = loss + c.rationale_weight * losses["rationale"]
            logs["rationale_loss"] = losses["rationale"].item()
        logs["loss"] = loss.item()
        return loss, logs

    def save_student_files(self, folder: Path) -> None:
        """Record how inputs were built, so `lmdistill eval` builds test inputs the same way."""
        c = self.config
        task = {
            "dataset": c.dataset_name,
            "label_prefix": c.label_prefix,
            "rationale_prefix": c.rationale_prefix if self.with_rationales else None,
            "prompt_format": c.prompt_format,
            "method": c.method,
            "label_source": c.label_source,
        }
        (folder / TASK_FILE).write_text(json.dumps(task, indent=2))

    def dev_score(self) -> tuple[str, float]:
        """Label accuracy (%) on the first `eval_examples` rows of the `eval_data` split (default `valid`)."""
        c = self.config
        result = evaluate_reasoning(
            self.unwrapped_student,
            c.dataset_name,
            c.eval_data or "valid",
            c.train_data_path,
            self.tokenizer,
            max_examples=c.eval_examples,
            label_prefix=c.label_prefix,
            prompt_format=c.prompt_format,
            max_new_tokens=c.eval_max_new_tokens,
            batch_size=c.batch_size,
            keep_samples=0,
        )
        return "accuracy", result.accuracy


class Finetune(StepByStep):
    config_class = FinetuneConfig
    description = "standard fine-tuning on gold labels"


class Distill(StepByStep):
    config_class = DistillConfig
    description = "standard distillation on the teacher's labels"
