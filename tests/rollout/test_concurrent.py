"""Continuous batching on real TextWorldExpress games with the real HF actor and reflector.

The runner must give the lockstep loop's records for the same jobs, keep a slow episode from
holding the others, drop unfinished episodes on cancel, and confine an environment error to its
episode. Simulators come from the real bounded pool (`rollout/simulators.py`).
"""
import asyncio
import dataclasses

import pytest

from retro_dist.agents.async_policies import build_async_policies
from retro_dist.agents.policies import build_policies
from retro_dist.agents.prompts import PromptBuilder, actor_parts, actor_prompt
from retro_dist.config import ActorConfig, EnvConfig, ReflectorConfig, VLLMConfig
from retro_dist.envs.base import Task
from retro_dist.envs.registry import MixedEnv
from retro_dist.envs.twx import TwxEnv
from retro_dist.rollout.concurrent import ContinuousRunner, EpisodeJob
from retro_dist.rollout.episode import EpisodeIds, run_episodes
from retro_dist.rollout.simulators import SimulatorPool

pytestmark = pytest.mark.component
PARAMS = "numLocations=4,includeDoors=0,numDistractorItems=0"
ENV = EnvConfig(games=["twx/coin"], game_params=PARAMS, step_limit=3)
SEED = 41


@pytest.fixture(scope="module")
def tasks():
    """Coin tasks whose coin is out of sight, so first trials fail and reflections get written."""
    env = TwxEnv(PARAMS, step_limit=3)
    out = []
    try:
        for seed in env.seeds("coin", "train"):
            t = Task(f"twx/coin/train/{seed}", "twx/coin", seed, "train")
            if "take coin" not in env.reset(t)[1].valid_actions:
                out.append(t)
            if len(out) == 8:
                return out
    finally:
        env.close()


@pytest.fixture(scope="module")
def lockstep_envs():
    envs = [MixedEnv(ENV) for _ in range(4)]
    yield envs
    for e in envs:
        e.close()


def _configs(tiny_model, selection="generate"):
    return (ActorConfig(backend="hf", model=tiny_model, max_new_tokens=6, action_selection=selection,
                        max_prompt_tokens=160),  # small: long trajectories get cut from the left
            ReflectorConfig(backend="hf", model=tiny_model, max_new_tokens=8, temperature=1.0))


def _drive(tiny_model, jobs, concurrency, selection="generate", wrap=None, on_done_hook=None):
    """Run `jobs` through a ContinuousRunner in a fresh event loop; returns (outputs in finish order, stats)."""

    async def main():
        actor, reflector = await build_async_policies(*_configs(tiny_model, selection), VLLMConfig(), seed=0)
        pool = SimulatorPool(ENV, size=2)
        sims = wrap(pool) if wrap else pool
        runner = ContinuousRunner(actor, reflector, sims, concurrency=concurrency, trials=2, memory_size=3,
                                  step_limit=3, run_id="run", worker_id=0)
        queue, done = list(jobs), []

        async def next_job():
            return queue.pop(0) if queue else None

        def on_done(job, out):
            done.append((job, out))
            if on_done_hook:
                on_done_hook(runner, job, done)

        try:
            await runner.run(next_job, on_done)
        finally:
            pool.close()
            await actor.close()
        return done, runner.stats

    return asyncio.run(main())


def _comparable(rec):
    d = dataclasses.asdict(rec)
    for k in ("wall_seconds", "created_at", "behaviour_logprobs"):
        d.pop(k, None)
    return d


@pytest.mark.parametrize("selection", ["generate", "score_valid"])
def test_same_records_as_the_lockstep_loop(tiny_model, tasks, lockstep_envs, selection):
    actor, reflector = build_policies(*_configs(tiny_model, selection), VLLMConfig(), seed=0)
    ref = run_episodes(tasks[:4], lockstep_envs, EpisodeIds("run", 0, [0, 1, 2, 3], seed=SEED), actor, reflector,
                       trials=2, memory_size=3, step_limit=3)
    jobs = [EpisodeJob(t, i, SEED + i) for i, t in enumerate(tasks[:4])]
    done, stats = _drive(tiny_model, jobs, concurrency=3, selection=selection)
    trials = sorted((r for _, o in done for r in o.trials), key=lambda r: r.key)
    refls = sorted((r for _, o in done for r in o.reflections), key=lambda r: r.key)
    assert [_comparable(r) for r in trials] == [_comparable(r) for r in sorted(ref.trials, key=lambda r: r.key)]
    assert [_comparable(r) for r in refls] == [_comparable(r) for r in sorted(ref.reflections, key=lambda r: r.key)]
    assert len(refls) == 4 and all(r.trial == 0 for r in refls)  # every first trial failed and was reflected on
    for mine, theirs in zip(refls, sorted(ref.reflections, key=lambda r: r.key)):
        assert mine.behaviour_logprobs == pytest.approx(theirs.behaviour_logprobs, abs=1e-4)
    assert stats["rollout/episodes_done"] == 4 and stats["rollout/in_flight"] == 0
    assert stats["rollout/mean_concurrency"] > 1.5  # episodes really overlapped


