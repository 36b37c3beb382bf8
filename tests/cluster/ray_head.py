"""A Ray head of the tests' own, started the way users start one (`ray start --head`), on loopback,
with its own temp dir and ports, and stopped by its processes' pids (never `ray stop`, which kills
every Ray process on the host)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = ROOT / ".venv" / "bin"
RAY = str(VENV_BIN / "ray") if (VENV_BIN / "ray").exists() else "ray"
RETRO = str(VENV_BIN / "retro-dist") if (VENV_BIN / "retro-dist").exists() else "retro-dist"


def free_port(avoid=()) -> int:
    """A port free on loopback now, not in `avoid` (Ray refuses a port inside its worker range)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port


def ray_env() -> dict:
    """Loopback node address (Ray 2.60 rewrites 127.0.0.1 to the routable address without it) and
    token auth on for clients too (`ray job` clients default to no token)."""
    return {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}


class RayHead:
    def __init__(self, num_cpus: int = 3):
        # Short path: Ray's unix sockets live under the temp dir (108-byte limit).
        self.temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")
        lo = free_port() // 100 * 100 % 40000 + 20000  # a worker-port range of its own
        self.worker_ports = range(lo, lo + 100)
        self.port, self.dash_port, self.client_port, self.agent_port = self._ports(4)
        self.num_cpus = num_cpus
        self.gcs = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dash_port}"

    def _ports(self, n: int) -> list[int]:
        """n distinct free ports, none inside the worker-port range."""
        ports: list[int] = []
        while len(ports) < n:
            port = free_port(self.worker_ports)
            if port not in ports:
                ports.append(port)
        return ports

    def start(self, timeout: float = 90) -> "RayHead":
        lo, hi = self.worker_ports[0], self.worker_ports[-1]
        cmd = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.port}",
               f"--temp-dir={self.temp_dir}", f"--num-cpus={self.num_cpus}", "--num-gpus=0",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dash_port}",
               f"--min-worker-port={lo}", f"--max-worker-port={hi}", "--disable-usage-stats",
               # fixed defaults (10001, 52365) would clash with another head on this host
               f"--ray-client-server-port={self.client_port}", f"--dashboard-agent-listen-port={self.agent_port}"]
        out = subprocess.run(cmd, cwd=ROOT, env=ray_env(), capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed: {out.stderr[-2000:]}")
        deadline = time.time() + timeout
        while time.time() < deadline:  # `ray status` exits 0 while still starting: wait for Active:
            st = subprocess.run([RAY, "status", "--address", self.gcs], env=ray_env(), capture_output=True,
                                text=True, timeout=60)
            if "Active:" in st.stdout:
                return self
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"Ray head at {self.gcs} not active after {timeout} s")

    def pids(self) -> set[int]:
        """Processes whose command line names this head's temp dir, and all their descendants
        (Ray's workers are renamed `ray::...` and do not name it)."""
        parent, own = {}, set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
                parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if self.temp_dir in cmdline:
                own.add(int(entry.name))
        grew = True
        while grew:
            more = {pid for pid, ppid in parent.items() if ppid in own} - own
            own |= more
            grew = bool(more)
        own.discard(os.getpid())
        return own

    def stop(self, grace: float = 10) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.pids()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + grace
            while pids and time.time() < deadline:
                pids = {p for p in pids if Path(f"/proc/{p}").exists() and not _zombie(p)}
                time.sleep(0.2)
            if not pids:
                break
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False
