"""A rollout worker's own loop in `run.mode: async`: episodes stream into the store without a barrier.

The worker runs up to `rollout.concurrent_episodes` multi-trial episodes at once on one engine
(continuous batching: a finished episode is replaced at once), borrowing simulators from a bounded
pool. Each finished episode's rows are appended to the worker's replay writer at once; segments
seal on the store's row/byte/age policy, so the learner sees them within seconds. Before starting
an episode the worker loads the newest published adapter; if it is still more than
`learner.max_policy_lag` versions behind the newest (it could not load it), it starts nothing
until it catches up (backpressure). A plain class: `launch/` wraps it with `ray.remote`.

Threading: `start()` returns at once; the loop runs on its own thread with its own asyncio event
loop, which also owns the engine (vLLM's AsyncLLM binds to the loop that creates it). `poll()` and
`stop()` are called from the actor's main thread.
"""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from retro_dist.agents.policies import backend_counters
from retro_dist.core import staleness
from retro_dist.core.recovery import RerunPlan
from retro_dist.core.records import to_batch
from retro_dist.core.stats import count_by_game, cumulative_success, first_success
from retro_dist.envs.registry import TaskMix
from retro_dist.replay.writer import ReplayWriter
from retro_dist.rollout.weight_source import WeightSource
from retro_dist.rollout.worker import WorkerSpec, check_probe

_BACKPRESSURE_POLL_S = 0.5


@dataclass
class _Counters:
    """What the worker did since the last poll (reset by poll)."""

    episodes: int = 0
    trials: int = 0
    reflections: int = 0
    reward_sum: float = 0.0
    stored: int = 0
    success_sum: Optional[np.ndarray] = None  # (K,) episodes solved at or before each trial
    errors: list = field(default_factory=list)
    versions: set = field(default_factory=set)  # reflector versions of the reflections written
    syncs: list = field(default_factory=list)
    paused_seconds: float = 0.0
    by_game: dict = field(default_factory=dict)  # core.stats.count_by_game


class StreamingWorker:
    def __init__(self, spec: WorkerSpec, weight_source: WeightSource, max_policy_lag: int,
                 plan: Optional[RerunPlan] = None):
        self.spec = spec
        self.weight_source = weight_source  # also tells the newest published version (newest_version())
        self.max_policy_lag = max_policy_lag
        self.tasks = TaskMix(spec.env, spec.env.split)
        plan = plan or RerunPlan()
        self._next_group = plan.next_n  # n-th task group this worker takes (see staleness.episode_group)
        self._redo = list(plan.redo)  # a restart's unfinished episodes, rerun first under their keys
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._counts = _Counters()
        self._thread: Optional[threading.Thread] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._runner = None
        self._writer: Optional[ReplayWriter] = None
        self._error: Optional[BaseException] = None
        self._pending: list = []  # episode jobs of a group not handed out yet
        self._t_poll = self._t_start = time.monotonic()
        self._busy = 0.0  # seconds with at least one episode in flight (interval)
        self.version = -1
        self.consecutive_errors = 0
        self.ready = threading.Event()  # set once the engine is built and the first adapter loaded

    # ---- control ---------------------------------------------------------------------------------

    def start(self, wait_ready_s: float = 600.0) -> dict:
        """Build the engine on the loop thread and start streaming; returns once it is ready."""
        self._thread = threading.Thread(target=self._thread_main, name=f"worker-{self.spec.worker_id}",
                                        daemon=True)
        self._thread.start()
        while not self.ready.wait(0.5):
            if self._error is not None or not self._thread.is_alive():
                break
            wait_ready_s -= 0.5
            if wait_ready_s <= 0:
                raise TimeoutError(f"worker {self.spec.worker_id}: engine not ready after start-up timeout")
        self._raise_if_failed()
        return {"worker_id": self.spec.worker_id, "version": self.version}

    def poll(self) -> dict:
        """Counters since the last poll; re-raises an error that stopped the loop."""
        self._raise_if_failed()
        with self._lock:
            c, self._counts = self._counts, _Counters()
            busy, self._busy = self._busy, 0.0
        now = time.monotonic()
        wall, self._t_poll = now - self._t_poll, now
        runner = self._runner.stats if self._runner is not None else {}
        return {"worker_id": self.spec.worker_id, "episodes": c.episodes, "trials": c.trials,
                "reflections": c.reflections, "reward_sum": c.reward_sum, "stored": c.stored,
                "success_sum": None if c.success_sum is None else c.success_sum.tolist(),
                "errors": c.errors, "versions": sorted(c.versions), "syncs": c.syncs, "by_game": c.by_game,
                "version": self.version, "paused_seconds": c.paused_seconds, "wall_seconds": wall,
                "busy_fraction": staleness.busy_fraction(busy, wall), "runner": runner,
                "committed_rows": self._writer.committed_rows if self._writer is not None else 0,
                **backend_counters(getattr(self, "actor", None), getattr(self, "reflector", None))}

    def stop(self, timeout: float = 120.0) -> dict:
        """Stop taking episodes, cancel the ones in flight (they are rerun under the same keys by a
        later run), seal the writer; returns the last counters."""
        self._stop.set()
        if self._loop is not None and self._runner is not None:
            self._loop.call_soon_threadsafe(self._runner.cancel)
        if self._thread is not None:
            self._thread.join(timeout)
        out = self.poll()
        out["next_group"] = self._next_group
        return out

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            err = self._error
            raise RuntimeError(f"worker {self.spec.worker_id} stopped: {type(err).__name__}: {err}") from err

    # ---- the loop thread -------------------------------------------------------------------------

    def _thread_main(self) -> None:
        try:
            asyncio.run(_Stream(self).main())
        except BaseException as err:  # surfaced by poll()
            self._error = err

    def _take_group(self) -> list[tuple]:
        """(task, episode id, seed) for the episodes of this worker's next group: the missing ones of
        a group a previous life left unfinished, else all `repeats_per_task` of the next new group."""
        s, r = self.spec, self.spec.rollout
        if self._redo:
            group, ids = self._redo.pop(0)
        else:
            group = staleness.episode_group(s.worker_id, max(1, s.num_workers), self._next_group)
            self._next_group += 1
            ids = staleness.group_episode_ids(group, r.repeats_per_task)
        index = staleness.group_task(group, max(1, s.num_workers), len(self.tasks.games))
        (task,) = self.tasks.take(index, 1)
        return [(task, e, s.seed * 7919 + e) for e in ids]

    def _on_done(self, job, out) -> None:
        """An episode finished: store its rows now, count it."""
        stored = 0
        if out.trials:
            stored += self._writer.append("trials", to_batch(out.trials))
        if out.reflections:
            stored += self._writer.append("reflections", to_batch(out.reflections))
        trials = self.spec.rollout.trials
        first = first_success(out.trials)
        with self._lock:
            c = self._counts
            c.episodes += 1
            c.trials += len(out.trials)
            c.reflections += len(out.reflections)
            c.reward_sum += sum(x.reward for x in out.reflections)
            c.stored += stored
            c.versions.update(x.policy_version for x in out.reflections)
            c.errors.extend(out.errors)
            succ = cumulative_success([first.get(job.episode_id)], trials)
            c.success_sum = succ if c.success_sum is None else c.success_sum + succ
            count_by_game(c.by_game, [job.task.env_name], [first.get(job.episode_id)], trials,
                          [(x.env_name, x.reward) for x in out.reflections])
        self._count_errors(out.errors)

    def _count_errors(self, errors: list) -> None:
        """Episodes errored in a row; past the limit the worker stops instead of running empty."""
        self.consecutive_errors = self.consecutive_errors + 1 if errors else 0
        limit = self.spec.rollout.max_consecutive_errors
        if self.consecutive_errors >= limit and self._error is None:
            self._error = RuntimeError(f"worker {self.spec.worker_id}: {self.consecutive_errors} episodes errored "
                                       f"in a row (rollout.max_consecutive_errors={limit}); last: {errors[-1]}")
            self._stop.set()
            self._runner.cancel()


