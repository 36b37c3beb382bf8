"""Rollout workers as Ray actors that the driver replaces when their process dies.

A worker process can die mid-episode: `kill -9`, the OOM killer, a node that leaves the cluster.
Ray then fails every call on the actor with `RayActorError`. The supervisor starts a replacement
under the same worker id (same spec, same replay writer id, same episode numbering), and the
caller reruns what the dead one left unfinished under the same keys: the store drops keys it
already holds, so nothing is stored twice and nothing committed is lost. A worker whose
constructor raised is not replaced (it would raise again: a bad config, a missing model), and
`rollout.max_worker_restarts` bounds the replacements over the whole run.

Every death and replacement is written to `events.jsonl` in the run folder (time, worker, node,
reason, seconds to recover) and to the terminal.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Optional


class WorkerLost(RuntimeError):
    """A worker died and cannot be replaced (constructor failure, or the restart budget is spent)."""


class EventLog:
    """Append-only `events.jsonl`: the run's faults and recoveries, one JSON object per line."""

    def __init__(self, run_dir: Path, echo: Optional[Callable[[str], None]] = None):
        self.path = Path(run_dir) / "events.jsonl"
        self.echo = echo

    def write(self, event: str, message: str = "", **fields: Any) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"time": time.time(), "event": event, **fields}) + "\n")
        if message and self.echo is not None:
            self.echo(message)


def is_process_death(err: BaseException) -> bool:
    """The actor's process or node is gone (not: its constructor raised, or a method raised)."""
    from ray.exceptions import ActorDiedError, RayActorError

    if isinstance(err, ActorDiedError):
        return not err.actor_init_failed
    return isinstance(err, RayActorError)


def short_reason(err: BaseException, limit: int = 160) -> str:
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return first if len(first) <= limit else first[:limit - 1] + "…"


class WorkerSupervisor:
    """Worker actor handles by worker id; `spawn(worker_id)` builds one (non-blocking)."""

    def __init__(self, ray, spawn: Callable[[int], Any], count: int, max_restarts: int, events: EventLog):
        self.ray, self.spawn, self.max_restarts, self.events = ray, spawn, max_restarts, events
        self.handles = [spawn(i) for i in range(count)]
        self.restarts = 0
        self.died_at: dict[int, float] = {}  # worker id -> when its death was noticed (until it is back)

    def __len__(self) -> int:
        return len(self.handles)

    def replace(self, worker_id: int, err: BaseException) -> Any:
        """A new actor for `worker_id` after `err` killed the old one; raises WorkerLost when it must not."""
        if not is_process_death(err):
            raise err
        reason = short_reason(err)
        self.died_at.setdefault(worker_id, time.time())
        self.events.write("worker_died", f"retro-dist: worker {worker_id} died ({reason})",
                          worker=worker_id, reason=reason)
        if self.restarts >= self.max_restarts:
            raise WorkerLost(f"worker {worker_id} died and rollout.max_worker_restarts={self.max_restarts} "
                             f"replacements are used up; last: {reason}") from err
        self.restarts += 1
        self.ray.kill(self.handles[worker_id], no_restart=True)  # no-op for a dead actor; frees a hung one
        self.handles[worker_id] = self.spawn(worker_id)
        self.events.write("worker_replaced",
                          f"retro-dist: started a replacement for worker {worker_id} "
                          f"(restart {self.restarts}/{self.max_restarts})",
                          worker=worker_id, restart=self.restarts)
        return self.handles[worker_id]

    def ready(self, worker_id: int, where: dict) -> None:
        """The worker `worker_id` is up (constructor done; in async, engine built): note where it runs
        (`where`: node_id, pid) and, for a replacement, how long the worker was gone."""
        self.events.write("worker_started", worker=worker_id, **where)
        t = self.died_at.pop(worker_id, None)
        if t is not None:
            seconds = time.time() - t
            self.events.write("worker_recovered", f"retro-dist: worker {worker_id} is back after {seconds:.1f} s",
                              worker=worker_id, recovery_seconds=seconds, **where)

    def call_all(self, method: str, *args, timeout: Optional[float] = None) -> list:
        """`method` on every worker, skipping dead ones (their result is None): for stop/close."""
        out = []
        for h in self.handles:
            try:
                out.append(self.ray.get(getattr(h, method).remote(*args), timeout=timeout))
            except Exception as err:  # a dead or hung worker must not keep the others from stopping
                if not is_process_death(err) and not isinstance(err, self.ray.exceptions.GetTimeoutError):
                    raise
                out.append(None)
        return out
