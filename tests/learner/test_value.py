"""`learner.baseline: value`: the value head learns a reward that depends on the prompt, its
prediction is the baseline in A = r − V(x), and it round-trips through a checkpoint
(safetensors + JSON, nothing unpickled)."""
import numpy as np
import pyarrow as pa
import pytest
import torch

from retro_dist.config import ConfigError, LearnerConfig, ReflectorConfig, load_config
from retro_dist.core.records import ReflectionSample, make_key, to_batch
from retro_dist.learner import checkpoints, value
from retro_dist.learner.learner import Learner
from retro_dist.replay.config import ReplayConfig

pytestmark = pytest.mark.component


def _table(tok, n=8, seed=0):
    """Rewards set by a feature of the prompt: the coin is north (r = 1) or south (r = −1)."""
    g = np.random.default_rng(seed)
    out = []
    for i in range(n):
        north = i % 2 == 0
        prompt = tok(f"Game: twx/coin\nTask: find the coin. The coin is {'north' if north else 'south'}.\n"
                     f"Trial 1: In the next trial I will").input_ids
        ids = g.integers(4, 1000, size=int(g.integers(2, 6))).tolist()
        r = 1.0 if north else -1.0
        out.append(ReflectionSample(key=make_key("t", 0, i, 0), run_id="t", worker_id=0, episode_id=i,
                                    task_id=f"twx/coin/train/{i}", env_name="twx/coin", trial=0, prompt_ids=prompt,
                                    reflection_ids=ids, behaviour_logprobs=[-7.0] * len(ids), reflection_text="",
                                    return_before=0.0, return_after=r, reward=r, policy_version=0))
    return pa.Table.from_batches([to_batch(out)])


def _learner(tmp_path, tiny_model, seed=0, **kw):
    # the recipe's policy lr; the head's lr a little higher so 12 steps show it learning
    cfg = LearnerConfig(lr=1e-3, value_lr=3e-3, batch_size=8, micro_batch_size=4, baseline="value", **kw)
    return Learner(cfg, ReflectorConfig(backend="hf", model=tiny_model), str(tmp_path / "replay"),
                   ReplayConfig(), str(tmp_path), seed=seed)


def test_value_head_learns_a_prompt_dependent_reward_and_is_the_baseline(tmp_path, tiny_model):
    lrn = _learner(tmp_path, tiny_model)
    table = _table(lrn.tokenizer)
    adv, base = lrn.advantages(table)
    assert np.all(base == 0) and np.array_equal(adv, table.column("reward").to_numpy())  # V starts at 0
    stats = [lrn.update(table, *lrn.advantages(table)) for _ in range(12)]
    losses = [s["losses/value"] for s in stats]
    assert losses[0] == pytest.approx(1.0)  # (0 − (±1))²
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(b < a + 1e-3 for a, b in zip(losses, losses[1:])), losses
    adv, base = lrn.advantages(table)
    north = table.column("reward").to_numpy() > 0
    assert base[north].min() > 0.2 and base[~north].max() < -0.2  # it tells the prompts apart
    assert np.allclose(adv, table.column("reward").to_numpy() - base)
    assert stats[-1]["learner/advantage_var"] < 0.5 * stats[0]["learner/advantage_var"]
    assert stats[-1]["learner/baseline_mse"] < 0.5


def test_every_baseline_logs_advantage_variance(tmp_path, tiny_model):
    for kind in ("running_mean", "leave_one_out", "none"):
        cfg = LearnerConfig(batch_size=8, micro_batch_size=4, baseline=kind, batch_source="fresh")
        lrn = Learner(cfg, ReflectorConfig(backend="hf", model=tiny_model), str(tmp_path / kind / "replay"),
                      ReplayConfig(), str(tmp_path / kind), seed=0)
        table = _table(lrn.tokenizer)
        adv, _ = lrn.advantages(table)
        m = lrn.update(table, *lrn.advantages(table))
        assert "losses/value" not in m and lrn.value_head is None
        assert {"learner/advantage_var", "learner/baseline_mse", "losses/kl", "losses/entropy"} <= set(m)


def test_value_head_round_trips_through_a_checkpoint(tmp_path, tiny_model, monkeypatch):
    a = _learner(tmp_path, tiny_model, seed=0)
    table = _table(a.tokenizer)
    for _ in range(3):
        a.update(table)
    a.version = 3
    path = a.save_checkpoint()
    assert (path / value.TENSORS).is_file() and not any(p.suffix in (".pt", ".pkl", ".bin") for p in path.iterdir())

    def no_unpickling(*args, **kwargs):
        raise AssertionError("restore must not unpickle")

    monkeypatch.setattr(torch, "load", no_unpickling)
    b = _learner(tmp_path, tiny_model, seed=7)  # another seed: another initial head
    assert b.restore() == 3
    for k, v in a.value_head.state_dict().items():
        assert torch.equal(v, b.value_head.state_dict()[k])
    assert np.array_equal(a.advantages(table)[1], b.advantages(table)[1])
    # the next step (head moments restored with the optimizer) is the same in both
    sa, sb = a.update(table), b.update(table)
    assert sa["losses/value"] == sb["losses/value"]
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in a.value_head.parameters()]),
                       torch.cat([p.detach().reshape(-1) for p in b.value_head.parameters()]))


def test_resuming_a_checkpoint_without_a_value_head_names_the_problem(tmp_path, tiny_model):
    cfg = LearnerConfig(batch_size=8, micro_batch_size=4)
    plain = Learner(cfg, ReflectorConfig(backend="hf", model=tiny_model), str(tmp_path / "replay"), ReplayConfig(),
                    str(tmp_path), seed=0)
    plain.save_checkpoint()
    assert not (checkpoints.newest(tmp_path / "checkpoints") / value.TENSORS).exists()
    with pytest.raises(RuntimeError, match="has no value head, but learner.baseline is 'value'"):
        _learner(tmp_path, tiny_model).restore()


def test_coefficients_must_be_finite_and_non_negative():
    for key in ("kl_coef", "entropy_coef", "value_lr"):
        with pytest.raises(ConfigError, match=f"learner.{key} must be a finite number >= 0"):
            load_config(None, [f"learner.{key}=-0.1"])
    assert load_config(None, ["learner.baseline=value", "learner.kl_coef=0.05"]).learner.baseline == "value"
