"""A NaN/inf loss or gradient: the step is skipped (weights and AdamW state untouched, not counted in
learner.steps) and counted in learner/bad_steps; `learner.max_bad_steps` in a row stop the run with a
clear error, in the sync path (Learner.train_iteration) and the async LearnerLoop, and the last
good checkpoint stays intact and loadable."""
import time

import numpy as np
import pyarrow as pa
import pytest
import torch

from retro_dist.config import ConfigError, LearnerConfig, ReflectorConfig, load_config
from retro_dist.core.records import ReflectionSample, make_key, to_batch
from retro_dist.learner import checkpoints
from retro_dist.learner.learner import Learner
from retro_dist.learner.streaming import LearnerLoop
from retro_dist.replay.config import ReplayConfig
from retro_dist.replay.writer import ReplayWriter


def _samples(tok, start=0, reward=None, behaviour=0.0):
    prompt = tok("Game: twx/coin\nTask: find the coin\nReflection: In the next trial I will").input_ids
    out = []
    for i in range(4):
        ids = tok(" go north" if i % 2 else " look around", add_special_tokens=False).input_ids
        r = float(i % 2) if reward is None else reward
        out.append(ReflectionSample(key=make_key("t", 0, start + i, 0), run_id="t", worker_id=0,
                                    episode_id=start + i, task_id="twx/coin/train/1", env_name="twx/coin",
                                    trial=0, prompt_ids=prompt, reflection_ids=ids,
                                    behaviour_logprobs=[behaviour] * len(ids), reflection_text="",
                                    return_before=0.0, return_after=r, reward=r, policy_version=0))
    return out


def _cfg(**kw):
    return LearnerConfig(lr=1e-2, batch_size=4, micro_batch_size=2, max_bad_steps=3, **kw)


def _learner(tmp_path, tiny_model, cfg):
    return Learner(cfg, ReflectorConfig(backend="hf", model=tiny_model), str(tmp_path / "replay"),
                   ReplayConfig(min_size_to_sample=1, on_overflow="drop"), str(tmp_path), seed=0)


def _table(samples):
    return pa.Table.from_batches([to_batch(samples)])


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _adam_state(lrn):
    return [v.clone() for st in lrn.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]


def test_max_bad_steps_must_be_at_least_one():
    with pytest.raises(ConfigError, match="learner.max_bad_steps must be >= 1"):
        load_config(None, ["learner.max_bad_steps=0"])


@pytest.mark.component
@pytest.mark.parametrize("fault", ["nan_behaviour", "inf_advantage"])
def test_bad_steps_are_skipped_counted_and_stop_the_run(tmp_path, tiny_model, fault):
    lrn = _learner(tmp_path, tiny_model, _cfg(updates_per_iteration=1))
    good = _table(_samples(lrn.tokenizer))
    if fault == "nan_behaviour":
        bad, adv = _table(_samples(lrn.tokenizer, behaviour=float("nan"))), None
    else:
        bad, adv = good, np.array([np.inf, 0.0, 0.0, 0.0])
    base = np.zeros(4)
    lrn.update(good)
    ckpt = lrn.save_checkpoint()
    saved = _files(ckpt)
    weights, adam = lrn.policy.trainable_vector(), _adam_state(lrn)

    m = lrn.update(bad, adv, base)
    assert m["learner/bad_step"] == 1 and not np.isfinite(m["losses/bad_loss"] + m["losses/bad_grad_norm"])
    assert (lrn.steps, lrn.bad_steps, lrn.bad_in_row) == (1, 1, 1)  # not a learner step
    assert torch.equal(lrn.policy.trainable_vector(), weights)  # no optimizer step ...
    assert all(torch.equal(a, b) for a, b in zip(_adam_state(lrn), adam))  # ... and AdamW's moments untouched
    assert all(p.grad is None for p in lrn.policy.params)

    assert "losses/pg" in lrn.update(good) and (lrn.steps, lrn.bad_in_row) == (2, 0)  # a good step resets the run
    weights = lrn.policy.trainable_vector()
    lrn.update(bad, adv, base)
    lrn.update(bad, adv, base)
    with pytest.raises(RuntimeError, match=r"3 gradient steps in a row .*learner.max_bad_steps=3"):
        lrn.update(bad, adv, base)
    assert (lrn.steps, lrn.bad_steps) == (2, 4)
    assert torch.isfinite(weights).all() and torch.equal(lrn.policy.trainable_vector(), weights)
    assert _files(ckpt) == saved  # the last good checkpoint is untouched


@pytest.mark.component
def test_sync_iteration_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model):
    lrn = _learner(tmp_path, tiny_model, _cfg(updates_per_iteration=2))
    with ReplayWriter(str(tmp_path / "replay"), "w0", ReplayConfig()) as w:
        w.append("reflections", to_batch(_samples(lrn.tokenizer)))
    m = lrn.train_iteration()
    assert m["learner/bad_steps"] == 0 and m["learner/version"] == 1
    good_ckpt = checkpoints.newest(tmp_path / "checkpoints")
    saved, weights = _files(good_ckpt), lrn.policy.trainable_vector()
    # every row now has an infinite reward: its baseline turns inf too, so every later advantage is NaN
    with ReplayWriter(str(tmp_path / "replay"), "w1", ReplayConfig()) as w:
        w.append("reflections", to_batch(_samples(lrn.tokenizer, start=10, reward=float("inf"))))
    with pytest.raises(RuntimeError, match="learner.max_bad_steps=3"):
        for _ in range(6):
            lrn.train_iteration()
    assert lrn.bad_steps >= 3
    newest = checkpoints.newest(tmp_path / "checkpoints")
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))  # no half-written checkpoint left behind
    again = _learner(tmp_path, tiny_model, lrn.cfg)
    assert again.restore() == int(newest.name)
    restored = again.policy.trainable_vector()
    assert torch.isfinite(restored).all() and torch.equal(restored, lrn.policy.trainable_vector())
    if newest == good_ckpt:
        assert _files(good_ckpt) == saved and torch.equal(restored, weights)


@pytest.mark.component
def test_async_loop_skips_bad_steps_without_publishing_then_stops(tmp_path, tiny_model):
    cfg = _cfg()
    published = []
    loop = LearnerLoop(lambda: _learner(tmp_path, tiny_model, cfg), lambda a: published.append(a.version),
                       max_steps=50, updates_per_version=1, max_policy_lag=2)
    lrn = loop.learner
    with ReplayWriter(str(tmp_path / "replay"), "w0", ReplayConfig()) as w:
        w.append("reflections", to_batch(_samples(lrn.tokenizer, behaviour=float("nan"))))
    loop.start()
    t0 = time.time()
    while loop.progress()["done"] is False and time.time() - t0 < 60:
        time.sleep(0.05)
    with pytest.raises(RuntimeError, match=r"learner loop stopped: RuntimeError: learner: 3 gradient steps in a row.*"
                                           r"learner.max_bad_steps=3"):
        loop.poll()
    # nothing trained, so nothing beyond the starting version was published or checkpointed
    assert (lrn.steps, lrn.bad_steps, lrn.version, published) == (0, 3, 0, [0])
    assert checkpoints.newest(tmp_path / "checkpoints") is None
