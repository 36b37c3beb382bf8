"""Names from a config cannot reach outside their folders: run.name (the run folder under
run.output_dir) and game names (cache and data folders) are refused with one ConfigError line;
the env families' own path builders accept only names from their fixed lists."""
import pytest

from retro_dist.config import ConfigError, load_config

ESCAPES = ["..", "../outside", "a/../../b", "/etc", "a/b", ".hidden", "a\\b", "x..y", "", "name with space"]


@pytest.mark.parametrize("name", ESCAPES)
def test_run_name_must_be_one_plain_folder_name(in_repo, name):
    with pytest.raises(ConfigError) as err:
        load_config("configs/test.yaml", [f"run.name={name!r}" if name else "run.name=''"])
    msg = str(err.value)
    assert msg.startswith("run.name") and "\n" not in msg and "no path separators" in msg


@pytest.mark.parametrize("game", ["twx/../../etc", "textworld/../x", "alfworld/..", "twx/a/b", "twx/.git"])
def test_game_names_cannot_escape(in_repo, game):
    with pytest.raises(ConfigError) as err:
        load_config("configs/test.yaml", [f"env.games=[{game}]", "env.data_path=/tmp"])
    assert str(err.value).startswith("env.games") and "\n" not in str(err.value)


def test_plain_names_still_load(in_repo, tmp_path):
    cfg = load_config("configs/test.yaml", ["run.name=exp-1.b_2", f"run.output_dir={tmp_path}",
                                            "env.games=[twx/coin, textworld/coin, alfworld/pick_and_place_simple]",
                                            "env.data_path=/tmp"])
    assert cfg.run_dir == tmp_path / "exp-1.b_2"


def test_env_families_build_paths_from_their_own_lists_only(tmp_path):
    """A game name or split that reaches the path builders directly (not through validate) is
    refused before any path is made from it."""
    from retro_dist.envs import alfworld, hotpotqa, textworld_games

    with pytest.raises(ValueError, match="unknown textworld game"):
        textworld_games.game_dir(tmp_path, "../../escape", "train", 0)
    with pytest.raises(ValueError, match="unknown alfworld game"):
        alfworld.trial_files(tmp_path, "../escape", "train")
    with pytest.raises(ValueError, match="unknown split"):
        alfworld.trial_files(tmp_path, "all", "../../escape")
    with pytest.raises(ValueError, match="unknown split"):
        hotpotqa.load_split(str(tmp_path), "../escape")
    assert list(tmp_path.iterdir()) == []  # nothing was created
