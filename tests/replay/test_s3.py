"""The store on an S3-compatible server (moto on 127.0.0.1) and on file:// URIs."""
import gc

import numpy as np
import pyarrow.fs as pafs
import pytest

from retro_dist.core.records import ReflectionSample, make_key, to_batch
from retro_dist.replay import location
from retro_dist.replay.config import ReplayConfig
from retro_dist.replay.store import ReplayStore
from retro_dist.replay.writer import ReplayWriter

T = "reflections"


def batch(lo: int, hi: int):
    return to_batch([ReflectionSample(
        key=make_key("run", 0, i, 0), run_id="run", worker_id=0, episode_id=i, task_id="t0",
        env_name="env", trial=0, prompt_ids=[1, 2, i % 7], reflection_ids=[3, 4],
        behaviour_logprobs=[-0.5, -0.25], reflection_text=f"r{i}", return_before=0.0,
        return_after=1.0, reward=0.0, policy_version=0) for i in range(lo, hi)])


def crash(w: ReplayWriter) -> None:
    """As test_store.crash: in-flight seals finish, open segments are abandoned."""
    w._sealer.shutdown(wait=True)


def _objects(root):
    fs, path = location.open_location(root)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(i.path[len(path) + 1:] for i in infos if i.type == pafs.FileType.File)


def test_s3_round_trip_restart_and_no_partial_reads(s3_root):
    cfg = ReplayConfig(seal_rows=10, min_size_to_sample=1)
    w = ReplayWriter(s3_root, "w0", cfg)
    w.append(T, batch(0, 25))  # two sealed segments of 10, five rows open
    w._reap(wait=True)
    store = ReplayStore(s3_root, cfg)
    assert store.num_rows(T) == 20  # the open segment's upload is not an object yet
    assert not any(o.endswith(".tmp") for o in _objects(s3_root))
    got = store.sample(T, 64, rng=np.random.default_rng(0))
    assert set(got.table["episode_id"].to_pylist()) <= set(range(20))
    crash(w)  # abandoned with an upload in flight
    del w
    gc.collect()  # the stream's destructor completes that upload: an uncatalogued object
    assert "segments/reflections/w0-00000002.arrows" in _objects(s3_root)
    assert store.refresh() == 0  # not catalogued: never read
    w = ReplayWriter(s3_root, "w0", cfg)  # deletes it; the caller resends its rows
    assert w.append(T, batch(0, 30)) == 10  # 0..19 stored: only the rest is new
    w.close()
    assert store.refresh() == 1
    assert sorted(store.read(T)["episode_id"].to_pylist()) == list(range(30))
    assert store.metrics()["replay/duplicates_dropped"] == 0
    objects = _objects(s3_root)
    assert objects == ["catalog/w0.json", "segments/reflections/w0-00000000.arrows",
                       "segments/reflections/w0-00000001.arrows",
                       "segments/reflections/w0-00000003.arrows"]
    fresh = ReplayStore(s3_root, cfg)
    assert fresh.read(T)["key"].to_pylist() == store.read(T)["key"].to_pylist()


def test_s3_two_writers_retention_and_uncatalogued_segment(s3_root):
    cfg = ReplayConfig(seal_rows=5)
    for wid, (lo, hi) in (("a", (0, 10)), ("b", (5, 15))):
        with ReplayWriter(s3_root, wid, cfg) as w:
            w.append(T, batch(lo, hi))
    store = ReplayStore(s3_root, cfg)
    assert store.num_rows(T) == 15 and store.metrics()["replay/duplicates_dropped"] == 5
    fs, path = location.open_location(s3_root)
    old = location.read_file(location.join(s3_root, "catalog", "a.json"))
    with ReplayWriter(s3_root, "a", cfg) as w:
        w.append(T, batch(100, 105))
    location.write_file_once(location.join(s3_root, "catalog", "a.json"), old)  # lost commit
    with ReplayWriter(s3_root, "a", cfg) as w:  # no commit, no ack: deleted, resent
        assert w.append(T, batch(100, 106)) == 6
    assert ReplayStore(s3_root, cfg).num_rows(T) == 21
    trimmed = ReplayStore(s3_root, ReplayConfig(retention_rows=12))
    assert trimmed.num_rows(T) <= 12
    assert trimmed.metrics()["replay/evicted_segments"] >= 1


def test_file_uri_is_the_local_store(tmp_path):
    uri = f"file://{tmp_path}/store"
    with ReplayWriter(uri, "w0", ReplayConfig()) as w:
        w.append(T, batch(0, 7))
    assert (tmp_path / "store" / "catalog" / "w0.json").is_file()
    assert ReplayStore(str(tmp_path / "store"), ReplayConfig()).num_rows(T) == 7
    assert ReplayStore(uri, ReplayConfig()).read(T)["key"].to_pylist() == [
        make_key("run", 0, i, 0) for i in range(7)]


def test_location_helpers(s3_root, tmp_path, monkeypatch):
    for root in (s3_root, f"file://{tmp_path}/x", str(tmp_path / "y")):
        target = location.join(root, "ckpt", "step-1", "meta.json")
        location.write_file_once(target, b"one")
        location.write_file_once(target, b"two")
        assert location.read_file(target) == b"two" and location.exists(target)
        assert location.is_local(root) == (not root.startswith("s3://"))
    assert not any(o.endswith(".tmp") for o in _objects(s3_root))
    assert location.join("s3://b/p?scheme=http", "a") == "s3://b/p/a?scheme=http"
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    with pytest.raises(ValueError, match="explicit credentials"):
        location.open_location("s3://bucket/x?endpoint_override=127.0.0.1:1&scheme=http")
