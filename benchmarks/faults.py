"""Fault injection with real processes and real signals, shared by the fault tests and `benchmarks.chaos`.

`TrainProcess` runs `retro-dist train` as its own process group (as a user's terminal would) and
can SIGKILL the whole group; `kill_worker` finds a rollout worker's pid through Ray (the driver
writes each worker's node and pid to the run's `events.jsonl` from the actor itself) and SIGKILLs it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import psutil


def jsonl(path: Path) -> list[dict]:
    """The lines of a JSONL file that parse (a line torn by a SIGKILL mid-write does not)."""
    out = []
    for line in Path(path).read_text().splitlines() if Path(path).is_file() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def events(run_dir: Path, kind: Optional[str] = None) -> list[dict]:
    return [r for r in jsonl(Path(run_dir) / "events.jsonl") if kind is None or r["event"] == kind]


def metrics(run_dir: Path) -> list[dict]:
    return jsonl(Path(run_dir) / "metrics.jsonl")


def wait_for(check: Callable[[], object], timeout: float, what: str, proc: Optional["TrainProcess"] = None,
             every: float = 0.5):
    """Poll `check` until it returns something truthy; fail with `what` (and the driver's log tail)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        if proc is not None and proc.popen.poll() is not None:
            raise AssertionError(f"driver exited ({proc.popen.returncode}) before: {what}\n{proc.tail()}")
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for: {what}\n{proc.tail() if proc else ''}")


class TrainProcess:
    """`retro-dist train --config CONFIG --set ...` in a new session (its own process group)."""

    def __init__(self, config: str, overrides: list[str], run_dir: Path, log: Path, cwd: Path,
                 resume: bool = False, address: Optional[str] = None):
        self.run_dir, self.log_path = Path(run_dir), Path(log)
        cmd = [sys.executable, "-m", "retro_dist.cli", "train", "--config", config]
        for o in overrides:
            cmd += ["--set", o]
        if resume:
            cmd.append("--resume")
        if address:
            cmd += ["--address", address]
        self.log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(cmd, cwd=cwd, stdout=self.log, stderr=subprocess.STDOUT,
                                      start_new_session=True)

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        finally:
            self.log.flush()

    def tail(self, n: int = 40) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def kill_group(self) -> list[int]:
        """SIGKILL the driver's process group, then every descendant that left it (Ray's daemons
        start their own sessions): nothing of the run survives. Returns the pids killed."""
        try:
            family = [self.popen.pid] + [c.pid for c in psutil.Process(self.popen.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            family = []
        os.killpg(self.popen.pid, signal.SIGKILL)
        for pid in family:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.popen.wait(30)
        psutil.wait_procs([p for p in map(_process, family) if p is not None], timeout=30)
        self.log.flush()
        return family


def _process(pid: int) -> Optional[psutil.Process]:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def worker_pid(run_dir: Path, worker_id: int) -> Optional[int]:
    """The pid of the newest running incarnation of `worker_id` (from its `worker_started` event)."""
    started = [e for e in events(run_dir, "worker_started") if e["worker"] == worker_id]
    if not started or not psutil.pid_exists(started[-1]["pid"]):
        return None
    return started[-1]["pid"]


def kill_worker(run_dir: Path, worker_id: int) -> float:
    """SIGKILL the rollout worker `worker_id` of the running job; returns the time of the kill."""
    pid = worker_pid(run_dir, worker_id)
    if pid is None:
        raise AssertionError(f"worker {worker_id} has no running process in {run_dir}/events.jsonl")
    os.kill(pid, signal.SIGKILL)
    return time.time()
