"""A hung simulator (its real TextWorldExpress JVM SIGSTOPped mid-episode) errors its episode after
`env.step_timeout_s`, is killed and rebuilt, and the other episodes go on: in the lockstep loop
(`run_episodes` over `MixedEnv`s, sync mode) and in the continuous runner over the simulator pool
(async mode). The policy is scripted (it moves around deterministically): the fault is the env's."""
import asyncio
import os
import signal
import threading
import time

import psutil
import pytest

from retro_dist.config import ConfigError, EnvConfig, load_config
from retro_dist.envs.registry import MixedEnv
from retro_dist.envs.timeouts import CallThread, EnvTimeout
from retro_dist.envs.twx import TwxFamily
from retro_dist.rollout.concurrent import ContinuousRunner, EpisodeJob
from retro_dist.rollout.episode import EpisodeIds, request_seed, run_episodes
from retro_dist.rollout.simulators import SimulatorPool

TIMEOUT = 3.0
CFG = EnvConfig(games=["twx/coin"], game_params="numLocations=4,includeDoors=0,numDistractorItems=0",
                step_limit=4, step_timeout_s=TIMEOUT)
MESSAGE = f"EnvTimeout: env step timed out after {TIMEOUT:g} s"


def choose(valid, t: int) -> str:
    """Deterministic: cycle through the moves, so trials are long and comparable."""
    acts = sorted(valid or ["look around"])
    moves = [a for a in acts if a.startswith("move ")] or acts
    return moves[t % len(moves)]


def jvm_of(env: MixedEnv) -> int:
    return env._envs["twx"]._env._gateway.java_process.pid


