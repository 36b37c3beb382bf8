"""One gradient step: micro-batches by token budget, gradients accumulated, summed across the
data-parallel ranks, clipped, AdamW.

Each micro-batch's loss is divided by the row count of the *whole* step (`normalizer`), so the
accumulated gradient equals the one-big-batch gradient however the rows are split, over
micro-batches or over ranks.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from retro_dist.config import LearnerConfig
from retro_dist.core import losses
from retro_dist.learner.batches import Rows, micro_batch, plan_micro_batches
from retro_dist.learner.distributed import Group
from retro_dist.learner.policy import PolicyModel
from retro_dist.learner.value import ValueHead

BAD_STEP = "learner/bad_step"  # in a skipped step's stats: its loss or gradient norm was NaN/inf


N_SUMS = 12  # the per-step sums accumulate_gradients returns (and all-reduces), in this order:
# pg loss, Σ ratio over tokens, clipped tokens, tokens, Σ sequence log-prob, sequences,
# Σ k3 KL over tokens, Σ entropy over tokens, Σ (V − r)² over rows, value rows, total loss,
# tokens the KL was measured on
# kl_coef 0 (the KL only logged): every step measures it on the rows whose reference is already cached
# (free); every KL_LOG_EVERY-th step also runs a fresh no-grad reference forward over its first
# KL_LOG_ROWS rows (cached in turn). A forward over the whole batch would cost a third of the step,
# one row every step a quarter of a 4-row batch; the drift it watches moves slowly.
KL_LOG_ROWS = 1
KL_LOG_EVERY = 4


def accumulate_gradients(policy: PolicyModel, cfg: LearnerConfig, rows: Rows, group: Group,
                         value_head: Optional[ValueHead] = None) -> torch.Tensor:
    """Backward over this rank's micro-batches of the whole loss: policy gradient + KL to the
    initial reflector + entropy bonus (+ the value head's regression); returns the N_SUMS sums
    (float64). The KL and entropy are logged every step, whatever their weights; with kl_coef 0 the
    KL is measured on a few rows only (KL_LOG_ROWS, KL_LOG_EVERY)."""
    plan = plan_micro_batches(rows.lengths(), cfg.micro_batch_size, cfg.micro_batch_tokens)
    fresh_kl = policy.kl_log.steps % KL_LOG_EVERY == 0  # decided alike on every rank (same step count)
    policy.kl_log.steps += 1
    sums = torch.zeros(N_SUMS, dtype=torch.float64)
    fit_value = value_head is not None and rows.fit_value
    for idx in plan[group.rank::group.world_size]:
        mb = micro_batch(rows, idx, policy.tokenizer.pad_token_id).to(policy.device)
        out = policy.forward(mb, entropy=True, entropy_grad=cfg.entropy_coef > 0)
        logp = out.logprobs
        # behaviour None: on-policy (importance weights 1), as the SFT warm start uses it
        beh = logp.detach() if mb.behaviour is None else mb.behaviour
        if cfg.loss == "ppo_clip":
            loss, st = losses.ppo_clip_loss(logp, beh, mb.advantages, mb.mask, len(rows), cfg.clip_eps)
        else:
            loss, st = losses.reinforce_loss(logp, beh, mb.advantages, mb.mask, len(rows), cfg.is_truncation)
        ref, kl_mask = _kl_reference(policy, cfg, rows, idx, mb, logp, fresh_kl)
        reg, _, ent_sum = losses.regularizer_loss(logp, ref, out.entropy, mb.mask, len(rows),
                                                  cfg.kl_coef, cfg.entropy_coef)
        kl_sum = float((losses.kl_k3(logp.detach(), ref) * kl_mask).sum())
        total = loss + reg
        sq_err = 0.0
        if fit_value:  # detached: the value loss trains the head only, never the policy's adapter
            vloss = losses.value_loss(value_head(out.prompt_state.detach()), mb.rewards, len(rows))
            total = total + vloss
            sq_err = float(vloss.detach()) * len(rows)
        total.backward()
        tokens, seqs = float(mb.mask.sum()), len(idx)
        sums += torch.tensor([st.loss, st.mean_ratio * tokens, st.clip_fraction * tokens, tokens,
                              st.mean_logprob * seqs, seqs, kl_sum, ent_sum, sq_err, seqs if fit_value else 0,
                              float(total.detach()), float(kl_mask.sum())], dtype=torch.float64)
    return sums


def _kl_reference(policy: PolicyModel, cfg: LearnerConfig, rows: Rows, idx: list[int], mb,
                  logp: torch.Tensor, fresh: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π_ref, mask of the tokens the KL is measured on) for a micro-batch. With the penalty on,
    every row; with it off, the rows whose reference is cached, and if `fresh` those among the
    step's first KL_LOG_ROWS (the others get π_ref = π_θ, i.e. no KL and no gradient)."""
    if cfg.kl_coef > 0:
        return _reference(policy, rows, idx, mb), mb.mask.to(logp.dtype)
    ref = logp.detach().clone()
    kl_mask = torch.zeros_like(logp)
    cached = rows.reference
    pick = [j for j, i in enumerate(idx)
            if (cached is not None and cached[i] is not None) or (fresh and i < KL_LOG_ROWS)]
    if pick:
        ref[pick] = _reference(policy, rows, [idx[j] for j in pick], mb).to(ref.dtype)
        kl_mask[pick] = mb.mask[pick].to(logp.dtype)
    return ref, kl_mask


def _reference(policy: PolicyModel, rows: Rows, idx: list[int], mb) -> torch.Tensor:
    """log π_ref at the micro-batch's reflection tokens: cached rows from `rows.reference`, the
    others by one no-grad forward (adapter disabled) over those rows only, written back into
    `rows.reference` for the learner's cache."""
    cached = rows.reference
    missing = [j for j, i in enumerate(idx) if cached is None or cached[i] is None]
    ref = torch.zeros((len(idx), mb.mask.shape[1]), dtype=torch.float32)
    for j, i in enumerate(idx):
        if j not in missing:
            ref[j, : len(cached[i])] = torch.as_tensor(cached[i])
    ref = ref.to(mb.mask.device)
    if missing:
        sub = micro_batch(rows, [idx[j] for j in missing], policy.tokenizer.pad_token_id).to(policy.device)
        fresh = policy.initial_logprobs(sub).float()
        for k, j in enumerate(missing):
            n = len(rows.reflection_ids[idx[j]])
            ref[j, :n] = fresh[k, :n]
            if cached is not None:
                cached[idx[j]] = fresh[k, :n].cpu().numpy()
    return ref


def gradient_step(policy: PolicyModel, optimizer: torch.optim.Optimizer, cfg: LearnerConfig, rows: Rows,
                  group: Group, version: int, value_head: Optional[ValueHead] = None) -> dict:
    """Zero, accumulate, all-reduce, clip, step. Every rank returns the same metrics. A step whose
    loss or gradient norm is not finite is skipped (grads zeroed, no optimizer step): its stats are
    `{BAD_STEP: 1, ...}` only."""
    optimizer.zero_grad(set_to_none=True)
    sums = accumulate_gradients(policy, cfg, rows, group, value_head)
    head_params = [] if value_head is None else list(value_head.parameters())
    group.all_reduce_grads_(policy.params + head_params)
    sums = group.all_reduce_sum_(sums.to(policy.device)).cpu() if group.distributed else sums
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.params, cfg.max_grad_norm)
    # the head is clipped on its own: its gradient's scale must not shrink the adapter's step
    head_norm = torch.nn.utils.clip_grad_norm_(head_params, cfg.max_grad_norm) if head_params else torch.zeros(())
    loss, total = float(sums[0]), float(sums[-1])
    norm = float(grad_norm)
    if math.isfinite(norm) and not math.isfinite(float(head_norm)):
        norm = float(head_norm)  # reported: the first non-finite one
    # Decided on the all-reduced losses and gradient norms, so every rank skips the same steps.
    if not (math.isfinite(loss) and math.isfinite(total) and math.isfinite(norm)):
        optimizer.zero_grad(set_to_none=True)  # a NaN/inf step would poison the weights and AdamW's moments
        return {BAD_STEP: 1, "losses/bad_loss": loss if not math.isfinite(loss) else total,
                "losses/bad_grad_norm": norm}
    optimizer.step()
    out = _step_metrics(rows, version, sums.tolist(), float(grad_norm), value_head)
    if out["losses/kl_tokens"] > 0:
        policy.kl_log.last = out["losses/kl"]
    else:  # kl_coef 0 and nothing measured this step: the last measurement, not a 0
        out["losses/kl"] = policy.kl_log.last
    return out


