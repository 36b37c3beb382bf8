"""`retro-dist campaign --spec FILE`: a benchmark campaign, the way users run one.

A campaign is a list of runs (every combination of the spec's configs and `grid` overrides, e.g.
seeds × games), each trained and then evaluated on held-out tasks, and one table and one plot over
all of them. On this machine the runs go one after another; with `--address http://HEAD:8265` each
run is submitted as its own Ray job (`--parallel` at a time) and this command only waits and
aggregates. It is resumable: a run whose training finished is not trained again, a run interrupted
mid-training continues from its newest checkpoint (`run.resume`), an evaluation whose eval.json
exists is not redone.

Spec (YAML):

    name: coin-seeds                 # the campaign folder: <output_dir>/<name>/
    output_dir: runs/campaigns
    configs: [configs/retro-coin.yaml]
    grid: {run.seed: [0, 1, 2]}      # every combination, applied on top of each config
    overrides: []                    # applied to every run
    eval: {tasks: 500, trials: 3, split: test, arms: [none, initial, trained, oracle]}
"""
from __future__ import annotations

import itertools
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import yaml

from retro_dist.config import ConfigError

SPEC_KEYS = {"name", "output_dir", "configs", "grid", "overrides", "eval"}
EVAL_KEYS = {"tasks", "trials", "split", "arms", "reflection_temperature"}


@dataclass
class RunSpec:
    name: str  # the run's folder name inside the campaign folder
    config: str
    overrides: list[str]
    labels: dict = field(default_factory=dict)  # grid key -> value, for the table


@dataclass
class Campaign:
    name: str
    folder: Path
    runs: list[RunSpec]
    eval: dict
    spec_path: str


def load_spec(path: str) -> Campaign:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"campaign spec {path} does not exist")
    spec = yaml.safe_load(p.read_text()) or {}
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise ConfigError(f"campaign spec {path}: unknown key(s) {', '.join(sorted(unknown))} "
                          f"(keys: {', '.join(sorted(SPEC_KEYS))})")
    ev = {"tasks": 200, "trials": 3, "split": "test", "arms": ["none", "initial", "trained", "oracle"],
          **(spec.get("eval") or {})}
    if set(ev) - EVAL_KEYS:
        raise ConfigError(f"campaign spec {path}: unknown eval key(s) {', '.join(sorted(set(ev) - EVAL_KEYS))}")
    name = str(spec.get("name") or p.stem)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ConfigError(f"campaign spec {path}: name {name!r} must be a plain name (letters, digits, . _ -)")
    configs = spec.get("configs") or []
    if not configs:
        raise ConfigError(f"campaign spec {path}: `configs` lists no config")
    return Campaign(name, Path(spec.get("output_dir", "runs/campaigns")) / name,
                    expand(configs, spec.get("grid") or {}, spec.get("overrides") or []), ev, str(p))


def expand(configs: list[str], grid: dict, overrides: list[str]) -> list[RunSpec]:
    """Every (config, grid combination) as one run, named after what differs between runs."""
    keys = list(grid)
    runs = []
    for config, values in itertools.product(configs, itertools.product(*(grid[k] for k in keys))):
        labels = dict(zip(keys, values))
        parts = ([Path(config).stem] if len(configs) > 1 else []) + [
            f"{k.split('.')[-1]}-{_slug(v)}" for k, v in labels.items()]
        runs.append(RunSpec("-".join(parts) or Path(config).stem, config,
                            [*overrides, *(f"{k}={_yaml_value(v)}" for k, v in labels.items())],
                            {"config": config, **{k: v for k, v in labels.items()}}))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ConfigError("campaign: two runs would share a folder name; make the grid values distinct")
    return runs


def _slug(v) -> str:
    text = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")


def _yaml_value(v) -> str:
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


# ---- one run: train, then evaluate ------------------------------------------------------------

