"""Drawing rows from a large cumulative weight array without scattered binary-search probes.

`np.searchsorted` over the cumulative weights of 10M rows (80 MB) probes ~23 scattered cache
lines per draw, most of them TLB misses: ~330 us for a batch of 256 on this project's machine,
half the cost of gathering the batch's rows. `Cumulative` uses a guide table instead (Chen and
Asau's indexed search for inverse-transform sampling): entry j is the first row whose cumulative
weight exceeds j/K of the total, for K = M/BLOCK. A target's guide entry names a row at or before
its answer, and the answer is almost always within the next BLOCK rows: one read of the guide
and one contiguous read of BLOCK + 1 cumulative weights per draw, which also hold the two weights
whose difference is the row's probability. Draws whose answer lies further on (long runs of
near-zero weights) fall back to a binary search.
"""
from __future__ import annotations

import numpy as np

BLOCK = 64


class Cumulative:
    """Cumulative weights of M rows, and draws from the distribution they define."""

    def __init__(self, weights: np.ndarray) -> None:
        m = weights.size
        # [0, c_0 .. c_{M-1}, +inf x BLOCK]: the window of BLOCK + 1 weights from any start
        # never leaves the array, and its first entry is the weight before the start
        self._padded = np.empty(m + 1 + BLOCK, np.float64)
        self._padded[0] = 0.0
        np.cumsum(weights, out=self._padded[1:m + 1])
        self._padded[m + 1:] = np.inf
        self.values = self._padded[1:m + 1]  # (M,) the cumulative weights themselves
        self.total = float(self.values[-1]) if m else 0.0
        self._k = max(1, m // BLOCK)
        self._guide = np.searchsorted(self.values, np.arange(self._k) * (self.total / self._k),
                                      side="right")
        self._windows = np.lib.stride_tricks.as_strided(
            self._padded, (m + 1, BLOCK + 1), (8, 8), writeable=False)

    def search(self, targets: np.ndarray) -> np.ndarray:
        """(n,) int64: np.searchsorted(values, targets, side="right"), for targets < total."""
        return self._locate(targets)[0]

    def _locate(self, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, each row's weight) for targets in [0, total)."""
        j = np.minimum((targets * (self._k / self.total)).astype(np.int64), self._k - 1)
        start = self._guide[j]
        w = self._windows[start]  # (n, BLOCK + 1): weight before `start`, then BLOCK weights
        k = (w[:, 1:] <= targets[:, None]).sum(axis=1)
        at = np.arange(targets.size)
        rows = start + k
        weight = w[at, np.minimum(k + 1, BLOCK)] - w[at, k]
        # rounding can put a target just before its guide entry's row; a long run of
        # near-zero weights can put the answer past the window: those search the whole array
        off = (w[:, 0] > targets) | (k == BLOCK)
        if off.any():
            r = np.searchsorted(self.values, targets[off], side="right")
            rows[off] = r
            weight[off] = self._padded[r + 1] - self._padded[r]
        return rows, weight

    def draw(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows (n,) int64, each drawn row's probability (n,)) by inverse-CDF sampling."""
        m = self.values.size
        rows, weight = self._locate(rng.random(n) * self.total)
        past = rows >= m  # a target rounded up to the total: the last row
        if past.any():
            rows[past] = m - 1
            weight[past] = self._padded[m] - self._padded[m - 1]
        return rows, weight / self.total


__all__ = ["Cumulative", "BLOCK"]
