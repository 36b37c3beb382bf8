"""Data-parallel learner: 2 gloo processes (Ray actors in one placement group) take the same
step as one process on the same batch; both ranks end with identical weights."""
import numpy as np
import pytest
import torch
from conftest import random_rows

from retro_dist.config import LearnerConfig, ReflectorConfig
from retro_dist.learner.learner import Learner
from retro_dist.replay.config import ReplayConfig

pytestmark = pytest.mark.component


@pytest.fixture
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


def _vector(adapter):
    return torch.cat([adapter.tensors[k].reshape(-1) for k in sorted(adapter.tensors)])


def test_two_gloo_ranks_step_like_one_process_and_restore_together(tmp_path, tiny_model, ray_local):
    from retro_dist.launch.learner_group import LearnerGroup

    cfg = LearnerConfig(lr=1e-3, batch_size=8, micro_batch_size=2, micro_batch_tokens=150, is_truncation=1.5)
    reflector = ReflectorConfig(backend="hf", model=tiny_model)
    args = (cfg, reflector, str(tmp_path / "replay"), ReplayConfig())
    tables = [random_rows(8, seed=s) for s in (4, 5, 6)]
    adv, base = np.random.default_rng(1).normal(size=8), np.zeros(8)

    single = Learner(*args, str(tmp_path / "run"), seed=0)
    want = single.update(tables[0], adv, base)
    single_step1 = _vector(single.adapter())
    group = LearnerGroup(*args, str(tmp_path / "run"), seed=0, world_size=2)
    try:
        got = ray_local.get(group.leader.update.remote(tables[0], adv, base))
        step1 = ray_local.get(group.leader.adapter.remote())
        # rank 0 restores a checkpoint the group never trained to (the single learner's second
        # step): the follower must take its state from rank 0, or the next step would diverge
        single.update(tables[1], adv, base)
        single.version = 2
        single.save_checkpoint()
        assert ray_local.get(group.leader.restore.remote()) == 2
        ray_local.get(group.leader.update.remote(tables[2], adv, base))
        assert group.release() == [3]  # the follower's step count came with the state
        lead, follow = ray_local.get([group.leader.adapter.remote(), group.followers[0].adapter.remote()])
    finally:
        group.close()
    assert (_vector(step1) - single_step1).abs().max() <= 1e-6  # one step: 2 ranks == 1 process
    assert (single_step1 - _vector(Learner(*args, str(tmp_path / "fresh"), seed=0).adapter())).abs().max() > 1e-4
    for key in ("losses/pg", "losses/grad_norm", "losses/mean_ratio", "losses/logprob"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6)
    single.update(tables[2], adv, base)
    assert torch.equal(_vector(lead), _vector(follow))  # the ranks never drift apart
    assert (_vector(lead) - _vector(single.adapter())).abs().max() <= 1e-6
