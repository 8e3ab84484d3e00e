"""Sampling responses with the KV cache: the one decoding loop every on-policy method, the
evaluation harness and the exposure-bias measure use (encoder-decoders go through HF `generate`)."""

from __future__ import annotations

from typing import Optional, Protocol, Sequence

import torch
from transformers import GenerationConfig

from lmdistill.config import ConfigError
from lmdistill.data import Batch
from lmdistill.decode_step import StaticStep, static_step_supported
from lmdistill.forward import cache_keyword, model_inputs, output_cache


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every token id that ends a response: the tokenizer's EOS and those of the model's
    generation config (chat models often stop at several, e.g. Llama 3's <|eot_id|> and
    <|end_of_text|>; Qwen2.5's <|im_end|> and <|endoftext|>)."""
    ids = []
    config = getattr(getattr(model, "module", model), "generation_config", None)
    for value in (tokenizer.eos_token_id, getattr(config, "eos_token_id", None)):
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation config names an end-of-sequence token")
    return ids


def extra_eos_ids(config, tokenizer) -> list[int]:
    """The ids of the recipe's `eos_tokens`; ConfigError for a token the tokenizer does not have."""
    ids = []
    for token in config.eos_tokens:
        i = tokenizer.convert_tokens_to_ids(token)
        if i is None or i == tokenizer.unk_token_id and token != tokenizer.unk_token:
            raise ConfigError(f"config key 'eos_tokens': {token!r} is not a token of the student's tokenizer",
                              key="eos_tokens")
        ids.append(int(i))
    return ids


class NextTokenMixture(Protocol):
    """A sampling distribution built from the sampled model's next-token log-probs (MiniLLM's
    teacher mixture): called once per decoding step with the step's inputs, told the token drawn."""

    def __call__(self, logprobs: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor) -> torch.Tensor:
        """[B, V] log-probs to sample from, given the model's [B, V] tempered log-probs."""

    def chosen(self, token: torch.Tensor) -> None:
        """The [B] tokens drawn at this step."""


@torch.no_grad()
def sample_responses(
    model,
    prompts: Batch,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    do_sample: bool = True,
    no_repeat_ngram_size: int = 0,
    mixture: Optional[NextTokenMixture] = None,
    prefix: Optional[torch.Tensor] = None,
    vocab_size: Optional[int] = None,
    fast: bool = True,
) -> Batch:
    """Generate one response per prompt with the KV cache; stop at an EOS (`eos_token_id`: one id
    or several, see `eos_token_ids`).

    Returns a Batch in the shared layout whose response_mask covers each response up to
    and including its first EOS (a response cut by `max_new_tokens` has no EOS).
    Sampling is ancestral (top_k disabled) so that on-policy samples follow the model;
    `no_repeat_ngram_size` n bans any token that would repeat an n-gram of prompt + response
    (as HF's NoRepeatNGramLogitsProcessor); `mixture` replaces the model's next-token
    distribution by one built from it; `prefix` [n, H] (a soft prompt) is prepended to every
    prompt's embeddings; `vocab_size` keeps tokens below it (an embedding matrix padded past the
    tokenizer never yields a padding row). Decoder-only models use the loop below, encoder-decoders
    HF `generate`; `fast=False` runs every step through the model's HF forward (the reference
    the static-cache step is tested against).
    """
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                       device=prompts.input_ids.device)
    was_training = model.training
    model.eval()
    P = prompts.prompt_width
    if mixture is not None and prefix is not None:
        raise ValueError("sample_responses: a next-token mixture and a soft-prompt prefix cannot be combined")
    if getattr(model.config, "is_encoder_decoder", False):
        if mixture is not None or prefix is not None:
            raise ValueError("sample_responses: a next-token mixture or a prefix needs a decoder-only model")
        config = GenerationConfig(
            do_sample=do_sample, temperature=temperature if do_sample else None, top_p=top_p if do_sample else None,
            top_k=0 if do_sample else None, max_new_tokens=max_new_tokens, eos_token_id=eos.tolist(),
            pad_token_id=pad_token_id, no_repeat_ngram_size=no_repeat_ngram_size or None, use_cache=True,
        )
        out = model.generate(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask,
                             generation_config=config)
        generated = out[:, P:]
    else:
        generated = _decode(model, prompts, eos, pad_token_id, max_new_tokens, temperature, top_p, do_sample,
                            no_repeat_ngram_size, mixture, prefix, vocab_size, fast)
    model.train(was_training)
    is_eos = torch.isin(generated, eos)
    after_first_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    response_mask = (~after_first_eos).long()
    generated = generated.masked_fill(after_first_eos, pad_token_id)
    return Batch(
        input_ids=torch.cat([prompts.input_ids, generated], dim=1),
        attention_mask=torch.cat([prompts.attention_mask, response_mask], dim=1),
        response_mask=torch.cat([torch.zeros_like(prompts.input_ids), response_mask], dim=1),
        prompt_width=P,
        references=prompts.references,
    )


