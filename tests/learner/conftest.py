import numpy as np
import pyarrow as pa
import pytest
import torch

from retro_dist.core.records import ReflectionSample, make_key, to_batch


def random_rows(n: int, seed: int = 0, vocab: int = 1097, prompt=(5, 60), refl=(1, 12), version: int = 0):
    """n reflection rows of random lengths and token ids, with random behaviour log-probs and rewards."""
    g = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = g.integers(4, vocab, size=int(g.integers(*prompt))).tolist()
        y = g.integers(4, vocab, size=int(g.integers(*refl))).tolist()
        out.append(ReflectionSample(key=make_key("t", 0, i, 0), run_id="t", worker_id=0, episode_id=i,
                                    task_id=f"twx/coin/train/{i % 3}", env_name="twx/coin", trial=0,
                                    prompt_ids=p, reflection_ids=y,
                                    behaviour_logprobs=(-g.random(len(y)) * 8).tolist(), reflection_text="",
                                    return_before=0.0, return_after=float(i % 2), reward=float(g.normal()),
                                    policy_version=version))
    return pa.Table.from_batches([to_batch(out)])


@pytest.fixture
def rows_table():
    return random_rows(7)


def randomize_lora(model, seed: int = 0, scale: float = 0.05) -> None:
    """LoRA B starts at 0 (the adapter is a no-op); give it weights so gradients reach every tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
