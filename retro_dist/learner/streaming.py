"""The learner's own loop in `run.mode: async`: sample sealed rows, step, publish, checkpoint.

It never waits on a worker: it samples whatever sealed reflection rows the store holds, within
`max_policy_lag` versions of its own (older rows are never trained on and are counted), lets the
replay rate limiter (`samples_per_insert`) pace it against the insert rate, and publishes a new
policy version every `updates_per_version` steps. The first `sft_iterations` versions are the
SFT warm start: each step fits the sampled batch's positively rewarded rows (A = 1, on-policy).
A plain class around `Learner`: `launch/` runs it inside the learner's Ray actor, tests run it
in-process.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Optional

import numpy as np
import pyarrow.compute as pc

from retro_dist.core import staleness
from retro_dist.learner.sources import replay_advantages
from retro_dist.learner.update import BAD_STEP
from retro_dist.replay.ratelimit import RateLimitedError

_IDLE_POLL_S = 0.2  # wait between samples when the store has nothing trainable (or the limiter refuses)


class LearnerLoop:
    """Runs `learner` on a background thread until it has taken `max_steps` gradient steps."""

    def __init__(self, make_learner: Callable, publish: Callable, max_steps: int, updates_per_version: int,
                 max_policy_lag: int):
        self.learner = make_learner()  # built here: inside the learner's actor process on a cluster
        self.publish = publish  # Adapter -> None: puts the new version on the weight board
        self.max_steps = max_steps
        self.updates_per_version = updates_per_version
        self.max_policy_lag = max_policy_lag
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self._interval: list[dict] = []  # step stats since the last poll
        self._t_start = self._t_poll = time.monotonic()
        self._busy = self._busy_total = 0.0  # seconds spent sampling + stepping (interval, total)
        self._published = self._dropped = 0
        self._ratio_checked = -1  # the version whose fresh rows' IS ratio was last measured

    # ---- control (called from the actor's main thread) -------------------------------------------

    def restore(self) -> Optional[int]:
        """Continue from the newest complete checkpoint (version and step count), if any."""
        return self.learner.restore()

    def publish_current(self) -> int:
        """Publish the current version (0, or the restored one) so workers can start on it."""
        if not self._published:
            self._publish()
        return self.learner.version

    def start(self) -> int:
        """Start looping (publishing the current version first if not yet done); returns it."""
        self.publish_current()
        self._t_start = self._t_poll = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="learner-loop", daemon=True)
        self._thread.start()
        return self.learner.version

    def poll(self) -> dict:
        """Metrics since the last poll; re-raises an error that stopped the loop."""
        if self._error is not None:
            raise RuntimeError(f"learner loop stopped: {type(self._error).__name__}: {self._error}") from self._error
        with self._lock:
            stats, self._interval = self._interval, []
            busy, self._busy = self._busy, 0.0
        now = time.monotonic()
        wall, self._t_poll = now - self._t_poll, now
        out = _aggregate(stats)
        lrn = self.learner
        steps = sum("losses/pg" in s for s in stats)
        out.pop(BAD_STEP, None)
        out.update({"learner/steps": lrn.steps, "learner/version": lrn.version, "learner/bad_steps": lrn.bad_steps,
                    "learner/updates": steps, "learner/steps_per_s": steps / wall if wall > 0 else 0.0,
                    "learner/busy_fraction": staleness.busy_fraction(busy, wall),
                    "learner/busy_seconds_total": self._busy_total,
                    "learner/done": int(self.done), "staleness/dropped_rows": self._dropped,
                    "time/learner_wall_seconds": now - self._t_start})
        out.update(lrn.store.metrics())
        return out

    @property
    def done(self) -> bool:
        return self.learner.steps >= self.max_steps

    def progress(self) -> dict:
        """Cheap: steps and version so far, and whether the loop is done (or died)."""
        alive = self._thread is not None and self._thread.is_alive()
        return {"steps": self.learner.steps, "version": self.learner.version,
                "done": self.done or (self._thread is not None and not alive)}

    def stop(self, timeout: float = 60.0) -> dict:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        return self.poll()

    # ---- the loop --------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set() and not self.done:
                t0 = time.monotonic()
                stats = self._step()
                if stats is None:
                    self._stop.wait(_IDLE_POLL_S)
                    continue
                if BAD_STEP not in stats and staleness.publishes_version(self.learner.steps, self.updates_per_version):
                    self.learner.version += 1
                    self.learner.save_checkpoint()
                    self._publish()
                with self._lock:
                    self._interval.append(stats)
                    self._busy += time.monotonic() - t0
                self._busy_total += time.monotonic() - t0
        except BaseException as err:  # surfaced to the driver by poll()
            self._error = err

    def _step(self) -> Optional[dict]:
        """One gradient step on a sampled batch, or None when nothing trainable is there yet."""
        lrn = self.learner
        store = lrn.store
        store.refresh()
        self._dropped = _rows_below(store, staleness.oldest_trainable_version(lrn.version, self.max_policy_lag))
        try:
            batch = store.sample("reflections", lrn.cfg.batch_size, rng=lrn.rng, step=lrn.steps,
                                 current_version=lrn.version)
        except RateLimitedError:  # on_overflow "block" timed out: no inserts for a while; keep waiting
            return None
        if batch is None or batch.table.num_rows == 0:
            return None
        fresh_ratio = self._fresh_ratio(batch.table)  # before the step: the weights that were published
        sft = lrn.version < lrn.cfg.sft_iterations
        if sft:  # the warm start: likelihood of the batch's positively rewarded rows (as sources.sft_batches)
            table = batch.table.filter(pc.greater(batch.table.column("reward"), 0.0))
            if table.num_rows == 0:
                return None
            stats = lrn.update(table, np.ones(table.num_rows), np.zeros(table.num_rows), on_policy=True)
        else:
            table = batch.table
            stats = lrn.update(table, *replay_advantages(lrn, batch))
        stats["learner/sft"] = int(sft)
        if BAD_STEP in stats:  # skipped: no step taken, nothing published
            return stats
        lag = staleness.version_lag(lrn.version, table.column("policy_version").to_numpy())
        if lag.max() > self.max_policy_lag:  # the store's staleness filter guarantees this
            raise AssertionError(f"trained on a row {int(lag.max())} versions old (max_policy_lag "
                                 f"{self.max_policy_lag})")
        stats["staleness/fresh_fraction"] = float(np.mean(lag == 0))
        if fresh_ratio is not None:
            stats["losses/mean_ratio_fresh"] = fresh_ratio
        return stats

    def _fresh_ratio(self, table, max_rows: int = 8) -> Optional[float]:
        """Mean per-token IS ratio π_θ/μ over up to `max_rows` rows written by the current version,
        once per version. It must be ≈ 1: the cheapest check that the workers sample from the
        weights the learner published (verl #7495); a broken weight sync shows here first."""
        import torch

        from retro_dist.learner.batches import collate

        lrn = self.learner
        if self._ratio_checked == lrn.version:
            return None
        versions = table.column("policy_version").to_numpy()
        idx = np.flatnonzero(versions == lrn.version)[:max_rows]
        if idx.size == 0:
            return None
        rows = table.take(idx).select(["prompt_ids", "reflection_ids", "behaviour_logprobs"]).to_pydict()
        mb = collate(rows["prompt_ids"], rows["reflection_ids"], lrn.tokenizer.pad_token_id,
                     rows["behaviour_logprobs"]).to(lrn.device)
        with torch.no_grad():
            log_ratio = (lrn.policy.logprobs(mb).float() - mb.behaviour) * mb.mask
        self._ratio_checked = lrn.version
        return float((torch.exp(log_ratio) * mb.mask).sum() / mb.mask.sum())

    def _publish(self) -> None:
        t0 = time.monotonic()
        self.publish(self.learner.adapter())
        self._published += 1
        with self._lock:
            self._interval.append({"time/publish_seconds": time.monotonic() - t0})


def _rows_below(store, version: int) -> int:
    """Reflection rows held that are too old to ever be trained on."""
    if store.num_rows("reflections") == 0:
        return 0
    return int(store.rows_below_version("reflections", version))


def _aggregate(stats: list[dict]) -> dict:
    """Mean of each metric over the interval's steps (max for `*_max` keys, sum for seconds)."""
    keys = {k for s in stats for k in s}
    out = {}
    for k in keys:
        vals = [s[k] for s in stats if k in s and isinstance(s[k], (int, float))]
        if not vals:
            continue
        if k.endswith("_max"):
            out[k] = max(vals)
        elif k.endswith("_seconds"):
            out[k] = float(sum(vals))
        else:
            out[k] = float(np.mean(vals))
    return out
