"""Policy-gradient losses: a hand case, a slow reference, a gradient check, invariances."""
import math

import pytest
import torch

from retro_dist.core.losses import (kl_k3, ppo_clip_loss, regularizer_loss, reinforce_loss, target_logprobs,
                                    target_logprobs_and_entropy, token_entropy, token_logprobs,
                                    value_loss)


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


# ---- KL to the reference, entropy, value regression -------------------------------------------

@pytest.mark.parametrize("chunk", [1, 5, 37, 1000])
def test_chunked_entropy_equals_direct_softmax_entropy_and_its_gradient(chunk):
    hidden, weight, bias, _ = _head_case()
    h1, w1, b1 = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
    logp = torch.log_softmax(h1 @ w1.T + b1, -1)
    full = -(logp.exp() * logp).sum(-1)
    coef = torch.linspace(-1, 2, hidden.shape[0])
    (full * coef).sum().backward()
    h2, w2, b2 = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
    got = token_entropy(h2, w2, b2, chunk_rows=chunk)
    (got * coef).sum().backward()
    assert torch.allclose(got, full, atol=1e-5)
    for a, b in ((h1, h2), (w1, w2), (b1, b2)):
        assert torch.allclose(a.grad, b.grad, atol=1e-5)


def test_gradcheck_chunked_entropy():
    hidden, weight, bias, _ = _head_case(torch.float64, n=6, h=3, v=7)
    args = tuple(t.requires_grad_(True) for t in (hidden, weight, bias))
    assert torch.autograd.gradcheck(lambda h, w, b: token_entropy(h, w, b, chunk_rows=4), args)
    assert token_entropy(hidden[:0], weight).shape == (0,)


@pytest.mark.parametrize("chunk", [1, 5, 1000])
@pytest.mark.parametrize("uses", ["both", "logprob", "entropy"])
def test_fused_logprobs_and_entropy_equal_the_two_pass_reference_in_value_and_gradient(chunk, uses):
    # the reference: target_logprobs and token_entropy, each its own chunked pass
    hidden, weight, bias, targets = _head_case()
    c_lp, c_ent = torch.linspace(-1, 2, len(targets)), torch.linspace(3, -1, len(targets))

    def run(fn):
        h, w, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
        lp, ent = fn(h, w, b)
        # an output the loss does not use stays out of the graph (its gradient is None, not 0)
        terms = {"logprob": (lp * c_lp).sum(), "entropy": (ent * c_ent).sum()}
        sum(v for k, v in terms.items() if uses in (k, "both")).backward()
        return lp.detach(), ent.detach(), (h.grad, w.grad, b.grad)

    lp1, ent1, g1 = run(lambda h, w, b: (target_logprobs(h, w, targets, b, chunk_rows=chunk),
                                         token_entropy(h, w, b, chunk_rows=chunk)))
    lp2, ent2, g2 = run(lambda h, w, b: target_logprobs_and_entropy(h, w, targets, b, chunk_rows=chunk))
    assert lp2.dtype == ent2.dtype == torch.float32
    assert torch.allclose(lp2, lp1, atol=1e-5) and torch.allclose(ent2, ent1, atol=1e-5)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-5)


def test_fused_logprobs_and_entropy_unused_entropy_costs_no_gradient_and_gradcheck():
    hidden, weight, bias, targets = _head_case(torch.float64, n=6, h=3, v=7)
    args = tuple(t.requires_grad_(True) for t in (hidden, weight, bias))
    for pick in ((0, 1), (0,), (1,)):  # both outputs in the loss, or either alone
        assert torch.autograd.gradcheck(
            lambda h, w, b: tuple(target_logprobs_and_entropy(h, w, targets, b, chunk_rows=4)[i] for i in pick), args)
    lp, ent = target_logprobs_and_entropy(hidden[:0], weight, targets[:0])
    assert lp.shape == ent.shape == (0,)
    # bf16 hidden states: fp32 results, equal to the reference on the same (rounded) inputs
    h32, w32, _, t32 = _head_case()
    lp, ent = target_logprobs_and_entropy(h32.bfloat16(), w32, t32)
    assert lp.dtype == ent.dtype == torch.float32
    assert torch.allclose(ent, token_entropy(h32.bfloat16().float(), w32), atol=1e-5)
    assert torch.allclose(lp, target_logprobs(h32.bfloat16().float(), w32, t32), atol=1e-5)


