"""Where the run's parts live: Ray actors on a cluster, or plain objects in the driver process.

Both systems offer the same two faces. Sync mode: `rollout(iteration)` on every worker, then
`train()` on the learner, then `publish()`. Async mode: `start_async()` starts the learner's loop
and every worker's loop, `poll_async()` reads their metrics, `stop_async()` stops them (sealing
every writer). Workers and the learner are plain classes; only this module wraps them for Ray.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Optional

import numpy as np

from retro_dist.config import Config, ConfigError
from retro_dist.launch.logs import RunLogs, with_output_redirect
from retro_dist.launch.netsec import init_local, secret_env_vars
from retro_dist.launch.resources import check_resources
from retro_dist.rollout.weight_source import LocalWeightSource


def worker_specs(cfg: Config, run_dir: Path, count: int):
    from retro_dist.rollout.worker import WorkerSpec

    return [WorkerSpec(run_id=cfg.run.name, worker_id=i, num_workers=count,
                       replay_root=str((run_dir / "replay").resolve()), env=cfg.env, rollout=cfg.rollout,
                       actor=cfg.actor, reflector=cfg.reflector, vllm=cfg.vllm, replay=cfg.replay,
                       probe_tolerance=cfg.learner.probe_tolerance, seed=cfg.run.seed)
            for i in range(count)]


def learner_factory(cfg: Config, run_dir: Path):
    """A picklable zero-argument constructor of the run's Learner (built where it will run)."""
    from retro_dist.learner.learner import Learner

    replay = cfg.replay
    if cfg.run.mode == "async":  # the async learner's staleness bound is learner.max_policy_lag
        replay = dataclasses.replace(replay, max_staleness=cfg.learner.max_policy_lag)
    return functools.partial(Learner, cfg.learner, cfg.reflector, str((run_dir / "replay").resolve()), replay,
                             str(run_dir.resolve()), cfg.run.seed)


