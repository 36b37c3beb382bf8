"""Record schema: derived from the dataclasses, and rows survive an Arrow IPC round trip."""
import pyarrow as pa

from retro_dist.core.records import (SCHEMAS, ReflectionSample, TrialRecord, from_table, make_key,
                                     schema_of, to_batch)


def _reflection(i: int) -> ReflectionSample:
    return ReflectionSample(key=make_key("r", 0, i, 0), run_id="r", worker_id=0, episode_id=i,
                            task_id=f"twx/coin/train/{i}", env_name="twx/coin", trial=0,
                            prompt_ids=[1, 2, 3 + i], reflection_ids=[7, 8], behaviour_logprobs=[-0.5, -1.25],
                            reflection_text="In the next trial I will go north", return_before=0.0,
                            return_after=1.0, reward=1.0, policy_version=3, created_at=12.5)


def _trial(i: int, error=None) -> TrialRecord:
    return TrialRecord(key=make_key("r", 1, i, 2), run_id="r", worker_id=1, episode_id=i,
                       task_id="twx/coin/train/5", env_name="twx/coin", trial=2, actions=["move north"],
                       observations=["start", "north room"], step_rewards=[0.0], memory=["m1"],
                       ret=0.0, success=False, policy_version=1, error=error, wall_seconds=0.1)


def test_schema_types_follow_the_dataclass():
    s = schema_of(ReflectionSample)
    assert s.field("prompt_ids").type == pa.list_(pa.int32())
    assert s.field("behaviour_logprobs").type == pa.list_(pa.float32())
    assert s.field("reward").type == pa.float64()
    assert SCHEMAS["trials"].field("error").nullable and not SCHEMAS["trials"].field("ret").nullable


def test_round_trip_through_ipc_stream(tmp_path):
    for records in ([_reflection(i) for i in range(3)], [_trial(0), _trial(1, error="EnvError: boom")]):
        batch = to_batch(records)
        path = tmp_path / "seg.arrows"
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, batch.schema) as w:
            w.write_batch(batch)
        table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
        assert from_table(table, type(records[0])) == records


def test_keys_are_unique_per_worker_episode_trial():
    keys = {make_key("run", w, e, t) for w in range(3) for e in range(4) for t in range(3)}
    assert len(keys) == 36
