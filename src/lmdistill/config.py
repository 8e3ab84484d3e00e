"""Typed recipes: dataclasses with documented, validated fields, read from YAML.

Every method has one config dataclass that extends `TrainConfig` with its own fields
(TRL's pattern). A field is documented by `metadata["help"]`; `validate()` checks
ranges. `load_config("configs/x.yaml", ["lr=1e-4", ...])` reads the YAML, applies
`key=value` overrides, rejects unknown keys with the file and line, and validates.
The mixins of methods that read a teacher elsewhere (`ServedTeacherConfig`, `TeacherCacheConfig`)
live here too: one home for the schema.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import yaml


class ConfigError(ValueError):
    """A recipe problem: names the file, line and key, and what was expected (`key`: the key, if one)."""

    def __init__(self, message: str, key: Optional[str] = None):
        super().__init__(message)
        self.key = key


def doc(help_text: str, **kwargs) -> Any:
    """A dataclass field whose documentation travels with it (`metadata["help"]`)."""
    return field(metadata={"help": help_text}, **kwargs)


def data_dir() -> Path:
    """Where the benchmark data lives: `$LMDISTILL_DATA_DIR`, else `../shared/data`."""
    return Path(os.environ.get("LMDISTILL_DATA_DIR", "../shared/data"))


def expand_path(value: str) -> str:
    """Expand `${LMDISTILL_DATA_DIR}` (with its default) and `~` in a path-like value."""
    if "LMDISTILL_DATA_DIR" in value and "LMDISTILL_DATA_DIR" not in os.environ:
        value = value.replace("${LMDISTILL_DATA_DIR}", str(data_dir())).replace("$LMDISTILL_DATA_DIR", str(data_dir()))
    return os.path.expanduser(os.path.expandvars(value))


@dataclass
class LoraSettings:
    """`student_lora:` of a recipe: train LoRA adapters instead of the whole student (`lmdistill.lora`)."""

    r: int = doc("Rank of the adapter matrices A [r, in] and B [out, r].", default=16)
    alpha: float = doc("The update (alpha / r) B A is added to each adapted weight.", default=32.0)
    dropout: float = doc("Dropout on the adapter's input (0: none).", default=0.05)
    target_modules: list[str] = doc(
        "Names of the linear layers to adapt (peft's `target_modules`, matched on name suffixes, e.g. "
        "q_proj, v_proj); `all-linear`: every linear layer but the output head.",
        default_factory=lambda: ["all-linear"])
    save_merged: bool = doc("Also write the merged student (`student/`) beside the adapter (`student_adapter/`).",
                            default=True)

    def validate(self) -> None:
        check(self.r > 0, "student_lora.r", "> 0", self.r)
        check(self.alpha > 0, "student_lora.alpha", "> 0", self.alpha)
        check(0.0 <= self.dropout < 1.0, "student_lora.dropout", "in [0, 1)", self.dropout)
        check(bool(self.target_modules) and all(isinstance(t, str) and t for t in self.target_modules),
              "student_lora.target_modules", "a non-empty list of module names", self.target_modules)


@dataclass
class TrainConfig:
    """Fields shared by every training method."""

    method: str = doc("Training method: a key of `lmdistill.methods.METHODS` (sft, promptkd, kd, ...).", default="sft")
    student: str = doc("Student model: Hub id, local folder, or an alias such as `smollm2-135m-instruct`.", default="")
    teacher: Optional[str] = doc(
        "Teacher model (same spec forms as `student`); required by distillation methods.", default=None
    )
    train_data: str = doc(
        "Training data: a JSONL file (MiniLLM layout or chat `messages`), a Parquet file, a `datasets` folder, "
        "or a Hub dataset id (see `split` and the `*_field` column mapping). `${LMDISTILL_DATA_DIR}` is expanded.",
        default="",
    )
    split: str = doc("The split of a Hub dataset or `datasets` folder in `train_data`.", default="train")
    prompt_field: Optional[str] = doc("`train_data` column holding the prompt (user request), when not "
                                      "`prompt`/`instruction`.", default=None)
    response_field: Optional[str] = doc("`train_data` column holding the response, when not `output`.", default=None)
    messages_field: Optional[str] = doc("`train_data` column holding a chat conversation (a list of {role, "
                                        "content}), when the data is chat data under another name than `messages`.",
                                        default=None)
    output_dir: str = doc(
        "Run folder: checkpoints, metrics.jsonl, config.yaml, TensorBoard logs, the final student.", default="runs/run"
    )
    prompt_format: str = doc(
        "How prompts are built: `chat` (the tokenizer's chat template), `alpaca` (the MiniLLM Alpaca template), "
        "or `auto` (chat when the tokenizer has a template).",
        default="auto",
    )
    max_prompt_length: int = doc(
        "Prompts longer than this many tokens are dropped (and counted in the log).", default=256
    )
    max_length: int = doc("Prompt + response token limit; responses are truncated to fit.", default=512)
    max_train_examples: Optional[int] = doc(
        "Use only the first N training examples (after filtering); None = all.", default=None
    )
    steps: int = doc("Number of optimiser steps.", default=100)
    batch_size: int = doc("Examples per micro-batch on each process.", default=4)
    grad_accum: int = doc("Micro-batches accumulated per optimiser step.", default=1)
    lr: float = doc("Student learning rate (AdamW).", default=5e-5)
    weight_decay: float = doc("AdamW weight decay (every update's optimiser).", default=0.0)
    adam_betas: list[float] = doc(
        "AdamW (beta1, beta2) of every update's optimiser.", default_factory=lambda: [0.9, 0.999]
    )
    warmup_steps: int = doc(
        "Linear learning-rate warm-up steps (more than `steps`: the run warms up throughout).", default=0
    )
    lr_schedule: str = doc("Learning-rate schedule after warm-up: constant, linear or cosine.", default="cosine")
    max_grad_norm: Optional[float] = doc("Gradient-norm clipping threshold; None disables clipping.", default=1.0)
    seed: int = doc("Seed for data order, sampling and initialisation.", default=0)
    precision: str = doc(
        "`bf16` (autocast for the student, float32 master weights, teacher held in bf16; faster on GPUs, "
        "and on CPUs only where bf16 matmuls beat fp32 ones: of two CPUs with AVX512-BF16 and no AMX, one "
        "trained 1.4-1.75x faster in fp32, the other 1.64x faster in bf16, docs/results.md) or `fp32` (exact).",
        default="bf16",
    )
    log_every: int = doc("Write metrics every N steps.", default=1)
    save_every: int = doc("Write a checkpoint every N steps (0: only at the end).", default=0)
    keep_checkpoints: int = doc("How many most recent checkpoints to keep.", default=2)
    max_nonfinite_steps: int = doc(
        "A non-finite loss or gradient skips the step; more than this many in a row stop the run.", default=3
    )
    resume: bool = doc("Continue from the newest complete checkpoint in `output_dir`.", default=False)
    trust_remote_code: bool = doc(
        "Allow model repositories to run their own code (off unless you trust them).", default=False
    )
    allow_pickle: bool = doc(
        "Accept models stored only as pickled weights (pytorch_model.bin, loaded with torch's weights_only "
        "unpickler); off: safetensors only.",
        default=False,
    )
    progress: bool = doc("Show a progress bar.", default=True)
    eos_tokens: list[str] = doc("More tokens that end a student response, besides the tokenizer's and the "
                                "generation config's EOS (e.g. the teacher's end-of-turn token; `lmdistill check` "
                                "says when one is needed).", default_factory=list)
    gradient_checkpointing: bool = doc("Recompute the student's layer activations in the backward pass instead of "
                                       "storing them (less memory, ~30% more compute; needs dropout: true, i.e. "
                                       "train mode).", default=False)
    dropout: bool = doc(
        "Train the student in train mode (dropout on, as every reference trainer; no effect on "
        "models without dropout, e.g. SmolLM2, Qwen2.5); false: eval mode throughout.",
        default=True,
    )
    lm_data: Optional[str] = doc(
        "Pre-training corpus for an extra language-modelling term (MiniLLM's L_PT; "
        "DistiLLM and ImitKD scripts): a plain-text file (blank lines separate documents) "
        "or a JSONL file with a `text` field. Off when null.",
        default=None,
    )
    lm_coef: float = doc(
        "Weight of the language-modelling term: loss += lm_coef * L_LM (the references: 1).", default=1.0
    )
    lm_batch_size: Optional[int] = doc(
        "Corpus blocks per micro-batch for the LM term (null: batch_size).", default=None
    )
    lm_block_length: Optional[int] = doc("Tokens per corpus block of the LM term (null: max_length).", default=None)
    eval_every: int = doc(
        "Evaluate on `eval_data` every N steps and at the end, keep the best student in "
        "`best/` (0: no evaluation during training).",
        default=0,
    )
    eval_data: Optional[str] = doc(
        "Dev set for `eval_every`: an instruction JSONL (scored by ROUGE-L); for "
        "reasoning methods a split of the training dataset (default `valid`, accuracy).",
        default=None,
    )
    report_to: list[str] = doc("Experiment trackers the metrics go to, through Accelerate: tensorboard "
                               "(`output_dir/tensorboard`), wandb (mode from WANDB_MODE, e.g. offline), mlflow "
                               "($MLFLOW_TRACKING_URI, else a file store in `output_dir/mlruns`), or none. "
                               "metrics.jsonl is always written.", default_factory=lambda: ["tensorboard"])
    tracker_project: str = doc("Project (W&B) / experiment (MLflow) name of the run.", default="lmdistill")
    student_lora: Optional[LoraSettings] = doc(
        "Train LoRA adapters on the frozen student instead of all its weights: a mapping of `LoraSettings` "
        "(r, alpha, dropout, target_modules, save_merged; `{}` for the defaults; on the command line "
        "`student_lora.r=8`). Null: full fine-tuning.", default=None)
    test_data: list[str] = doc(
        "Evaluation files (instruction JSONL, `${LMDISTILL_DATA_DIR}` expanded) whose prompts must never be trained "
        "on, besides `eval_data`: the test sets (`lmdistill compare` adds its own `eval_data`). See `contamination`.",
        default_factory=list)
    contamination: str = doc(
        "The contamination guard: a training row whose prompt equals, after whitespace normalisation, a prompt of "
        "`eval_data`, `test_data` or (reasoning methods) the task's evaluation splits is dropped and counted in the "
        "log (`drop`), or stops the run naming both rows (`error`).", default="drop")
    length_group: int = doc(
        "Windows of this many global batches are sorted by length, so a batch holds similar lengths (less "
        "padding) while the order stays random; 1: plain random batches, as the reference trainers.", default=16)
    eval_examples: int = doc("Dev examples scored at each evaluation (the first N).", default=64)
    eval_max_new_tokens: int = doc("Longest response generated at each evaluation.", default=256)

    # Whether `eval_every` needs `eval_data` (reasoning methods default to their dataset's valid split).
    eval_data_required: ClassVar[bool] = True
    # Why a method needs the teacher model itself (said when a served teacher is refused), if it says.
    local_teacher_reason: ClassVar[str] = ""

    def validate(self) -> None:
        """Raise ConfigError naming the first field that is out of range."""
        check(bool(self.method), "method", "a method name", self.method)
        check(bool(self.student), "student", "a model id, folder or alias", self.student)
        check(bool(self.train_data), "train_data", "a data file or dataset id", self.train_data)
        # A served teacher only scores given sequences (top-k log-probs): methods that read it say so.
        check(not is_served(self.teacher) or getattr(type(self), "accepts_served_teacher", False), "teacher",
              f"a local teacher for method '{self.method}' (a served teacher, scored top-k, works with kd, seqkd, "
              "gkd, rkl, imitkd, distillm, minillm and opd" + (f"; {self.local_teacher_reason})"
                                                               if self.local_teacher_reason else ")"), self.teacher)
        check(
            self.prompt_format in ("auto", "chat", "alpaca"),
            "prompt_format",
            "auto, chat or alpaca",
            self.prompt_format,
        )
        check(self.max_prompt_length > 0, "max_prompt_length", "> 0", self.max_prompt_length)
        check(
            self.max_length > self.max_prompt_length,
            "max_length",
            f"> max_prompt_length ({self.max_prompt_length})",
            self.max_length,
        )
        check(
            self.max_train_examples is None or self.max_train_examples > 0,
            "max_train_examples",
            "> 0 or null",
            self.max_train_examples,
        )
        check(self.steps > 0, "steps", "> 0", self.steps)
        check(self.batch_size > 0, "batch_size", "> 0", self.batch_size)
        check(self.grad_accum > 0, "grad_accum", "> 0", self.grad_accum)
        check(self.lr >= 0, "lr", ">= 0", self.lr)
        check(self.weight_decay >= 0, "weight_decay", ">= 0", self.weight_decay)
        check(
            len(self.adam_betas) == 2 and all(0.0 <= b < 1.0 for b in self.adam_betas),
            "adam_betas",
            "two numbers in [0, 1)",
            self.adam_betas,
        )
        check(self.warmup_steps >= 0, "warmup_steps", ">= 0", self.warmup_steps)
        check(
            self.lr_schedule in ("constant", "linear", "cosine"),
            "lr_schedule",
            "constant, linear or cosine",
            self.lr_schedule,
        )
        check(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm", "> 0 or null", self.max_grad_norm)
        check(self.precision in ("fp32", "bf16"), "precision", "fp32 or bf16", self.precision)
        check(self.log_every > 0, "log_every", "> 0", self.log_every)
        check(self.save_every >= 0, "save_every", ">= 0", self.save_every)
        check(self.max_nonfinite_steps >= 0, "max_nonfinite_steps", ">= 0", self.max_nonfinite_steps)
        check(self.keep_checkpoints > 0, "keep_checkpoints", "> 0", self.keep_checkpoints)
        check(self.lm_coef >= 0, "lm_coef", ">= 0", self.lm_coef)
        check(
            self.lm_block_length is None or self.lm_block_length > 1,
            "lm_block_length",
            "> 1 or null",
            self.lm_block_length,
        )
        check(self.lm_batch_size is None or self.lm_batch_size > 0, "lm_batch_size", "> 0 or null", self.lm_batch_size)
        check(self.eval_every >= 0, "eval_every", ">= 0", self.eval_every)
        check(
            not self.eval_every or self.eval_data is not None or not self.eval_data_required,
            "eval_data",
            "a dev set (instruction JSONL) when eval_every > 0",
            self.eval_data,
        )
        check(self.eval_examples > 0, "eval_examples", "> 0", self.eval_examples)
        check(self.contamination in ("drop", "error"), "contamination", "drop or error", self.contamination)
        check(all(isinstance(f, str) and f for f in self.test_data), "test_data", "a list of file paths",
              self.test_data)
        check(self.length_group > 0, "length_group", "> 0", self.length_group)
        check(self.messages_field is None or (self.prompt_field is None and self.response_field is None),
              "messages_field", "unset when prompt_field/response_field map single-turn data", self.messages_field)
        if self.student_lora is not None:
            self.student_lora.validate()
        check(all(t in ("tensorboard", "wandb", "mlflow", "none") for t in self.report_to)
              and ("none" not in self.report_to or len(self.report_to) == 1), "report_to",
              "a list of tensorboard, wandb, mlflow (or [none])", self.report_to)
        check(self.eval_max_new_tokens > 0, "eval_max_new_tokens", "> 0", self.eval_max_new_tokens)

    @property
    def train_data_path(self) -> str:
        return expand_path(self.train_data)

    @property
    def eval_data_path(self) -> str:
        return expand_path(self.eval_data or "")

    def evaluation_files(self) -> list[str]:
        """Every instruction file the student is evaluated on (`eval_data` and `test_data`), expanded:
        what the contamination guard keeps out of training."""
        return [expand_path(f) for f in ([self.eval_data] if self.eval_data else []) + list(self.test_data)]


@dataclass
class SamplingConfig(TrainConfig):
    """Fields of methods that generate responses during training (on-policy student samples, or the
    teacher's responses of SeqKD / a teacher cache): `class XConfig(SamplingConfig)`."""

    max_new_tokens: int = doc("Longest response sampled during training.", default=128)
    temperature: float = doc("Sampling temperature of responses generated during training.", default=1.0)
    top_p: float = doc(
        "Nucleus sampling threshold of responses generated during training (1.0 = full distribution).", default=1.0
    )

    def validate(self) -> None:
        super().validate()
        check(self.max_new_tokens > 0, "max_new_tokens", "> 0", self.max_new_tokens)
        check(self.temperature > 0, "temperature", "> 0", self.temperature)
        check(0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)


def parse_server_spec(spec: str) -> Optional[tuple[str, str]]:
    """'openai:URL#MODEL' -> (URL, MODEL); None for any other (local) spec.

    URL is the API base, e.g. http://127.0.0.1:8080/v1; requests go to URL/completions
    and URL/chat/completions.
    """
    if not spec.startswith("openai:"):
        return None
    url, _, model = spec[len("openai:"):].partition("#")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"teacher '{spec}': expected openai:http(s)://HOST[:PORT]/PATH#MODEL, "
                         f"got URL {url!r}")
    if not model:
        raise ValueError(f"teacher '{spec}': missing '#MODEL' after the URL (the server's model name)")
    return url.rstrip("/"), model


