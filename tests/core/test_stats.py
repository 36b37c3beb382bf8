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


def test_learning_summary_reports_first_and_last_success_and_reward_trend():
    from retro_dist.core.stats import learning_summary, summary_lines

    rows = [{"iteration": i, "rollout/success@trial0": 0.5, "rollout/success@trial1": 0.5 + 0.01 * i,
             "rollout/reflection_reward": 0.1 * i} for i in range(8)]
    rows.insert(3, {"iteration": 99, "learner/steps": 4})  # a row without rollout metrics is skipped
    s = learning_summary(rows, trials=2)
    assert s["first"] == {"step": 0, "success_by_trial": [0.5, 0.5]}
    assert s["last"]["step"] == 7 and s["last"]["success_by_trial"] == pytest.approx([0.5, 0.57])
    rr = s["reflection_reward"]
    assert rr["rows_per_quarter"] == 2
    assert rr["first_quarter"] == pytest.approx(0.05) and rr["last_quarter"] == pytest.approx(0.65)
    assert rr["slope_per_10"] == pytest.approx(1.0)  # 0.1 per row
    text = "\n".join(summary_lines(s))
    assert "first iteration (0): trial 1 0.500  trial 2 0.500" in text
    assert rr["first_row"] == 0.0
    assert "first iteration 0.000, first 2 0.050 → last 2 0.650 (slope +1.000 per 10)" in text


def test_async_learning_summary_pools_a_quarter_of_the_intervals_by_episodes():
    from retro_dist.core.stats import learning_summary, summary_lines

    # 8 intervals; the first holds one lucky episode, which alone must not stand for the start
    eps = [1, 9, 10, 10, 10, 10, 2, 8]
    succ = [1.0, 0.0, 0.2, 0.3, 0.3, 0.3, 0.0, 0.5]
    rows = [{"interval": i, "rollout/episodes": e, "rollout/success@trial0": v}
            for i, (e, v) in enumerate(zip(eps, succ))]
    s = learning_summary(rows, trials=1)
    assert s["first"] == {"step": [0, 1], "episodes": 10, "success_by_trial": [pytest.approx(0.1)]}
    assert s["last"] == {"step": [6, 7], "episodes": 10, "success_by_trial": [pytest.approx(0.4)]}
    assert "first quarter (intervals 0-1, 10 episodes): trial 1 0.100" in "\n".join(summary_lines(s))


def test_learning_summary_of_a_run_without_rollouts_is_none():
    from retro_dist.core.stats import learning_summary

    assert learning_summary([{"interval": 0, "learner/steps": 3}], trials=3) is None
    nan = float("nan")  # an async interval in which no episode finished
    s = learning_summary([{"interval": 0, "rollout/success@trial0": nan},
                          {"interval": 1, "rollout/success@trial0": 0.25}], trials=1)
    assert s["first"]["step"] == [1, 1] and "reflection_reward" not in s


def test_wilson_interval_always_holds_the_observed_rate():
    """At 0 of 100 the formula's lower end rounds to a hair above 0: eval.png's error bars went negative."""
    for n in range(1, 1001):
        for s in (0, 1, n // 2, n - 1, n):
            lo, hi = wilson_interval(s, n)
            assert 0.0 <= lo <= s / n <= hi <= 1.0, (s, n, lo, hi)
