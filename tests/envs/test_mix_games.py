"""The coin + mapreader mix (issue 10) on real TextWorldExpress games: mapreader's oracle plan (from
the start and from any state, a wrong move included), plans for any route, and per-game step limits."""
import pytest

from retro_dist.config import ConfigError, EnvConfig, load_config
from retro_dist.envs.registry import MixedEnv, parse_step_limits
from retro_dist.envs.twx import reverse_move

pytestmark = pytest.mark.component
pytest.importorskip("textworld_express")
PARAMS = ("coin: numLocations=4,includeDoors=0,numDistractorItems=0; "
          "mapreader: numLocations=6,maxDistanceApart=2,includeDoors=0,maxDistractorItemsPerLocation=0")
FAMILY_CFG = CFG = EnvConfig(games=["twx/coin", "twx/mapreader"], game_params=PARAMS, step_limit=6, step_limits="twx/coin: 2")


def _play(env, task, actions):
    env.reset(task)
    for a in actions:
        obs = env.step(a)
    return obs


def test_mapreader_oracle_plan_solves_by_the_shortest_walk(family, env):
    lengths = set()
    for task in family.tasks("mapreader", "train", 8):
        plan = family.oracle_plan(task)
        route = plan[: plan.index("take coin")]
        assert plan == family.plan_for_route(task, route)  # out, take, back the same way, put
        assert len(plan) <= len(env.gold_path(task)), plan  # the gold path also reads the map
        obs = _play(env, task, plan)
        assert obs.done and obs.success and obs.score == 1.0, (task, plan)
        lengths.add(len(plan))
    assert lengths == {4, 6}  # the coin one or two rooms away


def test_oracle_plan_from_any_state_finishes_the_task(family, env):
    """What pretraining continues with after a plan's moves, right or wrong: in mapreader a wrong
    first move is undone (the search may step straight back out of the state it starts from); coin
    keeps the rule its published actor was built with (never straight back: a way forward, or none)."""
    for game in ("mapreader", "coin"):
        for task in family.tasks(game, "train", 6):
            plan = family.oracle_plan(task)
            for k in range(1, len(plan)):
                assert _play(env, task, plan[:k] + family.oracle_plan(task, prefix=plan[:k])).success
            _, obs = env.reset(task)
            wrong = [m for m in obs.valid_actions if m.startswith("move ") and m != plan[0]]
            if wrong:
                rest = family.oracle_plan(task, prefix=wrong[:1])
                if game == "coin":
                    assert rest is None or rest[0] != reverse_move(wrong[0])
                    if rest is None:
                        continue
                assert _play(env, task, wrong[:1] + rest).success, (task, wrong, rest)
                if game == "mapreader" and plan[0].startswith("move "):  # the way went through the start
                    assert rest[0] == reverse_move(wrong[0])


def test_step_limits_end_a_coin_trial_after_two_steps_only(family):
    coin = next(t for t in family.tasks("coin", "train", 40) if len(family.oracle_plan(t)) == 3)
    short = next(t for t in family.tasks("coin", "train", 40) if len(family.oracle_plan(t)) == 2)
    maps = family.tasks("mapreader", "train", 1)[0]
    env = MixedEnv(CFG)
    try:
        env.reset(coin)
        plan = family.oracle_plan(coin)
        assert not env.step(plan[0]).done
        obs = env.step(plan[1])  # its third action would take the coin: too late
        assert obs.done and not obs.success
        env.reset(short)
        obs = [env.step(a) for a in family.oracle_plan(short)][-1]
        assert obs.done and obs.success  # solved on the last allowed step
        env.reset(maps)  # mapreader has no own limit: it gets env.step_limit (the episode loop's)
        plan = family.oracle_plan(maps)
        steps = [env.step(a) for a in plan]
        assert not any(o.done for o in steps[:-1]) and steps[-1].success and len(plan) > 2
    finally:
        env.close()


def test_step_limits_parse_and_validate():
    assert parse_step_limits("") == {}
    assert parse_step_limits("twx/coin: 2; twx/mapreader:6;") == {"twx/coin": 2, "twx/mapreader": 6}
    for bad in ("twx/coin", "twx/coin: two", ": 3", "twx/coin: 0"):
        with pytest.raises(ValueError, match="is not `<family>/<game>: <steps >= 1>`"):
            parse_step_limits(bad)
    cfg = load_config("configs/retro-mix.yaml")
    assert parse_step_limits(cfg.env.step_limits) == {"twx/coin": 2} and cfg.env.step_limit == 6
    with pytest.raises(ConfigError, match="names 'twx/sorting', which is not in env.games"):
        load_config("configs/retro-mix.yaml", ["env.step_limits='twx/sorting: 2'"])
    with pytest.raises(ConfigError, match=r"twx/coin: 7 exceeds env.step_limit \(6\)"):
        load_config("configs/retro-mix.yaml", ["env.step_limits='twx/coin: 7'"])
    with pytest.raises(ConfigError, match="env.step_limits: 'coin' is not"):
        load_config("configs/retro-mix.yaml", ["env.step_limits=coin"])