@dataclass
class ServedTeacherConfig(TrainConfig):
    """Fields of the methods that can read a served teacher (`teacher: openai:URL#MODEL`): its
    top-k log-probs on the sequences each step trains on (`lmdistill.teacher.served`)."""

    teacher_top_k: int = doc("Served teacher (`teacher: openai:URL#MODEL`): top log-probabilities asked per "
                             "position; the rest of the mass is one 'any other token' outcome.", default=20)
    teacher_server: str = doc("Served teacher: `llama.cpp` (llama-cpp-python's server: text in, echoed prompt "
                              "log-probs keyed by token text) or `vllm` (token ids in, `prompt_logprobs` keyed by "
                              "id).", default="llama.cpp")
    teacher_concurrency: int = doc("Served teacher: scoring requests in flight.", default=2)
    teacher_timeout: float = doc("Served teacher: seconds to wait for one response.", default=120.0)
    teacher_retries: int = doc("Served teacher: retries of a request after 429, 5xx or a connection error "
                               "(exponential backoff); then the run stops with the last error.", default=5)
    teacher_backoff: float = doc("Served teacher: first retry delay in seconds; doubles on each retry.", default=1.0)
    api_key_env: Optional[str] = doc("Served teacher: environment variable holding the API key (default: "
                                     "LMDISTILL_API_KEY, then OPENAI_API_KEY); never in the recipe.", default=None)
    # Whether the method can read a served teacher (scores of given sequences, top-k).
    accepts_served_teacher: ClassVar[bool] = True

    @property
    def served(self) -> bool:
        return is_served(self.teacher)

    def validate(self) -> None:
        super().validate()
        if self.served:
            try:
                parse_server_spec(self.teacher)
            except ValueError as e:
                check(False, "teacher", "openai:http(s)://HOST[:PORT]/PATH#MODEL", f"{self.teacher} ({e})")
            check(getattr(self, "teacher_cache", None) is None, "teacher_cache", "unset with a served teacher",
                  getattr(self, "teacher_cache", None))
        check(self.teacher_top_k > 0, "teacher_top_k", "> 0", self.teacher_top_k)
        check(self.teacher_server in ("llama.cpp", "vllm"), "teacher_server", "llama.cpp or vllm", self.teacher_server)
        check(self.teacher_concurrency > 0, "teacher_concurrency", "> 0", self.teacher_concurrency)
        check(self.teacher_timeout > 0, "teacher_timeout", "> 0", self.teacher_timeout)
        check(self.teacher_retries >= 0, "teacher_retries", ">= 0", self.teacher_retries)
        check(self.teacher_backoff >= 0, "teacher_backoff", ">= 0", self.teacher_backoff)


