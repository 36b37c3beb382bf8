"""Continuous batching: up to C multi-trial episodes in flight at once against one engine.

Each episode is an asyncio task that awaits its own actor requests, simulator steps and
reflections; the engine (AsyncLLM, the HF request-batching queue, or an HTTP server) batches
whatever requests are in flight. A finished episode hands its records over at once and its slot
takes the next job, so a slow episode holds only its own slot (Sample Factory / IMPALA: the
learner never waits on one slow actor; here the engine never waits on one slow episode).

The bookkeeping is the lockstep loop's (`rollout/episode.py`): the same records, keys, seeds
(`request_seed(job.seed, trial, step)`) and error handling, so the same jobs give the same records.
A request that fails (the endpoint out of retries, a prompt the engine rejects, an engine that died
under it: `EngineDead`, the backend rebuilds it) errors its own episode only; a rebuild that fails
(`EngineRebuildFailed`) stops the runner.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Optional, Protocol

from retro_dist.agents.backends import EngineRebuildFailed
from retro_dist.envs.base import Observation, Task
from retro_dist.rollout.episode import (REFLECT_STEP, EpisodeOutput, _Episode, finish_trial, reflection_error,
                                        remember, request_seed)


@dataclass
class EpisodeJob:
    task: Task
    episode_id: int  # keys: run/worker/episode/trial; a rerun of the job reuses them
    seed: int  # the episode's seed; the lockstep loop gives episode i of a batch `EpisodeIds.seed + i`


class Simulators(Protocol):
    """What the runner needs from a simulator pool (`rollout/simulators.py`): env calls off the loop.

    `owner` identifies one trial of one episode; `history` is the actions already taken in it, so a
    pool may hand a trial any simulator and restore it by reset + replay."""

    async def reset(self, owner, task: Task) -> tuple[str, Observation]: ...

    async def step(self, owner, task: Task, history: list[str], action: str) -> Observation: ...


class ContinuousRunner:
    """Runs episodes as independent tasks, at most `concurrency` at once, for one worker.

    Policies are the async ones (`agents/async_policies.py`); `reflector=None` runs retries without
    reflection. Create and `run` it inside the event loop that owns the policies."""

    def __init__(self, actor, reflector, simulators: Simulators, concurrency: int, trials: int,
                 memory_size: int, step_limit: int, run_id: str, worker_id: int):
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.actor, self.reflector, self.simulators = actor, reflector, simulators
        self.concurrency, self.trials, self.memory_size, self.step_limit = concurrency, trials, memory_size, step_limit
        self.run_id, self.worker_id = run_id, worker_id
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._slots: list[asyncio.Task] = []
        self._cancelled = False
        self._no_more = False
        self._take = asyncio.Lock()
        self._in_flight = 0
        self._done = 0
        self._errored = 0
        self._steps = 0
        self._busy_area = 0.0  # ∫ in-flight episodes dt, for the mean concurrency
        self._t_last = self._t0 = time.monotonic()

    # ---- driving -------------------------------------------------------------------------
    async def run(self, next_job: Callable[[], Awaitable[Optional[EpisodeJob]]],
                  on_done: Callable[[EpisodeJob, EpisodeOutput], None]) -> None:
        """Keep up to `concurrency` episodes in flight until `next_job()` returns None, then drain.

        `on_done(job, output)` is called as soon as an episode finishes (errored ones included);
        `next_job` is awaited by one slot at a time and may wait (backpressure, a weight load).
        After `cancel()` it returns without calling `on_done` for unfinished episodes. An exception
        raised by `next_job` or `on_done` cancels the other episodes and propagates."""
        self._loop = asyncio.get_running_loop()
        self._no_more = False  # a runner may be driven again after an earlier run drained
        self._t_last = self._t0 = time.monotonic()
        self._busy_area = 0.0
        self._slots = [asyncio.create_task(self._slot(next_job, on_done)) for _ in range(self.concurrency)]
        try:
            results = await asyncio.gather(*self._slots, return_exceptions=True)
        except asyncio.CancelledError:  # run() itself was cancelled: take the episodes down with it
            self._cancel_slots()
            await asyncio.gather(*self._slots, return_exceptions=True)
            raise
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
                raise r
        self._tick(0)

    def cancel(self) -> None:
        """Stop now (from any thread): unfinished episodes produce no output; they are rerun later
        under the same keys, and the store drops duplicates."""
        self._cancelled = True
        if self._loop is None or self._loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._cancel_slots()
        else:
            self._loop.call_soon_threadsafe(self._cancel_slots)

    def _cancel_slots(self) -> None:
        for s in self._slots:
            s.cancel()

    async def _slot(self, next_job, on_done) -> None:
        while not (self._cancelled or self._no_more):
            try:
                async with self._take:  # one slot asks at a time, so None ends the intake exactly once
                    job = None if (self._no_more or self._cancelled) else await next_job()
            except Exception:
                self._stop_others()
                raise
            if job is None:
                self._no_more = True
                return
            self._tick(+1)
            try:
                out = await self._episode(job)
            finally:
                self._tick(-1)
            self._done += 1
            self._errored += bool(out.errors)
            try:
                on_done(job, out)
            except Exception:  # the caller could not take the records (e.g. the store failed): stop
                self._stop_others()
                raise

    def _stop_others(self) -> None:
        self._cancelled = True
        for s in self._slots:
            if s is not asyncio.current_task():
                s.cancel()

    def _tick(self, delta: int) -> None:
        now = time.monotonic()
        self._busy_area += self._in_flight * (now - self._t_last)
        self._t_last, self._in_flight = now, self._in_flight + delta

    @property
    def stats(self) -> dict:
        span = max(1e-9, self._t_last - self._t0)
        return {"rollout/in_flight": self._in_flight, "rollout/episodes_done": self._done,
                "rollout/episodes_errored": self._errored, "rollout/actor_steps": self._steps,
                "rollout/mean_concurrency": self._busy_area / span}

    # ---- one episode ---------------------------------------------------------------------
    async def _episode(self, job: EpisodeJob) -> EpisodeOutput:
        """K trials of one task, with the lockstep loop's bookkeeping (`finish_trial`, `remember`)."""
        ep = _Episode(job.task, None, job.episode_id, seed=job.seed)
        out = EpisodeOutput([], [], [])
        for k in range(self.trials):
            await self._trial(ep, k)
            finish_trial(ep, out, self.run_id, self.worker_id, k,
                         self.reflector.version if self.reflector is not None else -1)
            if ep.error is not None or ep.solved:
                break
            if k + 1 < self.trials and self.reflector is not None:  # None: retries without reflection
                try:
                    gen = await self.reflector.reflect(ep.reflection_prompt(self.reflector),
                                                       seed=request_seed(ep.seed, k, REFLECT_STEP))
                except EngineRebuildFailed:
                    raise
                except Exception as err:  # the reflector failed: this episode ends, the others go on
                    out.errors.append(reflection_error(ep, k, err))
                    break
                remember(ep, gen, gen.version if gen.version is not None else self.reflector.version,
                         self.memory_size)
        return out

    async def _trial(self, ep: _Episode, k: int) -> None:
        ep.steps, ep.rewards, ep.started, ep.last = [], [], time.time(), None
        owner = (ep.episode_id, k)
        reset = await self._env(ep, self.simulators.reset(owner, ep.task))
        if reset is None:
            return
        ep.start_trial(*reset)
        for t in range(self.step_limit):
            if not ep.acting():
                return
            try:
                action = await self.actor.act(ep.actor_prompt(self.actor), seed=request_seed(ep.seed, k, t),
                                              valid_actions=ep.valid_actions())
            except EngineRebuildFailed:  # the worker's fault, not the episode's
                raise
            except Exception as err:  # the actor backend failed (out of retries, dead engine): this episode errors
                ep.error = f"{type(err).__name__}: {err}"
                return
            self._steps += 1
            history = [a for a, _ in ep.steps]
            obs = await self._env(ep, self.simulators.step(owner, ep.task, history, action))
            if obs is not None:
                ep.record_step(action, obs)

    @staticmethod
    async def _env(ep: _Episode, call: Awaitable):
        """An environment call; an exception marks the episode errored instead of ending the run."""
        try:
            return await call
        except Exception as err:  # environments are user code: any exception is the episode's, not ours
            ep.error = f"{type(err).__name__}: {err}"
            return None
