"""TableView: block compaction keeps row order, bounds the block count, and evicts exactly."""
import numpy as np
import pyarrow as pa

from retro_dist.replay import view as view_mod
from retro_dist.replay.catalog import SegmentEntry
from retro_dist.replay.view import TableView


def segment(lo: int, hi: int, batch_rows: int = 3) -> pa.Table:
    ids = np.arange(lo, hi)
    table = pa.table({"key": pa.array([f"k{i}" for i in ids]), "x": pa.array(ids)})
    return pa.Table.from_batches(table.to_batches(max_chunksize=batch_rows))


def entry(seq: int, rows: int) -> SegmentEntry:
    return SegmentEntry("t", f"w-{seq:08d}.arrows", "w", seq, rows, rows * 10, float(seq))


def test_many_small_segments_stay_few_blocks_in_order(monkeypatch):
    monkeypatch.setattr(view_mod, "BLOCK_ROWS", 64)
    v, start = TableView("t"), 0
    rng = np.random.default_rng(0)
    for seq in range(200):
        n = int(rng.integers(1, 9))
        v.add(entry(seq, n), segment(start, start + n))
        start += n
        # full blocks + a Timsort-like tail: the tail shrinks geometrically
        assert len(v.blocks) <= start // 32 + 2 + int(np.log2(64)) * 2
    assert v.concat()["x"].to_pylist() == list(range(start))
    idx = rng.integers(0, start, 50)
    assert v.take(idx)["x"].to_pylist() == idx.tolist()


def test_pop_oldest_slices_merged_blocks_and_forgets_keys():
    v = TableView("t")
    for seq, (lo, hi) in enumerate([(0, 5), (5, 7), (7, 12)]):
        v.add(entry(seq, hi - lo), segment(lo, hi))
    assert len(v.blocks) == 1  # merged: 5 <= 2 * 2, then 7 <= 2 * 5
    assert v.pop_oldest()[1] == 5
    assert v.concat()["x"].to_pylist() == list(range(5, 12))
    assert "k0" not in v.keys and "k5" in v.keys
    assert v.add(entry(9, 3), segment(0, 3)) == 3  # evicted keys may be stored again
    assert v.add(entry(10, 2), segment(5, 7)) == 0  # held keys may not
    assert v.duplicates_dropped == 2


def test_duplicate_keys_inside_a_segment_keep_the_first():
    v = TableView("t")
    data = pa.table({"key": ["a", "b", "a", "c", "b"], "x": [0, 1, 2, 3, 4]})
    assert v.add(entry(0, 5), data) == 3
    assert v.concat()["x"].to_pylist() == [0, 1, 3]
