"""`retro-dist train`: run the job in `run.mode` sync or async on the system launch/system.py built.

Sync mode reads like the method (README, "What a run does"): roll out multi-trial episodes with the
current reflector → learn from the stored reflections → publish the new adapter once → workers pull
it before their next episodes. Async mode runs the same parts as independent loops (workers stream
episodes, the learner samples and publishes); the driver only starts, watches and stops them.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import yaml

from retro_dist.config import Config, ConfigError, as_dict
from retro_dist.config_rules import without_other_mode
from retro_dist.core.stats import learning_summary, merge_by_game, summary_lines
from retro_dist.launch.logs import RunLogs
from retro_dist.launch.metrics import MetricsLogger
from retro_dist.launch.preflight import preflight
from retro_dist.launch.system import LocalSystem, RaySystem
from retro_dist.replay import location


def with_absolute_model_paths(cfg: Config) -> Config:
    """Local folders (models, data, game cache) as absolute paths: Ray workers need not share the driver's cwd."""
    def fix(name: str) -> str:
        return str(Path(name).resolve()) if Path(name).is_dir() else name

    env = dataclasses.replace(cfg.env, textworld_cache=str(Path(cfg.env.textworld_cache).resolve()),
                              data_path=str(Path(cfg.env.data_path).resolve()) if cfg.env.data_path else None)
    return dataclasses.replace(cfg, env=env, actor=dataclasses.replace(cfg.actor, model=fix(cfg.actor.model)),
                               reflector=dataclasses.replace(cfg.reflector, model=fix(cfg.reflector.model)))


# Keys that fix episode keys or the adapter's shape: a resumed run must keep them.
RESUME_KEYS = (("rollout", "num_workers"), ("rollout", "tasks_per_iteration"), ("rollout", "repeats_per_task"),
               ("reflector", "model"), ("reflector", "lora_rank"), ("reflector", "lora_alpha"),
               ("reflector", "lora_target_modules"), ("env", "games"), ("env", "split"))


def prepare_run_dir(cfg: Config) -> Path:
    """Check and start the run's outputs; returns its local folder (cfg.run_dir).

    config.yaml goes where the durable outputs go (cfg.run_location: a path, file:// or s3://;
    credentials in the URI are not saved); a remote run keeps logs, TensorBoard and events in
    its local mirror, named in one line on stderr."""
    run_dir, where = cfg.run_dir, cfg.run_location
    shown = location.redact(where)
    if not location.is_empty(where) and not cfg.run.resume:
        raise ConfigError(f"run folder {shown} already exists; set run.resume=true to continue it "
                          f"or pick another run.name")
    saved = location.join(where, "config.yaml")
    resolved = without_other_mode(as_dict(cfg), cfg.run.mode)  # what config.yaml holds
    if cfg.run.resume and location.exists(saved):
        old, new = yaml.safe_load(location.read_file(saved)), resolved
        for section, key in RESUME_KEYS:
            if old.get(section, {}).get(key) != new[section].get(key):
                raise ConfigError(f"run.resume: {section}.{key} was {old.get(section, {}).get(key)!r} in "
                                  f"{location.redact(saved)}, now {new[section].get(key)!r}; a resumed run must keep it")
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved["run"]["output_dir"] = location.redact(cfg.run.output_dir)
    location.write_file_once(saved, yaml.safe_dump(resolved, sort_keys=False).encode())
    if not location.is_local(where):
        print(f"retro-dist: outputs go to {shown}; logs, TensorBoard and events stay in {run_dir}",
              file=sys.stderr)
    return run_dir


def summarize_rollouts(results: list[dict], trials: int) -> dict:
    episodes = sum(r["episodes"] for r in results)
    succ = np.sum([np.asarray(r["success_by_trial"]) * r["episodes"] for r in results], axis=0) / episodes
    out = {f"rollout/success@trial{k}": float(succ[k]) for k in range(trials)}
    n_refl = sum(r["reflections"] for r in results)
    out.update({
        "rollout/episodes": episodes, "rollout/trials": sum(r["trials"] for r in results),
        "rollout/reflections": n_refl, "rollout/stored_rows": sum(r["stored"] for r in results),
        "rollout/errored_episodes": sum(len(r["errors"]) for r in results),
        "rollout/reflection_reward": (sum(r["reward_sum"] for r in results) / n_refl) if n_refl else float("nan"),
        "rollout/policy_versions": sorted({r["policy_version"] for r in results}),
        "time/sync_seconds": float(sum(r["sync_seconds"] for r in results)),
        "sync/probe_gap_max": max((s["sync/probe_gap"] for r in results for s in r["syncs"]), default=0.0),
    })
    out.update(merge_by_game([r.get("by_game") for r in results], trials))  # several games: each one's
    return out


def train(cfg: Config, address: Optional[str] = None) -> Path:
    """Run the configured job (`run.mode` sync or async); returns the run folder."""
    preflight(cfg)
    cfg = with_absolute_model_paths(cfg)
    run_dir = prepare_run_dir(cfg)
    address = address or cfg.ray.address
    logs = RunLogs(run_dir)  # before anything imports vLLM or starts Ray
    logger = system = None
    try:
        logger = MetricsLogger.from_config(cfg, run_dir)  # before the workers: a missing wandb stops here
        system = (LocalSystem(cfg, run_dir) if cfg.rollout.num_workers == 0 and not address
                  else RaySystem(cfg, run_dir, address, logs, echo=logger.write))
        if cfg.run.mode == "sync":
            _train_sync(cfg, system, logger)
        else:
            _train_async(cfg, system, logger)
        write_summary(cfg, run_dir, logger)
    finally:
        if logger is not None:
            logger.close()
        if system is not None:
            system.close()
        logs.close()
    return run_dir


