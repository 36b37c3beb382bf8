"""Rollout orchestration benchmark: one worker's continuous batching against a fixed-latency server.

    python -m benchmarks.rollout --json benchmarks/results/rollout.json [--quick]

One worker = `ContinuousRunner` (rollout/concurrent.py) with the async OpenAI-compatible actor
(agents/async_policies.py) pointed at `benchmarks/fake_openai_server.py` (a child process on
loopback that answers every prompt after L seconds, with unbounded concurrency) and real
TextWorldExpress `coin` games through a `SimulatorPool`. One trial per episode, reflections off
(no reflector), so no local model is needed. The server always answers "look around", which never
wins, and the step limit is S: every episode takes exactly S actor steps (checked).

Figures:
- `rollout_vs_ideal_c<C>`: episodes/s ÷ C/(S·L) for C ∈ {1, 16, 64, 256} episodes in flight.
- `env_step_seconds`: one simulator's own cost per actor step (its reset amortised), measured alone;
  L is chosen so that it is far below 20 % of a step.
- `worker_rss_mb_per_episode`: peak RSS of this process plus its simulator JVMs during the C=256
  run, ÷ C (the server's process is not counted); `rss_by_pool_size` repeats it for other pool sizes.
- `continuous_vs_lockstep_tail`: with a heavy tail (5 % of prompts 10× slower), episodes/s of the
  continuous runner over the lockstep loop (`rollout/episode.py:run_episodes`, one simulator per
  episode, the sync OpenAI backend sending one batched request per step, which returns when its
  slowest prompt does), both at the same C.
- `client_only_vs_ideal_c<C>` (largest C): the async OpenAI client alone (S sequential requests per
  "episode", no simulators, no prompts): the ceiling the HTTP client puts on the runner.

The client (`AsyncOpenAIClient`) runs on aiohttp. It ran on httpx until this benchmark measured
0.25 of ideal at C=256 with it (the httpx client alone: 0.26), httpcore's pool costing milliseconds
of CPU per request at a few hundred in flight (encode/httpx#3215).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil

from benchmarks import write_json
from benchmarks.fake_openai_server import spawn
from retro_dist.agents.async_backends import AsyncOpenAIClient
from retro_dist.agents.async_policies import AsyncActorPolicy
from retro_dist.agents.backends import OpenAIBackend
from retro_dist.agents.policies import ActorPolicy
from retro_dist.config import ActorConfig, EnvConfig
from retro_dist.envs.registry import MixedEnv
from retro_dist.envs.twx import TwxFamily
from retro_dist.rollout.concurrent import ContinuousRunner, EpisodeJob
from retro_dist.rollout.episode import EpisodeIds, run_episodes
from retro_dist.rollout.simulators import SimulatorPool

PARAMS = "numLocations=4,includeDoors=0,numDistractorItems=0"
REPLY = "look around"  # never wins a coin game: every episode runs to the step limit


class RssProbe:
    """Peak RSS of this process and its descendants, except the ones in `exclude` (the server)."""

    def __init__(self, exclude: set[int], every_s: float = 0.2):
        self.exclude, self.every_s = exclude, every_s
        self.peak_mb, self.peak_jvms, self.jvm_mb = 0.0, 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        me = psutil.Process(os.getpid())
        total, jvm = me.memory_info().rss, []
        for child in me.children(recursive=True):
            if child.pid in self.exclude:
                continue
            try:
                rss = child.memory_info().rss
            except psutil.Error:  # exited meanwhile
                continue
            total += rss
            if child.name() == "java":
                jvm.append(rss / 2**20)
        if total / 2**20 > self.peak_mb:
            self.peak_mb, self.peak_jvms, self.jvm_mb = total / 2**20, len(jvm), jvm

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def __enter__(self) -> "RssProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.sample()
        self._stop.set()
        self._thread.join()


def actor_cfg(url: str) -> ActorConfig:
    return ActorConfig(backend="openai", base_url=url, model="fake", temperature=0.0, request_timeout_s=120.0)


def check_episode(trials, steps: int) -> None:
    for rec in trials:
        if rec.error or rec.success or len(rec.actions) != steps:
            raise RuntimeError(f"benchmark episode {rec.key} did not run exactly {steps} steps: "
                               f"error={rec.error} success={rec.success} steps={len(rec.actions)}")


async def continuous(url: str, cfg: EnvConfig, tasks, c: int, steps: int, episodes: int, simulators: int,
                     probe: RssProbe | None = None) -> dict:
    """Episodes/s of one worker's ContinuousRunner with C in flight and a pool of `simulators`."""
    acfg = actor_cfg(url)
    # the client caps connections at 64 by default; C episodes in flight need C
    actor = AsyncActorPolicy(acfg, AsyncOpenAIClient(acfg, max_connections=c))
    pool = SimulatorPool(cfg, simulators)
    try:
        # start every simulator (JVM) before the clock: the pool builds them lazily
        await asyncio.gather(*(pool.reset(("warm", i), tasks[i % len(tasks)]) for i in range(simulators)))
        warm = dict(pool.stats)
        runner = ContinuousRunner(actor, None, pool, concurrency=c, trials=1, memory_size=0, step_limit=steps,
                                  run_id="bench", worker_id=0)
        jobs = iter(EpisodeJob(tasks[i % len(tasks)], episode_id=i, seed=i) for i in range(episodes))
        done = []

        async def next_job():
            return next(jobs, None)

        def on_done(job, out):
            check_episode(out.trials, steps)
            done.append(job.episode_id)

        t0 = time.perf_counter()
        if probe is None:
            await runner.run(next_job, on_done)
        else:
            with probe:
                await runner.run(next_job, on_done)
        dt = time.perf_counter() - t0
        assert len(done) == episodes, (len(done), episodes)
        stats = {k: v - warm.get(k, 0) if k not in ("size", "created") else v for k, v in pool.stats.items()}
        return {"episodes_per_s": episodes / dt, "seconds": dt, "pool": stats}
    finally:
        await actor.close()
        pool.close()


