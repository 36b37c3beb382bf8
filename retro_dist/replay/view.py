"""TableView: the rows of one replay table as the reader holds them.

A list of per-segment Arrow tables in load order (oldest first), each already stripped of
keys seen earlier, so row i of `concat()` is stable until the next eviction. Gathers go record
batch by record batch because `pa.Table.take` on a many-chunk table concatenates every chunk
first (tens of ms at 1M rows); per-batch takes touch only the rows drawn.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from retro_dist.replay.catalog import SegmentEntry, first_unseen


_MIN_BATCH_ROWS = 1024


class TableView:
    def __init__(self, name: str, schema: Optional[pa.Schema] = None) -> None:
        self.name = name
        self.schema = schema
        self.entries: list[SegmentEntry] = []
        self.parts: list[pa.Table] = []
        self.keys: set[str] = set()
        self.version = 0  # bumped on every change; keys the store's caches
        self.duplicates_dropped = 0
        self._batches: list[pa.RecordBatch] = []  # every part's record batches, in order
        self._offsets = np.zeros(1, dtype=np.int64)  # (len(_batches) + 1,) first row of each
        self._columns: dict[str, np.ndarray] = {}

    # ---- membership --------------------------------------------------------------------------

    def add(self, entry: SegmentEntry, data: pa.Table) -> int:
        """Append one segment, dropping rows whose key is already held. Returns rows kept."""
        keys = data.column("key").to_pylist()
        fresh = set(keys)
        if len(fresh) != len(keys) or not self.keys.isdisjoint(fresh):
            data = data.take(pa.array(first_unseen(data.column("key"), fresh & self.keys)))
            self.duplicates_dropped += len(keys) - data.num_rows
            fresh = set(data.column("key").to_pylist())
        if data.num_rows and data.num_rows < _MIN_BATCH_ROWS * len(data.to_batches()):
            # many tiny appends: one copy now saves a take() per tiny batch on every sample
            data = data.combine_chunks()
        self.keys |= fresh
        self.entries.append(entry)
        self.parts.append(data)
        self._changed()
        return data.num_rows

    def pop_oldest(self) -> tuple[SegmentEntry, int]:
        """Drop the oldest segment. Returns (its entry, rows it held here)."""
        entry, data = self.entries.pop(0), self.parts.pop(0)
        self.keys.difference_update(data.column("key").to_pylist())
        self._changed()
        return entry, data.num_rows

    def _changed(self) -> None:
        self.version += 1
        self._batches = [b for p in self.parts for b in p.to_batches() if b.num_rows]
        sizes = [b.num_rows for b in self._batches]
        self._offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
        self._columns.clear()

    # ---- reading -----------------------------------------------------------------------------

    @property
    def num_rows(self) -> int:
        return int(self._offsets[-1])

    @property
    def nbytes(self) -> int:
        return sum(e.bytes for e in self.entries)

    def concat(self) -> pa.Table:
        if not self.parts:
            if self.schema is None:
                raise KeyError(f"replay table {self.name!r} is empty and has no known schema")
            return self.schema.empty_table()
        return pa.concat_tables(self.parts)

    def column(self, name: str) -> pa.ChunkedArray:
        return pa.chunked_array([p.column(name) for p in self.parts],
                                type=self.parts[0].schema.field(name).type)

    def numpy(self, name: str) -> np.ndarray:
        """(N,) numpy copy of a scalar column, cached until the view changes."""
        if name not in self._columns:
            if self.parts and name not in self.parts[0].column_names:
                raise KeyError(f"replay table {self.name!r} has no column {name!r}")
            col = self.column(name) if self.parts else pa.chunked_array([], pa.float64())
            self._columns[name] = col.to_numpy()
        return self._columns[name]

    def mask(self, min_version: Optional[int] = None, tasks: Optional[Sequence[str]] = None,
             envs: Optional[Sequence[str]] = None) -> Optional[np.ndarray]:
        """(N,) bool of rows passing the filters, or None when there are no filters."""
        if min_version is None and tasks is None and envs is None:
            return None
        if not self.parts:
            return np.zeros(0, dtype=bool)
        keep = np.ones(self.num_rows, dtype=bool)
        if min_version is not None:
            keep &= self.numpy("policy_version") >= min_version
        for col, allowed in (("task_id", tasks), ("env_name", envs)):
            if allowed is not None:
                hit = pc.is_in(self.column(col), value_set=pa.array(list(allowed), pa.string()))
                keep &= hit.to_numpy(zero_copy_only=False).astype(bool)
        return keep

    def take(self, indices: np.ndarray) -> pa.Table:
        """Rows at `indices` (B,) into concat(), in that order (repeats allowed)."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size == 0:
            return self.concat().slice(0, 0)
        order = np.argsort(indices, kind="stable")
        ordered = indices[order]
        seg = np.searchsorted(self._offsets, ordered, side="right") - 1
        cuts = np.flatnonzero(np.diff(seg)) + 1
        pieces = []
        for start, stop in zip(np.r_[0, cuts], np.r_[cuts, ordered.size]):
            b = int(seg[start])
            pieces.append(self._batches[b].take(pa.array(ordered[start:stop] - self._offsets[b])))
        gathered = pa.Table.from_batches(pieces).combine_chunks()
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        return gathered.take(pa.array(inverse))


__all__ = ["TableView"]
