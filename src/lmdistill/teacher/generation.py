"""A teacher's answers to a list of prompts, written resumably as JSONL: what `lmdistill
generate` (`lmdistill/generate.py`) runs for both its tasks, and SeqKD's responses from a
served teacher (`generate_responses`: the `responses` task, MiniLLM layout).

Teachers: a model id / folder / alias runs locally (batched, left-padded, KV cache,
batches sorted by prompt length, the few-shot prefix all prompts share prefilled once);
`openai:URL#MODEL` goes to a server with K requests in flight, timeouts and retries
(`openai_client`).

Resumable: every finished record is appended and flushed as soon as it completes,
keyed by (id, sample). A rerun skips keys already in the file, so an interrupted run
loses at most the requests in flight; a half-written last line is cut off. Teacher
outputs that cannot be used (unparsed rationales, empty responses) go to
`FILE.rejected.jsonl` with the raw text, so they are counted, kept out of training,
and not asked for again.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch

from lmdistill.config import ConfigError, check, doc, parse_server_spec
from lmdistill.data import DataError, TokenizedExample, collate
from lmdistill.forward import cache_keyword
from lmdistill.instruct.data import parse_instruction_record
from lmdistill.reasoning.data import DATASETS, read_records
from lmdistill.sampling import eos_token_ids
from lmdistill.teacher.openai_client import API_KEY_VARIABLES, Completion, OpenAIClient, complete_all

log = logging.getLogger("lmdistill")

MIN_SHARED_PREFIX = 16  # tokens; below this a shared KV cache saves less than copying it costs


@dataclass
class GenerateConfig:
    """Settings of one `lmdistill generate` run (each is also a command-line flag)."""

    task: str = doc("`rationales` (few-shot CoT rationale + label, for step-by-step) or `responses` "
                    "(teacher answers in the MiniLLM layout, for SeqKD).", default="rationales")
    teacher: str = doc("Local model id/folder/alias, or `openai:URL#MODEL` for an OpenAI-compatible server "
                       "(URL is the API base, e.g. http://127.0.0.1:8080/v1).", default="")
    data: str = doc("Input JSONL: a step-by-step gold file (e.g. svamp_test.json), `id`/`input` records, or "
                    "MiniLLM-layout instructions for `responses`.", default="")
    out: str = doc("Output JSONL; appended to, so a rerun resumes.", default="")
    dataset: str = doc("Rationales: esnli, anli1, cqa, svamp, or jsonl (`id`/`input` records); `auto` infers a "
                       "built-in name from the data file's name, else jsonl.", default="auto")
    prompt_template: Optional[str] = doc("Few-shot prompt file with `{input}` (or `{field}`) placeholders; default: "
                                         "the built-in prompt of the dataset.", default=None)
    parse_as: Optional[str] = doc("Parser for rationales of jsonl data: a built-in dataset's rule, or `generic` "
                                  "(text before 'So the answer is'/'The answer is'/'Answer:', label after).",
                                  default=None)
    stop: list = doc("Stop strings (repeatable); default: a blank line followed by the template's query marker, "
                     "e.g. '\\n\\nQ:'.", default_factory=list)
    prompt_format: str = doc("`chat` (chat template / chat completions), `alpaca` (plain text / completions) or "
                             "`auto` (rationales: plain text; responses: chat when the teacher has a template).",
                             default="auto")
    num_samples: int = doc("Teacher outputs per input (needs temperature > 0 when above 1).", default=1)
    max_new_tokens: int = doc("Longest teacher output, in tokens.", default=128)
    temperature: float = doc("Sampling temperature; 0 = greedy.", default=0.0)
    top_p: float = doc("Nucleus sampling threshold.", default=1.0)
    seed: int = doc("Sampling seed (local backend; sent to servers that accept one).", default=0)
    limit: Optional[int] = doc("Use only the first N input records.", default=None)
    batch_size: int = doc("Local backend: prompts per generation batch.", default=8)
    share_prefix: bool = doc("Local backend: run the token prefix every prompt shares (the few-shot exemplars) "
                             "once and start each batch from a copy of its KV cache.", default=True)
    concurrency: int = doc("Server backend: requests in flight.", default=4)
    timeout: float = doc("Server backend: seconds to wait for one response.", default=120.0)
    max_retries: int = doc("Server backend: retries of a request after 429, 5xx or a connection error.", default=5)
    backoff: float = doc("Server backend: first retry delay in seconds; doubles on each retry (with jitter).",
                         default=1.0)
    api_key_env: Optional[str] = doc("Environment variable holding the API key (default: LMDISTILL_API_KEY, then "
                                     "OPENAI_API_KEY). The key is never logged or written.", default=None)
    trust_remote_code: bool = doc("Local backend: allow model repositories to run their own code.", default=False)
    progress: bool = doc("Show a progress bar with records/s and tokens/s.", default=True)

    def validate(self) -> None:
        check(self.task in ("rationales", "responses"), "task", "rationales or responses", self.task)
        check(bool(self.teacher), "teacher", "a model id/folder/alias or openai:URL#MODEL", self.teacher)
        check(bool(self.data), "data", "an input JSONL file", self.data)
        check(bool(self.out), "out", "an output JSONL file", self.out)
        check(self.dataset in ("auto", "jsonl", *DATASETS), "dataset", f"auto, jsonl or one of {list(DATASETS)}",
              self.dataset)
        check(self.parse_as in (None, "generic", *DATASETS), "parse_as", f"generic or one of {list(DATASETS)}",
              self.parse_as)
        check(self.prompt_format in ("auto", "chat", "alpaca"), "prompt_format", "auto, chat or alpaca",
              self.prompt_format)
        check(all(isinstance(s, str) and s for s in self.stop), "stop", "non-empty strings", self.stop)
        check(self.num_samples >= 1, "num_samples", ">= 1", self.num_samples)
        check(self.num_samples == 1 or self.temperature > 0, "num_samples",
              "1 when temperature is 0 (greedy decoding repeats itself)", self.num_samples)
        check(self.max_new_tokens > 0, "max_new_tokens", "> 0", self.max_new_tokens)
        check(self.temperature >= 0, "temperature", ">= 0", self.temperature)
        check(0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)
        check(self.limit is None or self.limit > 0, "limit", "> 0", self.limit)
        check(self.batch_size > 0, "batch_size", "> 0", self.batch_size)
        check(self.concurrency > 0, "concurrency", "> 0", self.concurrency)
        check(self.timeout > 0, "timeout", "> 0 seconds", self.timeout)
        check(self.max_retries >= 0, "max_retries", ">= 0", self.max_retries)
        check(self.backoff >= 0, "backoff", ">= 0 seconds", self.backoff)


# ----- jobs: one teacher request each -----

@dataclass
class Job:
    id: str
    sample: int
    prompt: str                          # plain-text prompt (completions / no chat template)
    user_message: str                    # what a chat teacher is asked
    record: dict                         # the output record, minus the teacher's fields
    where: str                           # file:line of the input, for messages

    @property
    def key(self) -> tuple[str, int]:
        return self.id, self.sample


def response_jobs(config: GenerateConfig) -> list[Job]:
    jobs = []
    for index, (where, row) in enumerate(input_records(config)):
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        # The teacher writes `output`; the dataset's own (if any) is not needed to ask.
        example = parse_instruction_record({**row, "output": "(teacher)"}, where)
        rid = str(row.get("id", index))
        # The input's own fields, unchanged, so the file reloads to the same prompts.
        record = {**{k: v for k, v in row.items() if k != "output"}, "id": rid}
        jobs.extend(Job(rid, k, example.alpaca_prompt, example.instruction, dict(record), where)
                    for k in range(config.num_samples))
    return jobs


def input_records(config: GenerateConfig) -> list[tuple[str, object]]:
    """The input file's (file:line, record) pairs, the first `limit` of them."""
    rows = read_records(Path(os.path.expanduser(config.data)))
    if not rows:
        raise DataError(f"{config.data}: no records")
    return rows[:config.limit] if config.limit else rows


