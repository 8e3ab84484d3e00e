"""`lmdistill generate`: teacher data for distillation, from a local model or any
OpenAI-compatible server, written resumably as JSONL.

Two tasks:

* `rationales` (Distilling step-by-step, Hsieh et al., ACL Findings 2023,
  arXiv:2305.02301, sec. 3.1): each input x is placed in a few-shot chain-of-thought
  prompt p = E ++ x (E: exemplars (x_i, r_i, y_i)); the teacher continues it, and the
  continuation is split into a rationale r and a label y by the same parser the
  step-by-step loaders apply to PaLM's outputs (`reasoning_data.parse_continuation`).
  Records are written as {"id", "input", "label", "rationale"} (the loaders' `jsonl`
  layout; `label` is the teacher's), so `lmdistill train` reads the file directly.
  The built-in few-shot prompts are in prompts/.
* `responses` (SeqKD, Kim & Rush, EMNLP 2016): the teacher answers each instruction;
  records keep the MiniLLM layout with the teacher's text as `output`.

The teachers (local or served), the resumable output and the `responses` task itself are
`lmdistill.teacher.generation`, which SeqKD also runs during training; this module adds the
rationale prompts and parsers and the command's flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lmdistill.data import DataError
from lmdistill.reasoning.data import DATASETS, format_input, gold_label, parse_continuation
from lmdistill.teacher.generation import (GenerateConfig, GenerateStats, Job, complete_jobs, generate_responses,
                                          input_records)

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"


# ----- prompts -----

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


@dataclass
class PromptTemplate:
    """Few-shot text with `{field}` placeholders filled from each record."""

    text: str
    source: str

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PromptTemplate":
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise DataError(f"{path}: cannot read prompt template: {e.strerror or e}") from None
        if not _PLACEHOLDER.search(text):
            raise DataError(f"{path}: prompt template has no placeholder such as {{input}}")
        # The prompt ends where the teacher's continuation starts ("A:", "Answer:"), with no newline.
        return cls(text.rstrip("\n"), str(path))

    def fill(self, fields: dict[str, str], where: str) -> str:
        def value(match: re.Match) -> str:
            name = match.group(1)
            if name not in fields:
                line = self.text.count("\n", 0, match.start()) + 1
                raise DataError(f"{self.source}:{line}: placeholder {{{name}}} has no field '{name}' in {where} "
                                f"(fields: {', '.join(sorted(fields))})")
            return fields[name]
        return _PLACEHOLDER.sub(value, self.text)

    def default_stop(self) -> list[str]:
        """A blank line then the query block's first marker ('Q:', 'Premise:'): the teacher has
        begun inventing a further exemplar, as PaLM's continuations often do."""
        last_block = self.text.split("\n\n")[-1]
        first_line = last_block.split("\n", 1)[0]
        marker, colon, _ = first_line.partition(":")
        return [f"\n\n{marker}:"] if colon and not _PLACEHOLDER.search(marker) else ["\n\n"]


def parse_generic(text: str) -> Optional[tuple[str, str]]:
    """(rationale, label) from '<rationale> So the answer is <label>.' (or 'The answer is',
    'Answer:'), taking the last such marker; None if there is none or a side is empty."""
    matches = list(re.finditer(r"(So the answer is|The answer is|Answer:)", text))
    if not matches:
        return None
    m = matches[-1]
    rationale = text[:m.start()].strip()
    label = text[m.end():].strip().split("\n", 1)[0].strip().rstrip(".").strip()
    return (rationale, label) if rationale and label else None


# ----- the rationales task -----

def resolve_dataset(config: GenerateConfig) -> str:
    if config.dataset != "auto":
        return config.dataset
    stem = Path(config.data).name.lower()
    return next((name for name in DATASETS if stem.startswith(name + "_") or stem == name + ".json"), "jsonl")


def rationale_jobs(config: GenerateConfig, dataset: str) -> tuple[list[Job], PromptTemplate]:
    if config.prompt_template:
        template = PromptTemplate.load(config.prompt_template)
    elif dataset in DATASETS:
        template = PromptTemplate.load(PROMPTS_DIR / f"{dataset}.txt")
    else:
        raise DataError(f"{config.data}: not a built-in dataset file ({', '.join(DATASETS)}); give a few-shot "
                        f"--prompt-template with an {{input}} placeholder (or --dataset NAME)")
    jobs = []
    for index, (where, row) in enumerate(input_records(config)):
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        rid = str(row.get("id", row.get("uid", index)))  # as the step-by-step loader numbers rows
        model_input = format_input(dataset, row, where)
        fields = {k: v for k, v in row.items() if isinstance(v, str)}
        # NLI inputs join premise and hypothesis with a separator; prompts use the fields themselves.
        fields["input"] = model_input if dataset not in ("esnli", "anli1") else fields.get("input", model_input)
        record = {"id": rid, "input": model_input}
        if dataset in DATASETS or row.get("label") is not None:
            record["gold_label"] = gold_label(dataset, row, where)
        prompt = template.fill(fields, where)
        jobs.extend(Job(rid, k, prompt, prompt, dict(record), where) for k in range(config.num_samples))
    return jobs, template


def generate(config: GenerateConfig) -> GenerateStats:
    """Ask the teacher for every (input, sample) not yet in `config.out`; append as they finish."""
    if config.task == "responses":
        return generate_responses(config)
    config.validate()
    dataset = resolve_dataset(config)
    jobs, template = rationale_jobs(config, dataset)
    parser = config.parse_as or (dataset if dataset in DATASETS else "generic")
    return complete_jobs(config, jobs, list(config.stop) or template.default_stop(),
                         functools.partial(fill_rationale, parser=parser))


def fill_rationale(record: dict, text: str, parser: str) -> bool:
    """The `rationales` task: the teacher's continuation parsed into `rationale` and `label`;
    False (the raw text kept as `raw`) when it does not parse."""
    parsed = parse_generic(text) if parser == "generic" else parse_continuation(parser, text)
    if parsed is None:
        record["raw"] = text
        return False
    record["rationale"], record["label"] = parsed
    return True


# ----- the command line -----

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per `GenerateConfig` field (`max_new_tokens` -> `--max-new-tokens`), with the field's help."""
    types = {"int": int, "float": float, "Optional[int]": int, "Optional[float]": float}
    for f in dataclasses.fields(GenerateConfig):
        flag, help_text = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        elif f.name == "stop":
            parser.add_argument(flag, action="append", default=[], help=help_text)
        elif f.name in ("task", "teacher", "data", "out"):
            choices = ["rationales", "responses"] if f.name == "task" else None
            parser.add_argument(flag, required=True, choices=choices, help=help_text)
        else:
            parser.add_argument(flag, type=types.get(f.type, str), default=f.default, help=help_text)


def config_from_args(args) -> GenerateConfig:
    return GenerateConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(GenerateConfig)})
