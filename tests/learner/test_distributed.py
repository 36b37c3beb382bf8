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


def test_two_gloo_ranks_step_equals_single_process_step(tmp_path, tiny_model, ray_local):
    from retro_dist.launch.learner_group import LearnerGroup

    cfg = LearnerConfig(lr=1e-3, batch_size=8, micro_batch_size=2, micro_batch_tokens=150, is_truncation=1.5)
    reflector = ReflectorConfig(backend="hf", model=tiny_model)
    args = (cfg, reflector, str(tmp_path / "replay"), ReplayConfig())
    table = random_rows(8, seed=4)
    adv, base = np.random.default_rng(1).normal(size=8), np.zeros(8)

    single = Learner(*args, str(tmp_path / "single"), seed=0)
    want = single.update(table, adv, base)
    group = LearnerGroup(*args, str(tmp_path / "group"), seed=0, world_size=2)
    try:
        got = ray_local.get(group.leader.update.remote(table, adv, base))
        assert group.release() == [1]  # the follower took that step too
        lead, follow = ray_local.get([group.leader.adapter.remote(), group.followers[0].adapter.remote()])
    finally:
        group.close()
    assert torch.equal(_vector(lead), _vector(follow))  # the ranks never drift apart
    ref = _vector(single.adapter())
    assert (_vector(lead) - ref).abs().max() <= 1e-6
    assert (ref - _vector(Learner(*args, str(tmp_path / "fresh"), seed=0).adapter())).abs().max() > 1e-4  # it moved
    for key in ("losses/pg", "losses/grad_norm", "losses/mean_ratio", "losses/logprob"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6)
