"""Issue 8, fault 5: the actor's OpenAI-compatible endpoint goes down and comes back.

A real vLLM API server on loopback serves the frozen actor to a sync `RolloutWorker` (lockstep
batches, `OpenAIBackend`) and an async `StreamingWorker` (continuous batching, `AsyncOpenAIClient`)
at once. Mid-run the server's process group is SIGKILLed and, a few seconds later, started again on
the same port. Requests made meanwhile are retried with backoff (counted in the workers' `retries`),
no episode of those workers errors, and both produce again once the server is back. Clients with
`actor.max_retries: 1` error their episodes during the outage, naming the reason. Client errors
(4xx) fail at once and only their own request: a wrong model name, a prompt longer than the
server's max_model_len in the middle of a batch.
"""
import asyncio
import random
import threading
import time
from dataclasses import replace

import pytest

from benchmarks.vllm_server import VLLMServer
from retro_dist.agents.backends import BackendError
from retro_dist.agents.async_policies import AsyncActorPolicy
from retro_dist.agents.openai_backend import AsyncOpenAIClient, OpenAIBackend, RetryPolicy
from retro_dist.agents.policies import ActorPolicy
from retro_dist.config import ConfigError, load_config
from retro_dist.envs.registry import MixedEnv, TaskMix
from retro_dist.replay.store import ReplayStore
from retro_dist.rollout.concurrent import ContinuousRunner, EpisodeJob
from retro_dist.rollout.episode import EpisodeIds, run_episodes
from retro_dist.rollout.simulators import SimulatorPool
from retro_dist.rollout.streaming import StreamingWorker
from retro_dist.rollout.weight_source import LocalWeightSource
from retro_dist.rollout.worker import RolloutWorker, WorkerSpec

pytest.importorskip("vllm")
pytestmark = [pytest.mark.integration, pytest.mark.vllm]

PROMPT = "Game: twx/coin\nTask: find the coin\nYou are in the kitchen.\n>"
TOO_LONG = "the kitchen " * 1500  # > max_model_len 1024 tokens: the server answers 400


def make_cfg(tiny_model, url, run_dir, **actor):
    """configs/test.yaml with the actor behind `url`; patient retries unless `actor` says otherwise."""
    cfg = load_config("configs/test.yaml", [
        "actor.backend=openai", f"actor.base_url={url}", "actor.model=tiny", f"reflector.model={tiny_model}",
        f"run.output_dir={run_dir}", "rollout.tasks_per_iteration=2", "rollout.parallel_tasks=2",
        # patient enough for a restart of up to ~80 s: delays 0.5, 1, 2, 3, 3, ... (each at least half that)
        "actor.max_retries=60", "actor.retry_backoff_s=0.5", "actor.retry_backoff_max_s=3"])
    cfg.actor = replace(cfg.actor, **actor)
    cfg.rollout = replace(cfg.rollout, concurrent_episodes=2, simulators=2)  # for the async worker
    return cfg


def spec(cfg, run_dir, worker_id):
    return WorkerSpec(run_id="endpoint", worker_id=worker_id, num_workers=2, replay_root=str(run_dir / "replay"),
                      env=cfg.env, rollout=cfg.rollout, actor=cfg.actor, reflector=cfg.reflector, vllm=cfg.vllm,
                      replay=replace(cfg.replay, seal_rows=4, seal_seconds=1.0), probe_tolerance=0.02, seed=0)


class SyncProducer:
    """A RolloutWorker rolling out iteration after iteration on its own thread, until stopped."""

    def __init__(self, worker: RolloutWorker):
        self.worker, self.results, self.error = worker, [], None  # results: (finished at, stats)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        try:
            i = 0
            while not self._stop.is_set():
                stats = self.worker.rollout(i)
                self.results.append((time.monotonic(), stats))
                i += 1
        except BaseException as err:  # reported by the test
            self.error = err

    def done_after(self, t: float) -> int:
        return sum(s["episodes"] for at, s in self.results if at > t)

    def stop(self, timeout: float):
        self._stop.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the sync worker did not finish its iteration"


class AsyncProducer:
    """Polls a StreamingWorker; remembers (time, counters) per poll."""

    def __init__(self, worker: StreamingWorker):
        self.worker, self.polls = worker, []
        worker.start()

    def poll(self):
        self.polls.append((time.monotonic(), self.worker.poll()))

    def done_after(self, t: float) -> int:
        return sum(p["episodes"] for at, p in self.polls if at > t)


def wait_until(cond, timeout_s: float, what: str, every=None):
    deadline = time.monotonic() + timeout_s
    while not cond():
        if every:
            every()
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s waiting for {what}"
        time.sleep(0.5)


def impatient_episodes(cfg):
    """Sync and async episodes with `actor.max_retries: 1`, run while the server is down."""
    short = replace(cfg.actor, max_retries=1, retry_backoff_s=0.2, retry_backoff_max_s=0.2)
    tasks = TaskMix(cfg.env, cfg.env.split).take(0, 2)
    envs = [MixedEnv(cfg.env) for _ in tasks]
    try:
        backend = OpenAIBackend(short)
        out = run_episodes(tasks, envs, EpisodeIds("short", 9, [0, 1], seed=0), ActorPolicy(short, backend), None,
                           trials=1, memory_size=1, step_limit=3)
    finally:
        for env in envs:
            env.close()

    async def run_async():
        pool = SimulatorPool(cfg.env, 1)
        client = AsyncOpenAIClient(short)
        runner = ContinuousRunner(AsyncActorPolicy(short, client), None, pool, 2, 1, 1, 3, "short", 9)
        jobs, done = [EpisodeJob(t, 10 + i, i) for i, t in enumerate(tasks)], []

        async def next_job():
            return jobs.pop(0) if jobs else None

        try:
            await runner.run(next_job, lambda job, o: done.append(o))
        finally:
            await client.close()
            pool.close()
        return done, client

    done, client = asyncio.run(run_async())
    return out, backend, done, client