def write_summary(cfg: Config, run_dir: Path, logger: MetricsLogger) -> Optional[dict]:
    """The run's learning summary (every row of metrics.jsonl, a resumed run's earlier ones
    included): printed, and saved as summary.json beside it."""
    rows = [json.loads(line) for line in logger.path.read_text().splitlines() if line.strip()]
    summary = learning_summary(rows, cfg.rollout.trials)
    if summary is None:
        return None
    for line in summary_lines(summary):
        logger.write(line)
    text = json.dumps(summary, indent=1).encode()
    outputs = cfg.outputs_of(run_dir)
    (run_dir / "summary.json").write_bytes(text)
    if not location.is_local(outputs):
        location.write_file_once(location.join(outputs, "summary.json"), text)
    return summary


def _train_sync(cfg: Config, system, logger: MetricsLogger) -> None:
    """Roll out → learn → publish, per iteration; workers pull the new adapter before rolling out."""
    start = system.restore() or 0
    system.publish()  # version `start` (0: the initial LoRA, B = 0, i.e. the base reflector)
    for it in range(start, cfg.run.iterations):
        t0 = time.time()
        results = system.rollout(it)
        metrics = summarize_rollouts(results, cfg.rollout.trials)
        metrics["time/rollout_seconds"] = time.time() - t0
        metrics.update(system.train())
        t1 = time.time()
        system.publish()
        metrics["time/publish_seconds"] = time.time() - t1
        metrics["time/iteration_seconds"] = time.time() - t0
        _print_errors(results, logger)
        logger.log(it, metrics)


def _train_async(cfg: Config, system, logger: MetricsLogger) -> None:
    """The driver as a monitor: start the loops, log every `run.log_every_s`, stop at `run.updates`."""
    system.restore()
    system.start_async()  # a resumed run's workers first rerun what they left unfinished
    interval = 0
    try:
        while True:
            deadline = time.time() + cfg.run.log_every_s
            while time.time() < deadline:
                progress = system.learner_progress()
                logger.progress(progress["steps"])  # redraws the bar (elapsed time, steps) between lines
                if progress["done"]:  # wake early when it is done
                    break
                system.check_workers(wait_s=min(0.5, max(0.0, deadline - time.time())))  # replaces dead ones
            learner, workers = system.poll_async()
            _print_errors(workers, logger)
            metrics = summarize_async(learner, workers, cfg.rollout.trials)
            logger.log(interval, metrics)
            logger.progress(learner["learner/steps"], metrics)
            interval += 1
            if learner["learner/done"]:
                break
    except KeyboardInterrupt:
        logger.write("retro-dist: interrupted; stopping the loops and sealing every writer")
    learner, workers = system.stop_async()
    if learner.get("learner/updates") or any(w["episodes"] for w in workers):
        logger.log(interval, summarize_async(learner, workers, cfg.rollout.trials))


def summarize_async(learner: dict, workers: list[dict], trials: int) -> dict:
    """One logged interval: the learner's step metrics plus the workers' production since the last one."""
    out = dict(learner)
    episodes = sum(w["episodes"] for w in workers)
    wall = max((w["wall_seconds"] for w in workers), default=0.0)
    succ = [w["success_sum"] for w in workers if w["success_sum"] is not None]
    if episodes and succ:
        out.update({f"rollout/success@trial{k}": float(v) for k, v in
                    enumerate(np.sum(succ, axis=0) / episodes)})
    n_refl = sum(w["reflections"] for w in workers)
    syncs = [s for w in workers for s in w["syncs"]]
    out.update({
        "rollout/episodes": episodes, "rollout/episodes_per_s": episodes / wall if wall > 0 else 0.0,
        "rollout/trials": sum(w["trials"] for w in workers), "rollout/reflections": n_refl,
        "rollout/stored_rows": sum(w["stored"] for w in workers),
        "rollout/errored_episodes": sum(len(w["errors"]) for w in workers),
        "rollout/reflection_reward": sum(w["reward_sum"] for w in workers) / n_refl if n_refl else float("nan"),
        "rollout/policy_versions": sorted({v for w in workers for v in w["versions"]}),
        "rollout/worker_versions": [w["version"] for w in workers],
        "rollout/worker_busy_fraction": float(np.mean([w["busy_fraction"] for w in workers])) if workers else 0.0,
        "rollout/paused_seconds": float(sum(w["paused_seconds"] for w in workers)),
        "time/sync_seconds": float(sum(s["sync/seconds"] for s in syncs)),
        "sync/probe_gap_max": max((s["sync/probe_gap"] for s in syncs), default=0.0),
    })
    out.update(merge_by_game([w.get("by_game") for w in workers], trials))
    return out


def _print_errors(results: list[dict], logger: MetricsLogger) -> None:
    for r in results:
        for err in r["errors"][:3]:
            logger.write(f"  worker {r['worker_id']}: episode errored: {err}")
