"""Evaluation statistics (pure numpy): cumulative success by trial and 95% confidence intervals."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

Z95 = 1.959963984540054


def first_success(trials) -> dict[int, int]:
    """episode_id -> first trial it succeeded at, from trial records (objects with .episode_id,
    .trial and .success)."""
    first: dict[int, int] = {}
    for t in trials:
        if t.success:
            first[t.episode_id] = min(first.get(t.episode_id, t.trial), t.trial)
    return first


def cumulative_success(first_success: Sequence[Optional[int]], trials: int) -> np.ndarray:
    """(K,) share of tasks solved at or before each trial; `first_success[i]` is None if never."""
    n = len(first_success)
    out = np.zeros(trials)
    for t in first_success:
        if t is not None:
            out[t:] += 1
    return out / max(n, 1)


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (well-behaved near 0 and 1). It always holds the
    observed rate: at 0 successes rounding can put `centre - half` a hair above 0 (1e-18), which made
    eval.png's error bars negative and stopped `retro-dist eval` after its tables were written."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half)))


def paired_difference(a: Sequence[float], b: Sequence[float], z: float = Z95) -> tuple[float, float, float]:
    """Mean of a_i - b_i over the same tasks, with a normal-approximation 95% interval."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if len(d) < 2:
        return (float(d.mean()) if len(d) else 0.0, -1.0, 1.0)
    half = z * d.std(ddof=1) / math.sqrt(len(d))
    return (float(d.mean()), float(d.mean() - half), float(d.mean() + half))


def count_by_game(acc: dict, games: Sequence[str], first: Sequence[Optional[int]], trials: int,
                  rewards: Sequence[tuple[str, float]] = ()) -> dict:
    """Accumulate per-game episode counts, solved-by-trial sums and reflection rewards into `acc`
    (game -> {"episodes", "success_sum" (K,), "reflections", "reward_sum"}): a worker's training
    metrics broken down by game, mergeable across workers with `merge_by_game`."""
    for game, f in zip(games, first):
        g = acc.setdefault(game, {"episodes": 0, "success_sum": [0.0] * trials, "reflections": 0, "reward_sum": 0.0})
        g["episodes"] += 1
        g["success_sum"] = (np.asarray(g["success_sum"]) + cumulative_success([f], trials)).tolist()
    for game, r in rewards:
        g = acc.setdefault(game, {"episodes": 0, "success_sum": [0.0] * trials, "reflections": 0, "reward_sum": 0.0})
        g["reflections"] += 1
        g["reward_sum"] += float(r)
    return acc


def merge_by_game(parts: Sequence[dict], trials: int) -> dict:
    """Metrics `rollout/game/<game>/success@trial<k>` and `.../reflection_reward` over workers'
    `count_by_game` dicts; empty for a one-game run (the overall metrics say it all)."""
    total: dict = {}
    for part in parts:
        for game, g in (part or {}).items():
            t = total.setdefault(game, {"episodes": 0, "success_sum": np.zeros(trials), "reflections": 0,
                                        "reward_sum": 0.0})
            t["episodes"] += g["episodes"]
            t["success_sum"] = t["success_sum"] + np.asarray(g["success_sum"])
            t["reflections"] += g["reflections"]
            t["reward_sum"] += g["reward_sum"]
    if len(total) < 2:
        return {}
    out = {}
    for game, t in sorted(total.items()):
        if t["episodes"]:
            out.update({f"rollout/game/{game}/success@trial{k}": float(v / t["episodes"])
                        for k, v in enumerate(t["success_sum"])})
        if t["reflections"]:
            out[f"rollout/game/{game}/reflection_reward"] = t["reward_sum"] / t["reflections"]
    return out


def learning_summary(rows: Sequence[dict], trials: int) -> Optional[dict]:
    """What a finished run shows about learning, from its metrics.jsonl rows (iterations or async
    intervals, in order): success by trial at the start and the end, and the reflection reward's
    trend (mean over the first and the last quarter of the rows, and the least-squares slope per 10
    rows). None when no row has rollout metrics.

    A sync iteration is a whole batch of tasks, so the start and the end are the first and last
    iteration. An async interval holds whatever episodes finished in its few seconds (one, at
    times), so there they are the first and last quarter of the intervals, weighted by episodes."""
    keys = [f"rollout/success@trial{k}" for k in range(trials)]
    with_success = [r for r in rows if all(_finite(r.get(k)) for k in keys)]
    rewards = np.array([r["rollout/reflection_reward"] for r in rows if _finite(r.get("rollout/reflection_reward"))])
    if not with_success:
        return None
    step_key = "iteration" if "iteration" in with_success[0] else "interval"
    if step_key == "iteration":
        ends = {name: {"step": r.get(step_key), "success_by_trial": [float(r[k]) for k in keys]}
                for name, r in (("first", with_success[0]), ("last", with_success[-1]))}
    else:
        q = max(1, len(with_success) // 4)
        ends = {name: _pooled(part, keys, step_key)
                for name, part in (("first", with_success[:q]), ("last", with_success[-q:]))}
    out = {"step_key": step_key, "rows": len(rows), **ends}
    if len(rewards) >= 2:
        q = max(1, len(rewards) // 4)
        slope = float(np.polyfit(np.arange(len(rewards)), rewards, 1)[0])
        out["reflection_reward"] = {"first_row": float(rewards[0]), "first_quarter": float(rewards[:q].mean()),
                                    "last_quarter": float(rewards[-q:].mean()), "rows_per_quarter": q,
                                    "slope_per_10": 10 * slope}
    return out


def _pooled(rows: Sequence[dict], keys: list[str], step_key: str) -> dict:
    """Success by trial over several rows, each weighted by its `rollout/episodes` (1 if absent)."""
    w = np.array([float(r.get("rollout/episodes", 1)) for r in rows])
    rates = np.array([[float(r[k]) for k in keys] for r in rows])
    return {"step": [rows[0].get(step_key), rows[-1].get(step_key)], "episodes": int(w.sum()),
            "success_by_trial": (w @ rates / w.sum()).tolist()}


def summary_lines(s: dict) -> list[str]:
    """The learning summary as the few lines a run ends with."""
    lines = ["retro-dist: learning summary (success by trial: share of tasks solved by trial k)"]
    for name in ("first", "last"):
        e = s[name]
        by_trial = "  ".join(f"trial {k + 1} {v:.3f}" for k, v in enumerate(e["success_by_trial"]))
        if isinstance(e["step"], list):  # async: a quarter of the intervals, pooled
            where = f"{s['step_key']}s {e['step'][0]}-{e['step'][1]}, {e['episodes']} episodes"
            lines.append(f"  {name} quarter ({where}): {by_trial}")
        else:
            lines.append(f"  {name} {s['step_key']} ({e['step']}): {by_trial}")
    rr = s.get("reflection_reward")
    if rr:
        lines.append(f"  reflection reward (next trial's return − this one's): first {s['step_key']} "
                     f"{rr['first_row']:.3f}, first {rr['rows_per_quarter']} {rr['first_quarter']:.3f} → last "
                     f"{rr['rows_per_quarter']} {rr['last_quarter']:.3f} (slope {rr['slope_per_10']:+.3f} per 10)")
    return lines


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
