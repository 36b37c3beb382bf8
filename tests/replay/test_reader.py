"""The reader at scale, in miniature: lazy tables, version skipping, column selection, page budget."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from retro_dist.core.records import ReflectionSample, TrialRecord, make_key, to_batch
from retro_dist.replay.config import ReplayConfig
from retro_dist.replay.keyset import HashSet
from retro_dist.replay.store import ReplayStore
from retro_dist.replay.writer import ReplayWriter

T = "reflections"


def reflection(i: int, version: int) -> ReflectionSample:
    return ReflectionSample(
        key=make_key("run", 0, i, 0), run_id="run", worker_id=0, episode_id=i, task_id=f"t{i % 3}",
        env_name="env", trial=0, prompt_ids=[1, 2, i % 7], reflection_ids=[3, 4],
        behaviour_logprobs=[-0.5, -0.25], reflection_text=f"r{i}", return_before=0.0,
        return_after=1.0, reward=float(i % 2), policy_version=version)


def trial(i: int) -> TrialRecord:
    return TrialRecord(key=make_key("run", 0, i, 0), run_id="run", worker_id=0, episode_id=i,
                       task_id="t0", env_name="env", trial=0, actions=["go"], observations=["a", "b"],
                       step_rewards=[0.0], memory=[], ret=0.0, success=False, policy_version=0)


def _store(root, n_versions=10, rows=8):
    with ReplayWriter(root, "w0", ReplayConfig(seal_rows=rows)) as w:
        for v in range(n_versions):  # one segment per version, oldest first
            w.append(T, to_batch([reflection(v * rows + i, v) for i in range(rows)]))
            w.append("trials", to_batch([trial(v * rows + i) for i in range(rows)]))


def test_tables_open_on_first_use_and_trials_stay_closed(tmp_path):
    _store(str(tmp_path))
    store = ReplayStore(str(tmp_path), ReplayConfig(min_size_to_sample=1))
    assert store.metrics()["replay/segments_opened"] == 0  # catalog only
    store.sample(T, 16, rng=np.random.default_rng(0))
    assert store.metrics()["replay/segments_opened"] == 10  # reflections only
    assert "replay/rows/trials" not in store.metrics()
    assert store.num_rows("trials") == 80
    assert store.metrics()["replay/segments_opened"] == 20


def test_version_bounds_skip_whole_segments(tmp_path):
    _store(str(tmp_path))
    store = ReplayStore(str(tmp_path), ReplayConfig(min_size_to_sample=1))
    got = store.sample(T, 64, rng=np.random.default_rng(0), current_version=9, max_staleness=1)
    assert set(got.table["policy_version"].to_pylist()) == {8, 9}
    m = store.metrics()
    assert m["replay/segments_skipped"] == 8 and m["replay/segments_scanned"] == 0
    fresh = store.read(T, min_policy_version=9, columns=["episode_id", "policy_version"])
    assert fresh.column_names == ["episode_id", "policy_version"]
    assert fresh["episode_id"].to_pylist() == list(range(72, 80))
    assert store.metrics()["replay/segments_skipped"] == 8 + 9
    assert store.rows_below_version(T, 9) == 72


def test_sample_columns_and_page_budget(tmp_path):
    _store(str(tmp_path))
    free = ReplayStore(str(tmp_path), ReplayConfig(min_size_to_sample=1))
    got = free.sample(T, 32, rng=np.random.default_rng(0), columns=["key", "prompt_ids"])
    assert got.table.column_names == ["key", "prompt_ids"]
    assert got.table.equals(free.read(T).select(["key", "prompt_ids"]).take(got.indices))
    assert free.metrics()["replay/page_releases"] == 0
    tight = ReplayStore(str(tmp_path), ReplayConfig(min_size_to_sample=1, resident_bytes=1))
    again = tight.sample(T, 32, rng=np.random.default_rng(0), columns=["key", "prompt_ids"])
    assert tight.metrics()["replay/page_releases"] == 2  # after each gathered column
    assert again.table.equals(got.table)  # released pages fault back in from the page cache


@given(st.lists(st.lists(st.integers(0, 400), max_size=60), max_size=30))
@settings(max_examples=30, deadline=None)
def test_hash_set_matches_a_python_set(batches):
    hs, ref = HashSet(16), set()
    for b in batches:
        h = np.array(b, np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # spread, 0 stays 0
        h[h == 0] = 1
        assert hs.contains(h).tolist() == [int(x) in ref for x in h]
        hs.add(h)
        ref |= {int(x) for x in h}
        assert len(hs) == len(ref)
