"""Running models on Batches with teacher forcing: the logits or final hidden states that predict
the response tokens, with an optional soft-prompt prefix, and the model's output head."""

from __future__ import annotations

from typing import Optional

import torch

from lmdistill.data import Batch


def response_logits(model, batch: Batch, prefix: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Logits that predict the response tokens: [B, T-P, V] for a batch [B, T] with prompt width P.

    Only the last T-P+1 positions are projected to the vocabulary (`logits_to_keep`), so
    no prompt-position logits are built. `prefix` [n, H] (a soft prompt) is prepended to
    every row's input embeddings; positions continue after it, skipping left padding.
    """
    keep = batch.input_ids.shape[1] - batch.prompt_width + 1
    out = model(**model_inputs(model, batch, prefix), logits_to_keep=keep, use_cache=False)
    return out.logits[:, :-1]


def cache_keyword(model) -> str:
    """The forward keyword that passes a KV cache: `cache` in transformers >= 5.x releases that
    renamed it (passing `past_key_values` there warns on every call), else `past_key_values`."""
    import inspect

    inner = _causal_lm(model)
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def output_cache(out):
    """The KV cache a forward returned, under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def model_inputs(model, batch: Batch, prefix: Optional[torch.Tensor] = None) -> dict:
    """Forward arguments for a batch, with the soft prompt `prefix` [n, H] (if any) prepended."""
    if prefix is None:
        return dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    embed = getattr(model, "module", model).get_input_embeddings()
    tokens = embed(batch.input_ids)
    B, n = batch.input_ids.shape[0], prefix.shape[0]
    inputs = torch.cat([prefix.to(tokens.dtype).unsqueeze(0).expand(B, -1, -1), tokens], dim=1)
    mask = torch.cat([batch.attention_mask.new_ones(B, n), batch.attention_mask], dim=1)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return dict(inputs_embeds=inputs, attention_mask=mask, position_ids=positions)


def response_hidden(model, batch: Batch, prefix: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Final hidden states that predict the response tokens: [B, T-P, H] for a batch [B, T].

    `response_logits` is `output_head(model)` applied to these; `lmdistill.losses.chunked` projects
    them to the vocabulary a few rows at a time instead, so no [B, T, V] logits exist.
    The backbone (`model.base_model`: the decoder stack with its final norm) runs without
    the LM head. A DDP-wrapped model is still entered through its wrapper's forward, so
    that gradient synchronisation is set up (the forward-redirection trick of Lightning/TRL).

    The batch layout pads prompts to P and responses to R, so a row is P + R wide although
    no row needs more than max(prompt + response); without a soft prompt the backbone runs
    on the rows left-padded as whole sequences instead (same positions, same attention,
    hence the same hidden states) and the response positions are gathered back.
    """
    inner = _causal_lm(model)
    backbone = inner.base_model
    if backbone is inner or getattr(inner.config, "is_encoder_decoder", False):
        raise ValueError(f"response_hidden: {type(inner).__name__} has no separate decoder backbone; "
                         "use response_logits for this model")
    shift = _whole_sequence_shift(batch) if prefix is None else None
    if shift is None:
        hidden = _backbone(model, model_inputs(model, batch, prefix))
        P = batch.prompt_width + (0 if prefix is None else prefix.shape[0])
        return hidden[:, P - 1:-1]
    T = batch.input_ids.shape[1]
    lengths = batch.attention_mask.sum(1, keepdim=True)
    width = int(lengths.max())
    columns = torch.arange(width, device=shift.device).unsqueeze(0)
    source = (columns - shift.unsqueeze(1)).clamp(0, T - 1)  # [B, width]: which batch column each compact one holds
    attention = (columns >= width - lengths).long()
    hidden = _backbone(model, dict(input_ids=batch.input_ids.gather(1, source), attention_mask=attention,
                                   position_ids=(attention.cumsum(-1) - 1).clamp(min=0)))
    # Back to the batch layout: column P - 1 + j predicts response token j.
    wanted = torch.arange(batch.prompt_width - 1, T - 1, device=shift.device).unsqueeze(0) + shift.unsqueeze(1)
    wanted = wanted.clamp(0, width - 1).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return hidden.gather(1, wanted)


def _backbone(model, inputs: dict) -> torch.Tensor:
    """Final hidden states [B, T, H] of the decoder stack, through a DDP wrapper's forward if any."""
    inner = getattr(model, "module", model)
    backbone = _causal_lm(model).base_model
    if inner is model:
        return backbone(**inputs, use_cache=False).last_hidden_state
    original_forward = inner.forward

    def backbone_forward(**kwargs):
        inner.forward = original_forward
        return backbone(**kwargs)

    inner.forward = backbone_forward
    try:
        return model(**inputs, use_cache=False).last_hidden_state
    finally:
        inner.forward = original_forward


def _causal_lm(model) -> torch.nn.Module:
    """The Hugging Face model inside a DDP and/or peft (LoRA) wrapper; a LoRA student's adapted
    layers sit inside it, so its `base_model` (the decoder stack) runs them."""
    inner = getattr(model, "module", model)
    return inner.get_base_model() if hasattr(inner, "peft_config") else inner


def output_head(model) -> torch.nn.Module:
    """The layer mapping final hidden states to logits (`lm_head`), checked to be a plain
    projection: models that rescale or cap logits (Gemma-2 softcapping, Cohere logit_scale)
    would give different logits from `response_hidden` + this head, so they are refused."""
    inner = _causal_lm(model)
    config = inner.config
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling"):
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise ValueError(f"output_head: {type(inner).__name__} applies {name}={value} to its logits; "
                             "the chunked loss supports plain linear heads only")
    return inner.get_output_embeddings()


def _whole_sequence_shift(batch: Batch) -> Optional[torch.Tensor]:
    """Per row, how far right its tokens move when the rows are left-padded as whole
    sequences ([B]); None when that saves no width or a row's tokens are not contiguous."""
    attention = batch.attention_mask.bool()
    lengths = attention.sum(1)
    width = int(lengths.max())
    if width == attention.shape[1]:
        return None
    columns = torch.arange(attention.shape[1], device=attention.device)
    first = torch.where(attention, columns, attention.shape[1]).min(1).values
    last = torch.where(attention, columns, -1).max(1).values
    if bool((last - first + 1 != lengths).any()):
        return None
    return (width - lengths) - first

