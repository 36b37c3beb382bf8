"""Actor pretraining for a mix (issue 10): examples for every game in env.games, each prompt naming
its game; without advice the oracle plan, with advice the newest plan's moves, on real games."""
import re

import pytest

from retro_dist.agents.pretrain import build_examples, route_of
from retro_dist.config import load_config

pytestmark = pytest.mark.component
pytest.importorskip("textworld_express")


@pytest.fixture(scope="module")
def examples():
    return build_examples(load_config("configs/retro-mix.yaml").env, n_tasks=3, seed=0)


def _newest_plan(prompt: str):
    plans = re.findall(r"^Trial \d+: In the next trial I will (.*)\.$", prompt, flags=re.M)
    return plans[-1].split(", ") if plans else None


def test_route_of():
    assert route_of(["move east", "move south", "take coin", "move north"]) == ["move east", "move south"]
    assert route_of(["take coin"]) == [] and route_of([]) == []


def test_every_game_gets_examples_in_its_own_prompts(examples):
    games = {e.prompt.split("\n", 1)[0] for e in examples}
    assert games == {"Game: twx/coin", "Game: twx/mapreader"}
    for game in ("coin", "mapreader"):
        mine = [e for e in examples if e.prompt.startswith(f"Game: twx/{game}\n")]
        advised = [e for e in mine if _newest_plan(e.prompt)]
        assert len(advised) > len(mine) / 2 > 0  # both kinds, advice walks the more numerous
    assert {e.action for e in examples if "mapreader" in e.prompt} >= {"take coin", "put coin in box"}


def test_first_move_follows_the_newest_plan_in_memory(examples):
    """Only reading the plan tells the actor where to go: its first move is the plan's, right or wrong."""
    firsts = [e for e in examples if "\n> " not in e.prompt and _newest_plan(e.prompt)]
    seen = {"coin": 0, "mapreader": 0}
    for e in firsts:
        plan = _newest_plan(e.prompt)
        game = "mapreader" if e.prompt.startswith("Game: twx/mapreader") else "coin"
        here = e.prompt.rsplit("Trial ", 1)[1].split("\n", 1)[1]  # the current observation
        if game == "coin" and "coin" in here:
            assert e.action == "take coin"  # the goal in reach: taken, whatever the plan says
        elif plan[0].startswith("move "):
            assert e.action == plan[0], (e.prompt, e.action)
            seen[game] += 1
        if game == "mapreader":  # a plan for any route: out, take, back the same way, put
            route = route_of(plan)
            assert plan[len(route):] == ["take coin"] + [_back(m) for m in reversed(route)] + ["put coin in box"]
    assert seen["coin"] > 0 and seen["mapreader"] > 0
    moves = {e.action for e in firsts if e.prompt.startswith("Game: twx/mapreader")}
    assert len(moves) > 1  # the plans go different ways from the same start


def _back(move: str) -> str:
    return "move " + {"north": "south", "south": "north", "east": "west", "west": "east"}[move.split()[1]]


@pytest.fixture(scope="module")
def order_examples():
    return build_examples(load_config("configs/retro-mix-order.yaml").env, n_tasks=3, seed=0)


def test_peckingorders_oracle_plan_is_the_order_and_solves_the_game():
    """The shortest plan is the takes alone; the game's own solution reads the book before each."""
    from retro_dist.envs.registry import family

    fam = family("twx", load_config("configs/retro-mix-order.yaml").env)
    task = fam.tasks("peckingorder", "test", 1)[0]
    plan, gold = fam.oracle_plan(task), fam.gold_path(task)
    assert len(plan) == 4 and all(a.startswith("take ") for a in plan)
    assert gold == [a for pair in zip(["read instructions book"] * 4, plan) for a in pair]
    env = fam.make()
    try:
        env.reset(task)
        obs = [env.step(a) for a in plan]
        assert obs[-1].success and not any(o.done for o in obs[:-1])
        env.reset(task)
        wrong = next(a for a in plan[1:] if a != plan[0])
        assert env.step(wrong).done and not env.step("read instructions book").success  # a wrong take ends it
    finally:
        env.close()


def test_the_actor_follows_an_orders_takes_then_reads_on(order_examples):
    """Advice is followed take by take while its item is in the room; once used up, the actor reads."""
    assert {e.prompt.split("\n", 1)[0] for e in order_examples} == {"Game: twx/coin", "Game: twx/peckingorder"}
    followed = read_on = 0
    for e in order_examples:
        plan = _newest_plan(e.prompt) if e.prompt.startswith("Game: twx/peckingorder\n") else None
        if not plan:
            continue
        here = e.prompt.rsplit("Trial ", 1)[1].split("\n", 1)[1]  # the trajectory so far
        done = re.findall(r"^> (.*)$", here, flags=re.M)
        if done != plan[: len(done)]:
            continue  # left the plan: an item that was not there
        if len(done) < len(plan):
            nxt = plan[len(done)]
            item = nxt.split(" ", 1)[1]
            if nxt.startswith("read ") or re.search(rf"\ban? {re.escape(item)}\b", here.split("\n", 1)[0]):
                assert e.action == nxt, (e.prompt, e.action)
                followed += 1
        elif all(a.startswith("take ") for a in plan):
            assert e.action == "read instructions book", (e.prompt, e.action)  # the rest of the order
            read_on += 1
    assert followed > 0 and read_on > 0
