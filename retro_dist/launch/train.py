"""`retro-dist train`: wire workers, learner and weight board on Ray and run the loop.

The only module (with launch/weights.py) that imports Ray. The loop reads like DESIGN §1:
roll out multi-trial episodes with the current reflector → learn from the stored reflections →
publish the new adapter once → workers pull it before their next episodes.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Optional

import numpy as np
import yaml

from retro_dist.config import Config, ConfigError, as_dict
from retro_dist.launch.metrics import MetricsLogger
from retro_dist.launch.preflight import preflight
from retro_dist.launch.weights import RayWeightSource, WeightBoard
from retro_dist.rollout.weight_source import LocalWeightSource


def with_absolute_model_paths(cfg: Config) -> Config:
    """Local folders (models, data, game cache) as absolute paths: Ray workers need not share the driver's cwd."""
    def fix(name: str) -> str:
        return str(Path(name).resolve()) if Path(name).is_dir() else name

    env = dataclasses.replace(cfg.env, textworld_cache=str(Path(cfg.env.textworld_cache).resolve()),
                              data_path=str(Path(cfg.env.data_path).resolve()) if cfg.env.data_path else None)
    return dataclasses.replace(cfg, env=env, actor=dataclasses.replace(cfg.actor, model=fix(cfg.actor.model)),
                               reflector=dataclasses.replace(cfg.reflector, model=fix(cfg.reflector.model)))


# Keys that fix episode keys or the adapter's shape: a resumed run must keep them.
RESUME_KEYS = (("rollout", "num_workers"), ("rollout", "tasks_per_iteration"), ("rollout", "repeats_per_task"),
               ("reflector", "model"), ("reflector", "lora_rank"), ("reflector", "lora_alpha"),
               ("reflector", "lora_target_modules"), ("env", "games"), ("env", "split"))


def prepare_run_dir(cfg: Config) -> Path:
    run_dir = cfg.run_dir
    if run_dir.exists() and any(run_dir.iterdir()) and not cfg.run.resume:
        raise ConfigError(f"run folder {run_dir} already exists; set run.resume=true to continue it "
                          f"or pick another run.name")
    saved = run_dir / "config.yaml"
    if cfg.run.resume and saved.is_file():
        old, new = yaml.safe_load(saved.read_text()), as_dict(cfg)
        for section, key in RESUME_KEYS:
            if old.get(section, {}).get(key) != new[section][key]:
                raise ConfigError(f"run.resume: {section}.{key} was {old.get(section, {}).get(key)!r} in {saved}, "
                                  f"now {new[section][key]!r}; a resumed run must keep it")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(as_dict(cfg), sort_keys=False))
    return run_dir


def worker_specs(cfg: Config, run_dir: Path, count: int):
    from retro_dist.rollout.worker import WorkerSpec

    return [WorkerSpec(run_id=cfg.run.name, worker_id=i, num_workers=count,
                       replay_root=str((run_dir / "replay").resolve()), env=cfg.env, rollout=cfg.rollout,
                       actor=cfg.actor, reflector=cfg.reflector, vllm=cfg.vllm, replay=cfg.replay,
                       probe_tolerance=cfg.learner.probe_tolerance, seed=cfg.run.seed)
            for i in range(count)]


def summarize_rollouts(results: list[dict], trials: int) -> dict:
    episodes = sum(r["episodes"] for r in results)
    succ = np.sum([np.asarray(r["success_by_trial"]) * r["episodes"] for r in results], axis=0) / episodes
    out = {f"rollout/success@trial{k}": float(succ[k]) for k in range(trials)}
    n_refl = sum(r["reflections"] for r in results)
    out.update({
        "rollout/episodes": episodes, "rollout/trials": sum(r["trials"] for r in results),
        "rollout/reflections": n_refl, "rollout/stored_rows": sum(r["stored"] for r in results),
        "rollout/errored_episodes": sum(len(r["errors"]) for r in results),
        "rollout/reflection_reward": (sum(r["reward_sum"] for r in results) / n_refl) if n_refl else float("nan"),
        "rollout/policy_versions": sorted({r["policy_version"] for r in results}),
        "time/sync_seconds": float(sum(r["sync_seconds"] for r in results)),
        "sync/probe_gap_max": max((s["sync/probe_gap"] for r in results for s in r["syncs"]), default=0.0),
    })
    return out


