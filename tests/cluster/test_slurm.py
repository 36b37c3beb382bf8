"""The sbatch script for real on Slurm (opt-in: `make slurm-test`, or `pytest -m slurm`): Ray head on
the allocation's first node, `retro-dist train --address` on it, the run folder written, and the
job's Ray processes gone afterwards. Uses the Slurm that SLURM_CONF points at when it answers,
else starts a one-node Slurm on this machine (cluster/slurm/local-slurm.sh, needs root)."""
import json
import os
import re
import shutil
import subprocess
import tempfile

import pytest

from ray_head import ROOT, RayHead, free_port

pytestmark = [pytest.mark.slurm,
              pytest.mark.skipif(shutil.which("sbatch") is None, reason="sbatch absent (make slurm-test installs it)")]
SCRIPT = ROOT / "cluster" / "slurm"


def _answers(env) -> bool:
    return subprocess.run(["sinfo", "-h"], env=env, capture_output=True, timeout=30).returncode == 0


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory):
    env = dict(os.environ)
    if env.get("SLURM_CONF") and _answers(env):
        yield env, None
        return
    if os.geteuid() != 0:
        pytest.skip("no Slurm answering at SLURM_CONF and not root to start a local one")
    d = tmp_path_factory.mktemp("slurm")
    started = subprocess.run([str(SCRIPT / "local-slurm.sh"), "start", str(d)], capture_output=True, text=True,
                             timeout=120)
    try:
        assert started.returncode == 0, started.stderr
        env["SLURM_CONF"] = str(d / "slurm.conf")
        yield env, d
    finally:
        subprocess.run([str(SCRIPT / "local-slurm.sh"), "stop", str(d)], timeout=60)


def test_sbatch_script_runs_training_on_slurm(slurm_env, tmp_path, tiny_model):
    env, local_dir = slurm_env
    port, temp = free_port(), tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's socket paths
    env = {**env, "RAY_PORT": str(port), "RAY_TEMP_DIR": temp}
    cmd = ["sbatch", "--parsable", "--wait", "--nodes=1", "--cpus-per-task=2", f"--output={tmp_path}/job-%j.out",
           str(SCRIPT / "retro-dist.sbatch"), "configs/test.yaml",
           "--set", f"run.output_dir={tmp_path}/runs", "--set", "run.name=slurm", "--set", "rollout.num_workers=1",
           "--set", f"actor.model={tiny_model}", "--set", f"reflector.model={tiny_model}"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    job_id = done.stdout.strip().split(";")[0]
    out = next(tmp_path.glob("job-*.out")).read_text()
    print(f"--- sbatch {job_id} output ---\n{out}")
    assert done.returncode == 0, done.stderr + out[-3000:]

    assert f"Ray head on localhost (127.0.0.1:{port}), 1 node(s), 2 CPU / 0 GPU each" in out
    assert "run finished:" in out
    run_dir = tmp_path / "runs" / "slurm"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1] and [r["learner/version"] for r in rows] == [1, 2]
    assert all(r["rollout/episodes"] == 4 for r in rows)  # 1 worker × 4 tasks
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["000001", "000002"]
    if local_dir is not None:  # our Slurm's job-completion log
        comp = (local_dir / "jobcomp.log").read_text()
        assert re.search(rf"JobId={job_id} .*JobState=COMPLETED", comp), comp[-2000:]
    head = RayHead.__new__(RayHead)
    head.temp_dir = temp
    assert not head.pids(), "the job's Ray processes outlived it"


def test_requeued_job_resumes_its_run(slurm_env, tmp_path, tiny_model):
    """Preemption: `scontrol requeue` kills the running job and queues it again; the script sees
    SLURM_RESTART_COUNT > 0, passes --resume, and the run finishes from its newest checkpoint."""
    import time

    env, _ = slurm_env
    port, temp = free_port(), tempfile.mkdtemp(prefix="rs", dir="/tmp")
    env = {**env, "RAY_PORT": str(port), "RAY_TEMP_DIR": temp}
    run_dir = tmp_path / "runs" / "slurm"
    cmd = ["sbatch", "--parsable", "--requeue", "--nodes=1", "--cpus-per-task=2", f"--output={tmp_path}/job-%j.out",
           "--open-mode=append", str(SCRIPT / "retro-dist.sbatch"), "configs/test.yaml",
           "--set", f"run.output_dir={tmp_path}/runs", "--set", "run.name=slurm", "--set", "rollout.num_workers=1",
           "--set", "run.iterations=4",
           "--set", f"actor.model={tiny_model}", "--set", f"reflector.model={tiny_model}"]
    job_id = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
                            check=True).stdout.strip().split(";")[0]
    ckpts = run_dir / "checkpoints"
    deadline = time.time() + 300
    while not (ckpts.is_dir() and any((p / "learner_state.json").is_file() for p in ckpts.iterdir())):
        assert time.time() < deadline, "no checkpoint before the requeue"
        time.sleep(1)
    subprocess.run(["scontrol", "requeue", job_id], env=env, check=True, timeout=60)
    while True:  # the requeued job runs again and ends
        state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], env=env, capture_output=True,
                               text=True, timeout=30).stdout.strip()
        if not state:
            break
        assert time.time() < deadline + 300, f"job {job_id} still {state}"
        time.sleep(2)
    out = next(tmp_path.glob("job-*.out")).read_text()
    print(f"--- sbatch {job_id} output (both starts) ---\n{out}")
    assert out.count("Ray head on localhost") == 2 and "run finished:" in out
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["iteration"] == 3 and rows[-1]["learner/version"] == 4
    assert sorted(p.name for p in ckpts.iterdir())[-1] == "000004"
    head = RayHead.__new__(RayHead)
    head.temp_dir = temp
    assert not head.pids(), "the job's Ray processes outlived it"
