"""Async language-model backends for continuous batching: one request per episode step, many in flight.

- `AsyncVLLMEngine`: vLLM's `AsyncLLM`; the engine schedules whatever requests are in flight
  (continuous batching), so an episode waits for its own tokens only.
- `HFBatcher`: a request-batching queue in front of `HFBackend`: requests that arrive while a batch
  runs are gathered into the next batched call, which runs in a worker thread off the event loop.
- `AsyncOpenAIClient`: an async HTTP client for an OpenAI-compatible `/v1/completions` endpoint.

Like the sync backends, generations carry the sampled token ids and raw log-probs, and every
request takes its own seed, so what an episode samples does not depend on what shares its batch.
Each returns `Generation.version`: the adapter version that really sampled it, since an adapter may
be loaded while other episodes' requests are in flight.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

from retro_dist.agents.backends import (Adapter, BackendError, EngineDead, EngineRebuildFailed, Generation, HFBackend,
                                        engine_kwargs, load_tokenizer)
from retro_dist.agents.openai_backend import AsyncOpenAIClient  # noqa: F401 (its home was here)
from retro_dist.config import ReflectorConfig, VLLMConfig


class AsyncVLLMEngine:
    """One `AsyncLLM` serving base-model requests and, per request, the newest LoRA adapter.

    Build it with `await AsyncVLLMEngine.start(...)` inside the event loop that will use it (the
    engine's output handler is a task of that loop). If the engine's process dies, the requests in
    flight raise `EngineDead`, one rebuild starts (same arguments; the current adapter served again and
    its probe checked; counted in `rebuilds`), and new requests wait for it. A rebuild that fails
    raises `EngineRebuildFailed` to every waiting request: the worker stops."""

    def __init__(self, llm, tokenizer, kwargs: Optional[dict] = None):
        self.llm = llm
        self.tokenizer = tokenizer
        self._kwargs = kwargs
        self._ids = itertools.count()
        self._adapter_dir = Path(tempfile.mkdtemp(prefix="retro_dist_adapters_"))
        self._lora = None  # (LoRARequest, version) of the newest adapter
        self._adapter: Optional[Adapter] = None
        self._in_flight: dict[int, int] = {}  # adapter version -> requests still using its folder
        self.version = -1
        self._closed = False
        # On the CPU build a prompt_logprobs request batched with other requests crashes the engine
        # in the LoRA logits kernel (punica_cpu add_lora_logits: "einsum(): subscript b has size 10
        # ... previously seen size 49"). There, scoring requests run one at a time with nothing else
        # in flight; a probe or action score then stalls new generations for one request's time.
        import torch

        self._exclusive_scoring = not torch.cuda.is_available()
        self._score_lock = asyncio.Lock()
        self._no_scoring = asyncio.Event()
        self._no_scoring.set()
        self._generating = 0
        self._gens_idle = asyncio.Event()
        self._gens_idle.set()
        self.rebuilds = 0
        self._engine_id = 0  # which engine a request went to: one death, one rebuild
        self._serving = asyncio.Event()  # cleared while a rebuild runs
        self._serving.set()
        self._rebuild_task: Optional[asyncio.Task] = None
        self._fatal: Optional[BaseException] = None

    @classmethod
    async def start(cls, model: str, engine: VLLMConfig, lora: Optional[ReflectorConfig], seed: int):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(engine.kv_cache_gib))
        kwargs = dict(engine_kwargs(model, engine, lora, seed), disable_log_stats=True)
        return cls(_async_llm(kwargs), load_tokenizer(model), kwargs)

    def load_adapter(self, adapter: Adapter) -> None:
        """Write the adapter as a peft folder; requests submitted from now on use it (cheap, sync)."""
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        path = self._adapter_dir / f"v{adapter.version}"
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in adapter.tensors.items()}, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps(adapter.peft_config))
        # A new name + int id per version, so the engine never serves a cached older adapter.
        self._lora = (LoRARequest(f"reflector-v{adapter.version}", adapter.version + 1, str(path)), adapter.version)
        self._adapter = adapter
        self.version = adapter.version
        self._prune()

    def _prune(self) -> None:
        """Remove old adapter folders, but not one a queued request may still have to load."""
        for old in self._adapter_dir.glob("v*"):
            v = int(old.name[1:])
            if v != self.version and not self._in_flight.get(v):
                shutil.rmtree(old, ignore_errors=True)

    async def _until_serving(self) -> None:
        await self._serving.wait()
        if self._fatal is not None:
            raise self._fatal

    async def _final(self, prompt_ids: Sequence[int], params, use_adapter: bool) -> tuple[object, int]:
        """Run one request to completion; returns (RequestOutput, adapter version it used or -1)."""
        from vllm.sampling_params import RequestOutputKind

        from retro_dist.agents.engine_health import engine_is_dead

        params.output_kind = RequestOutputKind.FINAL_ONLY
        lora, version = self._lora if (use_adapter and self._lora is not None) else (None, -1)
        self._in_flight[version] = self._in_flight.get(version, 0) + 1
        engine_id = self._engine_id
        try:
            final = None
            async for out in self.llm.generate({"prompt_token_ids": list(prompt_ids)}, params,
                                               f"req-{next(self._ids)}", lora_request=lora):
                final = out
        except asyncio.CancelledError:
            raise  # the engine aborts the request itself
        except Exception as err:  # the episode errors, the runner goes on
            reason = f"{type(err).__name__}: {err}"
            if not (engine_is_dead(err, self.llm.engine_core) or self.llm.errored):
                raise BackendError(f"vLLM request failed: {reason}") from err
            self._start_rebuild(engine_id)
            raise EngineDead(f"vLLM engine died ({reason}); rebuilding, its requests are lost") from err
        finally:
            self._in_flight[version] -= 1
            if 0 <= version != self.version and not self._in_flight[version]:
                self._prune()
        return final, version

    def _start_rebuild(self, engine_id: int) -> None:
        """One rebuild per dead engine, however many of its requests report the death."""
        if engine_id == self._engine_id and (self._rebuild_task is None or self._rebuild_task.done()):
            self._serving.clear()
            self._rebuild_task = asyncio.get_running_loop().create_task(self._rebuild())

    async def _rebuild(self) -> None:
        from retro_dist.agents.engine_health import check_rebuilt, has_probe

        try:
            try:
                self.llm.shutdown()
            except Exception:  # a dead engine may fail to shut down cleanly; its processes are gone
                pass
            await self._gens_idle.wait()  # the dead engine's requests have all raised
            # Built on the loop (AsyncLLM binds to it); other episodes cannot use a dead engine anyway.
            self.llm = _async_llm(self._kwargs)
            self._engine_id += 1
            self.rebuilds += 1
            if has_probe(self._adapter):
                probe = self._adapter.extra["probe"]
                check_rebuilt(self._adapter, await self._score(probe["prompt_ids"], probe["completion_ids"], True))
        except Exception as err:
            self._fatal = err if isinstance(err, EngineRebuildFailed) else EngineRebuildFailed(
                f"vLLM engine rebuild failed: {type(err).__name__}: {err}")
        finally:
            self._serving.set()

    async def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, temperature: float,
                       stop_at_newline: bool = False, use_adapter: bool = True, seed: int = 0) -> Generation:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, logprobs=0, seed=seed,
                                stop=["\n"] if stop_at_newline else None, include_stop_str_in_output=True)
        await self._until_serving()
        await self._no_scoring.wait()
        self._generating += 1
        self._gens_idle.clear()
        try:
            out, version = await self._final(prompt_ids, params, use_adapter)
        finally:
            self._generating -= 1
            if not self._generating:
                self._gens_idle.set()
        c = out.outputs[0]
        ids = list(c.token_ids)
        lps = [step[t].logprob for t, step in zip(ids, c.logprobs)]
        return Generation(list(prompt_ids), ids, lps, c.text, version=version)

    async def score(self, prompt_ids: Sequence[int], completion_ids: Sequence[int],
                    use_adapter: bool = True) -> list[float]:
        """log P(completion_ids[t] | prompt, completion_ids[:t]) per token."""
        await self._until_serving()
        return await self._score(prompt_ids, completion_ids, use_adapter)

    async def _score(self, prompt_ids: Sequence[int], completion_ids: Sequence[int], use_adapter: bool) -> list[float]:
        from vllm import SamplingParams

        full = list(prompt_ids) + list(completion_ids)
        params = SamplingParams(max_tokens=1, prompt_logprobs=0)
        if not self._exclusive_scoring:
            out, _ = await self._final(full, params, use_adapter)
        else:
            async with self._score_lock:  # one scoring request at a time, with no generation in flight
                self._no_scoring.clear()
                try:
                    await self._gens_idle.wait()
                    out, _ = await self._final(full, params, use_adapter)
                finally:
                    self._no_scoring.set()
        return [out.prompt_logprobs[i][full[i]].logprob for i in range(len(prompt_ids), len(full))]

    async def score_candidates(self, prompt_ids: Sequence[int], candidates: Sequence[list[int]]) -> list[float]:
        """Σ log P(candidate | prompt) under the base model, one request per candidate, all in flight at once.
        (vLLM skips reading the prefix cache for requests with prompt_logprobs, so each recomputes the prompt.)"""
        lps = await asyncio.gather(*(self.score(prompt_ids, c, use_adapter=False) for c in candidates))
        return [float(sum(lp)) for lp in lps]

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._rebuild_task is not None and not self._rebuild_task.done():
                self._rebuild_task.cancel()
            self.llm.shutdown()
            shutil.rmtree(self._adapter_dir, ignore_errors=True)


def _async_llm(kwargs: dict):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))


class HFBatcher:
    """Request-batching queue in front of an `HFBackend` (one model, one batch at a time).

    Requests wait in a queue; whenever the model is free, every waiting request of the same kind
    (and sampling parameters) goes into one batched call, run in a worker thread so the event loop
    keeps stepping simulators meanwhile. Rows are seeded one by one, so a request's sample does not
    depend on its batch. Adapter loads take the model lock: they never land mid-batch. If a batch
    raises, its requests are asked again one by one: only the one that raises fails.
    """

    def __init__(self, backend: HFBackend, max_batch: int = 64):
        self.backend = backend
        self.tokenizer = backend.tokenizer
        self.max_batch = max_batch
        self.version = -1
        self._lock = threading.Lock()  # the model: a batch or an adapter load, never both
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="hf-batcher")
        self._queue: list[tuple[tuple, tuple, asyncio.Future]] = []  # (kind key, args, future)
        self._drainer: Optional[asyncio.Task] = None
        self.batches = 0
        self.rows = 0

    def load_adapter(self, adapter: Adapter) -> None:
        with self._lock:
            self.backend.load_adapter(adapter)
            self.version = adapter.version

    async def _submit(self, key: tuple, args: tuple):
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((key, args, fut))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.get_running_loop().create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            await asyncio.sleep(0)  # requests made in this same loop tick join the batch
            key = self._queue[0][0]
            batch = [r for r in self._queue if r[0] == key][: self.max_batch]
            taken = {id(r) for r in batch}
            self._queue = [r for r in self._queue if id(r) not in taken]
            live = [r for r in batch if not r[2].done()]  # a cancelled episode's request is dropped
            if not live:
                continue
            try:
                results = await loop.run_in_executor(self._pool, self._run, key, [r[1] for r in live])
            except Exception as err:
                if len(live) == 1:
                    results = [BackendError(f"HF request failed: {type(err).__name__}: {err}")]
                else:  # ask each request alone, so one that raises fails only its own episode
                    results = [await loop.run_in_executor(self._pool, self._run_alone, key, r[1]) for r in live]
            for (_, _, fut), res in zip(live, results):
                if not fut.done():
                    if isinstance(res, BaseException):
                        fut.set_exception(res)
                    else:
                        fut.set_result(res)

    def _run_alone(self, key: tuple, row: tuple):
        """In the worker thread: one request by itself; its result, or its error as a BackendError."""
        try:
            return self._run(key, [row])[0]
        except Exception as err:
            return BackendError(f"HF request failed: {type(err).__name__}: {err}")

    def _run(self, key: tuple, rows: list[tuple]) -> list:
        """In the worker thread: one batched backend call for `rows` of kind `key`."""
        with self._lock:
            self.batches += 1
            self.rows += len(rows)
            if key[0] == "generate":
                _, max_new, temperature, stop, use_adapter = key
                gens = self.backend.generate([r[0] for r in rows], max_new, temperature, stop_at_newline=stop,
                                             use_adapter=use_adapter, seed=[r[1] for r in rows])
                for g in gens:
                    g.version = self.version if use_adapter else -1
                return gens
            if key[0] == "candidates":
                return self.backend.score_candidates([r[0] for r in rows], [r[1] for r in rows])
            return [self.backend.score(r[0], r[1], use_adapter=key[1]) for r in rows]

    async def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, temperature: float,
                       stop_at_newline: bool = False, use_adapter: bool = True, seed: int = 0) -> Generation:
        key = ("generate", max_new_tokens, float(temperature), stop_at_newline, use_adapter)
        return await self._submit(key, (list(prompt_ids), seed))

    async def score(self, prompt_ids: Sequence[int], completion_ids: Sequence[int],
                    use_adapter: bool = True) -> list[float]:
        return await self._submit(("score", use_adapter), (list(prompt_ids), list(completion_ids)))

    async def score_candidates(self, prompt_ids: Sequence[int], candidates: Sequence[list[int]]) -> list[float]:
        return await self._submit(("candidates",), (list(prompt_ids), [list(c) for c in candidates]))

    async def close(self) -> None:
        if self._drainer is not None and not self._drainer.done():
            self._drainer.cancel()
        for _, _, fut in self._queue:
            fut.cancel()
        self._queue = []
        self._pool.shutdown(wait=True)  # a batch in the thread finishes; its results are dropped
