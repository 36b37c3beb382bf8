"""ReplayConfig validation and the `replay stats` / `replay export` tools."""
import argparse

import pyarrow.parquet as pq
import pytest

from retro_dist.core.records import ReflectionSample, TrialRecord, make_key, to_batch
from retro_dist.replay import tools
from retro_dist.replay.config import ReplayConfig
from retro_dist.replay.writer import ReplayWriter


@pytest.mark.parametrize("field,value", [("seal_rows", 0), ("sampler", "greedy"),
                                         ("on_overflow", "wait"), ("max_staleness", -1),
                                         ("retention_rows", 0), ("priority_exponent", -0.5)])
def test_config_errors_name_the_key(field, value):
    with pytest.raises(ValueError, match=rf"^replay\.{field}: "):
        ReplayConfig(**{field: value})


def _fill(root):
    refl = [ReflectionSample(make_key("r", 0, i, 0), "r", 0, i, f"task{i % 2}", "env", 0, [1],
                             [2], [-1.0], "x", 0.0, 1.0, 1.0, i % 3) for i in range(6)]
    trial = [TrialRecord(make_key("r", 0, i, 0), "r", 0, i, "task0", "env", 0, ["go"], ["a", "b"],
                         [0.0], [], 0.0, False, 0) for i in range(4)]
    with ReplayWriter(root, "w0", ReplayConfig()) as w:
        w.append("reflections", to_batch(refl))
        w.append("trials", to_batch(trial))


def test_stats_text_and_export(tmp_path):
    root = str(tmp_path / "store")
    _fill(root)
    text = tools.stats_text(root)
    assert "rows 10" in text and "table reflections: rows 6" in text
    assert "v0=2, v1=2, v2=2" in text and "task0=3" in text
    paths = tools.export(root, str(tmp_path / "out"))
    assert [p.rsplit("/", 1)[1] for p in paths] == ["reflections.parquet", "trials.parquet"]
    assert pq.read_table(paths[0]).num_rows == 6 and pq.read_table(paths[1]).num_rows == 4


def test_cli_subcommands(tmp_path, capsys):
    root = str(tmp_path / "store")
    _fill(root)
    parser = argparse.ArgumentParser(prog="retro-dist")
    tools.add_subcommands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["replay", "stats", root])
    assert args.func(args) == 0 and "rows 10" in capsys.readouterr().out
    args = parser.parse_args(["replay", "export", root, "--format", "parquet",
                              "--output", str(tmp_path / "o")])
    assert args.func(args) == 0
    assert (tmp_path / "o" / "trials.parquet").exists()
