"""Language-model backends: vLLM engine, HF transformers, OpenAI-compatible HTTP.

All return `Generation`s with the sampled token ids and their log-probs under the *raw* model
distribution (before temperature), which is what the learner recomputes and what importance
ratios compare against. The reflector's LoRA adapter is hot-swapped by version: vLLM gets a new
`LoRARequest`, HF loads the tensors into its peft model in place.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol, Sequence, Union

from retro_dist.config import ReflectorConfig, VLLMConfig


class BackendError(RuntimeError):
    """A backend could not serve a request (endpoint down, engine failed): the request's episode errors."""


class EngineDead(BackendError):
    """The engine process died under these requests; the backend has rebuilt it, the requests are lost."""


class EngineRebuildFailed(RuntimeError):
    """A dead engine could not be rebuilt, or the rebuilt one does not reproduce the loaded adapter's
    probe: the worker's error, not an episode's (the worker stops and the driver replaces it)."""


def __getattr__(name: str):
    # The OpenAI client moved to openai_backend.py (which imports this module); a lazy re-export keeps
    # `from retro_dist.agents.backends import OpenAIBackend, check_endpoint` working without a cycle.
    if name in ("OpenAIBackend", "check_endpoint"):
        from retro_dist.agents import openai_backend

        return getattr(openai_backend, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class Generation:
    prompt_ids: list[int]  # (P,) what the model saw
    token_ids: list[int]  # (R,) sampled continuation, EOS included when generated
    logprobs: list[float]  # (R,) raw log-probs of token_ids
    text: str
    version: Optional[int] = None  # adapter version that sampled it, where the backend knows (async backends)


@dataclass
class Adapter:
    """A LoRA adapter version as the workers receive it."""

    version: int
    tensors: dict  # peft state-dict names -> CPU tensors
    peft_config: dict  # peft LoraConfig.to_dict(), for vLLM's adapter folder
    extra: dict = field(default_factory=dict)


Seeds = Union[int, Sequence[int]]  # one seed for a batch, or one per request (batch-independent sampling)


def per_request(seed: Seeds, n: int) -> list[int]:
    """One seed per request: a list as given; an int `s` as s, s+1, ... (the batch convention)."""
    if isinstance(seed, int):
        return [seed + i for i in range(n)]
    if len(seed) != n:
        raise ValueError(f"{len(seed)} seeds for {n} requests")
    return [int(s) for s in seed]


class Backend(Protocol):
    tokenizer: object

    def generate(self, prompt_ids: Sequence[list[int]], max_new_tokens: int, temperature: float,
                 stop_at_newline: bool, use_adapter: bool, seed: int) -> list[Generation]: ...

    def score(self, prompt_ids: list[int], completion_ids: list[int], use_adapter: bool) -> list[float]: ...

    def load_adapter(self, adapter: Adapter) -> None: ...


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def check_lora_config(saved: dict, peft_model, where: str) -> None:
    """An adapter must be loaded into a LoRA of the same shape and scale, or it silently changes."""
    mine = peft_model.peft_config["default"]
    for key, have in (("r", mine.r), ("lora_alpha", mine.lora_alpha),
                      ("target_modules", sorted(mine.target_modules))):
        want = sorted(saved[key]) if key == "target_modules" else saved.get(key)
        if want != have:
            name = {"r": "lora_rank", "lora_alpha": "lora_alpha", "target_modules": "lora_target_modules"}[key]
            raise BackendError(f"{where}: adapter has {key}={want!r} but reflector.{name} is {have!r}")


class HFBackend:
    """transformers model on CPU/GPU; with `lora` it is a peft model whose adapter is swapped in place."""

    def __init__(self, model: str, lora: Optional[ReflectorConfig] = None, device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM

        self.tokenizer = load_tokenizer(model)
        self.device = torch.device(device)
        net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        if lora is not None:
            from peft import LoraConfig, get_peft_model

            net = get_peft_model(net, LoraConfig(r=lora.lora_rank, lora_alpha=lora.lora_alpha,
                                                 target_modules=list(lora.lora_target_modules)))
        self.model = net.to(self.device).eval()
        self.has_adapter = lora is not None

    def load_adapter(self, adapter: Adapter) -> None:
        from peft import set_peft_model_state_dict

        check_lora_config(adapter.peft_config, self.model, f"adapter v{adapter.version}")
        result = set_peft_model_state_dict(self.model, adapter.tensors)
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing:
            raise BackendError(f"adapter v{adapter.version} is missing {len(missing)} LoRA tensors, e.g. {missing[0]}")

    def _adapter_ctx(self, use_adapter: bool):
        import contextlib

        if self.has_adapter and not use_adapter:
            return self.model.disable_adapter()
        return contextlib.nullcontext()

    def generate(self, prompt_ids, max_new_tokens, temperature, stop_at_newline=False,
                 use_adapter=True, seed=0) -> list[Generation]:
        import torch

        tok = self.tokenizer
        width = max(len(p) for p in prompt_ids)
        # Left padding so every row's next token sits in the last column.
        ids = torch.full((len(prompt_ids), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompt_ids):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        # A list of seeds gives each row its own generator, so a row's sample does not depend on
        # which other requests share its batch (the async request-batching queue relies on it).
        gens = ([torch.Generator(device=self.device).manual_seed(s) for s in seed]
                if not isinstance(seed, int) else torch.Generator(device=self.device).manual_seed(seed))
        done = torch.zeros(len(prompt_ids), dtype=torch.bool)
        out_ids, out_lp = [[] for _ in prompt_ids], [[] for _ in prompt_ids]
        ids, mask, past = ids.to(self.device), mask.to(self.device), None
        step_ids = ids
        with torch.no_grad(), self._adapter_ctx(use_adapter):
            for _ in range(max_new_tokens):
                pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]
                out = self.model(input_ids=step_ids, attention_mask=mask, position_ids=pos,
                                 past_key_values=past, use_cache=True)
                past = out.past_key_values
                logp = torch.log_softmax(out.logits[:, -1].float(), -1)
                if temperature > 0:
                    probs = torch.softmax(logp / temperature, -1)
                    if isinstance(gens, list):
                        nxt = torch.cat([torch.multinomial(probs[i:i + 1], 1, generator=g)[:, 0]
                                         for i, g in enumerate(gens)])
                    else:
                        nxt = torch.multinomial(probs, 1, generator=gens).squeeze(-1)
                else:
                    nxt = logp.argmax(-1)
                chosen = logp.gather(-1, nxt[:, None]).squeeze(-1)
                for i in range(len(prompt_ids)):
                    if not done[i]:
                        out_ids[i].append(int(nxt[i]))
                        out_lp[i].append(float(chosen[i]))
                        text_piece = tok.decode([int(nxt[i])])
                        if int(nxt[i]) == tok.eos_token_id or (stop_at_newline and "\n" in text_piece):
                            done[i] = True
                if bool(done.all()):
                    break
                step_ids = nxt[:, None]
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        return [Generation(list(p), o, lp, tok.decode(o, skip_special_tokens=True))
                for p, o, lp in zip(prompt_ids, out_ids, out_lp)]

    def score_candidates(self, prompt_ids, candidates) -> list[list[float]]:
        with self._adapter_ctx(False):
            return score_candidates_hf(self.model, self.tokenizer, self.device, prompt_ids, candidates)

    def score(self, prompt_ids, completion_ids, use_adapter=True) -> list[float]:
        import torch

        ids = torch.tensor([list(prompt_ids) + list(completion_ids)], device=self.device)
        with torch.no_grad(), self._adapter_ctx(use_adapter):
            logits = self.model(input_ids=ids).logits[0, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        return lp[len(prompt_ids) - 1:].tolist()


def score_candidates_hf(model, tokenizer, device, prompt_ids, candidates) -> list[list[float]]:
    """Σ log P(candidate tokens | prompt) for every (prompt, candidate) pair, in one padded batch.

    prompt_ids: B prompts; candidates: B lists of token-id lists. Returns B lists of scores.
    """
    import torch

    seqs, spans = [], []
    for p, cands in zip(prompt_ids, candidates):
        for c in cands:
            seqs.append(list(p) + list(c))
            spans.append((len(p), len(c)))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
    with torch.no_grad():
        logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None].to(device)).squeeze(-1).cpu()
    flat = [float(lp[i, p - 1 : p - 1 + n].sum()) for i, (p, n) in enumerate(spans)]
    out, k = [], 0
    for cands in candidates:
        out.append(flat[k : k + len(cands)])
        k += len(cands)
    return out


CPU_MAX_NUM_SEQS = 32  # sequences a CPU engine runs at once; more requests queue in the engine


def engine_kwargs(model: str, engine: VLLMConfig, lora: Optional[ReflectorConfig], seed: int) -> dict:
    """Engine arguments shared by the sync `LLM` and the async `AsyncLLM` engines."""
    import torch

    kwargs = dict(model=model, dtype=engine.dtype, enforce_eager=engine.enforce_eager,
                  max_model_len=engine.max_model_len, seed=seed)
    if torch.cuda.is_available():  # the CPU build rejects gpu_memory_utilization
        kwargs["gpu_memory_utilization"] = engine.gpu_memory_utilization
    else:
        # A prompt prefilled in chunks discards the token sampled for it, and for a seeded request
        # vLLM then rewinds its generator's offset, which CPU generators do not have ("CPU Generator
        # does not use offset": the engine dies; seen with 16 episodes in flight). Turning chunked
        # prefill off crashes the CPU build elsewhere, so make chunks unnecessary instead: a step's
        # token budget holds a whole prompt of every sequence the engine runs at once.
        kwargs.update(max_num_seqs=CPU_MAX_NUM_SEQS, max_num_batched_tokens=CPU_MAX_NUM_SEQS * engine.max_model_len)
    if lora is not None:
        kwargs.update(enable_lora=True, max_lora_rank=max(8, lora.lora_rank), max_loras=engine.max_loras)
    return kwargs


class VLLMBackend:
    """A vLLM engine; serves the base model and, per request, the newest LoRA adapter.

    If the engine's process dies, the call that finds it dead rebuilds the engine (same arguments;
    the current adapter is served again and its probe checked) and raises `EngineDead`: the requests
    it carried are lost, later ones go to the new engine. `rebuilds` counts it."""

    def __init__(self, model: str, engine: VLLMConfig, lora: Optional[ReflectorConfig], seed: int):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(engine.kv_cache_gib))
        self._kwargs = engine_kwargs(model, engine, lora, seed)
        self.llm = self._build()
        self.tokenizer = load_tokenizer(model)
        self._lora_request = None
        self._adapter: Optional[Adapter] = None  # the adapter being served, for the probe after a rebuild
        self._adapter_dir = Path(tempfile.mkdtemp(prefix="retro_dist_adapters_"))
        self.rebuilds = 0

    def _build(self):
        from vllm import LLM

        from retro_dist.agents.engine_health import watch_sync_engine

        llm = LLM(**self._kwargs)
        watch_sync_engine(llm.llm_engine.engine_core)
        return llm

    def _run(self, call):
        """`call(llm)`; if the engine turns out dead: rebuild it, then raise EngineDead."""
        from retro_dist.agents.engine_health import engine_is_dead

        try:
            return call(self.llm)
        except Exception as err:
            if not engine_is_dead(err, self.llm.llm_engine.engine_core):
                raise
            reason = f"{type(err).__name__}: {err}"
        self.rebuild()
        raise EngineDead(f"vLLM engine died ({reason}); rebuilt, its requests are lost")

    def rebuild(self) -> None:
        """A new engine with the same arguments, serving the current adapter (probe-checked)."""
        from retro_dist.agents.engine_health import check_rebuilt, has_probe

        self._shutdown_engine()
        try:
            self.llm = self._build()
        except Exception as err:
            raise EngineRebuildFailed(f"vLLM engine rebuild failed: {type(err).__name__}: {err}") from err
        self.rebuilds += 1
        if has_probe(self._adapter):  # the adapter's folder is still on disk: the new engine loads it on use
            probe = self._adapter.extra["probe"]
            check_rebuilt(self._adapter, self.score(probe["prompt_ids"], probe["completion_ids"]))

    def _shutdown_engine(self) -> None:
        core = getattr(getattr(getattr(self, "llm", None), "llm_engine", None), "engine_core", None)
        if core is not None:
            core._retro_closing = True  # tells watch_sync_engine this exit is ours
            try:
                core.shutdown()
            except Exception:  # a dead engine may fail to shut down cleanly; its processes are gone
                pass

    def load_adapter(self, adapter: Adapter) -> None:
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        # vLLM loads adapters from a peft folder; a new name + int id per version makes the
        # engine treat it as a new adapter instead of serving a cached older one.
        path = self._adapter_dir / f"v{adapter.version}"
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in adapter.tensors.items()}
        save_file(tensors, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps(adapter.peft_config))
        self._lora_request = LoRARequest(f"reflector-v{adapter.version}", adapter.version + 1, str(path))
        self._adapter = adapter
        for old in self._adapter_dir.glob("v*"):  # the engine has loaded what it needs; keep the newest only
            if old != path:
                shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        # Stop the engine's processes now, while logging streams are open: left to vLLM's exit-time
        # finalizer, its shutdown messages go to handlers whose streams may already be closed
        # ("--- Logging error ---" at exit).
        self._shutdown_engine()
        shutil.rmtree(self._adapter_dir, ignore_errors=True)

    def _lora(self, use_adapter: bool):
        return self._lora_request if use_adapter else None

    def generate(self, prompt_ids, max_new_tokens, temperature, stop_at_newline=False,
                 use_adapter=True, seed=0) -> list[Generation]:
        from vllm import SamplingParams

        params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, logprobs=0,
                                 seed=s, stop=["\n"] if stop_at_newline else None,
                                 include_stop_str_in_output=True)
                  for s in per_request(seed, len(prompt_ids))]
        prompts = [{"prompt_token_ids": list(p)} for p in prompt_ids]
        lora = self._lora(use_adapter)
        outs = self._run(lambda llm: llm.generate(prompts, params, lora_request=lora, use_tqdm=False))
        gens = []
        for p, out in zip(prompt_ids, outs):
            c = out.outputs[0]
            ids = list(c.token_ids)
            lps = [step[t].logprob for t, step in zip(ids, c.logprobs)]
            gens.append(Generation(list(p), ids, lps, c.text))
        return gens

    def score(self, prompt_ids, completion_ids, use_adapter=True) -> list[float]:
        from vllm import SamplingParams

        full = list(prompt_ids) + list(completion_ids)
        lora = self._lora(use_adapter)
        params = SamplingParams(max_tokens=1, prompt_logprobs=0)
        out = self._run(lambda llm: llm.generate([{"prompt_token_ids": full}], params,
                                                 lora_request=lora, use_tqdm=False))[0]
        return [out.prompt_logprobs[i][full[i]].logprob for i in range(len(prompt_ids), len(full))]

    def score_candidates(self, prompt_ids, candidates) -> list[list[float]]:
        from vllm import SamplingParams

        # One request per (prompt, candidate). vLLM skips its prefix cache for prompt_logprobs requests,
        # so each recomputes the prompt: the cost grows with the number of valid actions.
        reqs = [{"prompt_token_ids": list(p) + list(c)} for p, cands in zip(prompt_ids, candidates) for c in cands]
        params = SamplingParams(max_tokens=1, prompt_logprobs=0)
        flat = self._run(lambda llm: llm.generate(reqs, params, use_tqdm=False))
        scores, k = [], 0
        for p, cands in zip(prompt_ids, candidates):
            row = []
            for c in cands:
                out, full = flat[k], list(p) + list(c)
                row.append(sum(out.prompt_logprobs[i][full[i]].logprob for i in range(len(p), len(full))))
                k += 1
            scores.append(row)
        return scores
