"""A teacher behind an OpenAI-compatible server, read through its prompt log-probabilities.

`teacher: openai:URL#MODEL` with `teacher_top_k: K`: for each sequence the loss needs, the
server scores the whole text (`/v1/completions` with `echo: true`, `logprobs: K`,
`max_tokens: 1`; llama-cpp-python's server must be started with `--logits_all true`) and
returns, per prompt token, the top-K next tokens and their log-probabilities. They become
the top-k cache's answer (`CachedTargets`: k ids, their log-probs, the log of the rest), so
every loss that reads a `teacher_cache` reads a served teacher the same way: the missing
mass is one "any other token" outcome, nothing is renormalised.

Alignment (llama-cpp-python 0.3.36, `Llama._create_completion`; measured in
../shared/data/README.md and by tests/teacher/test_served_teacher.py): the entries are
emitted per echoed token, skipping BOS tokens, and entry i holds the scores row i of the
evaluated prompt, i.e. the distribution *after* its token i. Entry 0 is null. Which entry
holds the distribution over a given token therefore depends on whether the server put a
BOS first (`usage.prompt_tokens`) and on the BOS tokens inside the sequence: `_entries`.

vLLM (`teacher_server: vllm`) takes the token ids themselves and returns `prompt_logprobs`
keyed by id, entry j being the distribution over token j: nothing is re-tokenised or
mapped (written to vLLM's documented response; this machine cannot run vLLM, so it is
tested against a server that answers in that format).

Token texts (llama.cpp): the server keys top-k entries by token text, not id. They are mapped back to
ids through the student's tokenizer; the server's own tokens of the sequence are checked
against the student's, and a mismatch (another vocabulary, another tokenisation) is a
`ServerError` naming the position and both tokens. A text several ids share (e.g. the
pieces of a multi-byte character, which servers print as "" or a partial character) cannot
be told apart: its entry joins the rest, so the k + 1 outcomes stay a partition.
"""

from __future__ import annotations

import json
import math
from typing import Optional

import numpy as np
import torch

from lmdistill.config import parse_server_spec
from lmdistill.data import Batch
from lmdistill.losses.chunked import CachedTargets
from lmdistill.teacher.openai_client import API_KEY_VARIABLES, OpenAIClient, ServerError, complete_all


class Retokenized(ServerError):
    """The server tokenised a sequence's text differently from the student's tokenizer."""


