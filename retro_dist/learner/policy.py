"""The policy model: the reflector's base checkpoint + a trainable LoRA adapter (HF + peft),
and its log-probs log P_θ(y_t | x, y_<t) at the reflection tokens only.

The fast path runs the transformer body, gathers the hidden states at the reflection positions
and computes the log-softmax over the vocabulary for those rows only, in chunks
(`core.losses.target_logprobs`). The full-logits path (a (B, L, V) log-softmax over every
prompt position) is kept as the slow reference for tests and the benchmark: with a 152k
vocabulary and prompts of thousands of tokens it alone takes tens of GB.

Precision: master weights stay fp32 (the frozen base and the LoRA parameters AdamW updates); on
CUDA the forward pass runs under bf16 autocast (`learner.precision`), the LM head's log-softmax
in fp32. Probe log-probs are always computed in fp32, without autocast.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Optional

import torch

from retro_dist.agents.backends import check_lora_config, load_tokenizer
from retro_dist.config import LearnerConfig, ReflectorConfig
from retro_dist.core import losses
from retro_dist.learner.batches import MicroBatch, collate

LOGPROB_CHUNK_ROWS = 1024  # rows per (rows, vocab) fp32 logits block: 1024 × 152k × 4 B = 0.6 GB


@dataclass
class KLLog:
    """The logged KL's state with `kl_coef: 0` (learner/update.py): a fresh reference forward runs
    on every KL_LOG_EVERY-th step only; a step that measures no token repeats the last measurement."""

    steps: int = 0  # gradient steps accumulated on this policy so far
    last: float = 0.0  # the last measured per-token KL (nats)


@dataclass
class ReflectionOutputs:
    """What one forward pass of the policy gives the update step."""

    logprobs: torch.Tensor  # (B, T) log π_θ(y_t | x, y_<t), 0 on padding
    entropy: Optional[torch.Tensor]  # (B, T) entropy of π_θ(· | x, y_<t) in nats, 0 on padding; None if not asked
    prompt_state: torch.Tensor  # (B, H) hidden state at the prompt's last token (before the reflection)


def _scatter(values: torch.Tensor, mask: torch.Tensor, b_idx: torch.Tensor, t_idx: torch.Tensor) -> torch.Tensor:
    """(N,) values at the real tokens -> (B, T), 0 on padding."""
    out = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    return out.index_put((b_idx, t_idx), values)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto`: bf16 on a CUDA device that supports it, fp32 elsewhere (CPU bf16 matmuls are slow)."""
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return name


