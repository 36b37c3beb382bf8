"""`ray job submit` against a head started with `ray start --head` (token auth on, as Ray 2.60 ships):
the job trains two iterations and the test reads its run folder. On the same head, a config asking
for more CPUs than the cluster has stops at once with the resource check's one line."""
import json
import subprocess
import sys
import time

import pytest

from ray_head import RETRO, RAY, ROOT, RayHead, ray_env

pytestmark = pytest.mark.integration


def _dashboard_missing():
    try:
        from ray._private.utils import get_dashboard_dependency_error
    except ImportError:
        return "ray not installed"
    return get_dashboard_dependency_error()


@pytest.fixture(scope="module")
def head():
    missing = _dashboard_missing()
    if missing:  # the job server is part of the dashboard (ray[default])
        pytest.skip(f"ray job submit needs ray[default] (dashboard): {missing}")
    h = RayHead(num_cpus=3).start()
    try:
        yield h
    finally:
        h.stop()
        assert not h.pids(), "head processes left running"


def test_ray_job_submit_trains_and_writes_run_folder(head, tmp_path, tiny_model):
    out = tmp_path / "runs"
    job_id = f"retro-test-{int(time.time())}"
    cmd = [RAY, "job", "submit", "--address", head.dashboard, "--submission-id", job_id, "--",
           RETRO, "train", "--config", str(ROOT / "configs/test.yaml"), "--address", "auto",
           "--set", f"run.output_dir={out}", "--set", "run.name=job",
           "--set", f"actor.model={tiny_model}", "--set", f"reflector.model={tiny_model}"]
    done = subprocess.run(cmd, cwd=ROOT, env=ray_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"Job '{job_id}' succeeded" in done.stdout + done.stderr
    status = subprocess.run([RAY, "job", "status", "--address", head.dashboard, job_id], env=ray_env(),
                            capture_output=True, text=True, timeout=60)
    assert f"Job '{job_id}' succeeded" in status.stdout + status.stderr

    run_dir = out / "job"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert [r["learner/version"] for r in rows] == [1, 2]
    assert all(r["rollout/episodes"] == 8 for r in rows)  # 2 workers × 4 tasks, on the job's cluster
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["000001", "000002"]
    assert (run_dir / "checkpoints" / "000002" / "adapter_model.safetensors").stat().st_size > 0
    assert {p.name for p in (run_dir / "logs").glob("worker-*.log")} == {"worker-0.log", "worker-1.log"}


def test_run_that_can_never_be_placed_stops_with_one_line(head, tmp_path, tiny_model):
    # 5 workers × 1 CPU + learner 1 CPU = 6 > the head's 3: Ray would leave actors pending forever.
    cmd = [RETRO, "train", "--config", str(ROOT / "configs/test.yaml"), "--address", head.gcs,
           "--set", f"run.output_dir={tmp_path}", "--set", "rollout.num_workers=5",
           "--set", f"actor.model={tiny_model}", "--set", f"reflector.model={tiny_model}"]
    start = time.time()
    done = subprocess.run(cmd, cwd=ROOT, env=ray_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("retro-dist: error: the Ray cluster can never place this run: CPU 6 asked > 3 offered")
    assert "5 rollout worker(s)" in last
    assert time.time() - start < 100  # stopped, not waiting on a pending actor


def test_campaign_runs_each_run_as_a_ray_job(head, tmp_path, tiny_model):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"""
name: jobs
output_dir: {tmp_path}/campaigns
configs: [configs/test.yaml]
grid: {{run.seed: [0, 1]}}
overrides: [actor.model={tiny_model}, reflector.model={tiny_model}, rollout.num_workers=1,
            rollout.worker_num_cpus=0.5, run.iterations=1, rollout.tasks_per_iteration=2,
            rollout.parallel_tasks=2]
eval: {{tasks: 4, trials: 2, split: test, arms: [initial, trained]}}
""")
    cmd = [RETRO, "campaign", "--spec", str(spec), "--jobs-address", head.dashboard, "--parallel", "2"]
    done = subprocess.run(cmd, cwd=ROOT, env=ray_env(), capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("as Ray job") == 2 and done.stdout.count(": SUCCEEDED") == 2
    summary = json.loads((tmp_path / "campaigns" / "jobs" / "campaign.json").read_text())
    assert summary["finished"] == 2 and all("gain" in r for r in summary["runs"])
    for run in ("seed-0", "seed-1"):  # each job trained on the head's cluster, then evaluated
        assert (tmp_path / "campaigns" / "jobs" / run / "train.done").is_file()
        assert (tmp_path / "campaigns" / "jobs" / run / "logs" / "worker-0.log").is_file()


def test_a_local_run_beside_a_ray_start_head_starts_its_own_cluster(head, tmp_path):
    """Without an address, Ray's own ray.init joins the newest `ray start` head of its temp dir
    (/tmp/ray unless told; here the head's) and then refuses num_cpus: a run without `ray.address`
    must start its own local cluster instead (seen: a campaign beside the test suite's heads)."""
    code = ("import ray\nfrom retro_dist.launch.netsec import init_local\n"
            f"ctx = init_local(num_cpus=1, _temp_dir={head.temp_dir!r})\n"
            "print('GCS', ctx.address_info['gcs_address'])\nray.shutdown()\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=ray_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    gcs = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("GCS ")]
    assert gcs and gcs[0] != head.gcs
