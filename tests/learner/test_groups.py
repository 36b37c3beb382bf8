"""Leave-one-out over whole stored groups: a replay batch's rows get the mean reward of every other
stored row of their task and trial (within the version window), kept incrementally from sealed
segments; real ReplayWriter / ReplayStore on tmp_path."""
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pytest

from retro_dist.config import LearnerConfig, ReflectorConfig
from retro_dist.core import baselines
from retro_dist.core.records import ReflectionSample, make_key, to_batch
from retro_dist.learner.groups import GroupIndex
from retro_dist.learner.learner import Learner
from retro_dist.learner.sources import replay_batches
from retro_dist.replay.config import ReplayConfig
from retro_dist.replay.store import ReplayStore
from retro_dist.replay.writer import ReplayWriter

pytestmark = pytest.mark.component


def _rows(n, seed, start, version, tasks=5, trials=2, game="twx/coin", first_task=0):
    g = np.random.default_rng(seed)
    return [ReflectionSample(key=make_key("t", seed, start + i, 0), run_id="t", worker_id=seed, episode_id=start + i,
                             task_id=f"{game}/train/{first_task + g.integers(tasks)}", env_name=game,
                             trial=int(g.integers(trials)), prompt_ids=[5, 6, 7], reflection_ids=[8, 9],
                             behaviour_logprobs=[-1.0, -1.0], reflection_text="", return_before=0.0,
                             return_after=0.0, reward=float(g.normal()), policy_version=version)
            for i in range(n)]


def _write(root, writer_id, rows, seal_rows=16):
    with ReplayWriter(root, writer_id, ReplayConfig(seal_rows=seal_rows)) as w:
        w.append("reflections", to_batch(rows))


def _brute_force(store, window):
    """(task, trial, version) -> (sum, count) over every held row, and the window's totals per row."""
    rows = store.read("reflections", columns=["task_id", "trial", "policy_version", "reward"]).to_pylist()
    cells = defaultdict(lambda: [0.0, 0])
    for r in rows:
        c = cells[(r["task_id"], r["trial"], r["policy_version"])]
        c[0] += r["reward"]
        c[1] += 1

    def totals(task, trial, version):
        hits = [v for (t, k, ver), v in cells.items() if t == task and k == trial
                and (window is None or abs(ver - version) <= window)]
        return sum(h[0] for h in hits), sum(h[1] for h in hits)
    return totals


@pytest.mark.parametrize("window", [None, 0, 1])
def test_each_sampled_row_gets_its_whole_stored_group(tmp_path, window):
    root = str(tmp_path / "replay")
    # two writers, three versions, several segments each: groups span segments and writers
    for v in range(3):
        _write(root, f"w{v}a", _rows(40, seed=10 + v, start=0, version=v))
        _write(root, f"w{v}b", _rows(24, seed=20 + v, start=100, version=v))
    store = ReplayStore(root, ReplayConfig(min_size_to_sample=1))
    index = GroupIndex(window)
    assert index.sync(store) == len(store.held_segments("reflections")) > 6
    batch = store.sample("reflections", 32, rng=np.random.default_rng(0))
    sums, counts = index.lookup(batch.table)
    totals = _brute_force(store, window)
    cols = batch.table.to_pydict()
    for i in range(32):
        s, c = totals(cols["task_id"][i], cols["trial"][i], cols["policy_version"][i])
        assert counts[i] == c and sums[i] == pytest.approx(s)
    b, grouped = baselines.leave_one_out_from_sums(cols["reward"], sums, counts, np.full(32, 7.0))
    others = (sums - np.asarray(cols["reward"])) / np.maximum(counts - 1, 1)
    assert np.allclose(b[grouped], others[grouped]) and np.all(b[~grouped] == 7.0)
    assert grouped.mean() > 0.8  # 5 tasks x 2 trials per version: almost no row is alone


def test_groups_of_a_mix_of_games_match_whatever_rows_a_batch_holds(tmp_path):
    # Segments of one game each, batches of both: task ids of 18 and 25 bytes. The groups of the
    # short ids were lost in every batch that also held a long one (retro-mix, from version ~45).
    root = str(tmp_path / "replay")
    _write(root, "coin", _rows(40, seed=1, start=0, version=0))
    _write(root, "map", _rows(40, seed=2, start=0, version=0, game="twx/mapreader", first_task=100))
    store = ReplayStore(root, ReplayConfig(min_size_to_sample=1))
    index = GroupIndex(2)
    index.sync(store)
    table = store.read("reflections")
    sums, counts = index.lookup(table)
    totals = _brute_force(store, 2)
    cols = table.to_pydict()
    assert len({len(t) for t in cols["task_id"]}) > 1
    for i in range(table.num_rows):
        s, c = totals(cols["task_id"][i], cols["trial"][i], cols["policy_version"][i])
        assert counts[i] == c and sums[i] == pytest.approx(s)


