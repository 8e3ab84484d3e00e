"""Teacher generation (`lmdistill.teacher.generation`): the resumable writer and the local
backend's batching and shared-prefix prefill."""

import json

import pytest

from lmdistill.data import DataError
from lmdistill.teacher.generation import GenerateConfig, Job, LocalGenerator, ResumableJsonl

# transformers warns (FutureWarning) when the KV cache goes under its deprecated keyword: the
# generator must use the keyword the installed version takes, so a warning fails these tests.
pytestmark = pytest.mark.filterwarnings("error::FutureWarning")


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ----- the resumable writer -----

def test_resumable_jsonl_cuts_a_half_written_line_and_keeps_the_rest(tmp_path):
    path = tmp_path / "out.jsonl"
    writer = ResumableJsonl(path)
    writer.append({"id": "a", "label": "1"})
    writer.append({"id": "b", "sample": 1, "label": "2"})
    writer.close()
    with path.open("a") as f:
        f.write('{"id": "c", "lab')  # killed mid-write
    reopened = ResumableJsonl(path)
    assert reopened.repaired and reopened.keys == {("a", 0), ("b", 1)}
    reopened.append({"id": "c", "label": "3"})
    reopened.close()
    assert [r["id"] for r in lines(path)] == ["a", "b", "c"]

    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(DataError, match=r"out.jsonl:2: not a record of a previous run"):
        ResumableJsonl(path)


# ----- the local backend -----

def make_jobs(n):
    # Prompts of clearly different lengths, so batches need left padding.
    return [Job(str(i), 0, "Question: " + "tell me more " * (1 + 3 * i) + "?\nAnswer:", "", {}, f"t:{i}")
            for i in range(n)]


def test_local_batches_sorted_by_length_match_one_at_a_time_generation(tiny_llama):
    config = GenerateConfig(teacher=str(tiny_llama), max_new_tokens=12, batch_size=4)
    teacher = LocalGenerator(str(tiny_llama), config)
    jobs = make_jobs(6)
    batched = list(teacher.complete(jobs, chat=False, stop=[]))
    assert [j.id for j, _ in batched] == ["5", "4", "3", "2", "1", "0"]  # longest prompts first
    teacher.config = GenerateConfig(teacher=str(tiny_llama), max_new_tokens=12, batch_size=1)
    single = {j.id: c for j, c in teacher.complete(jobs, chat=False, stop=[])}
    for job, completion in batched:  # left padding + KV cache change nothing under greedy decoding
        assert completion.text == single[job.id].text and completion.tokens == single[job.id].tokens
        assert 0 < completion.tokens <= 12


def test_shared_few_shot_prefix_is_prefilled_once_and_changes_nothing(tiny_llama):
    exemplars = "Q: Tom has two apples and buys three more. How many now?\nA: 2 + 3 = 5. So the answer is 5.\n\n"
    jobs = [Job(str(i), 0, exemplars + "Q: " + "tell me more " * (1 + 2 * i) + "?\nA:", "", {}, f"t:{i}")
            for i in range(5)]
    teacher = LocalGenerator(str(tiny_llama), GenerateConfig(teacher=str(tiny_llama), max_new_tokens=10, batch_size=3))
    encoded = [teacher.encode(job, chat=False) for job in jobs]
    shared = teacher.shared_prefix(encoded)
    assert len(shared) >= 16 and all(e[:len(shared)] == shared and len(e) > len(shared) for e in encoded)
    cached = {j.id: c for j, c in teacher.complete(jobs, chat=False, stop=[])}
    teacher.config = GenerateConfig(teacher=str(tiny_llama), max_new_tokens=10, batch_size=1, share_prefix=False)
    assert teacher.shared_prefix(encoded) == []
    for job, plain in teacher.complete(jobs, chat=False, stop=[]):  # greedy: the same tokens either way
        assert cached[job.id].text == plain.text and cached[job.id].tokens == plain.tokens > 0
