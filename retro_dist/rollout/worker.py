"""RolloutWorker: environments + frozen actor + reflector + a replay writer. A plain class.

`launch/` wraps it with `ray.remote`; tests and `rollout.num_workers: 0` run it in-process.
Between episode batches it asks its weight source for a newer adapter (IMPALA-style pull), loads
it, and checks the probe: its log-probs of the learner's probe reflection must match the
learner's within tolerance, or the sync is an error.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from retro_dist.agents.policies import backend_counters, build_policies
from retro_dist.config import ActorConfig, EnvConfig, ReflectorConfig, RolloutConfig, VLLMConfig
from retro_dist.core.records import to_batch
from retro_dist.core.stats import count_by_game, cumulative_success, first_success
from retro_dist.envs.registry import MixedEnv, TaskMix
from retro_dist.replay.config import ReplayConfig
from retro_dist.replay.writer import ReplayWriter
from retro_dist.rollout.episode import EpisodeIds, run_episodes
from retro_dist.rollout.weight_source import WeightSource

class WeightSyncError(RuntimeError):
    """The worker's reflector does not reproduce the learner's log-probs after loading new weights."""


@dataclass
class WorkerSpec:
    """The config slices a worker needs, and nothing else."""

    run_id: str
    worker_id: int
    num_workers: int  # task numbering interleaves workers so no two run the same episode
    replay_root: str
    env: EnvConfig
    rollout: RolloutConfig
    actor: ActorConfig
    reflector: ReflectorConfig
    vllm: VLLMConfig
    replay: ReplayConfig
    probe_tolerance: float
    seed: int


class RolloutWorker:
    def __init__(self, spec: WorkerSpec, weight_source: WeightSource):
        self.spec = spec
        self.weight_source = weight_source
        self.actor, self.reflector = build_policies(spec.actor, spec.reflector, spec.vllm,
                                                    seed=spec.seed + spec.worker_id)
        e = spec.env
        self.envs = [MixedEnv(e) for _ in range(spec.rollout.parallel_tasks)]
        self.tasks = TaskMix(e, e.split)
        self.writer = ReplayWriter(spec.replay_root, f"worker-{spec.worker_id}", spec.replay)
        self.sync_seconds = 0.0
        self.consecutive_errors = 0

    def pull_weights(self) -> Optional[dict]:
        """Load a newer adapter if the learner has published one; returns sync metrics."""
        t0 = time.time()
        adapter = self.weight_source(self.reflector.version)
        if adapter is None:
            return None
        self.reflector.load(adapter)
        probe = adapter.extra["probe"]
        gap = check_probe(self.reflector.score(probe["prompt_ids"], probe["completion_ids"]), adapter,
                          self.spec.probe_tolerance, self.spec.worker_id)
        seconds = time.time() - t0
        self.sync_seconds += seconds
        return {"sync/seconds": seconds, "sync/probe_gap": gap, "sync/version": adapter.version}

    def rollout(self, iteration: int) -> dict:
        """Run `tasks_per_iteration` multi-trial episodes, stream records to replay, seal."""
        r, e = self.spec.rollout, self.spec.env
        t0, self.sync_seconds = time.time(), 0.0
        stats = {"trials": 0, "reflections": 0, "reward_sum": 0.0, "stored": 0, "errors": [], "syncs": [],
                 "by_game": {}}
        # (K,) episodes solved at or before each trial
        successes = np.zeros(r.trials)
        base = (iteration * max(1, self.spec.num_workers) + self.spec.worker_id) * r.tasks_per_iteration
        for lo in range(0, r.tasks_per_iteration, r.parallel_tasks):
            sync = self.pull_weights()  # between episodes, never inside one
            if sync:
                stats["syncs"].append(sync)
            n = min(r.parallel_tasks, r.tasks_per_iteration - lo)
            tasks = repeated(self.tasks.take, base + lo, n, r.repeats_per_task)
            ids = EpisodeIds(self.spec.run_id, self.spec.worker_id, list(range(base + lo, base + lo + n)),
                             seed=self.spec.seed * 7919 + base + lo)
            out = run_episodes(tasks, self.envs[:n], ids, self.actor, self.reflector,
                               r.trials, r.memory_size, e.step_limit)
            stats["stored"] += self._write(out)
            stats["trials"] += len(out.trials)
            stats["reflections"] += len(out.reflections)
            stats["reward_sum"] += sum(s.reward for s in out.reflections)
            stats["errors"].extend(out.errors)
            self._count_errors(out)
            first = first_success(out.trials)
            successes += n * cumulative_success([first.get(i) for i in ids.episode_ids], r.trials)
            count_by_game(stats["by_game"], [t.env_name for t in tasks], [first.get(i) for i in ids.episode_ids],
                          r.trials, [(x.env_name, x.reward) for x in out.reflections])
        self.writer.seal()  # the learner reads sealed segments only
        stats.update(episodes=r.tasks_per_iteration, success_by_trial=(successes / r.tasks_per_iteration).tolist(),
                     policy_version=self.reflector.version, worker_id=self.spec.worker_id,
                     rollout_seconds=time.time() - t0, sync_seconds=self.sync_seconds)
        stats.update(backend_counters(self.actor, self.reflector))  # retries, engine_rebuilds: totals so far
        return stats

    def _count_errors(self, out) -> None:
        """Episodes errored in a row; past the limit the worker stops instead of running empty."""
        errored = {t.episode_id for t in out.trials if t.error is not None}
        for episode_id in sorted({t.episode_id for t in out.trials}):
            self.consecutive_errors = self.consecutive_errors + 1 if episode_id in errored else 0
        limit = self.spec.rollout.max_consecutive_errors
        if self.consecutive_errors >= limit:
            raise RuntimeError(f"worker {self.spec.worker_id}: {self.consecutive_errors} episodes errored in a row "
                               f"(rollout.max_consecutive_errors={limit}); last: {out.errors[-1]}")

    def _write(self, out) -> int:
        stored = 0
        if out.trials:
            stored += self.writer.append("trials", to_batch(out.trials))
        if out.reflections:
            stored += self.writer.append("reflections", to_batch(out.reflections))
        return stored

    def close(self) -> None:
        self.writer.close()
        for env in self.envs:
            env.close()
        for backend in {id(p.backend): p.backend for p in (self.actor, self.reflector)}.values():
            if hasattr(backend, "close"):  # vLLM: remove the adapter folders
                backend.close()


def check_probe(mine, adapter, tolerance: float, worker_id: int) -> float:
    """Mean gap between the worker's log-probs of the probe reflection and the learner's; above the
    version's tolerance (learner/probe.py: between the bf16 rounding floor and half the distance the
    version moved the probe) the worker is not serving the weights the learner published."""
    from retro_dist.learner.probe import probe_matches

    ok, gap, tol = probe_matches(adapter.extra["probe"], mine, tolerance)
    if not ok:
        raise WeightSyncError(f"worker {worker_id}: probe log-probs differ from the learner's by "
                              f"{gap:.4f} > {tol:.4f} after loading v{adapter.version}")
    return gap


def repeated(take, start: int, count: int, repeats: int) -> list:
    """Episodes start..start+count-1 when each task runs `repeats` times side by side: episode e
    plays task e // repeats, so G reflections are written for the same failed trial (leave-one-out)."""
    return [t for t in take(start // repeats, -(-count // repeats)) for _ in range(repeats)][:count]
