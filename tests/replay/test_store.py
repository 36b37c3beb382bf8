"""Replay writer + store in one process: round trip, numbering, dedup, quarantine, retention."""
import hashlib
import os
import tempfile
import time
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retro_dist.core import sampling
from retro_dist.core.records import ReflectionSample, from_table, make_key, to_batch
from retro_dist.replay.catalog import StoreLocation, load_catalog
from retro_dist.replay.config import ReplayConfig
from retro_dist.replay.store import ReplayStore
from retro_dist.replay.writer import ReplayWriter

T = "reflections"
f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


def sample(i: int, version: int = 0, reward: float = 0.0, task: str = "t0") -> ReflectionSample:
    return ReflectionSample(
        key=make_key("run", 0, i, 0), run_id="run", worker_id=0, episode_id=i, task_id=task,
        env_name="env", trial=0, prompt_ids=[1, 2, i % 7], reflection_ids=[3, 4],
        behaviour_logprobs=[-0.5, -0.25], reflection_text=f"r{i}", return_before=0.0,
        return_after=1.0, reward=reward, policy_version=version)


def batch(lo: int, hi: int, **kw):
    return to_batch([sample(i, **kw) for i in range(lo, hi)])


def crash(w: ReplayWriter) -> None:
    """Stop a writer the way a kill would, minus the randomness: seals already handed to the
    sealer thread finish (a kill may or may not let them), open segments stay temp files."""
    w._sealer.shutdown(wait=True)


@st.composite
def reflection(draw, i):
    r = draw(st.integers(0, 6))
    return ReflectionSample(
        key=make_key(draw(st.sampled_from(["a", "b"])), 1, i, draw(st.integers(0, 3))),
        run_id=draw(st.text(max_size=5)), worker_id=draw(st.integers(0, 2**40)), episode_id=i,
        task_id=draw(st.text(max_size=8)), env_name=draw(st.sampled_from(["alf", "web"])),
        trial=draw(st.integers(0, 5)),
        prompt_ids=draw(st.lists(st.integers(-2**31, 2**31 - 1), max_size=6)),
        reflection_ids=draw(st.lists(st.integers(0, 50000), min_size=r, max_size=r)),
        behaviour_logprobs=draw(st.lists(f32, min_size=r, max_size=r)),
        reflection_text=draw(st.text(max_size=10)), return_before=draw(f32),
        return_after=draw(f32), reward=draw(st.floats(allow_nan=False)),
        policy_version=draw(st.integers(0, 100)), created_at=draw(st.floats(0, 2e9)))


@given(st.data(), st.integers(1, 12), st.lists(st.integers(1, 8), min_size=1, max_size=4))
@settings(max_examples=15, deadline=None)
def test_round_trip_random_batches(data, seal_rows, sizes):
    records, start = [], 0
    for n in sizes:  # distinct episode ids -> distinct keys
        records.append([data.draw(reflection(i)) for i in range(start, start + n)])
        start += n
    with tempfile.TemporaryDirectory() as root:
        with ReplayWriter(root, "w0", ReplayConfig(seal_rows=seal_rows)) as w:
            stored = [w.append(T, to_batch(recs)) for recs in records]
        assert stored == sizes
        got = from_table(ReplayStore(root, ReplayConfig()).read(T), ReflectionSample)
    assert got == [r for recs in records for r in recs]  # one writer: order is kept


def test_write_seal_read_and_commit_count(tmp_path):
    w = ReplayWriter(str(tmp_path), "w0", ReplayConfig(seal_rows=1000))
    w.append(T, batch(0, 10))
    assert w.unacked_rows == 10 and w.committed_rows == 0
    assert ReplayStore(str(tmp_path), ReplayConfig()).num_rows(T) == 0  # open segment: not data
    assert w.seal() == 10
    assert w.unacked_rows == 0 and w.committed_rows == 10
    store = ReplayStore(str(tmp_path), ReplayConfig())
    assert store.read(T)["key"].to_pylist() == [make_key("run", 0, i, 0) for i in range(10)]
    w.append(T, batch(10, 15))
    w.close()
    assert store.refresh() == 1 and store.num_rows(T) == 15


def test_seal_on_rows_and_unacked_bound(tmp_path):
    cfg = ReplayConfig(seal_rows=8, max_unacked_rows=5)
    w = ReplayWriter(str(tmp_path), "w0", cfg)
    w.append(T, batch(0, 23))  # bounded by max_unacked_rows: segments of 5 rows
    assert w.unacked_rows == 3 and w.committed_rows == 20
    w.close()
    stats = ReplayStore(str(tmp_path), cfg).stats()
    assert stats["rows"] == 23 and stats["segments"] == 5