def test_prompt_ids_are_the_tokenized_text(tiny_model, tasks):
    """Token-in/token-out: pieces tokenized once equal the whole text tokenized, cut included."""
    from retro_dist.agents.backends import load_tokenizer

    tok = load_tokenizer(tiny_model)
    env = TwxEnv(PARAMS, step_limit=6)
    try:
        instruction, obs = env.reset(tasks[0])
        steps = []
        for a in ["look around", "move north", "move south", "move east", "move west"]:
            steps.append((a, env.step(a).text))
    finally:
        env.close()
    memory = ["In the next trial I will go east"]
    for budget in (1000, 120, 40):
        builder = PromptBuilder(tok, budget)
        for n in range(len(steps) + 1):
            p = builder.build(actor_parts("twx/coin", instruction, memory, obs.text, steps[:n]))
            assert p.ids == tok(p).input_ids
            assert p == actor_prompt("twx/coin", instruction, memory, obs.text, steps[:n],
                                     lambda s: len(tok(s).input_ids) <= budget)
            assert len(p.ids) <= budget or p.endswith(f"{memory[-1]}\n>")  # over only once no step is left


class SlowTask:
    """The pool, but one task's simulator steps stall until every other episode has finished
    (a lockstep loop would wait on it: the wait then times out and the test fails)."""

    def __init__(self, pool, slow: Task, others: int):
        self.pool, self.slow, self.others = pool, slow, others
        self.others_done = asyncio.Event()
        self.finished_while_stalled = 0
        self.stalled = False

    async def reset(self, owner, task):
        return await self.pool.reset(owner, task)

    async def step(self, owner, task, history, action):
        if task == self.slow and not self.others_done.is_set():
            self.stalled = True
            await asyncio.wait_for(self.others_done.wait(), timeout=60)
        return await self.pool.step(owner, task, history, action)


def test_a_slow_episode_does_not_delay_the_others(tiny_model, tasks):
    jobs = [EpisodeJob(t, i, SEED + i) for i, t in enumerate(tasks[:7])]
    holder = {}

    def wrap(pool):
        holder["slow"] = SlowTask(pool, jobs[0].task, others=6)
        return holder["slow"]

    def hook(runner, job, done):
        slow = holder["slow"]
        if job.episode_id != 0 and slow.stalled:
            slow.finished_while_stalled += 1
        if len(done) == 6:
            slow.others_done.set()

    done, stats = _drive(tiny_model, jobs, concurrency=3, wrap=wrap, on_done_hook=hook)
    order = [job.episode_id for job, _ in done]
    assert order[-1] == 0 and sorted(order) == list(range(7))  # the slow one finished last ...
    assert holder["slow"].finished_while_stalled == 6  # ... and all six others finished while it stalled
    assert all(not o.errors for _, o in done)


class CrashingTask:
    """The pool, but one task's second step raises, as a crashed simulator would."""

    def __init__(self, pool, bad: Task):
        self.pool, self.bad = pool, bad

    async def reset(self, owner, task):
        return await self.pool.reset(owner, task)

    async def step(self, owner, task, history, action):
        if task == self.bad and len(history) == 1:
            raise RuntimeError("simulator crashed")
        return await self.pool.step(owner, task, history, action)


def test_an_env_error_errors_only_its_episode(tiny_model, tasks):
    jobs = [EpisodeJob(t, i, SEED + i) for i, t in enumerate(tasks[:3])]
    done, stats = _drive(tiny_model, jobs, concurrency=3, wrap=lambda p: CrashingTask(p, tasks[1]))
    out = {job.episode_id: o for job, o in done}
    assert [t.error for t in out[1].trials] == ["RuntimeError: simulator crashed"]
    assert out[1].errors == [f"{tasks[1].task_id} trial 0: RuntimeError: simulator crashed"]
    assert not out[1].reflections  # no reflection on an errored trial
    for e in (0, 2):
        assert [t.trial for t in out[e].trials] == [0, 1] and not out[e].errors
    assert stats["rollout/episodes_errored"] == 1


