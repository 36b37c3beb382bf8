"""The environment protocol every text game implements, and the task identity it is reset with."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol


class EnvError(RuntimeError):
    """An environment failed (raised, crashed, returned garbage); the episode is marked errored."""


def one_line_error(where: str, err: Exception) -> str:
    """`where: ExcType: first line` — simulators raise multi-line traces; runs log one line."""
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{where}: {type(err).__name__}: {first}"


@dataclass(frozen=True)
class Task:
    """One task: a game and a seed in a fold. Trials of the same task replay the same game."""

    task_id: str  # e.g. "twx/coin/train/17": stable across runs, used by baselines and curricula
    env_name: str  # e.g. "twx/coin": the task-conditioned prompt names it
    seed: int
    split: str


@dataclass
class Observation:
    text: str
    valid_actions: Optional[list[str]]  # None when the environment does not list them
    reward: float = 0.0  # reward of the last step
    score: float = 0.0  # return so far, in [0, 1]
    done: bool = False
    success: bool = False
    actions_complete: bool = True  # False: valid_actions are examples, other commands are accepted too


class TextEnv(Protocol):
    def reset(self, task: Task) -> tuple[str, Observation]:
        """Start `task`; returns (instruction, first observation)."""
        ...

    def step(self, action: str) -> Observation: ...

    def close(self) -> None: ...