def run_one(camp: Campaign, run: RunSpec, address: Optional[str] = None) -> dict:
    """Train (or resume, or skip if done) then evaluate one run; returns its status."""
    from retro_dist.config import load_config
    from retro_dist.launch.evaluate import run_eval
    from retro_dist.launch.train import train
    from retro_dist.learner import checkpoints

    run_dir = camp.folder / run.name
    base = [*run.overrides, f"run.output_dir={camp.folder}", f"run.name={run.name}"]
    if not (run_dir / "train.done").is_file():
        resume = checkpoints.newest(run_dir / "checkpoints") is not None
        cfg = load_config(run.config, base + (["run.resume=true"] if resume else []))
        if run_dir.exists() and not resume:  # started but no checkpoint yet: start it over
            _clear(run_dir)
        train(cfg, address=address)
        (run_dir / "train.done").write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
    out = run_dir / f"eval-{camp.eval['split']}"
    if not (out / "eval.json").is_file():
        ckpt = checkpoints.newest(run_dir / "checkpoints")  # the final checkpoint: no selection
        cfg = load_config(run.config, base)
        run_eval(cfg, str(ckpt), camp.eval["tasks"], camp.eval["trials"], camp.eval["split"], str(out),
                 arms=camp.eval["arms"], address=address,
                 reflection_temperature=camp.eval.get("reflection_temperature"))
    return {"run": run.name, "eval": str(out / "eval.json")}


def _clear(run_dir: Path) -> None:
    import shutil

    shutil.rmtree(run_dir)


def run_campaign(spec_path: str, only: Optional[str] = None, address: Optional[str] = None,
                 jobs_address: Optional[str] = None, parallel: int = 2) -> dict:
    """Every run of the campaign (or `only` that one), then the aggregate table and plot."""
    camp = load_spec(spec_path)
    camp.folder.mkdir(parents=True, exist_ok=True)
    (camp.folder / "spec.yaml").write_text(Path(spec_path).read_text())
    runs = [r for r in camp.runs if only is None or r.name == only]
    if only is not None and not runs:
        raise ConfigError(f"campaign {camp.name}: no run named {only!r} (runs: {', '.join(r.name for r in camp.runs)})")
    if jobs_address:
        from retro_dist.launch.campaign_jobs import submit_and_wait

        submit_and_wait(camp, runs, jobs_address, parallel)
    else:
        for i, run in enumerate(runs):
            print(f"campaign {camp.name}: run {i + 1}/{len(runs)}: {run.name}", flush=True)
            run_one(camp, run, address)
    if only is not None:
        return {}
    summary = aggregate(camp)
    print((camp.folder / "campaign.md").read_text())
    return summary


# ---- the table and the plot -------------------------------------------------------------------

def aggregate(camp: Campaign) -> dict:
    """campaign.json / campaign.md / campaign.png from every finished run's eval.json."""
    from retro_dist.launch.evaluate import paired_gain

    rows = []
    for run in camp.runs:
        path = camp.folder / run.name / f"eval-{camp.eval['split']}" / "eval.json"
        if not path.is_file():
            continue
        rep = json.loads(path.read_text())
        row = {"run": run.name, "labels": run.labels, "tasks": rep["tasks"],
               "final": {a: rates[-1] for a, rates in rep["arms"].items()}}
        if {"trained", "initial"} <= set(rep["arms"]):
            m, lo, hi = paired_gain(rep, "trained", "initial")
            row["gain"] = {"mean": m, "ci95": [lo, hi], "excludes_0": lo > 0 or hi < 0}
            if "oracle" in rep["arms"]:
                gap = rep["arms"]["oracle"][-1] - rep["arms"]["initial"][-1]
                row["gap_closed"] = m / gap if gap > 0 else None
            if "games" in rep and len(set(rep["games"])) > 1:
                row["by_game"] = {g: {**dict(zip(("mean", "lo", "hi"), paired_gain(rep, "trained", "initial", g))),
                                      "final": {a: rates[-1] for a, rates in rep["by_game"][g].items()}}
                                  for g in sorted(set(rep["games"]))}
        row["train"] = training_figures(camp.folder / run.name / "metrics.jsonl")
        rows.append(row)
    gains = [r["gain"]["mean"] for r in rows if "gain" in r]
    closed = [r["gap_closed"] for r in rows if r.get("gap_closed") is not None]
    summary = {"campaign": camp.name, "runs": rows, "finished": len(rows), "planned": len(camp.runs),
               "gain_mean": float(np.mean(gains)) if gains else None,
               "gain_sd": float(np.std(gains, ddof=1)) if len(gains) > 1 else None,
               "gap_closed_mean": float(np.mean(closed)) if closed else None}
    (camp.folder / "campaign.json").write_text(json.dumps(summary, indent=1))
    (camp.folder / "campaign.md").write_text(campaign_markdown(summary, camp.eval))
    _plot(summary, camp.folder / "campaign.png")
    return summary


