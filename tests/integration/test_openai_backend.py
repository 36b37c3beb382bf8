"""The OpenAI-compatible actor backend against a real `vllm serve` on loopback."""
import pytest

from benchmarks.vllm_server import VLLMServer
from retro_dist.agents.backends import OpenAIBackend, check_endpoint
from retro_dist.agents.policies import ActorPolicy
from retro_dist.config import ActorConfig, load_config
from retro_dist.launch.preflight import PreflightError, preflight
from tests.agents.test_action_scoring import ACTIONS, PROMPTS

pytest.importorskip("vllm")
pytestmark = [pytest.mark.integration, pytest.mark.vllm]


@pytest.fixture(scope="module")
def server(tiny_model):
    with VLLMServer(tiny_model, served_name="tiny") as srv:
        yield srv.url


def test_actor_over_http(server):
    assert check_endpoint(server) == ["tiny"]
    cfg = ActorConfig(backend="openai", model="tiny", base_url=server, max_new_tokens=6)
    actor = ActorPolicy(cfg, OpenAIBackend(cfg))
    actions = actor.act(["Game: twx/coin\nTask: find the coin\nYou are in the kitchen.\n>"] * 3, seed=0)
    assert len(actions) == 3 and all("\n" not in a for a in actions)


def test_preflight_checks_the_served_model_name(server, in_repo):
    ok = load_config("configs/test.yaml", ["actor.backend=openai", f"actor.base_url={server}", "actor.model=tiny"])
    preflight(ok)
    bad = load_config("configs/test.yaml", ["actor.backend=openai", f"actor.base_url={server}", "actor.model=llama"])
    with pytest.raises(PreflightError, match="actor.model 'llama' is not served"):
        preflight(bad)


# Action-logit extraction over HTTP (`score_valid`): PROMPTS and ACTIONS are those of
# tests/agents/test_action_scoring.py, where the tiny model's preferences are checked to be clear
# (no float tie decides) and to differ between sum and mean.
def test_http_actor_scores_valid_actions_as_the_hf_and_vllm_backends_do(server, tiny_model):
    import asyncio
    import gc

    from retro_dist.agents.async_policies import AsyncActorPolicy
    from retro_dist.agents.backends import HFBackend, VLLMBackend
    from retro_dist.agents.openai_backend import AsyncOpenAIClient
    from retro_dist.config import VLLMConfig

    hf = HFBackend(tiny_model, None, "cpu")
    http_cfg = ActorConfig(backend="openai", model="tiny", base_url=server, action_selection="score_valid")
    http = OpenAIBackend(http_cfg)
    # The server's tokens, found by characters, are the ones our tokenizer gives " action\n", and
    # their log-probs are HF's for the same sequence.
    ids = [hf.tokenizer(p).input_ids for p in PROMPTS]
    cands = [hf.tokenizer(f" {a}\n", add_special_tokens=False).input_ids for a in ACTIONS]
    ref = hf.score_candidates(ids, [cands] * len(PROMPTS))
    remote = http.score_actions(PROMPTS, [ACTIONS] * len(PROMPTS))
    for row_ref, row in zip(ref, remote):
        assert [len(lps) for lps in row] == [len(c) for c in cands]
        assert max(abs(s - sum(lps)) for s, lps in zip(row_ref, row)) < 1e-3
    vllm = VLLMBackend(tiny_model, VLLMConfig(), None, 0)
    try:
        for how in ("sum", "mean"):
            local = ActorConfig(backend="hf", model=tiny_model, action_selection="score_valid", action_scoring=how)
            cfg = ActorConfig(backend="openai", model="tiny", base_url=server, action_selection="score_valid",
                              action_scoring=how)
            picks = ActorPolicy(local, hf).act(PROMPTS, seed=0, valid_actions=[ACTIONS] * len(PROMPTS))
            assert ActorPolicy(local, vllm).act(PROMPTS, seed=0, valid_actions=[ACTIONS] * len(PROMPTS)) == picks
            assert ActorPolicy(cfg, http).act(PROMPTS, seed=0, valid_actions=[ACTIONS] * len(PROMPTS)) == picks

            async def run_async():
                policy = AsyncActorPolicy(cfg, AsyncOpenAIClient(cfg))
                try:
                    return [await policy.act(p, seed=0, valid_actions=ACTIONS) for p in PROMPTS]
                finally:
                    await policy.close()

            assert asyncio.run(run_async()) == picks
    finally:
        http.close()
        vllm.close()
        del vllm
        gc.collect()