class _Cluster:
    """Ray side of the run: a learner actor, N worker actors and the weight board."""

    def __init__(self, cfg: Config, run_dir: Path, address: Optional[str]):
        import ray

        from retro_dist.learner.learner import Learner
        from retro_dist.rollout.worker import RolloutWorker

        self.ray = ray
        env_vars = {"VLLM_CPU_KVCACHE_SPACE": str(cfg.vllm.kv_cache_gib), "TOKENIZERS_PARALLELISM": "false"}
        r = cfg.rollout
        if address:
            ray.init(address=address, runtime_env={"env_vars": env_vars})
        else:
            import torch

            if (r.worker_num_gpus > 0 or cfg.learner.num_gpus > 0) and not torch.cuda.is_available():
                raise ConfigError("rollout.worker_num_gpus / learner.num_gpus > 0 but this machine has no GPU: "
                                  "the actors would wait forever; set them to 0 or join a GPU cluster")
            need = r.num_workers * r.worker_num_cpus + 1
            ray.init(num_cpus=cfg.ray.num_cpus or int(np.ceil(need)), _node_ip_address="127.0.0.1",
                     include_dashboard=False, runtime_env={"env_vars": env_vars})
        self.board = ray.remote(WeightBoard).options(num_cpus=0).remote()
        self.learner = ray.remote(Learner).options(num_cpus=1, num_gpus=cfg.learner.num_gpus).remote(
            cfg.learner, cfg.reflector, str((run_dir / "replay").resolve()), cfg.replay, str(run_dir.resolve()),
            cfg.run.seed)
        worker_cls = ray.remote(RolloutWorker).options(num_cpus=r.worker_num_cpus, num_gpus=r.worker_num_gpus,
                                                      max_restarts=0)
        n = max(1, r.num_workers)  # joining a cluster with num_workers 0: one worker actor
        self.workers = [worker_cls.remote(spec, RayWeightSource(self.board)) for spec in worker_specs(cfg, run_dir, n)]

    def restore(self) -> Optional[int]:
        return self.ray.get(self.learner.restore.remote())

    def publish(self) -> int:
        ref = self.learner.adapter.remote()  # stored once in the object store, fetched by ref
        version = self.ray.get(self.learner.current_version.remote())
        self.ray.get(self.board.publish.remote(version, [ref]))
        return version

    def rollout(self, iteration: int) -> list[dict]:
        return self.ray.get([w.rollout.remote(iteration) for w in self.workers])

    def train(self) -> dict:
        return self.ray.get(self.learner.train_iteration.remote())

    def close(self) -> None:
        try:
            self.ray.get([w.close.remote() for w in self.workers], timeout=60)
        finally:
            self.ray.shutdown()


class _InProcess:
    """rollout.num_workers: 0 — the same classes, one worker, no Ray."""

    def __init__(self, cfg: Config, run_dir: Path):
        from retro_dist.learner.learner import Learner
        from retro_dist.rollout.worker import RolloutWorker

        self.source = LocalWeightSource()
        self.learner = Learner(cfg.learner, cfg.reflector, str(run_dir / "replay"), cfg.replay,
                               str(run_dir), cfg.run.seed)
        self.workers = [RolloutWorker(worker_specs(cfg, run_dir, 1)[0], self.source)]

    def restore(self) -> Optional[int]:
        return self.learner.restore()

    def publish(self) -> int:
        self.source.publish(self.learner.adapter())
        return self.learner.version

    def rollout(self, iteration: int) -> list[dict]:
        return [w.rollout(iteration) for w in self.workers]

    def train(self) -> dict:
        return self.learner.train_iteration()

    def close(self) -> None:
        for w in self.workers:
            w.close()


def train(cfg: Config, address: Optional[str] = None) -> Path:
    """Run `cfg.run.iterations` iterations; returns the run folder."""
    preflight(cfg)
    cfg = with_absolute_model_paths(cfg)
    run_dir = prepare_run_dir(cfg)
    address = address or cfg.ray.address
    system = _InProcess(cfg, run_dir) if cfg.rollout.num_workers == 0 and not address else _Cluster(cfg, run_dir, address)
    logger = MetricsLogger(run_dir, cfg.run.iterations)
    try:
        start = system.restore() or 0
        system.publish()  # version `start` (0: the initial LoRA, B = 0, i.e. the base reflector)
        for it in range(start, cfg.run.iterations):
            t0 = time.time()
            results = system.rollout(it)
            metrics = summarize_rollouts(results, cfg.rollout.trials)
            metrics["time/rollout_seconds"] = time.time() - t0
            metrics.update(system.train())
            t1 = time.time()
            system.publish()
            metrics["time/publish_seconds"] = time.time() - t1
            metrics["time/iteration_seconds"] = time.time() - t0
            for r in results:
                for err in r["errors"][:3]:
                    print(f"  worker {r['worker_id']}: episode errored: {err}", flush=True)
            logger.log(it, metrics)
    finally:
        logger.close()
        system.close()
    return run_dir
