"""Fault 3: the driver is SIGKILLed (its whole process group, and Ray's daemons that left it), then
the same command with `--resume` finishes the run, in sync and async mode.

Versions continue from the newest complete checkpoint, no version number is published with two
different weights (the run's versions.jsonl ledger), no sealed replay row is lost and none is
stored twice.
"""
import pytest

from benchmarks.faults import TrainProcess, metrics, wait_for
from retro_dist.learner import checkpoints, ledger
from retro_dist.replay.audit import audit
from retro_dist.replay.config import ReplayConfig
from retro_dist.replay.store import ReplayStore

pytestmark = pytest.mark.integration


def _keys(run_dir) -> set:
    store = ReplayStore(str(run_dir / "replay"), ReplayConfig())
    return set(store.read("trials", columns=["key"]).column("key").to_pylist()) if store.num_rows("trials") else set()


def _newest_version(run_dir) -> int:
    path = checkpoints.newest(run_dir / "checkpoints")
    return -1 if path is None else int(path.name)


def _kill_then_resume(tmp_path, in_repo, config, overrides, progressed):
    run_dir = tmp_path / "run"
    args = [f"run.output_dir={tmp_path}", "run.name=run", *overrides]
    first = TrainProcess(config, args, run_dir, tmp_path / "driver.log", in_repo)
    try:
        wait_for(lambda: progressed(run_dir), 240, "a checkpoint past v0 and sealed rows", first)
    finally:
        killed = first.kill_group()
    assert first.popen.returncode == -9 and len(killed) > 3  # the driver and Ray's processes
    before_keys, before_version = _keys(run_dir), _newest_version(run_dir)  # nothing runs any more
    published_before = len(ledger.read(run_dir))
    second = TrainProcess(config, args, run_dir, tmp_path / "driver.log", in_repo, resume=True)
    try:
        assert second.wait(300) == 0, second.tail()
    finally:
        if second.popen.poll() is None:
            second.kill_group()
    entries = ledger.read(run_dir)
    # the resumed run republished the checkpoint it restored, then went on from there
    assert entries[published_before]["version"] == before_version
    assert ledger.conflicts(entries) == {}  # no version stands for two different weights
    assert before_keys and before_keys <= _keys(run_dir)  # every sealed row survived
    a = audit(str(run_dir / "replay"))
    assert a["duplicates"] == 0 and a["rows_readable"] == a["rows_committed"], a
    return run_dir, before_version


def test_sync_driver_killed_then_resumed(tmp_path, in_repo, tiny_model):
    run_dir, _ = _kill_then_resume(
        tmp_path, in_repo, "configs/test.yaml",
        [f"actor.model={tiny_model}", f"reflector.model={tiny_model}", "run.iterations=4"],
        lambda d: _newest_version(d) >= 1 and _keys(d))
    rows = metrics(run_dir)
    assert rows[-1]["iteration"] == 3 and rows[-1]["learner/version"] == 4
    assert _newest_version(run_dir) == 4


def test_async_driver_killed_then_resumed(tmp_path, in_repo, tiny_model):
    run_dir, _ = _kill_then_resume(
        tmp_path, in_repo, "configs/test-async.yaml",
        [f"actor.model={tiny_model}", f"reflector.model={tiny_model}", "run.updates=24", "run.log_every_s=1"],
        lambda d: _newest_version(d) >= 2 and _keys(d))
    rows = metrics(run_dir)
    assert rows[-1]["learner/steps"] == 24 and _newest_version(run_dir) == 12
