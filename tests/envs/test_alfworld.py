"""ALFWorld on the committed mini fixture: folds map to ALFWorld's folders, the expert plan solves."""
import importlib.util
import json
from pathlib import Path

import pytest

from retro_dist.config import EnvConfig
from retro_dist.envs.alfworld import AlfworldFamily
from retro_dist.envs.base import EnvError, Task

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MINI = FIXTURES / "alfworld_mini"


def _family(path=MINI) -> AlfworldFamily:
    return AlfworldFamily(EnvConfig(games=["alfworld/all"], data_path=str(path)))


def test_folds_map_to_alfworld_folders_and_skip_unsolvable():
    fam = _family()
    train = fam.tasks("all", "train", 10)
    # three train trials sorted by path (apple, egg, cool); the egg game has no egg and is skipped
    assert [t.task_id for t in train] == ["alfworld/all/train/0", "alfworld/all/train/2"]
    assert [t.seed for t in fam.tasks("all", "dev", 10)] == [0]  # valid_seen
    assert [t.seed for t in fam.tasks("all", "test", 10)] == [0]  # valid_unseen
    cool = fam.tasks("pick_cool_then_place_in_recep", "train", 10)
    assert [(t.env_name, t.seed) for t in cool] == [("alfworld/pick_cool_then_place_in_recep", 0)]
    assert fam.tasks("all", "train", 1) == train[:1]


def test_data_root_may_be_json_folder_itself():
    fam = _family(MINI / "json_2.1.1")
    assert fam.tasks("all", "dev", 10) == _family().tasks("all", "dev", 10)


@pytest.mark.parametrize("path, match", [(None, "data_path"), ("/nonexistent/alfworld", "/nonexistent/alfworld")])
def test_missing_data_is_one_clear_error(path, match):
    with pytest.raises(EnvError, match=match):
        AlfworldFamily(EnvConfig(data_path=path)).tasks("all", "train", 1)


def test_unknown_task_type_is_rejected():
    with pytest.raises(ValueError, match="pick_and_place_simple"):
        _family().tasks("make_coffee", "train", 1)


@pytest.mark.component
@pytest.mark.parametrize("game, split", [("pick_and_place_simple", "train"),
                                         ("pick_cool_then_place_in_recep", "train"),
                                         ("all", "dev"), ("all", "test")])
def test_expert_plan_solves(game, split):
    pytest.importorskip("alfworld")
    fam = _family()
    task = fam.tasks(game, split, 1)[0]
    plan = fam.oracle_plan(task)
    env = fam.make()
    instruction, obs = env.reset(task)
    assert instruction.startswith("Your task is to: ") and "You are in the middle of a room" in obs.text
    assert plan[0] in obs.valid_actions and not obs.done
    for action in plan[:-1]:
        mid = env.step(action)
        assert not mid.done and mid.score == 0.0
    last = env.step(plan[-1])
    assert last.done and last.success and last.reward == 1.0 and last.score == 1.0
    env.close()


@pytest.mark.component
def test_wrong_actions_keep_it_unsolved():
    pytest.importorskip("alfworld")
    fam = _family()
    task = fam.tasks("pick_and_place_simple", "train", 1)[0]
    env = fam.make()
    env.reset(task)
    assert env.step("fly to the moon").text == "Nothing happens."
    for action in ["go to countertop 1", "take apple 1 from countertop 1", "go to cabinet 1",
                   "open cabinet 1", "move apple 1 to cabinet 1"]:
        obs = env.step(action)
    assert not obs.done and not obs.success and obs.score == 0.0


@pytest.mark.component
def test_reset_beyond_the_data_is_an_env_error():
    fam = _family()
    with pytest.raises(EnvError, match="no trial 7"):
        fam.make().reset(Task("alfworld/all/dev/7", "alfworld/all", 7, "dev"))


@pytest.mark.component
def test_fixture_script_reproduces_the_committed_fixture(tmp_path):
    """Guards drift: if this fails after an alfworld upgrade, re-run tests/fixtures/make_alfworld_fixture.py."""
    pytest.importorskip("alfworld")
    spec = importlib.util.spec_from_file_location("make_alfworld_fixture", FIXTURES / "make_alfworld_fixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for folder in module.build(tmp_path):
        committed = MINI / folder.relative_to(tmp_path)
        for name in ("initial_state.pddl", "traj_data.json", "game.tw-pddl"):
            assert (folder / name).read_text() == (committed / name).read_text(), committed / name
    walk = json.loads((MINI / "json_2.1.1/train/pick_and_place_simple-Egg-None-Fridge-1/trial_T0003/game.tw-pddl").read_text())
    assert walk["solvable"] is False and walk["walkthrough"] is None
