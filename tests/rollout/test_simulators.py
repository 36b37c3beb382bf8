"""SimulatorPool on real TextWorldExpress JVMs: restores by replay match uninterrupted games, the pool
never grows past its size, one owner keeps its simulator, and a crashed simulator errors one call."""
import asyncio
import os

import psutil
import pytest

from retro_dist.config import EnvConfig
from retro_dist.envs.base import EnvError
from retro_dist.envs.twx import JVM_OPTIONS, TwxEnv, TwxFamily
from retro_dist.rollout.simulators import SimulatorPool

pytestmark = pytest.mark.component
pytest.importorskip("textworld_express")
CFG = EnvConfig(games=["twx/coin"], game_params="numLocations=4,includeDoors=0,numDistractorItems=0",
                step_limit=8)
STEPS = 5


@pytest.fixture(scope="module")
def tasks():
    fam = TwxFamily(CFG)
    try:
        return fam.tasks("coin", "train", 8)
    finally:
        fam._probe.close()


def choose(obs, t: int) -> str:
    """A deterministic policy that moves around, so the replayed state really differs from a reset."""
    acts = sorted(obs.valid_actions or ["look around"])
    moves = [a for a in acts if a.startswith("move ")] or acts
    return moves[t % len(moves)]


@pytest.fixture(scope="module")
def reference(tasks):
    """Each task played through on a simulator of its own: (first observation, observations after steps)."""
    env = TwxEnv(CFG.game_params, CFG.step_limit)
    out = {}
    try:
        for task in tasks:
            _, obs = env.reset(task)
            seen = [obs]
            for t in range(STEPS):
                if obs.done:
                    break
                obs = env.step(choose(obs, t))
                seen.append(obs)
            out[task.task_id] = seen
    finally:
        env.close()
    return out


async def play(pool: SimulatorPool, owner, task, steps: int = STEPS) -> list:
    _, obs = await pool.reset(owner, task)
    seen, history = [obs], []
    for t in range(steps):
        if obs.done:
            break
        action = choose(obs, t)
        obs = await pool.step(owner, task, history, action)
        history.append(action)
        seen.append(obs)
        await asyncio.sleep(0)  # let the other episodes take the simulators in between
    return seen


def jvms() -> set[int]:
    """Live simulator JVMs under this process (closed ones linger as zombies until reaped)."""
    out = set()
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "py4j.GatewayServer" in p.cmdline():
                out.add(p.pid)
        except psutil.Error:  # exited meanwhile
            pass
    return out


def test_restore_by_replay_matches_the_uninterrupted_game(tasks, reference):
    async def main():
        pool = SimulatorPool(CFG, size=1)  # two interleaved episodes on one simulator: every step restores
        try:
            a, b = await asyncio.gather(play(pool, "a", tasks[0]), play(pool, "b", tasks[1]))
            return a, b, pool.stats
        finally:
            pool.close()

    a, b, stats = asyncio.run(main())
    assert a == reference[tasks[0].task_id] and b == reference[tasks[1].task_id]
    assert stats["created"] == 1 and stats["restores"] >= STEPS and stats["replayed_steps"] > stats["restores"]


def test_many_owners_never_exceed_the_pool_size(tasks, reference):
    before = jvms()
    peak = []

    async def main():
        pool = SimulatorPool(CFG, size=3)

        async def watch():
            while True:
                peak.append(len(jvms() - before))
                await asyncio.sleep(0.05)

        watcher = asyncio.ensure_future(watch())
        try:
            runs = [play(pool, (i, "trial0"), tasks[i % len(tasks)]) for i in range(12)]
            return await asyncio.gather(*runs), pool.stats
        finally:
            watcher.cancel()
            pool.close()

    results, stats = asyncio.run(main())
    for i, seen in enumerate(results):
        assert seen == reference[tasks[i % len(tasks)].task_id], i
    assert stats["created"] == 3 and max(peak) <= 3
    assert stats["waits"] > 0 and stats["restores"] > 0 and stats["resets"] == 12


def test_one_owner_keeps_its_simulator(tasks, reference):
    async def main():
        pool = SimulatorPool(CFG, size=2)
        try:
            seen = await play(pool, "only", tasks[2])
            return seen, pool.stats
        finally:
            pool.close()

    seen, stats = asyncio.run(main())
    assert seen == reference[tasks[2].task_id]
    assert stats["restores"] == 0 and stats["created"] == 1 and stats["steps"] == len(seen) - 1


def test_a_crashed_simulator_errors_only_its_call_and_is_rebuilt(tasks, reference):
    async def main():
        pool = SimulatorPool(CFG, size=2)
        try:
            _, obs_a = await pool.reset("a", tasks[3])
            _, obs_b = await pool.reset("b", tasks[4])
            act_a, act_b = choose(obs_a, 0), choose(obs_b, 0)
            victim = next(s for s in pool._slots if s.owner == "a")
            a_pid = victim.env._envs["twx"]._env._gateway.java_process.pid  # kill a's JVM only
            jvm = psutil.Process(a_pid)
            jvm.kill()
            try:
                jvm.wait(5)
            except psutil.NoSuchProcess:  # already reaped by its parent (py4j's Popen): gone
                pass
            err, obs_b = await asyncio.gather(pool.step("a", tasks[3], [], act_a),
                                              pool.step("b", tasks[4], [], act_b), return_exceptions=True)
            # a's episode goes on after the error: its state is restored on the rebuilt simulator
            again = await pool.step("a", tasks[3], [], act_a)
            return type(err), obs_b, again, pool.stats
        finally:
            pool.close()

    err, obs_b, again, stats = asyncio.run(main())
    assert err is EnvError
    assert obs_b == reference[tasks[4].task_id][1]
    assert again == reference[tasks[3].task_id][1]
    assert stats["rebuilt"] == 1 and stats["created"] == 2


def test_simulator_jvms_run_with_small_heap_flags(tasks):
    before = jvms()
    env = TwxEnv(CFG.game_params, CFG.step_limit)
    try:
        for task in tasks:
            _, obs = env.reset(task)
            for t in range(STEPS):
                obs = env.step(choose(obs, t))
        (pid,) = jvms() - before
        proc = psutil.Process(pid)
        assert all(flag in proc.cmdline() for flag in JVM_OPTIONS)
        # the JVM's defaults give ~83 MB fresh and over 200 MB after long use; the flags about 47 MB
        assert proc.memory_info().rss < 70 * 2**20
    finally:
        env.close()


def test_a_waiter_cancelled_after_being_handed_a_simulator_passes_it_on():
    async def main():
        pool = SimulatorPool(CFG, size=1)
        try:
            held = await pool._acquire("a")  # the only simulator (no JVM starts until a reset)
            first = asyncio.ensure_future(pool._acquire("b"))
            second = asyncio.ensure_future(pool._acquire("c"))
            await asyncio.sleep(0)  # both wait
            pool._release(held)  # handed to b ...
            first.cancel()  # ... which is cancelled before it runs
            got = await asyncio.wait_for(second, 5)  # lost, it would never come
            return got is held, first.cancelled()
        finally:
            pool.close()

    assert asyncio.run(main()) == (True, True)
