"""Fault 1: a rollout worker process is SIGKILLed mid-run (pid found through Ray, real `kill -9`).

The driver notices, starts a replacement under the same worker id, and reruns what the dead one
left unfinished under the same keys. The run reaches its target; the rows committed before the kill
all read back; no key is stored twice. Sync and async mode, on a local Ray cluster.
"""
import pytest

from benchmarks.faults import TrainProcess, events, kill_worker, metrics, wait_for, worker_pid
from retro_dist.core.records import make_key
from retro_dist.replay.audit import audit
from retro_dist.replay.config import ReplayConfig
from retro_dist.replay.store import ReplayStore

pytestmark = pytest.mark.integration


def _keys(run_dir) -> set:
    store = ReplayStore(str(run_dir / "replay"), ReplayConfig())
    return set(store.read("trials", columns=["key"]).column("key").to_pylist()) if store.num_rows("trials") else set()


def _run_with_a_kill(tmp_path, in_repo, config, overrides, progressed):
    run_dir = tmp_path / "run"
    args = [f"run.output_dir={tmp_path}", "run.name=run", "rollout.num_workers=2",
            "rollout.max_worker_restarts=2", *overrides]
    proc = TrainProcess(config, args, run_dir, tmp_path / "driver.log", in_repo)
    try:
        wait_for(lambda: progressed(run_dir) and worker_pid(run_dir, 1), 240, "progress with worker 1 up", proc)
        before = _keys(run_dir)
        kill_worker(run_dir, 1)
        assert proc.wait(300) == 0, proc.tail()
    finally:
        if proc.popen.poll() is None:
            proc.kill_group()
    return run_dir, before


def _check_recovered(run_dir, before):
    died = events(run_dir, "worker_died")
    assert [e["worker"] for e in died] == [1], died
    back = events(run_dir, "worker_recovered")
    assert [e["worker"] for e in back] == [1] and back[0]["recovery_seconds"] > 0
    started = [e for e in events(run_dir, "worker_started") if e["worker"] == 1]
    assert len(started) == 2 and started[0]["pid"] != started[1]["pid"]  # a new process
    assert before <= _keys(run_dir)  # every row committed before the kill is still readable
    a = audit(str(run_dir / "replay"))
    assert a["duplicates"] == 0 and a["rows_readable"] == a["rows_committed"] > 0, a


def test_sync_run_survives_a_killed_worker(tmp_path, in_repo, tiny_model):
    run_dir, before = _run_with_a_kill(
        tmp_path, in_repo, "configs/test.yaml",
        [f"actor.model={tiny_model}", f"reflector.model={tiny_model}", "run.iterations=3"],
        lambda d: len(metrics(d)) >= 1)  # iteration 0 sealed; the kill lands in a later rollout
    _check_recovered(run_dir, before)
    rows = metrics(run_dir)
    assert [r["iteration"] for r in rows] == [0, 1, 2] and rows[-1]["learner/version"] == 3
    # the replacement reran worker 1's episodes of the interrupted iteration: all of them are stored
    keys = _keys(run_dir)
    for it in range(3):
        for ep in range((it * 2 + 1) * 4, (it * 2 + 2) * 4):  # worker 1's episode ids (4 per iteration)
            assert make_key("run", 1, ep, 0) in keys


@pytest.mark.chaos  # about 110 s on 2 cores; the sync test above covers the same restart in make test
def test_async_run_survives_a_killed_worker(tmp_path, in_repo, tiny_model):
    run_dir, before = _run_with_a_kill(
        tmp_path, in_repo, "configs/test-async.yaml",
        [f"actor.model={tiny_model}", f"reflector.model={tiny_model}", "run.updates=40", "run.log_every_s=1"],
        lambda d: len(_keys(d)) >= 8)
    _check_recovered(run_dir, before)
    rows = metrics(run_dir)
    assert rows[-1]["learner/steps"] == 40
    # the replacement reran worker 1's unfinished episodes under their keys: they are stored now
    keys = _keys(run_dir)
    for e in events(run_dir, "worker_rerun"):
        assert e["worker"] == 1 and all(make_key("run", 1, ep, 0) in keys for ep in e["episode_ids"]), e