def test_requests_retry_through_a_restart_and_only_exhausted_ones_error(tiny_model, tmp_path, in_repo):
    server = VLLMServer(tiny_model, served_name="tiny", log_path=str(tmp_path / "vllm.log")).start()
    sync_p = async_p = None
    try:
        cfg = make_cfg(tiny_model, server.url, tmp_path)

        # ---- client errors fail at once, and only their own request -----------------------------------
        wrong = OpenAIBackend(replace(cfg.actor, model="nope"))
        t0 = time.monotonic()
        (err,) = wrong.generate_text([PROMPT], 4, 0.0)
        assert isinstance(err, BackendError) and "HTTP 404" in str(err) and "nope" in str(err)
        assert "\n" not in str(err) and wrong.retries == 0 and time.monotonic() - t0 < 5
        actor = ActorPolicy(cfg.actor, OpenAIBackend(cfg.actor))
        ok1, bad, ok2 = actor.act([PROMPT, TOO_LONG, PROMPT], seed=[1, 2, 3])
        assert isinstance(ok1, str) and isinstance(ok2, str)
        assert isinstance(bad, BackendError) and "HTTP 400" in str(bad) and "context length" in str(bad)
        assert actor.backend.retries == 0 and actor.backend.failed == 1

        # ---- both modes produce, the server dies and comes back ----------------------------------------
        source = LocalWeightSource()
        sync_p = SyncProducer(RolloutWorker(spec(cfg, tmp_path, 0), source))
        async_p = async_polls = AsyncProducer(StreamingWorker(spec(cfg, tmp_path, 1), source, max_policy_lag=2))
        wait_until(lambda: sync_p.done_after(0) and async_p.done_after(0), 120, "episodes before the kill",
                   every=async_p.poll)
        assert sync_p.error is None

        server.kill()  # SIGKILL of the API server and its EngineCore, mid-run
        t_kill = time.monotonic()
        short_out, short_backend, short_done, short_client = impatient_episodes(cfg)
        time.sleep(max(0.0, 3.0 - (time.monotonic() - t_kill)))
        wait_until(lambda: async_p.polls[-1][1]["retries"] > 0 and sync_p.worker.actor.backend.retries > 0, 20,
                   "both workers retrying", every=async_p.poll)
        server.start()  # same port
        t_back = time.monotonic()
        down_s = t_back - t_kill
        wait_until(lambda: sync_p.done_after(t_back) and async_p.done_after(t_back), 120,
                   "episodes after the restart", every=async_p.poll)
        sync_p.stop(120)
        async_p.polls.append((time.monotonic(), async_p.worker.stop()))
        async_p = None
    finally:
        if sync_p is not None:
            sync_p._stop.set()
        if async_p is not None:
            async_p.worker.stop()
        server.close()
    assert server.starts == 2
    assert sync_p.error is None, sync_p.error

    # the impatient clients gave up during the outage: their episodes errored, naming why
    assert len(short_out.errors) == 2 and all(t.error for t in short_out.trials)
    for e in short_out.errors:
        assert "failed after 1 retries" in e and "ConnectionRefusedError" in e
    assert short_backend.retries == 2 and short_backend.failed == 2
    short_errors = [e for o in short_done for e in o.errors]
    assert len(short_errors) == 2 and all("failed after 1 retries" in e and "onnect" in e for e in short_errors)
    assert short_client.retries == 2 and short_client.failed == 2

    # the patient workers retried through the outage, lost nothing and produced again after it
    sync_stats = [s for _, s in sync_p.results]
    assert sync_stats[-1]["retries"] > 0 and sync_stats[-1]["engine_rebuilds"] == 0
    assert all(s["errors"] == [] for s in sync_stats)
    assert sync_p.done_after(t_back) > 0 and sync_p.done_after(0) > sync_p.done_after(t_kill)
    polls = [p for _, p in async_polls.polls]
    assert polls[-1]["retries"] > 0 and all(p["errors"] == [] for p in polls)
    assert async_polls.done_after(t_back) > 0
    stored = sum(s["stored"] for s in sync_stats) + sum(p["stored"] for p in polls)
    store = ReplayStore(str(tmp_path / "replay"), cfg.replay)
    assert store.num_rows("trials") + store.num_rows("reflections") == stored > 0
    print(f"\nendpoint down {down_s:.1f} s; retries: sync {sync_stats[-1]['retries']}, async {polls[-1]['retries']}; "
          f"episodes after the restart: sync {sync_p.done_after(t_back)}, async {async_polls.done_after(t_back)}; "
          f"rows stored {stored}")


def test_retry_delays_double_up_to_the_cap_with_jitter():
    policy = RetryPolicy(max_retries=5, base_s=0.5, max_s=3.0, rng=random.Random(0))
    for n, d in enumerate([0.5, 1.0, 2.0, 3.0, 3.0]):
        delays = [policy.delay(n) for _ in range(200)]
        assert d / 2 <= min(delays) and max(delays) <= d and max(delays) - min(delays) > d / 4
    for bad in (["actor.max_retries=-1"], ["actor.retry_backoff_s=0"], ["actor.retry_backoff_s=40"]):
        with pytest.raises(ConfigError, match="actor.max_retries|actor.retry_backoff_s"):
            load_config(None, bad)
