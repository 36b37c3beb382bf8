"""Async vs sync actor–learner: the same config and number of learner updates in both modes.

    python -m benchmarks.async_vs_sync --json PATH

Both runs go through `retro_dist.launch.train.train` on a local Ray cluster: one rollout worker and
the learner. The frozen actor sits behind an OpenAI-compatible endpoint that answers after a fixed
latency (`benchmarks/fake_openai_server.py`, a separate process): it stands for the rollout GPUs of a
cluster, which the learner does not share. (On this 2-core machine a local actor would make the
worker and the learner fight over the same two cores, and nothing could overlap; `--local-actor`
runs that variant.) The reflector runs in the worker (HF, tiny local model); the learner trains it.
The rollout side is the same in both modes (sync: `parallel_tasks` episodes in lockstep; async: the
same number in flight), and the learner's batch is sized so that learning and rollout take
comparable time, which is where overlapping pays. The async learner is paced by the replay rate
limiter at the sync loop's own sample-to-insert ratio (updates × batch ÷ reflections per
iteration), so it cannot win by training on less data, and both modes drop rows older than
`max_policy_lag` versions.

Reported: wall-clock of the training loop (Ray and model start-up excluded, reported apart),
worker and learner busy fractions, mean/max version lag of the rows trained on, and
`async_vs_sync_speedup` = sync loop seconds ÷ async loop seconds.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import write_json
from benchmarks.fake_openai_server import spawn
from retro_dist.config import load_config
from retro_dist.launch.train import train

ROOT = Path(__file__).resolve().parents[1]


def _common(args, out_dir: str, name: str) -> list[str]:
    model = str(ROOT / "models" / "tiny-lm")
    actor = ([f"actor.model={model}"] if args.url is None else
             ["actor.backend=openai", f"actor.base_url={args.url}", "actor.model=fake"])
    return [f"run.output_dir={out_dir}", f"run.name={name}", f"reflector.model={model}", *actor,
            "rollout.num_workers=1", f"learner.batch_size={args.batch}", f"learner.micro_batch_size={args.micro}",
            "env.step_limit=3", "rollout.trials=2", "replay.min_size_to_sample=1"]


def _read(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_sync(args, out_dir: str) -> dict:
    iterations = args.updates // args.updates_per_version
    cfg = load_config(ROOT / "configs/test.yaml", _common(args, out_dir, "sync") + [
        f"run.iterations={iterations}", f"rollout.tasks_per_iteration={args.episodes}",
        f"rollout.parallel_tasks={args.concurrency}", f"learner.updates_per_iteration={args.updates_per_version}",
        f"replay.max_staleness={args.max_policy_lag}"])  # the same staleness bound as the async learner
    t0 = time.time()
    rows = _read(train(cfg))
    total = time.time() - t0
    loop = sum(r["time/iteration_seconds"] for r in rows)
    rollout, learn = sum(r["time/rollout_seconds"] for r in rows), sum(r["time/learn_seconds"] for r in rows)
    return {"wall_seconds": loop, "startup_seconds": total - loop, "updates": rows[-1]["learner/steps"],
            "worker_busy_fraction": rollout / loop, "learner_busy_fraction": learn / loop,
            "lag_mean": float(np.mean([r["staleness/version_lag_mean"] for r in rows if "staleness/version_lag_mean" in r])),
            "lag_max": max(r.get("staleness/version_lag_max", 0) for r in rows),
            "reflections": sum(r["rollout/reflections"] for r in rows)}


def run_async(args, out_dir: str, reflections_per_iteration: float) -> dict:
    spi = args.updates_per_version * args.batch / max(1.0, reflections_per_iteration)
    cfg = load_config(ROOT / "configs/test-async.yaml", _common(args, out_dir, "async") + [
        f"run.updates={args.updates}", "run.log_every_s=1", f"rollout.concurrent_episodes={args.concurrency}",
        f"rollout.simulators={args.concurrency}", f"learner.updates_per_version={args.updates_per_version}",
        f"learner.max_policy_lag={args.max_policy_lag}", f"replay.samples_per_insert={spi}",
        f"replay.error_buffer={args.batch * args.updates_per_version}", "replay.seal_seconds=0.5",
        f"replay.seal_rows={args.concurrency}"])
    t0 = time.time()
    rows = _read(train(cfg))
    total = time.time() - t0
    loop = rows[-1]["time/learner_wall_seconds"]  # learner loop start → its last step
    trained = [r for r in rows if r.get("learner/updates")]
    weights = np.array([r["learner/updates"] for r in trained], dtype=float)
    busy_w = np.array([r["rollout/worker_busy_fraction"] for r in rows])
    return {"wall_seconds": loop, "startup_seconds": total - loop, "updates": rows[-1]["learner/steps"],
            "worker_busy_fraction": float(busy_w.mean()),
            "learner_busy_fraction": rows[-1]["learner/busy_seconds_total"] / loop,
            "lag_mean": float(np.average([r["staleness/version_lag_mean"] for r in trained], weights=weights)),
            "lag_max": max(r.get("staleness/version_lag_max", 0) for r in rows),
            "dropped_rows": rows[-1]["staleness/dropped_rows"], "samples_per_insert": spi,
            "reflections": sum(r["rollout/reflections"] for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--updates", type=int, default=48, help="learner updates in each mode")
    ap.add_argument("--updates-per-version", type=int, default=4, help="= sync updates_per_iteration")
    ap.add_argument("--episodes", type=int, default=16, help="sync: episodes per iteration")
    ap.add_argument("--concurrency", type=int, default=8, help="sync parallel_tasks = async concurrent_episodes")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--micro", type=int, default=32)
    ap.add_argument("--max-policy-lag", type=int, default=2)
    ap.add_argument("--latency", type=float, default=0.1, help="the actor endpoint's seconds per request")
    ap.add_argument("--local-actor", action="store_true", help="serve the actor in the worker (HF) instead")
    args = ap.parse_args()
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory(prefix="retro-bench-") as out:
        args.url = None if args.local_actor else stack.enter_context(spawn(args.latency))[0]
        sync = run_sync(args, out)
        per_iteration = sync["reflections"] / (args.updates // args.updates_per_version)
        asyn = run_async(args, out, per_iteration)
    result = {"config": vars(args), "sync": sync, "async": asyn,
              "async_vs_sync_speedup": sync["wall_seconds"] / asyn["wall_seconds"],
              "async_max_trained_lag": asyn["lag_max"], "max_policy_lag": args.max_policy_lag}
    print(f"{'mode':6} {'loop s':>7} {'start s':>7} {'updates':>7} {'worker busy':>11} {'learner busy':>12} "
          f"{'lag mean':>8} {'lag max':>7}")
    for name, r in (("sync", sync), ("async", asyn)):
        print(f"{name:6} {r['wall_seconds']:7.1f} {r['startup_seconds']:7.1f} {int(r['updates']):7d} "
              f"{r['worker_busy_fraction']:11.2f} {r['learner_busy_fraction']:12.2f} {r['lag_mean']:8.2f} "
              f"{int(r['lag_max']):7d}")
    print(f"async_vs_sync_speedup {result['async_vs_sync_speedup']:.2f} (target >= 1.5); "
          f"async_max_trained_lag {asyn['lag_max']} <= max_policy_lag {args.max_policy_lag}")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