def test_sync_folds_in_new_segments_only_and_drops_evicted_ones(tmp_path):
    root = str(tmp_path / "replay")
    _write(root, "w0", _rows(32, seed=1, start=0, version=0))
    store = ReplayStore(root, ReplayConfig(min_size_to_sample=1, retention_rows=48))
    index = GroupIndex(None)
    assert index.sync(store) == 2 and index.sync(store) == 0  # nothing new: nothing read
    walks = []
    held = store.held_segments
    store.held_segments = lambda table: walks.append(table) or held(table)
    assert index.sync(store) == 0 and walks == []  # same held segments: no walk over them
    _write(root, "w1", _rows(32, seed=2, start=0, version=1))
    store.refresh()  # 64 rows > retention 48: the oldest 16-row segment is evicted
    assert store.num_rows("reflections") == 48
    assert index.sync(store) == 2 and walks == ["reflections"]
    batch = store.read("reflections")
    sums, counts = index.lookup(batch)
    totals = _brute_force(store, None)
    cols = batch.to_pydict()
    for i in range(batch.num_rows):
        s, c = totals(cols["task_id"][i], cols["trial"][i], cols["policy_version"][i])
        assert counts[i] == c and sums[i] == pytest.approx(s)


def test_replay_source_uses_whole_stored_groups(tmp_path, tiny_model):
    root = str(tmp_path / "replay")
    _write(root, "w0", _rows(64, seed=3, start=0, version=0, tasks=4, trials=1))
    cfg = LearnerConfig(batch_size=8, micro_batch_size=8, updates_per_iteration=1, baseline="leave_one_out",
                        batch_source="replay")
    lrn = Learner(cfg, ReflectorConfig(backend="hf", model=tiny_model), root,
                  ReplayConfig(min_size_to_sample=1), str(tmp_path), seed=0)
    (table, adv, base, _), = list(replay_batches(lrn))
    everything = lrn.store.read("reflections").to_pydict()
    for i, (task, r) in enumerate(zip(table.column("task_id").to_pylist(), table.column("reward").to_pylist())):
        mates = [x for t, x in zip(everything["task_id"], everything["reward"]) if t == task]
        assert base[i] == pytest.approx((sum(mates) - r) / (len(mates) - 1))
        assert adv[i] == pytest.approx(r - base[i])
    stats = lrn.update(table, adv, base)
    assert stats["learner/group_baseline_fraction"] == 1.0
    assert stats["learner/group_size_mean"] > 8  # 64 rows over 4 groups: far more than one batch's share


def test_async_loop_warm_starts_then_uses_whole_stored_groups(tmp_path, tiny_model):
    from retro_dist.learner.streaming import LearnerLoop

    root = str(tmp_path / "replay")
    rows = _rows(48, seed=4, start=0, version=0, tasks=3, trials=1)
    for i, r in enumerate(rows):  # half positive, so the warm start has rows to fit
        r.reward = float(i % 2)
    _write(root, "w0", rows)
    cfg = LearnerConfig(batch_size=8, micro_batch_size=8, baseline="leave_one_out", sft_iterations=1)
    loop = LearnerLoop(lambda: Learner(cfg, ReflectorConfig(backend="hf", model=tiny_model), root,
                                       ReplayConfig(min_size_to_sample=1), str(tmp_path), seed=0),
                       publish=lambda adapter: None, max_steps=4, updates_per_version=2, max_policy_lag=2)
    steps = []
    while len(steps) < 4:
        stats = loop._step()
        assert stats is not None
        steps.append(stats)
        if loop.learner.steps % 2 == 0:
            loop.learner.version += 1  # what the loop's thread does every updates_per_version steps
    warm, rl = steps[:2], steps[2:]
    assert [s["learner/sft"] for s in steps] == [1, 1, 0, 0]
    assert all(s["reward/mean"] == 1.0 for s in warm)  # only positively rewarded rows were fitted
    assert all("learner/group_baseline_fraction" not in s for s in warm)
    # 48 rows over 3 groups: each sampled row sees its ~16 stored mates, not the batch's ~3
    assert all(s["learner/group_baseline_fraction"] == 1.0 and s["learner/group_size_mean"] > 8 for s in rl)
