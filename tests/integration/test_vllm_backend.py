"""One real vLLM engine serving the frozen actor (no adapter) and the reflector (LoRA, hot-swapped)."""
import gc

import numpy as np
import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.integration, pytest.mark.vllm]


@pytest.fixture(scope="module")
def engine_policies(tiny_model):
    from retro_dist.agents.policies import build_policies
    from retro_dist.config import ActorConfig, ReflectorConfig, VLLMConfig

    actor, reflector = build_policies(ActorConfig(backend="vllm", model=tiny_model),
                                      ReflectorConfig(backend="vllm", model=tiny_model), VLLMConfig(), seed=0)
    yield actor, reflector
    actor.backend.close()  # shuts the engine down now, not in an exit-time finalizer
    del actor, reflector
    gc.collect()


@pytest.fixture(scope="module")
def learner(tmp_path_factory, tiny_model):
    from retro_dist.config import LearnerConfig, ReflectorConfig
    from retro_dist.learner.learner import Learner
    from retro_dist.replay.config import ReplayConfig

    d = tmp_path_factory.mktemp("learner")
    return Learner(LearnerConfig(), ReflectorConfig(model=tiny_model), str(d / "replay"), ReplayConfig(), str(d), 0)


def test_one_engine_serves_both_roles(engine_policies):
    actor, reflector = engine_policies
    assert actor.backend is reflector.backend  # same model, one engine
    actions = actor.act(["Game: twx/coin\nTask: find the coin\nYou are in the kitchen.\n>"], seed=0)
    assert len(actions) == 1 and "\n" not in actions[0]


def test_lora_hot_swap_matches_the_learner(engine_policies, learner):
    import torch

    _, reflector = engine_policies
    reflector.load(learner.adapter())  # v0: LoRA B = 0, the base model
    probe = learner.adapter().extra["probe"]
    base = np.array(reflector.score(probe["prompt_ids"], probe["completion_ids"]))
    assert np.abs(base - probe["logprobs"]).max() < 1e-3
    with torch.no_grad():  # stand-in for training: move the LoRA weights
        for name, p in learner.model.named_parameters():
            if "lora_" in name:
                p.add_(0.3 * torch.randn_like(p))
    learner.version = 1
    new = learner.adapter()
    reflector.load(new)
    swapped = np.array(reflector.score(probe["prompt_ids"], probe["completion_ids"]))
    assert np.abs(swapped - np.array(new.extra["probe"]["logprobs"])).max() < 1e-3
    assert np.abs(swapped - base).max() > 1e-2  # the engine really serves the new adapter
    gens = reflector.reflect(["Game: twx/coin\nTask: find the coin\nReflection: In the next trial I will"], seed=3)
    g = gens[0]
    assert len(g.token_ids) == len(g.logprobs) > 0
    # behaviour log-probs from sampling equal the learner's recomputation under the same weights
    ids = torch.tensor([g.prompt_ids + g.token_ids])
    with torch.no_grad():
        lp = torch.log_softmax(learner.model(input_ids=ids).logits[0, :-1], -1)
    mine = lp.gather(-1, ids[0, 1:, None]).squeeze(-1)[len(g.prompt_ids) - 1:].numpy()
    assert np.abs(mine - np.array(g.logprobs)).max() < 1e-3
