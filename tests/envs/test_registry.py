"""A multi-family run: TaskMix interleaves games, MixedEnv dispatches each task to its family."""
from pathlib import Path

import pytest

from retro_dist.config import EnvConfig
from retro_dist.envs.registry import MixedEnv, TaskMix, family

pytestmark = pytest.mark.component
pytest.importorskip("textworld_express")
MINI = str(Path(__file__).resolve().parents[1] / "fixtures" / "hotpotqa_mini.json")


@pytest.fixture(scope="module")
def cfg():
    return EnvConfig(games=["twx/coin", "hotpotqa/distractor"], data_path=MINI,
                     game_params="numLocations=4,includeDoors=0,numDistractorItems=0", num_tasks=3)


def test_taskmix_interleaves_games_and_cycles_pools(cfg):
    mix = TaskMix(cfg, "train")
    tasks = mix.take(0, 8)
    assert [t.env_name for t in tasks] == ["twx/coin", "hotpotqa/distractor"] * 4
    twx, hotpot = tasks[0::2], tasks[1::2]
    assert len({t.task_id for t in twx[:3]}) == 3 and twx[3] == twx[0]  # num_tasks=3, then cycle
    assert len({t.task_id for t in hotpot[:3]}) == 3 and hotpot[3] == hotpot[0]
    assert all(t.split == "train" for t in tasks)
    assert mix.take(5, 3) == tasks[5:8]


def test_mixedenv_dispatches_to_both_families(cfg):
    twx_task, hotpot_task = TaskMix(cfg, "train").take(0, 2)
    env, twx = MixedEnv(cfg), family("twx", cfg)
    try:
        instruction, obs = env.reset(hotpot_task)
        assert instruction.startswith("Answer the question:") and obs.valid_actions[0].startswith("search[")
        answer = family("hotpotqa", cfg).oracle_plan(hotpot_task)[-1]
        assert env.step(answer).success

        _, obs = env.reset(twx_task)
        assert any(a.startswith("move ") for a in obs.valid_actions)
        for action in twx.oracle_plan(twx_task):
            obs = env.step(action)
        assert obs.success

        _, obs = env.reset(hotpot_task)  # back to the first family's simulator, built once
        assert not obs.done and sorted(env._envs) == ["hotpotqa", "twx"]
    finally:
        env.close()
        if twx._probe is not None:  # the planner's own simulator (a JVM)
            twx._probe.close()
