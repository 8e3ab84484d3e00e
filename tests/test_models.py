import pytest
import torch

from lmdistill.models import (
    ModelError,
    load_model,
    load_tokenizer,
    parse_layer_list,
    prune,
    prune_layers,
)


def test_prune_llama_keeps_chosen_layers_and_vocabulary(tiny_llama, tmp_path):
    full = load_model(str(tiny_llama))
    out = prune(str(tiny_llama), [0, 3], tmp_path / "student")
    student = load_model(str(out))
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    assert student.config.vocab_size == full.config.vocab_size
    torch.testing.assert_close(student.model.layers[1].mlp.up_proj.weight, full.model.layers[3].mlp.up_proj.weight)
    ids = torch.randint(0, 1000, (1, 6))
    assert student(ids).logits.shape == (1, 6, full.config.vocab_size)
    # The KV-cache layer index follows the new order, so generation works.
    student.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)


def test_prune_gpt2(tiny_gpt2, tmp_path):
    out = prune(str(tiny_gpt2), [0, 2], tmp_path / "student")
    student = load_model(str(out))
    assert student.config.n_layer == 2 and len(student.transformer.h) == 2
    student.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False, pad_token_id=0)


def test_prune_rejects_bad_layer_lists(tiny_llama):
    model = load_model(str(tiny_llama))
    with pytest.raises(ModelError, match="out of range"):
        prune_layers(model, [0, 9])
    with pytest.raises(ModelError, match="increasing"):
        prune_layers(model, [2, 1])
    assert parse_layer_list("0,3-5,9") == [0, 3, 4, 5, 9]
    with pytest.raises(ModelError, match="integers"):
        parse_layer_list("0,x")


def test_missing_model_is_a_clear_error(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "student").mkdir()
    for load in (load_model, load_tokenizer):  # a path that cannot be a Hub id: named as a missing folder
        with pytest.raises(ModelError, match=r"model folder '.*run/nope' does not exist; .*run holds: student"):
            load(str(tmp_path / "run" / "nope"))
    with pytest.raises(ModelError, match="cannot load"):  # could be a Hub id: from_pretrained decides
        load_model("no-such-owner/no-such-model")



def test_precision_dtype_maps_the_precision_setting():
    import torch

    from lmdistill.models import precision_dtype

    assert precision_dtype("bf16") is torch.bfloat16 and precision_dtype("fp32") is torch.float32
