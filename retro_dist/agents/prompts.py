"""Prompt formats: the actor's (Reflexion's long-term memory + short-term trajectory) and the reflector's.

Pure string building. Prompts are cut from the left of the trajectory, never the instruction or
the memory, so what a reflection carries is always in front of the actor.
"""
from __future__ import annotations

from typing import Callable, Sequence

Step = tuple[str, str]  # (action, observation that followed it)


def compact(obs: str) -> str:
    """First sentence and last line of an observation (where a room is, and its exits).

    Past observations are compacted so a tiny model's context holds the whole trajectory; the
    actor still sees its current observation in full.
    """
    text = " ".join(obs.split())
    first = text.split(". ", 1)[0].rstrip(".") + "."
    last = obs.strip().splitlines()[-1].strip() if obs.strip() else ""
    return first if not last or last in first else f"{first} {last}"


def _trajectory(first_obs: str, steps: Sequence[Step], keep_last_full: bool) -> list[str]:
    obs = [first_obs] + [o for _, o in steps]
    shown = [compact(o) for o in obs]
    if keep_last_full:
        shown[-1] = obs[-1]
    return [shown[0]] + [f"> {a}\n{o}" for (a, _), o in zip(steps, shown[1:])]


def _fit(head: str, lines: list[str], tail: str, fits: Callable[[str], bool]) -> str:
    """Drop the oldest trajectory lines until head + lines + tail fits the token budget."""
    for start in range(len(lines) + 1):
        body = "\n".join(lines[start:])
        text = f"{head}{body}\n{tail}" if body else f"{head}{tail}"
        if fits(text):
            return text
    return f"{head}{tail}"


def actor_prompt(env_name: str, instruction: str, memory: Sequence[str], first_obs: str,
                 steps: Sequence[Step], fits: Callable[[str], bool] = lambda s: True) -> str:
    """Task-conditioned actor prompt; the actor continues it with one action line."""
    head = f"Game: {env_name}\nTask: {instruction}\n"
    if memory:  # Reflexion's format: "Your memory for the task below: Trial i: ..."
        head += "Your memory for the task below:\n"
        head += "".join(f"Trial {i}: {m}\n" for i, m in enumerate(memory))
    return _fit(head, _trajectory(first_obs, steps, keep_last_full=True), ">", fits)


def reflection_prompt(env_name: str, instruction: str, memory: Sequence[str], first_obs: str,
                      steps: Sequence[Step], ret: float,
                      fits: Callable[[str], bool] = lambda s: True) -> str:
    """x_k = (τ_k, G_k, earlier reflections): the failed trajectory, then the memory block with the
    new entry open, so the reflector writes its plan where plans stand in the actor's prompt."""
    head = f"Game: {env_name}\nTask: {instruction}\n"
    tail = f"The trial above failed with return {ret:.2f}.\nYour memory for the task below:\n"
    tail += "".join(f"Trial {i}: {m}\n" for i, m in enumerate(memory))
    tail += f"Trial {len(memory)}: In the next trial I will"
    return _fit(head, _trajectory(first_obs, steps, keep_last_full=False), tail, fits)


def action_from_text(text: str) -> str:
    """The first line of the actor's continuation, as an environment command."""
    line = text.strip().split("\n", 1)[0]
    return line.lstrip("> ").strip()


def reflection_from_text(text: str) -> str:
    """The reflection as it goes into memory: the prompt's stem plus the first sentence-ish line."""
    body = " ".join(text.strip().split("\n", 1)[0].split())
    return f"In the next trial I will {body}".strip()
