"""A small client for OpenAI-compatible servers (vLLM, llama.cpp, Ollama, hosted APIs).

Standard library only: one keep-alive `http.client` connection per worker thread and
a thread pool holding at most K requests in flight (`complete_all`). Each request has
a timeout; 429, 5xx and connection errors are retried with exponential backoff and
jitter (honouring `Retry-After`); any other 4xx is a `ServerError` at once, since
repeating a bad request cannot fix it. The API key is read from an environment
variable by the caller and only ever placed in the Authorization header: it is never
part of an error message, a log line or an output record.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import urllib.parse
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, TypeVar

Job = TypeVar("Job")


class ServerError(RuntimeError):
    """The server refused a request, or kept failing after every retry."""


@dataclass
class Completion:
    text: str
    tokens: int            # generated tokens as the server counts them (`usage.completion_tokens`)
    finish_reason: str = ""


# Where a server's API key is read from, in order (a recipe never holds the key itself).
API_KEY_VARIABLES = ("LMDISTILL_API_KEY", "OPENAI_API_KEY")


class OpenAIClient:
    """Completions or chat completions against one server; thread-safe."""

    def __init__(self, base_url: str, model: str, api: str = "completions", timeout: float = 120.0,
                 max_retries: int = 5, backoff: float = 1.0, max_backoff: float = 30.0,
                 api_key: Optional[str] = None):
        if api not in ("completions", "chat"):
            raise ValueError(f"api: expected 'completions' or 'chat', got {api!r}")
        parts = urllib.parse.urlsplit(base_url)
        self.https = parts.scheme == "https"
        self.netloc = parts.netloc
        self.path = parts.path.rstrip("/") + ("/chat/completions" if api == "chat" else "/completions")
        self.url = f"{parts.scheme}://{parts.netloc}{self.path}"  # for messages: never holds the key
        self.model, self.api = model, api
        self.timeout, self.max_retries, self.backoff, self.max_backoff = timeout, max_retries, backoff, max_backoff
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._local = threading.local()
        self._closed = threading.Event()  # set by close(): stop retrying (e.g. the run was interrupted)
        # Jitter from a private generator: retries must not move the global `random` stream a
        # training run samples from (a resumed run would otherwise diverge after a retry).
        self._jitter = random.Random()

    def close(self) -> None:
        """Make requests still retrying give up at once, so an interrupted run exits promptly."""
        self._closed.set()

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
            conn = cls(self.netloc, timeout=self.timeout)
            self._local.conn = conn
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
        self._local.conn = None

    def _post(self, body: bytes) -> tuple[int, str, Optional[str], bytes]:
        conn = self._connection()
        try:
            conn.request("POST", self.path, body=body, headers=self._headers)
            response = conn.getresponse()
            payload = response.read()
        except BaseException:
            self._drop_connection()  # a half-used connection cannot be reused
            raise
        if response.getheader("Connection", "").lower() == "close":
            self._drop_connection()
        return response.status, response.reason, response.getheader("Retry-After"), payload

    def request_body(self, prompt: str | list[dict], max_tokens: int, temperature: float, top_p: float,
                     stop: Iterable[str] = (), seed: Optional[int] = None) -> dict:
        body: dict = {"model": self.model, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p}
        if self.api == "chat":
            body["messages"] = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        else:
            if isinstance(prompt, list):
                raise ValueError("the completions API takes a text prompt, not chat messages")
            body["prompt"] = prompt
        stop = list(stop)
        if stop:
            body["stop"] = stop[:4]  # the OpenAI API accepts at most 4 stop sequences
        if seed is not None:
            body["seed"] = seed
        return body

    def complete(self, prompt: str | list[dict], max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 stop: Iterable[str] = (), seed: Optional[int] = None) -> Completion:
        """One completion; retries 429/5xx/connection errors, raises ServerError otherwise."""
        return self._parse(self.post(self.request_body(prompt, max_tokens, temperature, top_p, stop, seed)))

    def post(self, request: dict) -> bytes:
        """The 200 response body to one JSON request; retries 429/5xx/connection errors with
        backoff, raises ServerError on any other status or when the retries run out."""
        body = json.dumps(request).encode()
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                status, reason, retry_after, payload = self._post(body)
            except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, bad status line
                problem = f"connection error ({type(e).__name__}: {e})"
            else:
                if status == 200:
                    return payload
                snippet = payload[:300].decode("utf-8", "replace")
                problem = f"HTTP {status} {reason}: {snippet}"
                if not (status == 429 or status >= 500):
                    raise ServerError(f"{self.url}: {problem} (not retried: the request itself was refused)")
            if attempt == self.max_retries:
                raise ServerError(f"{self.url}: giving up after {attempt + 1} attempts; last: {problem}")
            if self._closed.wait(self._delay(attempt, retry_after)):
                raise ServerError(f"{self.url}: client closed while retrying; last: {problem}")
        raise AssertionError("unreachable")

    def _delay(self, attempt: int, retry_after: Optional[str]) -> float:
        # Exponential backoff with jitter, so K workers that failed together don't retry in lockstep.
        delay = min(self.max_backoff, self.backoff * 2 ** attempt) * self._jitter.uniform(0.5, 1.0)
        if retry_after:
            try:
                delay = max(delay, min(self.max_backoff, float(retry_after)))
            except ValueError:
                pass  # an HTTP date: the exponential delay stands
        return delay

    def _parse(self, payload: bytes) -> Completion:
        try:
            data = json.loads(payload)
            choice = data["choices"][0]
            text = choice["message"]["content"] if self.api == "chat" else choice["text"]
            tokens = int((data.get("usage") or {}).get("completion_tokens") or 0)
        except (ValueError, KeyError, IndexError, TypeError) as e:
            snippet = payload[:300].decode("utf-8", "replace")
            raise ServerError(f"{self.url}: unexpected response ({type(e).__name__}: {e}): {snippet}") from None
        return Completion(text=text or "", tokens=tokens, finish_reason=str(choice.get("finish_reason") or ""))


def complete_all(fn: Callable[[Job], Completion], jobs: Iterable[Job],
                 concurrency: int) -> Iterator[tuple[Job, Completion]]:
    """Run `fn` over `jobs` with at most `concurrency` calls in flight; yield (job, result)
    as each finishes. A job is submitted only when a slot frees, so an interrupted run
    loses at most `concurrency` requests. On an error, results that already finished are
    yielded first, then the error is raised and nothing more is submitted."""
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="teacher")
    pending: dict = {}
    queue = iter(jobs)
    try:
        while True:
            while len(pending) < concurrency:
                job = next(queue, None)
                if job is None:
                    break
                pending[pool.submit(fn, job)] = job
            if not pending:
                return
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            error = None
            for future in done:
                job = pending.pop(future)
                if future.exception() is not None:
                    error = error or future.exception()
                else:
                    yield job, future.result()
            if error is not None:
                raise error
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
