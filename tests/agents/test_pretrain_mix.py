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
