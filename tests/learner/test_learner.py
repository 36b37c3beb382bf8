"""Learner: the gradient moves log-probs the way the advantages say; checkpoints load in peft;
a worker that loads the published adapter reproduces the learner's probe log-probs."""
import numpy as np
import pyarrow as pa
import pytest
import torch

from retro_dist.agents.backends import HFBackend
from retro_dist.config import LearnerConfig, ReflectorConfig
from retro_dist.core.records import ReflectionSample, make_key, to_batch
from retro_dist.learner.learner import Learner
from retro_dist.replay.config import ReplayConfig
from retro_dist.replay.writer import ReplayWriter

pytestmark = pytest.mark.component


def _samples(tok, version=0):
    prompt = tok("Game: twx/coin\nTask: find the coin\nReflection: In the next trial I will").input_ids
    good = tok(" go north", add_special_tokens=False).input_ids
    bad = tok(" look around", add_special_tokens=False).input_ids
    out = []
    for i, (ids, reward) in enumerate([(good, 1.0), (bad, 0.0)] * 2):
        out.append(ReflectionSample(key=make_key("t", 0, i, 0), run_id="t", worker_id=0, episode_id=i,
                                    task_id="twx/coin/train/1", env_name="twx/coin", trial=0,
                                    prompt_ids=prompt, reflection_ids=ids, behaviour_logprobs=[0.0] * len(ids),
                                    reflection_text="", return_before=0.0, return_after=reward,
                                    reward=reward, policy_version=version))
    return out


@pytest.fixture
def learner(tmp_path, tiny_model):
    cfg = LearnerConfig(lr=1e-2, batch_size=4, micro_batch_size=2, updates_per_iteration=3,
                        baseline="leave_one_out", is_truncation=1e9)
    return Learner(cfg, ReflectorConfig(backend="hf", model=tiny_model), str(tmp_path / "replay"),
                   ReplayConfig(min_size_to_sample=1, on_overflow="drop"), str(tmp_path), seed=0)


def _seq_logprob(learner, s):
    ids = torch.tensor([s.prompt_ids + s.reflection_ids])
    with torch.no_grad():
        lp = torch.log_softmax(learner.model(input_ids=ids).logits[0, :-1], -1)
    tgt = ids[0, 1:]
    return float(lp.gather(-1, tgt[:, None]).squeeze(-1)[len(s.prompt_ids) - 1:].sum())


def test_positive_advantage_raises_log_prob_negative_lowers(learner):
    samples = _samples(learner.tokenizer)
    # behaviour log-probs near the current ones; the truncation is off (1e9), so the weights
    # only rescale each token's gradient and cannot flip its sign
    for s in samples:
        full = _seq_logprob(learner, s)
        s.behaviour_logprobs = [full / len(s.reflection_ids)] * len(s.reflection_ids)
    good, bad = samples[0], samples[1]
    before = (_seq_logprob(learner, good), _seq_logprob(learner, bad))
    table = to_batch(samples)
    import pyarrow as pa
    for _ in range(5):
        m = learner.update(pa.Table.from_batches([table]))
    after = (_seq_logprob(learner, good), _seq_logprob(learner, bad))
    assert after[0] > before[0] + 0.1 and after[1] < before[1] - 0.1
    assert m["reward/baseline"] == pytest.approx(0.5)  # leave-one-out: mean of the other three


def test_iteration_reads_replay_checkpoints_and_versions(learner, tmp_path, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    w = ReplayWriter(str(tmp_path / "replay"), "worker-0", ReplayConfig())
    w.append("reflections", to_batch(_samples(learner.tokenizer)))
    w.seal()
    m = learner.train_iteration()
    assert m["learner/updates"] == 3 and m["learner/version"] == 1 and learner.steps == 3
    ckpt = tmp_path / "checkpoints" / "000001"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(ckpt))
    a = dict(model.named_parameters())
    b = dict(learner.model.named_parameters())
    name = next(k for k in b if "lora_B" in k)
    assert torch.equal(a[name], b[name].cpu()) and b[name].abs().sum() > 0
    # a fresh learner restores the version, step count and weights from that checkpoint
    again = Learner(learner.cfg, ReflectorConfig(backend="hf", model=tiny_model), str(tmp_path / "replay"),
                    ReplayConfig(), str(tmp_path), seed=1)
    assert again.restore() == 1 and again.steps == 3
    assert torch.equal(dict(again.model.named_parameters())[name], b[name])


def test_published_adapter_reproduces_probe_on_a_worker_backend(learner, tiny_model):
    import pyarrow as pa

    learner.update(pa.Table.from_batches([to_batch(_samples(learner.tokenizer))]))
    adapter = learner.adapter()
    worker = HFBackend(tiny_model, ReflectorConfig(backend="hf", model=tiny_model))
    probe = adapter.extra["probe"]
    before = np.array(worker.score(probe["prompt_ids"], probe["completion_ids"]))
    worker.load_adapter(adapter)
    after = np.array(worker.score(probe["prompt_ids"], probe["completion_ids"]))
    assert np.abs(after - np.array(probe["logprobs"])).max() < 1e-4
    assert np.abs(before - np.array(probe["logprobs"])).max() > 1e-3  # the update did change the policy


def test_leave_one_out_groups_are_same_task_and_trial(learner):
    samples = _samples(learner.tokenizer)  # one task, trial 0, rewards 1, 0, 1, 0
    samples[3].trial = 1  # a different x: its own group (alone -> running-mean fallback, 0 here)
    adv, base = learner.advantages(pa.Table.from_batches([to_batch(samples)]))
    assert base.tolist() == pytest.approx([0.5, 1.0, 0.5, 0.0])
    assert adv.tolist() == pytest.approx([0.5, -1.0, 0.5, 0.0])


def test_sft_warm_start_fits_only_positively_rewarded_reflections(tmp_path, tiny_model):
    cfg = LearnerConfig(lr=1e-2, batch_size=4, micro_batch_size=4, updates_per_iteration=5, sft_iterations=1)
    lrn = Learner(cfg, ReflectorConfig(backend="hf", model=tiny_model), str(tmp_path / "replay"),
                  ReplayConfig(min_size_to_sample=1, on_overflow="drop"), str(tmp_path), seed=0)
    samples = _samples(lrn.tokenizer)
    w = ReplayWriter(str(tmp_path / "replay"), "worker-0", ReplayConfig())
    w.append("reflections", to_batch(samples))
    w.seal()
    good, bad = samples[0], samples[1]  # rewards 1 and 0
    before = (_seq_logprob(lrn, good), _seq_logprob(lrn, bad))
    m = lrn.train_iteration()
    assert m["learner/sft"] == 1 and m["learner/updates"] == 5
    assert m["reward/mean"] == 1.0  # only positive rows were in the SFT batches
    assert _seq_logprob(lrn, good) > before[0] + 0.5
    assert lrn.train_iteration()["learner/sft"] == 0  # then policy gradients
