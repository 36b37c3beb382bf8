"""`retro-dist eval` in-process: the report's shape, and behaviour a greedy actor guarantees."""
import json

import pytest

from retro_dist.config import load_config
from retro_dist.launch.evaluate import run_eval

pytestmark = pytest.mark.component


def test_eval_writes_table_json_and_plot(tmp_path, in_repo, tiny_model):
    cfg = load_config("configs/test.yaml", [f"actor.model={tiny_model}", f"reflector.model={tiny_model}",
                                            "actor.action_selection=score_valid", "rollout.num_workers=0"])
    report = run_eval(cfg, None, n_tasks=8, trials=3, split="test", output=str(tmp_path),
                      arms=["oracle", "none", "initial"])
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert set(saved["arms"]) == {"none", "initial", "oracle"} and saved["tasks"] == 8
    assert len(saved["seeds"]) == 8 and all(isinstance(s, int) for s in saved["seeds"])
    for arm, rates in saved["arms"].items():
        assert len(rates) == 3 and rates == sorted(rates)  # cumulative: never decreases
        for r, (lo, hi) in zip(rates, saved["ci95"][arm]):
            assert lo <= r <= hi
    # a greedy actor on a deterministic game replays a failed trial exactly: retries alone add nothing
    assert len(set(saved["arms"]["none"])) == 1
    # every arm runs the same first trial (no memory yet)
    assert len({rates[0] for rates in saved["arms"].values()}) == 1
    assert "| none |" in (tmp_path / "eval.md").read_text()
    assert (tmp_path / "eval.png").stat().st_size > 1000
    assert report["task_ids"][0].startswith("twx/coin/test/")


def test_trained_arm_needs_a_checkpoint(tmp_path, in_repo, tiny_model):
    cfg = load_config("configs/test.yaml", ["rollout.num_workers=0"])
    with pytest.raises(ValueError, match="trained arm needs --checkpoint"):
        run_eval(cfg, None, 4, 2, "test", str(tmp_path), arms=["trained"])


def test_checkpoint_selection_never_uses_the_test_split(tmp_path, in_repo):
    from retro_dist.launch.evaluate import select_checkpoint

    cfg = load_config("configs/test.yaml", ["rollout.num_workers=0"])
    with pytest.raises(ValueError, match="never on the test split"):
        select_checkpoint(cfg, str(tmp_path), every=10, n_tasks=4, trials=2, split="test")
    with pytest.raises(FileNotFoundError, match="no checkpoints under"):
        select_checkpoint(cfg, str(tmp_path), every=10, n_tasks=4, trials=2, split="dev")
