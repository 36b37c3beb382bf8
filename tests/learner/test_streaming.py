"""The async learner loop: steps on sealed rows within max_policy_lag, counts the rest, publishes
every updates_per_version steps, and fresh rows (behaviour = current policy) have IS ratio 1."""
import time

import numpy as np
import pytest
import torch

from retro_dist.config import LearnerConfig, ReflectorConfig
from retro_dist.core.records import ReflectionSample, make_key, to_batch
from retro_dist.learner.learner import Learner
from retro_dist.learner.streaming import LearnerLoop
from retro_dist.replay.config import ReplayConfig
from retro_dist.replay.writer import ReplayWriter
from retro_dist.rollout.weight_source import LocalWeightSource

pytestmark = pytest.mark.component


def _rows(learner, versions, start=0, behaviour_from_model=False):
    tok = learner.tokenizer
    prompt = tok("Game: twx/coin\nTask: find the coin\nReflection: In the next trial I will").input_ids
    refl = tok(" go north", add_special_tokens=False).input_ids
    if behaviour_from_model:  # the current policy's own log-probs: an on-policy row
        ids = torch.tensor([prompt + refl])
        with torch.no_grad():
            lp = torch.log_softmax(learner.model(input_ids=ids).logits[0, :-1], -1)
        beh = lp.gather(-1, ids[0, 1:, None]).squeeze(-1)[len(prompt) - 1:].tolist()
    else:
        beh = [-1.0] * len(refl)
    return [ReflectionSample(key=make_key("t", 0, start + i, 0), run_id="t", worker_id=0, episode_id=start + i,
                             task_id=f"twx/coin/train/{i % 3}", env_name="twx/coin", trial=0, prompt_ids=prompt,
                             reflection_ids=refl, behaviour_logprobs=beh, reflection_text="", return_before=0.0,
                             return_after=float(i % 2), reward=float(i % 2), policy_version=v)
            for i, v in enumerate(versions)]


def _make(tmp_path, tiny_model, lr=1e-3, max_lag=1):
    cfg = LearnerConfig(lr=lr, batch_size=4, micro_batch_size=2)
    replay = ReplayConfig(min_size_to_sample=1, on_overflow="drop", max_staleness=max_lag)
    return lambda: Learner(cfg, ReflectorConfig(backend="hf", model=tiny_model), str(tmp_path / "replay"),
                           replay, str(tmp_path), seed=0)


def _wait(loop, steps, timeout=120):
    t0 = time.time()
    while loop.learner.steps < steps and time.time() - t0 < timeout:
        time.sleep(0.05)


def test_loop_bounds_lag_counts_dropped_and_publishes_every_k(tmp_path, tiny_model):
    source = LocalWeightSource()
    published = []
    loop = LearnerLoop(_make(tmp_path, tiny_model), lambda a: (published.append(a.version), source.publish(a)),
                       max_steps=6, updates_per_version=2, max_policy_lag=1)
    with ReplayWriter(str(tmp_path / "replay"), "w0", ReplayConfig()) as w:
        w.append("reflections", to_batch(_rows(loop.learner, [0] * 6 + [1] * 6)))
    assert loop.start() == 0
    _wait(loop, 6)
    final = loop.stop()
    assert loop.learner.steps == 6 and loop.done
    assert published == [0, 1, 2, 3]  # the start version, then one per 2 steps
    assert source.newest_version() == 3
    # at version 2 (steps 5-6) the v0 rows were 2 versions old: never trained on, counted
    assert final["staleness/dropped_rows"] == 6
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["000001", "000002", "000003"]


def test_loop_waits_for_data_and_trains_fresh_rows_with_ratio_one(tmp_path, tiny_model):
    loop = LearnerLoop(_make(tmp_path, tiny_model, lr=1e-9), lambda a: None, max_steps=2,
                       updates_per_version=10, max_policy_lag=1)
    loop.start()
    time.sleep(1.0)
    idle = loop.poll()
    assert idle["learner/updates"] == 0 and loop.learner.steps == 0  # nothing sealed yet: it waits
    with ReplayWriter(str(tmp_path / "replay"), "w0", ReplayConfig()) as w:
        w.append("reflections", to_batch(_rows(loop.learner, [0] * 4, behaviour_from_model=True)))
    _wait(loop, 2)
    m = loop.stop()
    assert m["learner/steps"] == 2
    # the cheapest check that the worker served the learner's weights: ratio 1 on fresh rows
    assert abs(m["losses/mean_ratio"] - 1.0) < 1e-4
    assert abs(m["losses/mean_ratio_fresh"] - 1.0) < 1e-4
    assert m["staleness/version_lag_max"] == 0


def test_loop_error_surfaces_on_poll(tmp_path, tiny_model):
    def broken_publish(adapter):
        if adapter.version > 0:
            raise OSError("board unreachable")

    loop = LearnerLoop(_make(tmp_path, tiny_model), broken_publish, max_steps=4, updates_per_version=1,
                       max_policy_lag=1)
    with ReplayWriter(str(tmp_path / "replay"), "w0", ReplayConfig()) as w:
        w.append("reflections", to_batch(_rows(loop.learner, [0] * 4)))
    loop.start()
    t0 = time.time()
    while loop.progress()["done"] is False and time.time() - t0 < 60:
        time.sleep(0.05)
    with pytest.raises(RuntimeError, match="learner loop stopped: OSError: board unreachable"):
        loop.poll()
