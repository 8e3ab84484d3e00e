"""Instruction data (MiniLLM's JSONL layout, chat conversations, or a Hub dataset), prompt
formatting and tokenisation.

A record has either `prompt` + `output`, or `instruction` (+ optional `input`) + `output`
(`output` a string or a list of reference strings), or `messages`: a conversation in the
OpenAI / Hugging Face chat format ([{"role": "system" | "user" | "assistant", "content": str},
...], multi-turn), rendered with the tokenizer's chat template. Only assistant tokens are
trained on: every assistant turn for off-policy methods (`turns="all"`: the response block
runs from the first assistant turn to the last, user turns inside it masked out), the last
one for methods that sample (`turns="last"`: earlier turns are the prompt; the student samples
the last turn). Records are read strictly: a bad line raises `DataError` naming the file,
line and field (for conversations: the message index) before any training starts.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from lmdistill.data import DataError, TokenizedExample, normalise_whitespace, read_jsonl

log = logging.getLogger("lmdistill")

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
    messages: Optional[list[dict]] = None  # a chat conversation (then the fields above describe its last turn)
    where: str = ""           # 'file:line' (or 'dataset[split]:row i') it was read from, for messages

    def prompt_keys(self) -> set[str]:
        """The prompt as the contamination guard compares it: the user request and the Alpaca prompt,
        whitespace-normalised (a test file may hold either form of the same request)."""
        return {normalise_whitespace(self.instruction), normalise_whitespace(self.alpaca_prompt)}


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


ROLES = ("system", "user", "assistant")


def parse_conversation(messages: object, where: str) -> InstructionExample:
    """A `messages` record: roles, string contents and at least one assistant turn checked; the
    conversation is cut after its last assistant turn (later messages have nothing to learn)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages': expected a non-empty list of {{role, content}} objects")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: field 'messages', message {i}: expected an object, got "
                            f"{type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: field 'messages', message {i}: unknown role {role!r} (expected system, user "
                            "or assistant)")
        if not isinstance(content, str):
            raise DataError(f"{where}: field 'messages', message {i}: field 'content': expected a string, got "
                            f"{type(content).__name__}")
        clean.append({"role": role, "content": content})
    last = max((i for i, m in enumerate(clean) if m["role"] == "assistant"), default=None)
    if last is None:
        raise DataError(f"{where}: field 'messages': no assistant turn to train on")
    if not clean[last]["content"].strip():
        raise DataError(f"{where}: field 'messages', message {last}: empty assistant turn")
    user = next((m["content"] for m in reversed(clean[:last]) if m["role"] == "user"), "")
    return InstructionExample(instruction=user, alpaca_prompt=user, references=[clean[last]["content"]],
                              id="", messages=clean[: last + 1])


