"""Reverb-style sample-to-insert rate limiter (pure bookkeeping, no I/O, no waiting).

Follows Reverb's `RateLimiter` + `SampleToInsertRatio` (reverb/cc/rate_limiter.cc,
reverb/rate_limiters.py): with `diff = inserts · samples_per_insert − samples`,
sampling needs `size >= min_size_to_sample` and `diff − n >= min_diff`, inserting needs
`diff + n · samples_per_insert <= max_diff` once past the minimum size, where
`min_diff/max_diff = samples_per_insert · min_size_to_sample ∓ error_buffer`.
Counts are in rows. With `samples_per_insert=None` only the minimum size is enforced (Reverb's
`MinSize` limiter). Waiting, timeouts and drop counting live in the store, which owns the clock.
"""
from __future__ import annotations

import math
from typing import Optional


class RateLimitedError(RuntimeError):
    """sample() waited `block_timeout_s` and the rate limiter still refused."""


class RateLimiter:
    def __init__(self, min_size_to_sample: int, samples_per_insert: Optional[float] = None,
                 error_buffer: float = 0.0) -> None:
        if min_size_to_sample < 1:
            raise ValueError("min_size_to_sample must be >= 1")
        if samples_per_insert is not None and samples_per_insert <= 0:
            raise ValueError("samples_per_insert must be > 0 or None")
        if error_buffer < 0:
            raise ValueError("error_buffer must be >= 0")
        self.min_size_to_sample = min_size_to_sample
        self.samples_per_insert = samples_per_insert
        self.error_buffer = float(error_buffer)
        self.inserts = 0
        self.samples = 0
        self.deletes = 0
        if samples_per_insert is None:
            self.min_diff, self.max_diff = -math.inf, math.inf
        else:
            offset = samples_per_insert * min_size_to_sample
            self.min_diff = offset - self.error_buffer
            self.max_diff = offset + self.error_buffer

    @property
    def size(self) -> int:
        """Rows currently held (inserted minus evicted)."""
        return self.inserts - self.deletes

    def _diff(self, extra_inserts: int = 0) -> float:
        spi = self.samples_per_insert or 0.0
        return (self.inserts + extra_inserts) * spi - self.samples

    def can_sample(self, n: int = 1) -> bool:
        """Whether `n` more rows may be sampled now."""
        if self.size < self.min_size_to_sample:
            return False
        if self.samples_per_insert is None:
            return True
        return self._diff() - n >= self.min_diff

    def can_insert(self, n: int = 1) -> bool:
        """Whether `n` more rows may be inserted now (always, until the minimum size is reached)."""
        if self.size + n <= self.min_size_to_sample or self.samples_per_insert is None:
            return True
        return self._diff(n) <= self.max_diff

    def insert(self, n: int = 1) -> None:
        self.inserts += n

    def delete(self, n: int = 1) -> None:
        """Rows evicted by retention; they no longer count toward the minimum size."""
        self.deletes += n

    def sample(self, n: int = 1) -> None:
        self.samples += n

    def state(self) -> dict:
        return {"inserts": self.inserts, "samples": self.samples, "deletes": self.deletes,
                "diff": self._diff(), "min_diff": self.min_diff, "max_diff": self.max_diff}


__all__ = ["RateLimiter", "RateLimitedError"]
