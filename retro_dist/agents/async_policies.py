"""The actor and reflector for continuous batching: one request per call, awaited by one episode.

Same roles and prompt semantics as `policies.py` (which the lockstep loop uses), over the async
backends. Prompts come in as `PromptText`s whose token ids were built once per episode
(token-in/token-out); every call takes its own seed (see `rollout.episode.request_seed`).
"""
from __future__ import annotations

from typing import Optional, Union

from retro_dist.agents import prompts
from retro_dist.agents.async_backends import AsyncOpenAIClient, AsyncVLLMEngine, HFBatcher
from retro_dist.agents.backends import Adapter, EngineDead, Generation, HFBackend
from retro_dist.agents.policies import ActorRole, best_action, prompt_ids
from retro_dist.config import ActorConfig, ReflectorConfig, VLLMConfig

AsyncBackend = Union[AsyncVLLMEngine, HFBatcher]


class AsyncActorPolicy(ActorRole):
    """Frozen actor: prompt -> one environment command."""

    backend: Union[AsyncBackend, AsyncOpenAIClient]

    def fits(self, text: str) -> bool:
        return len(text) <= 4 * self.cfg.max_prompt_tokens  # used without a tokenizer only: ~4 chars a token

    async def act(self, prompt: str, seed: int, valid_actions: Optional[list[str]] = None) -> str:
        """One command. With `score_valid` and a complete list of valid actions, the one whose
        " action\\n" tokens score highest under the base model; otherwise generated."""
        scoring = self.cfg.action_selection == "score_valid" and bool(valid_actions)
        if scoring and isinstance(self.backend, AsyncOpenAIClient):
            lps = await self.backend.score_actions(prompt, valid_actions)  # the server tokenizes: scored by text
            return best_action(valid_actions, [sum(x) for x in lps], lps, self.cfg.action_scoring)
        if scoring and self.tokenizer is not None:
            cands = [self.tokenizer(f" {a}\n", add_special_tokens=False).input_ids for a in valid_actions]
            scores = await self.backend.score_candidates(prompt_ids(self.tokenizer, prompt), cands)
            return best_action(valid_actions, scores, cands, self.cfg.action_scoring)
        if isinstance(self.backend, AsyncOpenAIClient):
            text = await self.backend.generate_text(prompt, self.cfg.max_new_tokens, self.cfg.temperature, seed)
        else:
            gen = await self.backend.generate(prompt_ids(self.tokenizer, prompt), self.cfg.max_new_tokens,
                                              self.cfg.temperature, stop_at_newline=True, use_adapter=False,
                                              seed=seed)
            text = gen.text
        return prompts.action_from_text(text)

    async def close(self) -> None:
        await self.backend.close()


class AsyncReflectorPolicy:
    """Retrospective model P_θ(y|x): base checkpoint + the newest LoRA adapter."""

    def __init__(self, cfg: ReflectorConfig, backend: AsyncBackend, max_prompt_tokens: int):
        self.cfg = cfg
        self.backend = backend
        self.tokenizer = backend.tokenizer
        self.max_prompt_tokens = max_prompt_tokens

    @property
    def version(self) -> int:
        """Newest adapter version loaded (-1 before any); requests submitted now use it."""
        return self.backend.version

    def fits(self, text: str) -> bool:
        return len(self.tokenizer(text).input_ids) <= self.max_prompt_tokens

    def load(self, adapter: Adapter) -> None:
        """Cheap and synchronous; call it on the event loop's thread (between two awaits)."""
        self.backend.load_adapter(adapter)

    async def reflect(self, prompt: str, seed: int) -> Generation:
        """y ~ P_θ(·|x); `Generation.version` is the adapter version that sampled it."""
        return await self.backend.generate(prompt_ids(self.tokenizer, prompt), self.cfg.max_new_tokens,
                                           self.cfg.temperature, stop_at_newline=True, use_adapter=True,
                                           seed=seed)

    async def score(self, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
        """Per-token log-probs under the newest adapter (the weight-sync probe). Not an episode's
        request: if the engine died under it, it is asked again of the rebuilt engine."""
        try:
            return await self.backend.score(prompt_ids, completion_ids, use_adapter=True)
        except EngineDead:
            return await self.backend.score(prompt_ids, completion_ids, use_adapter=True)

    async def close(self) -> None:
        await self.backend.close()


async def build_async_policies(actor: ActorConfig, reflector: ReflectorConfig, engine: VLLMConfig, seed: int,
                               device: str = "cpu", max_in_flight: int = 64
                               ) -> tuple[AsyncActorPolicy, AsyncReflectorPolicy]:
    """Build a worker's async backends, sharing one engine where the models coincide (as
    `build_policies` does). Await it inside the event loop that will use the policies.
    `max_in_flight`: the worker's concurrent episodes (an HTTP actor opens that many connections)."""
    refl_backend: AsyncBackend
    if reflector.backend == "vllm":
        refl_backend = await AsyncVLLMEngine.start(reflector.model, engine, reflector, seed)
    else:
        refl_backend = HFBatcher(HFBackend(reflector.model, reflector, device))
    if actor.backend == "openai":
        actor_backend = AsyncOpenAIClient(actor, max_connections=max_in_flight)
    elif actor.backend == reflector.backend and actor.model == reflector.model:
        actor_backend = refl_backend  # one engine / one model: actor requests go without the adapter
    elif actor.backend == "vllm":
        actor_backend = await AsyncVLLMEngine.start(actor.model, engine, None, seed)
    else:
        actor_backend = HFBatcher(HFBackend(actor.model, None, device))
    return (AsyncActorPolicy(actor, actor_backend),
            AsyncReflectorPolicy(reflector, refl_backend, actor.max_prompt_tokens))
