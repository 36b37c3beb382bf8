"""Policy-gradient losses for the reflector (torch only).

∇θ J = E[ Σ_k (r_k − b(x_k)) ∇θ log P_θ(y_k | x_k) ]   (Retroformer, eq. 5; DESIGN §1)

Shapes: B reflections, T reflection tokens (right-padded); `mask` is 1 on real tokens.
Losses are summed over a sequence's tokens (log P(y|x) = Σ_t log P(y_t|x, y_<t)) and divided by
`normalizer` (the number of sequences in the *whole* batch), so accumulating micro-batches
gives exactly the full-batch gradient.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, L, V) logits, (B, L) ids -> (B, L-1) log P(ids[:, t+1] | ids[:, :t+1])."""
    logits = logits[:, :-1]
    if logits.dtype in (torch.float16, torch.bfloat16):  # log-softmax in half precision loses the tail
        logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


@dataclass
class PGStats:
    loss: float
    mean_ratio: float  # mean per-token importance ratio π/μ over real tokens
    clip_fraction: float  # share of real tokens where the ratio was truncated/clipped
    mean_logprob: float  # mean Σ_t log π(y_t) per sequence


def reinforce_loss(logp: torch.Tensor, behaviour_logp: torch.Tensor, advantages: torch.Tensor,
                   mask: torch.Tensor, normalizer: float, is_truncation: float = 2.0):
    """REINFORCE with per-token truncated importance weights (IMPALA-style ρ̄ = is_truncation).

    logp, behaviour_logp, mask: (B, T); advantages: (B,). Returns (loss, PGStats).
    On-policy (logp == behaviour_logp) the weights are 1 and this is plain REINFORCE.
    """
    mask = mask.to(logp.dtype)
    log_ratio = (logp.detach() - behaviour_logp) * mask
    ratio = torch.exp(log_ratio)
    weight = ratio.clamp(max=is_truncation)
    per_seq = (weight * logp * mask).sum(-1)  # (B,)
    loss = -(advantages * per_seq).sum() / normalizer
    return loss, _stats(loss, ratio, ratio > is_truncation, logp, mask)


def ppo_clip_loss(logp: torch.Tensor, behaviour_logp: torch.Tensor, advantages: torch.Tensor,
                  mask: torch.Tensor, normalizer: float, clip_eps: float = 0.2):
    """PPO's clipped surrogate per token, summed over a sequence (Schulman et al. 2017, eq. 7)."""
    mask = mask.to(logp.dtype)
    ratio = torch.exp((logp - behaviour_logp) * mask)
    adv = advantages[:, None]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    loss = -(surrogate * mask).sum() / normalizer
    clipped = (ratio.detach() - 1).abs() > clip_eps
    return loss, _stats(loss, ratio.detach(), clipped, logp, mask)


def _stats(loss, ratio, clipped, logp, mask) -> PGStats:
    n = mask.sum().clamp(min=1)
    return PGStats(
        loss=float(loss.detach()),
        mean_ratio=float((ratio * mask).sum() / n),
        clip_fraction=float((clipped.to(mask.dtype) * mask).sum() / n),
        mean_logprob=float((logp.detach() * mask).sum(-1).mean()),
    )
