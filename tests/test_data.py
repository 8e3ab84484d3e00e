import json

import pytest
import torch

from conftest import DATA_DIR, gpt2_tokenizer
from lmdistill.data import BatchOrder, DataError, TokenizedExample, collate
from lmdistill.instruct.data import ALPACA_NO_INPUT, InstructionExample, load_instruction_data, tokenize_examples


def test_loads_real_dolly_and_vicuna_layouts():
    dolly = load_instruction_data(str(DATA_DIR / "instruct/dolly/valid.jsonl"))
    assert len(dolly) == 500 and dolly[0].alpaca_prompt.endswith("### Response:\n")
    vicuna = load_instruction_data(str(DATA_DIR / "instruct/vicuna/valid.jsonl"))
    assert len(vicuna) == 80 and all(e.references[0] for e in vicuna)


def test_instruction_input_output_layout_and_reference_lists(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"instruction": "Say hi", "output": ["hi", "hello"]}) + "\n\n"
                 + json.dumps({"instruction": "Sum", "input": "1 2", "output": "3"}) + "\n")
    a, b = load_instruction_data(str(p))
    assert a.references == ["hi", "hello"] and a.alpaca_prompt == ALPACA_NO_INPUT.format(instruction="Say hi")
    assert "### Input:\n1 2" in b.alpaca_prompt and b.instruction == "Sum\n\n1 2"


@pytest.mark.parametrize("line,message", [
    ("{not json", r"d.jsonl:2: malformed JSON"),
    ('{"prompt": "x"}', r"d.jsonl:2: missing field 'output'"),
    ('{"prompt": 3, "output": "y"}', r"d.jsonl:2: field 'prompt': expected a string, got int"),
    ('{"prompt": "  ", "output": "y"}', r"d.jsonl:2: field 'prompt': empty prompt"),
    ('{"prompt": "x", "output": ""}', r"d.jsonl:2: field 'output': empty response"),
    ('[1, 2]', r"d.jsonl:2: expected a JSON object"),
])
def test_bad_lines_name_file_line_and_field(tmp_path, line, message):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "ok", "output": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=message):
        load_instruction_data(str(p))


def test_long_prompts_dropped_and_long_responses_truncated_with_counts():
    tok = gpt2_tokenizer()
    examples = [InstructionExample("x", "word " * 50, ["short answer"]),
                InstructionExample("x", "hi", ["long " * 100]),
                InstructionExample("x", "hi", ["ok"])]
    out, stats = tokenize_examples(examples, tok, "alpaca", max_prompt_length=20, max_length=30)
    assert (stats.kept, stats.dropped_long_prompt, stats.truncated_response) == (2, 1, 1)
    assert all(len(e.prompt) + len(e.response) <= 30 for e in out)
    assert out[1].response[-1] == tok.eos_token_id


def test_collate_left_pads_prompts_and_right_pads_responses():
    a = TokenizedExample([5, 6, 7], [8, 9], [])
    b = TokenizedExample([1], [2, 3, 4], [])
    batch = collate([a, b], pad_id=0)
    assert batch.prompt_width == 3
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 0], [0, 0, 1, 2, 3, 4]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert batch.response_mask.tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 4], [0, 0, 0, 1, 2, 3]]
    labels, mask = batch.targets()
    assert labels.tolist() == [[8, 9, 0], [2, 3, 4]] and mask.tolist() == [[1, 1, 0], [1, 1, 1]]


def test_left_padding_does_not_change_the_model_outputs(tiny_llama):
    from lmdistill.models import load_model
    from lmdistill.forward import response_logits

    model = load_model(str(tiny_llama))
    a = TokenizedExample([5, 6, 7], [8, 9], [])
    b = TokenizedExample([1], [2, 3, 4], [])
    both = response_logits(model, collate([a, b], 0))
    alone = response_logits(model, collate([b], 0))
    torch.testing.assert_close(both[1], alone[0], atol=1e-5, rtol=1e-4)


def test_batch_order_is_seeded_complete_and_resumable():
    lengths = list(range(40))
    order = BatchOrder(lengths, global_batch=4, seed=3)
    epoch = [order.next() for _ in range(10)]
    assert sorted(i for b in epoch for i in b) == list(range(40))
    again = BatchOrder(lengths, global_batch=4, seed=3)
    again.load_state_dict({"position": 7, "seed": 3})
    assert again.next() == epoch[7]
    assert BatchOrder(lengths, 4, seed=4).next() != epoch[0] or BatchOrder(lengths, 4, seed=5).next() != epoch[0]
