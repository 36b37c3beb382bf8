"""Sampling distributions over replay rows, and the importance weights that undo their bias.

Pure: numpy only. Every `*_probs` function returns float64 probabilities of shape (N,) that sum
to 1, so the replay store can draw with one `searchsorted` on their cumulative sum and hand the
learner each drawn row's probability for `importance_weights`.
"""
from __future__ import annotations

import numpy as np


def _check_nonempty(n: int) -> None:
    if n <= 0:
        raise ValueError(f"cannot build a sampling distribution over {n} rows")


def _normalise(w: np.ndarray) -> np.ndarray:
    """(N,) non-negative weights -> (N,) probabilities; all-zero weights fall back to uniform."""
    total = float(w.sum())
    if not np.isfinite(total):
        raise ValueError("sampling weights are not finite")
    if total <= 0.0:
        return np.full(w.shape[0], 1.0 / w.shape[0])
    return w / total


def uniform_probs(n: int) -> np.ndarray:
    """(n,) probabilities, each 1/n."""
    _check_nonempty(n)
    return np.full(n, 1.0 / n)


def prioritised_probs(priorities: np.ndarray, alpha: float = 1.0, eps: float = 1e-6) -> np.ndarray:
    """Proportional prioritisation (Schaul et al. 2016, PER): p_i ∝ (|x_i| + eps)^alpha.

    priorities: (N,) any real values (e.g. advantages); their magnitude is used.
    alpha = 0 gives uniform; eps > 0 keeps every row reachable.
    """
    x = np.abs(np.asarray(priorities, dtype=np.float64))
    _check_nonempty(x.shape[0])
    if alpha < 0 or eps < 0:
        raise ValueError("prioritised_probs needs alpha >= 0 and eps >= 0")
    return _normalise(np.power(x + eps, alpha))


def anneal_fraction(step: int, anneal_steps: int) -> float:
    """How far the curriculum has moved toward uniform: 0 at step 0, 1 from `anneal_steps` on."""
    if anneal_steps <= 0:
        return 1.0
    return float(min(max(step, 0) / anneal_steps, 1.0))


def curriculum_probs(quality: np.ndarray, step: int, anneal_steps: int,
                     eps: float = 1e-6) -> np.ndarray:
    """Quality-based curriculum annealed linearly toward uniform.

    p_i(step) = (1 − λ) · q_i / Σq + λ / N,  λ = min(step / anneal_steps, 1).
    Mixing the two distributions (not the weights) makes p exactly uniform once λ = 1.

    quality: (N,) non-negative scores (higher = sampled more early on).
    """
    q = np.asarray(quality, dtype=np.float64)
    _check_nonempty(q.shape[0])
    if np.any(q < 0):
        raise ValueError("curriculum quality must be non-negative")
    lam = anneal_fraction(step, anneal_steps)
    uni = uniform_probs(q.shape[0])
    if lam >= 1.0:
        return uni
    return (1.0 - lam) * _normalise(q + eps) + lam * uni


def importance_weights(probs: np.ndarray, n: int, beta: float = 1.0) -> np.ndarray:
    """Importance weights for rows drawn with probabilities `probs` from a pool of `n` rows.

    w_i = (n · p_i)^−β / max_j w_j (PER's normalisation: weights only scale updates down).
    probs: (B,) sampling probability of each drawn row. Returns (B,) weights in (0, 1].
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.shape[0] == 0:
        return p
    if n <= 0 or np.any(p <= 0):
        raise ValueError("importance_weights needs n > 0 and every probability > 0")
    w = np.power(n * p, -beta)
    return w / w.max()


__all__ = [
    "uniform_probs",
    "prioritised_probs",
    "anneal_fraction",
    "curriculum_probs",
    "importance_weights",
]
