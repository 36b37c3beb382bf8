"""Replay store settings: the `replay:` slice of the run config.

Writers use the seal_* / max_unacked_rows fields; readers use the rest. Defaults suit a laptop
run (segments of a few thousand rows, sealed at least every 30 s).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional


@dataclass
class ReplayConfig:
    # seal (flush, fsync, rename, catalogue) an open segment once it holds this many rows
    seal_rows: int = 4096
    # seal an open segment once its Arrow IPC stream reaches this many bytes
    seal_bytes: int = 64 * 1024 * 1024
    # seal an open segment this many seconds after its first row (checked on append and seal)
    seal_seconds: float = 30.0
    # most rows a writer keeps written-but-unsealed across all its tables; reaching it seals all
    max_unacked_rows: int = 16384
    # local disk: write segments in whole 2 MB pieces (readers then map them 2 MB per fault); off: as Arrow emits them
    huge_page_writes: bool = True
    # how sample() picks rows: uniformly, by |priority|^exponent, or by quality annealed to uniform
    sampler: Literal["uniform", "prioritised", "curriculum"] = "uniform"
    # column-derived priority when sample() gets no explicit priorities (see ReplayStore.sample)
    priority_key: Literal["advantage_abs", "reward_abs"] = "advantage_abs"
    # alpha in p_i ∝ (|priority_i| + eps)^alpha; 0 means uniform
    priority_exponent: float = 0.6
    # learner steps over which the curriculum moves linearly from quality-weighted to uniform
    curriculum_anneal_steps: int = 1000
    # drop rows with policy_version < current_version - max_staleness when sampling; None keeps all
    max_staleness: Optional[int] = None
    # rate limiter: no sampling until the store holds this many rows
    min_size_to_sample: int = 8
    # rate limiter: target sampled rows per inserted row (Reverb SampleToInsertRatio); None = no cap
    samples_per_insert: Optional[float] = None
    # rate limiter: how far (in sampled rows) sampling may run ahead of samples_per_insert
    error_buffer: float = 1024.0
    # when the rate limiter refuses a sample: wait for inserts ("block") or return None ("drop")
    on_overflow: Literal["block", "drop"] = "drop"
    # longest a blocked sample() waits for new segments before raising RateLimitedError
    block_timeout_s: float = 60.0
    # keep at most this many rows per table, evicting whole oldest segments; None = unbounded
    retention_rows: Optional[int] = None
    # keep at most this many segment bytes per table, evicting whole oldest segments; None = no cap
    retention_bytes: Optional[int] = None
    # evict segments sealed more than this many seconds ago; None = keep forever
    retention_seconds: Optional[float] = None
    # reader: drop mapped segment pages from this process past this many resident bytes; None = keep
    resident_bytes: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("seal_rows", "seal_bytes", "max_unacked_rows", "min_size_to_sample"):
            _positive(name, getattr(self, name))
        _positive("seal_seconds", self.seal_seconds)
        _choice("sampler", self.sampler, ("uniform", "prioritised", "curriculum"))
        _choice("priority_key", self.priority_key, ("advantage_abs", "reward_abs"))
        _choice("on_overflow", self.on_overflow, ("block", "drop"))
        if self.priority_exponent < 0:
            raise ValueError("replay.priority_exponent: must be >= 0")
        if self.curriculum_anneal_steps < 0:
            raise ValueError("replay.curriculum_anneal_steps: must be >= 0")
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ValueError("replay.max_staleness: must be >= 0 or None")
        if self.samples_per_insert is not None:
            _positive("samples_per_insert", self.samples_per_insert)
        if self.error_buffer < 0:
            raise ValueError("replay.error_buffer: must be >= 0")
        if self.block_timeout_s < 0:
            raise ValueError("replay.block_timeout_s: must be >= 0")
        for name in ("retention_rows", "retention_bytes", "retention_seconds", "resident_bytes"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))


def _positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not value > 0:
        raise ValueError(f"replay.{name}: must be > 0, got {value!r}")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"replay.{name}: must be one of {allowed}, got {value!r}")


__all__ = ["ReplayConfig"]