def test_seal_on_age_and_on_bytes(tmp_path):
    w = ReplayWriter(str(tmp_path / "age"), "w0", ReplayConfig(seal_seconds=0.05))
    w.append(T, batch(0, 3))
    time.sleep(0.1)
    w.append(T, batch(3, 4))  # the 0.1 s old segment seals first; the new row opens another
    w.seal()
    assert ReplayStore(str(tmp_path / "age"), ReplayConfig()).stats()["segments"] == 2
    with ReplayWriter(str(tmp_path / "bytes"), "w0", ReplayConfig(seal_bytes=1)) as w:
        for i in range(3):
            w.append(T, batch(i, i + 1))
    assert ReplayStore(str(tmp_path / "bytes"), ReplayConfig()).stats()["segments"] == 3


def _digests(root):
    seg_dir = os.path.join(root, "segments", T)
    out = {}
    for name in os.listdir(seg_dir):
        with open(os.path.join(seg_dir, name), "rb") as f:
            out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_reopen_continues_numbering_and_never_overwrites(tmp_path):
    root, cfg = str(tmp_path), ReplayConfig(seal_rows=5)
    with ReplayWriter(root, "w0", cfg) as w:
        w.append(T, batch(0, 10))
    before = _digests(root)
    assert sorted(before) == ["w0-00000000.arrows", "w0-00000001.arrows"]
    crashed = ReplayWriter(root, "w0", cfg)
    crashed.append(T, batch(10, 13))  # left open: a temp segment, as after a kill
    crash(crashed)
    with ReplayWriter(root, "w0", cfg) as w:
        w.append(T, batch(10, 20))
    after = _digests(root)
    assert {n: after[n] for n in before} == before
    assert sorted(after) == ["w0-00000000.arrows", "w0-00000001.arrows",
                             "w0-00000003.arrows", "w0-00000004.arrows"]  # 2 was the temp
    assert ReplayStore(root, cfg).num_rows(T) == 20


def test_adopts_segment_renamed_but_not_catalogued(tmp_path):
    root, cfg = str(tmp_path), ReplayConfig(seal_rows=100)
    with ReplayWriter(root, "w0", cfg) as w:
        w.append(T, batch(0, 4))
    catalog = tmp_path / "catalog" / "w0.json"
    old = catalog.read_bytes()
    with ReplayWriter(root, "w0", cfg) as w:
        w.append(T, batch(4, 9))
    catalog.write_bytes(old)  # as if killed between the rename and the catalog write
    assert ReplayStore(root, cfg).num_rows(T) == 4
    w = ReplayWriter(root, "w0", cfg)
    adopted = w._catalog.segments[-1]  # its catalog entry is built from the file, constants too
    assert adopted.rows == 5 and "task_id" in adopted.constant and "key" not in adopted.constant
    assert w.append(T, batch(0, 12)) == 3  # 0..8 already stored, adopted segment included
    w.close()
    assert ReplayStore(root, cfg).num_rows(T) == 12


def test_the_catalog_names_each_segments_constant_columns_and_samples_read_them_right(tmp_path):
    root, cfg = str(tmp_path), ReplayConfig(seal_rows=100, min_size_to_sample=1)
    with ReplayWriter(root, "w0", cfg) as w:
        w.append(T, batch(0, 4, version=3))
        w.seal()
        w.append(T, batch(4, 6, version=3))
        w.append(T, batch(6, 9, version=4, task="t1"))  # same segment: version and task vary
    catalog = tmp_path / "catalog" / "w0.json"
    first, second = load_catalog(StoreLocation(root), "w0").segments
    same = ["env_name", "run_id", "trial", "worker_id"]
    assert first.constant == sorted(same + ["policy_version", "task_id"])
    assert second.constant == same
    store = ReplayStore(root, cfg)
    got = store.sample(T, 64, rng=np.random.default_rng(0))
    assert got.table.equals(store.read(T).take(got.indices))
    # a catalog from before this field (no "constant") reads as before: every row gathered
    newer = b',"constant":["env_name","run_id","trial","worker_id"]'
    catalog.write_bytes(catalog.read_bytes().replace(newer, b""))
    assert load_catalog(StoreLocation(root), "w0").segments[1].constant is None
    store = ReplayStore(root, cfg)
    got = store.sample(T, 64, rng=np.random.default_rng(1))
    assert got.table.equals(store.read(T).take(got.indices))


