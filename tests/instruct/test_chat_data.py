"""Chat data (`messages`): rendered with the chat template, the loss on assistant tokens only,
checked token by token against the ChatML structure of SmolLM2's template; the layouts for
off-policy (every assistant turn) and sampling methods (the last turn); malformed
conversations named by file, line and message index."""

import json

import pytest
import torch

from kd_testing import make_trainer, objective_drops
from lmdistill.data import DataError
from lmdistill.instruct.data import load_instruction_data, tokenize_examples

CONVERSATIONS = [
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris is the capital of France."},
     {"role": "user", "content": "And of Japan? Answer with naïve café-style flair 🙂"},
     {"role": "assistant", "content": "Tokyo  is Japan's capital,\n\nof course."}],
    [{"role": "user", "content": "Name a prime number."},
     {"role": "assistant", "content": "7"},
     {"role": "user", "content": "Another one, please."},
     {"role": "assistant", "content": "Eleven, which is 11."},
     {"role": "user", "content": "Thanks!"},
     {"role": "assistant", "content": "You're welcome."}],
]


@pytest.fixture(scope="module")
def chat_tokenizer():
    from lmdistill.model_zoo import resolve_model
    from lmdistill.models import load_tokenizer

    return load_tokenizer(resolve_model("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def tiny_chat_models(tmp_path_factory, chat_tokenizer):
    """Random tiny Llamas over SmolLM2's vocabulary and chat template (teacher, student)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folders = []
    for name, layers, seed in [("teacher", 2, 0), ("student", 1, 1)]:
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=len(chat_tokenizer), hidden_size=32, intermediate_size=64,
                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                             tie_word_embeddings=True, eos_token_id=chat_tokenizer.eos_token_id,
                             pad_token_id=chat_tokenizer.pad_token_id)
        folder = tmp_path_factory.mktemp(name)
        LlamaForCausalLM(config).save_pretrained(folder)
        chat_tokenizer.save_pretrained(folder)
        folders.append(folder)
    return folders


@pytest.fixture
def chat_file(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS))
    return path


def chatml_assistant_mask(ids, tok):
    """Independent reference: walk the ChatML structure; an assistant turn's tokens run from
    after `<|im_start|>assistant\\n` through its `<|im_end|>`."""
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    header = tok("assistant\n", add_special_tokens=False)["input_ids"]
    mask, inside, t = [0] * len(ids), False, 0
    while t < len(ids):
        if not inside and ids[t] == start and ids[t + 1: t + 1 + len(header)] == header:
            inside, t = True, t + 1 + len(header)
            continue
        if inside:
            mask[t] = 1
            inside = ids[t] != end
        t += 1
    return mask


def test_the_masks_cover_exactly_the_assistant_tokens(chat_file, chat_tokenizer):
    tok = chat_tokenizer
    examples = load_instruction_data(str(chat_file))
    for turns in ("all", "last"):
        tokenized, stats = tokenize_examples(examples, tok, "auto", 512, 1024, turns=turns)
        assert stats.kept == 2
        for example, conversation in zip(tokenized, CONVERSATIONS):
            ids = example.prompt + example.response
            assert ids == tok(tok.apply_chat_template(conversation, tokenize=False),
                              add_special_tokens=False)["input_ids"][: len(ids)]
            expected = chatml_assistant_mask(ids, tok)
            got = [0] * len(example.prompt) + (example.response_mask or [1] * len(example.response))
            if turns == "last":  # only the last turn; the earlier ones are context in the prompt
                last = max(i for i, m in enumerate(expected) if m == 0) + 1 if expected[-1] == 1 else len(expected)
                expected = [m if i >= last else 0 for i, m in enumerate(expected)]
                assert example.response_mask == [1] * len(example.response)
                assert tok.decode(example.response) == conversation[-1]["content"] + "<|im_end|>"
                assert tok.decode(example.prompt).endswith("<|im_start|>assistant\n")
            assert got == expected, turns
            # and, decoded, the trained tokens are the assistant contents, each closed by <|im_end|>
            runs, current = [], []
            for token, m in zip(ids, got):
                if m:
                    current.append(token)
                elif current:
                    runs.append(current)
                    current = []
            runs += [current] if current else []
            wanted = [m["content"] for m in conversation if m["role"] == "assistant"]
            assert [tok.decode(r) for r in runs] == [w + "<|im_end|>" for w in (wanted if turns == "all" else
                                                                              wanted[-1:])]


@pytest.mark.parametrize("bad, message", [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]},
     "message 1: unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ["yo"]}]},
     "message 1: field 'content': expected a string, got list"),
    ({"messages": "hi"}, "field 'messages': expected a non-empty list"),
])
def test_malformed_conversations_are_named_by_file_line_and_message(bad, message, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATIONS[0]}) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=f"bad.jsonl:2: .*{message}"):
        load_instruction_data(str(path))


def test_kd_trains_on_every_assistant_turn_and_gkd_samples_the_last(tiny_chat_models, chat_file, chat_tokenizer,
                                                                    tmp_path):
    teacher, student = tiny_chat_models
    kd = make_trainer("kd", teacher, student, chat_file, tmp_path / "kd", precision="fp32", prompt_format="chat",
                      max_length=256, max_prompt_length=200, kd_ratio=1.0)
    batch = kd.micro_batches()[0]
    _, mask = batch.targets()
    inside = batch.attention_mask[:, batch.prompt_width:].bool()
    assert bool((inside & ~mask.bool()).any()), "user turns inside the response block are attended, not trained"
    before, after = objective_drops(kd, batch, lambda b: kd.method.loss(b, 0)[0])
    assert after < before
    gkd = make_trainer("gkd", teacher, student, chat_file, tmp_path / "gkd", precision="fp32", prompt_format="chat",
                       max_length=256, max_prompt_length=200, lmbda=1.0)
    batch = gkd.micro_batches()[0]
    for row in range(batch.input_ids.shape[0]):  # the prompt holds the earlier turns, up to the last reply
        prompt = batch.input_ids[row, : batch.prompt_width][batch.attention_mask[row, : batch.prompt_width].bool()]
        text = chat_tokenizer.decode(prompt)
        assert text.endswith("<|im_start|>assistant\n") and text.count("<|im_start|>assistant") >= 2
    work = gkd.method.prepare(batch, 0)
    before, after = objective_drops(gkd, work, lambda w: gkd.method.loss(w, 0)[0])
    assert after < before
