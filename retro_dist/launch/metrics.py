"""Metrics: one JSON line per iteration, TensorBoard scalars, and a one-line terminal status."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path


class MetricsLogger:
    def __init__(self, run_dir: Path, total_iterations: int):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.total = total_iterations
        self._tb = None
        try:  # TensorBoard is optional at run time; the JSONL log is the record
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        except ImportError:
            print("retro-dist: tensorboard not installed; writing metrics.jsonl only", file=sys.stderr)

    def log(self, iteration: int, metrics: dict) -> None:
        # NaN (e.g. no reflections this iteration) is not JSON: write null
        row = {"iteration": iteration, **{k: (None if isinstance(v, float) and math.isnan(v) else v)
                                          for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v):
                    self._tb.add_scalar(k, v, iteration)
            self._tb.flush()
        print(self.status_line(iteration, metrics), flush=True)

    def status_line(self, iteration: int, m: dict) -> str:
        succ = " ".join(f"{m[k]:.2f}" for k in sorted(m) if k.startswith("rollout/success@trial"))
        return (f"[iter {iteration + 1}/{self.total}] success@trial {succ or '-'} | "
                f"refl reward {m.get('rollout/reflection_reward', float('nan')):+.3f} | "
                f"pg {m.get('losses/pg', float('nan')):+.4f} | v{m.get('learner/version', '?')} "
                f"lag {m.get('staleness/version_lag_mean', float('nan')):.2f} | "
                f"rollout {m.get('time/rollout_seconds', 0):.1f}s learn {m.get('time/learn_seconds', 0):.1f}s "
                f"sync {m.get('time/sync_seconds', 0):.2f}s")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
