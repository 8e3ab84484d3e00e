"""`lmdistill cache-teacher`: the recipe's teacher over the recipe's training data, stored once
as the top-k cache that training reads (the format and the reader: `lmdistill.teacher.cache`).

Each response position keeps the teacher's k most likely tokens, their log-probabilities and
the log of the rest (`topk_rows`), over the vocabulary rows teacher and student share. A local
teacher is run here; a served one (`teacher: openai:URL#MODEL`) is asked for its top-k.

With `responses: teacher` (`--responses teacher`) the teacher first samples a response
for each prompt; the cache then holds those sequences too, which SeqKD trains on.

The build is resumable: it writes a hidden staging folder, renamed into place only when
complete, so a reader never sees half the rows; a rerun of the same build scores only the
examples not yet marked done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from lmdistill.config import is_served
from lmdistill.data import DataError, TokenizedExample, collate
from lmdistill.teacher.cache import FORMAT, VERSION, topk_of_hidden
from lmdistill.teacher.openai_client import complete_all

log = logging.getLogger("lmdistill")


@torch.inference_mode()
def build_cache(
    teacher,
    tokenizer,
    examples: list[TokenizedExample],
    out: str | os.PathLike,
    top_k: int = 64,
    batch_size: int = 8,
    description: Optional[dict] = None,
    overwrite: bool = False,
    student_rows: Optional[int] = None,
) -> Path:
    """Run `teacher` over `examples` and write the top-k cache folder `out` (atomically).

    `student_rows`: the rows of the student's output layer. When teacher and student pad one
    tokenizer's vocabulary to different sizes, the cache covers the rows both have (the
    teacher's distribution over them, as the dense loss path uses)."""

    from lmdistill.forward import output_head, response_hidden
    from lmdistill.losses.chunked import shared_rows

    out = Path(out)
    if out.exists() and not overwrite:
        raise DataError(f"{out}: already exists; remove it or pass --overwrite")
    if top_k <= 0:
        raise DataError(f"--top-k: expected > 0, got {top_k}")
    if not examples:
        raise DataError("cache-teacher: no training examples to cache")
    served = hasattr(teacher, "score")  # a ServedTeacher: top-k (<= its teacher_top_k) from a server
    if served:
        vocab, k = teacher.vocab_size, min(top_k, teacher.top_k)
    else:
        (weight, bias), = shared_rows(output_head(teacher), rows=student_rows)
        vocab = weight.shape[0]
        k = min(top_k, vocab)
    lengths = [len(e.response) for e in examples]
    row_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    sequences = [e.prompt + e.response for e in examples]
    token_offsets = np.concatenate([[0], np.cumsum([len(s) for s in sequences])]).astype(np.int64)
    n_rows = int(row_offsets[-1])
    out.parent.mkdir(parents=True, exist_ok=True)
    # The build happens in a hidden staging folder renamed to `out` once complete, so a reader never
    # sees half the rows. The staging folder outlives a stopped build (Ctrl-C, SIGKILL, a server
    # that went away): `done.npy` marks the examples whose rows are on disk, and a rerun of the same
    # build (plan.json: the sequences, k and description) scores only the others.
    staging = out.parent / f".{out.name}.partial"
    plan = {"k": k, "vocab": vocab, "served": served, "description": description or {},
            "sequences": hashlib.sha256(b"".join(np.asarray(s, dtype=np.int32).tobytes() + b"|"
                                                 for s in sequences)
                                        + np.asarray([len(e.prompt) for e in examples]).tobytes()).hexdigest()}
    resumed = _open_partial(staging, plan)
    try:

        def array(name, shape, dtype):
            if resumed:
                return np.load(staging / f"{name}.npy", mmap_mode="r+")
            return np.lib.format.open_memmap(staging / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)

        ids, values, rest = (
            array("ids", (n_rows, k), np.int32),
            array("logprobs", (n_rows, k), np.float32),
            array("rest", (n_rows,), np.float32),
        )
        done = array("done", (len(examples),), np.bool_)
        if not resumed:
            tokens = np.concatenate([np.asarray(s) for s in sequences])
            array("tokens", (int(token_offsets[-1]),), np.int32)[:] = tokens
            array("token_offsets", token_offsets.shape, np.int64)[:] = token_offsets
            array("prompt_lengths", (len(examples),), np.int32)[:] = [len(e.prompt) for e in examples]
            array("row_offsets", row_offsets.shape, np.int64)[:] = row_offsets
            done.flush()
            (staging / "plan.json").write_text(json.dumps(plan))  # last: the folder is now resumable
        else:
            log.info("teacher cache %s: resuming: %d of %d examples already scored in %s", out, int(done.sum()),
                     len(examples), staging)

        def mark_done(chosen) -> None:  # rows first, then their flags: a flag never precedes its rows
            for a in (ids, values, rest):
                a.flush()
            done[chosen] = True
            done.flush()

        if served:
            jobs = [(i, sequences[i], len(examples[i].prompt)) for i in range(len(examples)) if not done[i]]
            scored = complete_all(lambda job: teacher.score(job[1], job[2]), jobs, teacher.concurrency)
            for (i, _, _), (top_ids, top_values, top_rest, known) in scored:
                if not known.all():
                    raise DataError(f"cache-teacher: the server gave no distribution over {int((~known).sum())} "
                                    f"response token(s) of example {i} (a BOS that is also the EOS); train from "
                                    "the server directly, which leaves such positions out of the loss")
                where = slice(int(row_offsets[i]), int(row_offsets[i + 1]))
                ids[where], values[where], rest[where] = top_ids[:, :k], top_values[:, :k], top_rest
                if k < top_ids.shape[1]:  # fewer kept than served: the dropped entries join the rest
                    rest[where] = np.logaddexp(top_rest, np.logaddexp.reduce(top_values[:, k:], axis=1))
                mark_done([i])
        order = [] if served else sorted((i for i in range(len(examples)) if not done[i]),
                                         key=lambda i: len(sequences[i]))  # less padding
        device = None if served else weight.device
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            batch = collate([examples[i] for i in chosen], tokenizer.pad_token_id).to(device)
            _, mask = batch.targets()
            hidden = response_hidden(teacher, batch)[mask.bool()]
            rows = np.concatenate([np.arange(row_offsets[i], row_offsets[i + 1]) for i in chosen])
            ids[rows], values[rows], rest[rows] = (x.cpu().numpy() for x in topk_of_hidden(hidden, weight, bias, k))
            mark_done(chosen)
        for name in ("done.npy", "plan.json"):
            (staging / name).unlink()
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "top_k": k,
            "has_rest": k < vocab,
            "vocab_size": vocab,
            "teacher_rows": vocab if served else int(output_head(teacher).weight.shape[0]),
            "examples": len(examples),
            "rows": n_rows,
            "missing_mass": "kept as one 'any other token' outcome; loss = D over the k tokens + the rest",
            **(description or {}),
        }
        (staging / "meta.json").write_text(json.dumps(meta, indent=2))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except DataError:  # a build that cannot succeed as asked: nothing to resume
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("teacher cache %s: %d examples, %d response positions, top-%d", out, len(examples), n_rows, k)
    return out


