"""Which episodes a restarted streaming worker reruns: pure rules, no Ray.

A streaming worker takes its task groups in order (n = 0, 1, 2, …; `staleness.episode_group`) and
runs up to `concurrent_episodes` episodes at once, so when it dies the groups it left unfinished
lie just below the newest group it committed, within the span its in-flight episodes cover; every
group after that one is untouched (whatever finished after its last seal was never committed). A
replacement (or a resumed run) therefore reruns the missing episodes of the last few groups under
their original keys, then continues after the newest one. The store drops keys it already holds,
so a rerun can never store an episode twice.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from retro_dist.core import staleness


@dataclass
class RerunPlan:
    """Where a worker picks up: missing episodes of earlier groups first, then group index `next_n`."""

    next_n: int = 0
    redo: list[tuple[int, list[int]]] = field(default_factory=list)  # (group, missing episode ids)

    @property
    def episodes(self) -> int:
        return sum(len(ids) for _, ids in self.redo)


def rerun_window(concurrent_episodes: int, repeats: int) -> int:
    """Groups below the newest committed one that can still hold unfinished episodes: the groups
    the in-flight episodes span, plus one for a group split across the span's edge."""
    return -(-concurrent_episodes // repeats) + 1


def rerun_plan(committed: Iterable[int], worker_id: int, num_workers: int, repeats: int,
               window: int) -> RerunPlan:
    """The plan for worker `worker_id`, given the episode ids of its committed rows.

    Older groups than `window` below the newest are not looked at: retention may have evicted
    them, and nothing of a worker's last life can be unfinished there.
    """
    done = set(committed)
    # group index n of every committed episode of this worker: group = n * num_workers + worker_id
    ns = {(e // repeats - worker_id) // num_workers for e in done
          if (e // repeats) % num_workers == worker_id}
    if not ns:
        return RerunPlan()
    newest = max(ns)
    redo = []
    for n in range(max(0, newest - window), newest + 1):
        group = staleness.episode_group(worker_id, num_workers, n)
        missing = [e for e in staleness.group_episode_ids(group, repeats) if e not in done]
        if missing:
            redo.append((group, missing))
    return RerunPlan(newest + 1, redo)
