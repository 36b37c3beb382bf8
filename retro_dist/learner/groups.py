"""GroupIndex: reward sum and count of every leave-one-out group held in the replay store.

A replay batch of B rows drawn from thousands almost never holds two members of a group (the
G reflections written after the same trial of the same task), so a leave-one-out baseline over
the batch alone falls back to the running mean nearly always. This index keeps, for every group,
the reward sum and row count of *all* its stored members, so each sampled row's baseline is the
mean reward of every other stored member (core.baselines.leave_one_out_from_sums).

A group is (task_id, trial) — the fresh path's grouping — restricted to rows whose policy_version
is within `window` versions of the row's own. Why a window: the fresh path groups one version's
rows only, and the baseline should estimate E[r | x] under about the policy that sampled y; the
same task recurs later in a run (task lists wrap) under a different reflector whose rewards say
little about this one. Why not the exact version: in async mode the G episodes of a group run
side by side but each samples its reflection when its own trial fails, so a weight sync can land
between them and split one group over two adjacent versions. `window=None` pools every version.

Storage, all numpy: cells keyed by a 64-bit hash of (task_id#trial, policy_version) in sorted
uint64 keys with float64 sums and int64 counts, plus one cell per (task_id#trial, any version)
for window=None. `sync(store)` folds in only segments it has not seen (their four scalar
columns), and subtracts segments the store has evicted (from their kept per-segment totals), so
the cost per learner step is proportional to what was inserted, never to the store's size.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from retro_dist.replay.gather import hash_keys

COLUMNS = ["task_id", "trial", "policy_version", "reward"]
_ANY_VERSION = -1


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 (wrapping arithmetic)."""
    x = np.asarray(x, np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def group_hashes(table: pa.Table | pa.RecordBatch) -> np.ndarray:
    """(n,) uint64 hash of each row's task_id#trial."""
    key = pc.binary_join_element_wise(table.column("task_id"), pc.cast(table.column("trial"), pa.string()), "#")
    return hash_keys(key)


def cell_keys(groups: np.ndarray, versions: np.ndarray) -> np.ndarray:
    """(n,) uint64 key of each (group hash, policy_version) cell; version -1 = any version."""
    with np.errstate(over="ignore"):
        v = np.asarray(versions, np.int64).astype(np.uint64) + np.uint64(1)  # -1 -> 0: wraps by design
        return _mix(np.asarray(groups, np.uint64) ^ _mix(v + np.uint64(0x9E3779B97F4A7C15)))


class _Totals:
    """Sorted uint64 cell keys -> reward sum and row count (numpy, grown by sorted insertion)."""

    def __init__(self) -> None:
        self.keys = np.zeros(0, np.uint64)
        self.sums = np.zeros(0, np.float64)
        self.counts = np.zeros(0, np.int64)

    def add(self, keys: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> None:
        """Add (or with negative sums/counts, subtract) totals of distinct `keys`."""
        pos = np.searchsorted(self.keys, keys)
        found = pos < self.keys.size
        found[found] = self.keys[pos[found]] == keys[found]
        self.sums[pos[found]] += sums[found]
        self.counts[pos[found]] += counts[found]
        new = ~found
        if new.any():
            order = np.argsort(keys[new])
            at = pos[new][order]
            self.keys = np.insert(self.keys, at, keys[new][order])
            self.sums = np.insert(self.sums, at, sums[new][order])
            self.counts = np.insert(self.counts, at, counts[new][order])

    def get(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(sums, counts) of `keys`; 0, 0 for cells never seen."""
        if not self.keys.size:
            return np.zeros(keys.size), np.zeros(keys.size, np.int64)
        pos = np.minimum(np.searchsorted(self.keys, keys), self.keys.size - 1)
        hit = self.keys[pos] == keys
        return np.where(hit, self.sums[pos], 0.0), np.where(hit, self.counts[pos], 0)


def _segment_totals(batches: list[pa.RecordBatch]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One segment's contribution: distinct cell keys (per version and any-version), sums, counts."""
    batches = [b for b in batches if b.num_rows]
    if not batches:
        return np.zeros(0, np.uint64), np.zeros(0), np.zeros(0, np.int64)
    table = pa.Table.from_batches([b.select(COLUMNS) for b in batches])
    groups = group_hashes(table)
    versions = table.column("policy_version").to_numpy()
    rewards = table.column("reward").to_numpy().astype(np.float64)
    keys = np.concatenate([cell_keys(groups, versions), cell_keys(groups, np.full(groups.size, _ANY_VERSION))])
    uniq, inv = np.unique(keys, return_inverse=True)
    return (uniq, np.bincount(inv, np.concatenate([rewards, rewards]), uniq.size),
            np.bincount(inv, minlength=uniq.size).astype(np.int64))


class GroupIndex:
    """Leave-one-out group totals of a store's `reflections` table, kept in step by `sync`."""

    def __init__(self, window: Optional[int] = None, table: str = "reflections") -> None:
        if window is not None and window < 0:
            raise ValueError(f"group window must be >= 0 or None, got {window}")
        self.window = window
        self.table = table
        self.totals = _Totals()
        self._segments: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # path -> its totals
        self._seen = None  # the store's held_version at the last walk

    def sync(self, store) -> int:
        """Fold in the store's segments not seen yet, drop evicted ones; returns segments folded in.
        Called every learner step: while the store holds the same segments it walks none of them."""
        version = store.held_version(self.table)
        if version == self._seen:
            return 0
        self._seen = version
        held = store.held_segments(self.table)
        paths = {path for path, _ in held}
        for gone in [p for p in self._segments if p not in paths]:
            keys, sums, counts = self._segments.pop(gone)
            self.totals.add(keys, -sums, -counts)
        added = 0
        for path, batches in held:
            if path not in self._segments:
                self._segments[path] = _segment_totals(batches)
                self.totals.add(*self._segments[path])
                added += 1
        return added

    def lookup(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """(sums, counts) (B,) of each row's whole stored group, the row itself included."""
        groups = group_hashes(table)
        versions = table.column("policy_version").to_numpy().astype(np.int64)
        if self.window is None:
            return self.totals.get(cell_keys(groups, np.full(groups.size, _ANY_VERSION)))
        sums, counts = np.zeros(groups.size), np.zeros(groups.size, np.int64)
        for d in range(-self.window, self.window + 1):
            shifted = versions + d
            s, c = self.totals.get(cell_keys(groups, shifted))
            ok = shifted >= 0  # no version -1 cell: that key is the any-version total
            sums += np.where(ok, s, 0.0)
            counts += np.where(ok, c, 0)
        return sums, counts


__all__ = ["GroupIndex", "group_hashes", "cell_keys", "COLUMNS"]
