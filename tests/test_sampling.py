"""The KV-cache decoding loop of `sample_responses` against HF `generate` and the model's own distribution."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.generation.logits_process import TopPLogitsWarper

from lmdistill.data import TokenizedExample, collate
from lmdistill.sampling import _next_token, sample_responses


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
