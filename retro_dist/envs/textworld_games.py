"""TextWorld games (Côté et al. 2018), generated offline with `tw-make` and played through `textworld.gym`.

A game name is a preset of `tw-make` arguments:

    simple    custom: 3 rooms, 4 objects, quest of 2 actions
    medium    custom: 5 rooms, 8 objects, quest of 4 actions
    coin      tw-coin_collector --level 5 (walk to the coin and take it)
    treasure  tw-treasure_hunter --level 5 (find the named object among distractors)
    cooking   tw-cooking: 1-ingredient recipe, 6 rooms, closed containers; food items drawn from
              the fold's own distribution (tw-cooking --split train/valid/test)

Folds are seed ranges: train 0..9999, dev 10000..19999, test 20000..29999. A game is generated the
first time a task is reset (a few seconds) and cached as `<textworld_cache>/<game>-<args hash>/<seed>/`;
listing tasks never generates. The objective is the instruction, the room description the first
observation, the admissible commands the valid actions, and the score is normalised by the game's
maximum; success means the game is won.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Optional

from retro_dist.envs.base import EnvError, Observation, Task, one_line_error

PRESETS = {
    "simple": ["custom", "--world-size", "3", "--nb-objects", "4", "--quest-length", "2"],
    "medium": ["custom", "--world-size", "5", "--nb-objects", "8", "--quest-length", "4"],
    "coin": ["tw-coin_collector", "--level", "5"],
    "treasure": ["tw-treasure_hunter", "--level", "5"],
    "cooking": ["tw-cooking", "--recipe", "1", "--take", "1", "--go", "6", "--open", "--split", "{fold}"],
}
FOLD_SEEDS = {"train": 0, "dev": 10_000, "test": 20_000}  # first seed of each fold
FOLD_SIZE = 10_000
_COOKING_FOLD = {"train": "train", "dev": "valid", "test": "test"}
_PROMPT_LINE = re.compile(r"\n>[^\n]*$")  # the interpreter's "> -= Room =-0/3" status line
_END = "*** The End ***"  # what follows is the interpreter's restart menu, not the game


def preset_args(game: str, split: str) -> list[str]:
    if game not in PRESETS:
        raise ValueError(f"unknown textworld game '{game}' (presets: {', '.join(PRESETS)})")
    return [a.replace("{fold}", _COOKING_FOLD[split]) for a in PRESETS[game]]


def game_dir(cache: Path, game: str, split: str, seed: int) -> Path:
    # The hash of the arguments names the folder so that editing a preset never serves stale games.
    args = preset_args(game, split)
    digest = hashlib.sha1(" ".join(args).encode()).hexdigest()[:8]
    return cache / f"{game}-{digest}" / str(seed)


def ensure_game(cache: Path, game: str, split: str, seed: int) -> Path:
    """Path of the game's `.z8`, generating it first if the cache lacks it."""
    final = game_dir(cache, game, split, seed)
    if not (final / "game.z8").is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{seed}-"))
        try:
            _tw_make(preset_args(game, split) + ["--seed", str(seed)], tmp / "game.z8")
            # A folder rename is atomic: a killed generation leaves only a dot-folder, never a half
            # game; if another worker won the race its copy is identical and ours is dropped.
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / "game.z8").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final / "game.z8"


def _tw_make(args: list[str], output: Path) -> None:
    script = Path(sys.executable).with_name("tw-make")
    cmd = [sys.executable, str(script)] if script.is_file() else [shutil.which("tw-make") or "tw-make"]
    cmd += args + ["--output", str(output), "--silent", "-f"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise EnvError(f"tw-make {' '.join(args)}: {err}") from err
    if proc.returncode != 0 or not output.is_file():
        lines = (proc.stderr or proc.stdout or "no output").strip().splitlines() or ["no output"]
        raise EnvError(f"tw-make {' '.join(args)} failed (exit {proc.returncode}): {lines[-1]}")


class TextWorldEnv:
    """One TextWorld interpreter, rebuilt when a reset names another game file."""

    def __init__(self, cache: str):
        self._cache = Path(cache)
        self._env = None
        self._path: Optional[Path] = None
        self._score = 0.0  # raw points so far
        self._max = 1.0
        self.policy: list[str] = []  # walkthrough from the last reset's start state

    def reset(self, task: Task) -> tuple[str, Observation]:
        game = task.env_name.split("/", 1)[1]
        path = ensure_game(self._cache, game, task.split, task.seed)
        try:
            if path != self._path:
                self._open(path)
            with warnings.catch_warnings():
                # jericho warns that it cannot track TextWorld's score; textworld tracks it instead
                warnings.simplefilter("ignore")
                _, infos = self._env.reset()
        except Exception as err:  # textworld raises many kinds (jericho, inform7, json)
            raise EnvError(one_line_error(f"textworld reset {task.task_id}", err)) from err
        self._score, self._max = 0.0, float(infos.get("max_score") or 1)
        self.policy = list(infos.get("policy_commands") or [])
        return infos["objective"].strip(), self._observation(infos["description"], infos, 0.0, False)

    def _open(self, path: Path) -> None:
        import textworld
        from textworld.gym.envs import TextworldGymEnv

        self.close()
        infos = textworld.EnvInfos(admissible_commands=True, policy_commands=True, won=True, lost=True,
                                   score=True, max_score=True, description=True, objective=True)
        # Built directly rather than via textworld.gym.register_game, whose global registry grows
        # by one entry per call; the episode loop enforces the step limit.
        self._env = TextworldGymEnv([str(path)], request_infos=infos, max_episode_steps=None)
        self._path = path

    def step(self, action: str) -> Observation:
        if self._env is None:
            raise EnvError("textworld step before reset")
        try:
            obs, score, done, infos = self._env.step(action)
        except Exception as err:
            raise EnvError(one_line_error(f"textworld step {action!r}", err)) from err
        reward = (float(score or 0) - self._score) / self._max
        self._score = float(score or 0)
        text = re.sub(r"\n{3,}", "\n\n", _PROMPT_LINE.sub("", obs).split(_END)[0])
        return self._observation(text, infos, reward, bool(done))

    def _observation(self, text: str, infos: dict, reward: float, done: bool) -> Observation:
        won = bool(infos.get("won"))
        return Observation(
            text=text.strip(),
            valid_actions=sorted(infos.get("admissible_commands") or []),
            reward=reward,
            score=max(0.0, min(1.0, self._score / self._max)),
            done=done or won or bool(infos.get("lost")),
            success=won,
        )

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
        self._env, self._path = None, None


class TextWorldFamily:
    """TextWorld tasks: seeds of a fold in ascending order; oracle plan = the game's walkthrough."""

    def __init__(self, cfg):
        self.cfg = cfg
        self._probe: Optional[TextWorldEnv] = None

    def tasks(self, game: str, split: str, count: int) -> list[Task]:
        preset_args(game, split)  # validates the name without generating anything
        if split not in FOLD_SEEDS:
            raise ValueError(f"unknown split '{split}' (train, dev, test)")
        seeds = range(FOLD_SEEDS[split], FOLD_SEEDS[split] + min(count, FOLD_SIZE))
        return [Task(f"textworld/{game}/{split}/{s}", f"textworld/{game}", s, split) for s in seeds]

    def make(self) -> TextWorldEnv:
        return TextWorldEnv(self.cfg.textworld_cache)

    def oracle_plan(self, task: Task) -> Optional[list[str]]:
        if self._probe is None:
            self._probe = self.make()
        self._probe.reset(task)
        return list(self._probe.policy)
