"""Will a config's actors fit a cluster? Resource arithmetic only, no Ray needed.

Two checks, both run on a config and a described cluster (a Ray cluster-launcher YAML's node
types, or explicit nodes):
- GPU memory: the vLLM engines sharing one GPU must claim at most `MAX_GPU_MEMORY_FRACTION` of
  it in all. A worker builds one engine per distinct model it serves with vLLM (actor and
  reflector share one only when they are the same checkpoint), each taking
  `vllm.gpu_memory_utilization`; workers with `worker_num_gpus` < 1 share a GPU.
- Placement: the learner's bundles (one per data-parallel process, packed first, as
  `launch/learner_group.py` reserves them) and then one bundle per rollout worker are packed onto
  the nodes; GPUs are tracked one by one, so fractional requests must fit inside one GPU, as in
  Ray. The first actor that fits nowhere is named in the error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from retro_dist.config import Config, LearnerConfig

MAX_GPU_MEMORY_FRACTION = 0.9  # the rest: CUDA context, NCCL buffers, allocator fragmentation


class PlacementError(ValueError):
    """The config's actors cannot all be scheduled on the described cluster."""


@dataclass
class Node:
    name: str
    cpus: float
    gpus: int
    free_gpu: list[float] = field(default_factory=list)  # free fraction of each GPU

    def __post_init__(self):
        self.free_gpu = self.free_gpu or [1.0] * self.gpus


@dataclass
class Demand:
    name: str
    cpus: float
    gpus: float


def learner_bundles(cfg: LearnerConfig, world_size: int | None = None, num_cpus: float = 1.0) -> list[dict]:
    """One Ray resource bundle per learner process (`learner.num_gpus` > 1: one GPU each)."""
    world = world_size or max(1, int(cfg.num_gpus))
    gpus = 1.0 if cfg.num_gpus > 1 else cfg.num_gpus
    bundle = {"CPU": num_cpus, **({"GPU": gpus} if gpus else {})}
    return [dict(bundle) for _ in range(world)]


def engines_per_worker(cfg: Config) -> int:
    """vLLM engines one worker builds (see agents/policies.build_policies)."""
    models = {m for backend, m in ((cfg.actor.backend, cfg.actor.model), (cfg.reflector.backend, cfg.reflector.model))
              if backend == "vllm"}
    return len(models)


def gpu_memory_per_gpu(cfg: Config) -> float:
    """Sum of `gpu_memory_utilization` over the engines that share one worker GPU."""
    g = cfg.rollout.worker_num_gpus
    if g <= 0:
        return 0.0
    workers_per_gpu = math.floor(1 / g + 1e-9) if g < 1 else 1
    return workers_per_gpu * engines_per_worker(cfg) * cfg.vllm.gpu_memory_utilization


def check_gpu_memory(cfg: Config) -> None:
    total = gpu_memory_per_gpu(cfg)
    if total > MAX_GPU_MEMORY_FRACTION + 1e-9:
        n = engines_per_worker(cfg)
        raise PlacementError(
            f"vllm.gpu_memory_utilization {cfg.vllm.gpu_memory_utilization} × {n} engine(s) per worker "
            f"(actor {cfg.actor.model}, reflector {cfg.reflector.model}) × workers per GPU = {total:.2f} of one GPU "
            f"> {MAX_GPU_MEMORY_FRACTION}; lower vllm.gpu_memory_utilization to "
            f"{MAX_GPU_MEMORY_FRACTION * cfg.vllm.gpu_memory_utilization / total:.2f} or less")


def demands(cfg: Config, learner_world: int | None = None) -> list[Demand]:
    """Every actor's resources, learner processes first (they are reserved first)."""
    out = [Demand(f"learner rank {i}", b["CPU"], b.get("GPU", 0.0))
           for i, b in enumerate(learner_bundles(cfg.learner, learner_world))]
    r = cfg.rollout
    out += [Demand(f"rollout worker {i}", r.worker_num_cpus, r.worker_num_gpus) for i in range(max(1, r.num_workers))]
    return out


def nodes_from_cluster_yaml(spec: dict) -> list[Node]:
    """The largest cluster a Ray cluster-launcher YAML can bring up: the head plus every worker
    type at `max_workers` (capped by the global `max_workers`). Node types must declare
    `resources: {CPU: n, GPU: m}`."""
    types = spec["available_node_types"]
    head = spec["head_node_type"]
    nodes = [_node(f"{head}-head", types[head])]
    budget = spec.get("max_workers", math.inf)
    for name, t in types.items():
        count = min(t.get("max_workers", 0), budget)
        budget -= count
        nodes += [_node(f"{name}-{i}", t) for i in range(int(count))]
    return nodes


def _node(name: str, node_type: dict) -> Node:
    res = node_type.get("resources") or {}
    if "CPU" not in res:
        raise PlacementError(f"node type of {name} declares no resources.CPU; describe CPU and GPU counts")
    return Node(name, float(res["CPU"]), int(res.get("GPU", 0)))


def place(wants: list[Demand], nodes: list[Node]) -> dict[str, str]:
    """First-fit packing; returns actor -> node name, or raises PlacementError naming the first misfit."""
    where = {}
    for d in wants:
        node = next((n for n in nodes if _fits(d, n)), None)
        if node is None:
            free = ", ".join(f"{n.name}: {n.cpus:g} CPU, {sum(n.free_gpu):g} GPU" for n in nodes)
            raise PlacementError(f"{d.name} ({d.cpus:g} CPU, {d.gpus:g} GPU) cannot be scheduled; free: {free}")
        _take(d, node)
        where[d.name] = node.name
    return where


def _fits(d: Demand, n: Node) -> bool:
    if d.cpus > n.cpus + 1e-9:
        return False
    if d.gpus >= 1:
        return sum(f >= 1.0 - 1e-9 for f in n.free_gpu) >= math.ceil(d.gpus)
    return d.gpus == 0 or any(f >= d.gpus - 1e-9 for f in n.free_gpu)


def _take(d: Demand, n: Node) -> None:
    n.cpus -= d.cpus
    if d.gpus >= 1:
        whole = [i for i, f in enumerate(n.free_gpu) if f >= 1.0 - 1e-9][: math.ceil(d.gpus)]
        for i in whole:
            n.free_gpu[i] = 0.0
    elif d.gpus > 0:
        i = next(i for i, f in enumerate(n.free_gpu) if f >= d.gpus - 1e-9)
        n.free_gpu[i] -= d.gpus


def check_placement(cfg: Config, nodes: list[Node], learner_world: int | None = None) -> dict[str, str]:
    """Both checks; returns where each actor would go."""
    check_gpu_memory(cfg)
    return place(demands(cfg, learner_world), nodes)
