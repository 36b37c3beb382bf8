"""Issue 8, fault 7: a request raises inside a worker, or the worker's vLLM engine dies.

One real vLLM engine at a time (the tiny model, actor and reflector on one engine), for the sync
`RolloutWorker` and then the async `StreamingWorker`:
- a request vLLM rejects (a prompt longer than max_model_len) fails only itself, with the reason,
  and the engine goes on serving;
- SIGKILL of the engine's EngineCore child process (vLLM V1 runs it in its own process) mid-run: the
  episodes whose requests it carried error, naming the dead engine; the worker rebuilds the engine
  once (`engine_rebuilds` 1), serves the current adapter again (probe-checked), and goes on; every
  episode's rows land in the replay store.
"""
import asyncio
import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from retro_dist.agents.backends import BackendError, EngineDead
from retro_dist.config import load_config
from retro_dist.learner.learner import Learner
from retro_dist.replay.store import ReplayStore
from retro_dist.rollout.streaming import StreamingWorker
from retro_dist.rollout.weight_source import LocalWeightSource
from retro_dist.rollout.worker import RolloutWorker, WorkerSpec

pytest.importorskip("vllm")
pytestmark = [pytest.mark.integration, pytest.mark.vllm]

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "test.yaml"
PROMPT = "Game: twx/coin\nTask: find the coin\nYou are in the kitchen.\n>"
TOO_LONG = "the kitchen " * 1500  # > max_model_len 1024 tokens


def engine_core() -> psutil.Process:
    (core,) = [p for p in psutil.Process().children(recursive=True) if p.name() == "VLLM::EngineCore"]
    return core


def kill_engine() -> int:
    """SIGKILL this process's EngineCore child; returns once it is gone."""
    core = engine_core()
    os.kill(core.pid, signal.SIGKILL)
    core.wait(30)
    return core.pid


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("engine")
    cfg = load_config(str(CONFIG), ["actor.backend=vllm", "reflector.backend=vllm", f"actor.model={tiny_model}",
                       f"reflector.model={tiny_model}", "rollout.tasks_per_iteration=4", "rollout.parallel_tasks=2"])
    cfg.rollout = replace(cfg.rollout, concurrent_episodes=4, simulators=2)  # for the async worker
    learner = Learner(cfg.learner, cfg.reflector, str(d / "learner-replay"), cfg.replay, str(d), 0)
    return cfg, learner, d


def spec(cfg, d, worker_id):
    return WorkerSpec(run_id="engine", worker_id=worker_id, num_workers=2, replay_root=str(d / "replay"),
                      env=cfg.env, rollout=cfg.rollout, actor=cfg.actor, reflector=cfg.reflector, vllm=cfg.vllm,
                      replay=replace(cfg.replay, seal_rows=4, seal_seconds=1.0), probe_tolerance=0.02, seed=0)


class KillBeforeBatch(LocalWeightSource):
    """The worker asks its weight source before every batch: before batch `at` (counted from arm()),
    SIGKILL the engine, so that batch's requests find it dead mid-rollout."""

    def __init__(self):
        super().__init__()
        self.calls, self.at, self.killed = 0, None, None

    def arm(self, at: int):
        self.calls, self.at = 0, at

    def __call__(self, have_version):
        if self.at is not None and self.calls == self.at:
            self.killed, self.at = kill_engine(), None
        self.calls += 1
        return super().__call__(have_version)


def test_sync_worker_survives_a_bad_request_and_a_dead_engine(setup):
    cfg, learner, d = setup
    source = KillBeforeBatch()
    learner.version = 0
    source.publish(learner.adapter())
    worker = RolloutWorker(spec(cfg, d, 0), source)
    try:
        # (a) a request the engine rejects fails alone; the engine lives on
        ok, bad = worker.actor.act([PROMPT, TOO_LONG], seed=[1, 2])
        assert isinstance(ok, str) and isinstance(bad, BackendError) and "maximum context length" in str(bad)
        g, bad = worker.reflector.reflect([PROMPT, TOO_LONG], seed=[1, 2])
        assert len(g.token_ids) > 0 and isinstance(bad, BackendError)
        s0 = worker.rollout(0)
        assert s0["errors"] == [] and s0["engine_rebuilds"] == 0 and s0["policy_version"] == 0

        # (b) the EngineCore is SIGKILLed between the iteration's two batches
        pid = engine_core().pid
        source.arm(at=1)
        t0 = time.monotonic()
        s1 = worker.rollout(1)
        assert source.killed == pid
        assert s1["engine_rebuilds"] == 1 and engine_core().pid != pid
        assert len(s1["errors"]) == 2 and all("EngineDead: vLLM engine died" in e for e in s1["errors"])
        assert time.monotonic() - t0 < 120

        # the rebuilt engine serves the next adapter too (probe-checked by the worker)
        learner.version = 1
        source.publish(learner.adapter())
        s2 = worker.rollout(2)
        assert s2["errors"] == [] and s2["engine_rebuilds"] == 1 and s2["policy_version"] == 1
        assert s2["syncs"][0]["sync/probe_gap"] < 1e-3
    finally:
        worker.close()
    store = ReplayStore(str(d / "replay"), cfg.replay)
    trials = store.read("trials").to_pylist()
    mine = [t for t in trials if t["worker_id"] == 0]
    assert len(mine) == s0["trials"] + s1["trials"] + s2["trials"]
    errored = {t["episode_id"] for t in mine if t["error"]}
    assert len(errored) == 2 and all("vLLM engine died" in t["error"] for t in mine if t["error"])
    assert len({t["episode_id"] for t in mine}) == 12  # 3 iterations × 4 episodes, each stored
    print(f"\nsync: iteration with the kill {s1['rollout_seconds']:.1f} s (rebuild included); "
          f"errors: {s1['errors'][0]}")


