"""Inverse-CDF draws (replay/draw.py) and the block-copy gather paths (gather._copy_ranges)."""
import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from retro_dist.replay.arena import GUARD, Arena
from retro_dist.replay.catalog import SegmentEntry
from retro_dist.replay.draw import BLOCK, Cumulative
from retro_dist.replay.view import TableView


@given(st.lists(st.sampled_from([0.0, 0.0, 1e-9, 0.5, 1.0, 3.0]), min_size=1, max_size=3 * BLOCK + 5),
       st.integers(0, 2**32 - 1))
@settings(max_examples=60, deadline=None)
def test_search_equals_searchsorted(weights, seed):
    weights = np.array(weights)
    if weights.sum() == 0:
        weights[-1] = 1.0
    c = Cumulative(weights.copy())
    targets = np.random.default_rng(seed).random(200) * c.total
    targets[:len(c.values)] = c.values[:200]  # exactly on a step: searchsorted's "right" rule
    targets = targets[targets < c.total]
    np.testing.assert_array_equal(c.search(targets), np.searchsorted(c.values, targets, "right"))


@given(st.lists(st.sampled_from([0.0, 0.25, 1.0, 3.0]), min_size=1, max_size=3 * BLOCK + 5),
       st.integers(0, 2**32 - 1))
@settings(max_examples=60, deadline=None)
def test_draw_probabilities_are_each_rows_weight_share(weights, seed):
    weights = np.array(weights)
    if weights.sum() == 0:
        weights[0] = 1.0
    c = Cumulative(weights.copy())
    rows, probs = c.draw(np.random.default_rng(seed), 300)
    assert weights[rows].min() > 0
    np.testing.assert_allclose(probs, weights[rows] / weights.sum(), rtol=1e-12, atol=1e-15)


def test_answers_past_the_guide_window_fall_back_to_a_full_search():
    # 1, then 5 blocks of zeros, then 1: every target >= 1 lands more than BLOCK rows after its
    # guide entry; and a heavy-tailed mix, where guide entries sit far apart
    for weights in (np.array([1.0] + [0.0] * (5 * BLOCK) + [1.0]),
                    np.random.default_rng(1).pareto(0.5, 20 * BLOCK)):
        c = Cumulative(weights.copy())
        targets = np.random.default_rng(2).random(5000) * c.total
        np.testing.assert_array_equal(c.search(targets), np.searchsorted(c.values, targets, "right"))
        rows, probs = c.draw(np.random.default_rng(3), 2000)
        np.testing.assert_allclose(probs, weights[rows] / weights.sum(), rtol=1e-9)


class _Top:  # a generator whose every draw rounds up to the total: the last row, its own share
    def random(self, n):
        return np.full(n, 1.0)


def test_a_target_at_the_total_draws_the_last_row():
    for m in (BLOCK, 2 * BLOCK, 70):
        weights = np.arange(1.0, m + 1)
        rows, probs = Cumulative(weights).draw(_Top(), 3)
        assert rows.tolist() == [m - 1] * 3
        np.testing.assert_allclose(probs, m / weights.sum())


def test_draw_frequencies_and_probabilities():
    weights = np.array([0.0, 1.0, 0.0, 3.0] * 50)  # zero-weight rows are never drawn
    rows, probs = Cumulative(weights).draw(np.random.default_rng(0), 40_000)
    assert set(np.unique(rows)) <= set(np.flatnonzero(weights))
    np.testing.assert_allclose(probs, weights[rows] / weights.sum())
    assert abs((weights[rows] == 3.0).mean() - 0.75) < 0.01


def test_gather_rows_longer_than_the_guard_and_rows_at_a_segment_end():
    """Rows too long for one block copy go element by element; rows that end a segment read
    into its guard, never past it; both give Arrow's own take."""
    long = GUARD // 4 + 10  # int32 values: one row longer than the guard
    lists = [list(range(k)) for k in (3, long, 0, 7, 1)]
    table = pa.table({"key": pa.array([f"k{i}" for i in range(5)]),
                      "ids": pa.array(lists, pa.list_(pa.int32())),
                      "s": pa.array(["a" * 5, "", "bb", "c" * 300, "d"])})
    view = TableView("t", arena=Arena(1 << 32))
    view.add(SegmentEntry("t", "w-00000000.arrows", "w", 0, 5, 10, 0.0), table)
    for idx in ([4, 4, 3], [0, 1, 2, 3, 4], [1, 4]):
        got = view.take(np.array(idx))
        assert got.equals(table.take(pa.array(idx))), idx
