"""RolloutWorker (in-process): pulls weights between episodes, refuses a sync it cannot reproduce."""
from pathlib import Path

import pytest

from retro_dist.config import load_config
from retro_dist.launch.system import worker_specs
from retro_dist.rollout.weight_source import LocalWeightSource
from retro_dist.learner.learner import Learner
from retro_dist.rollout.worker import RolloutWorker, WeightSyncError

pytestmark = pytest.mark.component
ROOT_CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "test.yaml")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("run")
    cfg = load_config(ROOT_CONFIG, [f"actor.model={tiny_model}", f"reflector.model={tiny_model}",
                                    "rollout.tasks_per_iteration=2", "rollout.parallel_tasks=2"])
    learner = Learner(cfg.learner, cfg.reflector, str(d / "replay"), cfg.replay, str(d), 0)
    source = LocalWeightSource()
    worker = RolloutWorker(worker_specs(cfg, d, 1)[0], source)
    yield learner, source, worker
    worker.close()





def test_worker_uses_the_newest_version_and_tags_its_samples(setup):
    learner, source, worker = setup
    source.publish(learner.adapter())
    s0 = worker.rollout(0)
    assert s0["policy_version"] == 0 and s0["syncs"][0]["sync/probe_gap"] < 1e-4
    learner.version = 1
    source.publish(learner.adapter())
    s1 = worker.rollout(1)
    assert s1["policy_version"] == 1 and [s["sync/version"] for s in s1["syncs"]] == [1]
    assert worker.rollout(2)["syncs"] == []  # nothing newer: no reload


def test_probe_mismatch_is_an_error(setup):
    learner, source, worker = setup
    learner.version = 7
    bad = learner.adapter()
    bad.extra["probe"]["logprobs"] = [lp - 0.5 for lp in bad.extra["probe"]["logprobs"]]
    source.publish(bad)
    with pytest.raises(WeightSyncError, match=r"probe log-probs differ from the learner's by 0\.5"):
        worker.pull_weights()
