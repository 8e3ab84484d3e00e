"""Instruction data (MiniLLM's JSONL layout or a Hub dataset), prompt formatting and tokenisation.

A record has either `prompt` + `output`, or `instruction` (+ optional `input`) + `output`;
`output` is a string or a list of reference strings. Records are read strictly: a bad
line raises `DataError` naming the file, line and field before any training starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

from lmdistill.data import DataError, TokenizedExample, read_jsonl


ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass
class InstructionExample:
    """One instruction-following record."""

    instruction: str          # the user's request (for chat formatting)
    alpaca_prompt: str        # the full Alpaca-template prompt (for `alpaca` formatting)
    references: list[str]     # reference responses (first one is trained on)
    id: str = ""


def _field(record: dict, name: str, where: str, required: bool = True, allow_list: bool = False):
    value = record.get(name)
    if value is None:
        if required:
            raise DataError(f"{where}: missing field '{name}'")
        return None
    if allow_list and isinstance(value, list):
        if not value or not all(isinstance(v, str) for v in value):
            raise DataError(f"{where}: field '{name}': expected a string or a non-empty list of strings")
        return value
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}': expected a string, got {type(value).__name__}")
    return value


def parse_instruction_record(record: object, where: str) -> InstructionExample:
    """Validate one JSON record; `where` is 'file:line' for error messages."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    output = _field(record, "output", where, allow_list=True)
    references = output if isinstance(output, list) else [output]
    if not any(r.strip() for r in references):
        raise DataError(f"{where}: field 'output': empty response")
    instruction = _field(record, "instruction", where, required=False)
    prompt = _field(record, "prompt", where, required=False)
    if instruction is None and prompt is None:
        raise DataError(f"{where}: missing field 'prompt' (or 'instruction')")
    extra = _field(record, "input", where, required=False) or ""
    if instruction is not None:
        if not instruction.strip():
            raise DataError(f"{where}: field 'instruction': empty prompt")
        template = ALPACA_WITH_INPUT if extra.strip() else ALPACA_NO_INPUT
        alpaca = prompt if prompt is not None else template.format(instruction=instruction, input=extra)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    else:
        if not prompt.strip():
            raise DataError(f"{where}: field 'prompt': empty prompt")
        alpaca, user = prompt, prompt
    return InstructionExample(
        instruction=user, alpaca_prompt=alpaca, references=references, id=str(record.get("id", ""))
    )


def load_instruction_data(source: str, split: str = "train", limit: Optional[int] = None) -> list[InstructionExample]:
    """Read a MiniLLM-layout JSONL file, or a Hub dataset id (e.g. databricks/databricks-dolly-15k)."""
    if os.path.exists(source):
        examples = []
        for where, record in read_jsonl(source):
            examples.append(parse_instruction_record(record, where))
            if limit is not None and len(examples) >= limit:
                break
        if not examples:
            raise DataError(f"{source}: no records")
        return examples
    looks_like_file = source.endswith((".json", ".jsonl")) or source.startswith((".", "/", "~"))
    if looks_like_file or source.count("/") != 1:
        raise DataError(f"{source}: data file not found (and not a Hub dataset id like 'owner/name')")
    return _load_hub_dataset(source, split, limit)


def _load_hub_dataset(name: str, split: str, limit: Optional[int]) -> list[InstructionExample]:
    try:
        import datasets  # optional: only Hub datasets need it
    except ImportError:
        raise DataError(f"'{name}' is not a local file; loading Hub datasets needs `pip install datasets`") from None
    rows = datasets.load_dataset(name, split=split)
    examples = []
    for i, row in enumerate(rows):
        row = dict(row)
        if "response" in row and "output" not in row:  # databricks-dolly-15k names
            row = {"instruction": row["instruction"], "input": row.get("context", ""), "output": row["response"]}
        examples.append(parse_instruction_record(row, f"{name}[{split}]:{i}"))
        if limit is not None and len(examples) >= limit:
            break
    return examples


def uses_chat(tokenizer, prompt_format: str) -> bool:
    if prompt_format == "auto":
        return bool(getattr(tokenizer, "chat_template", None))
    if prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DataError("prompt_format 'chat': the tokenizer has no chat template (use 'alpaca')")
    return prompt_format == "chat"


def prompt_ids(example: InstructionExample, tokenizer, prompt_format: str) -> list[int]:
    """Token ids of the model input for one example (chat template or Alpaca text)."""
    if uses_chat(tokenizer, prompt_format):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": example.instruction}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers>=5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    ids = tokenizer(example.alpaca_prompt, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        ids = [tokenizer.bos_token_id] + ids
    return ids


@dataclass
class TokenizeStats:
    kept: int = 0
    dropped_long_prompt: int = 0
    truncated_response: int = 0

    def describe(self) -> str:
        return (
            f"{self.kept} examples kept, {self.dropped_long_prompt} dropped (prompt too long), "
            f"{self.truncated_response} responses truncated"
        )


def tokenize_examples(
    examples: Sequence[InstructionExample],
    tokenizer,
    prompt_format: str = "auto",
    max_prompt_length: int = 256,
    max_length: int = 512,
) -> tuple[list[TokenizedExample], TokenizeStats]:
    """Tokenise prompts and first references; drop long prompts, truncate long responses."""
    stats = TokenizeStats()
    out = []
    eos = tokenizer.eos_token_id
    for ex in examples:
        p = prompt_ids(ex, tokenizer, prompt_format)
        if len(p) > max_prompt_length:
            stats.dropped_long_prompt += 1
            continue
        r = tokenizer(ex.references[0], add_special_tokens=False)["input_ids"] + [eos]
        room = max_length - len(p)
        if len(r) > room:
            r = r[:room]
            stats.truncated_response += 1
        out.append(TokenizedExample(p, r, ex.references, ex.id))
    stats.kept = len(out)
    return out, stats
