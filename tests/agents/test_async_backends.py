"""Async backends: the HF request-batching queue, the async OpenAI client against a real HTTP server
on loopback, and vLLM's AsyncLLM (integration) serving the actor and a hot-swapped LoRA reflector."""
import asyncio
import gc
import json

import numpy as np
import pytest

from retro_dist.agents.async_backends import AsyncOpenAIClient, HFBatcher
from retro_dist.agents.async_policies import AsyncActorPolicy, build_async_policies
from retro_dist.agents.backends import Adapter, BackendError, HFBackend
from retro_dist.config import ActorConfig, ReflectorConfig, VLLMConfig

PROMPTS = ["Game: twx/coin\nTask: find the coin\nYou are in the kitchen.\n>",
           "Game: twx/coin\nTask: find the coin\nYou are in the pantry. To the North you see the kitchen.\n>",
           "Game: twx/coin\nTask: find the coin\nThe trial above failed with return 0.00.\nTrial 0: In the next trial I will"]


def make_adapter(tiny_model, version: int, cfg: ReflectorConfig):
    """A LoRA adapter with moved weights (as training would leave it), and the peft model it came from."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    net = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                         LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                    target_modules=list(cfg.lora_target_modules))).eval()
    gen = torch.Generator().manual_seed(version)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    peft_cfg = json.loads(json.dumps(net.peft_config["default"].to_dict(),
                                     default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v)))
    tensors = {k: v.detach().clone() for k, v in get_peft_model_state_dict(net).items()}
    return Adapter(version, tensors, peft_cfg), net


def peft_logprobs(net, prompt_ids, completion_ids):
    import torch

    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    with torch.no_grad():
        lp = torch.log_softmax(net(input_ids=ids).logits[0, :-1].float(), -1)
    return lp.gather(-1, ids[0, 1:, None]).squeeze(-1)[len(prompt_ids) - 1:].numpy()


# ---- HF request-batching queue -------------------------------------------------------------------

@pytest.mark.component
def test_hf_batcher_batches_concurrent_requests_without_changing_them(tiny_model):
    cfg = ReflectorConfig(backend="hf", model=tiny_model)
    backend = HFBackend(tiny_model, cfg)
    tok = backend.tokenizer
    ids = [tok(p).input_ids for p in PROMPTS] * 2  # 6 requests, 6 different seeds
    seeds = list(range(100, 106))
    alone = [backend.generate([p], 10, 1.0, stop_at_newline=True, seed=[s])[0] for p, s in zip(ids, seeds)]

    async def main():
        batcher = HFBatcher(backend)
        gens = await asyncio.gather(*(batcher.generate(p, 10, 1.0, stop_at_newline=True, seed=s)
                                      for p, s in zip(ids, seeds)))
        batches = batcher.batches
        adapter, net = make_adapter(tiny_model, 3, cfg)
        batcher.load_adapter(adapter)
        after = await batcher.generate(ids[0], 10, 1.0, seed=7)
        probe = after.token_ids
        scored = await batcher.score(ids[0], probe)
        base = await batcher.score(ids[0], probe, use_adapter=False)
        await batcher.close()
        return gens, batches, after, scored, base, net

    gens, batches, after, scored, base, net = asyncio.run(main())
    assert batches == 1  # six requests made in one loop tick went out as one batched call
    for g, a in zip(gens, alone):  # per-request seeds: a request samples the same alone or batched
        assert g.token_ids == a.token_ids and g.version == -1
        assert np.allclose(g.logprobs, a.logprobs, atol=1e-4)
    assert after.version == 3
    assert np.allclose(scored, peft_logprobs(net, ids[0], after.token_ids), atol=1e-4)
    assert np.allclose(after.logprobs, scored, atol=1e-4)  # behaviour log-probs = the adapter's own
    assert np.abs(np.array(scored) - np.array(base)).max() > 1e-2  # the adapter really changed the model


# ---- async OpenAI-compatible client against a real HTTP server on loopback ------------------------

class CompletionsServer:
    """A minimal OpenAI-compatible `/v1/completions` server (asyncio, HTTP/1.1 on 127.0.0.1).
    It answers "move <n>\\nrest" for a prompt ending in the word n, after `delay` seconds, and
    counts how many requests it held at once; a prompt containing "FAIL" gets HTTP 500."""

    def __init__(self, delay=0.2):
        self.delay, self.in_flight, self.max_in_flight, self.bodies = delay, 0, 0, []

    async def start(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1"

    async def _handle(self, reader, writer):
        while True:  # keep-alive: several requests per connection
            head = await reader.readuntil(b"\r\n\r\n") if not reader.at_eof() else b""
            if not head:
                break
            lines = head.decode().split("\r\n")
            length = next(int(h.split(":")[1]) for h in lines if h.lower().startswith("content-length"))
            body = json.loads(await reader.readexactly(length))
            self.bodies.append(body)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            await asyncio.sleep(self.delay)
            self.in_flight -= 1
            if "FAIL" in body["prompt"]:
                status, payload = "500 Internal Server Error", b'{"error": "boom"}'
            else:
                text = f" move {body['prompt'].split()[-1]}\nrest"
                payload = json.dumps({"choices": [{"index": 0, "text": text}]}).encode()
                status = "200 OK"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
            await writer.drain()
        writer.close()


# The default backoff (6 retries, up to 30 s apart) made the two failures below wait 90 s; the retry
# schedule itself is tested in tests/integration/test_endpoint_restart.py.
QUICK_RETRIES = dict(max_retries=2, retry_backoff_s=0.01, retry_backoff_max_s=0.02)


@pytest.mark.component
def test_openai_client_keeps_requests_in_flight_concurrently():
    async def main():
        server = CompletionsServer(delay=0.2)
        url = await server.start()
        cfg = ActorConfig(backend="openai", model="tiny", base_url=url, max_new_tokens=6, temperature=0.7,
                          **QUICK_RETRIES)
        actor = AsyncActorPolicy(cfg, AsyncOpenAIClient(cfg))
        actions = await asyncio.gather(*(actor.act(f"Game: x\n> {i}", seed=i) for i in range(8)))
        with pytest.raises(BackendError, match="500"):
            await actor.act("FAIL", seed=0)
        await actor.close()
        server.server.close()
        return server, actions, url

    server, actions, url = asyncio.run(main())
    assert actions == [f"move {i}" for i in range(8)]  # first line of each completion, in request order
    assert server.max_in_flight == 8  # all eight were at the server at once
    assert sorted(b["seed"] for b in server.bodies[:8]) == list(range(8))
    assert all(b["model"] == "tiny" and b["stop"] == ["\n"] and b["max_tokens"] == 6 for b in server.bodies)

    async def refused():  # the server is gone: one clear BackendError, not a hang
        cfg = ActorConfig(backend="openai", model="tiny", base_url=url, request_timeout_s=2.0, **QUICK_RETRIES)
        client = AsyncOpenAIClient(cfg)
        try:
            await client.generate_text("x", 4, 0.0)
        finally:
            await client.close()

    with pytest.raises(BackendError, match="actor endpoint"):
        asyncio.run(refused())


# ---- vLLM AsyncLLM: one engine, actor without adapter, reflector with a hot-swapped LoRA ---------

@pytest.mark.integration
@pytest.mark.vllm
def test_async_vllm_engine_serves_both_roles_and_swaps_lora(tiny_model):
    pytest.importorskip("vllm")
    rcfg = ReflectorConfig(backend="vllm", model=tiny_model, max_new_tokens=12)

    async def main():
        actor, reflector = await build_async_policies(ActorConfig(backend="vllm", model=tiny_model), rcfg,
                                                      VLLMConfig(), seed=0)
        try:
            assert actor.backend is reflector.backend  # one engine for both roles
            tok = reflector.tokenizer
            ids = tok(PROMPTS[2]).input_ids
            # 32 streams at once; seeded requests sample the same whatever runs beside them
            many = await asyncio.gather(*(reflector.reflect(PROMPTS[2], seed=s) for s in range(32)))
            again = await reflector.reflect(PROMPTS[2], seed=5)
            actions = await asyncio.gather(*(actor.act(p, seed=0) for p in PROMPTS[:2]))
            base = await reflector.score(ids, many[0].token_ids)
            adapter, net = make_adapter(tiny_model, 4, rcfg)
            in_flight = [asyncio.create_task(reflector.reflect(PROMPTS[2], seed=s)) for s in range(4)]
            await asyncio.sleep(0)  # these were submitted under the base model ...
            reflector.load(adapter)  # ... and the swap lands while they run
            old = await asyncio.gather(*in_flight)
            new = await reflector.reflect(PROMPTS[2], seed=9)
            swapped = await reflector.score(ids, new.token_ids)
            return many, again, actions, base, old, new, swapped, net, ids, reflector.version
        finally:
            await actor.close()
            await reflector.close()

    many, again, actions, base, old, new, swapped, net, ids, version = asyncio.run(main())
    gc.collect()
    assert again.token_ids == many[5].token_ids and len({tuple(g.token_ids) for g in many}) > 1
    assert all(len(g.token_ids) == len(g.logprobs) > 0 and g.version == -1 for g in many)
    assert np.allclose(base, many[0].logprobs, atol=1e-3)  # behaviour log-probs = the engine's scores
    assert all(isinstance(a, str) and "\n" not in a for a in actions)
    assert version == 4 and new.version == 4 and all(g.version == -1 for g in old)
    assert np.abs(np.array(swapped) - peft_logprobs(net, ids, new.token_ids)).max() < 1e-3  # = peft's
    assert np.allclose(new.logprobs, swapped, atol=1e-3)
