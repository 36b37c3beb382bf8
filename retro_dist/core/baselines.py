"""Baselines b(x) for the reflection reward r_k = G_{k+1} − G_k (pure numpy).

Subtracting b(x) leaves the gradient unbiased when b does not depend on the sampled reflection,
and cuts its variance (Williams 1992). Two kinds, chosen by `learner.baseline`:
- per-task running mean: an EMA of past rewards on the same task (global EMA for unseen tasks);
- leave-one-out: for several reflections of the same task in one batch, each one's baseline is
  the mean reward of the others (Kool et al. 2019, "Buy 4 REINFORCE samples"); for replay
  batches the same from the group's stored totals (`leave_one_out_from_sums`).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np


class RunningMeanBaseline:
    def __init__(self, decay: float = 0.9):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"baseline decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.per_task: dict[str, float] = {}
        self.global_mean = 0.0
        self.seen = 0

    def values(self, tasks: Sequence[str]) -> np.ndarray:
        """b(x) for each sample, read *before* this batch's rewards are folded in."""
        return np.array([self.per_task.get(t, self.global_mean) for t in tasks], dtype=np.float64)

    def update(self, tasks: Sequence[str], rewards: Sequence[float]) -> None:
        for t, r in zip(tasks, rewards):
            prev = self.per_task.get(t, self.global_mean if self.seen else r)
            self.per_task[t] = self.decay * prev + (1 - self.decay) * r
            self.global_mean = r if self.seen == 0 else self.decay * self.global_mean + (1 - self.decay) * r
            self.seen += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "per_task": dict(self.per_task),
                "global_mean": self.global_mean, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.per_task = state["decay"], dict(state["per_task"])
        self.global_mean, self.seen = state["global_mean"], state["seen"]


def leave_one_out(groups: Sequence[str], rewards: Sequence[float], fallback: np.ndarray) -> np.ndarray:
    """b_i = mean of r_j over j ≠ i in i's group; `fallback[i]` where i is alone in its group."""
    rewards = np.asarray(rewards, dtype=np.float64)
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    out = np.array(fallback, dtype=np.float64, copy=True)
    for idx in members.values():
        if len(idx) > 1:
            total = rewards[idx].sum()
            out[idx] = (total - rewards[idx]) / (len(idx) - 1)
    return out


def leave_one_out_from_sums(rewards: Sequence[float], sums: Sequence[float], counts: Sequence[float],
                            fallback: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-out from group totals that include the row itself: b_i = (S_i − r_i) / (n_i − 1).

    S_i, n_i: reward sum and row count of i's whole group (every stored member, i among them), so
    the baseline does not depend on which of them a batch happened to draw. Rows with n_i ≤ 1 (alone
    in their group) get `fallback[i]`. Returns (b, has_group: bool mask of the rows that got a group).
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    sums, counts = np.asarray(sums, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    has_group = counts > 1
    out = np.array(fallback, dtype=np.float64, copy=True)
    out[has_group] = (sums[has_group] - rewards[has_group]) / (counts[has_group] - 1)
    return out, has_group
