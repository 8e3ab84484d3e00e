"""Reasoning datasets for Distilling step-by-step: gold data plus a teacher's CoT outputs.

Four benchmarks in the layout of the paper's release (Hsieh et al., ACL 2023 Findings),
under `$LMDISTILL_DATA_DIR/step_by_step/<name>/`:

  cqa    `cqa_{train,test}.json`      JSONL: question, choices (5), answer (text)
  svamp  `svamp_{train,test}.json`    JSONL: input (body \\n question), label (equation)
  esnli  `esnli_{valid,test}.json`    JSONL: premise, hypothesis, label 0/1/2
  anli1  `anli1_{valid,test}.json`    JSONL: premise, hypothesis, label 0/1/2

and `llm/{split}_CoT_{i}.json` (JSON lists of strings): concatenated over i = 0, 1, ...
they give one raw PaLM-540B continuation per gold row, aligned by index. Each
continuation is parsed into (rationale, teacher label) by the dataset's rule
(`parse_continuation`); those that do not parse are counted and carry `None`.

Plus any user data in a generic JSONL layout (`dataset: jsonl`): `input`, `label`,
optional `rationale`, `teacher_label`, `gold_label`, `id`. The teacher's label is
`teacher_label` if given, else `label`; the gold label is `gold_label` if given, else
`label`. So a file written by `lmdistill generate` ({"input", "label", "rationale",
"gold_label"}: the teacher's label and rationale, and the gold label) trains and scores
as the shipped datasets do.

Splits, as the paper's code: e-SNLI/ANLI train on `valid` and test on `test` (their
train splits are not shipped); CQA/SVAMP hold out 10% of train (seed 0) as `valid`.
`train_fraction` then subsamples the training split with a seed (data-efficiency runs).
Every problem in a file raises `DataError` naming the file, line and field.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from lmdistill.config import data_dir, expand_path
from lmdistill.data import DataError
from lmdistill.instruct.data import ALPACA_NO_INPUT, InstructionExample, prompt_ids

DATASETS = ("esnli", "anli1", "cqa", "svamp")
NLI_LABELS = ("entailment", "neutral", "contradiction")  # gold label ids 0, 1, 2
# The paper's code joins premise and hypothesis with the tokenizer's EOS; for its T5
# students that is "</s>" (a causal student just reads it as a separator).
NLI_SEPARATOR = "</s>"
HOLDOUT_FRACTION = 0.1
HOLDOUT_SEED = 0
_CHOICE_MARK = re.compile(r"\([a-zA-Z]\)")


@dataclass
class ReasoningRecord:
    """One example: the model input, the gold label, and the teacher's parsed output."""

    id: str
    input: str
    label: str                          # gold label text (SVAMP: an equation)
    rationale: Optional[str] = None     # teacher's rationale; None when not parsed / absent
    teacher_label: Optional[str] = None  # teacher's label; None when not parsed / absent
    has_teacher_output: bool = False    # a continuation (or JSONL rationale) came with this row


@dataclass
class ReasoningDataset:
    name: str                 # esnli | anli1 | cqa | svamp | jsonl
    split: str                # train | valid | test
    records: list[ReasoningRecord]
    teacher_outputs: int = 0  # rows that came with a teacher continuation / rationale
    unparsed: int = 0         # of those, how many did not parse

    @property
    def parsed(self) -> int:
        return self.teacher_outputs - self.unparsed

    def describe(self) -> str:
        return (f"{self.name}/{self.split}: {len(self.records)} records, teacher outputs "
                f"{self.parsed} parsed, {self.unparsed} not parsed")


# ----- parsing the teacher's continuations -----

def _cut(text: str, marker: str) -> str:
    return text.split(marker, 1)[0]


def _parse_cqa(text: str):
    body = _cut(text, "\n\nQ:").rstrip()
    rationale, found, after = body.partition("So the answer is")
    if not found:
        return None
    pieces = _CHOICE_MARK.split(after, maxsplit=1)
    if len(pieces) < 2:
        return None
    label = pieces[1].strip()
    label = label[:-1].rstrip() if label.endswith(".") else label
    return rationale.rstrip(), label


