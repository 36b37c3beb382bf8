"""TableView: row order, hash-index dedup and eviction, and the numpy gather against Arrow's take."""
import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from retro_dist.replay.arena import Arena
from retro_dist.replay.catalog import SegmentEntry, constant_values
from retro_dist.replay import gather
from retro_dist.replay.gather import hash_keys
from retro_dist.replay.view import TableView

ARENA = Arena(1 << 32)


def segment(lo: int, hi: int, batch_rows: int = 3) -> pa.Table:
    ids = np.arange(lo, hi)
    table = pa.table({"key": pa.array([f"k{i}" for i in ids]), "x": pa.array(ids)})
    return pa.Table.from_batches(table.to_batches(max_chunksize=batch_rows))


def entry(seq: int, rows: int, lo=None, hi=None, constant=None) -> SegmentEntry:
    return SegmentEntry("t", f"w-{seq:08d}.arrows", "w", seq, rows, rows * 10, float(seq), lo, hi,
                        constant)


def constant_columns(table: pa.Table):
    """What the writer records for a segment holding `table`."""
    const = None
    for b in table.to_batches():
        if b.num_rows:
            const = constant_values(b, const)
    return sorted(const) if const else None


def test_many_segments_keep_order_and_gather_across_them():
    v, start = TableView("t", arena=ARENA), 0
    rng = np.random.default_rng(0)
    for seq in range(200):
        n = int(rng.integers(1, 9))
        v.add(entry(seq, n), segment(start, start + n))
        start += n
    assert v.concat()["x"].to_pylist() == list(range(start))
    idx = rng.integers(0, start, 500)
    got = v.take(idx)
    assert got["x"].to_pylist() == idx.tolist()
    assert got["key"].to_pylist() == [f"k{i}" for i in idx]
    assert v.take(idx, columns=["x"]).column_names == ["x"]


def test_pop_oldest_forgets_keys():
    v = TableView("t", arena=ARENA)
    for seq, (lo, hi) in enumerate([(0, 5), (5, 7), (7, 12)]):
        v.add(entry(seq, hi - lo), segment(lo, hi))
    assert v.pop_oldest()[1] == 5
    assert v.concat()["x"].to_pylist() == list(range(5, 12))
    assert v.index.size == 7
    assert v.add(entry(9, 3), segment(0, 3)) == 3  # evicted keys may be stored again
    assert v.add(entry(10, 2), segment(5, 7)) == 0  # held keys may not
    assert v.duplicates_dropped == 2


def test_duplicates_inside_and_across_segments_keep_the_first():
    v = TableView("t", arena=ARENA)
    data = pa.table({"key": ["a", "b", "a", "c", "b"], "x": [0, 1, 2, 3, 4]})
    more = pa.table({"key": ["c", "d", "d"], "x": [5, 6, 7]})
    assert v.add_many([(entry(0, 5), data), (entry(1, 3), more)]) == [3, 1]
    assert v.concat()["x"].to_pylist() == [0, 1, 3, 6]
    assert v.take(np.array([3, 0, 3]))["key"].to_pylist() == ["d", "a", "d"]


def test_version_filter_skips_whole_segments():
    v = TableView("t", arena=ARENA)
    for seq in range(10):
        t = segment(seq * 4, seq * 4 + 4).append_column(
            "policy_version", pa.array(np.full(4, seq, np.int64)))
        v.add(entry(seq, 4, seq, seq), t)
    pool = v.pool(min_version=8)
    assert pool.tolist() == list(range(32, 40))
    assert v.segments_skipped == 8 and v.segments_scanned == 0  # 8, 9: whole, unread


def test_hash_keys_distinct_and_stable():
    keys = [f"run/w{i % 7}/e{i}/t{i % 3}" for i in range(50_000)] + ["", "a", "a\x00", "\x00a"]
    h = hash_keys(pa.array(keys))
    assert np.unique(h).size == len(keys)
    assert np.array_equal(hash_keys(pa.array(keys[::-1]))[::-1], h)
    assert np.array_equal(hash_keys(pa.chunked_array([keys[:10], keys[10:20]])), h[:20])


def test_a_key_hashes_the_same_whatever_keys_sit_beside_it():
    # The writer's exactly-once check, the reader's key index and the learner's leave-one-out
    # groups hash one segment or batch at a time: a key must hash alike in every one of them.
    # (It did not: strings got one mixing round per 8 bytes of the *longest* string beside them,
    # so a mix's coin groups stopped matching once mapreader task ids grew past 24 bytes.)
    short, long_ = "twx/coin/train/601#1", "twx/mapreader/train/111#1"
    alone = hash_keys(pa.array([short]))[0]
    assert hash_keys(pa.array([short, long_]))[0] == alone
    assert hash_keys(pa.array(["x" * 100, "", short]))[2] == alone
    assert hash_keys(pa.array([""]))[0] == hash_keys(pa.array(["", "abcdefghijk"]))[0]
    keys = [f"k{i}" + "y" * (i % 40) for i in range(500)]
    one_by_one = np.array([hash_keys(pa.array([k]))[0] for k in keys])
    assert np.array_equal(hash_keys(pa.array(keys)), one_by_one)


_VALUES = st.one_of(st.none(), st.integers(-5, 5))