# ----- the resumable output -----

class ResumableJsonl:
    """An append-only JSONL file keyed by (id, sample); reopening it resumes.

    A line is written with its newline in one call and flushed, so a crash can leave at
    most one partial line, at the end: it is cut off (the record is generated again).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.keys: set[tuple[str, int]] = set()
        self.repaired = False
        if self.path.exists():
            self._repair_and_read()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = self.path.open("a", encoding="utf-8")

    def _repair_and_read(self) -> None:
        data = self.path.read_bytes()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            log.warning("%s: cutting off a half-written last line (%d bytes); it will be generated again",
                        self.path, len(data) - complete)
            with self.path.open("r+b") as f:
                f.truncate(complete)
            self.repaired = True
        for number, line in enumerate(data[:complete].decode("utf-8").split("\n"), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                self.keys.add((str(record["id"]), int(record.get("sample", 0))))
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{self.path}:{number}: not a record of a previous run "
                                f"({type(e).__name__}: {e}); use a new --out file") from None

    def append(self, record: dict) -> None:
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()
        self.keys.add((str(record["id"]), int(record.get("sample", 0))))

    def close(self) -> None:
        self._handle.close()


# ----- teachers -----

class LocalGenerator:
    """A local HF model: left-padded batches of similar length, KV-cache generation."""

    def __init__(self, spec: str, config: GenerateConfig):
        from lmdistill.models import load_model, load_tokenizer

        self.config = config
        self.tokenizer = load_tokenizer(spec, config.trust_remote_code)
        self.model = load_model(spec, trust_remote_code=config.trust_remote_code).eval()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(self.device)

    def encode(self, job: Job, chat: bool) -> list[int]:
        tok = self.tokenizer
        if chat:
            ids = tok.apply_chat_template([{"role": "user", "content": job.user_message}],
                                          add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        ids = tok(job.prompt, add_special_tokens=False)["input_ids"]
        if tok.bos_token_id is not None and getattr(tok, "add_bos_token", False):
            ids = [tok.bos_token_id] + ids
        return ids

    def shared_prefix(self, encoded: list[list[int]]) -> list[int]:
        """The token prefix all prompts share (at least one token of each left to prefill), or []."""
        # Models with a cache of their own (RWKV, xLSTM, ...) cannot start from a copied DynamicCache.
        dynamic_cache = getattr(type(self.model), "_supports_default_dynamic_cache", lambda: False)()
        shareable = self.config.share_prefix and dynamic_cache and not self.model.config.is_encoder_decoder
        if not shareable or len(encoded) < 2:
            return []
        shared = os.path.commonprefix(encoded)[: min(map(len, encoded)) - 1]
        return shared if len(shared) >= MIN_SHARED_PREFIX else []

    @torch.no_grad()
    def complete(self, jobs: list[Job], chat: bool, stop: list[str]) -> Iterator[tuple[Job, Completion]]:
        from transformers import DynamicCache, GenerationConfig

        c, tok = self.config, self.tokenizer
        if chat and not getattr(tok, "chat_template", None):
            raise DataError(f"prompt_format 'chat': teacher '{c.teacher}' has no chat template (use alpaca)")
        encoded = [self.encode(job, chat) for job in jobs]
        # Few-shot prompts repeat the same exemplars (~350 tokens for SVAMP) before a ~50-token
        # question: prefill them once, then each batch prefills only its own tokens. A batch is
        # laid out as [shared prefix][left padding][own tokens]; generate() takes positions from
        # the attention mask, so the padding in the middle shifts nothing.
        shared = self.shared_prefix(encoded)
        if shared:
            prefix_cache = DynamicCache(config=self.model.config)
            self.model(torch.tensor([shared], device=self.device), use_cache=True,
                       **{cache_keyword(self.model): prefix_cache})
            log.info("local teacher: the %d-token prefix shared by all prompts is prefilled once", len(shared))
        # Longest first: similar lengths share a batch (little padding), and memory peaks at once.
        order = sorted(range(len(jobs)), key=lambda i: -len(encoded[i]))
        greedy = c.temperature == 0
        eos_ids = eos_token_ids(self.model, tok)
        settings = GenerationConfig(
            do_sample=not greedy,
            temperature=None if greedy else c.temperature,
            top_p=None if greedy else c.top_p,
            top_k=None if greedy else 0,
            max_new_tokens=c.max_new_tokens,
            eos_token_id=eos_ids,
            pad_token_id=tok.pad_token_id,
            stop_strings=stop or None,
            use_cache=True,
        )
        torch.manual_seed(c.seed)
        for start in range(0, len(order), c.batch_size):
            rows = order[start : start + c.batch_size]
            batch = collate(
                [TokenizedExample(encoded[i][len(shared) :], [], []) for i in rows],
                tok.pad_token_id,
                with_responses=False,
            ).to(self.device)
            input_ids, attention_mask, cache = batch.input_ids, batch.attention_mask, None
            if shared:
                input_ids = torch.cat([input_ids.new_tensor(shared).expand(len(rows), -1), input_ids], dim=1)
                attention_mask = torch.cat([attention_mask.new_ones(len(rows), len(shared)), attention_mask], dim=1)
                cache = copy.deepcopy(prefix_cache)
                cache.batch_repeat_interleave(len(rows))
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=settings,
                tokenizer=tok,
                **{cache_keyword(self.model): cache},  # `generate` warns on the older name where it was renamed
            )
            for row, i in enumerate(rows):
                generated = out[row, input_ids.shape[1] :].tolist()
                ends = [k for k, t in enumerate(generated) if t in eos_ids or t == tok.pad_token_id]
                generated = generated[: ends[0]] if ends else generated
                text = tok.decode(generated, skip_special_tokens=True)
                yield jobs[i], Completion(text=cut_at_stop(text, stop), tokens=len(generated))


class ServerGenerator:
    """An OpenAI-compatible server: K requests in flight, retried by `OpenAIClient`."""

    def __init__(self, url: str, model: str, config: GenerateConfig, chat: bool):
        names = [config.api_key_env] if config.api_key_env else list(API_KEY_VARIABLES)
        api_key = next((os.environ[n] for n in names if os.environ.get(n)), None)
        self.config = config
        self.client = OpenAIClient(
            url,
            model,
            api="chat" if chat else "completions",
            timeout=config.timeout,
            max_retries=config.max_retries,
            backoff=config.backoff,
            api_key=api_key,
        )

    def complete(self, jobs: list[Job], chat: bool, stop: list[str]) -> Iterator[tuple[Job, Completion]]:
        c = self.config

        def ask(job: Job) -> Completion:
            # A distinct seed per sample, so num_samples > 1 gives different outputs.
            seed = None if c.temperature == 0 else c.seed * 1000 + job.sample
            answer = self.client.complete(
                job.user_message if chat else job.prompt, c.max_new_tokens, c.temperature, c.top_p, stop, seed
            )
            return dataclasses.replace(answer, text=cut_at_stop(answer.text, stop))

        try:
            yield from complete_all(ask, jobs, c.concurrency)
        finally:
            self.client.close()  # interrupted or failed: requests still in flight stop retrying


def cut_at_stop(text: str, stop: Iterable[str]) -> str:
    """The text before the first stop string (local generation and some servers keep it)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


