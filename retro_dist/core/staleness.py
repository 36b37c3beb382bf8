"""Staleness and scheduling rules of the asynchronous actor–learner. Pure: numpy only.

Versions count published policies (the learner's `version`). A row written under version v and
trained on at learner version V has lag V − v. The learner never trains on a row with lag above
`max_policy_lag` (IMPALA-style off-policy data, bounded as in AReaL's `max_head_offpolicyness`);
the rest are corrected by importance ratios against their stored behaviour log-probs.
"""
from __future__ import annotations

import numpy as np


def version_lag(learner_version: int, row_versions: np.ndarray) -> np.ndarray:
    """(N,) int64 lag of each row at this learner version (0 for rows of the current policy)."""
    return learner_version - np.asarray(row_versions, dtype=np.int64)


def oldest_trainable_version(learner_version: int, max_policy_lag: int) -> int:
    """Rows with policy_version below this are never trained on."""
    return learner_version - max_policy_lag


def worker_may_start(worker_version: int, newest_version: int, max_policy_lag: int) -> bool:
    """Backpressure: a worker more than `max_policy_lag` versions behind the newest published
    policy starts no new episode (whatever it produced would be dropped) until it catches up."""
    return newest_version - worker_version <= max_policy_lag


def publishes_version(steps: int, updates_per_version: int) -> bool:
    """After gradient step number `steps` (1-based), does the learner publish a new version?"""
    return steps > 0 and steps % updates_per_version == 0


def episode_group(worker_id: int, num_workers: int, n: int) -> int:
    """The n-th task group a streaming worker takes: groups interleave across workers, so no two
    workers ever run the same episode and ids stay stable across restarts of the same run."""
    return n * num_workers + worker_id


def group_task(group: int, num_workers: int, num_games: int) -> int:
    """Index into the task mix (`TaskMix.take`: games round-robin, then in order) of the task a
    streaming worker's group plays.

    Every worker cycles through the games: its n-th group plays game (n + worker) % num_games, at
    that game's next position among those kept for this worker (position ≡ worker mod num_workers),
    so every task of every game is played once across the workers. Reading the group number as the
    mix index would not: with 2 workers and 2 games, worker 0 would only ever play game 0 and worker
    1 game 1, and the game with the faster episodes would fill the store. One game: the group itself.
    """
    n, worker = divmod(group, num_workers)
    game = (n + worker) % num_games
    turn = (n - (game - worker) % num_games) // num_games  # earlier groups of this game, this worker
    return (turn * num_workers + worker) * num_games + game


def group_episode_ids(group: int, repeats: int) -> list[int]:
    """Episode ids of one group: `repeats` episodes of the same task, side by side, for the
    leave-one-out baseline — the same numbering the synchronous loop uses (its task index is
    id // repeats; a streaming group plays task `group_task(group, ...)`)."""
    return list(range(group * repeats, (group + 1) * repeats))


def busy_fraction(busy_seconds: float, wall_seconds: float) -> float:
    """Share of wall-clock time a loop spent working (0 when no time has passed)."""
    return float(min(1.0, busy_seconds / wall_seconds)) if wall_seconds > 0 else 0.0