def _open_partial(staging: Path, plan: dict) -> bool:
    """Whether `staging` holds a stopped build of this very `plan` to resume; any other leftover
    (another build's, or one stopped before its plan was written) is removed."""
    try:
        if json.loads((staging / "plan.json").read_text()) == plan:
            return True
    except (OSError, ValueError):
        pass
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return False


def cache_teacher(
    config, out: str | os.PathLike, top_k: int = 64, responses: str = "dataset", overwrite: bool = False,
    turns: str = "all",
) -> Path:
    """`lmdistill cache-teacher`: the recipe's teacher over the recipe's training data.

    `turns`: which assistant turns of chat data the method trains on (its `Method.turns`), so
    the cached sequences are the ones it will look up.

    `responses="teacher"` first samples one response per prompt from the teacher (at the
    recipe's temperature / top-p, within max_new_tokens and max_length) and caches those.
    """
    from lmdistill.instruct.data import load_training_data, tokenize_examples
    from lmdistill.models import ModelError, load_model, load_tokenizer, precision_dtype, same_vocabulary
    from lmdistill.teacher.responses import teacher_responses

    if not config.teacher:
        raise ModelError("cache-teacher: the recipe has no teacher (config key 'teacher')")
    if responses not in ("dataset", "teacher"):
        raise DataError(f"--responses: expected dataset or teacher, got {responses!r}")
    tokenizer = load_tokenizer(config.student, config.trust_remote_code)
    if is_served(config.teacher):
        from lmdistill.teacher.served import served_teacher

        if responses == "teacher":
            raise DataError("--responses teacher: sample the teacher's responses with `lmdistill generate` "
                            "(it reads servers), then cache them as a dataset")
        teacher = served_teacher(config, tokenizer, top_k)  # its tokens are checked against this tokenizer
    elif not same_vocabulary(tokenizer, load_tokenizer(config.teacher, config.trust_remote_code)):
        raise ModelError(f"cache-teacher: teacher '{config.teacher}' and student '{config.student}' tokenizers differ")
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = precision_dtype(config.precision)
        teacher = load_model(config.teacher, dtype, config.trust_remote_code, device).eval()
    raw = load_training_data(config)
    examples, stats = tokenize_examples(
        raw, tokenizer, config.prompt_format, config.max_prompt_length, config.max_length, turns=turns
    )
    if config.max_train_examples is not None:
        examples = examples[: config.max_train_examples]
    log.info("cache-teacher data %s: %s", config.train_data_path, stats.describe())
    if responses == "teacher":
        torch.manual_seed(config.seed)
        answers = teacher_responses(
            teacher,
            tokenizer,
            examples,
            config.batch_size,
            config.max_new_tokens,
            config.max_length,
            config.temperature,
            config.top_p,
        )
        examples = [
            TokenizedExample(ex.prompt, answer, ex.references, ex.id)
            for ex, answer in zip(examples, answers)
            if answer
        ]
    description = {
        "teacher": config.teacher,
        "data": config.train_data_path,
        "responses": responses,
        "prompt_format": config.prompt_format,
        "max_prompt_length": config.max_prompt_length,
        "max_length": config.max_length,
        "precision": config.precision,
    }
    from transformers import AutoConfig

    from lmdistill.model_zoo import resolve_model
    from lmdistill.models import embedding_rows

    trust = config.trust_remote_code
    student_rows = embedding_rows(AutoConfig.from_pretrained(resolve_model(config.student), trust_remote_code=trust))
    return build_cache(
        teacher, tokenizer, examples, out, top_k, config.batch_size, description, overwrite, student_rows
    )
