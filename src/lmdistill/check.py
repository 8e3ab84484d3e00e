"""The pre-flight check of a teacher/student pair (`lmdistill check`, and the start of every
`lmdistill train`): what will go wrong, said before the first step.

Findings, each `ok`, `warning` or `error` (an error stops a training run with the same text):
  vocabulary  one tokenizer; embedding matrices padded to different sizes (handled: every
              loss reads the rows both models have); different tokenizers (only methods that
              learn from the teacher's text can work)
  special     BOS / EOS / pad ids and every end-of-sequence id of each generation config; a
              teacher end-of-turn token the student's sampler would not stop at
  template    chat templates present and equal
  memory      predicted peak for the method, batch and lengths against the memory available
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from lmdistill.lora import adapter_parameters
from lmdistill.models import count_parameters, embedding_rows, same_vocabulary
from lmdistill.sampling import eos_token_ids, extra_eos_ids

# Methods that learn from the teacher's text only, so they work across tokenizers when the
# teacher's responses come as text (a SeqKD responses file, step-by-step rationales).
TEXT_LEVEL_METHODS = ("sft", "seqkd", "step_by_step", "finetune", "distill")
# Methods that align two tokenizations by text and compare distributions across vocabularies.
CROSS_TOKENIZER_METHODS = ("uld", "gold")


@dataclass
class Finding:
    level: str  # ok | warning | error
    topic: str
    message: str


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)

    def add(self, level: str, topic: str, message: str) -> None:
        self.findings.append(Finding(level, topic, message))

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    def text(self) -> str:
        marks = {"ok": "ok     ", "warning": "WARNING", "error": "ERROR  "}
        return "\n".join(f"{marks[f.level]} {f.topic:10} {f.message}" for f in self.findings)


def check_vocabulary(report: Report, method: str, student_tok, teacher_tok, student_config, teacher_config) -> None:
    rows_s, rows_t = embedding_rows(student_config), embedding_rows(teacher_config)
    if not same_vocabulary(student_tok, teacher_tok):
        allowed = TEXT_LEVEL_METHODS + CROSS_TOKENIZER_METHODS
        report.add("ok", "methods", f"the tokenizers differ ({len(teacher_tok)} teacher, {len(student_tok)} student "
                                    f"tokens): this pair allows {', '.join(allowed)}")
        if method in TEXT_LEVEL_METHODS:
            report.add("warning", "vocabulary", f"the tokenizers differ; '{method}' learns from the teacher's text, "
                                                "which works across tokenizers")
        elif method in CROSS_TOKENIZER_METHODS:
            report.add("ok", "vocabulary", f"the tokenizers differ; '{method}' aligns the two tokenizations by text")
        else:
            report.add("error", "vocabulary",
                       f"the tokenizers differ, and '{method}' compares token distributions of one vocabulary: use "
                       f"a cross-tokenizer method ({', '.join(CROSS_TOKENIZER_METHODS)}), a text-level method "
                       f"({', '.join(TEXT_LEVEL_METHODS)}) or a teacher with the student's tokenizer")
        return
    report.add("ok", "methods", "one tokenizer: this pair allows every method")
    real = len(student_tok)
    if rows_s == rows_t:
        report.add("ok", "vocabulary", f"one tokenizer ({real} tokens), both embedding matrices {rows_s} rows")
    else:
        report.add("ok", "vocabulary",
                   f"one tokenizer ({real} tokens); embedding matrices padded to {rows_t} (teacher) and {rows_s} "
                   f"(student) rows: every loss reads the first {min(rows_s, rows_t)} rows both have, the padding "
                   "rows beyond them are ignored")
    if min(rows_s, rows_t) < real:
        report.add("error", "vocabulary", f"the tokenizer has {real} tokens but an embedding matrix only "
                                          f"{min(rows_s, rows_t)} rows")


def check_special_tokens(report: Report, student_tok, teacher_tok, student_eos: list[int],
                         teacher_eos: list[int]) -> None:
    """`student_eos`: the ids the student's sampler stops at (`Method.eos_ids`); `teacher_eos`: the
    teacher's (`sampling.eos_token_ids`)."""
    def ids(tok, name):
        return getattr(tok, f"{name}_token_id", None)

    parts = []
    for name in ("bos", "eos", "pad"):
        s, t = ids(student_tok, name), ids(teacher_tok, name)
        parts.append(f"{name} {t}/{s}" if s != t else f"{name} {s}")
    report.add("ok", "special", "teacher/student ids: " + ", ".join(parts))
    eos_s, eos_t = student_eos, teacher_eos
    missing = [i for i in eos_t if i not in eos_s]
    if missing:
        names = ", ".join(f"{i} ({teacher_tok.convert_ids_to_tokens(i)!r})" for i in missing)
        report.add("warning", "special",
                   f"the teacher ends its turns with {names}, which the student's sampler does not stop at "
                   f"(its EOS ids: {eos_s}); add it to the recipe's `eos_tokens` (or the student's "
                   "generation_config.json `eos_token_id`)")
    else:
        report.add("ok", "special", f"end-of-sequence ids: teacher {eos_t}, student {eos_s}")
    if ids(student_tok, "pad") is None:
        report.add("warning", "special", "the student's tokenizer has no pad token; lmdistill pads with EOS")


