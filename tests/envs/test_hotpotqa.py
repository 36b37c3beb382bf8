"""HotPotQA as a ReAct game: search/lookup/finish semantics, official F1/EM scoring, folds, data errors."""
import json
from pathlib import Path

import pytest

from retro_dist.config import EnvConfig
from retro_dist.envs.base import EnvError, Task
from retro_dist.envs.hotpotqa import (HotpotQAFamily, answer_f1, exact_match, fold_of, load_split,
                                      normalize_answer)

MINI = str(Path(__file__).resolve().parents[1] / "fixtures" / "hotpotqa_mini.json")


def _family(path=MINI) -> HotpotQAFamily:
    return HotpotQAFamily(EnvConfig(games=["hotpotqa/distractor"], data_path=path))


def _task(fam: HotpotQAFamily, qid: str) -> Task:
    for split in ("train", "dev", "test"):
        for t in fam.tasks("distractor", split, 100):
            if t.task_id.endswith("/" + qid):
                return t
    raise KeyError(qid)


# ---- scoring, hand-computed ----

def test_normalize_answer_drops_case_punctuation_articles():
    assert normalize_answer("The  Malven-River!") == "malvenriver"
    assert normalize_answer("An apple, a day") == "apple day"


@pytest.mark.parametrize("pred, gold, f1", [
    ("Malven River", "Malven River", 1.0),
    ("the malven river.", "Malven River", 1.0),
    ("river", "Malven River", 2 * 1.0 * 0.5 / 1.5),  # P = 1/1, R = 1/2
    ("Malven river delta", "Malven River", 2 * (2 / 3) * 1.0 / (2 / 3 + 1.0)),  # P = 2/3, R = 1
    ("Orsk", "Malven River", 0.0),
    ("yes", "no", 0.0),
    ("no it is not", "no", 0.0),  # yes/no answers must match exactly, shared tokens do not count
    ("yes", "Yes.", 1.0),
])
def test_answer_f1_hand_cases(pred, gold, f1):
    assert answer_f1(pred, gold) == pytest.approx(f1)


def test_exact_match_is_normalised_equality():
    assert exact_match("the Kettle", "Kettle")
    assert not exact_match("Kettle stadium", "the Kettle")


# ---- folds ----

def test_folds_are_stable_disjoint_and_cover_the_file():
    data = json.loads(Path(MINI).read_text())
    fam = _family()
    ids = {s: [t.task_id.rsplit("/", 1)[1] for t in fam.tasks("distractor", s, 100)]
           for s in ("train", "dev", "test")}
    assert sorted(sum(ids.values(), [])) == sorted(q["_id"] for q in data)
    assert all(ids.values()), ids  # the fixture's ids were chosen so that every fold has a question
    for split, qids in ids.items():
        assert all(fold_of(q) == split for q in qids)
    assert fold_of("mini-001") == "test" and fold_of("mini-007") == "dev"  # sha1, not salted hash()
    assert fam.tasks("distractor", "train", 2) == _family().tasks("distractor", "train", 2)


def test_folder_with_split_files(tmp_path):
    data = json.loads(Path(MINI).read_text())
    for split, qs in (("train", data[:5]), ("dev", data[5:6]), ("test", data[6:])):
        (tmp_path / f"{split}.json").write_text(json.dumps(qs))
    fam = _family(str(tmp_path))
    assert [t.task_id for t in fam.tasks("distractor", "dev", 10)] == [f"hotpotqa/distractor/dev/{data[5]['_id']}"]
    assert len(fam.tasks("distractor", "train", 3)) == 3


@pytest.mark.parametrize("path", [None, "/nonexistent/hotpot.json"])
def test_missing_data_path_is_one_clear_error(path):
    load_split.cache_clear()
    with pytest.raises(EnvError) as err:
        _family(path).tasks("distractor", "train", 1)
    msg = str(err.value)
    assert "\n" not in msg and (path is None and "data_path" in msg or path is not None and path in msg)


def test_malformed_data_names_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "no id"}]))
    with pytest.raises(EnvError, match="bad.json"):
        _family(str(bad)).tasks("distractor", "train", 1)


def test_unknown_game_is_rejected():
    with pytest.raises(ValueError, match="distractor"):
        _family().tasks("fullwiki", "train", 1)


# ---- the game ----

def test_reset_shows_question_and_search_actions():
    fam = _family()
    instruction, obs = fam.make().reset(_task(fam, "mini-001"))
    assert "Which river flows through the capital of Veltria?" in instruction
    assert obs.valid_actions == ["search[Drobny]", "search[Veltria]", "search[Kessel Lake]", "search[Orsk]"]
    assert "Veltria" in obs.text and not obs.done and obs.score == 0.0


def test_search_hits_forgiving_case_and_typos_and_misses_with_similar_titles():
    fam = _family()
    env = fam.make()
    env.reset(_task(fam, "mini-001"))
    hit = env.step("search[veltria]")
    assert hit.text.startswith("Veltria is a small republic") and "Its capital is Orsk" in hit.text
    assert env.step("Search[Velltria]").text.startswith("Veltria is")  # one typo still finds it
    miss = env.step("search[Malven River]")
    assert miss.text.startswith("Could not find [Malven River]. Similar: [")
    assert all(t in miss.text for t in ("Drobny", "Veltria", "Kessel Lake", "Orsk"))
    assert not miss.done and miss.reward == 0.0


def test_lookup_walks_matches_in_the_last_found_paragraph():
    fam = _family()
    env = fam.make()
    env.reset(_task(fam, "mini-005"))
    assert "search[entity] first" in env.step("lookup[Hallam]").text
    env.step("search[Jonah Pike]")
    first = env.step("lookup[hallam]")
    assert first.text == "(Result 1 / 1) Pike won the Hallam Prize in 1987 for his novel Winter Ledger."
    assert env.step("lookup[hallam]").text == "No more results."
    assert env.step("lookup[Pike]").text.startswith("(Result 1 / 2) Jonah Pike (1941-2010)")  # new keyword restarts
    env.step("search[Could not find this]")  # a miss keeps the last found paragraph
    assert env.step("lookup[Pike]").text.startswith("(Result 2 / 2)")


def test_finish_scores_f1_and_ends_the_episode():
    fam = _family()
    env = fam.make()
    env.reset(_task(fam, "mini-001"))
    partial = env.step("finish[the river]")
    assert partial.done and not partial.success
    assert partial.reward == pytest.approx(answer_f1("the river", "Malven River")) == partial.score
    assert env.step("search[Orsk]").text == "Episode already finished."
    env.reset(_task(fam, "mini-001"))
    exact = env.step("finish[Malven River]")
    assert exact.done and exact.success and exact.score == 1.0


def test_invalid_action_is_an_observation_not_an_error():
    fam = _family()
    env = fam.make()
    env.reset(_task(fam, "mini-003"))
    obs = env.step("go north")
    assert obs.text.startswith("Invalid action: go north") and not obs.done


@pytest.mark.parametrize("qid", [f"mini-00{i}" for i in range(1, 9)])
def test_oracle_plan_solves_every_question(qid):
    fam = _family()
    task = _task(fam, qid)
    env = fam.make()
    env.reset(task)
    plan = fam.oracle_plan(task)
    assert plan[-1].startswith("finish[") and len(plan) == 3
    for action in plan[:-1]:
        assert not env.step(action).text.startswith("Could not find")
    last = env.step(plan[-1])
    assert last.done and last.success and last.score == 1.0