# PaLM always writes "The answer is (...)" (the paper's code splits on it). Smaller teachers
# also write "So the answer is" / ", so the answer is": accepted too, and the "so" is not
# left at the end of the rationale. No PaLM SVAMP output holds those variants, so PaLM's
# data parses exactly as before.
_SVAMP_ANSWER = re.compile(r"(?:,? ?\b[Ss]o )?[Tt]he answer is")


def _parse_svamp(text: str):
    body = _cut(text, "\n\nQ:").rstrip()
    found = _SVAMP_ANSWER.search(body)
    if not found:
        return None
    equation = re.search(r"\(.*\)", body[found.end():])  # greedy, as the paper's code: the outermost parentheses
    if equation is None:
        return None
    return body[:found.start()].rstrip(), equation.group(0)


def _parse_esnli(text: str):
    rationale, found, after = text.partition("Answer:")
    if not found:
        return None
    label = _cut(_cut(after, "\n"), "Premise").strip()
    return rationale.rstrip(), label


def _parse_anli(text: str):
    body = _cut(text, "\n\nPremise:")
    rationale, found, after = body.partition("So the answer is")
    if not found:
        return None
    label = after.strip()
    label = label[:-1].rstrip() if label.endswith(".") else label
    return rationale.rstrip(), label


_PARSERS = {"cqa": _parse_cqa, "svamp": _parse_svamp, "esnli": _parse_esnli, "anli1": _parse_anli}


def parse_continuation(dataset: str, text: str) -> tuple[str, str] | None:
    """(rationale, label) from one raw teacher continuation by the dataset's rule, or None.

    None when the markers are missing, the rationale or label is empty, or (e-SNLI, ANLI)
    the label is not one of entailment / neutral / contradiction.
    """
    if dataset not in _PARSERS:
        raise DataError(f"parse_continuation: unknown dataset {dataset!r}; expected one of {list(_PARSERS)}")
    if not isinstance(text, str):
        return None
    out = _PARSERS[dataset](text)
    if out is None:
        return None
    rationale, label = out[0].strip(), out[1].strip()
    if not rationale or not label:
        return None
    if dataset in ("esnli", "anli1"):
        label = normalize_label(label)
        if label not in NLI_LABELS:
            return None
    return rationale, label


def normalize_label(text: str) -> str:
    """Compare labels as lower-case text with single spaces and no trailing period."""
    text = " ".join(text.lower().split())
    return text.rstrip(".").rstrip()


# ----- inputs as the paper's code builds them -----

def _string(record: dict, name: str, where: str) -> str:
    value = record.get(name)
    if value is None:
        raise DataError(f"{where}: missing field '{name}'")
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}': expected a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field '{name}': empty string")
    return value


