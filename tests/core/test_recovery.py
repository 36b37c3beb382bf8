"""Which episodes a restarted streaming worker reruns (core/recovery.py)."""
from retro_dist.core import staleness
from retro_dist.core.recovery import RerunPlan, rerun_plan, rerun_window


def _episodes(worker, workers, repeats, ns):
    return [e for n in ns for e in staleness.group_episode_ids(staleness.episode_group(worker, workers, n), repeats)]


def test_fresh_worker_starts_at_zero():
    assert rerun_plan([], 0, 2, 2, window=3) == RerunPlan(0, [])


def test_missing_episodes_of_recent_groups_are_rerun_and_numbering_continues():
    # worker 1 of 2, 2 episodes per group: groups n=0..5 committed except n=3 (in flight) and half of n=4
    done = _episodes(1, 2, 2, [0, 1, 2, 5])
    half = _episodes(1, 2, 2, [4])
    plan = rerun_plan(done + half[:1], 1, 2, 2, window=rerun_window(4, 2))
    assert plan.next_n == 6
    assert plan.redo == [(staleness.episode_group(1, 2, 3), _episodes(1, 2, 2, [3])),
                         (staleness.episode_group(1, 2, 4), half[1:])]
    assert plan.episodes == 3


def test_other_workers_rows_and_old_groups_outside_the_window_are_ignored():
    mine = _episodes(0, 3, 1, [20, 21, 22])  # groups n < 20 evicted by retention: not rerun
    other = _episodes(1, 3, 1, range(40))
    plan = rerun_plan(mine + other, 0, 3, 1, window=2)
    assert plan.next_n == 23 and plan.redo == []


def test_window_covers_the_in_flight_span():
    assert rerun_window(concurrent_episodes=8, repeats=2) == 5
    assert rerun_window(concurrent_episodes=1, repeats=4) == 2
