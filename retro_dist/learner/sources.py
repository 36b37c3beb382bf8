"""Where an iteration's batches come from (`learner.batch_source`, `learner.sft_iterations`).

Each source yields (table, advantages, baselines, on_policy) per gradient step, lazily: the
replay source samples its next batch only after the previous step, so the curriculum and
staleness filter see the current step count and version.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from retro_dist.core.sampling import importance_weights

Batch = tuple  # (pyarrow.Table, adv (B,), base (B,), on_policy: bool)


def replay_batches(learner) -> Iterator[Batch]:
    """Sampled from the store (sampler, staleness filter, rate limiter), IS-corrected; a leave-one-out
    baseline uses every stored member of a row's group, not just those the batch drew."""
    store, cfg = learner.store, learner.cfg
    for _ in range(cfg.updates_per_iteration):
        batch = store.sample("reflections", cfg.batch_size, rng=learner.rng, step=learner.steps,
                             current_version=learner.version)
        if batch is None or batch.table.num_rows == 0:
            return
        adv, base = replay_advantages(learner, batch)
        yield batch.table, adv, base, False


def replay_advantages(learner, batch) -> tuple:
    """(A, b) of a batch sampled from the store: a leave-one-out baseline over every stored member
    of each row's group, and A scaled by importance weights that undo a non-uniform sampler's bias
    (Schaul et al. 2016). Shared by the sync replay source and the async loop."""
    adv, base = learner.advantages(batch.table, whole_groups=True)
    store = learner.store
    if store.cfg.sampler != "uniform":
        adv = adv * importance_weights(batch.probs, store.num_rows("reflections"))
    return adv, base


def fresh_batches(learner) -> Iterator[Batch]:
    """On-policy: this version's samples, advantages computed over whole groups first."""
    table = learner.store.read("reflections", min_policy_version=learner.version)
    if table.num_rows == 0:
        return
    adv, base = learner.advantages(table)
    for _ in range(learner.cfg.updates_per_iteration):
        idx = learner.rng.choice(table.num_rows, size=min(learner.cfg.batch_size, table.num_rows), replace=False)
        yield table.take(idx), adv[idx], base[idx], False


def sft_batches(learner) -> Iterator[Batch]:
    """The paper's SFT warm start: likelihood of positively rewarded reflections (A = 1, on-policy)."""
    table = learner.store.read("reflections")
    reward = np.asarray(table.column("reward").to_numpy(zero_copy_only=False))
    table = table.filter(reward > 0)
    for _ in range(learner.cfg.updates_per_iteration if table.num_rows else 0):
        idx = learner.rng.choice(table.num_rows, size=min(learner.cfg.batch_size, table.num_rows), replace=False)
        yield table.take(idx), np.ones(len(idx)), np.zeros(len(idx)), True
