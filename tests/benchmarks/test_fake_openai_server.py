"""The benchmarks' fake OpenAI-compatible server, checked through the project's real clients."""
import asyncio
import time

from benchmarks.fake_openai_server import FakeOpenAIServer, serve_in_thread
from retro_dist.agents.async_backends import AsyncOpenAIClient
from retro_dist.agents.backends import OpenAIBackend, check_endpoint
from retro_dist.config import ActorConfig


def cfg(url: str) -> ActorConfig:
    return ActorConfig(backend="openai", base_url=url, model="fake")


def test_batched_request_answers_every_prompt_after_the_latency():
    with serve_in_thread(latency_s=0.2, reply="move north", model="fake") as server:
        assert check_endpoint(server.base_url) == ["fake"]
        t0 = time.perf_counter()
        texts = OpenAIBackend(cfg(server.base_url)).generate_text(["a", "b", "c"], 8, 0.0)
        dt = time.perf_counter() - t0
    assert texts == ["move north"] * 3
    assert 0.2 <= dt < 0.6
    assert server.requests == 3 and server.prompts == 3  # one request per prompt, sent side by side


def test_concurrent_requests_overlap_instead_of_queueing():
    async def main():
        server = FakeOpenAIServer(latency_s=0.3)
        url = await server.start()
        client = AsyncOpenAIClient(cfg(url), max_connections=32)
        try:
            t0 = time.perf_counter()
            out = await asyncio.gather(*(client.generate_text(f"p{i}", 8, 0.0, seed=i) for i in range(32)))
            return out, time.perf_counter() - t0, server.max_in_flight
        finally:
            await client.close()
            await server.stop()

    out, dt, peak = asyncio.run(main())
    assert out == ["look around"] * 32
    assert dt < 1.5  # 32 × 0.3 s one after another would be 9.6 s
    assert peak == 32


def test_heavy_tail_slows_the_chosen_fraction_and_a_batch_waits_for_its_slowest():
    async def main():
        server = FakeOpenAIServer(latency_s=0.005, tail_fraction=0.25, tail_factor=100.0, seed=3)
        url = await server.start()
        client = AsyncOpenAIClient(cfg(url), max_connections=40)

        async def timed(i):
            t0 = time.perf_counter()
            await client.generate_text("p", 8, 0.0, seed=i)
            return time.perf_counter() - t0

        try:
            return await asyncio.gather(*(timed(i) for i in range(40))), server.slow_prompts
        finally:
            await client.close()
            await server.stop()

    times, slow = asyncio.run(main())
    assert 3 <= slow <= 20  # 25 % of 40, loosely
    assert sum(t >= 0.5 for t in times) == slow  # the slow ones took 100 × 5 ms, the rest far less
    with serve_in_thread(latency_s=0.005, tail_fraction=1.0, tail_factor=100.0) as server:
        t0 = time.perf_counter()
        OpenAIBackend(cfg(server.base_url)).generate_text(["a", "b"], 8, 0.0)
        assert time.perf_counter() - t0 >= 0.5
