"""`retro-dist pretrain-actor --steps N`: bounded by a step count the actor is reproducible (same
seed and steps give bit-identical weights), another seed gives other weights, and `--minutes`
stays an upper bound."""
import json

import pytest
import torch
from safetensors.torch import load_file

from retro_dist.agents.pretrain import build_examples, pretrain_actor, train_actor
from retro_dist.cli import main
from retro_dist.config import EnvConfig

pytestmark = pytest.mark.component


@pytest.fixture(scope="module")
def examples():
    return build_examples(EnvConfig(games=["twx/coin"], step_limit=2), n_tasks=2, seed=0)


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_same_seed_and_steps_give_bit_identical_weights(tmp_path, tiny_model, examples):
    assert len(examples) > 8  # advice and no-advice walks on real coin maps
    runs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        result = train_actor(examples, tiny_model, str(tmp_path / name), minutes=None, steps=3, batch_size=4, seed=seed)
        assert result["steps"] == 3 and result["stopped_by"] == "steps"
        assert json.loads((tmp_path / name / "pretrain.json").read_text())["steps"] == 3
        runs.append(tmp_path / name)
    a, b, c = (_weights(r) for r in runs)
    assert (runs[0] / "model.safetensors").read_bytes() == (runs[1] / "model.safetensors").read_bytes()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the seed matters (batches, so the weights)
    base = load_file(f"{tiny_model}/model.safetensors")
    assert any(not torch.equal(a[k], base[k]) for k in a)  # and training moved them


def test_minutes_is_an_upper_bound_on_steps(tmp_path, tiny_model, examples):
    result = train_actor(examples, tiny_model, str(tmp_path / "out"), minutes=0.0, steps=10**6, batch_size=4)
    assert result["steps"] == 0 and result["stopped_by"] == "minutes"
    with pytest.raises(ValueError, match="needs --steps or --minutes"):
        train_actor(examples, tiny_model, str(tmp_path / "x"), minutes=None, steps=None)


def test_cli_steps_and_cache(tmp_path, tiny_model, in_repo, capsys):
    out = tmp_path / "actor"
    argv = ["pretrain-actor", "--config", "configs/retro-coin.yaml", "--base", tiny_model, "--output", str(out),
            "--tasks", "1", "--steps", "2"]
    assert main(argv) == 0
    assert "(2 steps" in capsys.readouterr().out
    assert json.loads((out / "pretrain.json").read_text())["stopped_by"] == "steps"
    assert pretrain_actor(EnvConfig(), tiny_model, str(out), 1, None, steps=2) is None  # cached: not retrained
    assert main(argv[:-2] + ["--steps", "0"]) == 2 and "--steps must be >= 1" in capsys.readouterr().err
