"""Can the joined Ray cluster ever run this config? Checked right after `ray.init(address=...)`.

Ray queues an actor whose resources no node offers and waits forever (a "pending actor" warning
at best), so a run on a cluster that is too small hangs instead of failing. This compares the
config's total demand with the cluster's *total* resources (`ray.cluster_resources()`, not the
free ones: actors of another job may finish and free theirs) and stops with one line.

The demand is what `launch/system.py` reserves: one bundle per learner rank (`placement.demands`,
the same list the offline placement check packs), one per rollout worker, and the weight board,
which is started with `num_cpus=0` and so asks for nothing. Totals only: `cluster_resources()`
does not say how resources split across nodes; a per-node misfit is what
`placement.check_placement` catches for a described cluster.
"""
from __future__ import annotations

from retro_dist.config import Config, ConfigError
from retro_dist.launch.placement import demands

WEIGHT_BOARD = {"CPU": 0.0, "GPU": 0.0}  # system.py: ray.remote(WeightBoard).options(num_cpus=0)
_EPS = 1e-9


class ResourceError(ConfigError):
    """The joined cluster does not have the CPUs or GPUs the config asks for, even when idle."""


def requested(cfg: Config) -> dict[str, float]:
    """Total CPU and GPU the run's actors ask for, plus the largest single request of each."""
    wants = demands(cfg)
    return {"CPU": sum(d.cpus for d in wants) + WEIGHT_BOARD["CPU"],
            "GPU": sum(d.gpus for d in wants) + WEIGHT_BOARD["GPU"],
            "learner_ranks": sum(d.name.startswith("learner") for d in wants),
            "workers": sum(d.name.startswith("rollout") for d in wants)}


def check_resources(cfg: Config, available: dict) -> None:
    """Raise ResourceError (one line: asked vs offered) when `available` (a
    `ray.cluster_resources()` dict) cannot hold every actor of the run at once."""
    want = requested(cfg)
    r, lrn = cfg.rollout, cfg.learner
    short = [key for key in ("CPU", "GPU") if want[key] > float(available.get(key, 0.0)) + _EPS]
    if not short:
        return
    asked = (f"{want['workers']} rollout worker(s) × ({r.worker_num_cpus:g} CPU, {r.worker_num_gpus:g} GPU) + "
             f"learner {want['learner_ranks']} rank(s) × (1 CPU, "
             f"{1.0 if lrn.num_gpus > 1 else lrn.num_gpus:g} GPU) + weight board (0 CPU)")
    gaps = ", ".join(f"{key} {want[key]:g} asked > {float(available.get(key, 0.0)):g} offered" for key in short)
    raise ResourceError(f"the Ray cluster can never place this run: {gaps} [{asked}]; lower rollout.num_workers, "
                        f"rollout.worker_num_cpus/worker_num_gpus or learner.num_gpus, or add nodes")
