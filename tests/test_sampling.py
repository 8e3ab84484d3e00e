"""The KV-cache decoding loop of `sample_responses` against HF `generate` and the model's own distribution."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.generation.logits_process import TopPLogitsWarper

from lmdistill.data import TokenizedExample, collate
from lmdistill.sampling import _next_token, eos_token_ids, sample_responses


@pytest.fixture(scope="module")
def model(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama).eval()


def prompts():
    return collate([TokenizedExample([5, 6, 7, 8, 9], [], []), TokenizedExample([11, 12], [], [])], pad_id=50256,
                   with_responses=False)


def test_greedy_decoding_equals_hf_generate_and_stops_when_every_row_ended(model):
    batch = prompts()
    ours = sample_responses(model, batch, eos_token_id=50256, pad_token_id=50256, max_new_tokens=12, do_sample=False)
    config = GenerationConfig(do_sample=False, max_new_tokens=12, eos_token_id=50256, pad_token_id=50256)
    hf = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, generation_config=config)
    assert torch.equal(ours.input_ids, hf)
    # When the first greedy token of a one-row batch is its EOS, decoding stops after one step.
    one = collate([TokenizedExample([5, 6, 7, 8, 9], [], [])], pad_id=50256, with_responses=False)
    first = int(hf[0, batch.prompt_width])
    stopped = sample_responses(model, one, eos_token_id=first, pad_token_id=50256, max_new_tokens=12, do_sample=False)
    assert stopped.input_ids.shape[1] == one.input_ids.shape[1] + 1 and stopped.response_mask.sum() == 1


def test_samples_follow_the_softmax_and_top_p_matches_hf_warper():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0, -3.0]]).repeat(40_000, 1)
    expected = torch.softmax(logits[0] / 0.7, -1)
    counts = torch.bincount(_next_token(logits, 0.7, 1.0, True), minlength=6).float() / len(logits)
    torch.testing.assert_close(counts, expected, atol=0.01, rtol=0)
    kept = TopPLogitsWarper(0.8)(None, logits[:1] / 0.7).isfinite()[0]
    counts = torch.bincount(_next_token(logits, 0.7, 0.8, True), minlength=6).float() / len(logits)
    assert torch.equal(counts > 0, kept)
    torch.testing.assert_close(counts[kept], expected[kept] / expected[kept].sum(), atol=0.01, rtol=0)


def test_sampled_batch_layout_masks_after_the_first_eos(model):
    torch.manual_seed(0)
    out = sample_responses(model, prompts(), eos_token_id=50256, pad_token_id=50256, max_new_tokens=6)
    P = out.prompt_width
    generated, mask = out.input_ids[:, P:], out.response_mask[:, P:]
    for row in range(2):
        eos = (generated[row] == 50256).nonzero()
        n = int(eos[0]) + 1 if len(eos) else generated.shape[1]
        assert mask[row, :n].all() and not mask[row, n:].any()
    assert torch.equal(out.attention_mask[:, P:], mask)


def test_any_of_several_eos_ids_ends_a_response_as_hf_generate_does(model):
    """Greedy rows whose first tokens differ: with both as EOS ids, each row ends at its own."""
    batch = prompts()
    free = sample_responses(model, batch, 50256, 50256, max_new_tokens=4, do_sample=False)
    P = batch.prompt_width
    firsts = [int(t) for t in free.input_ids[:, P]]
    assert firsts[0] != firsts[1]
    ours = sample_responses(model, batch, firsts, 50256, max_new_tokens=4, do_sample=False)
    assert ours.response_mask[:, P:].sum(1).tolist() == [1, 1] and ours.input_ids.shape[1] == P + 1
    config = GenerationConfig(do_sample=False, max_new_tokens=4, eos_token_id=firsts, pad_token_id=50256)
    hf = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, generation_config=config)
    assert torch.equal(ours.input_ids, hf[:, :P + 1])
    # With n-gram blocking (the HF generate path), the same ids stop the same rows.
    blocked = sample_responses(model, batch, firsts, 50256, max_new_tokens=4, do_sample=False, no_repeat_ngram_size=6)
    assert blocked.response_mask[:, P:].sum(1).tolist() == [1, 1]


def test_eos_token_ids_joins_the_tokenizer_and_the_generation_config(model):
    class Tok:
        eos_token_id = 7

    model.generation_config.eos_token_id = [9, 7, 11]
    try:
        assert eos_token_ids(model, Tok()) == [7, 9, 11]
        model.generation_config.eos_token_id = None
        assert eos_token_ids(model, Tok()) == [7]
    finally:
        model.generation_config.eos_token_id = 50256


@pytest.mark.parametrize("n", [1, 2, 3])
def test_ngram_blocking_in_the_decoding_loop_equals_hf_generate(model, n):
    batch = prompts()
    ours = sample_responses(model, batch, 50256, 50256, max_new_tokens=16, do_sample=False, no_repeat_ngram_size=n)
    config = GenerationConfig(do_sample=False, max_new_tokens=16, eos_token_id=50256, pad_token_id=50256,
                              no_repeat_ngram_size=n)
    hf = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, generation_config=config)
    assert torch.equal(ours.input_ids, hf)


def test_a_soft_prompt_prefix_is_decoded_as_if_its_embeddings_were_tokens(model):
    """Prefix = the embeddings of real tokens: the same greedy continuation as those tokens in the prompt."""
    prefix_ids = [21, 22, 23]
    prefix = model.get_input_embeddings().weight[prefix_ids].detach()
    with_prefix = sample_responses(model, prompts(), 50256, 50256, max_new_tokens=6, do_sample=False, prefix=prefix)
    spelled = collate([TokenizedExample(prefix_ids + [5, 6, 7, 8, 9], [], []),
                       TokenizedExample(prefix_ids + [11, 12], [], [])], pad_id=50256, with_responses=False)
    expected = sample_responses(model, spelled, 50256, 50256, max_new_tokens=6, do_sample=False)
    P, Q = with_prefix.prompt_width, expected.prompt_width
    assert torch.equal(with_prefix.input_ids[:, P:], expected.input_ids[:, Q:])
