import pytest

from retro_dist.core.stats import cumulative_success, paired_difference, wilson_interval


def test_cumulative_success_by_trial():
    assert cumulative_success([0, None, 1, 2, None], 3).tolist() == pytest.approx([0.2, 0.4, 0.6])


def test_wilson_hand_values():
    lo, hi = wilson_interval(50, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.4038, 0.5962)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)


def test_paired_difference():
    mean, lo, hi = paired_difference([1, 1, 0, 1], [0, 1, 0, 0])
    assert mean == 0.5 and lo < 0.5 < hi
    assert paired_difference([1, 0], [1, 0])[0] == 0.0
