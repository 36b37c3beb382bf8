"""A bounded pool of simulators that many concurrent episodes share (async mode).

Every TextWorldExpress simulator is a JVM (~50 MB RSS with our flags, ~80-300 MB without), so a
worker running hundreds of episodes at once cannot keep one per episode. Episodes hold a simulator
only inside one `reset` or `step` call. Between calls a simulator keeps the state of the episode
trial it last ran (its *owner*); when that owner comes back it steps on directly (affinity).
Otherwise the pool restores the owner's state on any free simulator by reset + replaying the trial's
actions: our games are deterministic per task (tests/rollout/test_simulators.py checks it), so the
replayed state is the state the episode left. At most `size` simulators exist; callers beyond that
wait in arrival order. Env calls run on `size` threads, off the event loop.

A simulator that raises, or hangs past `env.step_timeout_s` (its `MixedEnv` times each reset and
step, and kills a hung JVM so the stuck thread returns), is replaced by a fresh one; the error
reaches only the episode whose call it was, and the others go on.
"""
from __future__ import annotations

import asyncio
import collections
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Hashable, Optional

from retro_dist.config import EnvConfig
from retro_dist.envs.base import Observation, Task
from retro_dist.envs.registry import MixedEnv
from retro_dist.envs.timeouts import EnvTimeout


@dataclass
class _Slot:
    env: MixedEnv
    owner: Optional[Hashable] = None  # whose trial this simulator's state is
    steps: int = 0  # actions of that trial already applied
    done: bool = False  # that trial's game is over: nobody will step it again
    last_used: float = 0.0


class SimulatorPool:
    """`size` simulators shared by any number of episodes; one call holds one simulator."""

    def __init__(self, env_cfg: EnvConfig, size: int):
        if size < 1:
            raise ValueError(f"simulator pool size must be >= 1, got {size}")
        self.cfg = env_cfg
        self.size = size
        self._slots: list[_Slot] = []  # every simulator built so far (≤ size)
        self._free: list[_Slot] = []
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._threads = ThreadPoolExecutor(max_workers=size, thread_name_prefix="simulator")
        self._stats = collections.Counter(resets=0, restores=0, replayed_steps=0, steps=0, rebuilt=0,
                                          timeouts=0, waits=0)
        self._wait_seconds = 0.0

    @property
    def stats(self) -> dict:
        """Counters since start: resets (trial starts), restores (reset + replay for a step whose
        owner's state was elsewhere), replayed_steps, steps (actor steps), rebuilt (simulators
        replaced after raising), timeouts (calls past `env.step_timeout_s`; those simulators are
        rebuilt too), waits / wait_seconds (calls that found every simulator busy),
        created (simulators built) and size."""
        return {**self._stats, "wait_seconds": self._wait_seconds, "created": len(self._slots),
                "size": self.size}

    async def reset(self, owner: Hashable, task: Task) -> tuple[str, Observation]:
        """Start a trial of `task` for `owner`; returns (instruction, first observation)."""
        slot = await self._acquire(owner)
        try:
            out = await self._call(slot, lambda env: env.reset(task))
            slot.owner, slot.steps, slot.done = owner, 0, out[1].done
            self._stats["resets"] += 1
            return out
        finally:
            self._release(slot)

    async def step(self, owner: Hashable, task: Task, history: list[str], action: str) -> Observation:
        """Apply `action` to `owner`'s trial of `task`, whose earlier actions were `history`."""
        slot = await self._acquire(owner, len(history))
        try:
            if slot.owner != owner or slot.steps != len(history):
                await self._call(slot, lambda env: _replay(env, task, history))
                self._stats["restores"] += 1
                self._stats["replayed_steps"] += len(history)
                slot.owner, slot.steps = owner, len(history)
            obs = await self._call(slot, lambda env: env.step(action))
            slot.steps, slot.done = slot.steps + 1, obs.done
            self._stats["steps"] += 1
            return obs
        finally:
            self._release(slot)

    def close(self) -> None:
        self._threads.shutdown(wait=True)
        for slot in self._slots:
            _close_quietly(slot.env)
        self._slots, self._free = [], []

    # ---- simulators in and out ------------------------------------------------------------

    async def _acquire(self, owner: Hashable, steps: Optional[int] = None) -> _Slot:
        """The free simulator holding `owner`'s state (at `steps`), else a new one while fewer than
        `size` exist, else a free one holding no live game (none yet, or a finished one), else the
        least recently used free one, else the next one released."""
        mine = [s for s in self._free if s.owner == owner and (steps is None or s.steps == steps)]
        if mine:
            slot = mine[0]
        elif len(self._slots) < self.size:
            slot = _Slot(MixedEnv(self.cfg))  # cheap: the JVM starts on its first reset, in a thread
            self._slots.append(slot)
            return slot
        elif self._free:
            slot = min(self._free, key=lambda s: (s.owner is not None and not s.done, s.last_used))
        else:
            return await self._wait()
        self._free.remove(slot)
        return slot

    async def _wait(self) -> _Slot:
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        t0 = time.perf_counter()
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # handed a simulator, then cancelled: pass it on
                self._release(fut.result())
            raise
        finally:
            self._stats["waits"] += 1
            self._wait_seconds += time.perf_counter() - t0

    def _release(self, slot: _Slot) -> None:
        slot.last_used = time.monotonic()
        while self._waiters:  # hand it straight to the longest waiter still waiting
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(slot)
                return
        self._free.append(slot)

    async def _call(self, slot: _Slot, fn):
        """Run `fn(env)` on a pool thread. A simulator that raised may be dead or mid-state, one that
        timed out was hung (and is killed): replace it with a fresh one (built on its next reset)
        and let the error reach only this caller. The pool thread waits at most
        `env.step_timeout_s` per env call, so a hung simulator never holds one for good."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._threads, fn, slot.env)
        except BaseException as err:
            broken, slot.env = slot.env, MixedEnv(self.cfg)
            slot.owner, slot.steps, slot.done = None, 0, False
            self._stats["rebuilt"] += 1
            self._stats["timeouts"] += isinstance(err, EnvTimeout)
            self._threads.submit(_close_quietly, broken)
            raise


def _replay(env: MixedEnv, task: Task, history: list[str]) -> None:
    env.reset(task)
    for action in history:
        env.step(action)


def _close_quietly(env: MixedEnv) -> None:
    try:
        env.close()
    except Exception:  # a simulator that already died cannot be closed cleanly; nothing to keep
        pass
