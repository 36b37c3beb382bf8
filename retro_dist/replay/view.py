"""TableView: the rows of one replay table as the reader holds them.

Segments are appended in load order (oldest first), each stripped of keys already held, so
row i of `concat()` is stable until the next eviction. The rows live in a list of record
batches ("blocks") because a gather costs one `take` per block it touches: `pa.Table.take` on
a many-chunk table concatenates every chunk first (tens of ms at 1M rows), and a block per
small segment would make a sample cost O(segments). So a multi-batch segment is combined into
one block, and small trailing blocks are merged Timsort-style (merge while the older block is
at most twice the newer one) up to BLOCK_ROWS: a row is copied O(log) times at most, and a
store of N rows has about N / BLOCK_ROWS + log2(BLOCK_ROWS) blocks. A single-batch segment on
local disk stays memory-mapped until it is merged.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from retro_dist.replay.catalog import SegmentEntry, first_unseen

BLOCK_ROWS = 1 << 18


class TableView:
    def __init__(self, name: str, schema: Optional[pa.Schema] = None) -> None:
        self.name = name
        self.schema = schema
        self.entries: list[SegmentEntry] = []
        self.kept: list[int] = []  # rows each entry contributes after dedup
        self.blocks: list[pa.RecordBatch] = []
        self.keys: set[str] = set()
        self.version = 0  # bumped on every change; keys the store's caches
        self.duplicates_dropped = 0
        self._offsets = np.zeros(1, dtype=np.int64)  # (len(blocks) + 1,) first row of each block
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
        self.keys |= fresh
        self.entries.append(entry)
        self.kept.append(data.num_rows)
        batches = [b for b in data.to_batches() if b.num_rows]
        if batches:
            self.blocks.append(batches[0] if len(batches) == 1 else pa.concat_batches(batches))
            self._merge_tail()
        self._changed()
        return data.num_rows

    def _merge_tail(self) -> None:
        b = self.blocks
        while (len(b) >= 2 and b[-2].num_rows <= 2 * b[-1].num_rows
               and b[-2].num_rows + b[-1].num_rows <= BLOCK_ROWS):
            b[-2:] = [pa.concat_batches(b[-2:])]

    def pop_oldest(self) -> tuple[SegmentEntry, int]:
        """Drop the oldest segment's rows (the first rows of the view). Returns (entry, rows)."""
        entry, rows = self.entries.pop(0), self.kept.pop(0)
        left, gone = rows, []
        while left:
            first = self.blocks[0]
            if first.num_rows <= left:
                gone.append(self.blocks.pop(0).column("key"))
                left -= first.num_rows
            else:
                gone.append(first.slice(0, left).column("key"))
                self.blocks[0] = first.slice(left)
                left = 0
        for k in gone:
            self.keys.difference_update(k.to_pylist())
        self._changed()
        return entry, rows

    def _changed(self) -> None:
        self.version += 1
        sizes = [b.num_rows for b in self.blocks]
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
        if self.blocks:
            return pa.Table.from_batches(self.blocks)
        if self.schema is None:
            raise KeyError(f"replay table {self.name!r} is empty and has no known schema")
        return self.schema.empty_table()

    def column(self, name: str) -> pa.ChunkedArray:
        return self.concat().column(name)

    def numpy(self, name: str) -> np.ndarray:
        """(N,) numpy copy of a scalar column, cached until the view changes."""
        if name not in self._columns:
            self._columns[name] = self.column(name).to_numpy()
        return self._columns[name]

    def rows_below(self, version: int) -> int:
        """Rows with policy_version < version: whole segments from their catalog range."""
        total, start = 0, 0
        for entry, kept in zip(self.entries, self.kept):
            if entry.max_version is not None and entry.max_version < version:
                total += kept
            elif entry.min_version is not None and entry.min_version < version:
                total += int((self.numpy("policy_version")[start:start + kept] < version).sum())
            start += kept
        return total

    def mask(self, min_version: Optional[int] = None, tasks: Optional[Sequence[str]] = None,
             envs: Optional[Sequence[str]] = None,
             max_version: Optional[int] = None) -> Optional[np.ndarray]:
        """(N,) bool of rows passing the filters, or None when there are no filters."""
        if min_version is None and tasks is None and envs is None and max_version is None:
            return None
        keep = np.ones(self.num_rows, dtype=bool)
        if min_version is not None:
            keep &= self.numpy("policy_version") >= min_version
        if max_version is not None:
            keep &= self.numpy("policy_version") <= max_version
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
        blk = np.searchsorted(self._offsets, ordered, side="right") - 1
        cuts = np.flatnonzero(np.diff(blk)) + 1
        pieces = []
        for start, stop in zip(np.r_[0, cuts], np.r_[cuts, ordered.size]):
            b = int(blk[start])
            pieces.append(self.blocks[b].take(pa.array(ordered[start:stop] - self._offsets[b])))
        gathered = pa.Table.from_batches(pieces).combine_chunks()
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        return gathered.take(pa.array(inverse))


__all__ = ["TableView", "BLOCK_ROWS"]
