"""Where the run's parts live: Ray actors on a cluster, or plain objects in the driver process.

Both systems offer the same two faces. Sync mode: `rollout(iteration)` on every worker, then
`train()` on the learner, then `publish()`. Async mode: `start_async()` starts the learner's loop
and every worker's loop, `poll_async()` reads their metrics, `stop_async()` stops them (sealing
every writer). Workers and the learner are plain classes; only this module wraps them for Ray.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from retro_dist.config import Config, ConfigError
from retro_dist.core import recovery
from retro_dist.core.recovery import RerunPlan
from retro_dist.launch.logs import RunLogs, with_output_redirect
from retro_dist.launch.netsec import init_local, secret_env_vars
from retro_dist.launch.resources import check_resources
from retro_dist.launch.supervisor import EventLog, WorkerSupervisor
from retro_dist.replay import location
from retro_dist.rollout.weight_source import LocalWeightSource


def worker_specs(cfg: Config, run_dir: Path, count: int):
    from retro_dist.rollout.worker import WorkerSpec

    return [WorkerSpec(run_id=cfg.run.name, worker_id=i, num_workers=count,
                       replay_root=location.join(cfg.outputs_of(run_dir), "replay"), env=cfg.env, rollout=cfg.rollout,
                       actor=cfg.actor, reflector=cfg.reflector, vllm=cfg.vllm, replay=cfg.replay,
                       probe_tolerance=cfg.learner.probe_tolerance, seed=cfg.run.seed)
            for i in range(count)]


def learner_factory(cfg: Config, run_dir: Path):
    """A picklable zero-argument constructor of the run's Learner (built where it will run)."""
    from retro_dist.learner.learner import Learner

    replay = cfg.replay
    if cfg.run.mode == "async":  # the async learner's staleness bound is learner.max_policy_lag
        replay = dataclasses.replace(replay, max_staleness=cfg.learner.max_policy_lag)
    return functools.partial(Learner, cfg.learner, cfg.reflector, location.join(cfg.outputs_of(run_dir), "replay"), replay,
                             cfg.outputs_of(run_dir), cfg.run.seed)