def parse_instruction_record(record: object, where: str) -> InstructionExample:
    """Validate one JSON record; `where` is 'file:line' for error messages."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        example = parse_conversation(record["messages"], where)
        example.id = str(record.get("id", ""))
        return example
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


@dataclass
class Columns:
    """Which fields of a dataset row hold the prompt, the response, or a whole conversation
    (the recipe's `prompt_field`, `response_field`, `messages_field`); None: the row's own names
    (`prompt`/`instruction`/`input`/`output`/`messages`; Dolly's `context`/`response`)."""

    prompt: Optional[str] = None
    response: Optional[str] = None
    messages: Optional[str] = None

    def apply(self, row: dict, where: str) -> dict:
        """The row renamed to the MiniLLM layout; DataError naming a missing column."""
        for key, name in (("prompt_field", self.prompt), ("response_field", self.response),
                          ("messages_field", self.messages)):
            if name is not None and name not in row:
                raise DataError(f"{where}: no column '{name}' (config key '{key}'; the rows have: "
                                f"{', '.join(sorted(row))})")
        if self.messages is not None:
            return {"messages": row[self.messages], "id": row.get("id", "")}
        if self.prompt is None and self.response is None:
            if "response" in row and "output" not in row:  # databricks-dolly-15k names
                return {"instruction": row["instruction"], "input": row.get("context", ""), "output": row["response"]}
            return row
        out = {k: v for k, v in row.items() if k not in ("prompt", "instruction", "input", "output")}
        out["instruction"] = row[self.prompt] if self.prompt is not None else row.get("instruction", row.get("prompt"))
        out["output"] = row[self.response] if self.response is not None else row.get("output")
        return out


def load_instruction_data(source: str, split: str = "train", limit: Optional[int] = None,
                          columns: Optional[Columns] = None) -> list[InstructionExample]:
    """Read instruction or chat data: a JSONL file (MiniLLM layout), a Parquet file, a folder
    written by `datasets`' `save_to_disk` (or any folder `datasets.load_dataset` reads), or a
    Hub dataset id (e.g. databricks/databricks-dolly-15k); `columns` maps other field names."""
    columns = columns or Columns()
    path = os.path.expanduser(source)
    if os.path.isfile(path) and not path.endswith(".parquet"):
        mapped = columns != Columns()  # JSONL is read as written unless the recipe maps its fields
        rows = ((where, columns.apply(r, where) if mapped and isinstance(r, dict) else r)
                for where, r in read_jsonl(path))
    elif os.path.exists(path):
        rows = _local_dataset_rows(path, split, columns)
    else:
        looks_like_file = source.endswith((".json", ".jsonl", ".parquet")) or source.startswith((".", "/", "~"))
        if looks_like_file or source.count("/") != 1:
            raise DataError(f"{source}: data file not found (and not a Hub dataset id like 'owner/name')")
        rows = _hub_rows(source, split, columns)
    examples = []
    tabular = not os.path.isfile(path) or path.endswith(".parquet")  # a table's rows: their columns can be mapped
    for where, record in rows:
        try:
            examples.append(parse_instruction_record(record, where))
        except DataError as e:
            if not (tabular and isinstance(record, dict) and "missing field" in str(e)):
                raise
            raise DataError(f"{e} (the rows have: {', '.join(sorted(record))}; map them with prompt_field, "
                            "response_field or messages_field)") from None
        examples[-1].where = where
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise DataError(f"{source}: no records")
    return examples


def load_training_data(config, limit: Optional[int] = None) -> list[InstructionExample]:
    """A recipe's `train_data`, with its `split` and column mapping, less the rows whose prompt is an
    evaluation prompt (`drop_evaluation_prompts` with the recipe's `evaluation_files()` and `contamination`)."""
    columns = Columns(config.prompt_field, config.response_field, config.messages_field)
    examples = load_instruction_data(config.train_data_path, config.split, None, columns)
    return drop_evaluation_prompts(examples, config.evaluation_files(), config.contamination)[:limit]


def drop_evaluation_prompts(examples: list[InstructionExample], evaluation_files: Sequence[str],
                            policy: str = "drop") -> list[InstructionExample]:
    """The contamination guard: training examples whose prompt equals (after whitespace
    normalisation) a prompt of one of `evaluation_files` are dropped and counted in the log, or,
    with `policy="error"`, the first one stops the run with a DataError naming both rows."""
    heldout: dict[str, str] = {}  # normalised prompt -> where it was read
    for path in evaluation_files:
        for example in load_instruction_data(path):
            for key in example.prompt_keys():
                heldout.setdefault(key, example.where)
    kept, dropped = [], {}
    for example in examples:
        match = next((heldout[k] for k in example.prompt_keys() if k in heldout), None)
        if match is None:
            kept.append(example)
            continue
        if policy == "error":
            raise DataError(f"{example.where}: this training prompt is the evaluation prompt at {match} "
                            "(config key 'contamination': error; `drop` leaves such rows out)")
        file = match.rsplit(":", 1)[0]
        dropped[file] = dropped.get(file, 0) + 1
    detail = "; ".join(f"{n} in {f}" for f, n in dropped.items())
    log.info("contamination guard: %d of %d training rows dropped, their prompt is an evaluation prompt%s",
             len(examples) - len(kept), len(examples), f" ({detail})" if detail else "")
    if not kept:
        raise DataError(f"{examples[0].where.rsplit(':', 1)[0]}: every training row is an evaluation prompt")
    return kept


def _local_dataset_rows(path: str, split: str, columns: Columns):
    """(where, row) of a Parquet file (pyarrow), or of a `datasets` folder's split."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise DataError(f"{path}: not a readable Parquet file: {e}") from None
        for i, row in enumerate(table.to_pylist()):
            yield f"{path}:row {i}", columns.apply(row, f"{path}:row {i}")
        return
    saved = any(os.path.exists(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json"))
    if not saved and not any(p.is_file() and p.suffix in DATA_SUFFIXES for p in Path(path).rglob("*")):
        raise DataError(f"{path}: no data files in this folder (expected a `datasets` save_to_disk folder, or "
                        f"{' / '.join(DATA_SUFFIXES)} files)")
    datasets = _datasets()
    try:
        data = datasets.load_from_disk(path) if saved else datasets.load_dataset(path)
    except Exception as e:  # datasets' own errors (unreadable files, mixed formats): one line naming the folder
        raise DataError(f"{path}: cannot read it as a dataset ({_first_line(e)})") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DataError(f"{path}: no split '{split}' (config key 'split'; it has: {', '.join(data)})")
        data = data[split]
    for i, row in enumerate(data):
        yield f"{path}[{split}]:row {i}", columns.apply(dict(row), f"{path}[{split}]:row {i}")


def _hub_rows(name: str, split: str, columns: Columns):
    datasets = _datasets()
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                  for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if not offline:  # `datasets` retries an unreachable Hub for half a minute before it says so
        problem = hub_unreachable()
        if problem:
            raise DataError(f"{name}: no such local file or folder, and the Hugging Face Hub cannot be reached "
                            f"({problem}) to fetch it as a dataset; for a copy in the local cache set "
                            "HF_HUB_OFFLINE=1")
    try:
        data = datasets.load_dataset(name, split=split)
    except Exception as e:  # no such dataset or split, no cached copy offline, ...: one line naming it
        raise DataError(f"{name}[{split}]: cannot load this Hub dataset ({_first_line(e)})"
                        + (" (offline: HF_HUB_OFFLINE is set)" if offline else "")) from None
    for i, row in enumerate(data):
        yield f"{name}[{split}]:row {i}", columns.apply(dict(row), f"{name}[{split}]:row {i}")


DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv", ".txt", ".arrow")


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def hub_unreachable(timeout: float = 3.0) -> Optional[str]:
    """Why the Hub's endpoint ($HF_ENDPOINT) cannot be reached within `timeout` seconds; None when it can."""
    import socket
    import urllib.parse

    url = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError as e:
        return f"{url.hostname}: {e}"
    return None


def _datasets():
    try:
        import datasets  # optional: only Hub datasets and `datasets` folders need it
    except ImportError:
        raise DataError("this data source needs `pip install datasets`") from None
    return datasets


def uses_chat(tokenizer, prompt_format: str) -> bool:
    if prompt_format == "auto":
        return bool(getattr(tokenizer, "chat_template", None))
    if prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DataError("prompt_format 'chat': the tokenizer has no chat template (use 'alpaca')")
    return prompt_format == "chat"


def _chat_ids(tokenizer, messages: list[dict], **options) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, **options)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers>=5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def _needs_chat(example: InstructionExample, tokenizer, prompt_format: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("chat data (`messages`) needs a tokenizer with a chat template; this one has none")
    if prompt_format == "alpaca":
        raise DataError("chat data (`messages`) is rendered with the chat template: set prompt_format to chat or auto")


def prompt_ids(example: InstructionExample, tokenizer, prompt_format: str) -> list[int]:
    """Token ids of the model input for one example (chat template or Alpaca text); for a
    conversation, everything before its last assistant turn, ready for the assistant to answer."""
    if example.messages is not None:
        _needs_chat(example, tokenizer, prompt_format)
        return _chat_ids(tokenizer, example.messages[:-1], add_generation_prompt=True)
    if uses_chat(tokenizer, prompt_format):
        return _chat_ids(tokenizer, [{"role": "user", "content": example.instruction}], add_generation_prompt=True)
    ids = tokenizer(example.alpaca_prompt, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        ids = [tokenizer.bos_token_id] + ids
    return ids


def assistant_token_mask(messages: list[dict], tokenizer) -> tuple[list[int], list[bool]]:
    """(token ids of the rendered conversation, whether each token belongs to an assistant turn).

    A turn's text is what the template adds for it after the generation prompt: render(messages
    up to it, add_generation_prompt) is a prefix of render(messages through it), which is a
    prefix of the whole; the tokens inside that difference are the turn's. Whitespace tokens
    closing a turn (the newline after an end-of-turn token) are left out: the student learns to
    end the turn with the template's end-of-turn token, not what follows it."""
    def render(part, **options):
        return tokenizer.apply_chat_template(part, tokenize=False, **options) if part else ""

    text = render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:i], add_generation_prompt=True), render(messages[: i + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise DataError("the tokenizer's chat template does not render a conversation as the prefixes of its "
                            "turns, so the assistant tokens cannot be found")
        spans.append((len(before), len(through)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
    mask = [False] * len(ids)
    for start, end in spans:
        inside = [t for t, (a, b) in enumerate(offsets) if start <= a and b <= end and b > a]
        while inside and not text[offsets[inside[-1]][0]: offsets[inside[-1]][1]].strip():
            inside.pop()
        for t in inside:
            mask[t] = True
    return ids, mask


def tokenize_conversation(example: InstructionExample, tokenizer, prompt_format: str,
                          turns: str) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, response ids, response loss mask) of a conversation: `turns="all"` trains on
    every assistant turn, `"last"` on the last one (the rest is the prompt)."""
    _needs_chat(example, tokenizer, prompt_format)
    ids, mask = assistant_token_mask(example.messages, tokenizer)
    marked = [t for t, m in enumerate(mask) if m]
    if not marked:
        raise DataError("no assistant tokens found in the rendered conversation")
    if turns == "last":  # the last turn's tokens are the last run of marked ones
        start = marked[-1]
        while start > 0 and mask[start - 1]:
            start -= 1
    else:
        start = marked[0]
    end = marked[-1] + 1
    return ids[:start], ids[start:end], [int(m) for m in mask[start:end]]


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
    turns: str = "all",
) -> tuple[list[TokenizedExample], TokenizeStats]:
    """Tokenise prompts and first references; drop long prompts, truncate long responses.
    Conversations (`messages`): the assistant turns of `turns` (all, or the last) are trained on."""
    if turns not in ("all", "last"):
        raise ValueError(f"turns: expected all or last, got {turns!r}")
    stats = TokenizeStats()
    out = []
    eos = tokenizer.eos_token_id
    for ex in examples:
        mask = None
        if ex.messages is not None:
            p, r, mask = tokenize_conversation(ex, tokenizer, prompt_format, turns)
        else:
            p = prompt_ids(ex, tokenizer, prompt_format)
            r = tokenizer(ex.references[0], add_special_tokens=False)["input_ids"] + [eos]
        if len(p) > max_prompt_length:
            stats.dropped_long_prompt += 1
            continue
        room = max_length - len(p)
        if len(r) > room:
            r, mask = r[:room], None if mask is None else mask[:room]
            stats.truncated_response += 1
        out.append(TokenizedExample(p, r, ex.references, ex.id, mask))
    stats.kept = len(out)
    return out, stats
