"""TextWorldExpress games (Jansen & Côté 2022): fast, offline, deterministic per (game, fold, seed)."""
from __future__ import annotations

from typing import Sequence

from retro_dist.envs.base import EnvError, Observation, Task


class TwxEnv:
    """One TextWorldExpress simulator (one JVM), reset to any game/seed of the configured params."""

    def __init__(self, game_params: str, step_limit: int):
        from textworld_express import TextWorldExpressEnv  # starts a JVM: import where used

        # The simulator's own limit is a backstop; the episode loop enforces `step_limit`.
        self._env = TextWorldExpressEnv(envStepLimit=step_limit + 1)
        self._params = game_params
        self._game = None

    def reset(self, task: Task) -> tuple[str, Observation]:
        game = task.env_name.split("/", 1)[1]
        try:
            if game != self._game:
                self._env.load(game, self._params)
                self._game = game
            obs, infos = self._env.reset(seed=task.seed, gameFold=task.split, generateGoldPath=False)
        except Exception as err:  # py4j surfaces Java exceptions as generic errors
            raise EnvError(f"twx reset {task.task_id}: {err}") from err
        return infos["taskDescription"], self._observation(obs, infos, 0.0, False)

    def step(self, action: str) -> Observation:
        try:
            obs, reward, done, infos = self._env.step(action)
        except Exception as err:
            raise EnvError(f"twx step {action!r}: {err}") from err
        return self._observation(obs, infos, float(reward), bool(done))

    @staticmethod
    def _observation(obs: str, infos: dict, reward: float, done: bool) -> Observation:
        return Observation(
            text=obs.strip(),
            valid_actions=sorted(infos.get("validActions", [])),
            reward=reward,
            score=max(0.0, min(1.0, float(infos.get("score", 0.0)))),
            done=done,
            success=bool(infos.get("tasksuccess", False)),
        )

    def seeds(self, game: str, split: str) -> list[int]:
        self._env.load(game, self._params)
        self._game = game
        getter = {"train": self._env.getValidSeedsTrain, "dev": self._env.getValidSeedsDev,
                  "test": self._env.getValidSeedsTest}[split]
        return sorted(int(s) for s in getter())

    def close(self) -> None:
        self._env.close()


def twx_tasks(games: Sequence[str], split: str, seeds_by_game: dict[str, list[int]],
              start: int, count: int, num_tasks: int) -> list[Task]:
    """Tasks number `start .. start+count-1` of a fold, cycling games then seeds (multi-task mix)."""
    tasks = []
    for i in range(start, start + count):
        game = games[i % len(games)]
        seeds = seeds_by_game[game][:num_tasks]
        seed = seeds[(i // len(games)) % len(seeds)]
        tasks.append(Task(f"twx/{game}/{split}/{seed}", f"twx/{game}", seed, split))
    return tasks
