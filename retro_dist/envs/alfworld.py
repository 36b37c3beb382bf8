"""ALFWorld (Shridhar et al. 2021): household tasks as text games, on user-provided ALFWorld data.

`env.data_path` is ALFWorld's data folder (the one holding `json_2.1.1/`) or `json_2.1.1/` itself,
laid out as `<split>/<task type>-<object>-<...>-<scene>/trial_*/game.tw-pddl` (+ `traj_data.json`),
as `alfworld-download` leaves it. ALFWorld's `train` folder is our train fold, `valid_seen` dev and
`valid_unseen` test. The game name is a task type (`pick_and_place_simple`, `look_at_obj_in_light`,
`pick_clean_then_place_in_recep`, `pick_heat_then_place_in_recep`, `pick_cool_then_place_in_recep`,
`pick_two_obj_and_place`) or `all`.

Games are played the way ALFWorld's own `AlfredTWEnv` plays them: textworld's PDDL interpreter
(`game.tw-pddl` = domain + grammar + problem), through `textworld.gym`, with ALFWorld's
`AlfredDemangler` naming objects "apple 1", "fridge 1". A task's seed is its index among the trial
folders of its game and fold, sorted by path; as in ALFWorld, trials of movable receptacles or
sliced objects and games marked unsolvable are skipped. The oracle plan is the planner's
(fast-downward) plan from the start state, else the walkthrough stored in the game file.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Optional

from retro_dist.envs.base import EnvError, Observation, Task, one_line_error

TASK_TYPES = ("pick_and_place_simple", "look_at_obj_in_light", "pick_clean_then_place_in_recep",
              "pick_heat_then_place_in_recep", "pick_cool_then_place_in_recep", "pick_two_obj_and_place")
FOLDERS = {"train": "train", "dev": "valid_seen", "test": "valid_unseen"}
GAME_FILE = "game.tw-pddl"
_TASK_PREFIX = "Your task is to:"


def data_root(data_path: Optional[str]) -> Path:
    if not data_path:
        raise EnvError("alfworld needs env.data_path: ALFWorld's data folder (with json_2.1.1/)")
    path = Path(data_path)
    root = path / "json_2.1.1" if (path / "json_2.1.1").is_dir() else path
    if not root.is_dir():
        raise EnvError(f"alfworld data_path {path}: no such folder")
    return root


@functools.lru_cache(maxsize=32)
def trial_files(root: Path, game: str, split: str) -> tuple[Path, ...]:
    """Game files of `game` in `split`, sorted by path: a task's seed indexes this list."""
    if game != "all" and game not in TASK_TYPES:
        raise ValueError(f"unknown alfworld game '{game}' (task types: {', '.join(TASK_TYPES)}, or all)")
    if split not in FOLDERS:
        raise ValueError(f"unknown split '{split}' (train, dev, test)")
    folder = root / FOLDERS[split]
    if not folder.is_dir():
        raise EnvError(f"alfworld data {folder}: no such folder (expected ALFWorld's json_2.1.1 layout)")
    files = []
    for task_dir in sorted(folder.iterdir()):
        kind = task_dir.name.split("-", 1)[0]
        # ALFWorld skips these too: its text engine does not support movable receptacles or slicing
        if game not in ("all", kind) or "movable" in task_dir.name or "Sliced" in task_dir.name:
            continue
        files += sorted(task_dir.glob(f"trial_*/{GAME_FILE}"))
    return tuple(files)


def _solvable(path: Path) -> bool:
    try:
        return bool(json.loads(path.read_text()).get("solvable"))
    except (OSError, ValueError):
        return False


class AlfworldEnv:
    """One PDDL interpreter, rebuilt when a reset names another game file."""

    def __init__(self, data_path: Optional[str], planner: bool = False):
        self._root = data_root(data_path)
        self._planner = planner  # replanning every step is costly: only the oracle asks for it
        self._env = None
        self._path: Optional[Path] = None
        self.policy: list[str] = []  # the planner's plan from the last reset (planner=True)

    def game_file(self, task: Task) -> Path:
        files = trial_files(self._root, task.env_name.split("/", 1)[1], task.split)
        if not 0 <= task.seed < len(files):
            raise EnvError(f"alfworld reset {task.task_id}: no trial {task.seed} ({len(files)} found)")
        return files[task.seed]

    def reset(self, task: Task) -> tuple[str, Observation]:
        path = self.game_file(task)
        try:
            if path != self._path:
                self._open(path)
            obs, infos = self._env.reset()
        except Exception as err:  # textworld, fast-downward and json errors alike
            raise EnvError(one_line_error(f"alfworld reset {task.task_id}", err)) from err
        self.policy = list(infos.get("policy_commands") or [])
        scene, _, goal = obs.partition(_TASK_PREFIX)
        scene = scene.replace("-= Welcome to TextWorld, ALFRED! =-", "").strip()
        return f"{_TASK_PREFIX} {goal.strip()}", self._observation(scene, infos, False)

    def _open(self, path: Path) -> None:
        import textworld
        from alfworld.agents.environment.alfred_tw_env import AlfredDemangler
        from textworld.gym.envs import TextworldGymEnv

        self.close()
        infos = textworld.EnvInfos(admissible_commands=True, won=True, policy_commands=self._planner)
        self._env = TextworldGymEnv([str(path)], request_infos=infos, max_episode_steps=None,
                                    wrappers=[AlfredDemangler(shuffle=False)])
        self._path = path

    def step(self, action: str) -> Observation:
        if self._env is None:
            raise EnvError("alfworld step before reset")
        try:
            obs, _, done, infos = self._env.step(action)
        except Exception as err:
            raise EnvError(one_line_error(f"alfworld step {action!r}", err)) from err
        return self._observation(obs.strip(), infos, bool(done))

    @staticmethod
    def _observation(text: str, infos: dict, done: bool) -> Observation:
        won = bool(infos.get("won"))  # ALFWorld's reward is 1 on success and 0 otherwise
        return Observation(text=text, valid_actions=sorted(infos.get("admissible_commands") or []),
                           reward=float(won), score=float(won), done=done or won, success=won)

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
        self._env, self._path = None, None


class AlfworldFamily:
    """ALFWorld trials of a fold (solvable ones, in path order); oracle plan = the expert plan."""

    def __init__(self, cfg):
        self.cfg = cfg
        self._probe: Optional[AlfworldEnv] = None

    def tasks(self, game: str, split: str, count: int) -> list[Task]:
        files = trial_files(data_root(self.cfg.data_path), game, split)
        out = []
        for seed, path in enumerate(files):  # reads game files only until `count` are found
            if len(out) == count:
                break
            if _solvable(path):
                out.append(Task(f"alfworld/{game}/{split}/{seed}", f"alfworld/{game}", seed, split))
        return out

    def make(self) -> AlfworldEnv:
        return AlfworldEnv(self.cfg.data_path)

    def oracle_plan(self, task: Task) -> Optional[list[str]]:
        if self._probe is None:
            self._probe = AlfworldEnv(self.cfg.data_path, planner=True)
        self._probe.reset(task)
        if self._probe.policy:
            return list(self._probe.policy)
        stored = json.loads(self._probe.game_file(task).read_text()).get("walkthrough")
        return list(stored) if stored else None
