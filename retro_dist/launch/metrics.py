"""Metrics sinks and the terminal: metrics.jsonl, TensorBoard, optional W&B, status lines, a live bar.

Sync mode logs one row per iteration; async mode one row per `run.log_every_s` interval. Each
`log` writes one JSON line (NaN/inf → null), TensorBoard scalars, W&B (when `run.wandb_project` is
set) and one status line on stdout. `progress` redraws a tqdm bar on stderr when stderr is a
terminal; status lines go through `tqdm.write`, so they scroll above the bar without garbling it.
Piped or captured output (tests, CI, `> file`) gets no bar: exactly one status line per interval.
"""
from __future__ import annotations

import json
import math
import os
import sys
import threading
from pathlib import Path
from typing import Optional

from retro_dist.config import ConfigError
from retro_dist.replay import location

NAN = float("nan")


def _plain(v):
    """JSON-safe value: NaN/inf → None, numpy scalars → Python numbers, lists element-wise."""
    if hasattr(v, "item") and not isinstance(v, (list, tuple, dict)):
        try:
            v = v.item()
        except (ValueError, TypeError):  # arrays of several elements: keep as a list
            v = v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _scalar(v) -> Optional[float]:
    """A finite number to plot, or None (bools, lists, strings, NaN are not plotted)."""
    v = _plain(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v is None:
        return None
    return float(v)


def _fmt(m: dict, key: str, spec: str) -> str:
    v = _scalar(m.get(key))
    return "-" if v is None else format(v, spec)


def _success(m: dict) -> str:
    keys = sorted((k for k in m if k.startswith("rollout/success@trial")),
                  key=lambda k: int(k.rsplit("trial", 1)[1]) if k.rsplit("trial", 1)[1].isdigit() else 0)
    return " ".join(_fmt(m, k, ".2f") for k in keys) or "-"


def async_status_line(done: int, total: int, m: dict) -> str:
    """`[upd 12/40 v6] eps 3.1/s steps 0.42/s lag max 1 | success@trial ... | refl reward ... | ...`."""
    steps = _scalar(m.get("learner/steps"))
    version = _scalar(m.get("learner/version"))
    head = f"[upd {done if steps is None else int(steps)}/{total} v{'?' if version is None else int(version)}]"
    return (f"{head} eps {_fmt(m, 'rollout/episodes_per_s', '.1f')}/s "
            f"steps {_fmt(m, 'learner/steps_per_s', '.2f')}/s lag max {_fmt(m, 'staleness/version_lag_max', '.0f')} | "
            f"success@trial {_success(m)} | refl reward {_fmt(m, 'rollout/reflection_reward', '+.3f')} | "
            f"pg {_fmt(m, 'losses/pg', '+.3f')} | ratio {_fmt(m, 'losses/mean_ratio', '.2f')} | "
            f"dropped {_fmt(m, 'staleness/dropped_rows', '.0f')}")


def sync_status_line(iteration: int, total: int, m: dict) -> str:
    """`[iter 2/3] success@trial ... | refl reward ... | pg ... | v2 lag 0.59 | rollout 14.5s learn 1.0s sync 0.14s`."""
    version = _scalar(m.get("learner/version"))
    return (f"[iter {iteration + 1}/{total}] success@trial {_success(m)} | "
            f"refl reward {_fmt(m, 'rollout/reflection_reward', '+.3f')} | pg {_fmt(m, 'losses/pg', '+.4f')} | "
            f"v{'?' if version is None else int(version)} lag {_fmt(m, 'staleness/version_lag_mean', '.2f')} | "
            f"rollout {_fmt(m, 'time/rollout_seconds', '.1f')}s learn {_fmt(m, 'time/learn_seconds', '.1f')}s "
            f"sync {_fmt(m, 'time/sync_seconds', '.2f')}s")


def progress_postfix(m: dict) -> str:
    """The bar's right-hand side: throughput, staleness, reflection reward (what is known so far)."""
    if "rollout/episodes_per_s" not in m and _scalar(m.get("time/iteration_seconds")):  # sync mode
        eps = _scalar(m.get("rollout/episodes"))
        m = {**m, "rollout/episodes_per_s": None if eps is None else eps / _scalar(m["time/iteration_seconds"])}
    parts = [("eps/s", "rollout/episodes_per_s", ".2f"), ("steps/s", "learner/steps_per_s", ".2f"),
             ("lag", "staleness/version_lag_max", ".0f"), ("refl", "rollout/reflection_reward", "+.3f")]
    return " ".join(f"{name} {_fmt(m, key, spec)}" for name, key, spec in parts)


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _terminal_columns() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 0


def open_wandb(run_dir: Path, project: str, mode: str, name: str, config: Optional[dict]):
    """A W&B run writing under `run_dir/wandb` (offline: no network). Missing package → ConfigError."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("run.wandb_project is set but the wandb package is not installed: "
                          "pip install 'retro-dist[wandb]' (or set run.wandb_project=null)") from None
    # console="off": W&B must not wrap sys.stdout/stderr (the progress bar and redirects own them).
    settings = wandb.Settings(console="off", silent=True)
    return wandb.init(project=project, name=name, dir=str(run_dir), mode=mode, config=config or {},
                      settings=settings, reinit="create_new")


class MetricsLogger:
    """One per run. `log(step, metrics)` per iteration (sync) or interval (async); `progress` in between."""

    def __init__(self, run_dir: Path, total_iterations: int, *, mode: str = "sync",
                 wandb_project: Optional[str] = None, wandb_mode: str = "offline", run_name: Optional[str] = None,
                 config: Optional[dict] = None, progress_bar: Optional[bool] = None,
                 remote: Optional[str] = None):
        """remote: where metrics.jsonl lives when the run's outputs are not on a local disk
        (a pyarrow URI): the local file is the working copy, uploaded whole after every row
        (object stores cannot append), and fetched first when only the remote one exists."""
        run_dir = Path(run_dir)
        self.path = run_dir / "metrics.jsonl"
        self.remote = remote
        if remote is not None and not self.path.exists() and location.exists(remote):
            run_dir.mkdir(parents=True, exist_ok=True)
            self.path.write_bytes(location.read_file(remote))  # a resumed run continues the file
        self.total = total_iterations  # iterations (sync) or learner updates (async)
        self.mode = mode
        self._wandb = None
        if wandb_project:  # first, so a missing package stops the run before anything else starts
            (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
            self._wandb = open_wandb(run_dir, wandb_project, wandb_mode, run_name or run_dir.name, config)
        self._tb = None
        try:  # TensorBoard is optional at run time; the JSONL log is the record
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            print("retro-dist: tensorboard not installed; writing metrics.jsonl only", file=sys.stderr)
        self._bar = None
        if stderr_is_terminal() if progress_bar is None else progress_bar:
            from tqdm import tqdm

            # A terminal that reports no width (a pty nobody sized) gets a fixed one, not a 0-column bar.
            sized = _terminal_columns() > 0
            self._bar = tqdm(total=total_iterations, desc="updates" if mode == "async" else "iterations",
                             file=sys.stderr, dynamic_ncols=sized, ncols=None if sized else 100,
                             nrows=None if sized else 24, leave=False,
                             bar_format="{desc} {n_fmt}/{total_fmt} |{bar}| {elapsed}<{remaining}{postfix}")
            self._latest: dict = {}  # newest value of each bar metric: a partial update keeps the rest
            # Redraw every second, so elapsed time ticks through a long rollout between driver calls.
            self._stop = threading.Event()
            self._ticker = threading.Thread(target=self._tick, name="retro-dist-progress", daemon=True)
            self._ticker.start()

    @classmethod
    def from_config(cls, cfg, run_dir: Path, **kwargs) -> "MetricsLogger":
        from retro_dist.config import as_dict

        r = cfg.run
        outputs = cfg.outputs_of(run_dir)
        remote = None if location.is_local(outputs) else location.join(outputs, "metrics.jsonl")
        config = as_dict(cfg)
        config["run"]["output_dir"] = location.redact(r.output_dir)  # no credentials in W&B
        return cls(run_dir, r.updates if r.mode == "async" else r.iterations, mode=r.mode,
                   wandb_project=r.wandb_project, wandb_mode=r.wandb_mode, run_name=r.name,
                   config=config, remote=remote, **kwargs)

    def log(self, step: int, metrics: dict) -> None:
        """One row: `step` is the iteration index (sync) or the interval index (async)."""
        key = "interval" if self.mode == "async" else "iteration"
        row = {key: step, **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.remote is not None:
            location.write_file_once(self.remote, self.path.read_bytes())
        scalars = {k: s for k, s in ((k, _scalar(v)) for k, v in metrics.items()) if s is not None}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        self.write(self.status_line(step, metrics))
        if self.mode == "sync":
            self.progress(step + 1, metrics)

    def status_line(self, step: int, m: dict) -> str:
        if self.mode == "async":
            steps = _scalar(m.get("learner/steps"))
            return async_status_line(int(steps) if steps is not None else 0, self.total, m)
        return sync_status_line(step, self.total, m)

    def progress(self, done: int, metrics: Optional[dict] = None) -> None:
        """Redraw the bar: `done` updates (async) or iterations (sync) of the target. No-op without a bar."""
        if self._bar is None:
            return
        self._bar.n = min(done, self.total)
        if metrics:
            self._latest.update({k: v for k, v in metrics.items() if _scalar(v) is not None})
            self._bar.set_postfix_str(progress_postfix(self._latest), refresh=False)
        self._bar.refresh()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            bar = self._bar
            if bar is None:
                return
            try:
                bar.refresh()
            except (ValueError, OSError):  # the terminal went away
                return

    def write(self, line: str) -> None:
        """A line on stdout above the bar (episode errors, notices): use this, not print, while a bar is live."""
        from tqdm import tqdm

        tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._stop.set()
            self._ticker.join(timeout=5)
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