def rerun_plans(run_dir: Path, cfg: Config, count: int, only: Optional[int] = None) -> list[RerunPlan]:
    """Async start, resume or worker replacement: where each worker picks up, from what the store
    holds (core/recovery.py). `only`: plan for that worker id alone (the others get empty plans)."""
    from retro_dist.replay.store import ReplayStore

    store = ReplayStore(location.join(cfg.outputs_of(run_dir), "replay"), cfg.replay)
    if store.num_rows("trials") == 0:
        return [RerunPlan() for _ in range(count)]
    cols = store.read("trials", columns=["worker_id", "episode_id"]).to_pydict()
    committed: dict[int, set] = {}
    for w, e in zip(cols["worker_id"], cols["episode_id"]):
        committed.setdefault(w, set()).add(e)
    r = cfg.rollout
    window = recovery.rerun_window(r.concurrent_episodes, r.repeats_per_task)
    return [recovery.rerun_plan(committed.get(w, ()), w, count, r.repeats_per_task, window)
            if only is None or w == only else RerunPlan() for w in range(count)]


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
    """A learner actor, N supervised worker actors (launch/supervisor.py) and the weight board on a
    Ray cluster. A worker whose process dies is replaced; what it left unfinished is rerun."""

    def __init__(self, cfg: Config, run_dir: Path, address: Optional[str], logs: RunLogs,
                 echo: Callable[[str], None] = print):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from retro_dist.launch.learner_group import LearnerGroup
        from retro_dist.launch.weights import RayWeightSink, RayWeightSource, WeightBoard

        self.ray, self.cfg, self.run_dir = ray, cfg, run_dir
        self.group = None  # a data-parallel learner group when learner.num_gpus > 1
        self.log_dir = str(logs.dir)  # each actor's output: logs/<name>.log
        self.events = EventLog(run_dir, echo)
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
        # The board lives with the driver: a node that leaves must not take the published weights along.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.board = ray.remote(WeightBoard).options(num_cpus=0, scheduling_strategy=here).remote()
        self.num_workers = max(1, r.num_workers)  # joining a cluster with num_workers 0: one worker actor
        self.specs = worker_specs(cfg, run_dir, self.num_workers)
        self.source, self.sink = RayWeightSource(self.board), RayWeightSink(self.board)
        learner_opts = dict(num_cpus=1, num_gpus=cfg.learner.num_gpus)
        # SPREAD: workers land on different nodes, so one lost node costs as few of them as possible.
        self.worker_opts = dict(num_cpus=r.worker_num_cpus, num_gpus=r.worker_num_gpus, max_restarts=0,
                                scheduling_strategy="SPREAD")
        self.pool: Optional[WorkerSupervisor] = None
        self.starting: dict[int, Any] = {}  # async: worker id -> its start() ref, until it is up
        self.announced: set[int] = set()  # sync: workers whose start was logged
        if cfg.run.mode == "sync":
            from retro_dist.learner.learner import Learner
            from retro_dist.rollout.worker import RolloutWorker

            if cfg.learner.num_gpus > 1:  # data-parallel ranks; rank 0 is used like a single learner
                self.group = LearnerGroup(*learner_factory(cfg, run_dir).args)
                self.learner = self.group.leader
            else:
                self.learner = ray.remote(with_output_redirect(Learner)).options(**learner_opts).remote(
                    self.log_dir, "learner", *learner_factory(cfg, run_dir).args)
            worker_cls = ray.remote(with_output_redirect(RolloutWorker)).options(**self.worker_opts)
            self.pool = WorkerSupervisor(
                ray, lambda i: worker_cls.remote(self.log_dir, f"worker-{i}", self.specs[i], self.source),
                self.num_workers, r.max_worker_restarts, self.events)
        else:
            from retro_dist.learner.streaming import LearnerLoop

            loop_args = (self.sink, cfg.run.updates, cfg.learner.updates_per_version, cfg.learner.max_policy_lag)
            if cfg.learner.num_gpus > 1:
                self.group = LearnerGroup(*learner_factory(cfg, run_dir).args, leader_cls=_group_loop(loop_args))
                self.learner = self.group.leader
            else:
                self.learner = ray.remote(with_output_redirect(LearnerLoop)).options(**learner_opts).remote(
                    self.log_dir, "learner", learner_factory(cfg, run_dir), *loop_args)

    @property
    def workers(self) -> list:
        return self.pool.handles if self.pool is not None else []

    # ---- sync ------------------------------------------------------------------------------------
    def restore(self) -> Optional[int]:
        return self.ray.get(self.learner.restore.remote())

    def publish(self) -> int:
        ref = self.learner.adapter.remote()  # stored once in the object store, fetched by ref
        version = self.ray.get(self.learner.current_version.remote())
        self.ray.get(self.board.publish.remote(version, [ref]))
        return version

    def rollout(self, iteration: int) -> list[dict]:
        """Every worker's episodes of `iteration`. A worker that dies is replaced and its replacement
        reruns the iteration's episodes under the same keys (the ones already sealed are dropped)."""
        pending = {}  # ref -> (worker id, what it answers)
        for i, w in enumerate(self.workers):
            if i not in self.announced:
                pending[w.where.remote()] = (i, "ready")  # answers once its constructor is done
            pending[w.rollout.remote(iteration)] = (i, "rollout")
        results: list = [None] * len(self.workers)
        while pending:
            (ref,), _ = self.ray.wait(list(pending), num_returns=1)
            i, kind = pending.pop(ref)
            try:
                value = self.ray.get(ref)
            except self.ray.exceptions.RayActorError as err:
                w = self.pool.replace(i, err)
                pending = {r: v for r, v in pending.items() if v[0] != i}  # calls on the dead actor
                pending[w.where.remote()] = (i, "ready")
                pending[w.rollout.remote(iteration)] = (i, "rollout")
                continue
            if kind == "ready":
                self.pool.ready(i, value)
                self.announced.add(i)
            else:
                results[i] = value
        return results

    def train(self) -> dict:
        return self.ray.get(self.learner.train_iteration.remote())

    # ---- async -----------------------------------------------------------------------------------
    def start_async(self) -> None:
        from retro_dist.rollout.streaming import StreamingWorker

        cls = self.ray.remote(with_output_redirect(StreamingWorker)).options(**self.worker_opts)
        lag = self.cfg.learner.max_policy_lag

        self.ray.get(self.learner.publish_current.remote())  # workers start on the current version
        # a resumed run's unfinished episodes, read once for all workers; a replacement reads its own
        first = dict(enumerate(rerun_plans(self.run_dir, self.cfg, self.num_workers)))

        def spawn(i: int):
            plan = first.pop(i, None) or rerun_plans(self.run_dir, self.cfg, self.num_workers, only=i)[i]
            if plan.redo:
                self.events.write("worker_rerun", worker=i, next_group_index=plan.next_n,
                                  episode_ids=[e for _, ids in plan.redo for e in ids])
            handle = cls.remote(self.log_dir, f"worker-{i}", self.specs[i], self.source, lag, plan)
            self.starting[i] = handle.start.remote()  # builds the engine, loads the current adapter
            return handle

        self.pool = WorkerSupervisor(self.ray, spawn, self.num_workers, self.cfg.rollout.max_worker_restarts,
                                     self.events)
        while self.starting:  # engines built, first adapter loaded, before the learner starts
            self.check_workers(wait_s=2.0)
        self.ray.get(self.learner.start.remote())

    def check_workers(self, wait_s: float = 5.0) -> None:
        """Replace the workers whose process died; note the ones that finished starting. Waits up
        to `wait_s` for the answers (a liveness ping answers at once: the loop runs on its own thread)."""
        refs = {ref: (i, "start") for i, ref in self.starting.items()}
        refs.update({self.workers[i].where.remote(): (i, "ping")
                     for i in range(len(self.workers)) if i not in self.starting})
        done, _ = self.ray.wait(list(refs), num_returns=len(refs), timeout=wait_s)
        for ref in done:
            i, kind = refs[ref]
            if kind == "start":
                del self.starting[i]
            try:
                self.ray.get(ref)
            except self.ray.exceptions.RayActorError as err:
                self.pool.replace(i, err)
                continue
            if kind == "start":
                try:
                    self.pool.ready(i, self.ray.get(self.workers[i].where.remote(), timeout=60))
                except self.ray.exceptions.RayActorError as err:
                    self.pool.replace(i, err)

    def poll_async(self) -> tuple[dict, list[dict]]:
        polls = []
        for i, w in enumerate(self.workers):
            if i in self.starting:
                continue
            try:
                polls.append(self.ray.get(w.poll.remote()))
            except self.ray.exceptions.RayActorError as err:  # its unpolled counters are lost, not its rows
                self.pool.replace(i, err)
        return self.ray.get(self.learner.poll.remote()), polls

    def learner_progress(self) -> dict:
        return self.ray.get(self.learner.progress.remote())

    def stop_async(self) -> tuple[dict, list[dict]]:
        learner = self.ray.get(self.learner.stop.remote())
        workers = self.pool.call_all("stop", timeout=300) if self.pool is not None else []
        return learner, [w for w in workers if w is not None]

    def close(self) -> None:
        try:
            if self.cfg.run.mode == "sync" and self.pool is not None:
                self.pool.call_all("close", timeout=60)
            if self.group is not None:
                self.group.close()
        finally:
            self.ray.shutdown()


class LocalSystem:
    """rollout.num_workers: 0 — the same classes, one worker, no Ray."""

    def __init__(self, cfg: Config, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir
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

    def start_async(self) -> None:
        from retro_dist.rollout.streaming import StreamingWorker

        self.learner.publish_current()
        plan = rerun_plans(self.run_dir, self.cfg, 1)[0]
        self.workers = [StreamingWorker(self.spec, self.source, self.cfg.learner.max_policy_lag, plan)]
        for w in self.workers:
            w.start()
        self.learner.start()

    def poll_async(self) -> tuple[dict, list[dict]]:
        return self.learner.poll(), [w.poll() for w in self.workers]

    def learner_progress(self) -> dict:
        return self.learner.progress()

    def check_workers(self, wait_s: float = 0.0) -> None:
        """In-process a worker cannot die without the driver: only the wait."""
        time.sleep(wait_s)

    def stop_async(self) -> tuple[dict, list[dict]]:
        return self.learner.stop(), [w.stop() for w in self.workers]

    def close(self) -> None:
        if self.cfg.run.mode == "sync":
            for w in self.workers:
                w.close()
