"""Sequence-level knowledge distillation (Kim & Rush, "Sequence-Level Knowledge
Distillation", EMNLP 2016), the `SeqKD` baseline of MiniLLM, DistiLLM and PromptKD.

The student is fine-tuned on the teacher's own responses instead of the dataset's:

  1. Once, before training: for every training prompt x, the teacher generates
     y_T ~ p_T(. | x) (ancestral sampling at temperature 1, top-p 1, as the MiniLLM /
     DistiLLM SeqKD data scripts do; `teacher_decoding: greedy` takes the argmax
     instead, Kim & Rush's beam-size-1 approximation). The responses are written to a
     JSONL file in the MiniLLM layout and reused by every later run with the same
     teacher, data and generation settings.
  2. The student trains on them with the teacher loaded, as the reference SeqKD scripts run it:
        L = (1 - kd_ratio) CE(y_T; q_S) + kd_ratio (1/|y_T|) sum_t KL(p_T(. | y_T<t, x) || q_S(. | y_T<t, x))
     kd_ratio 0.5 in the MiniLLM/PromptKD scripts (1.0 in DistiLLM's); kd_ratio 0 is plain SFT on
     the teacher's text, Kim & Rush's original form.

With a served teacher (`teacher: openai:URL#MODEL`) step 1 is `lmdistill generate --task
responses` on the server and step 2's KL reads the server's top k (`teacher_top_k`) of those
responses, as `kd` does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from lmdistill.config import TeacherCacheConfig, check, doc, expand_path
from lmdistill.data import DataError
from lmdistill.instruct.data import load_instruction_data, load_training_data, tokenize_examples
from lmdistill.methods.kd import kd_loss
from lmdistill.methods.sft import sft_loss
from lmdistill.teacher.responses import teacher_responses
from lmdistill.teacher.cache import open_cache
from lmdistill.methods.base import DistillationMethod

log = logging.getLogger("lmdistill")


@dataclass
class SeqKDConfig(TeacherCacheConfig):
    """SeqKD: CE + forward KL on teacher-generated responses (generated once, cached as JSONL)."""

    method: str = doc("Training method.", default="seqkd")
    kd_ratio: float = doc("Weight of the forward KL to the teacher on its responses; (1 - kd_ratio) weights the "
                          "cross-entropy. MiniLLM/PromptKD scripts: 0.5, DistiLLM: 1.0, 0: SFT on the teacher's text.",
                          default=0.5)
    teacher_responses: Optional[str] = doc(
        "JSONL cache of the teacher's responses: read when it exists, else generated there. Default: "
        "`seqkd-cache/<data name>-<settings hash>.jsonl` beside the run folder, so runs that share a parent "
        "folder (e.g. a `compare`) and the same teacher/data/settings generate once.", default=None)
    teacher_decoding: str = doc(
        "`sample` (temperature 1, top-p 1, as MiniLLM/DistiLLM) or `greedy`.", default="sample"
    )
    generation_batch_size: int = doc("Prompts per teacher generation batch.", default=8)
    generation_seed: int = doc(
        "Seed of the teacher's sampling (independent of `seed`, so runs with different "
        "training seeds share one set of teacher responses).",
        default=0,
    )

    cache_responses = "teacher"  # the cache must hold the teacher's responses

    def validate(self) -> None:
        super().validate()
        check(
            self.teacher_decoding in ("sample", "greedy"),
            "teacher_decoding",
            "sample or greedy",
            self.teacher_decoding,
        )
        check(0.0 <= self.kd_ratio <= 1.0, "kd_ratio", "in [0, 1]", self.kd_ratio)
        check(self.generation_batch_size > 0, "generation_batch_size", "> 0", self.generation_batch_size)


def cache_key(config: SeqKDConfig) -> str:
    """Everything the teacher's responses depend on, hashed: a changed setting means a new file."""
    data = Path(config.train_data_path)
    stamp = [data.stat().st_size, data.stat().st_mtime_ns] if data.exists() else []
    parts = [
        config.teacher,
        str(data.resolve()) if data.exists() else str(data),
        stamp,
        config.prompt_format,
        config.max_prompt_length,
        config.max_length,
        config.max_train_examples,
        config.max_new_tokens,
        config.teacher_decoding,
        config.generation_seed,
    ]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:12]


def cache_path(config: SeqKDConfig) -> Path:
    if config.teacher_responses:
        return Path(expand_path(config.teacher_responses))
    name = Path(config.train_data_path).parent.name or "data"
    return Path(config.output_dir).resolve().parent / "seqkd-cache" / f"{name}-{cache_key(config)}.jsonl"


