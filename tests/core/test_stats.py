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


def test_training_metrics_by_game_merge_across_workers():
    from retro_dist.core.stats import count_by_game, merge_by_game

    a = count_by_game({}, ["twx/coin", "twx/sorting"], [0, None], 2, rewards=[("twx/coin", 1.0)])
    b = count_by_game({}, ["twx/coin"], [1], 2, rewards=[("twx/coin", 0.0), ("twx/sorting", -1.0)])
    m = merge_by_game([a, b], 2)
    assert m["rollout/game/twx/coin/success@trial0"] == 0.5 and m["rollout/game/twx/coin/success@trial1"] == 1.0
    assert m["rollout/game/twx/sorting/success@trial1"] == 0.0
    assert m["rollout/game/twx/coin/reflection_reward"] == 0.5
    assert m["rollout/game/twx/sorting/reflection_reward"] == -1.0
    assert merge_by_game([count_by_game({}, ["twx/coin"], [0], 2)], 2) == {}  # one game: nothing extra
