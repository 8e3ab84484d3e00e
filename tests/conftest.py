"""Shared fixtures: tiny random-weight models built from the real tokenizers in the data dir."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

DATA_DIR = Path(
    os.environ.get("LMDISTILL_DATA_DIR", Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
).resolve()
os.environ.setdefault("LMDISTILL_DATA_DIR", str(DATA_DIR))
# Keep tests single-threaded-ish and deterministic on the 2-core CI machine.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def gpt2_tokenizer():
    from transformers import GPT2TokenizerFast

    # transformers 5 reads the vocab/merges pair from the folder (the vocab_file= keyword is gone).
    tok = GPT2TokenizerFast.from_pretrained(str(DATA_DIR / "tokenizers/gpt2"))
    tok.pad_token = tok.eos_token
    return tok


def make_tiny_llama(folder: Path, layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    """A random-weight Llama over GPT-2's real vocabulary, saved as an HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = gpt2_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def make_tiny_gpt2(folder: Path, layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = gpt2_tokenizer()
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tok),
        n_embd=hidden,
        n_layer=layers,
        n_head=4,
        n_positions=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def make_tiny_t5(folder: Path, layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    """A random-weight T5 (encoder-decoder) over t5-small's real SentencePiece vocabulary."""
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(str(DATA_DIR / "tokenizers/t5"))
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tok),
        d_model=hidden,
        d_kv=hidden // 4,
        d_ff=hidden * 2,
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=4,
        decoder_start_token_id=tok.pad_token_id,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        dropout_rate=0.0,
    )
    T5ForConditionalGeneration(config).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), layers=4)


@pytest.fixture(scope="session")
def tiny_llama_student(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama_student"), layers=2, seed=1)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"), layers=3)


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> Path:
    return make_tiny_t5(tmp_path_factory.mktemp("tiny_t5"))


def short_dolly_rows(source: str, n: int, out: Path) -> Path:
    """The first `n` rows of a Dolly file (MiniLLM layout) with prompt + response under 600
    characters, written to `out`."""
    rows = []
    with open(DATA_DIR / "instruct/dolly" / source) as f:
        for line in f:
            r = json.loads(line)
            if len(r["prompt"]) + len(r["output"]) < 600:
                rows.append(r)
            if len(rows) == n:
                break
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.fixture
def instruct_file(tmp_path) -> Path:
    """A small MiniLLM-layout training file: the first Dolly rows, short ones only."""
    return short_dolly_rows("dev.jsonl", 16, tmp_path / "train.jsonl")


@pytest.fixture
def dev_file(tmp_path) -> Path:
    """A small dev set that shares no prompt with `instruct_file`: short Dolly test rows (the
    contamination guard drops training rows that are evaluation prompts)."""
    return short_dolly_rows("valid.jsonl", 8, tmp_path / "dev.jsonl")


@pytest.fixture
def fault_proxy():
    """make(upstream=None, faults=()) -> a `servers.FaultProxy`; all closed at the end."""
    from servers import FaultProxy

    proxies = []

    def make(upstream=None, faults=()):
        proxies.append(FaultProxy(upstream, list(faults)))
        return proxies[-1]

    yield make
    for p in proxies:
        p.close()
