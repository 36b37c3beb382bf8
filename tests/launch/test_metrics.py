"""MetricsLogger: JSONL rows, status lines from whatever keys are present, the bar only on a terminal, W&B offline."""
import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import textwrap

import numpy as np
import pytest

from retro_dist.config import ConfigError
from retro_dist.launch.metrics import MetricsLogger, async_status_line, progress_postfix

FULL = {"learner/steps": 12, "learner/version": 6, "rollout/episodes_per_s": 3.14, "learner/steps_per_s": 0.4213,
        "staleness/version_lag_max": 1, "staleness/dropped_rows": 0, "losses/mean_ratio": 1.0, "losses/pg": -0.0121,
        "rollout/success@trial0": 0.12, "rollout/success@trial1": 0.2, "rollout/success@trial10": 0.9,
        "rollout/reflection_reward": 0.031}


def test_async_status_line_shows_every_value():
    line = async_status_line(12, 40, FULL)
    assert line == ("[upd 12/40 v6] eps 3.1/s steps 0.42/s lag max 1 | success@trial 0.12 0.20 0.90 | "
                    "refl reward +0.031 | pg -0.012 | ratio 1.00 | dropped 0")  # trial10 sorts after trial1


@pytest.mark.parametrize("drop", [[], list(FULL), ["learner/steps", "learner/version", "losses/pg"]])
def test_async_status_line_tolerates_missing_and_nan(drop):
    m = {k: v for k, v in FULL.items() if k not in drop}
    m["rollout/reflection_reward"] = float("nan") if "rollout/reflection_reward" in m else None
    line = async_status_line(3, 40, m)
    assert line.startswith("[upd ") and "refl reward -" in line
    if "losses/pg" in drop:
        assert "pg - |" in line and "v?" in line and "[upd 3/40" in line


def test_sync_status_line_keeps_todays_format(tmp_path):
    log = MetricsLogger(tmp_path, 3, progress_bar=False)
    m = {"rollout/success@trial0": 0.0, "rollout/success@trial1": 0.5, "rollout/reflection_reward": 0.0,
         "losses/pg": 0.0, "learner/version": 2, "staleness/version_lag_mean": 0.59, "time/rollout_seconds": 14.5,
         "time/learn_seconds": 1.0, "time/sync_seconds": 0.14}
    assert log.status_line(1, m) == ("[iter 2/3] success@trial 0.00 0.50 | refl reward +0.000 | pg +0.0000 | "
                                     "v2 lag 0.59 | rollout 14.5s learn 1.0s sync 0.14s")
    assert log.status_line(0, {}).startswith("[iter 1/3] success@trial - | refl reward - |")
    log.close()


def test_jsonl_row_per_interval_nan_to_null(tmp_path, capsys):
    log = MetricsLogger(tmp_path, 40, mode="async")
    log.log(0, {**FULL, "rollout/reflection_reward": float("nan"), "losses/pg": np.float32(0.5),
                "rollout/policy_versions": [5, 6], "x/inf": float("inf")})
    log.progress(12, FULL)
    log.log(1, {"learner/steps": 20})
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["interval"] for r in rows] == [0, 1]
    assert rows[0]["rollout/reflection_reward"] is None and rows[0]["x/inf"] is None
    assert rows[0]["losses/pg"] == 0.5 and rows[0]["rollout/policy_versions"] == [5, 6]
    assert rows[1] == {"interval": 1, "learner/steps": 20}
    # stderr is not a terminal here: no bar, exactly one status line per interval on stdout
    out, err = capsys.readouterr()
    assert out.splitlines()[0].startswith("[upd 12/40 v6]") and out.splitlines()[1].startswith("[upd 20/40 v?]")
    assert len(out.splitlines()) == 2 and err == ""
    assert (tmp_path / "tensorboard").is_dir()


def test_no_bar_when_stderr_is_not_a_terminal(tmp_path):
    log = MetricsLogger(tmp_path, 5)
    assert log._bar is None
    log.progress(3, FULL)  # a no-op, not an error
    log.close()


def test_bar_on_a_terminal_with_status_lines_above_it(tmp_path):
    """A pseudo-terminal as stdout+stderr: the bar draws, and status lines still come through whole."""
    code = textwrap.dedent(f"""
        import time
        from retro_dist.launch.metrics import MetricsLogger
        log = MetricsLogger({str(tmp_path)!r}, 40, mode="async")
        assert log._bar is not None
        log.progress(5, {{"rollout/episodes_per_s": 2.5, "staleness/version_lag_max": 1}})
        log.log(0, {{"learner/steps": 5, "learner/version": 3}})
        log.progress(7, {{"rollout/reflection_reward": 0.25}})
        time.sleep(1.6)  # no calls: the bar still redraws, elapsed time ticking
        log.close()
    """)
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))  # a 160-column terminal
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=60) == 0
    text = b"".join(chunks).decode()
    assert "updates 5/40" in text and "eps/s 2.50" in text and "lag 1" in text
    assert "updates 7/40" in text and "refl +0.250" in text and "eps/s 2.50 steps/s - lag 1 refl +0.250" in text
    assert "[upd 5/40 v3] eps -/s" in text
    assert "00:01<" in text


def test_missing_wandb_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(ConfigError, match="wandb package is not installed"):
        MetricsLogger(tmp_path, 3, wandb_project="p")


def test_wandb_offline_writes_files_without_network(tmp_path):
    pytest.importorskip("wandb")
    # In a child process, as in a run: W&B's service flushes the run file by the time the process has exited.
    code = textwrap.dedent(f"""
        from retro_dist.launch.metrics import MetricsLogger
        log = MetricsLogger({str(tmp_path)!r}, 3, mode="async", wandb_project="retro-test", wandb_mode="offline",
                            run_name="t", config={{"run": {{"name": "t"}}}})
        log.log(0, {{"losses/pg": 0.5, "learner/steps": 1, "rollout/reflection_reward": float("nan")}})
        log.log(1, {{"losses/pg": 0.25, "learner/steps": 2, "rollout/policy_versions": [0, 1]}})
        log.close()
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    # any network attempt would go to a closed local port; WANDB_MODE=online shows the config key decides
    env.update(WANDB_BASE_URL="http://127.0.0.1:9", WANDB_MODE="online")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("[upd ") == 2 and "wandb" not in proc.stdout + proc.stderr  # silent, no console hooks
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = list(runs[0].glob("run-*.wandb"))
    assert len(records) == 1 and b"losses/pg" in records[0].read_bytes()


def test_progress_postfix_derives_sync_throughput_and_tolerates_gaps():
    assert progress_postfix({"rollout/episodes": 8, "time/iteration_seconds": 4.0}) == "eps/s 2.00 steps/s - lag - refl -"
    assert progress_postfix({}) == "eps/s - steps/s - lag - refl -"
