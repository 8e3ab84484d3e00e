"""Running models on Batches: response logits (teacher forcing) and sampled responses."""

from __future__ import annotations

from typing import Optional

import torch
from transformers import GenerationConfig

from lmdistill.data import Batch


def response_logits(model, batch: Batch, prefix: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Logits that predict the response tokens: [B, T-P, V] for a batch [B, T] with prompt width P.

    Only the last T-P+1 positions are projected to the vocabulary (`logits_to_keep`), so
    no prompt-position logits are built. `prefix` [n, H] (a soft prompt) is prepended to
    every row's input embeddings; positions continue after it, skipping left padding.
    """
    P = batch.prompt_width
    T = batch.input_ids.shape[1]
    keep = T - P + 1
    if prefix is None:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids, logits_to_keep=keep, use_cache=False)
    else:
        embed = model.get_input_embeddings()
        tokens = embed(batch.input_ids)
        B, n = batch.input_ids.shape[0], prefix.shape[0]
        inputs = torch.cat([prefix.to(tokens.dtype).unsqueeze(0).expand(B, -1, -1), tokens], dim=1)
        mask = torch.cat([batch.attention_mask.new_ones(B, n), batch.attention_mask], dim=1)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        out = model(inputs_embeds=inputs, attention_mask=mask, position_ids=positions,
                    logits_to_keep=keep, use_cache=False)
    return out.logits[:, :-1]


@torch.no_grad()
def sample_responses(
    model,
    prompts: Batch,
    eos_token_id: int,
    pad_token_id: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    do_sample: bool = True,
    no_repeat_ngram_size: int = 0,
) -> Batch:
    """Generate one response per prompt with the KV cache; stop at EOS.

    Returns a Batch in the shared layout whose response_mask covers each response up to
    and including its first EOS (a response cut by `max_new_tokens` has no EOS).
    Sampling is ancestral (top_k disabled) so that on-policy samples follow the model.
    """
    was_training = model.training
    model.eval()
    config = GenerationConfig(
        do_sample=do_sample, temperature=temperature if do_sample else None, top_p=top_p if do_sample else None,
        top_k=0 if do_sample else None, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, no_repeat_ngram_size=no_repeat_ngram_size or None, use_cache=True,
    )
    out = model.generate(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask, generation_config=config)
    model.train(was_training)
    P = prompts.prompt_width
    generated = out[:, P:]
    is_eos = generated == eos_token_id
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
