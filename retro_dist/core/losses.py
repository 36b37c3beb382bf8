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
        c = ctx.chunk_rows

        def grad_logits(lo, z):  # d/dz log softmax(z)[y] = onehot(y) − softmax(z)
            g = -torch.exp(z - lse[lo:lo + c, None])
            g.scatter_add_(-1, targets[lo:lo + c, None], torch.ones_like(g[:, :1]))
            return g * grad_out[lo:lo + c, None].to(g.dtype)

        return _head_backward(ctx, hidden, weight, bias, grad_logits) + (None, None)


class _TokenEntropy(torch.autograd.Function):
    """H = −Σ_v p_v log p_v of softmax(h W^T + b) for N rows, C rows at a time (as _TargetLogprob:
    only the log-sum-exp and the entropy per row are saved; each chunk's logits are recomputed in
    backward). dH/dz_v = −p_v (log p_v + H)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, chunk_rows):
        dt = torch.promote_types(hidden.dtype, torch.float32)
        ent = torch.empty(hidden.shape[0], dtype=dt, device=hidden.device)
        lse = torch.empty_like(ent)
        for lo in range(0, hidden.shape[0], chunk_rows):
            z = _chunk_logits(hidden[lo:lo + chunk_rows], weight, bias)
            lse[lo:lo + chunk_rows] = torch.logsumexp(z, -1)
            logp = z - lse[lo:lo + chunk_rows, None]
            ent[lo:lo + chunk_rows] = -(torch.exp(logp) * logp).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, lse, ent)
        ctx.chunk_rows = chunk_rows
        return ent

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, lse, ent = ctx.saved_tensors
        c = ctx.chunk_rows

        def grad_logits(lo, z):
            logp = z - lse[lo:lo + c, None]
            return -torch.exp(logp) * (logp + ent[lo:lo + c, None]) * grad_out[lo:lo + c, None].to(z.dtype)

        return _head_backward(ctx, hidden, weight, bias, grad_logits) + (None,)


class _TargetLogprobEntropy(torch.autograd.Function):
    """(log softmax(z)[target], H(softmax(z))) for z = h W^T + b, N rows, C rows at a time: one
    matmul per chunk for both (the reference is _TargetLogprob + _TokenEntropy, two passes).

    Per row, with m = max z and e = exp(z − m), s = Σ e: lse = m + log s and
    H = lse − Σ p·z = log s − Σ e·(z − m) / s, so one exp over the chunk gives the log-prob, the
    log-sum-exp and the entropy, and no (C, V) probability block is kept beside the logits. Saved
    for backward as in _TargetLogprob: the per-row lse and H only; one recomputed matmul per chunk
    serves both gradients, d/dz = g_lp·(onehot(y) − p) − g_H·p·(log p + H).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows):
        dt = torch.promote_types(hidden.dtype, torch.float32)
        lp = torch.empty(hidden.shape[0], dtype=dt, device=hidden.device)
        ent, lse = torch.empty_like(lp), torch.empty_like(lp)
        for lo in range(0, hidden.shape[0], chunk_rows):
            sl = slice(lo, lo + chunk_rows)
            z = _chunk_logits(hidden[sl], weight, bias)
            m = z.amax(-1, keepdim=True)
            z.sub_(m)  # z − m ≤ 0, in place: the only (C, V) blocks are this and its exp
            e = torch.exp(z)
            s = e.sum(-1)
            log_s = torch.log(s)
            lse[sl] = m.squeeze(-1) + log_s
            lp[sl] = z.gather(-1, targets[sl, None]).squeeze(-1) - log_s
            ent[sl] = log_s - torch.linalg.vecdot(e, z) / s
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
        ctx.chunk_rows = chunk_rows
        ctx.set_materialize_grads(False)  # an unused output (the logged entropy) costs no backward work
        return lp, ent

    @staticmethod
    def backward(ctx, grad_lp, grad_ent):
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        c = ctx.chunk_rows
        if grad_lp is None and grad_ent is None:
            return None, None, None, None, None

        def grad_logits(lo, z):  # z is this chunk's own recomputed block: reused in place
            logp = z.sub_(lse[lo:lo + c, None])
            p = torch.exp(logp)
            gl = None if grad_lp is None else grad_lp[lo:lo + c, None].to(p.dtype)
            if grad_ent is None:
                g = p.mul_(-gl)
            else:  # − g_H · p (log p + H)
                g = logp.add_(ent[lo:lo + c, None]).mul_(p).mul_(-grad_ent[lo:lo + c, None].to(p.dtype))
                if gl is not None:
                    g.sub_(p.mul_(gl))
            if gl is not None:  # + g_lp · onehot(y)
                g.scatter_add_(-1, targets[lo:lo + c, None], gl)
            return g

        return _head_backward(ctx, hidden, weight, bias, grad_logits) + (None, None)


