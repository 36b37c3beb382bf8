"""Chaos: a training run of a few minutes during which a rollout worker is SIGKILLed every T seconds
and the actor's endpoint (a real vLLM OpenAI-compatible server on loopback) is killed once and
restarted. The run must still reach its target with every committed row readable and none twice.

    python -m benchmarks.chaos --json PATH [--mode async|sync] [--kill-every 30] [--updates 120]

`retro-dist train` runs as its own process (two rollout workers on a local Ray cluster, HF reflector
in the workers, the frozen actor behind the endpoint). Worker pids come from the run's
`events.jsonl`, which the driver fills from the actors themselves. Reported (JSON keys):
`faults_injected`, `recovery_seconds` (per fault: for a worker, from the driver noticing its death
to its replacement running; for the endpoint, from the kill until new rows are committed again),
`updates_completed`, `updates_target`, `rows_committed`, `rows_readable`, `duplicates`.
Targets: rows_readable = rows_committed, duplicates = 0, updates_completed = updates_target.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks import write_json
from benchmarks.faults import TrainProcess, events, kill_worker, metrics, worker_pid
from benchmarks.vllm_server import VLLMServer
from retro_dist.replay.audit import audit, committed_rows

ROOT = Path(__file__).resolve().parents[1]
MODEL = str(ROOT / "models" / "tiny-lm")


def _overrides(args, out_dir: str, url: str) -> tuple[str, list[str]]:
    common = [f"run.output_dir={out_dir}", "run.name=chaos", f"reflector.model={MODEL}",
              "actor.backend=openai", f"actor.base_url={url}", "actor.model=tiny",
              # outlive an endpoint restart (~1 min on this CPU): up to ~2.5 min of retries per request
              "actor.max_retries=30", "actor.retry_backoff_s=0.5", "actor.retry_backoff_max_s=5",
              f"rollout.num_workers={args.workers}", f"rollout.max_worker_restarts={args.max_kills + 2}"]
    if args.mode == "sync":
        return "configs/test.yaml", common + [f"run.iterations={args.updates}"]
    return "configs/test-async.yaml", common + [f"run.updates={args.updates}", "run.log_every_s=2"]


def _steps(run_dir: Path, mode: str) -> int:
    rows = metrics(run_dir)
    if not rows:
        return 0
    return rows[-1]["iteration"] + 1 if mode == "sync" else rows[-1].get("learner/steps", 0)


def chaos(args, out_dir: Path) -> dict:
    run_dir = out_dir / "chaos"
    server = VLLMServer(MODEL, served_name="tiny").start()
    kills, endpoint_recovery, restarted = [], [], False
    config, overrides = _overrides(args, str(out_dir), server.url)
    proc = TrainProcess(config, overrides, run_dir, out_dir / "driver.log", ROOT)
    try:
        t_start = None
        victim = 0
        while proc.popen.poll() is None:
            time.sleep(1)
            if t_start is None:  # the clock starts once both workers run
                if all(worker_pid(run_dir, w) for w in range(args.workers)):
                    t_start = last_kill = time.time()
                continue
            now = time.time()
            if not restarted and now - t_start > args.endpoint_at:
                endpoint_recovery.append(_restart_endpoint(server, run_dir, args.endpoint_down_s))
                restarted = True
            elif len(kills) < args.max_kills and now - last_kill > args.kill_every:
                victim = (victim + 1) % args.workers
                if worker_pid(run_dir, victim):  # not while its replacement is still starting
                    kills.append(kill_worker(run_dir, victim))
                    last_kill = now
        code = proc.wait(60)
    finally:
        if proc.popen.poll() is None:
            proc.kill_group()
        server.close()
    if code != 0:
        raise SystemExit(f"chaos: the run failed (exit {code}); see {out_dir / 'driver.log'}\n{proc.tail()}")
    worker_recovery = [e["recovery_seconds"] for e in events(run_dir, "worker_recovered")]
    store = audit(str(run_dir / "replay"))
    return {"mode": args.mode, "faults_injected": len(kills) + int(restarted),
            "worker_kills": len(kills), "endpoint_restarts": int(restarted),
            "recovery_seconds": [round(s, 2) for s in worker_recovery + endpoint_recovery],
            "updates_completed": _steps(run_dir, args.mode), "updates_target": args.updates,
            "rows_committed": store["rows_committed"], "rows_readable": store["rows_readable"],
            "duplicates": store["duplicates"], "unreadable_segments": store["unreadable_segments"],
            "wall_seconds": round(time.time() - t_start, 1) if t_start else None,
            "errored_episodes": sum(r.get("rollout/errored_episodes", 0) for r in metrics(run_dir))}


def _restart_endpoint(server: VLLMServer, run_dir: Path, down_s: float) -> float:
    """Kill the endpoint, keep it down `down_s`, restart it; seconds from the kill until rows are
    committed again (the workers' retries carried the episodes in flight across the outage)."""
    t_kill = time.time()
    server.kill()
    time.sleep(down_s)
    server.restart()
    rows = committed_rows(str(run_dir / "replay"))
    while committed_rows(str(run_dir / "replay")) == rows and time.time() - t_kill < 600:
        time.sleep(0.5)
    return time.time() - t_kill


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", required=True, help="where to write the figures")
    p.add_argument("--mode", choices=["async", "sync"], default="async")
    p.add_argument("--updates", type=int, default=150, help="learner steps (async) or iterations (sync)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--kill-every", type=float, default=25.0, help="seconds between worker kills")
    p.add_argument("--max-kills", type=int, default=6)
    p.add_argument("--endpoint-at", type=float, default=40.0, help="seconds into the run the endpoint dies")
    p.add_argument("--endpoint-down-s", type=float, default=5.0, help="seconds it stays down before restarting")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        out = chaos(args, Path(tmp))
    ok = (out["rows_readable"] == out["rows_committed"] and out["duplicates"] == 0
          and out["updates_completed"] == out["updates_target"])
    out["targets_met"] = ok
    print(f"{'mode':<22}{out['mode']}")
    for key in ("faults_injected", "worker_kills", "endpoint_restarts", "recovery_seconds", "updates_completed",
                "updates_target", "rows_committed", "rows_readable", "duplicates", "errored_episodes",
                "wall_seconds", "targets_met"):
        print(f"{key:<22}{out[key]}")
    write_json(args.json, out)


if __name__ == "__main__":
    main()
