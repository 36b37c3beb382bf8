"""Staleness and scheduling rules of the async runtime (pure)."""
import numpy as np

from retro_dist.core import staleness


def test_version_lag_and_oldest_trainable():
    lag = staleness.version_lag(5, np.array([5, 4, 2, 0]))
    assert lag.tolist() == [0, 1, 3, 5]
    oldest = staleness.oldest_trainable_version(5, 2)
    assert oldest == 3
    # a row is trainable exactly when its lag is within the bound
    versions = np.arange(0, 6)
    assert ((versions >= oldest) == (staleness.version_lag(5, versions) <= 2)).all()


def test_worker_backpressure_rule():
    assert staleness.worker_may_start(worker_version=3, newest_version=5, max_policy_lag=2)
    assert not staleness.worker_may_start(worker_version=2, newest_version=5, max_policy_lag=2)
    assert staleness.worker_may_start(worker_version=5, newest_version=5, max_policy_lag=0)
    assert not staleness.worker_may_start(worker_version=4, newest_version=5, max_policy_lag=0)


def test_publish_every_k_steps():
    assert [s for s in range(0, 10) if staleness.publishes_version(s, 3)] == [3, 6, 9]
    assert [s for s in range(0, 4) if staleness.publishes_version(s, 1)] == [1, 2, 3]


def test_episode_groups_partition_ids_across_workers_and_restarts():
    workers, repeats = 3, 4
    seen = []
    for w in range(workers):
        for n in range(5):
            seen += staleness.group_episode_ids(staleness.episode_group(w, workers, n), repeats)
    assert sorted(seen) == list(range(workers * 5 * repeats))  # disjoint and gap-free
    # a group's episodes all play the same task (task index = episode id // repeats)
    ids = staleness.group_episode_ids(7, repeats)
    assert {e // repeats for e in ids} == {7}


def test_busy_fraction_bounds():
    assert staleness.busy_fraction(0.0, 0.0) == 0.0
    assert staleness.busy_fraction(2.0, 4.0) == 0.5
    assert staleness.busy_fraction(5.0, 4.0) == 1.0
