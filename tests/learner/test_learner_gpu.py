"""Opt-in GPU tier: the learner on CUDA publishes adapters a CPU worker reproduces (skipped without CUDA)."""
import numpy as np
import pyarrow as pa
import pytest
import torch

from retro_dist.agents.backends import HFBackend
from retro_dist.config import LearnerConfig, ReflectorConfig
from retro_dist.core.records import to_batch
from retro_dist.learner.learner import Learner
from retro_dist.replay.config import ReplayConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_cuda_learner_update_and_cpu_worker_probe(tmp_path, tiny_model):
    from test_learner import _samples  # same folder: pytest puts it on sys.path

    lrn = Learner(LearnerConfig(device="cuda", lr=1e-2, batch_size=4, micro_batch_size=2), ReflectorConfig(model=tiny_model),
                  str(tmp_path / "replay"), ReplayConfig(), str(tmp_path), seed=0)
    assert next(lrn.model.parameters()).is_cuda
    m = lrn.update(pa.Table.from_batches([to_batch(_samples(lrn.tokenizer))]))
    assert np.isfinite(m["losses/pg"]) and m["losses/grad_norm"] > 0
    adapter = lrn.adapter()
    assert all(not t.is_cuda for t in adapter.tensors.values())  # published on the CPU, once
    worker = HFBackend(tiny_model, ReflectorConfig(model=tiny_model))
    worker.load_adapter(adapter)
    probe = adapter.extra["probe"]
    got = np.array(worker.score(probe["prompt_ids"], probe["completion_ids"]))
    assert np.abs(got - np.array(probe["logprobs"])).max() < 1e-3  # GPU vs CPU kernels agree
