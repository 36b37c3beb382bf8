"""A stand-in OpenAI-compatible completions server: every prompt is answered after a fixed latency.

    python -m benchmarks.fake_openai_server --latency 0.5 [--tail-fraction 0.05 --tail-factor 10]
        [--reply "look around"] [--port 0]      # prints its base URL (http://127.0.0.1:PORT/v1)

It models a server with unbounded batching: any number of requests are in flight at once and each
prompt takes `latency` seconds, or `tail_factor` × that for a random `tail_fraction` of prompts
(a heavy tail). A request with several prompts (the lockstep loop's batched call) returns when its
slowest prompt is done, as a batch does on a real server. Routes: `GET /v1/models`,
`POST /v1/completions` (`prompt` a string or a list; every choice's text is `reply`).

Plain asyncio streams (HTTP/1.1 with keep-alive), so it needs nothing beyond the standard library.
Use it in-process (`FakeOpenAIServer.start()` inside a loop, `serve_in_thread()`) or as a subprocess
(`spawn()`), which keeps its CPU off the measured process's GIL.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import subprocess
import sys
import threading
import time
from typing import Iterator, Optional


class FakeOpenAIServer:
    def __init__(self, latency_s: float = 0.05, tail_fraction: float = 0.0, tail_factor: float = 10.0,
                 reply: str = "look around", model: str = "fake", seed: int = 0,
                 host: str = "127.0.0.1", port: int = 0):
        if latency_s < 0 or not 0 <= tail_fraction <= 1 or tail_factor < 1:
            raise ValueError("need latency_s >= 0, 0 <= tail_fraction <= 1, tail_factor >= 1")
        self.latency_s, self.tail_fraction, self.tail_factor = latency_s, tail_fraction, tail_factor
        self.reply, self.model, self.host, self.port = reply, model, host, port
        self._rng = random.Random(seed)
        self._server: Optional[asyncio.base_events.Server] = None
        self.requests = self.prompts = self.slow_prompts = self.in_flight = self.max_in_flight = 0
        self.authorizations: dict[str, set] = {}  # path -> Authorization headers seen (None: none sent)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    async def start(self) -> str:
        """Listen (port 0: a free one) in the running loop; returns the base URL."""
        self._server = await asyncio.start_server(self._connection, self.host, self.port, backlog=4096)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.base_url

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _latency(self) -> float:
        slow = self._rng.random() < self.tail_fraction
        self.slow_prompts += slow
        return self.latency_s * (self.tail_factor if slow else 1.0)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # keep-alive: requests one after another on this connection
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                self.authorizations.setdefault(path, set()).add(headers.get("authorization"))
                status, payload = await self._route(method, path, body)
                data = json.dumps(payload).encode()
                close = headers.get("connection", "").lower() == "close"
                writer.write(b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                             b"Connection: %s\r\n\r\n" % (status, b"OK" if status == 200 else b"Error", len(data),
                                                          b"close" if close else b"keep-alive") + data)
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass  # the client went away (or sent garbage): drop the connection
        finally:
            writer.close()

    async def _route(self, method: str, path: str, body: bytes) -> tuple[int, dict]:
        if method == "GET" and path.rstrip("/") == "/v1/models":
            return 200, {"object": "list", "data": [{"id": self.model, "object": "model"}]}
        if method == "POST" and path.rstrip("/") == "/v1/completions":
            req = json.loads(body or b"{}")
            prompts = req.get("prompt", "")
            prompts = prompts if isinstance(prompts, list) else [prompts]
            self.requests += 1
            self.prompts += len(prompts)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                await asyncio.sleep(max(self._latency() for _ in prompts) if prompts else 0.0)
            finally:
                self.in_flight -= 1
            choices = [{"index": i, "text": self.reply, "finish_reason": "stop", "logprobs": None}
                       for i in range(len(prompts))]
            return 200, {"id": f"cmpl-{self.requests}", "object": "text_completion", "created": int(time.time()),
                         "model": self.model, "choices": choices,
                         "usage": {"prompt_tokens": 0, "completion_tokens": len(prompts), "total_tokens": len(prompts)}}
        return 404, {"error": {"message": f"no route {method} {path}"}}


@contextlib.contextmanager
def serve_in_thread(**kwargs) -> Iterator[FakeOpenAIServer]:
    """The server on its own event loop in a daemon thread (for synchronous callers and tests)."""
    server = FakeOpenAIServer(**kwargs)
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="fake-openai-server", daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@contextlib.contextmanager
def spawn(latency_s: float, tail_fraction: float = 0.0, tail_factor: float = 10.0,
          reply: str = "look around", seed: int = 0) -> Iterator[tuple[str, int]]:
    """The server as a child process; yields (base URL, pid) and stops it on exit."""
    cmd = [sys.executable, "-m", "benchmarks.fake_openai_server", "--latency", str(latency_s),
           "--tail-fraction", str(tail_fraction), "--tail-factor", str(tail_factor), "--reply", reply,
           "--seed", str(seed)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        if not url.startswith("http://"):
            raise RuntimeError(f"fake OpenAI server did not start (exit {proc.poll()})")
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--latency", type=float, default=0.05, help="seconds per prompt")
    p.add_argument("--tail-fraction", type=float, default=0.0, help="fraction of prompts that are slow")
    p.add_argument("--tail-factor", type=float, default=10.0, help="how many times slower they are")
    p.add_argument("--reply", default="look around", help="the completion text of every choice")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    server = FakeOpenAIServer(args.latency, args.tail_fraction, args.tail_factor, args.reply, seed=args.seed,
                              port=args.port)

    async def serve() -> None:
        print(await server.start(), flush=True)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()
