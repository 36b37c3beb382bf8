"""Staleness and scheduling rules of the async runtime (pure)."""
import numpy as np
import pytest

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


@pytest.mark.parametrize("workers,games", [(1, 1), (2, 1), (1, 2), (2, 2), (3, 2), (2, 3), (4, 2),
                                           (2, 4), (3, 3)])
def test_every_worker_cycles_through_the_games_and_every_task_is_played_once(workers, games):
    rounds = 6 * games
    index = {(w, n): staleness.group_task(staleness.episode_group(w, workers, n), workers, games)
             for w in range(workers) for n in range(rounds)}
    assert len(set(index.values())) == len(index)  # no task twice
    for w in range(workers):
        played = [index[w, n] % games for n in range(rounds)]  # TaskMix: game = index % games
        for lo in range(0, rounds, games):
            assert sorted(played[lo: lo + games]) == list(range(games))  # each game once per cycle
    for g in range(games):  # each game's tasks are played from its first, without gaps
        positions = sorted(i // games for i in index.values() if i % games == g)
        assert positions == list(range(len(positions)))
        assert len(positions) == workers * rounds // games


def test_two_workers_on_two_games_do_not_each_keep_one_game():
    # the bug this mapping fixes: group n * 2 + w read as the mix index gave worker w game w only
    games_of = {w: {staleness.group_task(staleness.episode_group(w, 2, n), 2, 2) % 2
                    for n in range(4)} for w in range(2)}
    assert games_of == {0: {0, 1}, 1: {0, 1}}


def test_one_game_keeps_the_group_as_the_task_index():
    assert [staleness.group_task(g, 3, 1) for g in range(12)] == list(range(12))


def test_busy_fraction_bounds():
    assert staleness.busy_fraction(0.0, 0.0) == 0.0
    assert staleness.busy_fraction(2.0, 4.0) == 0.5
    assert staleness.busy_fraction(5.0, 4.0) == 1.0
