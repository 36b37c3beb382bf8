"""The multi-trial episode loop on real TextWorldExpress games."""
import numpy as np
import pytest

from retro_dist.agents.policies import build_policies
from retro_dist.config import ActorConfig, ReflectorConfig, VLLMConfig
from retro_dist.envs.base import Task
from retro_dist.envs.twx import TwxEnv
from retro_dist.rollout.episode import EpisodeIds, run_episodes

pytestmark = pytest.mark.component
PARAMS = "numLocations=4,includeDoors=0,numDistractorItems=0"


@pytest.fixture(scope="module")
def envs():
    es = [TwxEnv(PARAMS, step_limit=3) for _ in range(2)]
    yield es
    for e in es:
        e.close()


def _tasks(env, want_coin_in_start: bool, n: int):
    out = []
    for seed in env.seeds("coin", "train"):
        t = Task(f"twx/coin/train/{seed}", "twx/coin", seed, "train")
        _, obs = env.reset(t)
        if ("take coin" in obs.valid_actions) == want_coin_in_start:
            out.append(t)
        if len(out) == n:
            return out


@pytest.fixture(scope="module")
def policies(tiny_model):
    return build_policies(ActorConfig(backend="hf", model=tiny_model, max_new_tokens=6),
                          ReflectorConfig(backend="hf", model=tiny_model, max_new_tokens=8),
                          VLLMConfig(), seed=0)


class ScriptedActor:
    """Acts on memory: looks around until a reflection is in its prompt, then takes the coin.
    Makes the outcome of each trial known, so the reward bookkeeping can be checked exactly."""

    def __init__(self, real):
        self.fits, self.tokenizer = real.fits, real.tokenizer

    def act(self, prompts, seed, valid_actions=None):
        return ["take coin" if "Your memory" in p else "look around" for p in prompts]


def test_reflection_reward_is_next_return_minus_this_return(envs, policies):
    _, reflector = policies
    tasks = _tasks(envs[0], want_coin_in_start=True, n=2)
    out = run_episodes(tasks, envs, EpisodeIds("run", 3, [10, 11], seed=0), ScriptedActor(policies[0]),
                       reflector, trials=3, memory_size=3, step_limit=2)
    assert [(t.episode_id, t.trial, t.success) for t in out.trials] == [
        (10, 0, False), (11, 0, False), (10, 1, True), (11, 1, True)]  # stops at first success
    assert len(out.reflections) == 2
    for r in out.reflections:
        assert (r.trial, r.return_before, r.return_after, r.reward) == (0, 0.0, 1.0, 1.0)
        assert r.key == f"run/w3/e{r.episode_id}/t0" and r.policy_version == reflector.version
        trial1 = next(t for t in out.trials if t.episode_id == r.episode_id and t.trial == 1)
        assert trial1.memory == [r.reflection_text]  # the reflection was in the next trial's prompt


def test_real_hf_actor_and_reflector_records(envs, policies):
    actor, reflector = policies
    tasks = _tasks(envs[0], want_coin_in_start=False, n=2)
    out = run_episodes(tasks, envs, EpisodeIds("run", 0, [0, 1], seed=1), actor, reflector,
                       trials=2, memory_size=3, step_limit=2)
    assert {(t.episode_id, t.trial) for t in out.trials} >= {(0, 0), (1, 0)}
    for t in out.trials:
        assert len(t.observations) == len(t.actions) + 1 and t.error is None
    assert out.reflections, "both first trials failed, so reflections must have been written"
    for r in out.reflections:
        assert len(r.reflection_ids) == len(r.behaviour_logprobs) > 0
        # behaviour log-probs are the reflector's own log-probs of what it sampled
        scored = reflector.score(r.prompt_ids, r.reflection_ids)
        assert np.allclose(scored, r.behaviour_logprobs, atol=1e-4)
        assert reflector.tokenizer.decode(r.prompt_ids, skip_special_tokens=True).startswith("Game: twx/coin")


class ExplodingEnv:
    """A real TextWorldExpress env that raises on its second step (an environment bug)."""

    def __init__(self, env):
        self.env, self.steps = env, 0

    def reset(self, task):
        return self.env.reset(task)

    def step(self, action):
        self.steps += 1
        if self.steps == 2:
            raise RuntimeError("simulator crashed")
        return self.env.step(action)


def test_env_that_raises_marks_only_its_episode_errored(envs, policies):
    actor, reflector = policies
    tasks = _tasks(envs[0], want_coin_in_start=False, n=2)
    out = run_episodes(tasks, [ExplodingEnv(envs[0]), envs[1]], EpisodeIds("run", 0, [5, 6], seed=2),
                       actor, reflector, trials=2, memory_size=3, step_limit=3)
    bad = [t for t in out.trials if t.episode_id == 5]
    assert len(bad) == 1 and bad[0].error == "RuntimeError: simulator crashed" and not bad[0].success
    assert out.errors == [f"{tasks[0].task_id} trial 0: RuntimeError: simulator crashed"]
    assert {t.trial for t in out.trials if t.episode_id == 6} == {0, 1}  # the other episode went on