def sigstop(pid: int) -> None:
    """SIGSTOP a JVM and wait until every one of its threads has stopped: a stop reaches a
    multi-threaded process through one thread, so on a busy machine another thread could still
    answer a request or two before the whole process halts."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        states = []
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
            except FileNotFoundError:  # a thread that exited meanwhile
                pass
        if states and all(s in "tT" for s in states):
            return
        time.sleep(0.01)
    raise AssertionError(f"JVM {pid} did not stop")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def env_call_threads() -> set:
    return {t for t in threading.enumerate() if t.name.startswith("env-call")}


@pytest.fixture(scope="module")
def tasks():
    fam = TwxFamily(CFG)
    try:
        return fam.tasks("coin", "train", 4)
    finally:
        fam._probe.close()


# ---- the helper and the key (no JVM) --------------------------------------------------------------

def test_call_thread_times_out_passes_errors_through_and_is_abandoned():
    worker = CallThread("env-call-test")
    assert worker.call(lambda: 7, 1.0) == 7
    with pytest.raises(TimeoutError, match="the env's own"):  # an error raised by the call is not a timeout
        worker.call(lambda: (_ for _ in ()).throw(TimeoutError("the env's own")), 1.0)
    release = threading.Event()
    t0 = time.monotonic()
    with pytest.raises(EnvTimeout, match="env step timed out after 0.3 s"):
        worker.call(release.wait, 0.3)
    assert 0.3 <= time.monotonic() - t0 < 2.0
    assert worker._thread.is_alive()  # still stuck in the call ...
    release.set()
    worker._thread.join(5)
    assert not worker._thread.is_alive()  # ... and gone once it returns


@pytest.mark.parametrize("value", [0, -1.5, float("inf")])
def test_step_timeout_must_be_positive_or_null(value):
    with pytest.raises(ConfigError, match="env.step_timeout_s"):
        load_config(None, [f"env.step_timeout_s={value}"])
    assert load_config(None, ["env.step_timeout_s=null"]).env.step_timeout_s is None


# ---- sync mode: the lockstep loop over MixedEnvs ----------------------------------------------------

class HangingActor:
    """Scripted actor; before step `at` it SIGSTOPs the JVM of environment `victim` (a real hang)."""

    def __init__(self, envs=None, victim: int = 0, at: int = 1):
        self.envs, self.victim, self.at, self.t, self.stopped = envs, victim, at, 0, None

    def act(self, prompts, seed, valid_actions=None):
        if self.envs is not None and self.t == self.at:
            self.stopped = jvm_of(self.envs[self.victim])
            sigstop(self.stopped)
        self.t += 1
        return [choose(v, self.t - 1) for v in valid_actions]


@pytest.mark.component
def test_lockstep_a_hung_env_errors_its_episode_and_is_rebuilt(tasks):
    envs = [MixedEnv(CFG) for _ in range(3)]
    same = [tasks[0], tasks[0], tasks[1]]  # episodes 0 and 1 play the same game
    try:
        actor = HangingActor(envs, victim=0, at=1)
        t0 = time.monotonic()
        out = run_episodes(same, envs, EpisodeIds("run", 0, [0, 1, 2], seed=0), actor, None, trials=2,
                           memory_size=1, step_limit=4)
        took = time.monotonic() - t0
        by_ep = {}
        for rec in out.trials:
            by_ep.setdefault(rec.episode_id, []).append(rec)
        (hung,) = by_ep[0]  # errored in trial 0: no retry
        assert hung.error == MESSAGE and len(hung.actions) == 1  # the step before the hang is kept
        assert out.errors == [f"{tasks[0].task_id} trial 0: {MESSAGE}"]
        for e in (1, 2):  # the others played every step of both trials
            assert [r.trial for r in by_ep[e]] == [0, 1] and all(r.error is None for r in by_ep[e])
            assert all(len(r.actions) == 4 or r.success for r in by_ep[e])
        assert TIMEOUT <= took < TIMEOUT + 20
        assert gone(actor.stopped)  # the hung JVM was killed, not left stopped

        # the slot goes on: its next episode gets a new simulator and plays the game as the others do
        again = run_episodes(same[:2], envs[:2], EpisodeIds("run", 0, [3, 4], seed=0), HangingActor(), None,
                             trials=1, memory_size=1, step_limit=4)
        a, b = again.trials
        assert a.error is None and (a.actions, a.observations) == (b.actions, b.observations)
        assert jvm_of(envs[0]) != actor.stopped
    finally:
        for env in envs:
            env.close()


# ---- async mode: the continuous runner over the simulator pool --------------------------------------

class HangingAsyncActor:
    """Scripted async actor; for the request whose seed is `seed` it first SIGSTOPs the JVM of the
    pool simulator that holds `owner`'s game (the one that episode's next step goes to)."""

    def __init__(self, pool: SimulatorPool, owner, seed: int):
        self.pool, self.owner, self.seed, self.stopped = pool, owner, seed, None

    async def act(self, prompt, seed, valid_actions=None):
        if seed == self.seed:
            slot = next(s for s in self.pool._slots if s.owner == self.owner)
            self.stopped = jvm_of(slot.env)
            sigstop(self.stopped)
        return choose(valid_actions, seed % 7)


@pytest.mark.component
def test_pool_a_hung_simulator_errors_its_episode_and_is_rebuilt(tasks):
    jobs = [EpisodeJob(tasks[i % len(tasks)], i, 100 + i) for i in range(6)]
    victim = jobs[1]
    threads_before = env_call_threads()

    async def main():
        pool = SimulatorPool(CFG, size=3)
        actor = HangingAsyncActor(pool, owner=(victim.episode_id, 0), seed=request_seed(victim.seed, 0, 1))
        runner = ContinuousRunner(actor, None, pool, concurrency=3, trials=2, memory_size=1, step_limit=4,
                                  run_id="run", worker_id=0)
        queue, done = list(jobs), {}

        async def next_job():
            return queue.pop(0) if queue else None

        try:
            await runner.run(next_job, lambda job, out: done.__setitem__(job.episode_id, out))
            return done, pool.stats, runner.stats, actor.stopped
        finally:
            pool.close()

    t0 = time.monotonic()
    done, pool_stats, run_stats, stopped = asyncio.run(main())
    assert TIMEOUT <= time.monotonic() - t0 < TIMEOUT + 30
    hung = done[victim.episode_id]
    assert [(t.trial, t.error, len(t.actions)) for t in hung.trials] == [(0, MESSAGE, 1)]
    assert hung.errors == [f"{victim.task.task_id} trial 0: {MESSAGE}"]
    for job in jobs:  # every other episode played all its steps, including those that ran after the hang
        if job is not victim:
            recs = done[job.episode_id].trials
            assert [r.trial for r in recs] == [0, 1] and all(r.error is None for r in recs), job.episode_id
    assert pool_stats["timeouts"] == 1 and pool_stats["rebuilt"] == 1 and pool_stats["created"] == 3
    assert run_stats["rollout/episodes_errored"] == 1 and run_stats["rollout/episodes_done"] == 6
    assert gone(stopped)
    deadline = time.monotonic() + 5  # the abandoned call thread ended once its JVM was killed
    while env_call_threads() - threads_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not env_call_threads() - threads_before
