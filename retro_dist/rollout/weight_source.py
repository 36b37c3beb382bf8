"""Where a worker gets newer adapters from. On Ray: `launch.weights.RayWeightSource`; in-process: this."""
from __future__ import annotations

from typing import Callable, Optional

from retro_dist.agents.backends import Adapter

# Given the version a worker holds, returns a newer Adapter or None.
WeightSource = Callable[[int], Optional[Adapter]]


class LocalWeightSource:
    """In-process stand-in for the weight board (rollout.num_workers: 0, unit tests)."""

    def __init__(self):
        self.adapter: Optional[Adapter] = None

    def publish(self, adapter: Adapter) -> None:
        self.adapter = adapter

    def __call__(self, have_version: int) -> Optional[Adapter]:
        a = self.adapter
        return a if a is not None and a.version > have_version else None

    def newest_version(self) -> int:
        return -1 if self.adapter is None else self.adapter.version
