"""GPU configs place: the shipped cluster configs fit their cluster templates (resources only, no
GPUs needed), the engines on a GPU claim <= 0.9 of it, and a config that does not fit is refused
naming the actor. The pure packer is checked against Ray's own scheduler on a fake-GPU cluster."""
import dataclasses
from pathlib import Path

import pytest
import yaml

from retro_dist.config import load_config
from retro_dist.launch.placement import (MAX_GPU_MEMORY_FRACTION, Node, PlacementError, check_gpu_memory,
                                         check_placement, demands, engines_per_worker, gpu_memory_per_gpu,
                                         nodes_from_cluster_yaml)

ROOT = Path(__file__).resolve().parents[2]
PAIRS = [("configs/cluster-gpu.yaml", "cluster/ray-cluster.yaml"),
         ("configs/cluster-gpu-small.yaml", "cluster/ray-cluster-small.yaml")]


def _load(config, cluster):
    return load_config(ROOT / config), nodes_from_cluster_yaml(yaml.safe_load((ROOT / cluster).read_text()))


@pytest.mark.parametrize("config,cluster", PAIRS)
def test_shipped_gpu_configs_place_on_their_clusters(config, cluster):
    cfg, nodes = _load(config, cluster)
    total_gpus = sum(n.gpus for n in nodes)
    where = check_placement(cfg, nodes)
    assert len(where) == max(1, cfg.rollout.num_workers) + max(1, int(cfg.learner.num_gpus))
    used = cfg.rollout.num_workers * cfg.rollout.worker_num_gpus + max(cfg.learner.num_gpus, 0)
    assert used == total_gpus  # every GPU the template pays for is used, the learner's counted
    assert engines_per_worker(cfg) == 2  # actor and reflector are different checkpoints
    assert gpu_memory_per_gpu(cfg) <= MAX_GPU_MEMORY_FRACTION


def test_the_old_gpu_config_is_refused_on_both_counts():
    cfg, nodes = _load(*PAIRS[0])
    old = dataclasses.replace(cfg, vllm=dataclasses.replace(cfg.vllm, gpu_memory_utilization=0.85))
    with pytest.raises(PlacementError, match=r"0.85 × 2 engine\(s\) per worker .* = 1.70 of one GPU > 0.9"):
        check_gpu_memory(old)
    eight_single_gpu_nodes = [Node("head", 8, 0)] + [Node(f"g5-{i}", 8, 1) for i in range(8)]
    old = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, num_workers=8),
                              learner=dataclasses.replace(cfg.learner, num_gpus=1.0))
    with pytest.raises(PlacementError, match=r"rollout worker 7 \(4 CPU, 1 GPU\) cannot be scheduled"):
        check_placement(old, eight_single_gpu_nodes)


def test_fractional_gpus_must_fit_inside_one_gpu_and_share_its_memory():
    small = ["rollout.worker_num_cpus=4", "vllm.gpu_memory_utilization=0.2"]
    cfg = load_config(ROOT / PAIRS[1][0], ["rollout.worker_num_gpus=0.5", "rollout.num_workers=6", *small])
    assert gpu_memory_per_gpu(cfg) == pytest.approx(0.8)  # 2 workers × 2 engines × 0.2
    check_placement(cfg, [Node("n", 48, 4)])  # 1 learner GPU + 6 halves on 3 GPUs
    cfg = load_config(ROOT / PAIRS[1][0], ["rollout.worker_num_gpus=0.4", "rollout.num_workers=7", *small])
    with pytest.raises(PlacementError, match="rollout worker 6"):  # 2 per GPU (0.8), 0.2 left on each
        check_placement(cfg, [Node("n", 48, 4)])


@pytest.mark.component
def test_ray_places_the_same_bundles_on_a_fake_gpu_cluster():
    """Ray's scheduler, on nodes that only declare GPUs: every actor's bundle of the large config
    is placed (learner group first, PACK), and one more worker is not."""
    from ray.cluster_utils import Cluster
    import ray
    from ray.util.placement_group import placement_group

    cfg, nodes = _load(*PAIRS[0])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": int(nodes[0].cpus), "num_gpus": nodes[0].gpus})
    try:
        for n in nodes[1:]:
            cluster.add_node(num_cpus=int(n.cpus), num_gpus=n.gpus)
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        wants = demands(cfg)
        learner = [{"CPU": d.cpus, "GPU": d.gpus} for d in wants if d.name.startswith("learner")]
        groups = [placement_group(learner, strategy="PACK")]
        groups += [placement_group([{"CPU": d.cpus, "GPU": d.gpus}]) for d in wants if d.name.startswith("rollout")]
        ready, pending = ray.wait([g.ready() for g in groups], num_returns=len(groups), timeout=60)
        assert not pending, f"{len(pending)} of {len(groups)} bundles could not be placed"
        extra = placement_group([{"CPU": cfg.rollout.worker_num_cpus, "GPU": 1}])
        assert not extra.wait(timeout_seconds=3)  # the cluster is full: a 15th worker would never start
    finally:
        ray.shutdown()
        cluster.shutdown()