class _Stream:
    """The worker's coroutines, run on its loop thread (kept off the worker class: Ray makes a class
    with coroutine methods an asyncio actor and would run start/poll/stop on its event loop)."""

    def __init__(self, worker: StreamingWorker):
        self.w = worker

    async def main(self) -> None:
        from retro_dist.agents.async_policies import build_async_policies
        from retro_dist.rollout.concurrent import ContinuousRunner
        from retro_dist.rollout.simulators import SimulatorPool

        w, s, r = self.w, self.w.spec, self.w.spec.rollout
        w._loop = asyncio.get_running_loop()
        w.actor, w.reflector = await build_async_policies(s.actor, s.reflector, s.vllm, seed=s.seed + s.worker_id,
                                                          max_in_flight=r.concurrent_episodes)
        pool = SimulatorPool(s.env, r.simulators)
        w._writer = ReplayWriter(s.replay_root, f"worker-{s.worker_id}", s.replay)
        try:
            await self.pull()
            w.ready.set()
            w._runner = ContinuousRunner(w.actor, w.reflector, pool, r.concurrent_episodes, r.trials,
                                         r.memory_size, s.env.step_limit, s.run_id, s.worker_id)
            busy = asyncio.create_task(self.track_busy())
            try:
                await w._runner.run(self.next_job, w._on_done)
            finally:
                busy.cancel()
        finally:
            w._writer.close()  # seals what is open: every finished episode's rows are committed
            pool.close()
            for backend in {id(p.backend): p.backend for p in (w.actor, w.reflector)}.values():
                await backend.close()  # one engine may serve both roles: close it once

    async def track_busy(self, tick: float = 0.1) -> None:
        """Seconds with at least one episode in flight (the worker's busy fraction)."""
        while True:
            await asyncio.sleep(tick)
            if self.w._runner.stats.get("rollout/in_flight", 0) > 0:
                with self.w._lock:
                    self.w._busy += tick

    async def pull(self) -> None:
        """Load the newest adapter if there is a newer one, and check the probe."""
        w = self.w
        t0 = time.monotonic()
        adapter = await asyncio.to_thread(w.weight_source, w.version)
        if adapter is None:
            return
        w.reflector.load(adapter)  # requests submitted from now on use it; running ones keep theirs
        probe = adapter.extra["probe"]
        gap = check_probe(await w.reflector.score(probe["prompt_ids"], probe["completion_ids"]), adapter,
                          w.spec.probe_tolerance, w.spec.worker_id)
        w.version = adapter.version
        with w._lock:
            w._counts.syncs.append({"sync/seconds": time.monotonic() - t0, "sync/probe_gap": gap,
                                    "sync/version": adapter.version})

    async def next_job(self):
        """The next episode to start, after loading new weights; None once stopping."""
        from retro_dist.rollout.concurrent import EpisodeJob

        w = self.w
        if w._stop.is_set():
            return None
        await self.pull()
        t0 = time.monotonic()
        while not staleness.worker_may_start(w.version, await asyncio.to_thread(w.weight_source.newest_version),
                                             w.max_policy_lag):
            if w._stop.is_set():
                return None
            await asyncio.sleep(_BACKPRESSURE_POLL_S)
            await self.pull()
        with w._lock:
            w._counts.paused_seconds += time.monotonic() - t0
        if not w._pending:
            w._pending = w._take_group()
        return EpisodeJob(*w._pending.pop(0))