def start_groups(run_dir: Path, cfg: Config, count: int) -> list[int]:
    """Async resume: each worker's next task group, after the episodes it already stored."""
    from retro_dist.core import staleness
    from retro_dist.replay.store import ReplayStore

    store = ReplayStore(str((run_dir / "replay").resolve()), cfg.replay)
    if store.num_rows("trials") == 0:
        return [0] * count
    cols = store.read("trials").select(["worker_id", "episode_id"]).to_pydict()
    last = {}
    for w, e in zip(cols["worker_id"], cols["episode_id"]):
        last[w] = max(last.get(w, -1), e)
    out = []
    for w in range(count):
        if w not in last:
            out.append(0)
            continue
        group = last[w] // cfg.rollout.repeats_per_task
        out.append((group - w) // count + 1)
        assert staleness.episode_group(w, count, out[-1] - 1) == group, "episode numbering changed on resume"
    return out


def _group_loop(loop_args: tuple) -> type:
    """Rank 0 of a data-parallel learner group in async mode: the learner loop around a Learner
    built with the group's `dist` (LearnerGroup builds its leader with the Learner's arguments)."""
    from retro_dist.learner.learner import Learner
    from retro_dist.learner.streaming import LearnerLoop

    class GroupLearnerLoop(LearnerLoop):
        def __init__(self, *learner_args, dist):
            super().__init__(functools.partial(Learner, *learner_args, dist=dist), *loop_args)

        def close_group(self) -> None:
            self.learner.close_group()

    return GroupLearnerLoop


class RaySystem:
    """A learner actor, N worker actors and the weight board on a Ray cluster."""

    def __init__(self, cfg: Config, run_dir: Path, address: Optional[str], logs: RunLogs):
        import ray

        from retro_dist.launch.weights import RayWeightSink, RayWeightSource, WeightBoard

        from retro_dist.launch.learner_group import LearnerGroup

        self.ray, self.cfg, self.run_dir = ray, cfg, run_dir
        self.group = None  # a data-parallel learner group when learner.num_gpus > 1
        self.log_dir = str(logs.dir)  # each actor's output: logs/<name>.log
        env_vars = {"VLLM_CPU_KVCACHE_SPACE": str(cfg.vllm.kv_cache_gib), "TOKENIZERS_PARALLELISM": "false"}
        r = cfg.rollout
        if address:  # the API key reaches remote workers only this way (a local cluster inherits it)
            key = secret_env_vars(cfg.actor.api_key_env if cfg.actor.backend == "openai" else None)
            context = ray.init(address=address, **logs.ray_init_kwargs({**env_vars, **key}))
            check_resources(cfg, ray.cluster_resources())  # a run that can never be placed: one line, no hang
        else:
            import torch

            if (r.worker_num_gpus > 0 or cfg.learner.num_gpus > 0) and not torch.cuda.is_available():
                raise ConfigError("rollout.worker_num_gpus / learner.num_gpus > 0 but this machine has no GPU: "
                                  "the actors would wait forever; set them to 0 or join a GPU cluster")
            need = r.num_workers * r.worker_num_cpus + 1
            context = init_local(num_cpus=cfg.ray.num_cpus or int(np.ceil(need)), **logs.ray_init_kwargs(env_vars))
        logs.link_ray_session(context)
        self.board = ray.remote(WeightBoard).options(num_cpus=0).remote()
        self.num_workers = max(1, r.num_workers)  # joining a cluster with num_workers 0: one worker actor
        self.specs = worker_specs(cfg, run_dir, self.num_workers)
        self.source, self.sink = RayWeightSource(self.board), RayWeightSink(self.board)
        learner_opts = dict(num_cpus=1, num_gpus=cfg.learner.num_gpus)
        if cfg.run.mode == "sync":
            from retro_dist.learner.learner import Learner
            from retro_dist.rollout.worker import RolloutWorker

            if cfg.learner.num_gpus > 1:  # data-parallel ranks; rank 0 is used like a single learner
                self.group = LearnerGroup(*learner_factory(cfg, run_dir).args)
                self.learner = self.group.leader
            else:
                self.learner = ray.remote(with_output_redirect(Learner)).options(**learner_opts).remote(
                    self.log_dir, "learner", *learner_factory(cfg, run_dir).args)
            worker_cls = ray.remote(with_output_redirect(RolloutWorker)).options(
                num_cpus=r.worker_num_cpus, num_gpus=r.worker_num_gpus, max_restarts=0)
            self.workers = [worker_cls.remote(self.log_dir, f"worker-{spec.worker_id}", spec, self.source)
                            for spec in self.specs]
        else:
            from retro_dist.learner.streaming import LearnerLoop

            loop_args = (self.sink, cfg.run.updates, cfg.learner.updates_per_version, cfg.learner.max_policy_lag)
            if cfg.learner.num_gpus > 1:
                self.group = LearnerGroup(*learner_factory(cfg, run_dir).args, leader_cls=_group_loop(loop_args))
                self.learner = self.group.leader
            else:
                self.learner = ray.remote(with_output_redirect(LearnerLoop)).options(**learner_opts).remote(
                    self.log_dir, "learner", learner_factory(cfg, run_dir), *loop_args)
            self.workers = []

    # ---- sync ------------------------------------------------------------------------------------
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

    # ---- async -----------------------------------------------------------------------------------
    def start_async(self, groups: list[int]) -> None:
        from retro_dist.rollout.streaming import StreamingWorker

        r = self.cfg.rollout
        self.ray.get(self.learner.publish_current.remote())  # workers start on the current version
        worker_cls = self.ray.remote(with_output_redirect(StreamingWorker)).options(
            num_cpus=r.worker_num_cpus, num_gpus=r.worker_num_gpus, max_restarts=0)
        self.workers = [worker_cls.remote(self.log_dir, f"worker-{spec.worker_id}", spec, self.source,
                                          self.cfg.learner.max_policy_lag, g)
                        for spec, g in zip(self.specs, groups)]
        self.ray.get([w.start.remote() for w in self.workers])  # engines built, first adapter loaded
        self.ray.get(self.learner.start.remote())

    def poll_async(self) -> tuple[dict, list[dict]]:
        return self.ray.get(self.learner.poll.remote()), self.ray.get([w.poll.remote() for w in self.workers])

    def learner_progress(self) -> dict:
        return self.ray.get(self.learner.progress.remote())

    def stop_async(self) -> tuple[dict, list[dict]]:
        learner = self.ray.get(self.learner.stop.remote())
        workers = self.ray.get([w.stop.remote() for w in self.workers], timeout=300)
        return learner, workers

    def close(self) -> None:
        try:
            if self.cfg.run.mode == "sync":
                self.ray.get([w.close.remote() for w in self.workers], timeout=60)
            if self.group is not None:
                self.group.close()
        finally:
            self.ray.shutdown()


class LocalSystem:
    """rollout.num_workers: 0 — the same classes, one worker, no Ray."""

    def __init__(self, cfg: Config, run_dir: Path):
        self.cfg = cfg
        self.source = LocalWeightSource()
        self.num_workers = 1
        self.spec = worker_specs(cfg, run_dir, 1)[0]
        if cfg.run.mode == "sync":
            from retro_dist.rollout.worker import RolloutWorker

            self.learner = learner_factory(cfg, run_dir)()
            self.workers = [RolloutWorker(self.spec, self.source)]
        else:
            from retro_dist.learner.streaming import LearnerLoop

            self.learner = LearnerLoop(learner_factory(cfg, run_dir), self.source.publish, cfg.run.updates,
                                       cfg.learner.updates_per_version, cfg.learner.max_policy_lag)
            self.workers = []

    def restore(self) -> Optional[int]:
        return self.learner.restore()

    def publish(self) -> int:
        self.source.publish(self.learner.adapter())
        return self.learner.version

    def rollout(self, iteration: int) -> list[dict]:
        return [w.rollout(iteration) for w in self.workers]

    def train(self) -> dict:
        return self.learner.train_iteration()

    def start_async(self, groups: list[int]) -> None:
        from retro_dist.rollout.streaming import StreamingWorker

        self.learner.publish_current()
        self.workers = [StreamingWorker(self.spec, self.source, self.cfg.learner.max_policy_lag, groups[0])]
        for w in self.workers:
            w.start()
        self.learner.start()

    def poll_async(self) -> tuple[dict, list[dict]]:
        return self.learner.poll(), [w.poll() for w in self.workers]

    def learner_progress(self) -> dict:
        return self.learner.progress()

    def stop_async(self) -> tuple[dict, list[dict]]:
        return self.learner.stop(), [w.stop() for w in self.workers]

    def close(self) -> None:
        if self.cfg.run.mode == "sync":
            for w in self.workers:
                w.close()
