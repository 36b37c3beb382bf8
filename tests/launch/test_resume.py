"""Resume: a run continues from its newest checkpoint; keys that fix episode keys must not change."""
import json

import pytest

from retro_dist.config import ConfigError, load_config
from retro_dist.launch.train import train

pytestmark = pytest.mark.component


def test_resume_continues_and_refuses_changed_keys(tmp_path, in_repo, tiny_model):
    base = [f"run.output_dir={tmp_path}", f"actor.model={tiny_model}", f"reflector.model={tiny_model}",
            "rollout.num_workers=0", "rollout.tasks_per_iteration=2", "rollout.parallel_tasks=2"]
    run_dir = train(load_config("configs/test.yaml", base + ["run.iterations=1"]))
    assert (run_dir / "checkpoints" / "000001" / "learner_state.json").is_file()
    with pytest.raises(ConfigError, match="run.resume: rollout.tasks_per_iteration was 2"):
        train(load_config("configs/test.yaml", base[:-2] + ["rollout.tasks_per_iteration=4",
                                                            "rollout.parallel_tasks=2", "run.resume=true",
                                                            "run.iterations=2"]))
    train(load_config("configs/test.yaml", base + ["run.resume=true", "run.iterations=2"]))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]  # iteration 0 not redone
    assert rows[1]["rollout/policy_versions"] == [1] and rows[1]["learner/version"] == 2
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["000001", "000002"]


@pytest.mark.parametrize("mode,path", [("sync", "configs/test.yaml"), ("async", "configs/retro-coin-async.yaml")])
def test_a_saved_config_loads_again_as_it_is(tmp_path, in_repo, mode, path):
    """`retro-dist eval --config <run>/config.yaml`: the saved config must not carry the other
    mode's keys (an async run's used to hold run.iterations, and failed to load)."""
    from retro_dist.config import as_dict
    from retro_dist.config_rules import without_other_mode
    from retro_dist.launch.train import prepare_run_dir

    cfg = load_config(path, [f"run.output_dir={tmp_path}"])
    run_dir = prepare_run_dir(cfg)
    again = load_config(str(run_dir / "config.yaml"))
    assert without_other_mode(as_dict(again), mode) == without_other_mode(as_dict(cfg), mode)
    assert again.run.mode == mode
    prepare_run_dir(load_config(path, [f"run.output_dir={tmp_path}", "run.resume=true"]))  # resume compares against it
