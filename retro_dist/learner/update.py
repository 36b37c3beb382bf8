"""One gradient step: micro-batches by token budget, gradients accumulated, summed across the
data-parallel ranks, clipped, AdamW.

Each micro-batch's loss is divided by the row count of the *whole* step (`normalizer`), so the
accumulated gradient equals the one-big-batch gradient however the rows are split, over
micro-batches or over ranks.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from retro_dist.config import LearnerConfig
from retro_dist.core import losses
from retro_dist.learner.batches import Rows, micro_batch, plan_micro_batches
from retro_dist.learner.distributed import Group
from retro_dist.learner.policy import PolicyModel

BAD_STEP = "learner/bad_step"  # in a skipped step's stats: its loss or gradient norm was NaN/inf


def accumulate_gradients(policy: PolicyModel, cfg: LearnerConfig, rows: Rows, group: Group) -> torch.Tensor:
    """Backward over this rank's micro-batches; returns the summed statistics (float64, 6 values):
    loss, Σ ratio over tokens, clipped tokens, tokens, Σ sequence log-prob, sequences."""
    plan = plan_micro_batches(rows.lengths(), cfg.micro_batch_size, cfg.micro_batch_tokens)
    sums = torch.zeros(6, dtype=torch.float64)
    for idx in plan[group.rank::group.world_size]:
        mb = micro_batch(rows, idx, policy.tokenizer.pad_token_id).to(policy.device)
        logp = policy.logprobs(mb)
        # behaviour None: on-policy (importance weights 1), as the SFT warm start uses it
        beh = logp.detach() if mb.behaviour is None else mb.behaviour
        if cfg.loss == "ppo_clip":
            loss, st = losses.ppo_clip_loss(logp, beh, mb.advantages, mb.mask, len(rows), cfg.clip_eps)
        else:
            loss, st = losses.reinforce_loss(logp, beh, mb.advantages, mb.mask, len(rows), cfg.is_truncation)
        loss.backward()
        tokens, seqs = float(mb.mask.sum()), len(idx)
        sums += torch.tensor([st.loss, st.mean_ratio * tokens, st.clip_fraction * tokens, tokens,
                              st.mean_logprob * seqs, seqs], dtype=torch.float64)
    return sums


def gradient_step(policy: PolicyModel, optimizer: torch.optim.Optimizer, cfg: LearnerConfig, rows: Rows,
                  group: Group, version: int) -> dict:
    """Zero, accumulate, all-reduce, clip, step. Every rank returns the same metrics. A step whose
    loss or gradient norm is not finite is skipped (grads zeroed, no optimizer step): its stats are
    `{BAD_STEP: 1, ...}` only."""
    optimizer.zero_grad(set_to_none=True)
    sums = accumulate_gradients(policy, cfg, rows, group)
    group.all_reduce_grads_(policy.params)
    sums = group.all_reduce_sum_(sums.to(policy.device)).cpu() if group.distributed else sums
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.params, cfg.max_grad_norm)
    loss, ratio_sum, clipped, tokens, lp_sum, seqs = sums.tolist()
    # Decided on the all-reduced loss and gradient norm, so every rank skips the same steps.
    if not (math.isfinite(loss) and math.isfinite(float(grad_norm))):
        optimizer.zero_grad(set_to_none=True)  # a NaN/inf step would poison the weights and AdamW's moments
        return {BAD_STEP: 1, "losses/bad_loss": loss, "losses/bad_grad_norm": float(grad_norm)}
    optimizer.step()
    lag = version - rows.policy_version
    return {"losses/pg": loss, "losses/grad_norm": float(grad_norm),
            "losses/mean_ratio": ratio_sum / max(tokens, 1.0),
            "losses/clip_fraction": clipped / max(tokens, 1.0),
            "losses/logprob": lp_sum / max(seqs, 1.0),
            "reward/mean": float(rows.reward.mean()), "reward/baseline": float(np.mean(rows.baseline)),
            "reward/advantage_abs": float(np.abs(rows.advantages).mean()),
            "staleness/version_lag_mean": float(lag.mean()), "staleness/version_lag_max": int(lag.max())}
