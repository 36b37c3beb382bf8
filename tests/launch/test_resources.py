"""The joined-cluster resource check: a run that fits the cluster's totals passes; one that can
never be placed is refused in one line saying what is asked and what is offered."""
from pathlib import Path

import pytest

from retro_dist.config import ConfigError, load_config
from retro_dist.launch.resources import ResourceError, check_resources, requested

ROOT = Path(__file__).resolve().parents[2]


def _cfg(*overrides):
    return load_config(ROOT / "configs/test.yaml", list(overrides))


def test_request_counts_workers_learner_ranks_and_board():
    cfg = _cfg("rollout.num_workers=4", "rollout.worker_num_cpus=0.5", "rollout.worker_num_gpus=0.25",
               "learner.num_gpus=2")
    want = requested(cfg)
    # 4 workers × 0.5 CPU + 2 learner ranks × 1 CPU + board 0 CPU; 4 × 0.25 GPU + 2 ranks × 1 GPU
    assert (want["CPU"], want["GPU"], want["workers"], want["learner_ranks"]) == (4.0, 3.0, 4, 2)


def test_fitting_run_passes_exactly_at_capacity():
    cfg = _cfg("rollout.num_workers=2")  # 2 × 1 CPU + learner 1 CPU
    check_resources(cfg, {"CPU": 3.0, "memory": 1e9, "node:127.0.0.1": 1.0})


def test_too_few_cpus_is_one_line_asked_vs_offered():
    cfg = _cfg("rollout.num_workers=4")
    with pytest.raises(ResourceError) as err:
        check_resources(cfg, {"CPU": 3.0})
    msg = str(err.value)
    assert "\n" not in msg and isinstance(err.value, ConfigError)
    assert "CPU 5 asked > 3 offered" in msg and "4 rollout worker(s) × (1 CPU, 0 GPU)" in msg
    assert "GPU" not in msg.split("[")[0]  # only the short resource is named as short


def test_gpus_asked_on_a_cpu_cluster_are_refused():
    cfg = _cfg("rollout.num_workers=2", "rollout.worker_num_gpus=0.5", "learner.num_gpus=1")
    with pytest.raises(ResourceError, match=r"GPU 2 asked > 0 offered"):
        check_resources(cfg, {"CPU": 16.0})  # cluster_resources() has no GPU key without GPUs
    check_resources(cfg, {"CPU": 16.0, "GPU": 2.0})


def test_data_parallel_learner_ranks_count_one_gpu_each():
    cfg = _cfg("rollout.num_workers=1", "rollout.worker_num_gpus=1", "learner.num_gpus=4")
    with pytest.raises(ResourceError, match=r"GPU 5 asked > 4 offered.*learner 4 rank\(s\) × \(1 CPU, 1 GPU\)"):
        check_resources(cfg, {"CPU": 64.0, "GPU": 4.0})
    check_resources(cfg, {"CPU": 64.0, "GPU": 5.0})


def test_zero_workers_still_counts_the_one_worker_actor():
    cfg = _cfg("rollout.num_workers=0")  # system.py starts one worker actor when num_workers is 0
    assert requested(cfg)["workers"] == 1
    with pytest.raises(ResourceError, match="CPU 2 asked > 1 offered"):
        check_resources(cfg, {"CPU": 1.0})