def test_entropy_of_uniform_and_peaked_rows():
    weight = torch.eye(4)
    got = token_entropy(torch.tensor([[0.0, 0, 0, 0], [50.0, 0, 0, 0]]), weight)
    assert got[0].item() == pytest.approx(math.log(4)) and got[1].item() == pytest.approx(0.0, abs=1e-6)


def test_k3_is_an_unbiased_nonnegative_kl_estimate():
    # tokens sampled from p: E_p[k3] = KL(p ‖ q) exactly, computed here as a weighted sum
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(10, generator=g, dtype=torch.float64), -1)
    q = torch.softmax(torch.randn(10, generator=g, dtype=torch.float64), -1)
    k3 = kl_k3(p.log(), q.log())
    assert (k3 >= 0).all()
    assert float((p * k3).sum()) == pytest.approx(float((p * (p.log() - q.log())).sum()), rel=1e-12)
    assert kl_k3(p.log(), p.log()).abs().max() == 0


def test_regularizer_value_against_direct_sum_and_padding():
    logp = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -0.1, 7.0]])
    ref = torch.tensor([[-1.5, -1.0, 3.0], [-0.5, -0.3, -2.0]])
    ent = torch.tensor([[0.7, 1.1, 5.0], [0.2, 0.4, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])  # the last column is padding (garbage)
    loss, kl_sum, ent_sum = regularizer_loss(logp, ref, ent, mask, normalizer=4, kl_coef=0.3, entropy_coef=0.05)
    direct_kl = sum(math.exp(r - l) - (r - l) - 1 for l, r in [(-1, -1.5), (-2, -1), (-0.5, -0.5), (-0.1, -0.3)])
    assert kl_sum == pytest.approx(direct_kl, rel=1e-6) and ent_sum == pytest.approx(2.4, rel=1e-6)
    assert loss.item() == pytest.approx((0.3 * direct_kl - 0.05 * 2.4) / 4, rel=1e-6)


def test_kl_gradient_pulls_log_probs_toward_the_reference_and_entropy_gradient_raises_entropy():
    logp = torch.tensor([[-3.0, -0.2]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.float64)
    zero = torch.zeros(1, 2, dtype=torch.float64)
    loss, _, _ = regularizer_loss(logp, ref, zero, mask, 1, kl_coef=1.0, entropy_coef=0.0)
    loss.backward()
    # below the reference: descent raises log π (negative gradient); above: lowers it; 1 − e^u exactly
    assert logp.grad[0, 0] < 0 < logp.grad[0, 1]
    assert torch.allclose(logp.grad, 1 - torch.exp(ref - logp.detach()))
    # the entropy bonus: one descent step on its loss makes a peaked head's rows flatter
    hidden, weight, bias, _ = _head_case(n=5)
    w = weight.clone().requires_grad_(True)
    ent = token_entropy(hidden, w, bias)
    loss, _, before = regularizer_loss(ent[None] * 0, ent[None].detach() * 0, ent[None], torch.ones(1, 5), 1, 0.0, 1.0)
    loss.backward()
    with torch.no_grad():
        after = token_entropy(hidden, w - 1e-2 * w.grad, bias).sum()
    assert w.grad.abs().sum() > 0 and float(after) > before


def test_value_loss_matches_mse_and_its_gradient_sign():
    pred = torch.tensor([0.5, -0.2, 0.0], requires_grad=True)
    target = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)
    loss = value_loss(pred, target, normalizer=3)
    assert loss.item() == pytest.approx((0.25 + 0.64) / 3)
    loss.backward()
    assert pred.grad[0] < 0 < pred.grad[1] and pred.grad[2] == 0  # descent moves each prediction to its reward
