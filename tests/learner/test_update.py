"""Update step: token-budget micro-batches give the one-big-batch gradient (accumulation
invariance), and the plan respects both budgets."""
import numpy as np
import pytest
import torch
from conftest import random_rows, randomize_lora

from retro_dist.config import LearnerConfig, ReflectorConfig
from retro_dist.core import losses
from retro_dist.learner.batches import Rows, micro_batch, plan_micro_batches
from retro_dist.learner.distributed import Group
from retro_dist.learner.policy import KLLog, PolicyModel
from retro_dist.learner.update import KL_LOG_EVERY, KL_LOG_ROWS, accumulate_gradients, gradient_step


def test_plan_sorts_by_length_and_respects_both_budgets():
    lengths = [10, 300, 40, 41, 5, 120, 7]
    plan = plan_micro_batches(lengths, max_rows=3, max_tokens=130)
    assert sorted(i for mb in plan for i in mb) == list(range(len(lengths)))
    flat = [lengths[i] for mb in plan for i in mb]
    assert flat == sorted(lengths, reverse=True)
    for mb in plan:
        assert len(mb) <= 3
        assert len(mb) == 1 or len(mb) * max(lengths[i] for i in mb) <= 130  # a lone 300-token row may exceed
    assert plan[0] == [1] and plan[1] == [5]
    assert plan_micro_batches(lengths, max_rows=100, max_tokens=None) == [sorted(range(7), key=lambda i: -lengths[i])]


@pytest.mark.component
@pytest.mark.parametrize("loss", ["reinforce", "ppo_clip"])
def test_token_budget_micro_batches_equal_one_big_batch(tiny_model, loss):
    table = random_rows(7, seed=3)
    g = np.random.default_rng(0)
    rows = Rows.from_table(table, g.normal(size=7), np.zeros(7), on_policy=False)
    grads, stats = [], []
    policy = PolicyModel(ReflectorConfig(model=tiny_model), LearnerConfig(), torch.device("cpu"))
    randomize_lora(policy.model)
    for mbs, tokens in ((64, None), (1, None), (64, 90), (3, 150)):
        cfg = LearnerConfig(micro_batch_size=mbs, micro_batch_tokens=tokens, loss=loss, is_truncation=1.5)
        for p in policy.params:
            p.grad = None
        stats.append(accumulate_gradients(policy, cfg, rows, Group()))
        grads.append(torch.cat([p.grad.reshape(-1) for p in policy.params]))
    assert len(plan_micro_batches(rows.lengths(), 64, 90)) > 2  # the budget really split the batch
    for g_, s in zip(grads[1:], stats[1:]):
        assert torch.allclose(g_, grads[0], atol=1e-6)
        assert s[0] == pytest.approx(float(stats[0][0]), abs=1e-5)  # loss
        assert s[3] == stats[0][3]  # tokens
    assert grads[0].abs().sum() > 0


@pytest.mark.component
def test_kl_log_at_kl_coef_0_pays_a_fresh_reference_forward_every_kl_log_every_steps(tiny_model):
    table = random_rows(5, seed=4)
    policy = PolicyModel(ReflectorConfig(model=tiny_model), LearnerConfig(), torch.device("cpu"))
    randomize_lora(policy.model)  # the policy starts away from the reference: KL > 0
    optimizer = torch.optim.AdamW(policy.params, lr=1e-3)
    calls = []
    real = policy.initial_logprobs
    policy.initial_logprobs = lambda mb: calls.append(mb.mask.shape[0]) or real(mb)
    cfg = LearnerConfig(micro_batch_size=3)  # two micro-batches, row 0 in one of them
    for cache in (False, True):  # rows.reference None (fresh rows), or the learner's cache
        rows = Rows.from_table(table, np.ones(5), np.zeros(5), on_policy=False)
        rows.reference = [None] * 5 if cache else None
        first = micro_batch(rows, [0], policy.tokenizer.pad_token_id)
        with torch.no_grad():  # what step 0 must log: the mean k3 over row 0's tokens, before the step
            want = float(losses.kl_k3(policy.logprobs(first), real(first))[first.mask == 1].mean())
        policy.kl_log = KLLog()
        log = []
        for _ in range(KL_LOG_EVERY + 1):
            calls.clear()
            m = gradient_step(policy, optimizer, cfg, rows, Group(), version=0)
            log.append((list(calls), m))
        n0 = len(rows.reflection_ids[0])
        assert log[0][0] == [KL_LOG_ROWS] and log[0][1]["losses/kl_tokens"] == n0
        assert log[0][1]["losses/kl"] == pytest.approx(want, rel=1e-4) and want > 0
        for s, (c, m) in enumerate(log[1:], start=1):
            if cache:  # row 0's reference is cached after step 0: measured every step, never recomputed
                assert c == [] and m["losses/kl_tokens"] == n0
            elif s % KL_LOG_EVERY == 0:
                assert c == [KL_LOG_ROWS] and m["losses/kl_tokens"] == n0
            else:  # nothing measured: the last measurement is repeated, not a 0
                assert c == [] and m["losses/kl_tokens"] == 0
                assert m["losses/kl"] == log[s - s % KL_LOG_EVERY][1]["losses/kl"]
        kls = [m["losses/kl"] for _, m in log]
        assert len(set(kls)) == (len(kls) if cache else 2)  # the policy moved: each measurement differs
