"""Action-logit extraction (`actor.action_selection: score_valid`): the actor takes the valid action
the model prefers, by summed or length-normalised (`actor.action_scoring: mean`) token log-prob,
and the HF and vLLM backends pick the same action on the same prompts."""
import asyncio
import gc

import pytest
import torch

from retro_dist.agents.backends import HFBackend
from retro_dist.agents.policies import ActorPolicy, best_action
from retro_dist.config import ActorConfig, ConfigError, load_config

PROMPTS = [
    "Game: twx/coin\nTask: find the coin\nYou are in the kitchen. You see a door to the north.\n>",
    "Game: twx/coin\nTask: find the coin\nYou are in the hallway. The coin is in the bathroom.\n> look around\n"
    "You are in the hallway.\n>",
    "Game: twx/coin\nTask: find the coin\nMemory:\nTrial 1: In the next trial I will move west, take coin.\n"
    "You are in the pantry.\n>",
]
ACTIONS = ["move north", "move south", "move west", "take coin", "look around", "inventory",
           "open door to the backyard and the garden", "close door to the bathroom"]


def test_best_action_sum_and_mean_on_a_hand_case():
    toks = [[1], [1, 2, 3, 4]]
    assert best_action(["short", "long"], [-2.0, -4.0], toks, "sum") == "short"
    assert best_action(["short", "long"], [-2.0, -4.0], toks, "mean") == "long"  # −1 per token beats −2
    assert best_action(["a", "b"], [-1.0, -1.0], [[1], [2]], "sum") == "a"  # ties: the first listed
    with pytest.raises(ConfigError, match="actor.action_scoring"):
        load_config(None, ["actor.action_scoring=max"])


def _reference(model, tok, prompt, how):
    """The model's preference computed directly: one full forward per candidate."""
    scores = []
    for a in ACTIONS:
        p = tok(prompt).input_ids
        c = tok(f" {a}\n", add_special_tokens=False).input_ids
        ids = torch.tensor([p + c])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        s = float(lp[len(p) - 1:].gather(-1, ids[0, len(p):, None]).sum())
        scores.append(s / len(c) if how == "mean" else s)
    order = sorted(range(len(ACTIONS)), key=lambda i: -scores[i])
    return ACTIONS[order[0]], scores[order[0]] - scores[order[1]]


def _act(policy):
    return policy.act(PROMPTS, seed=0, valid_actions=[ACTIONS] * len(PROMPTS))


@pytest.mark.component
def test_hf_actor_lockstep_and_async_take_the_action_the_model_prefers(tiny_model):
    from retro_dist.agents.async_backends import HFBatcher
    from retro_dist.agents.async_policies import AsyncActorPolicy

    backend = HFBackend(tiny_model, None, "cpu")
    picks = {}
    for how in ("sum", "mean"):
        cfg = ActorConfig(backend="hf", model=tiny_model, action_selection="score_valid", action_scoring=how)
        ref = [_reference(backend.model, backend.tokenizer, p, how) for p in PROMPTS]
        assert all(margin > 1e-3 for _, margin in ref)  # clear preferences: no float tie decides
        picks[how] = _act(ActorPolicy(cfg, backend))
        assert picks[how] == [a for a, _ in ref]

        async def run_async():
            policy = AsyncActorPolicy(cfg, HFBatcher(backend))
            try:
                return [await policy.act(p, seed=0, valid_actions=ACTIONS) for p in PROMPTS]
            finally:
                await policy.close()

        assert asyncio.run(run_async()) == picks[how]
    assert picks["sum"] != picks["mean"]  # the normalisation changes the choice on these prompts


@pytest.mark.integration
@pytest.mark.vllm
def test_hf_and_vllm_backends_pick_the_same_action(tiny_model):
    pytest.importorskip("vllm")
    from retro_dist.agents.backends import VLLMBackend
    from retro_dist.config import VLLMConfig

    hf = HFBackend(tiny_model, None, "cpu")
    vllm = VLLMBackend(tiny_model, VLLMConfig(), None, 0)  # one engine, the actor's (no adapter)
    try:
        ids = [hf.tokenizer(p).input_ids for p in PROMPTS]
        cands = [[hf.tokenizer(f" {a}\n", add_special_tokens=False).input_ids for a in ACTIONS]] * len(PROMPTS)
        a, b = hf.score_candidates(ids, cands), vllm.score_candidates(ids, cands)
        assert max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)) < 1e-3
        for how in ("sum", "mean"):
            cfg = ActorConfig(backend="hf", model=tiny_model, action_selection="score_valid", action_scoring=how)
            assert _act(ActorPolicy(cfg, hf)) == _act(ActorPolicy(cfg, vllm))
    finally:
        vllm.close()
        del vllm
        gc.collect()
