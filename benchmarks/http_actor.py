"""The recipe's actor behind an OpenAI-compatible HTTP endpoint vs in-process: a short training and its eval.

    python -m benchmarks.http_actor --json PATH [--iterations 15] [--tasks 200]

Two short trainings of `configs/retro-coin.yaml` (same seed, same overrides) through
`retro_dist.launch.train.train`, differing only in where the frozen actor runs:

- `in-process`: the recipe's own actor (HF backend inside each rollout worker);
- `http`: a real vLLM OpenAI-compatible API server on loopback (`benchmarks/vllm_server.py`) serving
  the same checkpoint, used as a black box (`actor.backend: openai`): `score_valid` scores each valid
  action from the prompt log-probs the server echoes (`retro_dist/agents/openai_backend.py`).

Each run's final checkpoint is then evaluated (`retro_dist.launch.evaluate.run_eval`, arms initial
and trained, the test split) through its own actor backend. Reported per path: success by trial for
both arms, the paired trained − initial gain at the last trial with its 95% interval, and training
wall seconds (the whole `train` call, and its iterations alone). The paths share the actor's weights
and the seeds, but not its arithmetic (vLLM's kernels vs HF's), so the two runs may diverge after the
first near-tie between two actions: compare their gains, not episode by episode.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Optional

from benchmarks import write_json
from benchmarks.vllm_server import VLLMServer
from retro_dist.config import load_config
from retro_dist.launch.evaluate import paired_gain, run_eval
from retro_dist.launch.train import train
from retro_dist.learner import checkpoints

ROOT = Path(__file__).resolve().parents[1]
SERVED_NAME = "tiny-actor"


def _overrides(args, out_dir: Path, name: str, url: Optional[str]) -> list[str]:
    common = [f"run.output_dir={out_dir}", f"run.name={name}", f"run.iterations={args.iterations}",
              f"run.seed={args.seed}", f"actor.model={args.model}", f"reflector.model={args.model}",
              *args.set]
    if url is None:
        return common
    return common + ["actor.backend=openai", f"actor.base_url={url}", f"actor.model={SERVED_NAME}"]


def run_path(args, out_dir: Path, name: str, url: Optional[str] = None) -> dict:
    """Train the short run, evaluate its final checkpoint; the row of the table."""
    cfg = load_config(args.config, _overrides(args, out_dir, name, url))
    print(f"[{name}] training {args.iterations} iterations (actor: {cfg.actor.backend} {cfg.actor.model})",
          flush=True)
    t0 = time.time()
    run_dir = train(cfg)
    train_s = time.time() - t0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    ckpt = checkpoints.newest(run_dir / "checkpoints")
    if ckpt is None:
        raise RuntimeError(f"[{name}] training left no checkpoint under {run_dir}/checkpoints")
    print(f"[{name}] trained in {train_s:.0f} s; evaluating {ckpt.name} on {args.tasks} test tasks", flush=True)
    t1 = time.time()
    report = run_eval(cfg, str(ckpt), args.tasks, cfg.rollout.trials, "test", str(run_dir / "eval-test"),
                      arms=["initial", "trained"])
    mean, lo, hi = paired_gain(report, "trained", "initial")
    row = {"path": name, "actor_backend": cfg.actor.backend, "checkpoint": str(ckpt),
           "initial": report["arms"]["initial"], "trained": report["arms"]["trained"],
           "gain": mean, "gain_ci95": [lo, hi], "train_seconds": train_s,
           "iteration_seconds": sum(r.get("time/iteration_seconds", 0.0) for r in rows),
           "eval_seconds": time.time() - t1, "iterations": len(rows),
           "errored_episodes": sum(r.get("rollout/errored_episodes", 0) for r in rows),
           "train_success_last_iteration": {k: v for k, v in rows[-1].items() if k.startswith("rollout/success@")}}
    print(f"[{name}] " + _line(row), flush=True)
    return row


def _line(row: dict) -> str:
    cells = lambda rs: " ".join(f"{r:.3f}" for r in rs)  # noqa: E731
    lo, hi = row["gain_ci95"]
    return (f"{row['path']:<10} | {cells(row['initial'])} | {cells(row['trained'])} | "
            f"{row['gain']:+.3f} [{lo:+.3f}, {hi:+.3f}] | {row['train_seconds']:.0f} ({row['iteration_seconds']:.0f})")


def table(rows: list[dict], tasks: int) -> str:
    head = (f"{tasks} test tasks, success by trial (initial | trained), trained - initial at the last trial "
            f"(paired, 95% CI), training wall s (iterations alone)\n"
            "path       | initial | trained | gain | train s")
    return "\n".join([head] + [_line(r) for r in rows])


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--iterations", type=int, default=15, help="training iterations of each run")
    ap.add_argument("--tasks", type=int, default=200, help="test tasks of each eval")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default=str(ROOT / "configs" / "retro-coin.yaml"))
    ap.add_argument("--model", default=str(ROOT / "models" / "tiny-actor"), help="actor (and reflector) checkpoint")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for both runs (repeatable)")
    ap.add_argument("--out", default=None, help="folder for both runs (default: a temporary one)")
    args = ap.parse_args(argv)
    if not Path(args.model, "config.json").is_file():
        ap.error(f"--model {args.model}: no config.json there (build it: make models/tiny-actor/config.json)")
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="http_actor_"))
    print(f"http_actor: runs under {out_dir}", flush=True)
    rows = [run_path(args, out_dir, "in-process")]
    max_model_len = load_config(args.config, args.set).vllm.max_model_len  # as the in-process engine would
    server = VLLMServer(args.model, served_name=SERVED_NAME, max_model_len=max_model_len,
                        log_path=str(out_dir / "vllm_server.log"))
    t0 = time.time()
    print("http_actor: starting the vLLM API server", flush=True)
    with server:
        print(f"http_actor: serving {args.model} at {server.url} (started in {time.time() - t0:.0f} s)", flush=True)
        rows.append(run_path(args, out_dir, "http", server.url))
    result = {"iterations": args.iterations, "tasks": args.tasks, "seed": args.seed, "config": args.config,
              "model": args.model, "rows": rows, "out": str(out_dir),
              "http_vs_in_process_train_seconds": rows[1]["train_seconds"] / rows[0]["train_seconds"]}
    print(table(rows, args.tasks), flush=True)
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
