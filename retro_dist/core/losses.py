"""Policy-gradient losses for the reflector, and the log-probs they need (torch only).

∇θ J = E[ Σ_k (r_k − b(x_k)) ∇θ log P_θ(y_k | x_k) ]   (Retroformer, eq. 5; README "What a run does")

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


class _TargetLogprob(torch.autograd.Function):
    """log softmax(h W^T + b)[target] for N rows, computed C rows at a time.

    Autograd would keep every chunk's (C, V) log-softmax for the backward pass, i.e. (N, V) in
    all; this saves only the log-sum-exp per row and recomputes each chunk's logits in backward,
    so memory stays O(C·V) whatever N is. d/dz log softmax(z)[y] = onehot(y) − softmax(z).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows):
        dt = torch.promote_types(hidden.dtype, torch.float32)
        out = torch.empty(hidden.shape[0], dtype=dt, device=hidden.device)
        lse = torch.empty_like(out)
        for lo in range(0, hidden.shape[0], chunk_rows):
            z = _chunk_logits(hidden[lo:lo + chunk_rows], weight, bias)
            lse[lo:lo + chunk_rows] = torch.logsumexp(z, -1)
            out[lo:lo + chunk_rows] = z.gather(-1, targets[lo:lo + chunk_rows, None]).squeeze(-1) - lse[lo:lo + chunk_rows]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_rows = chunk_rows
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        gh = torch.zeros_like(hidden) if need_h else None
        gw = torch.zeros_like(weight) if need_w else None
        gb = torch.zeros_like(bias) if need_b and bias is not None else None
        c = ctx.chunk_rows
        for lo in range(0, hidden.shape[0], c):
            h = hidden[lo:lo + c]
            z = _chunk_logits(h, weight, bias)
            g = -torch.exp(z - lse[lo:lo + c, None])  # −softmax
            g.scatter_add_(-1, targets[lo:lo + c, None], torch.ones_like(g[:, :1]))
            g = g * grad_out[lo:lo + c, None].to(g.dtype)  # (C, V) d loss / d logits
            if gh is not None:
                gh[lo:lo + c] = (g @ weight.to(g.dtype)).to(gh.dtype)
            if gw is not None:
                gw += (g.T @ h.to(g.dtype)).to(gw.dtype)
            if gb is not None:
                gb += g.sum(0).to(gb.dtype)
        return gh, gw, gb, None, None


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    # fp32 at least: log-softmax in half precision loses the tail (and float64 stays float64)
    # (autocast off: under bf16 autocast the matmul would run in bf16 again)
    dt = torch.promote_types(h.dtype, torch.float32)
    with torch.autocast(h.device.type, enabled=False):
        z = h.to(dt) @ weight.to(dt).T
        return z if bias is None else z + bias.to(dt)


def target_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    bias: torch.Tensor | None = None, chunk_rows: int = 1024) -> torch.Tensor:
    """(N, H) hidden states before the LM head, (V, H) head weight, (N,) target ids -> (N,)
    log P(target | hidden) in fp32 (float64 stays float64), never materialising (N, V).

    The caller gathers only the positions whose log-probs it needs (the reflection tokens), so
    a prompt of thousands of tokens costs its hidden states, not its full-vocabulary logits.
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.promote_types(hidden.dtype, torch.float32))
    return _TargetLogprob.apply(hidden, weight, bias, targets, max(1, int(chunk_rows)))


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