class ServedTeacher:
    """`targets(batch)`: the served teacher's top-k for every response token of a batch."""

    def __init__(self, client: OpenAIClient, tokenizer, top_k: int, concurrency: int = 2,
                 server: str = "llama.cpp"):
        if top_k <= 0:
            raise ValueError(f"teacher_top_k: expected > 0, got {top_k}")
        if server not in ("llama.cpp", "vllm"):
            raise ValueError(f"teacher_server: expected llama.cpp or vllm, got {server!r}")
        self.client, self.tokenizer, self.top_k, self.concurrency = client, tokenizer, top_k, concurrency
        self.server = server
        self.vocab_size = len(tokenizer)
        self.pieces = [tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
                       for i in range(self.vocab_size)]
        ids_of: dict[str, list[int]] = {}
        for i, piece in enumerate(self.pieces):
            ids_of.setdefault(piece, []).append(i)
        # Texts one id owns; a partial UTF-8 piece decodes to U+FFFD and is never unique.
        self.id_of = {t: ids[0] for t, ids in ids_of.items() if len(ids) == 1 and "\ufffd" not in t}
        self.texts = set(ids_of)
        self.requests = 0
        self.unknown = 0  # response positions the server gave no distribution over (left out of the loss)
        self.retokenized = 0  # sequences the server split into other tokens (left out of the loss)

    def check_vocabulary(self, student_rows: int) -> None:
        if student_rows < self.vocab_size:
            raise ServerError(f"the student has {student_rows} output rows, fewer than its tokenizer's "
                              f"{self.vocab_size} tokens")

    # ----- one sequence -----

    def request(self, sequence: list[int], top_k: Optional[int] = None) -> dict:
        """The scoring request of one sequence: its top `top_k` (default `self.top_k`) per position."""
        top_k = self.top_k if top_k is None else top_k
        body = {"model": self.client.model, "max_tokens": 1, "temperature": 0.0}
        if self.server == "vllm":  # token ids in, prompt log-probs keyed by id out: nothing to re-tokenise
            return {**body, "prompt": list(sequence), "prompt_logprobs": top_k}
        text = self.tokenizer.decode(sequence, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return {**body, "prompt": text, "echo": True, "logprobs": top_k}

    def score(self, sequence: list[int], start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Top-k ids [n, k], log-probs [n, k], log rest [n] of the teacher's distribution over each
        of `sequence[start:]` (n tokens) given the tokens before it, and whether the server gave
        that distribution at all [n] (bool; llama-cpp-python skips the entries of BOS tokens, so
        with a BOS that is also the EOS, e.g. GPT-2's, the distribution over the EOS is missing)."""
        payload = self.client.post(self.request(sequence))
        self.requests += 1
        try:
            answer = json.loads(payload)
            if self.server == "vllm":
                distributions = self._vllm(answer["choices"][0]["prompt_logprobs"], sequence)
            else:
                distributions = self._llama_cpp(answer, sequence)
        except Retokenized:
            # The same vocabulary can split one text two ways (llama.cpp's and the HF tokenizer's
            # pre-tokenisers differ on some whitespace runs): the row has no aligned teacher and
            # leaves the loss. Another vocabulary shows in the top-k texts (checked before the
            # alignment); mostly unaligned rows stop the run too.
            self.retokenized += 1
            if self.retokenized > max(4, self.requests // 2):
                raise
            distributions = [None] * len(sequence)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            raise ServerError(f"{self.client.url}: no prompt log-probabilities in the response ({type(e).__name__}: "
                              f"{e}); llama-cpp-python: start it with --logits_all true; vLLM: set "
                              f"teacher_server: vllm: {payload[:300].decode('utf-8', 'replace')}") from None
        n, k = len(sequence) - start, self.top_k
        ids = np.zeros((n, k), dtype=np.int64)
        values = np.full((n, k), -math.inf, dtype=np.float32)
        rest = np.zeros(n, dtype=np.float32)
        known = np.ones(n, dtype=bool)
        for row, j in enumerate(range(start, len(sequence))):
            if distributions[j] is None:
                known[row], ids[row] = False, _padded_ids([], k)
                self.unknown += 1
                continue
            kept = sorted(distributions[j], key=lambda pair: -pair[1])[:k]
            ids[row] = _padded_ids([t for t, _ in kept], k)
            for c, (_, value) in enumerate(kept):
                values[row, c] = value
            rest[row] = math.log(max(1.0 - sum(math.exp(v) for _, v in kept), 1e-12))
        return ids, values, rest, known

    def _vllm(self, prompt_logprobs: list, sequence: list[int]) -> list[Optional[list[tuple[int, float]]]]:
        """vLLM: entry j is the distribution over token j ({id: {"logprob", "rank", ...}}, the top
        k plus token j itself); entry 0 is null."""
        if len(prompt_logprobs) != len(sequence):
            raise ServerError(f"{self.client.url}: {len(prompt_logprobs)} prompt log-prob entries for "
                              f"{len(sequence)} tokens")
        out = []
        for j, entry in enumerate(prompt_logprobs):
            if entry is None:
                out.append(None)
                continue
            pairs = [(int(token), float(info["logprob"])) for token, info in entry.items()]
            bad = [t for t, _ in pairs if not 0 <= t < self.vocab_size]
            if bad:
                raise ServerError(f"{self.client.url}: token id {bad[0]} before position {j} is outside the "
                                  f"student's vocabulary of {self.vocab_size}: the tokenizers differ")
            out.append(pairs)
        return out

    def _llama_cpp(self, answer: dict, sequence: list[int]) -> list[Optional[list[tuple[int, float]]]]:
        """llama-cpp-python: entries keyed by token text, placed as `_entries` says."""
        logprobs = answer["choices"][0]["logprobs"]
        tops = logprobs["top_logprobs"]
        self._check_texts(tops)
        entry_of = self._entries(sequence, logprobs["tokens"], int(answer["usage"]["prompt_tokens"]))
        out = []
        for j in range(len(sequence)):
            entry = tops[entry_of[j]] if entry_of.get(j) is not None else None
            if not entry:
                out.append(None)
                continue
            pairs = []  # the server's k best (an entry also holds its own token's text: maybe a k + 1st)
            for text, value in sorted(entry.items(), key=lambda item: -item[1])[: self.top_k]:
                token = self.id_of.get(text)
                if token is None:
                    continue  # a text several ids share (or a control token, printed ""): it joins the rest
                pairs.append((token, float(value)))
            out.append(pairs)
        return out

    def _check_texts(self, tops: list) -> None:
        """ServerError for a top-k text that is no token of the student's vocabulary."""
        for entry in tops:
            for text in entry or ():
                if text and "\ufffd" not in text and text not in self.texts:
                    raise ServerError(f"{self.client.url}: the teacher's top token {text!r} is not in the student's "
                                      "vocabulary: the tokenizers differ")

    def _entries(self, sequence: list[int], served: list[str], prompt_tokens: int) -> dict[int, int]:
        """{j: index of the entry of `top_logprobs` holding the distribution over sequence[j]}.

        llama-cpp-python evaluates prompt = [BOS] * added + sequence (added: 1 when its GGUF says
        add_bos; seen in `usage.prompt_tokens`), drops a leading BOS, and emits entry i of the
        rest (skipping BOS tokens) from row i of its scores, i.e. the distribution after
        prompt[i]. So the distribution over sequence[j] (after prompt[added + j - 1]) is the entry
        of index added + j - 1 in the BOS-less list, when that token is not a BOS itself. The
        served tokens are checked against the student's along the way."""
        added = prompt_tokens - len(sequence)
        bos = self.tokenizer.bos_token_id
        if added not in (0, 1) or (added == 1 and bos is None):
            raise Retokenized(f"{self.client.url}: the server read {prompt_tokens} prompt tokens, the student's "
                              f"tokenizer has {len(sequence)}: the tokenizers differ")
        prompt = [bos] * added + list(sequence)
        echoed = prompt[1:] if bos is not None and prompt[0] == bos else prompt
        emitted, index = {}, 0
        for i, token in enumerate(echoed):
            if token != bos:
                emitted[i] = index
                index += 1
        if len(served) not in (index, index + 1):  # + the one generated token, unless it was EOS
            raise Retokenized(f"{self.client.url}: the server echoed {len(served)} tokens for {index} prompt tokens: "
                              "the tokenizers differ")
        for i, e in emitted.items():
            mine, theirs = self.pieces[echoed[i]], served[e]
            if mine != theirs and "\ufffd" not in mine and theirs != "":  # control tokens echo as ""
                raise Retokenized(f"{self.client.url}: token {i} is {theirs!r} on the server but {mine!r} "
                                  f"(id {echoed[i]}) for the student's tokenizer: the tokenizers differ")
        return {j: emitted.get(added + j - 1) for j in range(len(sequence))}

    # ----- a batch -----

    def targets(self, batch: Batch) -> CachedTargets:
        """The top-k for every response token of `batch` (layout of `TeacherCache.targets`);
        the rows are scored with `concurrency` requests in flight."""
        B, width = batch.input_ids.shape[0], batch.input_ids.shape[1] - batch.prompt_width
        ids = np.zeros((B, width, self.top_k), dtype=np.int64)
        values = np.zeros((B, width, self.top_k), dtype=np.float32)
        rest = np.zeros((B, width), dtype=np.float32)
        known = np.ones((B, width), dtype=bool)
        jobs = [(b, prompt + answer, len(prompt)) for b, (prompt, answer) in enumerate(batch.sequences()) if answer]
        for (b, _, _), (i, v, r, ok) in complete_all(lambda job: self.score(job[1], job[2]), jobs, self.concurrency):
            ids[b, : len(r)], values[b, : len(r)], rest[b, : len(r)], known[b, : len(r)] = i, v, r, ok
        device = batch.input_ids.device
        return CachedTargets(*(torch.from_numpy(a).to(device) for a in (ids, values, rest, known)))


    # ----- the log-prob of each given token (on-policy distillation) -----

    def sampled_token_logprobs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, Optional[CachedTargets]]:
        """log p_T(y_t) of every response token y_t of `batch` [B, R] (float32), whether the server
        gave it [B, R] (bool), and, for llama.cpp, the top-k answer it was read from (else None).

        vLLM: asked with `prompt_logprobs: 0`; its entry j always holds token j itself, so every
        token's log-prob is given (only the entries it leaves null are missing). llama.cpp: its
        entries hold the top `teacher_top_k` by text (the extra own-token text it adds belongs to
        the token before, not to the one scored), so a token outside the teacher's top k has no
        log-prob there: not given, and the caller decides (`lmdistill.methods.opd`)."""
        labels, mask = batch.targets()
        if self.server != "vllm":
            targets = self.targets(batch)
            among = (targets.ids == labels.unsqueeze(-1)) & (labels.unsqueeze(-1) >= 0)
            picked = targets.logprobs.gather(-1, among.float().argmax(-1, keepdim=True)).squeeze(-1)
            found = among.any(-1) & targets.known & mask.bool()
            return torch.where(found, picked, torch.zeros_like(picked)), found, targets
        B, width = labels.shape
        values = np.zeros((B, width), dtype=np.float32)
        found = np.zeros((B, width), dtype=bool)
        jobs = [(b, prompt + answer, len(prompt)) for b, (prompt, answer) in enumerate(batch.sequences()) if answer]
        for (b, _, _), (v, ok) in complete_all(lambda job: self.score_tokens(job[1], job[2]), jobs, self.concurrency):
            values[b, : len(v)], found[b, : len(v)] = v, ok
        device = batch.input_ids.device
        return torch.from_numpy(values).to(device), torch.from_numpy(found).to(device), None

    def score_tokens(self, sequence: list[int], start: int) -> tuple[np.ndarray, np.ndarray]:
        """vLLM: log p_T(sequence[j] | sequence[:j]) for j >= start [n], and whether given [n]."""
        payload = self.client.post(self.request(sequence, top_k=0))
        self.requests += 1
        try:
            entries = self._vllm(json.loads(payload)["choices"][0]["prompt_logprobs"], sequence)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            raise ServerError(f"{self.client.url}: no prompt log-probabilities in the response ({type(e).__name__}: "
                              f"{e}): {payload[:300].decode('utf-8', 'replace')}") from None
        n = len(sequence) - start
        values, found = np.zeros(n, dtype=np.float32), np.zeros(n, dtype=bool)
        for row, j in enumerate(range(start, len(sequence))):
            own = dict(entries[j] or ()).get(sequence[j])
            if own is None:
                self.unknown += 1
            else:
                values[row], found[row] = own, True
        return values, found


def _padded_ids(kept: list[int], k: int) -> list[int]:
    """`kept` filled up to k with -1, the empty slot `losses.chunked.coarsen` leaves out of both
    distributions (fewer than k entries survive when texts are shared or control tokens)."""
    return list(kept) + [-1] * (k - len(kept))


def served_teacher(config, tokenizer, top_k: Optional[int] = None) -> Optional[ServedTeacher]:
    """The recipe's served teacher (`teacher: openai:URL#MODEL`), or None for a local one;
    `top_k` overrides the recipe's `teacher_top_k`."""
    import os


    spec = parse_server_spec(config.teacher or "")
    if spec is None:
        return None
    names = [config.api_key_env] if getattr(config, "api_key_env", None) else list(API_KEY_VARIABLES)
    api_key = next((os.environ[n] for n in names if os.environ.get(n)), None)
    client = OpenAIClient(spec[0], spec[1], timeout=config.teacher_timeout, max_retries=config.teacher_retries,
                          backoff=config.teacher_backoff, api_key=api_key)
    return ServedTeacher(client, tokenizer, top_k or config.teacher_top_k, config.teacher_concurrency,
                         config.teacher_server)
