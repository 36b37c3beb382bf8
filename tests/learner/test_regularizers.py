"""KL penalty to the initial reflector (LoRA disabled) and entropy bonus, in the learner: the KL
starts at 0, stays smaller with kl_coef > 0 than without on the same batches, the logged entropy
is the full-softmax entropy at the reflection tokens, and the bonus raises it."""
import pyarrow as pa
import pytest
import torch

from retro_dist.config import LearnerConfig, ReflectorConfig
from retro_dist.core.records import ReflectionSample, make_key, to_batch
from retro_dist.learner.batches import collate
from retro_dist.learner.learner import Learner
from retro_dist.replay.config import ReplayConfig

pytestmark = pytest.mark.component


def _table(tok, rewards=(1.0, 0.0, 1.0, 0.0)):
    prompt = tok("Game: twx/coin\nTask: find the coin\nTrial 1: In the next trial I will").input_ids
    texts = [" go north", " look around", " go north then east", " take coin"]
    out = []
    for i, (text, r) in enumerate(zip(texts, rewards)):
        ids = tok(text, add_special_tokens=False).input_ids
        out.append(ReflectionSample(key=make_key("t", 0, i, 0), run_id="t", worker_id=0, episode_id=i,
                                    task_id="twx/coin/train/1", env_name="twx/coin", trial=0, prompt_ids=prompt,
                                    reflection_ids=ids, behaviour_logprobs=[0.0] * len(ids), reflection_text="",
                                    return_before=0.0, return_after=r, reward=r, policy_version=0))
    return pa.Table.from_batches([to_batch(out)])


def _learner(tmp_path, tiny_model, **kw):
    cfg = LearnerConfig(lr=2e-2, batch_size=4, micro_batch_size=2, baseline="leave_one_out", batch_source="fresh",
                        is_truncation=1e9, **kw)
    return Learner(cfg, ReflectorConfig(backend="hf", model=tiny_model), str(tmp_path / "replay"),
                   ReplayConfig(), str(tmp_path), seed=0)


def _run(tmp_path, tiny_model, steps, **kw):
    lrn = _learner(tmp_path, tiny_model, **kw)
    table = _table(lrn.tokenizer)
    return lrn, [lrn.update(table) for _ in range(steps)]


def test_kl_penalty_keeps_the_policy_closer_to_the_initial_reflector(tmp_path, tiny_model):
    _, free = _run(tmp_path / "a", tiny_model, 8, kl_coef=0.0)
    _, held = _run(tmp_path / "b", tiny_model, 8, kl_coef=1.0)
    # a fresh LoRA is a no-op (B = 0): the first step's policy is the reference itself
    assert free[0]["losses/kl"] == pytest.approx(0.0, abs=1e-7) and held[0]["losses/kl"] == pytest.approx(0.0, abs=1e-7)
    free_kl, held_kl = [m["losses/kl"] for m in free], [m["losses/kl"] for m in held]
    assert free_kl[-1] > 0.05  # the unpenalised policy really moved
    mean = lambda xs: sum(xs[1:]) / len(xs[1:])  # noqa: E731 (steps 2.., after the first move)
    assert mean(held_kl) < 0.5 * mean(free_kl), (held_kl, free_kl)
    assert held_kl[-1] < 0.5 * free_kl[-1], (held_kl, free_kl)


def test_logged_entropy_is_the_full_softmax_entropy_at_the_reflection_tokens(tmp_path, tiny_model):
    lrn = _learner(tmp_path, tiny_model)
    table = _table(lrn.tokenizer)
    cols = table.to_pydict()
    mb = collate(cols["prompt_ids"], cols["reflection_ids"], lrn.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = lrn.model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits
        logp = torch.log_softmax(logits, -1)
        ent = -(logp.exp() * logp).sum(-1)  # (B, L)
        direct = (ent.gather(1, mb.positions) * mb.mask).sum() / mb.mask.sum()
    m = lrn.update(table)  # entropy_coef 0: computed for the log all the same, before the step
    assert m["losses/entropy"] == pytest.approx(float(direct), rel=1e-5)
    assert m["losses/kl"] == pytest.approx(0.0, abs=1e-7)


def test_entropy_bonus_raises_entropy_where_the_rewards_say_nothing(tmp_path, tiny_model):
    # equal rewards: every leave-one-out advantage is 0, so only the regularisers move the policy
    flat = (0.0, 0.0, 0.0, 0.0)
    lrn = _learner(tmp_path / "bonus", tiny_model, entropy_coef=0.1)
    table = _table(lrn.tokenizer, flat)
    bonus = [lrn.update(table) for _ in range(6)]
    # (the untrained tiny model is near the maximum, log 1097 = 7.0 nats, so the rise is small)
    assert bonus[-1]["losses/entropy"] > bonus[0]["losses/entropy"] + 1e-3
    lrn = _learner(tmp_path / "none", tiny_model)
    none = [lrn.update(table) for _ in range(3)]
    assert none[-1]["losses/entropy"] == pytest.approx(none[0]["losses/entropy"], abs=1e-6)
    assert none[-1]["losses/grad_norm"] == 0.0


def test_reference_log_probs_are_computed_once_per_row_and_match_a_fresh_forward(tmp_path, tiny_model):
    lrn = _learner(tmp_path, tiny_model, kl_coef=0.5)
    table = _table(lrn.tokenizer)
    calls = []
    real = lrn.policy.initial_logprobs
    lrn.policy.initial_logprobs = lambda mb: calls.append(mb.mask.shape[0]) or real(mb)
    stats = [lrn.update(table) for _ in range(4)]
    assert sum(calls) == table.num_rows and len(lrn.reference_cache) == table.num_rows  # first step only
    cols = table.to_pydict()
    mb = collate(cols["prompt_ids"], cols["reflection_ids"], lrn.tokenizer.pad_token_id)
    fresh = real(mb)  # after 4 steps: the adapter moved, the reference did not
    cached = lrn.reference_cache.lookup([hash((tuple(p), tuple(r))) for p, r in
                                         zip(cols["prompt_ids"], cols["reflection_ids"])])
    for j, row in enumerate(cached):
        assert torch.allclose(torch.as_tensor(row), fresh[j, : len(row)], atol=1e-6)
    assert stats[-1]["losses/kl"] > 0
