"""Hugging Face datasets as training data: a local Parquet file and a `save_to_disk` folder
through the column mapping (`prompt_field`, `response_field`, `messages_field`, `split`)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kd_testing import make_trainer
from lmdistill.data import DataError
from lmdistill.instruct.data import Columns, load_instruction_data


def rows_from(instruct_file):
    return [json.loads(line) for line in instruct_file.read_text().splitlines()]


def test_a_parquet_file_through_the_column_mapping_trains_on_the_same_examples(tiny_llama, tiny_llama_student,
                                                                              instruct_file, tmp_path):
    rows = rows_from(instruct_file)
    table = pa.table({"question": [r["instruction"] if r.get("instruction") else r["prompt"] for r in rows],
                      "answer": [r["output"] for r in rows], "source": ["dolly"] * len(rows)})
    parquet = tmp_path / "train.parquet"
    pq.write_table(table, parquet)
    mapped = load_instruction_data(str(parquet), columns=Columns(prompt="question", response="answer"))
    assert [e.references[0] for e in mapped] == [r["output"] for r in rows]
    # the same rows as JSONL, keyed the default way, give the same tokens to train on
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n"
                             for q, a in zip(table["question"].to_pylist(), table["answer"].to_pylist())))
    a = make_trainer("kd", tiny_llama, tiny_llama_student, parquet, tmp_path / "a", prompt_field="question",
                     response_field="answer")
    b = make_trainer("kd", tiny_llama, tiny_llama_student, plain, tmp_path / "b")
    assert [(e.prompt, e.response) for e in a.examples] == [(e.prompt, e.response) for e in b.examples]
    assert len(a.examples) == len(rows)
    with pytest.raises(DataError, match=r"train.parquet:row 0: no column 'prompt_text' \(config key "
                                        r"'prompt_field'; the rows have: answer, "):
        load_instruction_data(str(parquet), columns=Columns(prompt="prompt_text", response="answer"))


def test_a_datasets_folder_split_and_a_messages_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    data = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"chat": [conversation] * 3, "id": ["a", "b", "c"]}),
        "test": datasets.Dataset.from_dict({"chat": [conversation], "id": ["z"]}),
    })
    folder = tmp_path / "saved"
    data.save_to_disk(str(folder))
    train = load_instruction_data(str(folder), split="train", columns=Columns(messages="chat"))
    test = load_instruction_data(str(folder), split="test", columns=Columns(messages="chat"))
    assert [e.id for e in train] == ["a", "b", "c"] and [e.id for e in test] == ["z"]
    assert train[0].messages == conversation and train[0].references == ["Hello!"]
    with pytest.raises(DataError, match=r"no split 'valid' \(config key 'split'; it has: train, test\)"):
        load_instruction_data(str(folder), split="valid", columns=Columns(messages="chat"))


def test_parquet_errors_list_the_columns_and_name_the_mapping_key(tmp_path):
    parquet = tmp_path / "train.parquet"
    pq.write_table(pa.table({"question": ["Hi?"], "answer": ["Hello."]}), parquet)
    with pytest.raises(DataError, match=r"train.parquet:row 0: no column 'resp' \(config key 'response_field'; the "
                                        r"rows have: answer, question\)"):
        load_instruction_data(str(parquet), columns=Columns(prompt="question", response="resp"))
    with pytest.raises(DataError, match=r"train.parquet:row 0: missing field 'output' \(the rows have: answer, "
                                        r"question; map them with prompt_field, response_field or messages_field\)"):
        load_instruction_data(str(parquet))


def test_an_empty_folder_and_an_unreachable_hub_dataset_fail_at_once_naming_them(tmp_path):
    import time

    pytest.importorskip("datasets")
    (tmp_path / "empty").mkdir()
    started = time.monotonic()
    with pytest.raises(DataError, match=r"empty: no data files in this folder"):
        load_instruction_data(str(tmp_path / "empty"))
    # This machine has no network: the Hub cannot be reached (and offline mode finds no cached copy).
    with pytest.raises(DataError, match=r"nobody/no-such-dataset: no such local file or folder, and the Hugging "
                                        r"Face Hub cannot be reached .*HF_HUB_OFFLINE=1"):
        load_instruction_data("nobody/no-such-dataset")
    assert time.monotonic() - started < 15