@dataclass
class TeacherCacheConfig(ServedTeacherConfig, SamplingConfig):
    """Fields of the methods that can read the teacher's top-k instead of loading it: from
    `lmdistill cache-teacher` (KD, GKD with lmbda 0, SeqKD) or from a server (KD, GKD)."""

    teacher_cache: Optional[str] = doc("Folder from `lmdistill cache-teacher`: the teacher's stored top-k log-probs "
                                       "(and, built with `--responses teacher`, its responses) stand in for the "
                                       "teacher model.", default=None)
    teacher_reuse_top_k: int = doc("0: the teacher model runs on every batch. k > 0: the teacher runs on an "
                                   "example the first time it is trained on (epoch 1, the dense loss as with 0), "
                                   "and its top-k log-probs at each response position are kept in memory "
                                   "(k * 8 + 4 bytes a position); later epochs read those instead of running the "
                                   "teacher, as `teacher_cache` does (the loss over the k tokens + the rest, a "
                                   "lower bound of the dense one: the logged divergence drops at epoch 2). Saves "
                                   "the teacher's forward pass from epoch 2 on (measured: docs/results.md, "
                                   "issue 25).", default=0)
    # The `--responses` the method needs the cache built with (None: either).
    cache_responses: ClassVar[Optional[str]] = None

    def validate(self) -> None:
        super().validate()
        check(self.teacher is not None or self.teacher_cache is not None, "teacher",
              f"a teacher model (or a teacher_cache) for {self.method}", self.teacher)
        check_cache_config(self, self.cache_responses)
        check(self.teacher_reuse_top_k >= 0, "teacher_reuse_top_k", ">= 0", self.teacher_reuse_top_k)
        check(self.teacher_reuse_top_k == 0 or (self.teacher_cache is None and not self.served),
              "teacher_reuse_top_k", "0 with a teacher_cache or a served teacher (their answers are read "
              "already, not computed)", self.teacher_reuse_top_k)


