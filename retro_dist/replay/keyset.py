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

    def _slots(self, h: np.ndarray) -> tuple[np.ndarray, int]:
        """Each hash's home slot, as intp (a uint64 index array is converted on every use)."""
        mask = self.table.size - 1
        return (h & np.uint64(mask)).astype(np.intp), mask

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        """(n,) bool: which hashes are in the set."""
        h = self._nonzero(hashes)
        slot, mask = self._slots(h)
        t = self.table[slot]
        found = t == h
        active = np.flatnonzero(~found & (t != 0))  # home slot holds another hash: probe on
        while active.size:
            slot[active] = (slot[active] + 1) & mask
            t = self.table[slot[active]]
            hit = t == h[active]
            found[active[hit]] = True
            active = active[~hit & (t != 0)]
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
        slot, mask = self._slots(h)
        pending = None  # None: every hash, at its home slot (the first round copies nothing)
        s, hp = slot, h
        while True:
            free = self.table[s] == 0
            self.used += int(np.count_nonzero(free))  # an upper bound (repeats count twice)
            self.table[s[free]] = hp[free]
            left = self.table[s] != hp  # not placed: the slot holds another hash, probe on
            if not left.any():
                return
            pending = np.flatnonzero(left) if pending is None else pending[left]
            slot[pending] = (slot[pending] + 1) & mask
            s, hp = slot[pending], h[pending]

    def _grow(self, need: int) -> None:
        old = self.table[self.table != 0]
        cap = self.table.size
        while need * 4 > cap:  # leave room: a rehash doubles at least, amortised O(1)
            cap *= 2
        self.table, self.used = np.zeros(cap, np.uint64), 0
        self.add(old)


__all__ = ["HashSet"]
