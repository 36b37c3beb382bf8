"""retro_dist.core.sampling: hand-computed cases, a slow reference, and invariants."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retro_dist.core import sampling

finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False)
scores = st.lists(finite, min_size=1, max_size=50)


def test_uniform_hand():
    np.testing.assert_allclose(sampling.uniform_probs(4), [0.25] * 4)


def test_prioritised_hand():
    # |x| + 0 eps, alpha 1: [1, 3] -> [1/4, 3/4]; alpha 2: [1, 9] -> [1/10, 9/10]
    np.testing.assert_allclose(sampling.prioritised_probs([-1.0, 3.0], 1.0, eps=0.0), [0.25, 0.75])
    np.testing.assert_allclose(sampling.prioritised_probs([1.0, -3.0], 2.0, eps=0.0), [0.1, 0.9])
    # alpha 0 is uniform whatever the priorities
    np.testing.assert_allclose(sampling.prioritised_probs([0.0, 5.0, 9.0], 0.0), [1 / 3] * 3)
    # all-zero priorities with eps=0 fall back to uniform rather than dividing by zero
    np.testing.assert_allclose(sampling.prioritised_probs([0.0, 0.0], 1.0, eps=0.0), [0.5, 0.5])


def test_curriculum_hand():
    q = np.array([1.0, 3.0])
    # step 0: quality-weighted; halfway: average of quality-weighted and uniform; end: uniform
    np.testing.assert_allclose(sampling.curriculum_probs(q, 0, 10, eps=0.0), [0.25, 0.75])
    np.testing.assert_allclose(sampling.curriculum_probs(q, 5, 10, eps=0.0), [0.375, 0.625])
    np.testing.assert_array_equal(sampling.curriculum_probs(q, 10, 10), [0.5, 0.5])
    np.testing.assert_array_equal(sampling.curriculum_probs(q, 99, 10), [0.5, 0.5])
    np.testing.assert_array_equal(sampling.curriculum_probs(q, 0, 0), [0.5, 0.5])
    with pytest.raises(ValueError):
        sampling.curriculum_probs([-1.0, 1.0], 0, 10)


def test_importance_weights_hand():
    # N=4, p=[0.5, 0.25]: (N p)^-1 = [0.5, 1] -> normalised by max: [0.5, 1]
    np.testing.assert_allclose(sampling.importance_weights([0.5, 0.25], 4, 1.0), [0.5, 1.0])
    # beta 0: no correction
    np.testing.assert_allclose(sampling.importance_weights([0.5, 0.1], 4, 0.0), [1.0, 1.0])
    # uniform sampling needs no correction at any beta
    np.testing.assert_allclose(sampling.importance_weights([0.25] * 3, 4, 0.7), [1.0] * 3)


def _slow_prioritised(x, alpha, eps):
    """The formula as written in the PER paper, one element at a time."""
    w = [(abs(v) + eps) ** alpha for v in x]
    return [v / sum(w) for v in w]


@given(scores, st.floats(0.0, 3.0))
@settings(max_examples=60, deadline=None)
def test_prioritised_sums_to_one_and_matches_reference(x, alpha):
    p = sampling.prioritised_probs(np.array(x), alpha)
    assert p.shape == (len(x),)
    assert np.all(p >= 0)
    assert p.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(p, _slow_prioritised(x, alpha, 1e-6), rtol=1e-9, atol=1e-12)


@given(st.lists(st.floats(0.0, 1e3), min_size=1, max_size=50), st.integers(0, 100),
       st.integers(0, 50))
@settings(max_examples=60, deadline=None)
def test_curriculum_sums_to_one_and_is_uniform_at_end(q, anneal_steps, extra):
    q = np.array(q)
    for step in (0, anneal_steps // 2, anneal_steps):
        assert sampling.curriculum_probs(q, step, anneal_steps).sum() == pytest.approx(1.0)
    end = sampling.curriculum_probs(q, anneal_steps + extra, anneal_steps)
    np.testing.assert_array_equal(end, np.full(q.size, 1.0 / q.size))


@given(st.lists(st.floats(0.0, 1e3), min_size=2, max_size=30), st.integers(1, 100))
@settings(max_examples=40, deadline=None)
def test_curriculum_moves_monotonically_toward_uniform(q, anneal_steps):
    q = np.array(q)
    uni = np.full(q.size, 1.0 / q.size)
    dists = [np.abs(sampling.curriculum_probs(q, s, anneal_steps) - uni).sum()
             for s in range(0, anneal_steps + 1, max(1, anneal_steps // 5))]
    assert all(a >= b - 1e-12 for a, b in zip(dists, dists[1:]))


@given(st.lists(st.floats(1e-6, 1.0), min_size=1, max_size=30), st.floats(0.0, 1.0))
@settings(max_examples=40, deadline=None)
def test_importance_weights_in_unit_interval(p, beta):
    w = sampling.importance_weights(np.array(p), 100, beta)
    assert np.all(w > 0) and np.all(w <= 1.0 + 1e-12) and w.max() == pytest.approx(1.0)