def check_cache_config(config, responses: Optional[str] = None) -> None:
    """ConfigError naming `teacher_cache` when the folder is not a cache (of `responses`, if given)."""
    if config.teacher_cache is None:
        return
    meta = Path(expand_path(config.teacher_cache)) / "meta.json"
    check(meta.exists(), "teacher_cache", "a folder written by `lmdistill cache-teacher`", config.teacher_cache)
    if responses is not None:
        built = json.loads(meta.read_text()).get("responses")
        check(
            built == responses,
            "teacher_cache",
            f"a cache built with --responses {responses}",
            f"{config.teacher_cache} (built with --responses {built})",
        )


def is_served(teacher: Optional[str]) -> bool:
    """Whether a `teacher` spec names an OpenAI-compatible server (`openai:URL#MODEL`)."""
    return bool(teacher) and teacher.startswith("openai:")


def check(ok: bool, key: str, expected: str, got: Any) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': expected {expected}, got {got!r}", key=key)


def config_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _coerce(value: Any, annotation: Any, key: str, where: str) -> Any:
    """Check a YAML value against a field's type; ints are accepted where floats are."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is list:
        (item_type,) = typing.get_args(annotation) or (Any,)
        if isinstance(value, str):  # `key=a,b,c` on the command line
            value = [yaml.safe_load(v) for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: key '{key}': expected a list, got {value!r}")
        return [_coerce(v, item_type, key, where) for v in value]
    if annotation is Any:
        return value
    if dataclasses.is_dataclass(annotation):  # a nested settings block, e.g. student_lora
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: key '{key}': expected a mapping of {sorted(config_fields(annotation))}, "
                              f"got {value!r}")
        hints, fields = typing.get_type_hints(annotation), config_fields(annotation)
        unknown = [k for k in value if k not in fields]
        if unknown:
            raise ConfigError(f"{where}: unknown config key '{key}.{unknown[0]}' (expected one of {sorted(fields)})",
                              key=f"{key}.{unknown[0]}")
        return annotation(**{k: _coerce(v, hints[k], f"{key}.{k}", where) for k, v in value.items()})
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        # PyYAML follows YAML 1.1, where `1e-4` (no dot) is a string; users mean a number.
        try:
            return float(value)
        except ValueError:
            pass
    if annotation is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if annotation in (int, float, str, bool) and (type(value) is not annotation):
        raise ConfigError(f"{where}: key '{key}': expected {annotation.__name__}, got {value!r}")
    if annotation is dict and not isinstance(value, dict):
        raise ConfigError(f"{where}: key '{key}': expected a mapping, got {value!r}")
    return value


def _yaml_with_lines(path: Path) -> tuple[dict, dict[str, int]]:
    """Load a YAML mapping and remember the line of each top-level key (for errors)."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read recipe: {e}") from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the recipe must be a mapping of key: value, got {type(data).__name__}")
    _refuse_duplicate_keys(node, path)
    lines = {k.value: k.start_mark.line + 1 for k, _ in node.value} if isinstance(node, yaml.MappingNode) else {}
    return data, lines


