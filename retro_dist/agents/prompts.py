"""Prompt formats: the actor's (Reflexion's long-term memory + short-term trajectory) and the reflector's.

Pure string building. Prompts are cut from the left of the trajectory, never the instruction or
the memory, so what a reflection carries is always in front of the actor.
"""
from __future__ import annotations

from typing import Callable, Sequence

Step = tuple[str, str]  # (action, observation that followed it)


def _trajectory(first_obs: str, steps: Sequence[Step]) -> list[str]:
    return [first_obs] + [f"> {a}\n{o}" for a, o in steps]


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
    return _fit(head, _trajectory(first_obs, steps), ">", fits)


def reflection_prompt(env_name: str, instruction: str, memory: Sequence[str], first_obs: str,
                      steps: Sequence[Step], ret: float,
                      fits: Callable[[str], bool] = lambda s: True) -> str:
    """x_k = (τ_k, G_k, earlier reflections): the reflector continues it with a plan."""
    head = f"Game: {env_name}\nTask: {instruction}\n"
    if memory:
        head += "Earlier reflections:\n" + "".join(f"- {m}\n" for m in memory)
    head += f"The trial below failed with return {ret:.2f}.\n"
    tail = "Reflection: In the next trial I will"
    return _fit(head, _trajectory(first_obs, steps), tail, fits)


def action_from_text(text: str) -> str:
    """The first line of the actor's continuation, as an environment command."""
    line = text.strip().split("\n", 1)[0]
    return line.lstrip("> ").strip()


def reflection_from_text(text: str) -> str:
    """The reflection as it goes into memory: the prompt's stem plus the first sentence-ish line."""
    body = " ".join(text.strip().split("\n", 1)[0].split())
    return f"In the next trial I will {body}".strip()