def _head_backward(ctx, hidden, weight, bias, grad_logits) -> tuple:
    """Gradients w.r.t. (hidden, weight, bias) of a loss on z = h W^T + b, given d loss/dz per
    chunk (`grad_logits(lo, z)` -> (C, V)), one (C, V) block at a time."""
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    gh = torch.zeros_like(hidden) if need_h else None
    gw = torch.zeros_like(weight) if need_w else None
    gb = torch.zeros_like(bias) if need_b and bias is not None else None
    c = ctx.chunk_rows
    for lo in range(0, hidden.shape[0], c):
        h = hidden[lo:lo + c]
        g = grad_logits(lo, _chunk_logits(h, weight, bias))  # (C, V) d loss / d logits
        if gh is not None:
            gh[lo:lo + c] = (g @ weight.to(g.dtype)).to(gh.dtype)
        if gw is not None:
            gw += (g.T @ h.to(g.dtype)).to(gw.dtype)
        if gb is not None:
            gb += g.sum(0).to(gb.dtype)
    return gh, gw, gb


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


def token_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  chunk_rows: int = 1024) -> torch.Tensor:
    """(N, H) hidden states, (V, H) head weight -> (N,) entropy (nats) of each row's next-token
    distribution, fp32 at least, never materialising (N, V) (the same chunking as target_logprobs)."""
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.promote_types(hidden.dtype, torch.float32))
    return _TokenEntropy.apply(hidden, weight, bias, max(1, int(chunk_rows)))


def target_logprobs_and_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                bias: torch.Tensor | None = None, chunk_rows: int = 1024):
    """target_logprobs and token_entropy of the same rows from one chunked pass over the vocabulary
    (one matmul and one exp per chunk instead of two of each) -> ((N,) log-probs, (N,) entropies),
    both differentiable (an output the loss does not use costs nothing in backward)."""
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.promote_types(hidden.dtype, torch.float32))
        return empty, empty.clone()
    return _TargetLogprobEntropy.apply(hidden, weight, bias, targets, max(1, int(chunk_rows)))


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(π_θ ‖ π_ref) from tokens sampled by π_θ: Schulman's k3 estimator
    ("Approximating KL Divergence", 2020), k3 = e^u − u − 1 with u = log π_ref(y) − log π_θ(y),
    as GRPO (Shao et al. 2024) and verl's `low_var_kl` use it. Unbiased, always ≥ 0, and of low
    variance when the two policies are close; its gradient in log π_θ is 1 − e^u, which pushes
    hard against a sampled token whose probability falls far below the reference's."""
    u = ref_logp - logp
    return torch.exp(u) - u - 1


def regularizer_loss(logp: torch.Tensor, ref_logp: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor,
                     normalizer: float, kl_coef: float, entropy_coef: float):
    """kl_coef · Σ_t k3_t − entropy_coef · Σ_t H_t per sequence, summed over rows / normalizer
    (the policy losses' convention: the KL and entropy of a sequence are sums over its tokens).

    logp, ref_logp (reference, no gradient), entropy, mask: (B, T). Returns (loss, Σ k3, Σ H)
    where the two sums run over the real tokens (for the per-token means the learner logs).
    """
    mask = mask.to(logp.dtype)
    kl = kl_k3(logp, ref_logp.detach().to(logp.dtype)) * mask
    ent = entropy.to(logp.dtype) * mask
    loss = (kl_coef * kl.sum() - entropy_coef * ent.sum()) / normalizer
    return loss, float(kl.detach().sum()), float(ent.detach().sum())


def value_loss(pred: torch.Tensor, target: torch.Tensor, normalizer: float) -> torch.Tensor:
    """Σ_i (V(x_i) − r_i)² / normalizer: the value baseline's regression on the rewards."""
    return ((pred - target.to(pred.dtype)) ** 2).sum() / normalizer


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