@given(st.lists(st.tuples(st.lists(st.integers(0, 30), min_size=1, max_size=12),
                          st.sampled_from(["none", "seal", "restart", "crash"])),
                min_size=1, max_size=8),
       st.integers(1, 10))
@settings(max_examples=25, deadline=None)
def test_resent_keys_stored_once(ops, seal_rows):
    cfg = ReplayConfig(seal_rows=seal_rows)
    with tempfile.TemporaryDirectory() as root:
        w = ReplayWriter(root, "w0", cfg)
        durable: set[int] = set()  # acknowledged (committed) episode ids: the store must hold them
        unacked: list[int] = []  # written, not yet sealed, in write order
        for episodes, then in ops:
            committed = w.committed_rows
            got = w.append(T, to_batch([sample(i) for i in episodes]))
            fresh = list(dict.fromkeys(i for i in episodes if i not in durable
                                       and i not in unacked))
            assert got == len(fresh)
            unacked += fresh
            if then == "seal":
                w.seal()
            elif then == "restart":
                w.close()
            elif then == "crash":
                crash(w)
            # the writer acknowledges rows in write order as segments seal
            acked = w.committed_rows - committed
            durable |= set(unacked[:acked])
            unacked = unacked[acked:]
            if then in ("restart", "crash"):
                w = ReplayWriter(root, "w0", cfg)  # a crash loses only the unacknowledged rows
                unacked = []
        w.close()
        durable |= set(unacked)
        keys = ReplayStore(root, cfg).read(T)["key"].to_pylist()
        assert len(keys) == len(set(keys))
        assert set(keys) == {make_key("run", 0, i, 0) for i in durable}
        # sealed segments hold each key once, without the reader's dedup
        assert ReplayStore(root, cfg).metrics()["replay/duplicates_dropped"] == 0


def test_a_resent_key_beside_a_longer_one_is_stored_once(tmp_path):
    # Exactly-once compares 64-bit key hashes batch by batch: a key's hash must not depend on
    # the other keys of its batch (it did: the longest key set the number of mixing rounds).
    def row(i: int, key: str) -> ReflectionSample:
        s = sample(i)
        s.key = key
        return s

    short, long_ = "run/w0/e1/t0", "run/w0/e2/t0/" + "x" * 40
    for restart in (False, True):
        root = str(tmp_path / f"restart{restart}")
        w = ReplayWriter(root, "w0", ReplayConfig())
        w.append(T, to_batch([row(1, short)]))
        if restart:  # the resend meets the key in a sealed segment, not the open one
            w.close()
            w = ReplayWriter(root, "w0", ReplayConfig())
        assert w.append(T, to_batch([row(1, short), row(2, long_)])) == 1
        w.close()
        assert sorted(ReplayStore(root, ReplayConfig()).read(T)["key"].to_pylist()) == [short, long_]


def test_same_key_from_two_writers_read_once(tmp_path):
    for wid in ("a", "b"):
        with ReplayWriter(str(tmp_path), wid, ReplayConfig()) as w:
            w.append(T, batch(0, 6) if wid == "a" else batch(3, 9))
    store = ReplayStore(str(tmp_path), ReplayConfig())
    assert store.num_rows(T) == 9
    assert sorted(store.read(T)["episode_id"].to_pylist()) == list(range(9))
    assert store.metrics()["replay/duplicates_dropped"] == 3


def _three_segments(root):
    with ReplayWriter(root, "w0", ReplayConfig(seal_rows=10)) as w:
        w.append(T, batch(0, 30))
    return os.path.join(root, "segments", T)


