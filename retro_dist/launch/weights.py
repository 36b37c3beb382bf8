"""Weight broadcast: the learner's adapter is put in the object store once; workers pull it by ref.

`WeightBoard` is a plain class (wrapped with `ray.remote` in `launch.train`) holding the newest
(version, ObjectRef). The ref travels boxed in a list so Ray hands it over without resolving it:
each worker then fetches the tensors straight from the object store, once per version.
"""
from __future__ import annotations

from typing import Optional

import ray

from retro_dist.agents.backends import Adapter


class WeightBoard:
    def __init__(self):
        self.version = -1
        self.ref = None

    def publish(self, version: int, boxed_ref: list) -> None:
        self.version, self.ref = version, boxed_ref[0]

    def latest(self, have_version: int) -> Optional[list]:
        return None if self.version <= have_version else [self.ref]

    def newest_version(self) -> int:
        return self.version


class RayWeightSource:
    """The worker's `WeightSource` on a Ray cluster: ask the board, fetch the tensors by ref."""

    def __init__(self, board):
        self.board = board

    def __call__(self, have_version: int) -> Optional[Adapter]:
        boxed = ray.get(self.board.latest.remote(have_version))
        return None if boxed is None else ray.get(boxed[0])

    def newest_version(self) -> int:
        return ray.get(self.board.newest_version.remote())


class RayWeightSink:
    """The learner's publisher on a Ray cluster: put the adapter in the object store once, post its ref."""

    def __init__(self, board):
        self.board = board

    def __call__(self, adapter: Adapter) -> None:
        ref = ray.put(adapter)
        ray.get(self.board.publish.remote(adapter.version, [ref]))
