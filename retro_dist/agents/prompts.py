"""Prompt formats: the actor's (Reflexion's long-term memory + short-term trajectory) and the reflector's.

Pure string building. Prompts are cut from the left of the trajectory, never the instruction or
the memory, so what a reflection carries is always in front of the actor.

`PromptBuilder` builds the same text together with its token ids from pieces (header, one piece per
trajectory line, tail) tokenized once per episode, so a step costs one new piece's tokenization
instead of re-tokenizing the whole history (token-in/token-out).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

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


Parts = tuple[str, list[str], str]  # (head, trajectory lines oldest first, tail)


def actor_parts(env_name: str, instruction: str, memory: Sequence[str], first_obs: str,
                steps: Sequence[Step]) -> Parts:
    head = f"Game: {env_name}\nTask: {instruction}\n"
    if memory:  # Reflexion's format: "Your memory for the task below: Trial i: ..."
        head += "Your memory for the task below:\n"
        head += "".join(f"Trial {i}: {m}\n" for i, m in enumerate(memory))
    return head, _trajectory(first_obs, steps, keep_last_full=True), ">"


def reflection_parts(env_name: str, instruction: str, memory: Sequence[str], first_obs: str,
                     steps: Sequence[Step], ret: float) -> Parts:
    head = f"Game: {env_name}\nTask: {instruction}\n"
    tail = f"The trial above failed with return {ret:.2f}.\nYour memory for the task below:\n"
    tail += "".join(f"Trial {i}: {m}\n" for i, m in enumerate(memory))
    tail += f"Trial {len(memory)}: In the next trial I will"
    return head, _trajectory(first_obs, steps, keep_last_full=False), tail


def actor_prompt(env_name: str, instruction: str, memory: Sequence[str], first_obs: str,
                 steps: Sequence[Step], fits: Callable[[str], bool] = lambda s: True) -> str:
    """Task-conditioned actor prompt; the actor continues it with one action line."""
    return _fit(*actor_parts(env_name, instruction, memory, first_obs, steps), fits)


def reflection_prompt(env_name: str, instruction: str, memory: Sequence[str], first_obs: str,
                      steps: Sequence[Step], ret: float,
                      fits: Callable[[str], bool] = lambda s: True) -> str:
    """x_k = (τ_k, G_k, earlier reflections): the failed trajectory, then the memory block with the
    new entry open, so the reflector writes its plan where plans stand in the actor's prompt."""
    return _fit(*reflection_parts(env_name, instruction, memory, first_obs, steps, ret), fits)


class PromptText(str):
    """A prompt's text carrying the token ids it was built from (`ids`; None without a tokenizer).

    A str, so code that reads prompts as text (scripted actors, the HTTP backend) keeps working."""

    ids: Optional[list[int]]

    def __new__(cls, text: str, ids: Optional[list[int]] = None):
        obj = super().__new__(cls, text)
        obj.ids = ids
        return obj


class PromptBuilder:
    """Builds `PromptText`s from `Parts`, cutting the oldest trajectory lines to fit the budget.

    With a tokenizer and `max_tokens`, each piece (head, `line + "\n"`, tail) is tokenized once and
    cached, and the ids are the concatenation of the pieces' ids after the tokenizer's leading special
    tokens; pieces end at newlines, where byte-level BPE pre-tokenization splits anyway, so the ids
    equal a full re-tokenization of the text. Without one (an HTTP actor, a scripted or oracle
    policy), it cuts by `fits(text)` like `actor_prompt` and `ids` is None. One builder per episode
    and role: the cache lives as long as the episode.
    """

    def __init__(self, tokenizer=None, max_tokens: Optional[int] = None,
                 fits: Callable[[str], bool] = lambda s: True):
        self.tokenizer = tokenizer if max_tokens is not None else None
        self.max_tokens = max_tokens
        self.fits = fits
        self._cache: dict[str, list[int]] = {}
        self._prefix = list(tokenizer("").input_ids) if self.tokenizer is not None else []

    @classmethod
    def for_policy(cls, policy) -> "PromptBuilder":
        """Token ids for policies that know their tokenizer and budget; text cut by `fits` otherwise."""
        return cls(getattr(policy, "tokenizer", None), getattr(policy, "max_prompt_tokens", None),
                   getattr(policy, "fits", lambda s: True))

    def _ids(self, piece: str) -> list[int]:
        if piece not in self._cache:
            self._cache[piece] = list(self.tokenizer(piece, add_special_tokens=False).input_ids)
        return self._cache[piece]

    def build(self, parts: Parts) -> PromptText:
        head, lines, tail = parts
        if self.tokenizer is None:
            return PromptText(_fit(head, lines, tail, self.fits))
        pieces = [self._ids(f"{line}\n") for line in lines]
        fixed = len(self._prefix) + len(self._ids(head)) + len(self._ids(tail))
        total, start = fixed + sum(len(p) for p in pieces), 0
        while total > self.max_tokens and start < len(pieces):  # drop the oldest lines first
            total -= len(pieces[start])
            start += 1
        ids = self._prefix + self._ids(head) + [t for p in pieces[start:] for t in p] + self._ids(tail)
        body = "".join(f"{line}\n" for line in lines[start:])
        return PromptText(f"{head}{body}{tail}", ids)


def action_from_text(text: str) -> str:
    """The first line of the actor's continuation, as an environment command."""
    line = text.strip().split("\n", 1)[0]
    return line.lstrip("> ").strip()


def reflection_from_text(text: str) -> str:
    """The reflection as it goes into memory: the prompt's stem plus the first sentence-ish line."""
    body = " ".join(text.strip().split("\n", 1)[0].split())
    return f"In the next trial I will {body}".strip()
