"""Policy log-probs: the gathered, chunked fast path equals today's full-logits path (the slow
reference) within 1e-5 in fp32, padded rows and garbage in padded positions included, in value
and in gradient; gradient checkpointing changes nothing."""
import pytest
import torch
from conftest import randomize_lora

from retro_dist.config import LearnerConfig, ReflectorConfig
from retro_dist.learner.batches import collate
from retro_dist.learner.policy import PolicyModel

pytestmark = pytest.mark.component


def _policy(tiny_model, **cfg):
    torch.manual_seed(0)
    policy = PolicyModel(ReflectorConfig(model=tiny_model), LearnerConfig(**cfg), torch.device("cpu"))
    randomize_lora(policy.model)
    return policy


def _case(seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [(30, 5), (7, 9), (50, 1), (12, 12)]
    prompts = [torch.randint(4, 1097, (p,), generator=g).tolist() for p, _ in lengths]
    refl = [torch.randint(4, 1097, (r,), generator=g).tolist() for _, r in lengths]
    return prompts, refl


def _grads(policy, fn, mb, coef):
    for p in policy.params:
        p.grad = None
    lp = fn(mb)
    (lp * coef).sum().backward()
    return lp.detach(), [p.grad.clone() for p in policy.params]


def test_gathered_logprobs_equal_full_logits_reference_with_padding(tiny_model):
    policy = _policy(tiny_model)
    prompts, refl = _case()
    mb = collate(prompts, refl, policy.tokenizer.pad_token_id)
    garbage = mb.input_ids.clone()
    g = torch.Generator().manual_seed(1)
    garbage[mb.attention_mask == 0] = torch.randint(4, 1097, (int((mb.attention_mask == 0).sum()),), generator=g)
    mb_garbage = collate(prompts, refl, 0)
    mb_garbage.input_ids = garbage
    coef = torch.randn(mb.mask.shape, generator=g)
    ref, ref_grads = _grads(policy, policy.reference_logprobs, mb, coef)
    for batch in (mb, mb_garbage):
        fast, fast_grads = _grads(policy, policy.logprobs, batch, coef)
        assert torch.allclose(fast, ref, atol=1e-5)
        assert (fast[mb.mask == 0] == 0).all()  # padding contributes exactly nothing
        for a, b in zip(fast_grads, ref_grads):
            assert torch.allclose(a, b, atol=1e-5)
    # each row alone, unpadded: the same log-probs as in the padded batch
    for i, (p, r) in enumerate(zip(prompts, refl)):
        alone = policy.reference_logprobs(collate([p], [r], 0))[0, : len(r)]
        assert torch.allclose(alone, ref[i, : len(r)], atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model):
    prompts, refl = _case(2)
    coef = torch.randn(4, 12, generator=torch.Generator().manual_seed(3))
    out = []
    for ckpt in (False, True):
        policy = _policy(tiny_model, gradient_checkpointing=ckpt)
        mb = collate(prompts, refl, policy.tokenizer.pad_token_id)
        out.append(_grads(policy, policy.logprobs, mb, coef))
    (lp_a, g_a), (lp_b, g_b) = out
    assert torch.allclose(lp_a, lp_b, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_a, g_b))
    assert any(a.abs().sum() > 0 for a in g_a)


def test_bf16_autocast_keeps_fp32_master_weights_and_stays_close(tiny_model):
    prompts, refl = _case(4)
    fp32, bf16 = _policy(tiny_model, precision="fp32"), _policy(tiny_model, precision="bf16")
    mb = collate(prompts, refl, 0)
    a, b = fp32.logprobs(mb), bf16.logprobs(mb)
    assert b.dtype == torch.float32 and all(p.dtype == torch.float32 for p in bf16.params)
    assert 0 < (a - b).abs().max() < 0.1  # bf16 really ran, and only rounding differs
    # the probe is computed in fp32 whatever the training precision
    assert bf16.probe_logprobs(prompts[0], refl[0]) == pytest.approx(fp32.probe_logprobs(prompts[0], refl[0]), abs=1e-6)


def _two_pass_reference(policy, mb):
    """The pre-fusion path: log-probs and entropies from two separate chunked passes."""
    from retro_dist.core import losses

    hidden = policy._hidden(mb)
    b_idx, t_idx = mb.mask.nonzero(as_tuple=True)
    h = hidden[b_idx, mb.positions[b_idx, t_idx]]
    bias = getattr(policy.head, "bias", None)
    lp = losses.target_logprobs(h, policy.head.weight, mb.targets[b_idx, t_idx], bias, chunk_rows=7)
    ent = losses.token_entropy(h, policy.head.weight, bias, chunk_rows=7)
    scatter = lambda v: torch.zeros(mb.mask.shape).index_put((b_idx, t_idx), v)  # noqa: E731
    return scatter(lp), scatter(ent)


@pytest.mark.parametrize("entropy_grad", [False, True])
def test_one_pass_entropy_equals_the_two_pass_reference_with_and_without_its_gradient(tiny_model, entropy_grad):
    # entropy_coef > 0 trains on the entropy (entropy_grad); at 0 it is only logged, detached
    policy = _policy(tiny_model)
    prompts, refl = _case(5)
    mb = collate(prompts, refl, policy.tokenizer.pad_token_id)
    g = torch.Generator().manual_seed(6)
    c_lp, c_ent = torch.randn(mb.mask.shape, generator=g), torch.randn(mb.mask.shape, generator=g)

    def grads(fn):
        for p in policy.params:
            p.grad = None
        lp, ent = fn()
        loss = (lp * c_lp).sum() + ((ent * c_ent).sum() if entropy_grad else 0.0)
        loss.backward()
        return lp.detach(), ent.detach(), [p.grad.clone() for p in policy.params]

    def fused():
        out = policy.forward(mb, entropy=True, entropy_grad=entropy_grad)
        assert out.entropy.requires_grad == entropy_grad
        return out.logprobs, out.entropy

    lp1, ent1, g1 = grads(lambda: _two_pass_reference(policy, mb))
    lp2, ent2, g2 = grads(fused)
    assert torch.allclose(lp2, lp1, atol=1e-5) and torch.allclose(ent2, ent1, atol=1e-5)
    assert (ent2[mb.mask == 0] == 0).all() and (ent2[mb.mask == 1] > 0).all()
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g2, g1))
    assert any(a.abs().sum() > 0 for a in g2)