def _step_metrics(rows: Rows, version: int, sums: list, grad_norm: float, value_head) -> dict:
    loss, ratio_sum, clipped, tokens, lp_sum, seqs, kl_sum, ent_sum, sq_err, v_rows, total, kl_tokens = sums
    lag = version - rows.policy_version
    out = {"losses/pg": loss, "losses/total": total, "losses/grad_norm": grad_norm,
           "losses/mean_ratio": ratio_sum / max(tokens, 1.0),
           "losses/clip_fraction": clipped / max(tokens, 1.0),
           "losses/logprob": lp_sum / max(seqs, 1.0),
           "losses/kl": kl_sum / max(kl_tokens, 1.0),  # per reflection token, k3 estimate (nats)
           "losses/kl_tokens": kl_tokens,  # reflection tokens it was measured on (all with kl_coef > 0)
           "losses/entropy": ent_sum / max(tokens, 1.0),  # per reflection token (nats)
           "reward/mean": float(rows.reward.mean()), "reward/baseline": float(np.mean(rows.baseline)),
           "reward/advantage_abs": float(np.abs(rows.advantages).mean()),
           # every baseline kind: how much variance is left in A, and how well b predicts r
           "learner/advantage_var": float(np.var(rows.advantages)),
           "learner/baseline_mse": float(np.mean((rows.reward - rows.baseline) ** 2)),
           "staleness/version_lag_mean": float(lag.mean()), "staleness/version_lag_max": int(lag.max())}
    if value_head is not None and v_rows > 0:
        out["losses/value"] = sq_err / v_rows  # mean (V(x) − r)² before the step
    return out