def test_cancel_drops_unfinished_episodes(tiny_model, tasks):
    jobs = [EpisodeJob(t, i, SEED + i) for i, t in enumerate(tasks[:6])]
    seen = []

    def hook(runner, job, done):
        seen.append(job.episode_id)
        runner.cancel()  # stop at the first finished episode

    done, stats = _drive(tiny_model, jobs, concurrency=3, on_done_hook=hook)
    assert len(done) == 1 and len(seen) == 1  # the two other in-flight episodes produced nothing
    assert stats["rollout/in_flight"] == 0 and stats["rollout/episodes_done"] == 1
    # the unfinished ones rerun later under the same keys
    rerun, _ = _drive(tiny_model, jobs[1:3], concurrency=2)
    keys = sorted(r.key for _, o in rerun for r in o.trials)
    assert keys == ["run/w0/e1/t0", "run/w0/e1/t1", "run/w0/e2/t0", "run/w0/e2/t1"]



def test_cancel_from_another_thread_and_a_failing_consumer(tiny_model, tasks):
    import threading

    jobs = [EpisodeJob(tasks[i % 8], i, SEED + i) for i in range(40)]

    def from_thread(runner, job, done):
        if len(done) == 1:
            t = threading.Thread(target=runner.cancel)
            t.start()
            t.join()

    done, stats = _drive(tiny_model, jobs, concurrency=2, on_done_hook=from_thread)
    assert 1 <= len(done) < 40 and stats["rollout/in_flight"] == 0

    def failing(runner, job, done):
        raise OSError("replay store is full")

    with pytest.raises(OSError, match="replay store is full"):  # the run stops with the consumer's error
        _drive(tiny_model, jobs[:4], concurrency=2, on_done_hook=failing)

@pytest.mark.integration
@pytest.mark.vllm
def test_vllm_async_engine_gives_the_lockstep_records(tiny_model, tasks, lockstep_envs):
    """vLLM seeds every request: the sync engine in lockstep and AsyncLLM under continuous batching
    write the same trials and the same sampled reflections for the same jobs."""
    pytest.importorskip("vllm")
    import gc

    actor_cfg = ActorConfig(backend="vllm", model=tiny_model, max_new_tokens=6, max_prompt_tokens=160)
    refl_cfg = ReflectorConfig(backend="vllm", model=tiny_model, max_new_tokens=8, temperature=1.0)
    actor, reflector = build_policies(actor_cfg, refl_cfg, VLLMConfig(), seed=0)
    ref = run_episodes(tasks[:4], lockstep_envs, EpisodeIds("run", 0, [0, 1, 2, 3], seed=SEED), actor, reflector,
                       trials=2, memory_size=3, step_limit=3)
    actor.backend.close()
    del actor, reflector
    gc.collect()

    async def main():
        actor, reflector = await build_async_policies(actor_cfg, refl_cfg, VLLMConfig(), seed=0)
        pool = SimulatorPool(ENV, size=2)
        runner = ContinuousRunner(actor, reflector, pool, concurrency=4, trials=2, memory_size=3, step_limit=3,
                                  run_id="run", worker_id=0)
        queue, done = [EpisodeJob(t, i, SEED + i) for i, t in enumerate(tasks[:4])], []

        async def next_job():
            return queue.pop(0) if queue else None

        try:
            await runner.run(next_job, lambda job, out: done.append(out))
        finally:
            pool.close()
            await actor.close()
        return done

    done = asyncio.run(main())
    key = lambda r: r.key  # noqa: E731
    trials = sorted((r for o in done for r in o.trials), key=key)
    refls = sorted((r for o in done for r in o.reflections), key=key)
    assert [_comparable(r) for r in trials] == [_comparable(r) for r in sorted(ref.trials, key=key)]
    assert [_comparable(r) for r in refls] == [_comparable(r) for r in sorted(ref.reflections, key=key)]
    assert len(refls) == 4
    for mine, theirs in zip(refls, sorted(ref.reflections, key=key)):
        assert mine.behaviour_logprobs == pytest.approx(theirs.behaviour_logprobs, abs=1e-3)