def lockstep(url: str, cfg: EnvConfig, tasks, c: int, steps: int, episodes: int) -> dict:
    """Episodes/s of today's lockstep loop: batches of C, one simulator each, one request per step."""
    acfg = actor_cfg(url)
    actor = ActorPolicy(acfg, OpenAIBackend(acfg))
    envs = [MixedEnv(cfg) for _ in range(c)]
    try:
        with ThreadPoolExecutor(8) as ex:  # start the JVMs before the clock
            list(ex.map(lambda e: e.reset(tasks[0]), envs))
        t0 = time.perf_counter()
        for b in range(0, episodes, c):
            batch = [tasks[i % len(tasks)] for i in range(b, b + c)]
            out = run_episodes(batch, envs, EpisodeIds("bench", 0, list(range(b, b + c)), seed=b), actor, None,
                               trials=1, memory_size=0, step_limit=steps)
            check_episode(out.trials, steps)
        dt = time.perf_counter() - t0
        return {"episodes_per_s": episodes / dt, "seconds": dt}
    finally:
        for e in envs:
            e.close()


async def client_only(url: str, c: int, steps: int, episodes: int) -> float:
    """Episodes/s of the async OpenAI client alone: C loops of S sequential requests."""
    acfg = actor_cfg(url)
    client = AsyncOpenAIClient(acfg, max_connections=c)
    todo = iter(range(episodes))

    async def slot():
        for _ in todo:
            for t in range(steps):
                await client.generate_text("x" * 1500, acfg.max_new_tokens, 0.0, seed=t)

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(slot() for _ in range(c)))
    finally:
        await client.close()
    return episodes / (time.perf_counter() - t0)


def env_step_seconds(cfg: EnvConfig, tasks, steps: int, episodes: int = 100) -> float:
    """One simulator's own cost per actor step: reset + S steps of the benchmark's action, ÷ S."""
    env = MixedEnv(cfg)
    try:
        env.reset(tasks[0])  # JVM start-up and first game load are not per-step costs
        t0 = time.perf_counter()
        for i in range(episodes):
            env.reset(tasks[i % len(tasks)])
            for _ in range(steps):
                env.step(REPLY)
        return (time.perf_counter() - t0) / (episodes * steps)
    finally:
        env.close()


