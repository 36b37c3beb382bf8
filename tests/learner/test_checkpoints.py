"""Checkpoints: safetensors + JSON only (nothing unpickled), and save -> restore round-trips the
whole learner state: the next step after a restore equals the next step without one."""
import pyarrow as pa
import pytest
import torch
from conftest import random_rows

from retro_dist.config import LearnerConfig, ReflectorConfig
from retro_dist.learner import checkpoints
from retro_dist.learner.learner import Learner
from retro_dist.replay.config import ReplayConfig

pytestmark = pytest.mark.component


def _learner(tmp_path, tiny_model, seed):
    cfg = LearnerConfig(lr=1e-2, batch_size=7, micro_batch_size=4)
    return Learner(cfg, ReflectorConfig(backend="hf", model=tiny_model), str(tmp_path / "replay"),
                   ReplayConfig(), str(tmp_path), seed=seed)


def test_restore_round_trips_weights_optimizer_and_baseline(tmp_path, tiny_model, monkeypatch):
    a = _learner(tmp_path, tiny_model, seed=0)
    for _ in range(2):
        a.update(random_rows(7, seed=1))
    a.version = 2
    path = a.save_checkpoint()
    assert {p.name for p in path.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors",
                                               checkpoints.STATE_JSON, checkpoints.OPTIMIZER_TENSORS}
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in path.iterdir())

    def no_unpickling(*args, **kwargs):
        raise AssertionError("restore must not unpickle")

    monkeypatch.setattr(torch, "load", no_unpickling)
    b = _learner(tmp_path, tiny_model, seed=5)  # other seed: other initial LoRA A, other rng
    assert b.restore() == 2 and b.steps == 2
    sa, sb = a.baseline.state_dict(), b.baseline.state_dict()
    assert sb["per_task"] == pytest.approx(sa["per_task"]) and sb["seen"] == sa["seen"]
    table = random_rows(7, seed=2)
    adv, base = a.advantages(table)
    b.advantages(table)
    a.update(table, adv, base)
    b.update(table, adv, base)
    assert torch.equal(a.policy.trainable_vector(), b.policy.trainable_vector())


def test_legacy_pickled_state_loads_with_weights_only(tmp_path, tiny_model):
    a = _learner(tmp_path, tiny_model, seed=0)
    a.update(random_rows(7, seed=1))
    a.version = 1
    path = a.save_checkpoint()
    (path / checkpoints.STATE_JSON).unlink()
    (path / checkpoints.OPTIMIZER_TENSORS).unlink()
    torch.save({"optimizer": a.optimizer.state_dict(), "baseline": a.baseline.state_dict(), "version": 1, "steps": 1},
               path / checkpoints.LEGACY_STATE)
    b = _learner(tmp_path, tiny_model, seed=3)
    assert b.restore() == 1 and torch.equal(a.policy.trainable_vector(), b.policy.trainable_vector())
