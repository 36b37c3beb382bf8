"""Record kinds written to the replay store, and the Arrow schemas derived from them.

One dataclass per record kind. The Arrow schema is derived from the dataclass field types, so
adding a field is a one-line change and the round-trip test (tests/core/test_records.py) keeps
the two in step. Pure: imports only pyarrow and the standard library.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Optional

import pyarrow as pa


def make_key(run_id: str, worker_id: int, episode_id: int, trial: int) -> str:
    """Idempotent key of one trial (and of the reflection written after it).

    A worker restarted from a checkpoint replays the same (worker, episode, trial) triples, so
    the store can drop the re-sent rows instead of counting them twice.
    """
    return f"{run_id}/w{worker_id}/e{episode_id}/t{trial}"


@dataclass
class TrialRecord:
    """One trial of one task: the actor's trajectory and its return G_k."""

    # identity
    key: str  # make_key(run_id, worker_id, episode_id, trial); unique in the store
    run_id: str
    worker_id: int
    episode_id: int  # per-worker counter of multi-trial episodes
    task_id: str  # e.g. "twx/coin/train/17"; stable across runs
    env_name: str
    trial: int  # k = 0..K-1
    # trajectory (T = number of actor steps)
    actions: list[str]  # (T,) actions sent to the environment
    observations: list[str]  # (T+1,) initial observation, then one per step
    step_rewards: list[float]  # (T,) environment reward per step
    memory: list[str]  # reflections in the actor's prompt for this trial (oldest first)
    # outcome
    ret: float  # G_k: 1.0/0.0 success, or a score in [0, 1]
    success: bool
    policy_version: int  # reflector version that wrote the reflections in `memory`
    error: Optional[str] = None  # set when the environment or a backend raised; row kept for audit
    wall_seconds: float = 0.0
    created_at: float = 0.0  # unix seconds


@dataclass
class ReflectionSample:
    """One reflection y_k ~ P_θ(·|x_k) written after failed trial k, with its reward.

    The learner recomputes log P_θ(y|x) from the token ids under the current policy and uses
    `behaviour_logprobs` for importance ratios when `policy_version` is older than its own.
    """

    key: str  # same key as the failed trial it reflects on
    run_id: str
    worker_id: int
    episode_id: int
    task_id: str
    env_name: str
    trial: int  # k: the failed trial the reflection is about
    prompt_ids: list[int]  # (P,) reflector prompt x_k, token ids
    reflection_ids: list[int]  # (R,) sampled reflection y_k, token ids
    behaviour_logprobs: list[float]  # (R,) log μ(y_t | x, y_<t) under the sampling policy
    reflection_text: str
    return_before: float  # G_k
    return_after: float  # G_{k+1}
    reward: float  # r_k = G_{k+1} − G_k
    policy_version: int  # reflector version that sampled y_k
    created_at: float = 0.0  # unix seconds


_SCALARS: dict[Any, pa.DataType] = {
    str: pa.string(),
    int: pa.int64(),
    float: pa.float64(),
    bool: pa.bool_(),
}
# Token ids and log-probs dominate the bytes of a reflection row: store them narrow.
_LISTS: dict[Any, pa.DataType] = {
    str: pa.list_(pa.string()),
    int: pa.list_(pa.int32()),
    float: pa.list_(pa.float32()),
}


def _arrow_type(hint: Any) -> tuple[pa.DataType, bool]:
    """Map a field's type hint to (Arrow type, nullable)."""
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return _arrow_type(inner)[0], True
    if origin is list:
        (item,) = typing.get_args(hint)
        return _LISTS[item], False
    return _SCALARS[hint], False


def schema_of(record_cls: type) -> pa.Schema:
    """Arrow schema of a record dataclass, fields in declaration order."""
    hints = typing.get_type_hints(record_cls)
    fields = []
    for f in dataclasses.fields(record_cls):
        dtype, nullable = _arrow_type(hints[f.name])
        fields.append(pa.field(f.name, dtype, nullable=nullable))
    return pa.schema(fields, metadata={b"record": record_cls.__name__.encode()})


RECORD_KINDS: dict[str, type] = {"trials": TrialRecord, "reflections": ReflectionSample}
SCHEMAS: dict[str, pa.Schema] = {name: schema_of(cls) for name, cls in RECORD_KINDS.items()}


def to_batch(records: list[Any]) -> pa.RecordBatch:
    """Records of one kind -> one Arrow record batch with the derived schema."""
    if not records:
        raise ValueError("to_batch needs at least one record")
    cls = type(records[0])
    schema = schema_of(cls)
    columns = {f.name: [getattr(r, f.name) for r in records] for f in dataclasses.fields(cls)}
    return pa.RecordBatch.from_pydict(columns, schema=schema)


def from_table(table: pa.Table | pa.RecordBatch, record_cls: type) -> list[Any]:
    """Arrow rows -> records (for tests, tools and small reads; the learner stays columnar)."""
    names = [f.name for f in dataclasses.fields(record_cls)]
    return [record_cls(**{n: row[n] for n in names}) for row in table.to_pylist()]


__all__ = [
    "ReflectionSample",
    "TrialRecord",
    "RECORD_KINDS",
    "SCHEMAS",
    "make_key",
    "schema_of",
    "to_batch",
    "from_table",
]