def _decode(model, prompts: Batch, eos: torch.Tensor, pad_token_id: int, max_new_tokens: int, temperature: float,
            top_p: float, do_sample: bool, no_repeat_ngram_size: int = 0, mixture: Optional[NextTokenMixture] = None,
            prefix: Optional[torch.Tensor] = None, vocab_size: Optional[int] = None,
            fast: bool = True) -> torch.Tensor:
    """New tokens [B, n <= max_new_tokens] with the KV cache, until every row has its EOS.

    The prompt goes through the model's forward; for Llama-family models (`static_step_supported`)
    every later step runs on a static KV cache (`decode_step.StaticStep`: same modules, same
    attention function, bit-identical logits, no per-step HF overhead); `fast=False`, or any other
    model, runs every step through the forward with the HF cache.

    The same distribution as HF `generate` (temperature, then top-p as its TopPLogitsWarper,
    top_k off), drawn by inverse CDF: one uniform number per row instead of the vocabulary
    of exponentials `torch.multinomial` draws, with no per-step processor overhead.
    """
    B = prompts.input_ids.shape[0]
    step_inputs = model_inputs(model, prompts, prefix)  # the prompts (after the prefix, if any) first
    prompt_mask = step_inputs["attention_mask"]
    T = prompt_mask.shape[1]
    # Every column after the prompt is attended (a finished row's padding too, as HF generate
    # does), so the whole mask is known up front; step i reads its first T + i columns.
    full_mask = torch.cat([prompt_mask, prompt_mask.new_ones(B, max_new_tokens)], dim=1)
    next_position = prompt_mask.sum(-1, keepdim=True)  # positions skip left padding, as in training
    finished = torch.zeros(B, dtype=torch.bool, device=prompt_mask.device)
    history = ([row[mask.bool()].tolist() for row, mask in zip(prompts.input_ids, prompts.attention_mask)]
               if no_repeat_ngram_size else None)
    static = StaticStep(model) if fast and static_step_supported(model) else None
    cache_kw = cache_keyword(model)
    cache, tokens, done = None, [], 0
    token = torch.empty(0)  # the last step's tokens (step 0 reads the prompts instead)
    for i in range(max_new_tokens):
        if i > 0 and static is not None:
            if int(finished.sum()) != done:  # drop finished rows from the matrix products
                done = int(finished.sum())
                static.keep(_rows_to_keep(finished))
            if static.rows is None or len(static.rows) == B:
                logits = static.step(token, next_position - 1, T + i)
            else:
                rows = static.rows
                active = static.step(token[rows], next_position[rows] - 1, T + i)
                logits = active.new_zeros(B, active.shape[-1]).index_copy_(0, rows, active)
        else:
            out = model(**step_inputs, **{cache_kw: cache}, use_cache=True, logits_to_keep=1)
            cache = output_cache(out)
            logits = out.logits[:, -1]
            if static is not None:
                if static.load(cache, prompt_mask, T + max_new_tokens):
                    static.pack_weights(B)
                    cache = None
                else:
                    static = None
        logits = logits[:, :vocab_size].float()
        if history is not None:
            _ban_repeated_ngrams(logits, history, no_repeat_ngram_size)
        if mixture is None:
            token = _next_token(logits, temperature, top_p, do_sample)
        else:
            logprobs = torch.log_softmax(logits / temperature, dim=-1)
            token = _draw(mixture(logprobs, **step_inputs).exp())
        token = token.masked_fill(finished, pad_token_id)
        if mixture is not None:
            mixture.chosen(token)
        tokens.append(token)
        if history is not None:
            for row, t in zip(history, token.tolist()):
                row.append(t)
        finished = finished | torch.isin(token, eos)
        if bool(finished.all()):
            break
        step_inputs = dict(input_ids=token[:, None], attention_mask=full_mask[:, :T + i + 1],
                           position_ids=next_position)
        next_position = next_position + 1
    return torch.stack(tokens, 1)


def _rows_to_keep(finished: torch.Tensor) -> torch.Tensor:
    """The unfinished rows' indices, plus finished ones up to two rows: fp32 matrix products of a
    single row take another kernel than those of two or more (different rounding), so a batch
    never shrinks to one row unless it had one."""
    rows = (~finished).nonzero().squeeze(1)
    if len(rows) < min(2, len(finished)):
        spare = finished.nonzero().squeeze(1)[: 2 - len(rows)]
        rows = torch.cat([rows, spare]).sort().values
    return rows


def _ban_repeated_ngrams(logits: torch.Tensor, history: list[list[int]], n: int) -> None:
    """Set to -inf, in place, each row's logits [B, V] of the tokens that would complete an n-gram
    already in that row's token history (HF's no_repeat_ngram_size rule)."""
    for row, seq in enumerate(history):
        if len(seq) + 1 < n:
            continue
        tail = seq[len(seq) - n + 1:]
        banned = [seq[i + n - 1] for i in range(len(seq) - n + 1) if seq[i:i + n - 1] == tail]
        if banned:
            logits[row, banned] = float("-inf")


def _next_token(logits: torch.Tensor, temperature: float, top_p: float, do_sample: bool) -> torch.Tensor:
    """One token per row [B] from float32 logits [B, V]: argmax, or a sample."""
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:  # drop the least likely tokens whose total mass is <= 1 - top_p (at least one stays)
        sorted_probs, order = probs.sort(dim=-1)
        drop = sorted_probs.cumsum(-1) <= 1.0 - top_p
        drop[:, -1] = False
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return _draw(probs)


def _draw(probs: torch.Tensor) -> torch.Tensor:
    """One token per row [B] from (possibly unnormalised) probabilities [B, V], by inverse CDF."""
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)

