"""The two roles a rollout worker plays: the frozen actor and the retrospective model (reflector).

When both are served by vLLM from the same base checkpoint, one engine serves both: the actor's
requests carry no adapter, the reflector's carry the newest LoRA adapter.

A batch is a set of independent requests: one that fails (a prompt the engine or endpoint rejects,
an endpoint out of retries) fails only its own slot, which holds its `BackendError` instead of a
result. A dead engine (`EngineDead`, rebuilt by the backend) fails the whole call.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, TypeVar, Union

from retro_dist.agents import prompts
from retro_dist.agents.backends import (Adapter, Backend, BackendError, EngineDead, EngineRebuildFailed, Generation,
                                        HFBackend, Seeds, VLLMBackend, per_request)
from retro_dist.agents.openai_backend import OpenAIBackend
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


def best_action(actions: Sequence[str], scores: Sequence[float], token_ids: Sequence[list], how: str) -> str:
    """The valid action the model prefers: highest Σ log-prob of its tokens (`sum`), or highest
    mean per token (`mean`, length-normalised); the first one listed on a tie."""
    if how == "mean":
        scores = [s / max(1, len(t)) for s, t in zip(scores, token_ids)]
    return actions[max(range(len(scores)), key=scores.__getitem__)]


class ActorPolicy(ActorRole):
    """Frozen actor: prompt -> one environment command."""

    backend: Backend | OpenAIBackend

    def fits(self, text: str) -> bool:
        if self.tokenizer is None:  # remote actor without a local tokenizer: ~4 chars a token
            return len(text) <= 4 * self.cfg.max_prompt_tokens
        return len(self.tokenizer(text).input_ids) <= self.cfg.max_prompt_tokens

    def act(self, prompt_texts: Sequence[str], seed: Seeds,
            valid_actions: Optional[Sequence[Optional[list[str]]]] = None) -> list[Union[str, BackendError]]:
        """One command per prompt, or the BackendError of its failed request. With `score_valid`,
        prompts whose environment lists valid actions get the highest-scoring one (Σ log-prob of
        " action\n", or its mean per token: `actor.action_scoring`); the rest generate. `seed`: one
        per prompt (batch-independent) or one for the batch. Raises EngineDead if the engine died
        under the call."""
        actions: list = [None] * len(prompt_texts)
        if self.cfg.action_selection == "score_valid" and valid_actions is not None:
            rows = [i for i, v in enumerate(valid_actions) if v]
            if rows and isinstance(self.backend, OpenAIBackend):  # the server tokenizes: scored by text
                scored_lps = self.backend.score_actions([prompt_texts[i] for i in rows],
                                                        [valid_actions[i] for i in rows])
                for i, lps in zip(rows, scored_lps):
                    actions[i] = lps if isinstance(lps, BackendError) else \
                        best_action(valid_actions[i], [sum(x) for x in lps], lps, self.cfg.action_scoring)
            elif rows:
                ids = [prompt_ids(self.tokenizer, prompt_texts[i]) for i in rows]
                cands = [[self.tokenizer(f" {a}\n", add_special_tokens=False).input_ids for a in valid_actions[i]]
                         for i in rows]
                scored = per_item(lambda js: self.backend.score_candidates([ids[j] for j in js],
                                                                           [cands[j] for j in js]), len(rows))
                for i, c, scores in zip(rows, cands, scored):
                    actions[i] = scores if isinstance(scores, BackendError) else \
                        best_action(valid_actions[i], scores, c, self.cfg.action_scoring)
        todo = [i for i, a in enumerate(actions) if a is None]
        if todo:
            seeds = seed if isinstance(seed, int) or len(todo) == len(actions) else [seed[i] for i in todo]
            for i, a in zip(todo, self._generate([prompt_texts[i] for i in todo], seeds)):
                actions[i] = a
        return actions

    def _generate(self, prompt_texts: Sequence[str], seed: Seeds) -> list[Union[str, BackendError]]:
        if isinstance(self.backend, OpenAIBackend):  # one HTTP request per prompt already
            texts = self.backend.generate_text(prompt_texts, self.cfg.max_new_tokens, self.cfg.temperature, seed)
        else:
            ids = [prompt_ids(self.tokenizer, p) for p in prompt_texts]
            gens = per_item(lambda js: self.backend.generate(
                [ids[j] for j in js], self.cfg.max_new_tokens, self.cfg.temperature, stop_at_newline=True,
                use_adapter=False, seed=_seeds(seed, js, len(ids))), len(ids))
            texts = [g if isinstance(g, BackendError) else g.text for g in gens]
        return [t if isinstance(t, BackendError) else prompts.action_from_text(t) for t in texts]


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

    def reflect(self, prompt_texts: Sequence[str], seed: Seeds,
                tasks: Sequence = ()) -> list[Union[Generation, BackendError]]:
        """One reflection per prompt, or the BackendError of its failed request (EngineDead: raised)."""
        ids = [prompt_ids(self.tokenizer, p) for p in prompt_texts]
        return per_item(lambda js: self.backend.generate([ids[j] for j in js], self.cfg.max_new_tokens,
                                                         self.cfg.temperature, stop_at_newline=True, use_adapter=True,
                                                         seed=_seeds(seed, js, len(ids))), len(ids))

    def score(self, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
        """Per-token log-probs under the adapter (the probe). Not an episode's request: if the engine
        died under it, it is asked again of the rebuilt engine."""
        try:
            return self.backend.score(prompt_ids, completion_ids, use_adapter=True)
        except EngineDead:
            return self.backend.score(prompt_ids, completion_ids, use_adapter=True)


T = TypeVar("T")


def per_item(call: Callable[[list[int]], list[T]], n: int) -> list[Union[T, BackendError]]:
    """`call(indices)` returns one result per index, for n requests. If the whole batch fails, each
    request is asked again alone, so one the backend rejects (a prompt longer than vLLM's
    max_model_len) fails only its own slot, which holds its BackendError. A dead engine (EngineDead)
    or a failed rebuild fails them all: raised."""
    try:
        return list(call(list(range(n))))
    except (EngineDead, EngineRebuildFailed):
        raise
    except Exception as err:  # backends are libraries: vLLM raises ValueError subclasses for bad prompts
        if n == 1:
            return [_as_backend_error(err)]
    out: list = []
    for j in range(n):
        try:
            out.append(call([j])[0])
        except (EngineDead, EngineRebuildFailed):
            raise
        except Exception as err:
            out.append(_as_backend_error(err))
    return out


def _seeds(seed: Seeds, indices: list[int], n: int) -> Seeds:
    """The seed argument for a subset of a batch: the batch's own when it is the whole batch."""
    return seed if len(indices) == n else [per_request(seed, n)[j] for j in indices]


def _as_backend_error(err: Exception) -> BackendError:
    return err if isinstance(err, BackendError) else BackendError(f"{type(err).__name__}: {err}")


def backend_counters(*policies) -> dict:
    """Fault counters of the policies' backends (each backend once), totals since they were built:
    `retries` (HTTP requests retried by an OpenAI-compatible actor), `engine_rebuilds` (dead vLLM
    engines rebuilt)."""
    backends = {id(p.backend): p.backend for p in policies if p is not None}.values()
    return {"retries": sum(getattr(b, "retries", 0) for b in backends),
            "engine_rebuilds": sum(getattr(b, "rebuilds", 0) for b in backends)}


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