@given(st.lists(st.tuples(_VALUES, st.one_of(st.none(), st.text(max_size=4)),
                          st.one_of(st.none(), st.lists(st.one_of(st.none(), st.text(max_size=3)),
                                                        max_size=3)),
                          st.one_of(st.none(), st.booleans())), min_size=1, max_size=40),
       st.integers(1, 7), st.data())
@settings(max_examples=40, deadline=None)
def test_gather_matches_arrow_take(rows, batch_rows, data):
    """Nulls, strings, nested lists, bools, over several segments and batches; columns the
    writer would record as constant in a segment (frequent here: few values) read row 0."""
    n = len(rows)
    table = pa.table({
        "key": pa.array([f"k{i}" for i in range(n)]),
        "i": pa.array([r[0] for r in rows], pa.int64()),
        "f": pa.array([None if r[0] is None else r[0] / 3 for r in rows], pa.float32()),
        "s": pa.array([r[1] for r in rows], pa.string()),
        "ls": pa.array([r[2] for r in rows], pa.list_(pa.string())),
        "li": pa.array([None if r[2] is None else [len(x or "") for x in r[2]] for r in rows],
                       pa.list_(pa.int32())),
        "b": pa.array([r[3] for r in rows], pa.bool_()),
    })
    v, cut = TableView("t", arena=ARENA), data.draw(st.integers(0, n))
    pool = data.draw(st.booleans())  # constant batches' values read in place, or from a pool
    for seq, part in enumerate([table.slice(0, cut), table.slice(cut)]):
        if part.num_rows:
            part = pa.Table.from_batches(part.to_batches(max_chunksize=batch_rows))
            v.add(entry(seq, part.num_rows, constant=constant_columns(part)), part)
    idx = np.array(data.draw(st.lists(st.integers(0, n - 1), max_size=30)), np.int64)
    default, gather.POOL_MIN_BATCHES = gather.POOL_MIN_BATCHES, 1 if pool else 1 << 30
    try:
        got = v.take(idx)
    finally:
        gather.POOL_MIN_BATCHES = default
    assert got.equals(table.take(pa.array(idx, pa.int64())))


def test_constant_columns_gather_from_row_0_and_match_take(monkeypatch):
    """One segment where `env` and `w` hold one value, one where they do not: a gather over both
    reads the first segment's values from its row 0 (step 0) and still equals Arrow's take."""
    a = pa.table({"key": pa.array(["a0", "a1", "a2", "a3"]), "env": pa.array(["coin"] * 4),
                  "w": pa.array([7] * 4, pa.int64()), "x": pa.array([1.0, 2.0, 3.0, 4.0])})
    b = pa.table({"key": pa.array(["b0", "b1", "b2"]), "env": pa.array(["coin", "map", "coin"]),
                  "w": pa.array([7, 8, 7], pa.int64()), "x": pa.array([5.0, 6.0, 7.0])})
    assert constant_columns(a) == ["env", "w"] and constant_columns(b) is None
    monkeypatch.setattr(gather, "POOL_MIN_BATCHES", 2)  # env and w: 2 constant batches each
    v = TableView("t", arena=Arena(1 << 30))
    for seq, part in enumerate([a, b]):
        part = pa.Table.from_batches(part.to_batches(max_chunksize=2))
        v.add(entry(seq, part.num_rows, constant=constant_columns(part)), part)
    idx = np.array([0, 3, 4, 5, 1, 6, 2, 2], np.int64)
    assert v.take(idx).equals(pa.concat_tables([a, b]).take(pa.array(idx)))
    assert v._layout("env").step.tolist() == [0, 0, 1, 1]
    assert v._layout("x").step is None
    assert v._layout("env").pool is not None and v._layout("w").pool is not None
    assert v._layout("env").single is None  # "map" in the second segment


def test_a_column_with_one_value_in_the_whole_store_is_not_read_at_all():
    v = TableView("t", arena=Arena(1 << 30))
    for seq in range(3):
        part = pa.table({"key": pa.array([f"k{seq}-{i}" for i in range(4)]),
                         "run": pa.array(["r1"] * 4), "w": pa.array([seq] * 4, pa.int64())})
        v.add(entry(seq, 4, constant=constant_columns(part)), part)
    assert v._layout("run").single is not None and v._layout("w").single is None
    idx = np.array([0, 5, 11, 3], np.int64)
    got = v.take(idx)
    assert got.column("run").to_pylist() == ["r1"] * 4 and got.column("w").to_pylist() == [0, 1, 2, 0]
    assert v.take(idx[:2]).column("run").to_pylist() == ["r1"] * 2


def test_constant_values_skip_floats_nulls_and_changed_values():
    first = pa.record_batch({"i": [3, 3], "s": ["a", "a"], "f": [0.0, -0.0], "n": [None, None],
                             "b": [True, True], "v": [1, 2]})
    assert constant_values(first, None) == {"i": 3, "s": "a", "b": True}
    later = pa.record_batch({"i": [3], "s": ["b"], "f": [0.0], "n": [1], "b": [True], "v": [1]})
    assert constant_values(later, constant_values(first, None)) == {"i": 3, "b": True}
    # same lengths, other bytes; and a slice whose rows start past other values
    mixed = pa.record_batch({"s": ["ab", "ab", "ac"], "e": ["", "", ""], "t": ["x", "yy", "yy"]})
    assert constant_values(mixed, None) == {"e": ""}
    assert constant_values(mixed.slice(1), None) == {"e": "", "t": "yy"}
