import numpy as np
import pytest

from retro_dist.core.baselines import RunningMeanBaseline, leave_one_out, leave_one_out_from_sums


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


def test_leave_one_out_from_sums_hand_case():
    # group totals include the row: t has rewards 1, 0, 0.5 stored (S=1.5, n=3), u only itself
    rewards = [1.0, 0.0, 1.0]
    b, grouped = leave_one_out_from_sums(rewards, sums=[1.5, 1.5, 1.0], counts=[3, 3, 1],
                                         fallback=np.array([9.0, 9.0, 7.0]))
    assert b.tolist() == pytest.approx([0.25, 0.75, 7.0])
    assert grouped.tolist() == [True, True, False]


def test_leave_one_out_from_sums_equals_batch_form_on_whole_groups():
    # when the batch is the whole store, the sums form and the batch form must agree
    rng = np.random.default_rng(0)
    groups = rng.choice(["a", "b", "c", "d"], size=40).tolist() + ["lonely"]
    rewards = rng.normal(size=len(groups))
    sums = {g: rewards[[i for i, h in enumerate(groups) if h == g]].sum() for g in set(groups)}
    counts = {g: groups.count(g) for g in set(groups)}
    fallback = rng.normal(size=len(groups))
    b, grouped = leave_one_out_from_sums(rewards, [sums[g] for g in groups], [counts[g] for g in groups], fallback)
    assert b == pytest.approx(leave_one_out(groups, rewards, fallback))
    assert grouped.sum() == len(groups) - 1 and b[-1] == fallback[-1]


def test_leave_one_out_from_sums_ignores_the_row_itself():
    # a row's baseline cannot depend on its own reward: change it (and the total with it), b stays
    b1, _ = leave_one_out_from_sums([1.0], [1.0 + 2.0], [3], np.zeros(1))
    b2, _ = leave_one_out_from_sums([-5.0], [-5.0 + 2.0], [3], np.zeros(1))
    assert b1 == pytest.approx(b2) and b1[0] == pytest.approx(1.0)