def test_truncated_and_garbage_segments_quarantined(tmp_path):
    root = str(tmp_path)
    seg_dir = _three_segments(root)
    truncated, garbage = (os.path.join(seg_dir, f"w0-0000000{i}.arrows") for i in (0, 2))
    with open(truncated, "r+b") as f:
        f.truncate(os.path.getsize(truncated) // 2)
    with open(garbage, "wb") as f:
        f.write(os.urandom(500))
    store = ReplayStore(root, ReplayConfig())  # a table's segments open on its first use
    with pytest.warns(RuntimeWarning) as caught:
        store.num_rows(T)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert any(truncated in m for m in messages) and any(garbage in m for m in messages)
    assert store.read(T)["episode_id"].to_pylist() == list(range(10, 20))
    assert store.stats()["quarantined"] == 2
    assert sorted(os.listdir(os.path.join(root, "quarantine"))) == [
        "w0-00000000.arrows", "w0-00000002.arrows"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second open stays quiet: warned once, already moved
        again = ReplayStore(root, ReplayConfig())
    assert again.num_rows(T) == 10 and again.stats()["quarantined"] == 2


def test_cut_at_message_boundary_caught_by_row_count(tmp_path):
    root = str(tmp_path)
    with ReplayWriter(root, "w0", ReplayConfig(seal_rows=10)) as w:
        for lo in range(0, 10, 2):  # one IPC message per 2-row batch
            w.append(T, batch(lo, lo + 2))
    path = os.path.join(root, "segments", T, "w0-00000000.arrows")
    import pyarrow.ipc as ipc
    with open(path, "rb") as f:
        reader = ipc.open_stream(f)
        first = reader.read_next_batch()
        cut = f.tell()
    assert first.num_rows == 2
    with open(path, "r+b") as f:
        f.truncate(cut)
    with pytest.warns(RuntimeWarning, match="catalog says 10"):
        assert ReplayStore(root, ReplayConfig()).num_rows(T) == 0


def test_orphan_temp_segment_ignored(tmp_path):
    root = str(tmp_path)
    w = ReplayWriter(root, "w0", ReplayConfig(seal_rows=100))
    w.append(T, batch(0, 5))
    w._open[T].file.flush()  # bytes on disk under the temp name, writer then "killed"
    crash(w)
    assert os.path.getsize(os.path.join(root, "segments", T, "w0-00000000.arrows.tmp")) > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ReplayStore(root, ReplayConfig()).num_rows(T) == 0


def test_retention_evicts_whole_oldest_segments(tmp_path):
    root = str(tmp_path)
    _three_segments(root)
    with ReplayWriter(root, "w1", ReplayConfig(seal_rows=10)) as w:
        w.append(T, batch(100, 120))
    store = ReplayStore(root, ReplayConfig(retention_rows=25))
    # 50 rows in 5 segments of 10: evict the oldest until <= 25 -> 3 evicted, 20 left
    assert store.num_rows(T) == 20
    assert store.metrics()["replay/evicted_segments"] == 3
    assert store.read(T)["episode_id"].to_pylist() == list(range(100, 120))
    assert len(os.listdir(os.path.join(root, "segments", T))) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # evicted segments are not "missing"
        assert ReplayStore(root, ReplayConfig()).num_rows(T) == 20


def test_retention_by_bytes_and_age(tmp_path):
    root = str(tmp_path)
    _three_segments(root)
    one = ReplayStore(root, ReplayConfig()).stats()["bytes"] // 3
    assert ReplayStore(root, ReplayConfig(retention_bytes=one + 1)).num_rows(T) == 10
    assert ReplayStore(root, ReplayConfig(retention_seconds=1e-3)).num_rows(T) == 0


def test_sample_filters_probs_and_indices(tmp_path):
    root = str(tmp_path)
    with ReplayWriter(root, "w0", ReplayConfig(seal_rows=7)) as w:
        w.append(T, to_batch([sample(i, version=i % 5, reward=float(i % 3) - 1.0,
                                     task=f"t{i % 2}") for i in range(40)]))
    cfg = ReplayConfig(sampler="prioritised", priority_key="reward_abs", priority_exponent=1.0,
                       max_staleness=1, min_size_to_sample=1)
    store = ReplayStore(root, cfg)
    rng = np.random.default_rng(0)
    got = store.sample(T, 500, rng=rng, current_version=4, tasks=["t0"])
    assert got.table.num_rows == 500
    assert min(got.table["policy_version"].to_pylist()) >= 3  # staleness: v >= 4 - 1
    assert set(got.table["task_id"].to_pylist()) == {"t0"}
    assert got.table.equals(store.read(T).take(got.indices))
    rows = store.read(T).to_pylist()
    pool = [i for i, r in enumerate(rows) if r["policy_version"] >= 3 and r["task_id"] == "t0"]
    want = dict(zip(pool, sampling.prioritised_probs([rows[i]["reward"] for i in pool], 1.0)))
    np.testing.assert_allclose(got.probs, [want[i] for i in got.indices])
    assert {rows[i]["reward"] for i in got.indices} == {-1.0, 1.0}  # |0| + eps: ~never drawn


def test_sample_explicit_priorities_and_curriculum(tmp_path):
    root = str(tmp_path)
    with ReplayWriter(root, "w0", ReplayConfig()) as w:
        w.append(T, batch(0, 4))
    rng = np.random.default_rng(1)
    pri = ReplayStore(root, ReplayConfig(sampler="prioritised", priority_exponent=1.0,
                                         min_size_to_sample=1))
    got = pri.sample(T, 200, rng=rng, priorities=np.array([0.0, 0.0, 0.0, 5.0]))
    assert (got.indices == 3).mean() > 0.99
    cur = ReplayStore(root, ReplayConfig(sampler="curriculum", curriculum_anneal_steps=10,
                                         min_size_to_sample=1))
    q = np.array([0.0, 0.0, 0.0, 1.0])
    assert (cur.sample(T, 200, rng=rng, step=0, priorities=q).indices == 3).mean() > 0.99
    late = cur.sample(T, 200, rng=rng, step=10, priorities=q)
    np.testing.assert_array_equal(late.probs, np.full(200, 0.25))


def test_rate_limited_drop_and_block(tmp_path):
    root = str(tmp_path)
    with ReplayWriter(root, "w0", ReplayConfig()) as w:
        w.append(T, batch(0, 4))
    rng = np.random.default_rng(0)
    drop = ReplayStore(root, ReplayConfig(min_size_to_sample=5, on_overflow="drop"))
    assert drop.sample(T, 2, rng=rng) is None
    assert drop.metrics()["replay/rate_limited"] == 1
    from retro_dist.replay.ratelimit import RateLimitedError
    block = ReplayStore(root, ReplayConfig(min_size_to_sample=5, on_overflow="block", block_timeout_s=0.1))
    with pytest.raises(RateLimitedError, match="min_size_to_sample=5"):
        block.sample(T, 2, rng=rng)
    with ReplayWriter(root, "w0", ReplayConfig()) as w:
        w.append(T, batch(4, 5))
    assert block.sample(T, 2, rng=rng).table.num_rows == 2  # refresh picked up the 5th row
    ratio = ReplayStore(root, ReplayConfig(min_size_to_sample=1, samples_per_insert=2.0,
                                           error_buffer=4.0, on_overflow="drop"))
    # 5 inserts * 2 = 10 "credit", min_diff = 2*1 - 4 = -2: 12 rows may be sampled, not 13
    assert ratio.sample(T, 12, rng=rng) is not None
    assert ratio.sample(T, 1, rng=rng) is None


def test_rows_below_version_and_explicit_staleness(tmp_path):
    root = str(tmp_path)
    with ReplayWriter(root, "w0", ReplayConfig(seal_rows=10)) as w:
        w.append(T, to_batch([sample(i, version=i // 10) for i in range(40)]))  # v0..v3, 10 each
        w.append(T, to_batch([sample(i, version=i % 4) for i in range(40, 50)]))  # mixed segment
    store = ReplayStore(root, ReplayConfig(max_staleness=0, min_size_to_sample=1))
    assert store.rows_below_version(T, 0) == 0
    assert store.rows_below_version(T, 2) == 20 + 6  # two whole segments + v0/v1 of the mixed one
    assert store.rows_below_version(T, 10) == 50
    assert store.rows_below_version("trials", 3) == 0
    rng = np.random.default_rng(0)
    assert set(store.sample(T, 200, rng=rng, current_version=3)
               .table["policy_version"].to_pylist()) == {3}  # cfg.max_staleness=0
    got = store.sample(T, 400, rng=rng, current_version=3, max_staleness=1)
    assert set(got.table["policy_version"].to_pylist()) == {2, 3}
    assert store.sample(T, 10, rng=rng, current_version=9, max_staleness=1) is None
    ranged = store.read(T, min_policy_version=1, max_policy_version=2)
    assert sorted(set(ranged["policy_version"].to_pylist())) == [1, 2]
    assert ranged.num_rows == 20 + 5


def test_a_catalog_read_mid_write_is_retried_at_the_next_refresh(tmp_path):
    """A reader that catches a writer's catalog half-written (an object store under load served a
    truncated body) keeps what it has and reads the catalog again at the next refresh."""
    from retro_dist.core.records import to_batch
    from tests.replay.test_reader import trial

    root = tmp_path / "replay"
    with ReplayWriter(str(root), "w0", ReplayConfig()) as w:
        w.append("trials", to_batch([trial(0), trial(1)]))
    catalog = root / "catalog" / "w0.json"
    whole = catalog.read_bytes()
    catalog.write_bytes(whole[: len(whole) // 2])
    store = ReplayStore(str(root), ReplayConfig())
    assert store.refresh() == 0 and store.num_rows("trials") == 0  # no crash, nothing half-read
    catalog.write_bytes(whole)
    assert store.refresh() == 1 and store.num_rows("trials") == 2
