"""Config: typed loading, one clear line for typos, types and conflicts; the reference covers every key."""
import dataclasses
import typing
from pathlib import Path

import pytest

from retro_dist.config import Config, ConfigError, load_config
from retro_dist.config_reference import config_reference


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_shipped_configs_validate():
    shipped = sorted(Path("configs").glob("*.yaml"))
    assert {"local.yaml", "local-vllm.yaml", "retro-coin.yaml", "cluster-gpu.yaml"} <= {p.name for p in shipped}
    for path in shipped:
        load_config(str(path))  # raises on any unknown key, wrong type or conflict


def test_unknown_key_names_it_and_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'learner\.lrr' \(did you mean 'learner\.lr'\?\)"):
        load_config(_write(tmp_path, "learner:\n  lrr: 0.1\n"))


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'rollouts'"):
        load_config(_write(tmp_path, "rollouts:\n  trials: 2\n"))


def test_wrong_type_and_choice(tmp_path):
    with pytest.raises(ConfigError, match=r"rollout\.trials: expected int, got 'three'"):
        load_config(_write(tmp_path, "rollout:\n  trials: three\n"))
    with pytest.raises(ConfigError, match=r"actor\.backend: 'tgi' is not one of"):
        load_config(_write(tmp_path, "actor:\n  backend: tgi\n"))


def test_conflicts_name_the_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"actor\.base_url is required"):
        load_config(_write(tmp_path, "actor:\n  backend: openai\n"))
    with pytest.raises(ConfigError, match=r"learner\.batch_size must be a multiple"):
        load_config(None, ["learner.batch_size=10", "learner.micro_batch_size=4"])
    with pytest.raises(ConfigError, match=r"replay\.on_overflow"):
        load_config(None, ["replay.on_overflow=explode"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "run: [\n"))


def test_overrides_are_typed():
    cfg = load_config("configs/local.yaml", ["rollout.trials=5", "learner.lr=1e-3", "env.games=[twx/coin, twx/sorting]"])
    assert cfg.rollout.trials == 5 and cfg.learner.lr == 1e-3 and cfg.env.games == ["twx/coin", "twx/sorting"]


def test_override_text_with_colons_stays_a_string():
    per_game = "coin: numLocations=6,includeDoors=0; mapreader: numLocations=11"
    assert load_config("configs/retro-mix.yaml", [f"env.game_params={per_game}"]).env.game_params == per_game
    one_game = "coin: numLocations=6"  # YAML alone would read this as a mapping
    assert load_config("configs/local.yaml", [f"env.game_params={one_game}"]).env.game_params == one_game


def test_reference_documents_every_key():
    ref = config_reference()
    hints = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(hints[section.name]):
            row = next(line for line in ref.splitlines() if line.startswith(f"| `{section.name}.{f.name}`"))
            assert not row.endswith("|  |"), f"{section.name}.{f.name} has no doc"


def test_readme_config_reference_matches_the_code():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Config reference", 1)[1].split("\n## ", 1)[0]
    assert config_reference() in section, "README's config table is stale: paste `retro-dist config-reference`"


def test_leave_one_out_window_and_block_is_refused():
    # replay batches take leave-one-out over the store's whole groups (learner/groups.py)
    assert load_config(None, ["learner.baseline=leave_one_out"]).learner.baseline_version_window == 2
    with pytest.raises(ConfigError, match="learner.baseline_version_window must be >= 0 or null"):
        load_config(None, ["learner.baseline=leave_one_out", "learner.baseline_version_window=-1"])
    with pytest.raises(ConfigError, match="on_overflow 'block' would wait forever"):
        load_config(None, ["replay.on_overflow=block"])
    with pytest.raises(ConfigError, match="learner.micro_batch_size must be >= 1"):
        load_config(None, ["learner.micro_batch_size=0"])
    with pytest.raises(ConfigError, match="rollout.memory_size must be >= 1"):
        load_config(None, ["rollout.memory_size=0"])


def test_empty_section_means_defaults(tmp_path):
    assert load_config(_write(tmp_path, "ray:\nrun:\n  iterations: 2\n")).ray.address is None


def test_mode_specific_keys_in_the_wrong_mode(tmp_path):
    with pytest.raises(ConfigError, match=r"run\.updates applies to run\.mode 'async' only, but run\.mode is 'sync'"):
        load_config(None, ["run.updates=5"])
    with pytest.raises(ConfigError, match=r"rollout\.concurrent_episodes applies to run\.mode 'async' only"):
        load_config(_write(tmp_path, "rollout:\n  concurrent_episodes: 8\n"))
    with pytest.raises(ConfigError, match=r"run\.iterations applies to run\.mode 'sync' only, but run\.mode is 'async'"):
        load_config(None, ["run.mode=async", "run.iterations=3"])
    with pytest.raises(ConfigError, match=r"learner\.updates_per_iteration applies to run\.mode 'sync' only"):
        load_config(None, ["run.mode=async", "learner.updates_per_iteration=2"])
    # the same keys in the right mode are fine
    cfg = load_config(None, ["run.mode=async", "run.updates=5", "rollout.concurrent_episodes=8"])
    assert (cfg.run.updates, cfg.rollout.concurrent_episodes) == (5, 8)


def test_async_limits_name_the_key():
    with pytest.raises(ConfigError, match=r"learner\.max_policy_lag must be >= 0, got -1"):
        load_config(None, ["run.mode=async", "learner.max_policy_lag=-1"])
    with pytest.raises(ConfigError, match=r"rollout\.concurrent_episodes must be >= 1, got 0"):
        load_config(None, ["run.mode=async", "rollout.concurrent_episodes=0"])
    with pytest.raises(ConfigError, match=r"replay\.min_size_to_sample \(64\) > replay\.retention_rows \(10\)"):
        load_config(None, ["run.mode=async", "replay.min_size_to_sample=64", "replay.retention_rows=10"])
    with pytest.raises(ConfigError, match=r"learner\.batch_source must be 'replay' in run\.mode 'async'"):
        load_config(None, ["run.mode=async", "learner.batch_source=fresh"])
    # block is refused for the synchronous loop only: the async learner can wait for inserts
    load_config(None, ["run.mode=async", "replay.on_overflow=block"])
    with pytest.raises(ConfigError, match=r"replay\.on_overflow 'block'"):
        load_config(None, ["replay.on_overflow=block"])
