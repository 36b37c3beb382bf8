"""The two roles a rollout worker plays: the frozen actor and the retrospective model (reflector).

When both are served by vLLM from the same base checkpoint, one engine serves both: the actor's
requests carry no adapter, the reflector's carry the newest LoRA adapter.
"""
from __future__ import annotations

from typing import Optional, Sequence

from retro_dist.agents import prompts
from retro_dist.agents.backends import (Adapter, Backend, Generation, HFBackend, OpenAIBackend, Seeds,
                                        VLLMBackend)
from retro_dist.config import ActorConfig, ReflectorConfig, VLLMConfig


class ActorRole:
    """What both actor policies (lockstep here, async in `async_policies.py`) hold: config, backend, budget."""

    def __init__(self, cfg: ActorConfig, backend):
        self.cfg = cfg
        self.backend = backend
        self.tokenizer = backend.tokenizer

    @property
    def max_prompt_tokens(self) -> Optional[int]:
        """Token budget for `PromptBuilder`; None (cut by `fits` on text) without a local tokenizer."""
        return self.cfg.max_prompt_tokens if self.tokenizer is not None else None


class ActorPolicy(ActorRole):
    """Frozen actor: prompt -> one environment command."""

    backend: Backend | OpenAIBackend

    def fits(self, text: str) -> bool:
        if self.tokenizer is None:  # remote actor without a local tokenizer: ~4 chars a token
            return len(text) <= 4 * self.cfg.max_prompt_tokens
        return len(self.tokenizer(text).input_ids) <= self.cfg.max_prompt_tokens

    def act(self, prompt_texts: Sequence[str], seed: Seeds,
            valid_actions: Optional[Sequence[Optional[list[str]]]] = None) -> list[str]:
        """One command per prompt. With `score_valid`, prompts whose environment lists valid actions
        get the highest-scoring one (Σ log-prob of " action\n"); the rest generate. `seed`: one per
        prompt (batch-independent) or one for the batch."""
        actions = [None] * len(prompt_texts)
        if self.cfg.action_selection == "score_valid" and valid_actions is not None:
            rows = [i for i, v in enumerate(valid_actions) if v]
            if rows:
                ids = [prompt_ids(self.tokenizer, prompt_texts[i]) for i in rows]
                cands = [[self.tokenizer(f" {a}\n", add_special_tokens=False).input_ids for a in valid_actions[i]]
                         for i in rows]
                for i, scores in zip(rows, self.backend.score_candidates(ids, cands)):
                    actions[i] = valid_actions[i][max(range(len(scores)), key=scores.__getitem__)]
        todo = [i for i, a in enumerate(actions) if a is None]
        if todo:
            seeds = seed if isinstance(seed, int) else [seed[i] for i in todo]
            for i, a in zip(todo, self._generate([prompt_texts[i] for i in todo], seeds)):
                actions[i] = a
        return actions

    def _generate(self, prompt_texts: Sequence[str], seed: Seeds) -> list[str]:
        if isinstance(self.backend, OpenAIBackend):
            texts = self.backend.generate_text(prompt_texts, self.cfg.max_new_tokens, self.cfg.temperature, seed)
        else:
            ids = [prompt_ids(self.tokenizer, p) for p in prompt_texts]
            gens = self.backend.generate(ids, self.cfg.max_new_tokens, self.cfg.temperature,
                                         stop_at_newline=True, use_adapter=False, seed=seed)
            texts = [g.text for g in gens]
        return [prompts.action_from_text(t) for t in texts]


class ReflectorPolicy:
    """Retrospective model P_θ(y|x): base checkpoint + the newest LoRA adapter."""

    def __init__(self, cfg: ReflectorConfig, backend: Backend, max_prompt_tokens: int):
        self.cfg = cfg
        self.backend = backend
        self.tokenizer = backend.tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.version = -1  # no adapter loaded yet

    def fits(self, text: str) -> bool:
        return len(self.tokenizer(text).input_ids) <= self.max_prompt_tokens

    def load(self, adapter: Adapter) -> None:
        self.backend.load_adapter(adapter)
        self.version = adapter.version

    def reflect(self, prompt_texts: Sequence[str], seed: Seeds, tasks: Sequence = ()) -> list[Generation]:
        ids = [prompt_ids(self.tokenizer, p) for p in prompt_texts]
        return self.backend.generate(ids, self.cfg.max_new_tokens, self.cfg.temperature,
                                     stop_at_newline=True, use_adapter=True, seed=seed)

    def score(self, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
        return self.backend.score(prompt_ids, completion_ids, use_adapter=True)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The ids a `PromptText` was built from (token-in/token-out), else the text tokenized."""
    ids = getattr(prompt, "ids", None)
    return list(ids) if ids is not None else tokenizer(prompt).input_ids


def build_policies(actor: ActorConfig, reflector: ReflectorConfig, engine: VLLMConfig,
                   seed: int, device: str = "cpu") -> tuple[ActorPolicy, ReflectorPolicy]:
    """Build the backends a worker needs, sharing one vLLM engine where the models coincide."""
    refl_backend: Backend
    if reflector.backend == "vllm":
        refl_backend = VLLMBackend(reflector.model, engine, reflector, seed)
    else:
        refl_backend = HFBackend(reflector.model, reflector, device)
    actor_backend: Optional[Backend | OpenAIBackend] = None
    if actor.backend == "openai":
        actor_backend = OpenAIBackend(actor, tokenizer_name=None)
    elif actor.backend == "vllm" and reflector.backend == "vllm" and actor.model == reflector.model:
        actor_backend = refl_backend  # one engine: actor requests go without the adapter
    elif actor.backend == "vllm":
        actor_backend = VLLMBackend(actor.model, engine, None, seed)
    else:
        actor_backend = HFBackend(actor.model, None, device)
    return (ActorPolicy(actor, actor_backend),
            ReflectorPolicy(reflector, refl_backend, actor.max_prompt_tokens))
