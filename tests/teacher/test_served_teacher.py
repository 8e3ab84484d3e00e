"""A served teacher (`teacher: openai:URL#MODEL`): its top-k from a server's prompt log-probs.

Fast tests use `FakeLlamaServer`: an HTTP server answering `/v1/completions` with `echo` and
`logprobs` the way llama-cpp-python 0.3.36 does (entry i of `top_logprobs` is the distribution
after token i, entry 0 is null, entries keyed by token text), computed from a local tiny
model, so the served top-k can be checked against the model itself. The slow test runs the
real llama.cpp server on the SmolLM2 GGUF beside the same model loaded locally.
"""

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from kd_testing import make_trainer, objective_drops
from lmdistill.cache_teacher import cache_teacher
from lmdistill.config import ConfigError
from lmdistill.teacher.cache import TeacherCache
from lmdistill.teacher.openai_client import OpenAIClient, ServerError
from lmdistill.teacher.served import ServedTeacher
from lmdistill.trainer import TrainingError
from servers import DROP, QuietHTTPServer, llama_server_process


class FakeLlamaServer:
    """llama-cpp-python 0.3.36's `/v1/completions` with `echo` and `logprobs`, from a local model
    (float32), following `Llama._create_completion` step by step: the prompt is [BOS] if
    `add_bos` + the text's tokens; a leading BOS is dropped from the echo; entry i is the
    distribution after echoed token i (scores row i); BOS tokens get no entry; entry 0 is
    null; token texts are printed without control tokens and with partial UTF-8 dropped; each
    entry also holds its own token's text with its log-prob under that entry's distribution."""

    def __init__(self, model_path, top_k_limit: int = 50, add_bos: bool = False):
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        self.add_bos, self.requests, lock, fake = add_bos, 0, threading.Lock(), self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with lock:
                    fake.requests += 1
                    if "logprobs" in body:  # scoring: the prompt's log-probs
                        payload = json.dumps(fake.answer(body["prompt"], min(int(body["logprobs"]), top_k_limit)))
                    else:  # generation: greedy whatever the temperature, no special tokens and no repeats
                        # (a random tiny model's argmax repeats "\n", which would leave nothing to train on)
                        payload = json.dumps(fake.generate(body["prompt"], int(body["max_tokens"])))
                data = payload.encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = QuietHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def piece(self, token: int) -> str:
        if token in self.tokenizer.all_special_ids:
            return ""
        return self.tokenizer.decode([token]).replace("\ufffd", "")

    @torch.no_grad()
    def answer(self, text: str, k: int) -> dict:
        bos = self.tokenizer.bos_token_id
        prompt = [bos] * self.add_bos + self.tokenizer(text, add_special_tokens=False)["input_ids"]
        rows = self.model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)  # row r: after prompt[r]
        generated = int(rows[-1].argmax())
        echoed = (prompt[1:] if prompt[0] == bos else prompt) + [generated]
        tokens, tops = [], []
        for token, row in zip(echoed, rows):  # zip: the generated token has no row unless a BOS was dropped
            if token == bos:
                continue
            values, top = row.topk(k)
            entry = {self.piece(int(t)): float(v) for t, v in zip(top, values)}
            entry[self.piece(token)] = float(row[token])
            tokens.append(self.piece(token))
            tops.append(entry)
        tops[0] = None
        return {"choices": [{"text": text + self.piece(generated),
                             "logprobs": {"tokens": tokens, "top_logprobs": tops}}],
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": 1}}

    @torch.no_grad()
    def generate(self, text: str, max_tokens: int) -> dict:
        prompt = torch.tensor([self.tokenizer(text, add_special_tokens=False)["input_ids"]])
        out = self.model.generate(prompt, max_new_tokens=max_tokens, do_sample=False,
                                  suppress_tokens=self.tokenizer.all_special_ids, no_repeat_ngram_size=1,
                                  pad_token_id=self.tokenizer.eos_token_id)[0, prompt.shape[1]:]
        return {"choices": [{"text": self.tokenizer.decode(out, skip_special_tokens=True), "finish_reason": "length"}],
                "usage": {"prompt_tokens": prompt.shape[1], "completion_tokens": len(out)}}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def fake_server(tiny_llama):
    server = FakeLlamaServer(tiny_llama)
    yield server
    server.close()


def served(url: str, tokenizer, k: int = 8, **client) -> ServedTeacher:
    return ServedTeacher(OpenAIClient(url, "tiny", **client), tokenizer, k)


@pytest.mark.parametrize("add_bos", [False, True], ids=["no-bos", "server-adds-bos"])
def test_served_top_k_is_the_models_own_top_k_at_the_right_positions(add_bos, fake_server, tiny_llama,
                                                                     tiny_llama_student, instruct_file, tmp_path):
    server = FakeLlamaServer(tiny_llama, add_bos=True) if add_bos else fake_server
    trainer = make_trainer("kd", tiny_llama, tiny_llama_student, instruct_file, tmp_path / "run", precision="fp32",
                           batch_size=4)
    batch = trainer.micro_batches()[0]
    teacher = served(server.url, trainer.tokenizer)
    try:
        got = teacher.targets(batch)
    finally:
        if add_bos:
            server.close()
    _, mask = batch.targets()
    P, checked = batch.prompt_width, 0
    special = set(trainer.tokenizer.all_special_ids)  # printed as "" by the server: they join the rest
    for b in range(batch.input_ids.shape[0]):
        prompt = batch.input_ids[b, :P][batch.attention_mask[b, :P].bool()]
        answer = batch.input_ids[b, P:][batch.response_mask[b, P:].bool()]
        first = [trainer.tokenizer.bos_token_id] * add_bos
        with torch.no_grad():  # the model on the unpadded sequence; row i is the distribution over token i + 1
            local = server.model(torch.tensor([first + prompt.tolist() + answer.tolist()])).logits[0]
        local = local.float().log_softmax(-1)[len(first):]
        for j in range(len(answer)):
            if not got.known[b, j]:  # the server adds a BOS, and GPT-2's BOS is its EOS: no entry for it
                assert add_bos and int(answer[j]) == trainer.tokenizer.bos_token_id
                checked += 1
                continue
            row = local[len(prompt) + j - 1]
            values, top = row.topk(8)
            kept = got.ids[b, j][got.logprobs[b, j] > -math.inf]
            unique = [t for t in top.tolist() if t not in special and teacher.id_of.get(teacher.pieces[t]) == t]
            assert set(unique) <= set(kept.tolist()) <= set(top.tolist())
            torch.testing.assert_close(got.logprobs[b, j][: len(kept)], row[kept], rtol=0, atol=1e-5)
            torch.testing.assert_close(got.rest[b, j], torch.log1p(-row[kept].exp().sum()), rtol=0, atol=1e-4)
            checked += 1
    assert checked == int(mask.sum()) > 10


def test_kd_and_on_policy_gkd_train_from_a_served_teacher(fake_server, tiny_llama_student, instruct_file, tmp_path):
    url = f"openai:{fake_server.url}#tiny"
    kd = make_trainer("kd", url, tiny_llama_student, instruct_file, tmp_path / "kd", precision="fp32", kd_ratio=1.0,
                      teacher_top_k=16)
    assert kd.method.teacher is None, "a served teacher is never loaded"
    before, after = objective_drops(kd, kd.micro_batches()[0], lambda w: kd.method.loss(w, 0)[0])
    assert after < before
    gkd = make_trainer("gkd", url, tiny_llama_student, instruct_file, tmp_path / "gkd", precision="fp32", lmbda=1.0,
                       teacher_top_k=16)
    requests = fake_server.requests
    work = gkd.method.prepare(gkd.micro_batches()[0], 0)  # the student's samples, scored by the server
    before, after = objective_drops(gkd, work, lambda w: gkd.method.loss(w, 0)[0])
    assert after < before and fake_server.requests > requests


@pytest.mark.parametrize("method, extra", [("rkl", {}), ("imitkd", {}),
                                           ("distillm", {"valid_examples": 4, "init_threshold": 1.0})])
def test_on_policy_baselines_train_from_a_served_teacher(method, extra, fake_server, tiny_llama_student,
                                                         instruct_file, tmp_path):
    trainer = make_trainer(method, f"openai:{fake_server.url}#tiny", tiny_llama_student, instruct_file,
                           tmp_path / method, precision="fp32", teacher_top_k=16, **extra)
    assert trainer.method.teacher is None
    requests = fake_server.requests
    work = trainer.method.prepare(trainer.micro_batches()[0], 0)
    before, after = objective_drops(trainer, work, lambda w: trainer.method.loss(w, 0)[0])
    assert after < before and fake_server.requests > requests


def test_methods_that_need_the_model_refuse_a_served_teacher(tiny_llama_student, instruct_file, tmp_path):
    url = "openai:http://127.0.0.1:9/v1#m"
    for method, why in [("promptkd", "soft prompt"), ("sft", "works with kd, seqkd, gkd, rkl")]:
        with pytest.raises(ConfigError, match=f"config key 'teacher'.*{why}"):
            make_trainer(method, url, tiny_llama_student, instruct_file, tmp_path / method)
    # MiniLLM takes one, but not inside its sampling mixture (the server scores finished samples).
    with pytest.raises(ConfigError, match="config key 'teacher_mix'.*every decoding step"):
        make_trainer("minillm", url, tiny_llama_student, instruct_file, tmp_path / "minillm")


def test_minillm_from_a_served_teacher_rewards_and_single_step_kl_are_the_k_plus_1_outcome_ones(
        fake_server, tiny_llama, tiny_llama_student, instruct_file, tmp_path):
    from lmdistill.forward import response_logits

    trainer = make_trainer("minillm", f"openai:{fake_server.url}#tiny", tiny_llama_student, instruct_file,
                           tmp_path / "minillm", precision="fp32", teacher_top_k=8, teacher_mix=0.0, ppo_epochs=4)
    method = trainer.method
    assert method.teacher is None
    method.begin_step(0)
    requests = fake_server.requests
    work = method.prepare(trainer.micro_batches()[0], 0)
    assert fake_server.requests > requests and work.served is not None
    # Naive reference from the full distributions: the served model itself and the student.
    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with torch.no_grad():
        p = response_logits(teacher, work.samples).float().log_softmax(-1)
        q = response_logits(method.unwrapped_student, work.samples).float().log_softmax(-1)
    labels, mask = work.samples.targets()
    mask = mask.bool() & work.served.known
    rewards, kls = torch.zeros_like(work.rewards), []
    for b, t in mask.nonzero().tolist():
        ids = [i for i in work.served.ids[b, t].tolist() if i >= 0]
        outcomes_p = torch.cat([p[b, t, ids], torch.log1p(-p[b, t, ids].exp().sum()).view(1)])
        outcomes_q = torch.cat([q[b, t, ids], torch.log1p(-q[b, t, ids].exp().sum()).view(1)])
        o = ids.index(int(labels[b, t])) if int(labels[b, t]) in ids else len(ids)
        rewards[b, t] = outcomes_p[o] - outcomes_q[o]
        kls.append(float((outcomes_q.exp() * (outcomes_q - outcomes_p)).sum()))
    assert mask.sum() > 10
    torch.testing.assert_close(work.rewards, rewards, atol=2e-4, rtol=0)  # the server's values: float32 JSON
    _, logs = method.loss(work, 0)
    assert logs["reverse_kl"] == pytest.approx(sum(kls) / len(kls), abs=2e-4)
    # The rollout (the server's answer included) is checkpoint state: a resumed run asks nothing again.
    restored = make_trainer("minillm", f"openai:{fake_server.url}#tiny", tiny_llama_student, instruct_file,
                            tmp_path / "restored", precision="fp32", teacher_top_k=8, teacher_mix=0.0)
    restored.method.load_state_dict(method.state_dict())
    assert torch.equal(restored.method.rollouts[0].served.ids, work.served.ids)
    # And it trains: the single-step reverse KL to the served teacher falls.
    before, after = objective_drops(trainer, work, lambda w: method.loss(w, 0)[1]["reverse_kl"])
    assert after < before


def test_seqkd_from_a_served_teacher_generates_on_the_server_and_distils_its_top_k(
        fake_server, tiny_llama, tiny_llama_student, instruct_file, tmp_path):
    trainer = make_trainer("seqkd", f"openai:{fake_server.url}#tiny", tiny_llama_student, instruct_file,
                           tmp_path / "seqkd", precision="fp32", teacher_top_k=8, teacher_decoding="greedy",
                           max_new_tokens=6, teacher_responses=tmp_path / "responses.jsonl")
    assert trainer.method.teacher is None
    # Step 1 ran on the server: its greedy continuations of the student's prompts.
    records = [json.loads(line) for line in (tmp_path / "responses.jsonl").read_text().splitlines()]
    assert len(records) >= 2 and not (tmp_path / ".responses.jsonl.partial").exists()
    assert records[0]["output"] == fake_server.generate(records[0]["prompt"], 6)["choices"][0]["text"].strip()
    # Step 2: the KL term reads the server's top-k of those responses, and the loss falls.
    batch = trainer.micro_batches()[0]
    requests = fake_server.requests
    before, after = objective_drops(trainer, batch, lambda b: trainer.method.loss(b, 0)[0])
    assert after < before and fake_server.requests > requests


def test_a_server_with_another_vocabulary_is_named(fake_server, tmp_path):
    from lmdistill.models import load_tokenizer
    from conftest import DATA_DIR

    other = load_tokenizer(str(DATA_DIR / "tokenizers/t5"))
    teacher = served(fake_server.url, other)
    with pytest.raises(ServerError, match="tokenizers differ"):
        teacher.score(other("The capital of France is Paris.")["input_ids"], 3)


def test_a_text_the_server_splits_otherwise_leaves_the_loss_and_many_stop_the_run(fake_server, tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    teacher = served(fake_server.url, tok)
    plain = tok(" The capital of France is Paris.")["input_ids"]
    split = plain[:1] + tok.convert_tokens_to_ids(["Ġcap", "ital"]) + plain[2:]  # " capital" in two pieces
    assert tok.decode(split) == tok.decode(plain) and len(split) == len(plain) + 1
    *_, known = teacher.score(plain, 3)
    assert known.all() and teacher.retokenized == 0
    *_, known = teacher.score(split, 3)
    assert not known.any() and teacher.retokenized == 1  # no aligned teacher: out of the loss
    with pytest.raises(ServerError, match="the server read .* prompt tokens"):
        for _ in range(8):  # most sequences unaligned: something else is wrong, and the run says so
            teacher.score(split, 3)


def test_cache_teacher_from_a_server_equals_the_served_targets(fake_server, tiny_llama_student, instruct_file,
                                                               tmp_path):
    from lmdistill.methods import load_config

    keys = [f"teacher=openai:{fake_server.url}#tiny", f"student={tiny_llama_student}", f"train_data={instruct_file}",
            "prompt_format=alpaca", "max_length=160", "max_prompt_length=128", "teacher_top_k=8",
            f"output_dir={tmp_path / 'unused'}"]
    cache_teacher(load_config(None, ["method=kd", *keys]), tmp_path / "cache", top_k=8)
    trainer = make_trainer("kd", f"openai:{fake_server.url}#tiny", tiny_llama_student, instruct_file,
                           tmp_path / "run", precision="fp32", teacher_top_k=8)
    batch = trainer.micro_batches()[0]
    from_cache = TeacherCache(tmp_path / "cache").targets(batch)
    from_server = trainer.method.teacher_source.targets(batch)
    assert from_server.known.all()
    for name in ("ids", "logprobs", "rest"):
        torch.testing.assert_close(getattr(from_cache, name).to(getattr(from_server, name).dtype),
                                   getattr(from_server, name))


def test_faults_are_retried_and_a_run_stopped_by_them_resumes_bit_identically(
        fake_server, fault_proxy, tiny_llama_student, instruct_file, tmp_path):
    def run(name, proxy, **extra):
        trainer = make_trainer("kd", f"openai:{proxy.url}#tiny", tiny_llama_student, instruct_file, tmp_path / name,
                               precision="fp32", steps=4, save_every=2, teacher_retries=2, teacher_backoff=0.01,
                               teacher_concurrency=1, **extra)
        return trainer.train()

    upstream = fake_server.url.removesuffix("/v1")
    # 503s and dropped connections inside the retry budget: the run goes on.
    steady = fault_proxy(upstream, faults=[503, DROP, None, 503])
    run("steady", steady)
    assert steady.requests == 4 * 2 + 3  # 2 rows per step, 3 retried requests
    # Step 3 finds the server down for longer than the budget: the run stops, naming it ...
    broken = fault_proxy(upstream, faults=[None] * 4 + [503] * 3)
    with pytest.raises(TrainingError, match="step 3: the served teacher failed: .*giving up after 3 attempts; last: "
                       "HTTP 503.*checkpoint-2"):
        run("resumed", broken)
    # ... and, resumed from checkpoint-2 once the server is back, ends where the steady run did.
    run("resumed", broken, resume="true")
    a, b = (load_file(tmp_path / name / "student/model.safetensors") for name in ("steady", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----- the real llama.cpp server -----

@pytest.mark.slow
def test_real_llama_server_top_k_matches_the_local_model_and_trains_kd_gkd_and_minillm(tmp_path):
    from conftest import DATA_DIR
    from lmdistill.instruct.data import load_instruction_data, tokenize_examples
    from lmdistill.data import collate
    from lmdistill.model_zoo import resolve_model
    from lmdistill.models import load_tokenizer

    smollm2 = resolve_model("smollm2-135m-instruct")
    tok = load_tokenizer(smollm2)
    rows = load_instruction_data(str(DATA_DIR / "instruct/dolly/dev.jsonl"))[:6]
    examples, _ = tokenize_examples(rows, tok, "chat", 96, 160)
    batch = collate(examples, tok.pad_token_id)
    local = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    with llama_server_process("smollm2", "--logits_all", "true") as url:
        teacher = served(url, tok, k=8)
        got = teacher.targets(batch)
        top1, shifted, diffs, first = [], [], [], []
        for b, example in enumerate(examples):
            with torch.no_grad():
                sequence = torch.tensor([example.prompt + example.response])
                dense = local(sequence).logits[0].float().log_softmax(-1)
            for j in range(len(example.response)):
                row = dense[len(example.prompt) + j - 1]
                kept = got.ids[b, j][got.logprobs[b, j] > -math.inf]
                top1.append(int(kept[0]) == int(row.argmax()))
                shifted.append(int(kept[0]) == int(dense[len(example.prompt) + j].argmax()))  # off by one
                first.append(abs(float(got.logprobs[b, j][0] - row[kept[0]])))
                diffs.append(float((got.logprobs[b, j][: len(kept)] - row[kept]).abs().max()))
        diffs.sort()
        first.sort()
        median, p95 = diffs[len(diffs) // 2], diffs[int(0.95 * len(diffs))]
        print(f"real server vs local fp32: top-1 agrees on {sum(top1)}/{len(top1)} positions (off by one: "
              f"{sum(shifted)}); |logprob diff| of the top entry median {first[len(first) // 2]:.3f}, over the "
              f"top 8 median {median:.3f}, 95th pct {p95:.3f}, max {diffs[-1]:.3f}")
        # Q4_1 kernels vs de-quantized fp32 weights (measured: 253/261, 0.172 / 0.447 over the top 8)
        assert sum(top1) >= 0.9 * len(top1) and sum(shifted) < 0.5 * len(shifted)
        assert median < 0.3 and p95 < 0.8
        # a tiny student over SmolLM2's vocabulary learns from the server, off- and on-policy
        student = tmp_path / "student"
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        LlamaForCausalLM(config).save_pretrained(student)
        tok.save_pretrained(student)
        data = tmp_path / "dolly.jsonl"
        data.write_text("".join(json.dumps({"instruction": r.instruction, "output": r.references[0]}) + "\n"
                                for r in rows))
        for method, extra in [("kd", {"kd_ratio": 1.0}), ("gkd", {"lmbda": 1.0}), ("minillm", {"teacher_mix": 0.0})]:
            trainer = make_trainer(method, f"openai:{url}#smollm2", student, data, tmp_path / method,
                                   precision="fp32", prompt_format="chat", teacher_top_k=8, **extra)
            trainer.method.begin_step(0)
            work = trainer.method.prepare(trainer.micro_batches()[0], 0)
            # MiniLLM's total is a policy-gradient surrogate: its single-step reverse KL is the divergence
            value = (lambda w: trainer.method.loss(w, 0)[1]["reverse_kl"]) if method == "minillm" else (
                lambda w: trainer.method.loss(w, 0)[0])
            before, after = objective_drops(trainer, work, value, updates=3)
            assert after < before, method


def test_vllm_prompt_logprobs_keyed_by_id_give_the_models_top_k(tiny_llama, tiny_llama_student, instruct_file,
                                                                tmp_path):
    # A server answering as vLLM documents it: token ids in, `prompt_logprobs` out (entry j over
    # token j, {id: {"logprob", "rank", "decoded_token"}}, top k + token j itself, entry 0 null).
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            ids, k = body["prompt"], body["prompt_logprobs"]
            with torch.no_grad():
                rows = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
            entries = [None]
            for j in range(1, len(ids)):
                values, top = (x.tolist() for x in rows[j - 1].topk(k))
                entry = {str(t): {"logprob": v, "rank": r + 1} for r, (t, v) in enumerate(zip(top, values))}
                entry[str(ids[j])] = {"logprob": float(rows[j - 1][ids[j]]), "rank": 99}
                entries.append(entry)
            data = json.dumps({"choices": [{"text": "x", "prompt_logprobs": entries}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"openai:http://127.0.0.1:{server.server_address[1]}/v1#tiny"
        trainer = make_trainer("kd", url, tiny_llama_student, instruct_file, tmp_path / "run", precision="fp32",
                               teacher_server="vllm", teacher_top_k=8, kd_ratio=1.0)
        batch = trainer.micro_batches()[0]
        got = trainer.method.teacher_source.targets(batch)
        assert got.known[batch.targets()[1].bool()].all()
        P = batch.prompt_width
        for b in range(batch.input_ids.shape[0]):
            prompt = batch.input_ids[b, :P][batch.attention_mask[b, :P].bool()]
            answer = batch.input_ids[b, P:][batch.response_mask[b, P:].bool()]
            with torch.no_grad():
                local = model(torch.cat([prompt, answer])[None]).logits[0].float().log_softmax(-1)
            for j in range(len(answer)):
                values, top = local[len(prompt) + j - 1].topk(8)
                assert got.ids[b, j].tolist() == top.tolist()  # ids as ids: all k kept, in order
                torch.testing.assert_close(got.logprobs[b, j], values, rtol=0, atol=1e-5)
        before, after = objective_drops(trainer, batch, lambda w: trainer.method.loss(w, 0)[0])
        assert after < before
    finally:
        server.shutdown()
        server.server_close()


def test_a_slow_server_is_timed_out_and_retried_then_stops_the_run_with_one_line_keeping_the_checkpoint(
        fake_server, fault_proxy, tiny_llama_student, instruct_file, tmp_path, capsys):
    import yaml

    from lmdistill import cli
    from servers import SLOW

    upstream = fake_server.url.removesuffix("/v1")
    # Steps 1-2 answered (2 rows a step); step 3: two answers too slow, the third in time (retried);
    # step 4: slower than the timeout on every attempt.
    proxy = fault_proxy(upstream, faults=[None] * 4 + [SLOW, SLOW, None, None] + [SLOW] * 3)
    proxy.slow_seconds = 1.5
    run = tmp_path / "run"
    recipe = tmp_path / "kd.yaml"
    recipe.write_text(yaml.safe_dump({
        "method": "kd", "teacher": f"openai:{proxy.url}#tiny", "student": str(tiny_llama_student),
        "train_data": str(instruct_file), "output_dir": str(run), "prompt_format": "alpaca", "max_length": 160,
        "max_prompt_length": 128, "steps": 4, "batch_size": 2, "save_every": 2, "precision": "fp32",
        "progress": False, "report_to": ["none"], "teacher_top_k": 8, "teacher_concurrency": 1,
        "teacher_timeout": 0.5, "teacher_retries": 2, "teacher_backoff": 0.05}))
    code = cli.main(["train", str(recipe)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not any("Traceback" in line for line in err), err
    (line,) = [line for line in err if line.startswith("lmdistill train: error: ")]
    assert "step 4" in line and "giving up after 3 attempts" in line and "timed out" in line
    assert f"{run / 'checkpoint-2'}" in line and "--resume" in line
    assert proxy.requests == 4 + 4 + 3
    assert [json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]
    assert cli.main(["train", str(recipe), "--resume"]) == 0  # the server answers again: the run ends
    assert (run / "student" / "model.safetensors").exists()