# ----- the run -----


@dataclass
class GenerateStats:
    total: int = 0  # jobs asked for (inputs x samples)
    skipped: int = 0  # already finished in an earlier run
    written: int = 0  # usable records written now
    rejected: int = 0  # unparsed rationales / empty responses written to FILE.rejected.jsonl
    tokens: int = 0  # tokens the teacher generated now
    seconds: float = 0.0

    @property
    def records_per_second(self) -> float:
        return (self.written + self.rejected) / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def describe(self) -> str:
        return (
            f"{self.written} records written, {self.rejected} rejected (not parsed / empty), {self.skipped} "
            f"already done; {self.records_per_second:.2f} records/s, {self.tokens_per_second:.1f} tokens/s "
            f"over {self.seconds:.1f}s"
        )


def rejected_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name.removesuffix(".jsonl") + ".rejected.jsonl")


def complete_jobs(config: GenerateConfig, jobs: list[Job], stop: list[str],
                  fill: Callable[[dict, str], bool]) -> GenerateStats:
    """Ask the teacher for every job not yet in `config.out` (or its rejected file); append each
    record as it finishes, completed by `fill(record, text)` (False: rejected, not for training)."""
    seen: set[tuple[str, int]] = set()
    for job in jobs:
        if job.key in seen:
            raise DataError(
                f"{job.where}: field 'id': {job.id!r} is used by more than one record; "
                "ids key the resumable output and must be unique"
            )
        seen.add(job.key)

    out = ResumableJsonl(config.out)
    rejected = ResumableJsonl(rejected_path(config.out))
    stats = GenerateStats(total=len(jobs))
    todo = [j for j in jobs if j.key not in out.keys and j.key not in rejected.keys]
    stats.skipped = len(jobs) - len(todo)
    if stats.skipped:
        log.info("%s: %d of %d records already done; generating %d", config.out, stats.skipped, len(jobs), len(todo))

    try:
        server = parse_server_spec(config.teacher)
    except ValueError as e:
        raise ConfigError(f"config key 'teacher': {e}") from None
    chat = config.prompt_format == "chat" or (config.prompt_format == "auto" and config.task == "responses")
    if server:
        teacher = ServerGenerator(*server, config, chat)
    else:
        teacher = LocalGenerator(config.teacher, config)
        chat = chat and (config.prompt_format == "chat" or bool(getattr(teacher.tokenizer, "chat_template", None)))

    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc=f"generate {config.task}", unit="rec", disable=not config.progress)
    start = time.perf_counter()
    try:
        for job, answer in teacher.complete(todo, chat, stop) if todo else ():
            record = dict(job.record)
            if config.num_samples > 1:
                record["sample"] = job.sample
            usable = fill(record, answer.text)
            (out if usable else rejected).append(record)
            stats.written += usable
            stats.rejected += not usable
            stats.tokens += answer.tokens
            stats.seconds = time.perf_counter() - start
            bar.update(1)
            bar.set_postfix_str(
                f"{stats.records_per_second:.2f} rec/s, {stats.tokens_per_second:.1f} tok/s, "
                f"{stats.rejected} rejected",
                refresh=False,
            )
    finally:
        stats.seconds = time.perf_counter() - start
        bar.close()
        out.close()
        rejected.close()
    log.info("%s: %s", config.out, stats.describe())
    return stats


def fill_response(record: dict, text: str) -> bool:
    """The `responses` task: the teacher's text is the record's `output`; False when empty."""
    record["output"] = text.strip()
    return bool(record["output"])


def generate_responses(config: GenerateConfig) -> GenerateStats:
    """The `responses` task: the teacher's answer to every instruction of `config.data` not yet in
    `config.out`, appended as they finish (the MiniLLM layout, the teacher's text as `output`)."""
    config.validate()
    check(config.task == "responses", "task", "responses", config.task)
    return complete_jobs(config, response_jobs(config), list(config.stop), fill_response)
