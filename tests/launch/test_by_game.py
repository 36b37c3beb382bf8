"""Several games in one run: training metrics are broken down per game (sync, in-process)."""
import json

import pytest

from retro_dist.config import load_config
from retro_dist.launch.train import train

pytestmark = pytest.mark.component


def test_metrics_per_game(tmp_path, in_repo, tiny_model):
    cfg = load_config("configs/test.yaml", [
        f"run.output_dir={tmp_path}", f"actor.model={tiny_model}", f"reflector.model={tiny_model}",
        "rollout.num_workers=0", "run.iterations=1", "rollout.tasks_per_iteration=4", "rollout.parallel_tasks=4",
        "env.games=[twx/coin, twx/sorting]", "env.game_params='coin: numLocations=4,includeDoors=0; sorting:'"])
    (row,) = [json.loads(line) for line in (train(cfg) / "metrics.jsonl").read_text().splitlines()]
    for game in ("twx/coin", "twx/sorting"):
        assert 0.0 <= row[f"rollout/game/{game}/success@trial1"] <= 1.0
    assert row["rollout/game/twx/coin/success@trial0"] <= row["rollout/game/twx/coin/success@trial1"]