def _refuse_duplicate_keys(node: Any, path: Path, prefix: str = "") -> None:
    """ConfigError naming a key given twice in one mapping (YAML keeps the last silently)."""
    if not isinstance(node, yaml.MappingNode):
        return
    first: dict[Any, int] = {}
    for key, value in node.value:
        name, line = getattr(key, "value", None), key.start_mark.line + 1
        if name in first:
            raise ConfigError(f"{path}:{line}: key '{prefix}{name}' given twice (first at line {first[name]})",
                              key=f"{prefix}{name}")
        first[name] = line
        _refuse_duplicate_keys(value, path, f"{prefix}{name}.")


def build_config(cls: type, values: dict, where: dict[str, str] | None = None) -> Any:
    """Make `cls(**values)` with type checks; `where[key]` says where a value came from."""
    where = where or {}
    fields = config_fields(cls)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        place = where.get(key, "config")
        if key not in fields:
            close = [f for f in fields if f.split("_")[0] == key.split("_")[0]][:3]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{place}: unknown config key '{key}' for method config {cls.__name__}{hint}")
        kwargs[key] = _coerce(value, hints[key], key, place)
    config = cls(**kwargs)
    try:
        config.validate()
    except ConfigError as e:
        place = where.get(e.key) or where.get((e.key or "").split(".")[0], "config")  # student_lora.r: its block
        raise ConfigError(f"{place}: {e}", key=e.key) from None
    return config


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["lr=1e-4", "teacher=null"]` -> {"lr": 0.0001, "teacher": None} (values parsed as YAML)."""
    values = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        values[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return values


def read_recipe(
    path: str | os.PathLike | None, overrides: list[str] | None = None, **extra: Any
) -> tuple[dict[str, Any], dict[str, str]]:
    """A YAML recipe's values with `key=value` overrides and keyword arguments applied (later wins),
    and where each value came from (`file:line`, `command line` or `argument`), for errors."""
    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    if path is not None:
        path = Path(path)
        values, lines = _yaml_with_lines(path)
        where = {k: f"{path}:{lines.get(k, 1)}" for k in values}
    for key, value in parse_overrides(overrides or []).items():
        if "." in key:  # `student_lora.r=8`: one field of a nested block
            block, sub = key.split(".", 1)
            base = values.get(block)
            values[block] = {**(base if isinstance(base, dict) else {}), sub: value}
            where[block] = "command line"
            continue
        values[key] = value
        where[key] = "command line"
    for key, value in extra.items():
        values[key] = value
        where[key] = "argument"
    return values, where


def config_to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