def check_chat_templates(report: Report, student_tok, teacher_tok, prompt_format: str = "auto") -> None:
    s, t = getattr(student_tok, "chat_template", None), getattr(teacher_tok, "chat_template", None)
    if prompt_format == "alpaca":
        report.add("ok", "template", "prompt_format alpaca: chat templates are not used")
    elif s is None and t is None:
        report.add("ok", "template", "no chat templates: prompts use the Alpaca format")
    elif s is None or t is None:
        side = "student" if s is None else "teacher"
        report.add("warning", "template", f"only the {'teacher' if side == 'student' else 'student'} has a chat "
                                          f"template: prompts follow the student's tokenizer ({side} has none)")
    elif s == t:
        report.add("ok", "template", "one chat template")
    elif (written := _renders(student_tok)) is not None and written == _renders(teacher_tok):
        # e.g. Qwen2.5-Coder 1.5B and 0.5B: the two texts differ only inside the tool-calling branch
        report.add("ok", "template", "the chat templates' texts differ, but they write the same prompt and response")
    else:
        report.add("warning", "template", "the chat templates differ: prompts are built with the student's; the "
                                          "teacher reads them in a format it was not tuned on")


_PROBE = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]


def _renders(tok) -> Optional[tuple[str, str]]:
    """What a template writes for a prompt (with the generation prompt) and for a prompt + response;
    None where it cannot render them."""
    try:
        return (tok.apply_chat_template(_PROBE[:1], tokenize=False, add_generation_prompt=True),
                tok.apply_chat_template(_PROBE, tokenize=False))
    except Exception:  # a template that needs other roles or variables: compare the texts only
        return None


def available_memory_bytes() -> Optional[int]:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class MemoryEstimate:
    """Predicted peak bytes of a training step, by part."""

    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        gib = 1024 ** 3
        return f"{self.total / gib:.2f} GiB (" + ", ".join(f"{k} {v / gib:.2f}" for k, v in self.parts.items()) + ")"


def predict_memory(student_params: int, teacher_params: int, student_config, batch_size: int, max_length: int,
                   vocab_rows: int, precision: str = "bf16", gradient_checkpointing: bool = False,
                   trainable_params: Optional[int] = None, chunk_rows: int = 1024) -> MemoryEstimate:
    """A first-order prediction: fp32 student weights + gradients + AdamW's two moments; the teacher
    in bf16 (fp32 under `precision: fp32`); activations ~ 34 x hidden bytes per token and layer (the
    Megatron estimate for fp16/bf16 activations, 2x in fp32; one layer's worth plus the layer inputs
    with gradient checkpointing); the chunked loss's [chunk_rows, V] float32 logits and gradients;
    the sampler's KV cache for batch x max_length tokens."""
    text = getattr(student_config, "text_config", None) or student_config
    hidden, layers = int(text.hidden_size), int(text.num_hidden_layers)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or hidden // text.num_attention_heads)
    trainable = student_params if trainable_params is None else trainable_params
    act_bytes = 2 if precision == "bf16" else 4
    tokens = batch_size * max_length
    per_layer = 17 * hidden * act_bytes * tokens  # 34 x hidden bytes per token in half precision
    activations = per_layer * (1 + 0.06 * layers if gradient_checkpointing else layers)
    return MemoryEstimate({
        "student weights": 4 * student_params,
        "gradients + AdamW": 12 * trainable,
        "teacher weights": (2 if precision == "bf16" else 4) * teacher_params,
        "activations": int(activations),
        "loss chunks": 3 * 4 * chunk_rows * vocab_rows,
        "KV cache": 2 * layers * kv_heads * head_dim * tokens * act_bytes,
    })


def preflight(config, student, teacher, student_tok, teacher_tok) -> Report:
    """The whole check for a training config and loaded models (teacher may be None)."""
    report = Report()
    method = config.method
    if teacher is not None:
        check_vocabulary(report, method, student_tok, teacher_tok, student.config, teacher.config)
        if method in CROSS_TOKENIZER_METHODS and getattr(teacher.config, "is_encoder_decoder", False):
            report.add("error", "teacher", f"'{method}' runs the teacher as a decoder-only language model on the "
                                           f"re-tokenized text; this teacher ({type(teacher).__name__}) is an "
                                           "encoder-decoder: use a decoder-only teacher")
        if method in CROSS_TOKENIZER_METHODS and not same_vocabulary(student_tok, teacher_tok):
            # two vocabularies: token ids do not compare, and each model reads its own prompt format
            report.add("ok", "template", "each model reads prompts in its own format (chat template or Alpaca); "
                                         "responses are re-tokenized for the teacher, end-of-turn paired with "
                                         "end-of-turn")
        else:
            student_eos = eos_token_ids(student, student_tok) + extra_eos_ids(config, student_tok)
            check_special_tokens(report, student_tok, teacher_tok, student_eos, eos_token_ids(teacher, teacher_tok))
            check_chat_templates(report, student_tok, teacher_tok, config.prompt_format)
    lora = getattr(config, "student_lora", None)
    estimate = predict_memory(
        count_parameters(student), count_parameters(teacher) if teacher is not None else 0, student.config,
        config.batch_size, config.max_length, embedding_rows(student.config), config.precision,
        getattr(config, "gradient_checkpointing", False),
        trainable_params=None if lora is None else adapter_parameters(student, lora.r, lora.target_modules))
    available = available_memory_bytes()
    message = f"predicted peak {estimate.describe()}"
    if available is not None and estimate.total > available:
        report.add("warning", "memory", f"{message} exceeds the {available / 1024 ** 3:.1f} GiB available: lower "
                                        "batch_size or max_length, set gradient_checkpointing: true, keep the "
                                        "teacher in bf16 (precision: bf16)")
    else:
        suffix = f" of {available / 1024 ** 3:.1f} GiB available" if available is not None else ""
        report.add("ok", "memory", message + suffix)
    return report


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux ru_maxrss is in KiB)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if os.uname().sysname == "Darwin" else peak * 1024