class SeqKD(DistillationMethod):
    config_class = SeqKDConfig
    description = "sequence-level KD on the teacher's responses (Kim & Rush, EMNLP 2016)"

    def load_examples(self):
        """Step 1: the teacher's responses to the training prompts, from the cache or generated now."""
        c = self.config
        if c.teacher_cache:
            examples = open_cache(c.teacher_cache).examples()
            log.info("SeqKD: %d teacher responses from the teacher cache %s", len(examples), c.teacher_cache)
            return examples
        path = cache_path(c)
        if path.exists():
            log.info("SeqKD: reusing teacher responses %s", path)
        elif self.accelerator.is_main_process:
            if c.served:
                self.generate_served_responses(path)
            else:
                self.generate_teacher_responses(path)
        self.accelerator.wait_for_everyone()
        raw = load_instruction_data(str(path))
        examples, stats = tokenize_examples(raw, self.tokenizer, c.prompt_format, c.max_prompt_length, c.max_length)
        log.info("SeqKD teacher data %s: %s", path, stats.describe())
        return examples

    def generate_served_responses(self, path: Path) -> None:
        """Step 1 with a served teacher (`teacher: openai:URL#MODEL`): `lmdistill generate --task
        responses` on the server, with this recipe's prompt format, length and decoding."""
        from lmdistill.instruct.data import uses_chat
        from lmdistill.teacher.generation import GenerateConfig, generate_responses, rejected_path

        c = self.config
        examples = load_training_data(c)
        if any(ex.messages is not None for ex in examples):
            raise DataError(f"{c.train_data_path}: SeqKD from a served teacher asks it single-turn prompts; "
                            "for chat data (`messages`) use a local teacher, or kd with the served one")
        chat = uses_chat(self.tokenizer, c.prompt_format)  # the prompts the student trains on
        staging = path.with_name(f".{path.name}.partial")  # resumable; renamed once complete
        prompts = path.with_name(f".{path.name}.prompts.jsonl")  # the training prompts, whatever the data source
        prompts.parent.mkdir(parents=True, exist_ok=True)
        prompts.write_text("".join(json.dumps({"id": ex.id or str(i), "instruction": ex.instruction,
                                               "prompt": ex.alpaca_prompt, "output": ""}) + "\n"
                                   for i, ex in enumerate(examples)))
        generate_responses(GenerateConfig(
            task="responses", teacher=c.teacher, data=str(prompts), out=str(staging),
            prompt_format="chat" if chat else "alpaca", max_new_tokens=c.max_new_tokens,
            temperature=1.0 if c.teacher_decoding == "sample" else 0.0, seed=c.generation_seed,
            limit=c.max_train_examples, concurrency=c.teacher_concurrency, timeout=c.teacher_timeout,
            max_retries=c.teacher_retries, backoff=c.teacher_backoff, api_key_env=c.api_key_env,
            progress=c.progress))
        if rejected_path(staging).exists():  # empty answers, kept beside the responses
            os.replace(rejected_path(staging), rejected_path(path))
        os.replace(staging, path)
        prompts.unlink()

    @torch.no_grad()
    def generate_teacher_responses(self, path: Path) -> None:
        c, tok = self.config, self.tokenizer
        pairs = []  # (raw example, tokenized example) for the prompts that fit, as the other methods keep them
        for ex in load_training_data(c):
            # a conversation: the teacher writes its last assistant turn, after the turns before it
            tokenized, _ = tokenize_examples([ex], tok, c.prompt_format, c.max_prompt_length, c.max_length,
                                             turns="last")
            pairs.extend((ex, t) for t in tokenized)
            if c.max_train_examples is not None and len(pairs) == c.max_train_examples:
                break  # the trainer uses only the first max_train_examples: generate no more
        log.info("SeqKD: generating %d teacher responses (%s) into %s", len(pairs), c.teacher_decoding, path)
        torch.manual_seed(c.generation_seed)
        answers = teacher_responses(
            self.teacher,
            tok,
            [t for _, t in pairs],
            c.generation_batch_size,
            c.max_new_tokens,
            c.max_length,
            do_sample=c.teacher_decoding == "sample",
        )
        records, empty = [], 0
        for (ex, _), answer in zip(pairs, answers):
            text = tok.decode(answer, skip_special_tokens=True)
            if not text.strip():  # e.g. an immediate EOS: nothing to imitate, and the data needs a response
                empty += 1
                continue
            if ex.messages is not None:  # the conversation with the teacher's last turn
                records.append({"id": ex.id, "messages": ex.messages[:-1] + [{"role": "assistant", "content": text}]})
            else:
                records.append({"id": ex.id, "instruction": ex.instruction, "prompt": ex.alpaca_prompt,
                                "output": text})
        if empty:
            log.warning("SeqKD: %d empty teacher responses left out", empty)
        if not records:
            raise DataError(
                f"{c.train_data_path}: the teacher '{c.teacher}' gave only empty responses "
                f"({empty} prompts); nothing to train SeqKD on"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        os.replace(staging, path)  # atomic: an interrupted generation leaves no partial cache

    def loss(self, batch, step):
        """Step 2: (1 - kd_ratio) CE + kd_ratio KL(p_T || q_S) on the teacher's responses."""
        c = self.config
        if c.kd_ratio == 0.0:  # SFT on the teacher's text
            loss = sft_loss(self.student, batch)
            return loss, {"loss": loss.item(), "ce": loss.item()}
        return kd_loss(self.student, self.teacher_source, batch, c.kd_ratio)  # as `kd`, on the teacher's text