def run(args) -> dict:
    s, lat = args.steps, args.latency
    cfg = EnvConfig(games=["twx/coin"], game_params=PARAMS, step_limit=s)
    fam = TwxFamily(cfg)
    tasks = fam.tasks("coin", "train", 300)
    fam._probe.close()
    res: dict = {"latency_s": lat, "steps_per_episode": s, "simulators": args.simulators,
                 "trials_per_episode": 1, "reflections": False}
    res["env_step_seconds"] = env_step_seconds(cfg, tasks, s)
    res["env_share_of_step"] = res["env_step_seconds"] / (lat + res["env_step_seconds"])
    print(f"env step {1000 * res['env_step_seconds']:.2f} ms = {100 * res['env_share_of_step']:.2f} % of a "
          f"step at L={lat}s; S={s}, pool of {args.simulators} simulators, 1 trial, no reflections")
    top = max(args.concurrency)
    print(f"{'C':>5} {'episodes':>8} {'eps/s':>8} {'ideal':>8} {'ratio':>6} {'restores':>8} {'MB/ep':>6}")
    with spawn(lat, reply=REPLY) as (url, server_pid):
        for c in args.concurrency:
            n = max(min(args.rounds * c, args.max_episodes), 2)
            probe = RssProbe({server_pid}) if c == top else None
            r = asyncio.run(continuous(url, cfg, tasks, c, s, n, args.simulators, probe))
            ideal = c / (s * lat)
            res[f"rollout_vs_ideal_c{c}"] = r["episodes_per_s"] / ideal
            res[f"episodes_per_s_c{c}"] = r["episodes_per_s"]
            res[f"pool_c{c}"] = r["pool"]
            mb = f"{probe.peak_mb / c:6.2f}" if probe else ""
            print(f"{c:>5} {n:>8} {r['episodes_per_s']:>8.2f} {ideal:>8.2f} "
                  f"{r['episodes_per_s'] / ideal:>6.2f} {r['pool']['restores']:>8} {mb}")
            if probe is not None:
                res["worker_rss_mb"] = probe.peak_mb
                res["worker_rss_mb_per_episode"] = probe.peak_mb / c
                res["jvms_at_peak"] = probe.peak_jvms
                res["jvm_rss_mb_mean"] = sum(probe.jvm_mb) / max(1, len(probe.jvm_mb))
        print(f"      RSS at C={top}: {res['worker_rss_mb']:.0f} MB in all ({res['jvms_at_peak']} JVMs, "
              f"{res['jvm_rss_mb_mean']:.0f} MB each)")
        res[f"client_only_vs_ideal_c{top}"] = asyncio.run(client_only(url, top, s, top)) / (top / (s * lat))
        print(f"      client alone at C={top}: {res[f'client_only_vs_ideal_c{top}']:.2f} of ideal")
        res["rss_by_pool_size"] = {}
        for p in args.pool_sweep:
            probe = RssProbe({server_pid})
            n = max(min(args.rounds * top, args.max_episodes), 2)
            r = asyncio.run(continuous(url, cfg, tasks, top, s, n, p, probe))
            res["rss_by_pool_size"][str(p)] = {"rss_mb_per_episode": probe.peak_mb / top,
                                               "rollout_vs_ideal": r["episodes_per_s"] / (top / (s * lat)),
                                               "restores": r["pool"]["restores"]}
            print(f"      pool {p:>3} at C={top}: {probe.peak_mb / top:.2f} MB/episode, "
                  f"{r['episodes_per_s'] / (top / (s * lat)):.2f} of ideal")
    tc, tl, n = args.tail_concurrency, args.tail_latency, args.tail_rounds * args.tail_concurrency
    with spawn(tl, tail_fraction=0.05, tail_factor=10.0, reply=REPLY) as (url, _):
        cont = asyncio.run(continuous(url, cfg, tasks, tc, s, n, args.simulators))
        lock = lockstep(url, cfg, tasks, tc, s, n)
    res.update(tail_latency_s=tl, tail_fraction=0.05, tail_factor=10.0, tail_concurrency=tc, tail_episodes=n,
               tail_continuous_episodes_per_s=cont["episodes_per_s"],
               tail_lockstep_episodes_per_s=lock["episodes_per_s"],
               continuous_vs_lockstep_tail=cont["episodes_per_s"] / lock["episodes_per_s"])
    print(f"tail (5 % of prompts 10x slower, L={tl}s, C={tc}, {n} episodes): continuous "
          f"{cont['episodes_per_s']:.2f} eps/s, lockstep {lock['episodes_per_s']:.2f} eps/s -> "
          f"{res['continuous_vs_lockstep_tail']:.2f}x")
    return res


def main() -> None:
    p = argparse.ArgumentParser(description="rollout orchestration benchmark (continuous batching)")
    p.add_argument("--json", required=True, help="where to write the figures")
    p.add_argument("--latency", type=float, default=2.0, help="L: server seconds per prompt")
    p.add_argument("--steps", type=int, default=5, help="S: actor steps per episode")
    p.add_argument("--simulators", type=int, default=16, help="simulator pool size of the worker")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--rounds", type=int, default=2, help="episodes per run = rounds × C (at least 2) ...")
    p.add_argument("--max-episodes", type=int, default=256, help="... and at most this many")
    p.add_argument("--pool-sweep", type=int, nargs="*", default=[4, 64], help="other pool sizes at the largest C")
    p.add_argument("--tail-latency", type=float, default=0.2)
    p.add_argument("--tail-concurrency", type=int, default=16)
    p.add_argument("--tail-rounds", type=int, default=4)
    p.add_argument("--quick", action="store_true", help="a fast smoke run: small C, short latency")
    args = p.parse_args()
    if args.quick:
        args.latency, args.concurrency, args.pool_sweep, args.tail_rounds = 0.2, [1, 16], [], 2
    res = run(args)
    write_json(args.json, res)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
