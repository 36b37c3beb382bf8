"""Probe check with mixed precision: a bf16 engine (an HF model cast to bf16 on the CPU) against
the fp32 learner passes with the right weights and fails with stale or wrong ones."""
import numpy as np
import pyarrow as pa
import pytest
import torch
from test_learner import _samples

from retro_dist.agents.backends import HFBackend
from retro_dist.config import LearnerConfig, ReflectorConfig
from retro_dist.core.records import to_batch
from retro_dist.learner.learner import Learner
from retro_dist.learner.probe import probe_gap, probe_matches, probe_tolerance
from retro_dist.replay.config import ReplayConfig

pytestmark = pytest.mark.component


def test_tolerance_sits_between_precision_floor_and_half_the_movement():
    assert probe_tolerance(0.02, 0.001, None) == 0.02
    assert probe_tolerance(0.02, 0.001, 0.01) == pytest.approx(0.005)
    assert probe_tolerance(0.02, 0.001, 0.1) == 0.02  # capped
    assert probe_tolerance(0.02, 0.001, 0.001) == pytest.approx(0.003)  # never below the floor
    assert probe_gap([-1.0, -2.0], [-1.5, -2.0]) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="2 probe tokens"):
        probe_gap([-1.0, -2.0], [-1.0])


def _learner(tmp_path, tiny_model, seed, lr=1e-3):
    cfg = LearnerConfig(lr=lr, batch_size=4, micro_batch_size=4)
    return Learner(cfg, ReflectorConfig(backend="hf", model=tiny_model), str(tmp_path / f"replay{seed}"),
                   ReplayConfig(), str(tmp_path / f"run{seed}"), seed=seed)


def _step(lrn, advantages):
    lrn.update(pa.Table.from_batches([to_batch(_samples(lrn.tokenizer))]), np.array(advantages), np.zeros(4))
    lrn.version += 1
    return lrn.adapter()


def test_bf16_engine_passes_with_right_weights_and_fails_with_stale_or_wrong(tmp_path, tiny_model):
    lrn = _learner(tmp_path, tiny_model, seed=0)
    v0 = lrn.adapter()
    v1 = _step(lrn, [1.0, -1.0, 1.0, -1.0])
    other = _learner(tmp_path, tiny_model, seed=1)  # same shapes, other data: a wrong adapter
    wrong = _step(other, [-1.0, 1.0, -1.0, 1.0])
    probe = v1.extra["probe"]
    assert probe["precision_gap"] > 0 and probe["movement"] > 2 * 3 * probe["precision_gap"]

    engine = HFBackend(tiny_model, ReflectorConfig(backend="hf", model=tiny_model))
    engine.model.to(torch.bfloat16)  # what a bf16 vLLM engine computes, base and LoRA in bf16
    fp32 = HFBackend(tiny_model, ReflectorConfig(backend="hf", model=tiny_model))
    results = {}
    for name, worker, adapter in (("right", engine, v1), ("stale", engine, v0), ("wrong", engine, wrong),
                                  ("fp32", fp32, v1)):
        worker.load_adapter(adapter)
        got = worker.score(probe["prompt_ids"], probe["completion_ids"])
        results[name] = probe_matches(probe, got, lrn.cfg.probe_tolerance)
    assert results["right"][0] and results["fp32"][0], results
    assert results["fp32"][1] < 1e-4  # same precision: only kernel rounding
    assert 0 < results["right"][1]  # bf16 really rounded something
    assert not results["stale"][0] and not results["wrong"][0], results
    # the flat default (0.02) could not have told v0 from v1 here: the per-version tolerance can
    assert results["stale"][1] < lrn.cfg.probe_tolerance
