"""Environment families, and the mixed environment a worker steps.

A family (`twx`, `textworld`, `hotpotqa`, `alfworld`) knows how to list its tasks per split, build a
simulator, and, where it can, give an oracle plan (the shortest known action sequence) used by the
oracle-reflection arm of `retro-dist eval` and by actor pretraining. Games are named
`<family>/<game>`; a multi-task run lists several and tasks interleave round-robin, each prompt
naming its game (task-conditioned prompts).
"""
from __future__ import annotations

import importlib
from typing import Optional, Protocol

from retro_dist.config import EnvConfig
from retro_dist.envs.base import Observation, Task, TextEnv

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


class MixedEnv:
    """One slot of a worker: dispatches each task to its family's simulator (built on first use)."""

    def __init__(self, cfg: EnvConfig):
        self.cfg = cfg
        self._envs: dict[str, TextEnv] = {}
        self._current: Optional[str] = None  # family of the task being played

    def reset(self, task: Task) -> tuple[str, Observation]:
        fam = split_game(task.env_name)[0]
        if fam not in self._envs:
            self._envs[fam] = family(fam, self.cfg).make()
        self._current = fam
        return self._guarded(lambda env: env.reset(task))

    def step(self, action: str) -> Observation:
        return self._guarded(lambda env: env.step(action))

    def _guarded(self, call):
        """A simulator that raised may be dead (a crashed JVM): drop it, so the next reset builds a new one."""
        env = self._envs[self._current]
        try:
            return call(env)
        except Exception:
            self._envs.pop(self._current, None)
            try:
                env.close()
            except Exception:  # already dead; closing is best effort
                pass
            raise

    def close(self) -> None:
        for env in self._envs.values():
            env.close()
