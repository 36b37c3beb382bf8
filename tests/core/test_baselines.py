import numpy as np
import pytest

from retro_dist.core.baselines import RunningMeanBaseline, leave_one_out


def test_running_mean_is_per_task_ema():
    b = RunningMeanBaseline(decay=0.5)
    assert b.values(["a"]).tolist() == [0.0]
    b.update(["a", "a", "b"], [1.0, 0.0, 1.0])
    # a: first 1.0, then 0.5*1 + 0.5*0 = 0.5; b: seeded from the global mean 0.5, then 0.75
    assert b.per_task["a"] == pytest.approx(0.5)
    assert b.per_task["b"] == pytest.approx(0.75)
    assert b.values(["a", "unseen"]).tolist() == pytest.approx([0.5, b.global_mean])


def test_running_mean_state_round_trips():
    b = RunningMeanBaseline(0.9)
    b.update(["x", "y"], [1.0, -1.0])
    c = RunningMeanBaseline(0.1)
    c.load_state_dict(b.state_dict())
    assert c.values(["x", "y", "z"]).tolist() == b.values(["x", "y", "z"]).tolist()


def test_leave_one_out_hand_case():
    out = leave_one_out(["t", "t", "t", "u"], [1.0, 0.0, 0.5, 1.0], fallback=np.array([9, 9, 9, 7.0]))
    assert out.tolist() == pytest.approx([0.25, 0.75, 0.5, 7.0])


def test_leave_one_out_advantages_sum_to_zero_scaled():
    r = np.array([0.0, 1.0, 1.0, 0.0, 1.0])
    adv = r - leave_one_out(["g"] * 5, r, fallback=np.zeros(5))
    # Σ (r_i - mean_{-i}) = n/(n-1) Σ (r_i - mean) = 0
    assert adv.sum() == pytest.approx(0.0)
