"""The probe published with every adapter: token ids plus the learner's fp32 log-probs of them.

After loading a version, a worker scores the same tokens with its engine and compares. The
statistic is the *mean* absolute per-token log-prob gap, not the max: a bf16 engine's rounding
error is spread over every token and on one low-probability token alone it can reach a few
tenths, which a max would call a failed sync although the weights are right.

The tolerance is set per version, between two distances the learner measures at publish time:
- precision: the mean gap between its fp32 probe log-probs and the same computed under bf16
  autocast. A bf16 engine's error is of that order (autocast keeps the residual stream in fp32,
  a bf16 engine does not: hence `PRECISION_FACTOR`). The tolerance never goes below this floor,
  so the right weights pass.
- movement: the mean gap between this version's probe and the previously published one's, i.e.
  what a worker still on the old adapter would show. The tolerance is at most half of it, so a
  stale adapter fails whenever the versions are distinguishable at all (movement > 2 × floor).
`learner.probe_tolerance` caps it. Where a version moved the probe less than twice the floor,
a stale adapter passes: its log-probs are the current ones to within bf16 rounding, so the
importance ratios it produces are right anyway; `probe.movement` is published so this shows.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

PROBE_PROMPT = "Game: twx/coin\nTask: probe the weights after a sync.\nReflection: In the next trial I will"
PROBE_COMPLETION = " go north, then take the coin"


def probe_gap(expected: Sequence[float], got: Sequence[float]) -> float:
    """Mean |log-prob gap| per probe token between the learner (`expected`) and a worker (`got`)."""
    a, b = np.asarray(expected, dtype=np.float64), np.asarray(got, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"probe: {b.size} log-probs for {a.size} probe tokens")
    return float(np.abs(a - b).mean()) if a.size else 0.0


def probe_matches(probe: dict, got: Sequence[float], tolerance: float) -> tuple[bool, float, float]:
    """(passes, gap, tolerance used) for a worker's log-probs of `probe['completion_ids']`.
    `tolerance` (the worker's `learner.probe_tolerance`) applies to probes that carry none."""
    tol = float(probe.get("tolerance", tolerance))
    gap = probe_gap(probe["logprobs"], got)
    return gap <= tol, gap, tol


PRECISION_FACTOR = 3.0  # bf16 engine error / bf16-autocast error, with margin (tests/learner/test_probe.py)


def probe_tolerance(cap: float, precision_gap: float, movement: float | None) -> float:
    """Largest mean gap a worker may show for this version (see the module docstring)."""
    floor = PRECISION_FACTOR * precision_gap
    if movement is None:  # first version published by this learner: nothing to be stale against
        return max(floor, cap)
    return max(floor, min(cap, movement / 2))
