"""Data-parallel learner processes: W Ray actors in one placement group, one torch.distributed group.

`learner.num_gpus > 1` gives W = num_gpus processes with one GPU each (NCCL); on CPUs a test or a
small run passes `world_size` (gloo). Rank 0 (`group.leader`) is a learner actor like the single
one `launch/train.py` starts, with the same methods (`train_iteration`, `update`, `adapter`,
`restore`, `save_checkpoint`, `current_version`, ...); the other ranks run `Learner.follow()`,
which receives each step's rows from rank 0 and joins its gradient all-reduce. Rank 0 alone
samples, checkpoints and publishes.

The bundles are placed together (PACK) before any other actor, so the learner's GPUs are
reserved first and the rest of the cluster's GPUs go to the rollout workers.
"""
from __future__ import annotations

import socket
from typing import Optional

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from retro_dist.config import LearnerConfig, ReflectorConfig
from retro_dist.learner.distributed import DistSpec
from retro_dist.launch.placement import learner_bundles
from retro_dist.learner.learner import Learner
from retro_dist.replay.config import ReplayConfig


def _rendezvous_address() -> str:
    """tcp://ip:port of a free port on the node running rank 0 (run inside bundle 0)."""
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return f"tcp://{ray.util.get_node_ip_address()}:{port}"


class LearnerGroup:
    """W data-parallel learner actors. `leader` is rank 0's actor handle; `close()` releases all."""

    def __init__(self, cfg: LearnerConfig, reflector: ReflectorConfig, replay_root: str, replay_cfg: ReplayConfig,
                 run_dir: str, seed: int, world_size: Optional[int] = None, num_cpus: float = 1.0,
                 leader_cls: type = Learner, ready_timeout_s: float = 600.0):
        """`leader_cls` is built like `Learner` (same arguments plus `dist=`) and must expose
        `close_group()`, e.g. an async loop actor that owns a Learner; followers are Learners."""
        bundles = learner_bundles(cfg, world_size, num_cpus)
        self.world_size = len(bundles)
        self.pg = placement_group(bundles, strategy="PACK", name="retro-dist-learner")
        try:
            ray.get(self.pg.ready(), timeout=ready_timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.pg)
            raise RuntimeError(f"the learner's {self.world_size} bundles {bundles[0]} could not be placed within "
                               f"{ready_timeout_s:.0f}s: the cluster lacks the resources") from None
        gpu = bundles[0].get("GPU", 0.0)
        address = ray.get(ray.remote(_rendezvous_address).options(
            num_cpus=0, scheduling_strategy=self._in_bundle(0)).remote())
        backend = "nccl" if gpu else "gloo"
        args = (cfg, reflector, replay_root, replay_cfg, run_dir, seed)
        actors = []
        for rank in range(self.world_size):
            cls = leader_cls if rank == 0 else Learner
            spec = DistSpec(rank, self.world_size, address, backend)
            actors.append(ray.remote(cls).options(num_cpus=num_cpus, num_gpus=gpu, max_restarts=0,
                                                  scheduling_strategy=self._in_bundle(rank)).remote(*args, dist=spec))
        self.leader, self.followers = actors[0], actors[1:]
        self._following = [f.follow.remote() for f in self.followers]  # returns when rank 0 closes the group

    def _in_bundle(self, index: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(placement_group=self.pg, placement_group_bundle_index=index,
                                                placement_group_capture_child_tasks=True)

    def release(self, timeout_s: float = 120.0) -> list[int]:
        """Close the process group (followers' `follow()` return); returns their step counts.
        The actors stay up, so their state can still be read."""
        ray.get(self.leader.close_group.remote(), timeout=timeout_s)
        return ray.get(self._following, timeout=timeout_s)

    def close(self, timeout_s: float = 120.0) -> None:
        try:
            self.release(timeout_s)
        finally:
            for a in [self.leader, *self.followers]:
                ray.kill(a)
            remove_placement_group(self.pg)
