"""`retro-dist eval`: N held-out tasks × K trials, four arms, spread over Ray workers.

Reports cumulative success by trial per arm (the paper's table) with Wilson 95% intervals, the
paired trained − initial difference at the last trial with its 95% interval, and writes
`eval.md`, `eval.json` and `eval.png` to the output folder.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from retro_dist.config import Config
from retro_dist.core.stats import cumulative_success, paired_difference, wilson_interval
from retro_dist.envs.registry import TaskMix
from retro_dist.launch.preflight import preflight
from retro_dist.rollout.evaluation import ARMS, Evaluator, load_adapter


def _arm_order(arms: Sequence[str]) -> list[str]:
    # `initial` must run before the worker's reflector gets the trained adapter
    return sorted(arms, key=lambda a: ("none", "initial", "oracle", "trained").index(a))


def run_eval(cfg: Config, checkpoint: Optional[str], n_tasks: int, trials: int, split: str,
             output: str, arms: Sequence[str] = ARMS, address: Optional[str] = None,
             reflection_temperature: Optional[float] = None) -> dict:
    """`reflection_temperature` overrides the reflector's sampling temperature for both reflector
    arms alike (training needs 1.0; evaluation may decode greedily with 0)."""
    from retro_dist.launch.train import with_absolute_model_paths

    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm(s) {', '.join(unknown)} (arms: {', '.join(ARMS)})")
    if "trained" in arms and not checkpoint:
        raise ValueError("the trained arm needs --checkpoint (a peft adapter folder)")
    preflight(cfg)
    cfg = with_absolute_model_paths(dataclasses.replace(cfg, env=dataclasses.replace(cfg.env, split=split)))
    if cfg.run.mode == "async":  # evaluation runs lockstep chunks; an async config sizes them by episodes in flight
        cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout,
                                                                   parallel_tasks=cfg.rollout.concurrent_episodes))
    if reflection_temperature is not None:
        cfg = dataclasses.replace(cfg, reflector=dataclasses.replace(cfg.reflector, temperature=reflection_temperature))
    adapter = load_adapter(checkpoint) if checkpoint else None
    tasks = TaskMix(cfg.env, split).take(0, n_tasks)
    arms = _arm_order(arms)
    t0 = time.time()
    n_workers = max(1, cfg.rollout.num_workers)
    shards = [tasks[i::n_workers] for i in range(n_workers)]
    if cfg.rollout.num_workers == 0 and not address:
        ev = Evaluator(cfg)
        per_shard = [{arm: ev.run_arm(arm, shards[0], trials, adapter) for arm in arms}]
        ev.close()
    else:
        per_shard = _on_ray(cfg, shards, arms, trials, adapter, address)
    first = unshard(per_shard, arms, len(tasks))
    report = _report(first, tasks, trials, split, checkpoint, time.time() - t0)
    report["reflection_temperature"] = cfg.reflector.temperature
    _write(report, Path(output))
    return report


def unshard(per_shard: list[dict], arms: Sequence[str], n_tasks: int) -> dict:
    """Undo the round-robin sharding: shard s holds tasks s, s + W, s + 2W, ..."""
    n_workers = len(per_shard)
    first = {arm: [None] * n_tasks for arm in arms}
    for s, result in enumerate(per_shard):
        for arm in arms:
            for j, f in enumerate(result[arm]):
                first[arm][s + j * n_workers] = f
    return first


def _on_ray(cfg: Config, shards, arms, trials, adapter, address):
    import ray

    from retro_dist.launch.netsec import init_local, secret_env_vars

    env_vars = {"VLLM_CPU_KVCACHE_SPACE": str(cfg.vllm.kv_cache_gib)}
    if address:  # the API key reaches remote workers only this way (a local cluster inherits it)
        key = secret_env_vars(cfg.actor.api_key_env if cfg.actor.backend == "openai" else None)
        ray.init(address=address, runtime_env={"env_vars": {**env_vars, **key}})
    else:
        init_local(num_cpus=cfg.ray.num_cpus or len(shards), runtime_env={"env_vars": env_vars})
    try:
        cls = ray.remote(Evaluator).options(num_cpus=cfg.rollout.worker_num_cpus,
                                            num_gpus=cfg.rollout.worker_num_gpus)
        workers = [cls.remote(cfg, i) for i in range(len(shards))]
        adapter_ref = ray.put(adapter)  # one copy in the object store for every worker

        def shard_result(w, shard):
            return {arm: w.run_arm.remote(arm, shard, trials, adapter_ref if arm == "trained" else None)
                    for arm in arms}

        futures = [shard_result(w, shard) for w, shard in zip(workers, shards)]
        return [{arm: ray.get(f[arm]) for arm in arms} for f in futures]
    finally:
        ray.shutdown()


def _report(first: dict, tasks, trials: int, split: str, checkpoint, seconds: float) -> dict:
    n = len(tasks)
    rates = {arm: cumulative_success(f, trials).tolist() for arm, f in first.items()}
    ci = {arm: [list(wilson_interval(r * n, n)) for r in rs] for arm, rs in rates.items()}
    games = [t.env_name for t in tasks]
    # first_success: per arm, per task (in task_ids order), the first trial solved (0-based) or null,
    # so paired statistics can be recomputed from this file alone.
    report = {"arms": rates, "ci95": ci, "tasks": n, "trials": trials, "split": split,
              "task_ids": [t.task_id for t in tasks], "seeds": [t.seed for t in tasks], "games": games,
              "first_success": first, "checkpoint": checkpoint, "seconds": seconds}
    if len(set(games)) > 1:
        report["by_game"] = {g: {arm: cumulative_success([f for f, gg in zip(fs, games) if gg == g], trials).tolist()
                                 for arm, fs in first.items()} for g in sorted(set(games))}
    if "trained" in first and "initial" in first:
        mean, lo, hi = paired_gain(report, "trained", "initial")
        report["trained_minus_initial_last_trial"] = {"mean": mean, "ci95": [lo, hi]}
    return report


def paired_gain(report: dict, arm: str, base: str, game: Optional[str] = None) -> tuple[float, float, float]:
    """Mean difference in success by the last trial, `arm` − `base`, paired over the same tasks
    (optionally one game's), with its 95% interval; from an eval.json's per-task outcomes."""
    last = report["trials"] - 1
    keep = [game is None or g == game for g in report.get("games", [None] * report["tasks"])]
    solved = {a: [1.0 if f is not None and f <= last else 0.0 for f, k in zip(report["first_success"][a], keep) if k]
              for a in (arm, base)}
    return paired_difference(solved[arm], solved[base])


def markdown(report: dict) -> str:
    k = report["trials"]
    lines = [f"Cumulative success rate by trial: {report['tasks']} tasks, split `{report['split']}`, "
             f"95% Wilson intervals.", "",
             "| arm | " + " | ".join(f"trial {i + 1}" for i in range(k)) + " |",
             "|---|" + "---|" * k]
    for arm, rs in report["arms"].items():
        cells = [f"{r:.3f} [{lo:.3f}, {hi:.3f}]" for r, (lo, hi) in zip(rs, report["ci95"][arm])]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    if "trained_minus_initial_last_trial" in report:
        d = report["trained_minus_initial_last_trial"]
        lines += ["", f"Trained − initial at trial {k} (paired over tasks): {d['mean']:+.3f} "
                      f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"]
    if "by_game" in report:
        arms = list(report["arms"])
        paired = "trained" in arms and "initial" in arms
        lines += ["", f"By game: success by trial {k}.", "",
                  "| game | tasks | " + " | ".join(arms) + (" | trained − initial |" if paired else " |"),
                  "|---|---|" + "---|" * (len(arms) + paired)]
        for g, rates in report["by_game"].items():
            cells = [f"{rates[a][-1]:.3f}" for a in arms]
            if paired:
                m, lo, hi = paired_gain(report, "trained", "initial", game=g)
                cells.append(f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]")
            lines.append(f"| {g} | {report['games'].count(g)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=1))
    (out / "eval.md").write_text(markdown(report))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("retro-dist: matplotlib not installed; skipping eval.png")
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    x = np.arange(1, report["trials"] + 1)
    for arm, rs in report["arms"].items():
        lo, hi = np.array(report["ci95"][arm]).T
        ax.errorbar(x, rs, yerr=[np.array(rs) - lo, hi - np.array(rs)], marker="o", capsize=3, label=arm)
    ax.set_xlabel("trial")
    ax.set_ylabel("cumulative success rate")
    ax.set_xticks(x)
    ax.set_title(f"{report['tasks']} held-out tasks ({report['split']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "eval.png", dpi=120)
    plt.close(fig)


def select_checkpoint(cfg: Config, run_dir: str, every: int, n_tasks: int, trials: int, split: str = "dev",
                      address: Optional[str] = None) -> dict:
    """Evaluate the trained arm for every `every`-th checkpoint (and the last) on a held-out fold
    other than test, and pick the best success at the last trial. Writes `select-<split>.json`."""
    if split == "test":
        raise ValueError("select checkpoints on dev (or train), never on the test split you report")
    ckpts = sorted(p for p in (Path(run_dir) / "checkpoints").glob("[0-9]*") if p.suffix != ".tmp")
    if not ckpts:
        raise FileNotFoundError(f"no checkpoints under {run_dir}/checkpoints")
    chosen = [p for p in ckpts if int(p.name) % every == 0]
    chosen += [ckpts[-1]] if ckpts[-1] not in chosen else []
    scores = {}
    for p in chosen:
        report = run_eval(cfg, str(p), n_tasks, trials, split, str(Path(run_dir) / f"select-{split}" / p.name),
                          arms=["trained"], address=address)
        scores[str(p)] = report["arms"]["trained"][-1]
        print(f"  {p.name}: success at trial {trials} on {split} = {scores[str(p)]:.3f}", flush=True)
    best = max(scores, key=lambda k: (scores[k], k))  # ties: the later checkpoint
    out = {"split": split, "tasks": n_tasks, "trials": trials, "scores": scores, "best": best}
    (Path(run_dir) / f"select-{split}.json").write_text(json.dumps(out, indent=1))
    return out
