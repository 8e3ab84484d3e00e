"""One decoding step of a Llama-family model (Llama, SmolLM2, Qwen2/2.5, Mistral) on a static
KV cache: the per-step work of `sampling._decode` without the Hugging Face forward's overhead.

Why: at batch 1-8 a decoding step of a small model is a few hundred tiny ops whose cost is
dispatch and allocation, plus matrix-vector products that read every weight once. HF's
forward builds an attention mask, a position tensor, a growing `DynamicCache` (a `torch.cat`
per layer) and output dataclasses every step. Here the cache is allocated once for the
whole response, the mask once, and each layer runs the model's own modules (projections,
norms, MLP: so LoRA layers and any weight dtype work unchanged) with the model's own rotary
embedding and the same `sdpa` attention function HF calls, on the same tensors, so the
logits are bit-identical to the HF forward's (tests/test_decode_step.py).

bf16 matrix-vector products are slow in the default oneDNN path at batch <= 8 on CPU; a
plain `nn.Linear` in bf16 (weights in bf16, or fp32 under bf16 autocast) is run from a
weight prepacked for oneDNN (`torch.ops.mkldnn._reorder_linear_weight`) instead, which is
the kernel `F.linear` uses with a blocked layout computed once per response instead of per
call. With packed weights a layer also runs in fewer ops: one product for q|k|v and one for
gate|up (their weights concatenated; each output element is the same dot product), RMSNorm as
`F.rms_norm` in fp32 (HF's pow-mean-rsqrt in one op) and the rotary embedding on q and k at
once. The first step's logits are checked bit-equal to those of the plain modules; if the fused
layer differs, the unfused packed one is tried, else the plain modules are used.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

_SUPPORTED_ATTENTION = ("LlamaAttention", "Qwen2Attention", "MistralAttention")
# RMSNorms computing weight * (x_fp32 * rsqrt(mean(x_fp32^2) + eps)).to(x.dtype), as F.rms_norm does
_PLAIN_RMS_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm")


def _causal_lm(model) -> nn.Module:
    inner = getattr(model, "module", model)
    return inner.get_base_model() if hasattr(inner, "peft_config") else inner


def static_step_supported(model) -> bool:
    """Whether `StaticStep` reproduces this model's forward: a decoder-only Llama-family model
    with `sdpa` attention, full attention in every layer and no extra per-layer features."""
    lm = _causal_lm(model)
    config = getattr(lm, "config", None)
    base = getattr(lm, "model", None)
    if config is None or base is None or getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or [])):
        return False
    if getattr(config, "use_sliding_window", False):
        return False
    layers = getattr(base, "layers", None)
    if not layers or not all(hasattr(base, a) for a in ("embed_tokens", "rotary_emb", "norm")):
        return False
    if getattr(lm, "lm_head", None) is None:
        return False
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        if type(attn).__name__ not in _SUPPORTED_ATTENTION or type(layer).__name__.replace(
                "DecoderLayer", "Attention") != type(attn).__name__:
            return False
        if not all(hasattr(layer, a) for a in ("input_layernorm", "post_attention_layernorm", "mlp")):
            return False
        if any(hasattr(attn, a) for a in ("q_norm", "k_norm")):
            return False
    return True


class StaticStep:
    """Decoding steps on a KV cache of `length` positions for a batch of `batch` rows.

    `load(cache)` copies the prompt's keys and values from the `DynamicCache` of the HF prefill
    forward; then `step(tokens [B], positions [B, 1], attention [B, >= t])` appends one token
    per row (its key at column t-1, t = the number of columns of `attention` in use) and
    returns the next-token logits [B, V].
    """

    def __init__(self, model, pack: bool = True):
        lm = _causal_lm(model)
        self.lm, self.base = lm, lm.model
        self.layers = list(self.base.layers[: lm.config.num_hidden_layers])
        attn = self.layers[0].self_attn
        modeling = sys.modules[type(attn).__module__]
        self.apply_rope = modeling.apply_rotary_pos_emb
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        self.attention = ALL_ATTENTION_FUNCTIONS["sdpa"]
        self.head_dim = attn.head_dim
        self.pack = pack
        self.pack_rows = 0  # the row count the weights were packed for
        self.packed: dict[nn.Module, tuple] = {}  # module -> (packed weight, bias, dtype)
        self.fused: list[dict] = []  # per layer: {"qkv": packed, "gate_up": packed} (entries may be missing)
        self.verified = False
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.mask: Optional[torch.Tensor] = None
        self.rows: Optional[torch.Tensor] = None  # the batch rows the cache holds (None: all)

    def load(self, cache, attention: torch.Tensor, length: int) -> bool:
        """Copy the prefill cache into buffers of `length` positions; False when the cache is
        not the expected per-layer (keys, values) layout."""
        layers = getattr(cache, "layers", None)
        pairs = ([(getattr(c, "keys", None), getattr(c, "values", None)) for c in layers] if layers is not None
                 else list(zip(getattr(cache, "key_cache", []), getattr(cache, "value_cache", []))))
        if len(pairs) != len(self.layers) or any(k is None or v is None or k.dim() != 4 for k, v in pairs):
            return False
        t = attention.shape[1]
        if any(k.shape[2] != t for k, _ in pairs):
            return False
        for k, v in pairs:
            B, H, _, D = k.shape
            keys = k.new_empty(B, H, length, D)
            values = v.new_empty(B, H, length, v.shape[-1])
            keys[:, :, :t] = k
            values[:, :, :t] = v
            self.keys.append(keys)
            self.values.append(values)
        # The HF mask: none when no column is padding (every later column is attended), else
        # a boolean [B, 1, 1, t] view of the row mask.
        self.mask = None if bool(attention.all()) else attention.new_ones(attention.shape[0], length).bool()
        if self.mask is not None:
            self.mask[:, :t] = attention.bool()
            self.mask = self.mask[:, None, None, :]
        return True

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows `rows` (indices into the original batch, ascending) in the cache:
        later steps take and return those rows only. A row's logits do not depend on which other
        rows share its matrix products (bf16 at any row count, fp32 at >= 2 rows: checked in
        tests/test_decode_step.py), so a caller that keeps >= 2 rows gets the same logits."""
        local = rows if self.rows is None else torch.searchsorted(self.rows, rows)
        self.keys = [k.index_select(0, local) for k in self.keys]
        self.values = [v.index_select(0, local) for v in self.values]
        if self.mask is not None:
            self.mask = self.mask.index_select(0, local)
        self.rows = rows

    def linear(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        packed = self.packed.get(module)
        if packed is None:
            return module(x)
        return _packed_linear(packed, x)

    def pack_weights(self, batch: int, fuse: bool = True) -> None:
        """Prepack every plain bf16 `nn.Linear` (bf16 weights, or fp32 ones under bf16 autocast);
        with `fuse`, q|k|v and gate|up of each layer as one product each. The packed copy of the
        weights costs their bf16 size in memory for the duration of the call. At one row it
        measured as fast as the plain modules on one CPU and 1.75x faster on another
        (docs/results.md, issue 25), so one row is packed too."""
        if not self.pack or not torch.backends.mkldnn.is_available():
            return
        self.pack_rows = batch
        autocast_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16

        def pack(modules: list) -> Optional[tuple]:
            """One packed product of `modules` (outputs concatenated), or None if any is not a plain bf16 Linear."""
            weights, biases = [], []
            for module in modules:
                if type(module) is not nn.Linear or module.weight.device.type != "cpu":
                    return None
                weight = module.weight
                if weight.dtype == torch.float32 and autocast_bf16:
                    weight = weight.to(torch.bfloat16)
                if weight.dtype != torch.bfloat16:
                    return None
                weights.append(weight.detach())
                biases.append(module.bias)
            if any(b is None for b in biases) and not all(b is None for b in biases):
                return None
            weight = weights[0] if len(weights) == 1 else torch.cat(weights)
            bias = None if biases[0] is None else torch.cat([b.detach().to(torch.bfloat16) for b in biases])
            return torch.ops.mkldnn._reorder_linear_weight(weight, batch), bias, torch.bfloat16

        singles = [self.lm.lm_head]
        self.fused = []
        for layer in self.layers:
            a, m = layer.self_attn, layer.mlp
            fused = {}
            qkv = [a.q_proj, a.k_proj, a.v_proj]
            if fuse and (packed := pack(qkv)) is not None:
                fused["qkv"] = packed
            else:
                singles += qkv
            singles.append(a.o_proj)
            if _gated_mlp(m):
                if fuse and (packed := pack([m.gate_proj, m.up_proj])) is not None:
                    fused["gate_up"] = packed
                else:
                    singles += [m.gate_proj, m.up_proj]
                singles.append(m.down_proj)
            self.fused.append(fused)
        for module in singles:
            if (packed := pack([module])) is not None:
                self.packed[module] = packed
        if not fuse or not (self.packed or any(self.fused)):
            self.fused = []  # the fused layer runs only after the first step's check, which needs a packed product

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, t: int) -> torch.Tensor:
        """Logits [B, V] after appending `tokens` [B] at `positions` [B, 1]; the cache then holds t columns.
        The first step with packed weights also runs the plain modules and keeps the packed (fused,
        else unfused) layer only if it gives the same logits bit for bit."""
        if self.verified or not (self.packed or self.fused):
            return self._step(tokens, positions, t)
        self.verified = True
        fast, (self.packed, self.fused) = (self.packed, self.fused), ({}, [])
        plain = self._step(tokens, positions, t)
        self.packed, self.fused = fast
        if torch.equal(self._step(tokens, positions, t), plain):
            return plain
        if self.fused:
            self.packed, self.fused = {}, []
            self.pack_weights(self.pack_rows, fuse=False)
            if torch.equal(self._step(tokens, positions, t), plain):
                return plain
        self.packed, self.fused = {}, []
        return self._step(tokens, positions, t)  # rewrites this step's cache column

    def _step(self, tokens: torch.Tensor, positions: torch.Tensor, t: int) -> torch.Tensor:
        hidden = self.base.embed_tokens(tokens[:, None])
        cos, sin = self.base.rotary_emb(hidden, position_ids=positions)
        mask = None if self.mask is None else self.mask[..., :t]
        if self.fused:
            # rotate_half(x) * sin == x[..., swapped halves] * sin_signed: the same products
            half = cos.shape[-1] // 2
            sin_signed = torch.cat([-sin[..., :half], sin[..., half:]], -1)[:, :, None]
            rope = (cos[:, :, None], sin_signed, half)
        for i, (layer, keys, values) in enumerate(zip(self.layers, self.keys, self.values)):
            if self.fused:
                hidden = self._fused_layer(layer, self.fused[i], hidden, rope, keys, values, mask, t)
            else:
                hidden = self._layer(layer, hidden, cos, sin, keys, values, mask, t)
        hidden = _rms_norm(self.base.norm, hidden) if self.fused else self.base.norm(hidden)
        return self.linear(self.lm.lm_head, hidden)[:, -1]

    def _layer(self, layer, hidden, cos, sin, keys, values, mask, t: int) -> torch.Tensor:
        """One decoder layer as HF's forward runs it (products packed where `self.packed` holds them)."""
        B, attn = hidden.shape[0], layer.self_attn
        residual = hidden
        h = layer.input_layernorm(hidden)
        q = self.linear(attn.q_proj, h).view(B, 1, -1, self.head_dim).transpose(1, 2)
        k = self.linear(attn.k_proj, h).view(B, 1, -1, self.head_dim).transpose(1, 2)
        v = self.linear(attn.v_proj, h).view(B, 1, -1, self.head_dim).transpose(1, 2)
        q, k = self.apply_rope(q, k, cos, sin)
        keys[:, :, t - 1:t] = k
        values[:, :, t - 1:t] = v
        out, _ = self.attention(attn, q, keys[:, :, :t], values[:, :, :t], mask, dropout=0.0, scaling=attn.scaling)
        hidden = residual + self.linear(attn.o_proj, out.reshape(B, 1, -1).contiguous())
        residual = hidden
        h = layer.post_attention_layernorm(hidden)
        return residual + self._mlp(layer.mlp, h)

    def _fused_layer(self, layer, fused: dict, hidden, rope, keys, values, mask, t: int) -> torch.Tensor:
        """`_layer` in fewer ops: one q|k|v product, one gate|up product, F.rms_norm, q and k rotated together."""
        B, attn = hidden.shape[0], layer.self_attn
        h = _rms_norm(layer.input_layernorm, hidden)
        if "qkv" in fused:
            qkv = _packed_linear(fused["qkv"], h)
        else:
            qkv = torch.cat([self.linear(p, h) for p in (attn.q_proj, attn.k_proj, attn.v_proj)], -1)
        qkv = qkv.view(B, 1, -1, self.head_dim)
        cos, sin_signed, half = rope
        kv_heads = keys.shape[1]
        q_heads = qkv.shape[2] - 2 * kv_heads
        qk = qkv[:, :, :q_heads + kv_heads]
        qk = qk * cos + torch.roll(qk, half, -1) * sin_signed
        keys[:, :, t - 1:t] = qk[:, :, q_heads:].transpose(1, 2)
        values[:, :, t - 1:t] = qkv[:, :, q_heads + kv_heads:].transpose(1, 2)
        q = qk[:, :, :q_heads].transpose(1, 2)
        out, _ = self.attention(attn, q, keys[:, :, :t], values[:, :, :t], mask, dropout=0.0, scaling=attn.scaling)
        hidden = hidden + self.linear(attn.o_proj, out.reshape(B, 1, -1).contiguous())
        h = _rms_norm(layer.post_attention_layernorm, hidden)
        return hidden + self._mlp(layer.mlp, h, fused.get("gate_up"))

    def _mlp(self, mlp: nn.Module, h: torch.Tensor, gate_up: Optional[tuple] = None) -> torch.Tensor:
        """down(act(gate(h)) * up(h)) with the packed products there are (`gate_up`: both in one), else the module."""
        if gate_up is not None:
            gate, up = _packed_linear(gate_up, h).chunk(2, -1)
        elif self.packed and _gated_mlp(mlp):
            gate, up = self.linear(mlp.gate_proj, h), self.linear(mlp.up_proj, h)
        else:
            return mlp(h)
        return self.linear(mlp.down_proj, mlp.act_fn(gate) * up)


def _gated_mlp(mlp: nn.Module) -> bool:
    """A Llama-family MLP: down_proj(act_fn(gate_proj(x)) * up_proj(x))."""
    return type(mlp).__name__.endswith("MLP") and all(hasattr(mlp, a) for a in ("act_fn", "gate_proj", "up_proj",
                                                                                  "down_proj"))


def _packed_linear(packed: tuple, x: torch.Tensor) -> torch.Tensor:
    weight, bias, dtype = packed
    return torch.ops.mkldnn._linear_pointwise(x.to(dtype), weight, bias, "none", [], "")


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """HF's Llama-family RMSNorm in one op (other norms: the module itself)."""
    if type(norm).__name__ not in _PLAIN_RMS_NORMS or not hasattr(norm, "variance_epsilon"):
        return norm(x)
    return norm.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=norm.variance_epsilon).to(x.dtype)
