"""Policy-gradient losses: a hand case, a slow reference, a gradient check, invariances."""
import math

import pytest
import torch

from retro_dist.core.losses import ppo_clip_loss, reinforce_loss, target_logprobs, token_logprobs


def slow_reinforce(logp, beh, adv, lengths, n, cap):
    """The formula, one token at a time: -(1/n) Σ_i A_i Σ_t min(π/μ, cap) log π(y_t)."""
    total = 0.0
    for i, L in enumerate(lengths):
        for t in range(L):
            w = min(math.exp(float(logp[i, t]) - float(beh[i, t])), cap)
            total += adv[i] * w * float(logp[i, t])
    return -total / n


def test_hand_computed_on_policy_case():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([2.0, -1.0])
    loss, stats = reinforce_loss(logp, logp.clone(), adv, mask, normalizer=2)
    # -(2 * (-3) + (-1) * (-0.5)) / 2 = 2.75
    assert loss.item() == pytest.approx(2.75)
    assert stats.mean_ratio == pytest.approx(1.0) and stats.clip_fraction == 0.0


def test_matches_slow_reference_off_policy():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(4, 5, generator=g) * 3
    beh = logp + torch.randn(4, 5, generator=g)
    lengths = [5, 3, 1, 4]
    mask = torch.tensor([[1.0] * L + [0.0] * (5 - L) for L in lengths])
    adv = torch.tensor([0.5, -1.0, 2.0, 0.0])
    loss, _ = reinforce_loss(logp, beh, adv, mask, normalizer=4, is_truncation=1.5)
    assert loss.item() == pytest.approx(slow_reinforce(logp, beh, adv.tolist(), lengths, 4, 1.5), rel=1e-5)


def test_gradient_is_advantage_weighted_score_function():
    # d loss / d logp_it = -(A_i * w_it) / n on real tokens, 0 on padding
    logp = torch.tensor([[-1.0, -2.0, -3.0]], dtype=torch.float64, requires_grad=True)
    beh = torch.tensor([[-1.0, -2.5, -3.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    loss, _ = reinforce_loss(logp, beh, torch.tensor([3.0], dtype=torch.float64), mask, normalizer=1)
    loss.backward()
    expected = torch.tensor([[-3.0, -3.0 * math.exp(0.5), 0.0]], dtype=torch.float64)
    assert torch.allclose(logp.grad, expected)


def test_gradcheck_through_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 6, (2, 4))
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    beh = torch.full((2, 3), -1.7, dtype=torch.float64)
    adv = torch.tensor([1.0, -0.5], dtype=torch.float64)

    def f(x):
        return ppo_clip_loss(token_logprobs(x, ids), beh, adv, mask, normalizer=2)[0]

    assert torch.autograd.gradcheck(f, (logits,))


@pytest.mark.parametrize("loss_fn", [reinforce_loss, ppo_clip_loss])
def test_garbage_in_padding_changes_nothing(loss_fn):
    logp = torch.tensor([[-1.0, -2.0, -0.3]], requires_grad=True)
    beh = torch.tensor([[-1.1, -1.9, -0.2]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv = torch.tensor([1.5])
    a, _ = loss_fn(logp, beh, adv, mask, 1)
    garbage_logp = torch.tensor([[-1.0, -2.0, -50.0]])
    garbage_beh = torch.tensor([[-1.1, -1.9, 40.0]])
    b, _ = loss_fn(garbage_logp, garbage_beh, adv, mask, 1)
    assert a.item() == pytest.approx(b.item())


@pytest.mark.parametrize("loss_fn", [reinforce_loss, ppo_clip_loss])
def test_batch_of_8_equals_8_accumulated_batches_of_1(loss_fn):
    torch.manual_seed(1)
    base = -torch.rand(8, 4)
    beh = base + 0.3 * torch.randn(8, 4)
    mask = (torch.rand(8, 4) > 0.3).float()
    adv = torch.randn(8)
    full = base.clone().requires_grad_(True)
    loss_fn(full, beh, adv, mask, normalizer=8)[0].backward()
    acc = base.clone().requires_grad_(True)
    for i in range(8):
        loss_fn(acc[i : i + 1], beh[i : i + 1], adv[i : i + 1], mask[i : i + 1], normalizer=8)[0].backward()
    assert torch.allclose(full.grad, acc.grad, atol=1e-7)


def test_ppo_clip_stops_gradient_outside_the_trust_region():
    logp = torch.tensor([[0.0]], requires_grad=True)
    beh = torch.tensor([[-1.0]])  # ratio e ≈ 2.7 > 1.2 with a positive advantage: clipped
    loss, stats = ppo_clip_loss(logp, beh, torch.tensor([1.0]), torch.ones(1, 1), 1, clip_eps=0.2)
    loss.backward()
    assert logp.grad.abs().item() == 0.0 and stats.clip_fraction == 1.0


def _head_case(dtype=torch.float32, n=37, h=8, v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype)
    weight = torch.randn(v, h, generator=g, dtype=dtype)
    bias = torch.randn(v, generator=g, dtype=dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, bias, targets


@pytest.mark.parametrize("chunk", [1, 5, 37, 1000])
def test_chunked_target_logprobs_equal_full_log_softmax_and_its_gradient(chunk):
    hidden, weight, bias, targets = _head_case()
    h1, w1, b1 = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
    full = torch.log_softmax(h1 @ w1.T + b1, -1).gather(-1, targets[:, None]).squeeze(-1)
    coef = torch.linspace(-1, 2, len(targets))
    (full * coef).sum().backward()
    h2, w2, b2 = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
    got = target_logprobs(h2, w2, targets, b2, chunk_rows=chunk)
    (got * coef).sum().backward()
    assert torch.allclose(got, full, atol=1e-5)
    for a, b in ((h1, h2), (w1, w2), (b1, b2)):
        assert torch.allclose(a.grad, b.grad, atol=1e-5)


def test_gradcheck_chunked_target_logprobs():
    hidden, weight, bias, targets = _head_case(torch.float64, n=6, h=3, v=7)
    args = tuple(t.requires_grad_(True) for t in (hidden, weight, bias))
    assert torch.autograd.gradcheck(lambda h, w, b: target_logprobs(h, w, targets, b, chunk_rows=4), args)


def test_chunked_target_logprobs_are_fp32_from_bf16_hidden_states():
    hidden, weight, _, targets = _head_case()
    got = target_logprobs(hidden.bfloat16(), weight, targets)
    ref = torch.log_softmax(hidden.bfloat16().float() @ weight.T, -1).gather(-1, targets[:, None]).squeeze(-1)
    assert got.dtype == torch.float32 and torch.allclose(got, ref, atol=1e-5)
