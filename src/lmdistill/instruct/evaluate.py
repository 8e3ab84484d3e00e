"""One evaluation harness for every method: generate, score ROUGE-L, average over seeds.

Defaults follow the PromptKD/MiniLLM evaluation: sampling with temperature 1 and top-p 1,
no repeated 6-grams, prompts cut to their first 256 tokens, at most 256 new tokens and 512
tokens of prompt + response; ROUGE-L F1 x 100 from `rouge-score` with stemming, the max over
references; mean +- std over seeds.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from lmdistill.data import TokenizedExample, collate
from lmdistill.instruct.data import InstructionExample, load_instruction_data, prompt_ids
from lmdistill.sampling import eos_token_ids, sample_responses
from lmdistill.models import model_for_inference


@dataclass
class GenerationSettings:
    """How responses are generated for evaluation."""

    greedy: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    no_repeat_ngram_size: int = 6
    max_prompt_length: int = 256          # longer prompts keep their first 256 tokens, as MiniLLM's data
    max_length: int = 512                 # prompt + response tokens, as MiniLLM's evaluation
    max_new_tokens: Optional[int] = 256   # responses: at most 256 tokens (None: up to max_length)
    # A decoding step reads every weight once whatever the batch, so on CPU 32 rows cost ~2.5x
    # a step of 8 (bench/decode.py, docs/results.md) and finished rows leave the batch.
    batch_size: int = 32


_scorer = None


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F1 x 100 (rouge-score, Porter stemming), the max over references."""
    global _scorer
    if _scorer is None:
        from rouge_score import rouge_scorer

        _scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return 100.0 * max(_scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references)


@torch.no_grad()
def generate_responses(model, tokenizer, examples: Sequence[InstructionExample], prompt_format: str = "auto",
                       settings: GenerationSettings = GenerationSettings(), seed: int = 0,
                       progress=None) -> list[str]:
    """One response per example, its prompt built in `prompt_format` (see `generate_from_ids`)."""
    prompts = [prompt_ids(ex, tokenizer, prompt_format) for ex in examples]
    return generate_from_ids(model, tokenizer, prompts, settings, seed, progress)


@torch.no_grad()
def generate_from_ids(model, tokenizer, prompts: Sequence[list[int]],
                      settings: GenerationSettings = GenerationSettings(), seed: int = 0, progress=None) -> list[str]:
    """One decoded response per prompt (token ids, cut to their first `max_prompt_length`), batched
    with left padding, batches sorted by prompt length. `progress`: a tqdm bar advanced by one per
    prompt (or None)."""
    device = next(model.parameters()).device
    prompts = [list(p)[:settings.max_prompt_length] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    responses: list[str] = [""] * len(prompts)
    eos_ids = eos_token_ids(model, tokenizer)
    torch.manual_seed(seed)
    batches = [order[i:i + settings.batch_size] for i in range(0, len(order), settings.batch_size)]
    for idx in batches:
        batch = collate([TokenizedExample(prompts[i], [], []) for i in idx], tokenizer.pad_token_id,
                        with_responses=False).to(device)
        room = settings.max_length - batch.prompt_width
        if settings.max_new_tokens is not None:
            room = min(room, settings.max_new_tokens)
        if room <= 0:
            continue
        out = sample_responses(model, batch, eos_ids, tokenizer.pad_token_id, room,
                               settings.temperature, settings.top_p, do_sample=not settings.greedy,
                               no_repeat_ngram_size=settings.no_repeat_ngram_size, vocab_size=len(tokenizer))
        for row, i in enumerate(idx):
            tokens = out.input_ids[row, out.prompt_width:][out.response_mask[row, out.prompt_width:].bool()]
            responses[i] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
        if progress is not None:
            progress.update(len(idx))
    return responses


@dataclass
class EvalResult:
    dataset: str
    n: int
    seeds: list[int]
    per_seed: list[float]
    samples: list[dict] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.per_seed)

    @property
    def std(self) -> float:
        return statistics.pstdev(self.per_seed) if len(self.per_seed) > 1 else 0.0

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "n": self.n, "seeds": self.seeds, "rougeL_per_seed": self.per_seed,
                "rougeL_mean": self.mean, "rougeL_std": self.std, "samples": self.samples}


def evaluate(model, data: str | Sequence[str], tokenizer=None, max_examples: Optional[int] = None,
             seeds: Sequence[int] = (10,), prompt_format: str = "auto",
             settings: GenerationSettings = GenerationSettings(), progress: bool = True,
             keep_samples: int = 5, desc: str = "evaluate",
             dtype: torch.dtype = torch.float32) -> dict[str, EvalResult]:
    """ROUGE-L of `model` (a model object, or a spec: folder / Hub id / alias, loaded in `dtype`) on
    each data file; `progress` shows one bar over all prompts x seeds, with its ETA."""
    from tqdm.auto import tqdm

    model, tokenizer = model_for_inference(model, tokenizer, "evaluate", dtype)
    results = {}
    sets = {path: load_instruction_data(path, split="validation", limit=max_examples)
            for path in ([data] if isinstance(data, str) else data)}
    bar = tqdm(total=sum(len(e) for e in sets.values()) * len(seeds), desc=desc, unit="prompt", disable=not progress,
               dynamic_ncols=True)
    for path, examples in sets.items():
        per_seed, samples = [], []
        for seed in seeds:
            preds = generate_responses(model, tokenizer, examples, prompt_format, settings, seed, bar)
            scores = [rouge_l(p, ex.references) for p, ex in zip(preds, examples)]
            per_seed.append(statistics.fmean(scores))
            if not samples:
                samples = [{"prompt": ex.instruction, "response": p, "reference": ex.references[0], "rougeL": s}
                           for ex, p, s in list(zip(examples, preds, scores))[:keep_samples]]
        results[dataset_name(path)] = EvalResult(dataset_name(path), len(examples), list(seeds), per_seed, samples)
    bar.close()
    return results


def dataset_name(path: str) -> str:
    """'.../instruct/dolly/valid.jsonl' -> 'dolly'; a Hub id stays as it is."""
    p = Path(path)
    return p.parent.name if p.suffix in (".jsonl", ".json") and p.parent.name else str(path)


def write_results(results: dict[str, EvalResult], out: str | Path) -> None:
    Path(out).write_text(json.dumps({k: r.to_dict() for k, r in results.items()}, indent=2))


def format_cell(result: EvalResult) -> str:
    """'mean ± std' over seeds; the mean alone for one seed (a spread of 0 would claim a
    precision nobody measured)."""
    return f"{result.mean:.2f}" if len(result.per_seed) == 1 else f"{result.mean:.2f} ± {result.std:.2f}"


def format_table(rows: dict[str, dict[str, EvalResult]]) -> str:
    """Markdown table: one row per model, one column per dataset, `format_cell` each."""
    datasets = sorted({d for r in rows.values() for d in r})
    lines = ["| model | " + " | ".join(datasets) + " |", "|---|" + "---|" * len(datasets)]
    for name, results in rows.items():
        cells = [format_cell(results[d]) if d in results else "-" for d in datasets]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