class PolicyModel:
    def __init__(self, reflector: ReflectorConfig, cfg: LearnerConfig, device: torch.device):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        self.device = device
        self.precision = resolve_precision(cfg.precision, device)
        self.tokenizer = load_tokenizer(reflector.model)
        base = AutoModelForCausalLM.from_pretrained(reflector.model, dtype=torch.float32)
        if getattr(base.config, "final_logit_softcapping", None):  # the gathered path applies no softcap
            raise ValueError(f"reflector.model {reflector.model}: final logit softcapping is not supported")
        lora = LoraConfig(r=reflector.lora_rank, lora_alpha=reflector.lora_alpha,
                          target_modules=list(reflector.lora_target_modules), lora_dropout=0.0)
        self.model = get_peft_model(base, lora).to(device)
        if cfg.gradient_checkpointing:
            # non-reentrant: works although the frozen embeddings' output needs no grad
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # train mode only switches checkpointing on: every dropout is 0 (base config, lora_dropout)
        self.model.train(cfg.gradient_checkpointing)
        self.body = getattr(base, base.base_model_prefix)  # the transformer without its LM head
        self.head = base.get_output_embeddings()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.kl_log = KLLog()

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---- log-probs -----------------------------------------------------------------------------
    def forward(self, mb: MicroBatch, entropy: bool = False, entropy_grad: bool = False) -> ReflectionOutputs:
        """One pass of the body: log-probs at the reflection tokens, optionally their entropies (with
        a gradient only if `entropy_grad`), and the hidden state at each prompt's last token."""
        hidden = self._hidden(mb)  # (B, L, H)
        b_idx, t_idx = mb.mask.nonzero(as_tuple=True)  # real reflection tokens only
        h = hidden[b_idx, mb.positions[b_idx, t_idx]]  # (N, H)
        bias = getattr(self.head, "bias", None)
        targets = mb.targets[b_idx, t_idx]
        ent = None
        if entropy:  # both from one chunked pass over the vocabulary (one matmul, one exp per chunk)
            lp, e = losses.target_logprobs_and_entropy(h, self.head.weight, targets, bias, LOGPROB_CHUNK_ROWS)
            # detached, the entropy's output takes no part in backward: no gradient work for a log
            ent = _scatter(e if entropy_grad else e.detach(), mb.mask, b_idx, t_idx)
        else:
            lp = losses.target_logprobs(h, self.head.weight, targets, bias, LOGPROB_CHUNK_ROWS)
        state = hidden[torch.arange(hidden.shape[0], device=hidden.device), mb.prompt_end.to(hidden.device)]
        return ReflectionOutputs(_scatter(lp, mb.mask, b_idx, t_idx), ent, state)

    def logprobs(self, mb: MicroBatch) -> torch.Tensor:
        """(B, T) log-probs of the reflection tokens, 0 on padding; never builds (B, L, V)."""
        return self.forward(mb).logprobs

    @torch.no_grad()
    def initial_logprobs(self, mb: MicroBatch) -> torch.Tensor:
        """(B, T) log-probs under the initial reflector: the same model with the LoRA adapter
        disabled (the KL penalty's reference; costs one no-grad forward, no copy of the weights)."""
        with self.model.disable_adapter():
            hidden = self._hidden(mb)
        b_idx, t_idx = mb.mask.nonzero(as_tuple=True)
        h = hidden[b_idx, mb.positions[b_idx, t_idx]]
        lp = losses.target_logprobs(h, self.head.weight, mb.targets[b_idx, t_idx],
                                    getattr(self.head, "bias", None), LOGPROB_CHUNK_ROWS)
        return _scatter(lp, mb.mask, b_idx, t_idx)

    @torch.no_grad()
    def prompt_states(self, prompts: list, max_rows: int) -> torch.Tensor:
        """(B, H) fp32 hidden states at each prompt's last token (what the value head reads), in
        micro-batches of at most `max_rows` prompts; no reflection tokens needed (causal model)."""
        out = []
        for lo in range(0, len(prompts), max_rows):
            chunk = prompts[lo:lo + max_rows]
            mb = collate(chunk, [[] for _ in chunk], self.tokenizer.pad_token_id).to(self.device)
            hidden = self._hidden(mb)
            out.append(hidden[torch.arange(len(chunk), device=hidden.device), mb.prompt_end].float())
        return torch.cat(out) if out else torch.zeros(0, self.head.weight.shape[1], device=self.device)

    def _hidden(self, mb: MicroBatch) -> torch.Tensor:
        with self.autocast():
            return self.body(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                             use_cache=False).last_hidden_state

    def reference_logprobs(self, mb: MicroBatch) -> torch.Tensor:
        """The slow reference: full-vocabulary logits and log-softmax at every position."""
        with self.autocast():
            logits = self.model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False).logits
        tok = losses.token_logprobs(logits, mb.input_ids)  # (B, L-1), fp32
        return tok.gather(1, mb.positions) * mb.mask

    @torch.no_grad()
    def probe_logprobs(self, prompt_ids: list[int], completion_ids: list[int], precision: str = "fp32") -> list[float]:
        """fp32 by default, whatever the training precision: the reference a worker's engine (bf16
        on GPUs) is compared with. `precision="bf16"` estimates what bf16 rounding does to them."""
        mb = collate([prompt_ids], [completion_ids], self.tokenizer.pad_token_id).to(self.device)
        was = self.precision
        self.precision = precision
        try:
            return self.logprobs(mb)[0, : len(completion_ids)].tolist()
        finally:
            self.precision = was

    # ---- the adapter ---------------------------------------------------------------------------
    def lora_state(self) -> dict:
        """peft state-dict names -> CPU copies of the LoRA tensors."""
        from peft import get_peft_model_state_dict

        return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(self.model).items()}

    def load_lora_state(self, tensors: dict, where: str) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.model, tensors)
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing:
            raise RuntimeError(f"{where} lacks {len(missing)} LoRA tensors, e.g. {missing[0]}")

    def peft_config(self) -> dict:
        return json.loads(json.dumps(self.model.peft_config["default"].to_dict(),
                                     default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v)))

    def check_adapter_config(self, saved: dict, where: str) -> None:
        check_lora_config(saved, self.model, where)

    def trainable_vector(self) -> torch.Tensor:
        """All LoRA parameters as one flat fp32 CPU vector (tests compare ranks with it)."""
        return torch.cat([p.detach().reshape(-1).float().cpu() for p in self.params])