def training_figures(path: Path) -> dict:
    """From a run's metrics.jsonl: the RL rows' mean advantage variance (after the SFT warm start),
    and the reflection reward and KL to the initial reflector over the last quarter of the rows."""
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rl = [r for r in rows if not r.get("learner/sft") and "learner/advantage_var" in r]

    def mean(rs, key):
        vals = [r[key] for r in rs if isinstance(r.get(key), (int, float)) and np.isfinite(r[key])]
        return float(np.mean(vals)) if vals else None

    last = rows[-max(1, len(rows) // 4):]
    return {"advantage_var": mean(rl, "learner/advantage_var"), "baseline_mse": mean(rl, "learner/baseline_mse"),
            "reflection_reward_last_quarter": mean(last, "rollout/reflection_reward"),
            "kl_last_quarter": mean(last, "losses/kl"), "rows": len(rows)}


def campaign_markdown(summary: dict, ev: dict) -> str:
    arms = [a for a in ev["arms"]]
    lines = [f"Campaign `{summary['campaign']}`: {summary['finished']}/{summary['planned']} runs evaluated on "
             f"{ev['tasks']} `{ev['split']}` tasks; success by trial {ev['trials']}, final checkpoints "
             f"(no selection); trained − initial paired over tasks, 95% interval.", "",
             "| run | " + " | ".join(arms) + " | trained − initial | gap to oracle closed "
             "| advantage var (RL steps) | reflection reward, last ¼ |",
             "|---|" + "---|" * (len(arms) + 4)]
    for r in summary["runs"]:
        g = r.get("gain")
        gain = _interval(g["mean"], *g["ci95"]) if g else "-"
        closed = f"{r['gap_closed']:.2f}" if r.get("gap_closed") is not None else "-"
        t = r.get("train") or {}
        figs = " | ".join(f"{t[k]:.4f}" if t.get(k) is not None else "-"
                          for k in ("advantage_var", "reflection_reward_last_quarter"))
        lines.append(f"| {r['run']} | {_rates(r['final'], arms)} | {gain} | {closed} | {figs} |")
    per_game = [(r["run"], g, v) for r in summary["runs"] for g, v in r.get("by_game", {}).items()]
    if per_game:
        lines += ["", f"By game: success by trial {ev['trials']}.", "",
                  "| run | game | " + " | ".join(arms) + " | trained − initial |",
                  "|---|---|" + "---|" * (len(arms) + 1)]
        lines += [f"| {run} | {g} | {_rates(v['final'], arms)} | {_interval(v['mean'], v['lo'], v['hi'])} |"
                  for run, g, v in per_game]
    if summary["gain_mean"] is not None:
        sd = f" ± {summary['gain_sd']:.3f} (sd)" if summary["gain_sd"] is not None else ""
        closed = (f"; gap to oracle closed {summary['gap_closed_mean']:.2f} on average"
                  if summary["gap_closed_mean"] is not None else "")
        lines += ["", f"Mean gain over runs: {summary['gain_mean']:+.3f}{sd}{closed}."]
    return "\n".join(lines) + "\n"


def _rates(final: dict, arms: list[str]) -> str:
    return " | ".join(f"{final.get(a, float('nan')):.3f}" for a in arms)


def _interval(mean: float, lo: float, hi: float) -> str:
    return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def _plot(summary: dict, path: Path) -> None:
    rows = [r for r in summary["runs"] if "gain" in r]
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(rows) + 2), 3.5))
    m = np.array([r["gain"]["mean"] for r in rows])
    lo, hi = np.array([r["gain"]["ci95"] for r in rows]).T
    ax.errorbar(np.arange(len(rows)), m, yerr=[m - lo, hi - m], fmt="o", capsize=4)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xticks(np.arange(len(rows)), [r["run"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("trained − initial (success by last trial)")
    ax.set_title(summary["campaign"])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
