"""Environment families, and the mixed environment a worker steps.

A family (`twx`, `textworld`, `hotpotqa`, `alfworld`) knows how to list its tasks per split, build a
simulator, and, where it can, give an oracle plan (the shortest known action sequence) used by the
oracle-reflection arm of `retro-dist eval` and by actor pretraining. Games are named
`<family>/<game>`; a multi-task run lists several and tasks interleave round-robin, each prompt
naming its game (task-conditioned prompts).
"""
from __future__ import annotations

import importlib
import threading
from typing import Optional, Protocol

from retro_dist.config import EnvConfig
from retro_dist.envs.base import EnvError, Observation, Task, TextEnv
from retro_dist.envs.timeouts import CallThread, EnvTimeout

# family name -> "module:Class"; imported on first use so a run pays only for what it uses
FAMILIES = {
    "twx": "retro_dist.envs.twx:TwxFamily",
    "textworld": "retro_dist.envs.textworld_games:TextWorldFamily",
    "hotpotqa": "retro_dist.envs.hotpotqa:HotpotQAFamily",
    "alfworld": "retro_dist.envs.alfworld:AlfworldFamily",
}


class EnvFamily(Protocol):
    def tasks(self, game: str, split: str, count: int) -> list[Task]:
        """The first `count` tasks of `game` in `split`, in a stable order."""
        ...

    def make(self) -> TextEnv:
        """A fresh simulator that can be reset to any task of this family."""
        ...

    def oracle_plan(self, task: Task) -> Optional[list[str]]:
        """Shortest known action sequence that solves `task` (None if the family has none)."""
        ...


def family(name: str, cfg: EnvConfig) -> EnvFamily:
    if name not in FAMILIES:
        raise ValueError(f"unknown environment family '{name}' (known: {', '.join(FAMILIES)})")
    module, cls = FAMILIES[name].split(":")
    return getattr(importlib.import_module(module), cls)(cfg)


def split_game(spec: str) -> tuple[str, str]:
    fam, _, game = spec.partition("/")
    return fam, game


class TaskMix:
    """The tasks of a split across the configured games, listed once: games round-robin, then in order."""

    def __init__(self, cfg: EnvConfig, split: str):
        self.games = list(cfg.games)
        self.pools = {}
        for g in self.games:
            fam, game = split_game(g)
            self.pools[g] = family(fam, cfg).tasks(game, split, cfg.num_tasks)
            if not self.pools[g]:
                raise ValueError(f"env.games: '{g}' has no tasks in split '{split}'")

    def take(self, start: int, count: int) -> list[Task]:
        out = []
        for i in range(start, start + count):
            pool = self.pools[self.games[i % len(self.games)]]
            out.append(pool[(i // len(self.games)) % len(pool)])
        return out


def parse_step_limits(text: str) -> dict[str, int]:
    """`env.step_limits` (`twx/coin: 2; twx/mapreader: 6`) as {game: limit}; "" gives {}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        game, sep, limit = part.rpartition(":")
        if not sep or not game.strip() or not limit.strip().isdigit() or int(limit) < 1:
            raise ValueError(f"env.step_limits: {part!r} is not `<family>/<game>: <steps >= 1>`")
        out[game.strip()] = int(limit)
    return out


class MixedEnv:
    """One slot of a worker: dispatches each task to its family's simulator (built on first use).

    A game named in `env.step_limits` ends its trial (done, failed unless it just succeeded) after
    that many steps, here rather than in each runtime's episode loop, which runs `env.step_limit`
    steps (the largest) for every game of a mix.

    With `env.step_timeout_s` set, each reset and step runs on the slot's own thread and may take
    that long (starting a simulator is not timed): a call past it raises EnvTimeout, the hung
    simulator is killed (its JVM; the stuck call then fails) and the next reset builds a new one."""

    def __init__(self, cfg: EnvConfig):
        self.cfg = cfg
        self._envs: dict[str, TextEnv] = {}
        self._current: Optional[str] = None  # family of the task being played
        self._thread: Optional[CallThread] = None  # runs the timed calls; replaced after a timeout
        self._limits = parse_step_limits(cfg.step_limits)
        self._steps_left: Optional[int] = None  # this trial's own limit, when its game has one

    def reset(self, task: Task) -> tuple[str, Observation]:
        fam = split_game(task.env_name)[0]
        if fam not in self._envs:
            self._envs[fam] = family(fam, self.cfg).make()
        self._current = fam
        self._steps_left = self._limits.get(task.env_name)
        return self._guarded(fam, lambda env: env.reset(task))

    def step(self, action: str) -> Observation:
        if self._current not in self._envs:
            raise EnvError(f"step {action!r} without a live simulator: its last call failed, reset first")
        obs = self._guarded(self._current, lambda env: env.step(action))
        if self._steps_left is not None:
            self._steps_left -= 1
            if self._steps_left <= 0:
                obs.done = True
        return obs

    def _guarded(self, fam: str, call):
        """A simulator that raised may be dead (a crashed JVM) and one that timed out is hung: drop
        it (killing a hung one), so the next reset builds a new one."""
        env = self._envs[fam]
        try:
            return self._timed(lambda: call(env))
        except EnvTimeout:
            self._envs.pop(fam, None)
            self._thread = None  # abandoned: it is still stuck in the call
            kill(env)
            raise
        except Exception:
            self._envs.pop(fam, None)
            try:
                env.close()
            except Exception:  # already dead; closing is best effort
                pass
            raise

    def _timed(self, fn):
        timeout = self.cfg.step_timeout_s
        if timeout is None:
            return fn()
        if self._thread is None:
            self._thread = CallThread("env-call")
        return self._thread.call(fn, timeout)

    def close(self) -> None:
        if self._thread is not None:
            self._thread.close()
            self._thread = None
        for env in self._envs.values():
            env.close()
        self._envs = {}


def kill(env: TextEnv) -> None:
    """Stop a hung simulator without asking it: `kill()` where it has one (twx: SIGKILL its JVM),
    else `close()` on a daemon thread, since a hung simulator may never answer that either."""
    try:
        if hasattr(env, "kill"):
            env.kill()
        else:
            threading.Thread(target=env.close, name="env-close", daemon=True).start()
    except Exception:  # best effort: the simulator is abandoned either way
        pass
