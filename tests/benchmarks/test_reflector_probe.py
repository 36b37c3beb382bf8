"""benchmarks/reflector_probe.py: the labels are the prompt's own answer, and a short run on the tiny
model reports every figure (a random exit, the base model, a saved adapter, the SFT curve)."""
import json
import random

import pytest
import torch

from benchmarks import reflector_probe
from retro_dist.agents.backends import load_tokenizer
from retro_dist.config import load_config
from retro_dist.envs.twx import TwxFamily
from retro_dist.learner.policy import PolicyModel

pytestmark = pytest.mark.component
pytest.importorskip("textworld_express")


def _args(tiny_model, tmp_path, *more):
    return ["--config", "configs/retro-mix-wide.yaml", "--set", f"reflector.model={tiny_model}",
            "--train-tasks", "8", "--test-tasks", "6", "--moves", "2", "--epochs", "2", "--batch", "4",
            "--json", str(tmp_path / "probe.json"), *more]


def _config(tiny_model):
    return load_config("configs/retro-mix-wide.yaml", [f"reflector.model={tiny_model}"])


def test_each_label_is_the_way_to_the_room_the_task_names(in_repo, tiny_model):
    cfg = _config(tiny_model)
    tok = load_tokenizer(tiny_model)
    data = reflector_probe.examples(TwxFamily(cfg.env), "test", 5, 2, tok, random.Random(0))
    assert len(data) == 5
    for ids, want, exits in data:
        text = tok.decode(ids)
        room = reflector_probe._ROOM.search(text).group(1)
        start = text.split("\n")[2]  # Game:, Task:, then the start room (compacted)
        assert f"To the {want.capitalize()} you see the {room}." in start
        assert exits == start.count("you see the ")
        assert text.rstrip().endswith("In the next trial I will")


def test_a_short_run_reports_every_figure(in_repo, tiny_model, tmp_path):
    # a saved adapter to score: the fresh LoRA of the same shape, written the way checkpoints are
    cfg = _config(tiny_model)
    ckpt = tmp_path / "ckpt"
    PolicyModel(cfg.reflector, cfg.learner, torch.device("cpu")).model.save_pretrained(ckpt)
    assert reflector_probe.main(_args(tiny_model, tmp_path, "--adapter", str(ckpt))) == 0
    res = json.loads((tmp_path / "probe.json").read_text())
    assert (res["train_maps"], res["test_maps"]) == (8, 6)
    acc = res["accuracy"]
    assert set(acc) == {"a random exit", "base model", f"adapter {ckpt}", "LoRA SFT, 16 examples"}
    assert 0.25 <= acc["a random exit"] <= 1 and all(0 <= a <= 1 for a in acc.values())
    # a LoRA whose B is zero is the base model: the same greedy moves
    assert acc[f"adapter {ckpt}"] == acc["base model"]
    assert [c["examples"] for c in res["sft_curve"]] == [8, 16]
    assert all(c["loss"] > 0 for c in res["sft_curve"])


@pytest.mark.parametrize("full", [False, True])
def test_sft_moves_the_base_weights_only_with_full_finetune(in_repo, tiny_model, full):
    cfg = _config(tiny_model)
    policy = PolicyModel(cfg.reflector, cfg.learner, torch.device("cpu"))
    data = reflector_probe.examples(TwxFamily(cfg.env), "train", 4, 2, policy.tokenizer, random.Random(0))
    embed = policy.model.get_input_embeddings().weight
    before, lora = embed.detach().clone(), policy.trainable_vector()
    opt = torch.optim.AdamW(reflector_probe.trainable(policy, full), lr=1e-3)
    assert reflector_probe.sft_epoch(policy, opt, data, 4, random.Random(0)) > 0
    assert not torch.equal(policy.trainable_vector(), lora)  # the LoRA trains either way
    assert torch.equal(embed.detach(), before) != full


def test_extra_sizes_and_a_fresh_model(in_repo, tiny_model, tmp_path):
    params = "coin: numLocations=6; mapreader: numLocations=11,maxDistanceApart=1"
    assert reflector_probe.with_num_locations(params, 5) == "coin: numLocations=6; mapreader: numLocations=5,maxDistanceApart=1"
    with pytest.raises(ValueError, match="numLocations in mapreader"):
        reflector_probe.with_num_locations("coin: numLocations=6", 5)
    args = _args(tiny_model, tmp_path, "--extra-sizes", "5", "--fresh-model", "1x64", "--full-finetune")
    assert reflector_probe.main(args) == 0
    res = json.loads((tmp_path / "probe.json").read_text())
    assert res["train_maps"] == 16 and res["extra_sizes"] == [5] and res["fresh_model"] == "1x64"
    tiny = sum(p.numel() for p in PolicyModel(_config(tiny_model).reflector, _config(tiny_model).learner,
                                              torch.device("cpu")).model.parameters())
    assert 0 < res["parameters"] < tiny  # one 64-wide layer, not the tiny model's two of 128
    with pytest.raises(SystemExit, match="needs --full-finetune"):
        reflector_probe.main(_args(tiny_model, tmp_path, "--fresh-model", "1x64"))
    with pytest.raises(SystemExit, match="LAYERSxWIDTH"):
        reflector_probe.main(_args(tiny_model, tmp_path, "--fresh-model", "4by256", "--full-finetune"))