def format_input(dataset: str, record: dict, where: str = "record", nli_separator: str = NLI_SEPARATOR) -> str:
    """The model input for a gold record.

    CQA: question + "\\nAnswer Choices:\\n(a) ...\\n(e) ..."; SVAMP and JSONL: `input`
    (SVAMP's is body + newline + question); e-SNLI/ANLI: premise + separator + hypothesis.
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if dataset == "cqa":
        question = _string(record, "question", where)
        choices = record.get("choices")
        if not isinstance(choices, list) or len(choices) != 5 or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{where}: field 'choices': expected a list of 5 strings, got {choices!r:.80}")
        lines = [f"({letter}) {choice}" for letter, choice in zip("abcde", choices)]
        return question + "\nAnswer Choices:\n" + "\n".join(lines)
    if dataset in ("svamp", "jsonl"):
        return _string(record, "input", where)
    if dataset in ("esnli", "anli1"):
        return _string(record, "premise", where) + nli_separator + _string(record, "hypothesis", where)
    raise DataError(f"{where}: unknown dataset {dataset!r}; expected one of {list(DATASETS) + ['jsonl']}")


def gold_label(dataset: str, record: dict, where: str) -> str:
    if dataset == "cqa":
        return _string(record, "answer", where)
    if dataset == "jsonl" and record.get("gold_label") is not None:  # `lmdistill generate` output
        return _string(record, "gold_label", where)
    if dataset in ("svamp", "jsonl"):
        return _string(record, "label", where)
    value = record.get("label")  # e-SNLI / ANLI: 0 entailment, 1 neutral, 2 contradiction
    if type(value) is not int or not 0 <= value < len(NLI_LABELS):
        raise DataError(f"{where}: field 'label': expected 0, 1 or 2, got {value!r:.40}")
    return NLI_LABELS[value]


# ----- files -----

def _json(text: str, where: str):
    try:
        return json.loads(text)
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, and over-long integer literals
        raise DataError(f"{where}: malformed JSON ({e})") from None


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read data file: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 text") from None


def read_records(path: Path) -> list[tuple[str, object]]:
    """('file:line', value) for each record: JSON lines, or one JSON list (SVAMP.json's layout)."""
    text = _read_text(path)
    if text.lstrip().startswith("["):
        values = _json(text, f"{path}:1")
        if not isinstance(values, list):
            raise DataError(f"{path}:1: expected a JSON list of records")
        return [(f"{path}:[{i}]", v) for i, v in enumerate(values)]
    return [(f"{path}:{n}", _json(line, f"{path}:{n}"))
            for n, line in enumerate(text.split("\n"), start=1) if line.strip()]


def read_teacher_outputs(folder: Path, split: str) -> tuple[list[str], list[str]]:
    """Concatenated `llm/{split}_CoT_{0,1,...}.json` lists, and the files read."""
    outputs: list[str] = []
    files: list[str] = []
    i = 0
    while (path := folder / "llm" / f"{split}_CoT_{i}.json").exists():
        values = _json(_read_text(path), f"{path}:1")
        if not isinstance(values, list):
            raise DataError(f"{path}:1: expected a JSON list of strings (one continuation per gold row)")
        for k, value in enumerate(values):
            if not isinstance(value, str):
                raise DataError(f"{path}: item {k}: expected a string continuation, got {type(value).__name__}")
        outputs.extend(values)
        files.append(str(path))
        i += 1
    return outputs, files


_FILES = {  # split -> (gold file stem, teacher split)
    "cqa": {"train": ("train", "train"), "valid": ("train", "train"), "test": ("test", "test")},
    "svamp": {"train": ("train", "train"), "valid": ("train", "train"), "test": ("test", "test")},
    "esnli": {"train": ("valid", "valid"), "test": ("test", "test")},
    "anli1": {"train": ("valid", "valid"), "test": ("test", "test")},
}


def _teacher_fields(dataset: str, where: str, record: dict, continuation: Optional[str]):
    """(rationale, teacher label, had a teacher output) for one row."""
    if dataset == "jsonl":
        for name in ("rationale", "teacher_label"):
            value = record.get(name)
            if value is not None and not isinstance(value, str):
                raise DataError(f"{where}: field '{name}': expected a string, got {type(value).__name__}")
        teacher = (record.get("teacher_label") or "").strip() or _string(record, "label", where).strip()
        rationale = record.get("rationale")
        if rationale is None:
            return None, teacher, False
        return (rationale.strip(), teacher, True) if rationale.strip() else (None, teacher, True)
    if continuation is None:
        return None, None, False
    parsed = parse_continuation(dataset, continuation)
    return (parsed[0], parsed[1], True) if parsed else (None, None, True)


def holdout_indices(n: int, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(kept, held out) as Hugging Face `train_test_split(test_size=f, seed=s)`: a numpy
    default_rng(seed) permutation, the first ceil(f * n) indices held out."""
    permutation = np.random.default_rng(seed).permutation(n).tolist()
    n_test = math.ceil(test_fraction * n)
    return permutation[n_test:], permutation[:n_test]


def load_reasoning_dataset(name: str, split: str = "train", source: Optional[str] = None,
                           train_fraction: float = 1.0, seed: int = 0,
                           subsample_first: bool = True) -> ReasoningDataset:
    """Load gold rows and aligned, parsed teacher outputs.

    `name`: esnli | anli1 | cqa | svamp | jsonl. `source`: the dataset folder (default
    `$LMDISTILL_DATA_DIR/step_by_step/<name>`), or for `jsonl` the file. `split`: train |
    valid (CQA/SVAMP only: the 10% held out of train, seed 0) | test. `train_fraction`
    keeps that fraction of the `train` split, chosen with `seed`: drawn before the CQA/SVAMP
    hold-out as the released code does (`run.py`: subsample, then the 10% split), or after it
    with `subsample_first=False`.
    """
    if not 0.0 < train_fraction <= 1.0:
        raise DataError(f"train_fraction: expected a value in (0, 1], got {train_fraction!r}")
    if name == "jsonl":
        if source is None:
            raise DataError("dataset 'jsonl': give the file (config key 'train_data' or --data)")
        origin = Path(expand_path(str(source)))
        rows = read_records(origin)
        continuations: list[Optional[str]] = [None] * len(rows)
    elif name in _FILES:
        if split not in _FILES[name]:
            raise DataError(f"dataset '{name}': no split {split!r}; expected one of {list(_FILES[name])}")
        folder = Path(expand_path(str(source))) if source else data_dir() / "step_by_step" / name
        stem, teacher_split = _FILES[name][split]
        gold_path = folder / f"{name}_{stem}.json"
        rows = read_records(gold_path)
        origin = gold_path
        outputs, files = read_teacher_outputs(folder, teacher_split)
        if files and len(outputs) != len(rows):
            raise DataError(
                f"{gold_path}: {len(rows)} gold rows but {len(outputs)} teacher continuations in "
                f"{', '.join(files)}; they must align one to one"
            )
        continuations = list(outputs) if files else [None] * len(rows)
    else:
        raise DataError(f"unknown reasoning dataset {name!r}; expected one of {list(DATASETS) + ['jsonl']}")

    records = []
    for i, ((where, row), continuation) in enumerate(zip(rows, continuations)):
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        rationale, teacher_label, had = _teacher_fields(name, where, row, continuation)
        rid = row.get("id", row.get("uid", i))
        records.append(
            ReasoningRecord(
                str(rid), format_input(name, row, where), gold_label(name, row, where), rationale, teacher_label, had
            )
        )
    if not records:
        raise DataError(f"{origin}: no records")

    def subsample(records: list) -> list:
        kept, _ = holdout_indices(len(records), 1.0 - train_fraction, seed)
        if not kept:
            raise DataError(f"train_fraction {train_fraction}: keeps none of {len(records)} training examples")
        return [records[i] for i in sorted(kept)]

    subsampled = split in ("train", "valid") and train_fraction < 1.0
    if subsampled and subsample_first:
        records = subsample(records)
    if name in ("cqa", "svamp") and split in ("train", "valid"):
        kept, held_out = holdout_indices(len(records), HOLDOUT_FRACTION, HOLDOUT_SEED)
        records = [records[i] for i in sorted(kept if split == "train" else held_out)]
    if subsampled and not subsample_first and split == "train":
        records = subsample(records)
    teacher_outputs = sum(r.has_teacher_output for r in records)
    unparsed = sum(r.has_teacher_output and r.rationale is None for r in records)
    return ReasoningDataset(name, split, records, teacher_outputs, unparsed)


def reasoning_input_ids(text: str, tokenizer, prompt_format: str, seq2seq: bool) -> list[int]:
    """The token ids a student reads for a (task-prefixed) input, in training and at evaluation alike:
    an encoder-decoder reads the text itself (the paper's T5 inputs: text + </s>); a causal student
    reads it as an instruction in `prompt_format` (chat template or Alpaca)."""
    if seq2seq:
        return tokenizer(text)["input_ids"]
    return prompt_ids(InstructionExample(text, ALPACA_NO_INPUT.format(instruction=text), []), tokenizer, prompt_format)
