"""Update step: token-budget micro-batches give the one-big-batch gradient (accumulation
invariance), and the plan respects both budgets."""
import numpy as np
import pytest
import torch
from conftest import random_rows, randomize_lora

from retro_dist.config import LearnerConfig, ReflectorConfig
from retro_dist.learner.batches import Rows, plan_micro_batches
from retro_dist.learner.distributed import Group
from retro_dist.learner.policy import PolicyModel
from retro_dist.learner.update import accumulate_gradients


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
