"""Episode → task numbering: repeats side by side; no two workers or iterations share an episode."""
from retro_dist.rollout.worker import repeated


def take(start, count):
    return list(range(start, start + count))


def test_repeats_run_side_by_side():
    assert repeated(take, 8, 4, 2) == [4, 4, 5, 5]
    assert repeated(take, 0, 6, 3) == [0, 0, 0, 1, 1, 1]
    assert repeated(take, 5, 3, 1) == [5, 6, 7]


def test_workers_and_iterations_get_disjoint_tasks():
    workers, per_iter, parallel, g = 3, 8, 4, 2
    seen = []
    for it in range(4):
        for w in range(workers):
            base = (it * workers + w) * per_iter  # as RolloutWorker.rollout numbers its episodes
            tasks = []
            for lo in range(0, per_iter, parallel):
                tasks += repeated(take, base + lo, parallel, g)
            assert tasks == sorted(tasks) and all(tasks.count(t) == g for t in set(tasks))
            seen.append(set(tasks))
    assert sum(len(s) for s in seen) == len(set().union(*seen))