def test_async_worker_survives_a_bad_request_and_a_dead_engine(setup):
    cfg, learner, d = setup
    source = LocalWeightSource()
    learner.version = 2
    source.publish(learner.adapter())
    worker = StreamingWorker(spec(cfg, d, 1), source, max_policy_lag=2)
    polls = []

    def poll():
        polls.append((time.monotonic(), worker.poll()))

    def done_after(t):
        return sum(p["episodes"] for at, p in polls if at > t)

    def wait(cond, timeout_s, what):
        deadline = time.monotonic() + timeout_s
        while not cond():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.5)
            poll()

    worker.start()
    try:
        assert worker.version == 2
        on_loop = lambda coro: asyncio.run_coroutine_threadsafe(coro, worker._loop).result(60)  # noqa: E731
        with pytest.raises(BackendError, match="maximum context length") as bad:
            on_loop(worker.reflector.reflect(TOO_LONG, seed=1))
        assert not isinstance(bad.value, EngineDead)
        wait(lambda: done_after(0) >= 2, 60, "episodes before the kill")

        pid = kill_engine()  # mid-run: episodes are in flight
        t_kill = time.monotonic()
        wait(lambda: polls[-1][1]["engine_rebuilds"] == 1, 90, "the rebuild")
        t_back = time.monotonic()
        wait(lambda: done_after(t_back) >= 2, 60, "episodes after the rebuild")
        assert engine_core().pid != pid
    finally:
        polls.append((time.monotonic(), worker.stop()))
    counters = [p for _, p in polls]
    assert counters[-1]["engine_rebuilds"] == 1
    errors = [e for p in counters for e in p["errors"]]
    assert errors and all("vLLM engine died" in e for e in errors)  # only the episodes the dead engine held
    assert done_after(t_kill) > len(errors)  # and the others went on
    stored = sum(p["stored"] for p in counters)
    store = ReplayStore(str(d / "replay"), cfg.replay)
    trials = [t for t in store.read("trials").to_pylist() if t["worker_id"] == 1]
    reflections = [r for r in store.read("reflections").to_pylist() if r["worker_id"] == 1]
    assert len(trials) + len(reflections) == stored > 0
    print(f"\nasync: {len(errors)} episodes errored, rebuilt in {t_back - t_kill:.1f} s, "
          f"{done_after(t_back)} episodes after; rows stored {stored}")


def test_hf_a_request_that_raises_fails_alone(tiny_model):
    """The HF backends (sync batch, async request-batching queue): a request that raises (a token id
    outside the vocabulary: the embedding lookup fails) errors alone; its batch-mates are answered
    with exactly what they would have sampled by themselves."""
    from retro_dist.agents.async_backends import HFBatcher
    from retro_dist.agents.async_policies import AsyncReflectorPolicy
    from retro_dist.agents.backends import HFBackend
    from retro_dist.agents.policies import ReflectorPolicy
    from retro_dist.agents.prompts import PromptText
    from retro_dist.config import ReflectorConfig

    cfg = ReflectorConfig(backend="hf", model=tiny_model)
    backend = HFBackend(tiny_model, cfg)
    bad = PromptText("bad", ids=[10 ** 6])
    good, err = ReflectorPolicy(cfg, backend, 768).reflect([PROMPT, bad], seed=[1, 2])
    assert good.token_ids and isinstance(err, BackendError) and "IndexError" in str(err)

    async def main():
        policy = AsyncReflectorPolicy(cfg, HFBatcher(backend), 768)
        try:
            return await asyncio.gather(policy.reflect(PROMPT, 1), policy.reflect(bad, 2), return_exceptions=True)
        finally:
            await policy.close()

    good2, err2 = asyncio.run(main())
    assert isinstance(err2, BackendError) and "IndexError" in str(err2)
    assert good2.token_ids == good.token_ids
