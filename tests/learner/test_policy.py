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
