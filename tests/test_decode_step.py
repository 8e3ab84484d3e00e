"""The static-cache decoding step (`decode_step.StaticStep`) against the Hugging Face forward it
replaces: bit-identical logits, and through `sample_responses` the same greedy tokens as the
old every-step-through-the-forward loop (`fast=False`) and HF `generate`, with rows dropped
as they finish, in fp32, bf16 and bf16 autocast, for Llama and Qwen2 (attention biases) and
a LoRA-wrapped student."""

import contextlib
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


@pytest.mark.parametrize("rows", [4, 1])
def test_bf16_prepacked_weights_give_the_plain_modules_logits(llama, rows):
    model = llama.to(torch.bfloat16)
    try:
        batch = prompts() if rows == 4 else collate([TokenizedExample([5, 6, 7], [], [])], PAD, with_responses=False)
        T = batch.input_ids.shape[1]
        with torch.no_grad():
            out = model(**{k: v for k, v in dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                                   position_ids=batch.position_ids).items()},
                        **{cache_keyword(model): DynamicCache()}, use_cache=True, logits_to_keep=1)
            steps = []
            for pack in (True, False):
                static = StaticStep(model, pack=pack)
                static.load(output_cache(out), batch.attention_mask, T + 4)
                static.pack_weights(batch.input_ids.shape[0])
                steps.append(static)
            assert steps[0].packed and not steps[1].packed
            token = out.logits[:, -1].argmax(-1)
            position = batch.attention_mask.sum(-1, keepdim=True)
            packed, plain = steps[0]._step(token, position, T + 1), steps[1]._step(token, position, T + 1)
            assert torch.equal(packed, plain)
    finally:
        llama.float()


def test_qwen2_with_attention_biases_decodes_as_the_old_loop():
    model = tiny_qwen2()
    assert static_step_supported(model)
    batch = prompts()
    fast = sample_responses(model, batch, [PAD], PAD, max_new_tokens=10, do_sample=False)
    old = sample_responses(model, batch, [PAD], PAD, max_new_tokens=10, do_sample=False, fast=False)
    assert torch.equal(fast.input_ids, old.input_ids)


def test_a_lora_student_decodes_through_its_adapters(tiny_llama):
    from lmdistill.config import LoraSettings
    from lmdistill.lora import add_adapter

    model = add_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama), LoraSettings(dropout=0.0)).eval()
    with torch.no_grad():  # fresh adapters are zero (B = 0): give them an effect
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    assert static_step_supported(model)
    batch = prompts()
    fast = sample_responses(model, batch, [PAD], PAD, max_new_tokens=8, do_sample=False)
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
