"""HashSet: a set of 64-bit key hashes in a numpy open-addressing table (linear probing).

The writer checks every appended batch against the keys it has stored. Python sets of key
strings cost more than writing the batch (building 8192 str objects, hashing them, set
updates); this costs a few vectorised probes per batch: ~16 B per key at most half full.
"""
from __future__ import annotations

import numpy as np

_ONE = np.uint64(1)


class HashSet:
    def __init__(self, capacity: int = 1 << 12) -> None:
        self.table = np.zeros(max(capacity, 16), np.uint64)  # 0 marks an empty slot
        self.used = 0  # upper bound on filled slots, for growth

    @staticmethod
    def _nonzero(h: np.ndarray) -> np.ndarray:
        h = np.asarray(h, np.uint64)
        return np.where(h == 0, _ONE, h)  # 0 is the empty marker: fold it onto 1

    def __len__(self) -> int:
        return int(np.count_nonzero(self.table))

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        """(n,) bool: which hashes are in the set."""
        h = self._nonzero(hashes)
        mask = np.uint64(self.table.size - 1)
        slot = h & mask
        found = np.zeros(h.size, bool)
        active = np.arange(h.size)
        while active.size:
            t = self.table[slot[active]]
            hit = t == h[active]
            found[active[hit]] = True
            active = active[~hit & (t != 0)]  # occupied by another hash: probe on
            slot[active] = (slot[active] + _ONE) & mask
        return found

    def add(self, hashes: np.ndarray) -> None:
        """Insert hashes (already-present ones and repeats are no-ops).

        Scatter-then-check: every probe round writes each pending hash into its slot if the
        slot is free (numpy keeps one of several writes to a slot) and reads back which ones
        landed, so there is no per-key Python and no sort.
        """
        h = self._nonzero(hashes)
        if (self.used + h.size) * 2 > self.table.size:
            self._grow(self.used + h.size)
        mask = np.uint64(self.table.size - 1)
        slot = h & mask
        pending = np.arange(h.size)
        while pending.size:
            s, hp = slot[pending], h[pending]
            t = self.table[s]
            free = t == 0
            self.used += int(free.sum())  # an upper bound (repeats count twice): sizing only
            self.table[s[free]] = hp[free]
            t = self.table[s]
            left = t != hp  # not placed: the slot holds another hash, probe on
            pending = pending[left]
            slot[pending] = (slot[pending] + _ONE) & mask

    def _grow(self, need: int) -> None:
        old = self.table[self.table != 0]
        cap = self.table.size
        while need * 4 > cap:  # leave room: a rehash doubles at least, amortised O(1)
            cap *= 2
        self.table, self.used = np.zeros(cap, np.uint64), 0
        self.add(old)


__all__ = ["HashSet"]
