"""TableView: the rows of one replay table as a reader holds them.

Segments are kept in load order (oldest first), each stripped of keys already held, so row i
of `concat()` is stable until the next eviction. The rows stay where the store put them: in an
Arena slot (a memory-mapped segment file), never copied to the heap. What the view does keep
on the heap is small and per row:

- the key index: a sorted uint64 array of 64-bit key hashes (8 B/row, no Python strings;
  an evicted segment's hashes are recomputed from its keys);
- per segment, numpy copies of the scalar columns asked for (policy_version always; reward or
  task codes once a sampler needs them), concatenated on demand and cached until a change.

Reads and samples with a version bound skip whole segments using the catalog's min/max
policy_version (counted in `segments_skipped`), and gather rows column by column with
gather.Layout, so a sample costs the same few numpy ops however many segments it spans.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from retro_dist.replay.arena import Arena
from retro_dist.replay.catalog import SegmentEntry
from retro_dist.replay.gather import Layout, hash_keys


class _Segment:
    def __init__(self, entry: SegmentEntry, data: pa.Table) -> None:
        self.entry = entry
        self.batches = [b for b in data.to_batches() if b.num_rows]
        self.rows = data.num_rows
        self.small: dict[str, np.ndarray] = {}
        if "policy_version" in data.column_names:
            self.small["policy_version"] = _to_numpy(data.column("policy_version"))


def _to_numpy(col: pa.ChunkedArray) -> np.ndarray:
    return col.to_numpy() if col.num_chunks else np.zeros(0, col.type.to_pandas_dtype())


class TableView:
    def __init__(self, name: str, schema: Optional[pa.Schema] = None,
                 arena: Optional[Arena] = None) -> None:
        self.name = name
        self.schema = schema
        self.arena = arena or Arena(1 << 34)
        self.segs: list[_Segment] = []
        self.index = np.zeros(0, np.uint64)  # sorted hashes of every held key
        self.version = 0  # bumped on every change; keys the store's caches
        self.duplicates_dropped = 0
        self.segments_scanned = 0  # segments whose policy_version column a filter read
        self.segments_skipped = 0  # segments a version filter left out from their catalog range
        self._starts = np.zeros(1, np.int64)  # (segments + 1,) first row of each segment
        self._bstarts = np.zeros(1, np.int64)  # (batches + 1,) first row of each record batch
        self._batches: list[pa.RecordBatch] = []
        self._cache: dict[str, object] = {}
        self._codes: dict[str, dict[str, int]] = {}  # string column -> value -> code

    # ---- membership --------------------------------------------------------------------------

    @property
    def entries(self) -> list[SegmentEntry]:
        return [s.entry for s in self.segs]

    @property
    def kept(self) -> list[int]:
        return [s.rows for s in self.segs]

    def add(self, entry: SegmentEntry, data: pa.Table) -> int:
        """Append one segment, dropping rows whose key is already held. Returns rows kept."""
        return self.add_many([(entry, data)])[0]

    def add_many(self, items: list[tuple[SegmentEntry, pa.Table]],
                 hashes: Optional[list[np.ndarray]] = None) -> list[int]:
        """Append segments in order, each row kept unless its key is held or came earlier.

        One dedup pass over all of them: a bulk open sorts the new hashes once.
        hashes: each segment's hash_keys(key column), when the caller already has them.
        """
        if not items:
            return []
        items = [(e, d if self._in_arena(d) else self._rewrite(d)) for e, d in items]
        if hashes is None:
            hashes = [hash_keys(d.column("key")) for _, d in items]
        flat = np.concatenate(hashes)
        keep, fresh = _first_occurrences(flat)
        if self.index.size:
            keep &= ~self._held(flat)
            fresh = fresh[~self._held(fresh)]
        out, start = [], 0
        for (entry, data), h in zip(items, hashes):
            k = keep[start:start + h.size]
            start += h.size
            if not k.all():
                self.duplicates_dropped += int((~k).sum())
                data, h = self._rewrite(data.filter(pa.array(k))), h[k]
            self.segs.append(_Segment(entry, data))
            out.append(data.num_rows)
        # two sorted runs: the stable sort (timsort) merges them in one pass
        self.index = np.sort(np.concatenate([self.index, fresh]), kind="stable") \
            if fresh.size > self.index.size // 8 else _insert_sorted(self.index, fresh)
        self._changed()
        return out

    def _held(self, hashes: np.ndarray) -> np.ndarray:
        pos = np.minimum(np.searchsorted(self.index, hashes), self.index.size - 1)
        return self.index[pos] == hashes

    def _in_arena(self, data: pa.Table) -> bool:
        buf = data.column("key").chunks[0].buffers()[1] if data.num_rows else None
        return buf is None or 0 <= buf.address - self.arena.base < self.arena.top

    def _rewrite(self, data: pa.Table) -> pa.Table:
        """A deduplicated copy of a segment, placed in the arena so gathers can reach it."""
        sink = pa.BufferOutputStream()
        with ipc.new_stream(sink, data.schema) as w:
            w.write_table(data)
        slot = self.arena.place(sink.getvalue())
        return ipc.open_stream(pa.BufferReader(slot.buffer())).read_all()

    def pop_oldest(self) -> tuple[SegmentEntry, int]:
        """Drop the oldest segment's rows (the first rows of the view). Returns (entry, rows)."""
        seg = self.segs.pop(0)
        if seg.rows:  # every held key's hash is in the index exactly once
            hashes = hash_keys(pa.chunked_array([b.column("key") for b in seg.batches]))
            self.index = np.delete(self.index, np.searchsorted(self.index, hashes))
        self._changed()
        return seg.entry, seg.rows

    def _changed(self) -> None:
        self.version += 1
        self._starts = np.concatenate([[0], np.cumsum([s.rows for s in self.segs])]).astype(np.int64)
        self._batches = [b for s in self.segs for b in s.batches]
        sizes = [b.num_rows for b in self._batches]
        self._bstarts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._cache.clear()

    # ---- reading -----------------------------------------------------------------------------

    @property
    def num_rows(self) -> int:
        return int(self._starts[-1])

    @property
    def nbytes(self) -> int:
        return sum(s.entry.bytes for s in self.segs)

    def concat(self) -> pa.Table:
        """Every held row, zero-copy over the arena (valid while this view holds them)."""
        if self._batches:
            return pa.Table.from_batches(self._batches)
        if self.schema is None:
            raise KeyError(f"replay table {self.name!r} is empty and has no known schema")
        return self.schema.empty_table()

    def column(self, name: str) -> pa.ChunkedArray:
        return self.concat().column(name)

    def numpy(self, name: str) -> np.ndarray:
        """(N,) numpy copy of a scalar column (codes for a string one), cached until a change."""
        key = f"np:{name}"
        if key not in self._cache:
            parts = [self._small(s, name) for s in self.segs]
            self._cache[key] = np.concatenate(parts) if parts else np.zeros(0)
        return self._cache[key]

    def _small(self, seg: _Segment, name: str) -> np.ndarray:
        if name not in seg.small:
            col = pa.chunked_array([b.column(name) for b in seg.batches],
                                   type=self._field_type(name))
            if pa.types.is_string(col.type):
                codes = self._codes.setdefault(name, {})
                enc = col.combine_chunks().dictionary_encode() if len(col) else None
                if enc is None:
                    seg.small[name] = np.zeros(0, np.int32)
                else:
                    mapping = np.array([codes.setdefault(v, len(codes))
                                        for v in enc.dictionary.to_pylist()], np.int32)
                    seg.small[name] = mapping[enc.indices.to_numpy()]
            else:
                seg.small[name] = _to_numpy(col)
        return seg.small[name]

    def _field_type(self, name: str) -> pa.DataType:
        if self._batches:
            return self._batches[0].schema.field(name).type
        return self.schema.field(name).type

    def codes_of(self, column: str, values: Sequence[str]) -> np.ndarray:
        """Codes of `values` in a string column (values never seen get no code)."""
        codes = self._codes.get(column, {})
        return np.array([codes[v] for v in values if v in codes], np.int32)

    def rows_below(self, version: int) -> int:
        """Rows with policy_version < version: whole segments from their catalog range."""
        total = 0
        for s in self.segs:
            lo, hi = s.entry.min_version, s.entry.max_version
            if hi is not None and hi < version:
                total += s.rows
            elif lo is None or lo < version:
                v = s.small.get("policy_version")
                total += 0 if v is None else int((v < version).sum())
        return total

    def pool(self, min_version: Optional[int] = None, tasks: Optional[Sequence[str]] = None,
             envs: Optional[Sequence[str]] = None,
             max_version: Optional[int] = None) -> Optional[np.ndarray]:
        """Sorted row positions passing the filters, or None when there are no filters.

        Segments whose catalog version range lies outside [min_version, max_version] are
        skipped without a look at their rows; those inside it are taken whole.
        """
        if min_version is None and tasks is None and envs is None and max_version is None:
            return None
        allowed = {}
        for col, values in (("task_id", tasks), ("env_name", envs)):
            if values is not None:
                self.numpy(col)  # codes every segment's values first
                allowed[col] = self.codes_of(col, values)
        parts = []
        for s, start in zip(self.segs, self._starts[:-1]):
            lo, hi = s.entry.min_version, s.entry.max_version
            if ((min_version is not None and hi is not None and hi < min_version)
                    or (max_version is not None and lo is not None and lo > max_version)):
                self.segments_skipped += 1
                continue
            keep = None
            if not ((min_version is None or (lo is not None and lo >= min_version))
                    and (max_version is None or (hi is not None and hi <= max_version))):
                self.segments_scanned += 1
                v = s.small["policy_version"]
                keep = np.ones(s.rows, bool)
                if min_version is not None:
                    keep &= v >= min_version
                if max_version is not None:
                    keep &= v <= max_version
            for col, codes in allowed.items():
                hit = np.isin(self._small(s, col), codes)
                keep = hit if keep is None else keep & hit
            parts.append(start + (np.arange(s.rows) if keep is None else np.flatnonzero(keep)))
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def take(self, indices: np.ndarray, columns: Optional[Sequence[str]] = None,
             after_column: Optional[Callable[[], None]] = None) -> pa.Table:
        """Rows at `indices` (B,) into concat(), in that order (repeats allowed), as heap copies.

        after_column: called after each column is gathered (the store's page budget check).
        """
        indices = np.asarray(indices, dtype=np.int64)
        schema = self._batches[0].schema if self._batches else self.concat().schema
        names = list(columns) if columns is not None else schema.names
        if indices.size == 0 or not self._batches:
            return self.concat().select(names).slice(0, 0)
        b = np.searchsorted(self._bstarts, indices, side="right") - 1
        r = indices - self._bstarts[b]
        arrays = []
        for name in names:
            layout = self._layout(name)
            arrays.append(layout.gather(self.arena, b, r) if layout is not None
                          else self._slow_take(name, b, r))
            if after_column is not None:
                after_column()
        return pa.Table.from_arrays(arrays, schema=pa.schema([schema.field(n) for n in names]))

    def _layout(self, name: str) -> Optional[Layout]:
        key = f"layout:{name}"
        if key not in self._cache:
            constant = [name in (s.entry.constant or ()) for s in self.segs for _ in s.batches]
            self._cache[key] = Layout.build(self.arena, [b.column(name) for b in self._batches],
                                            constant)
        return self._cache[key]

    def _slow_take(self, name: str, b: np.ndarray, r: np.ndarray) -> pa.Array:
        """Per-batch Arrow take, for a column gather.Layout does not cover."""
        order = np.argsort(b, kind="stable")
        cuts = np.flatnonzero(np.diff(b[order])) + 1
        pieces = [self._batches[int(b[order[s]])].column(name).take(pa.array(r[order[s:e]]))
                  for s, e in zip(np.r_[0, cuts], np.r_[cuts, order.size])]
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        return pa.concat_arrays(pieces).take(pa.array(inverse))


def _first_occurrences(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(keep, distinct): keep marks each hash's first occurrence in `flat`; distinct is the
    distinct hashes, sorted. One unstable argsort (a stable one, as np.unique's return_index
    uses, took twice as long at 10M keys, and the index then needed a second sort)."""
    order = np.argsort(flat)
    ordered = flat[order]
    starts = np.ones(flat.size, bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    keep = np.zeros(flat.size, bool)
    if starts.all():  # no repeats: the common case
        keep[:] = True
        return keep, ordered
    runs = np.flatnonzero(starts)
    keep[np.minimum.reduceat(order, runs)] = True  # the earliest of each run of equal hashes
    return keep, ordered[runs]


def _insert_sorted(index: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Merge a few new (sorted) hashes into the sorted index: O(N) copy, no re-sort."""
    return np.insert(index, np.searchsorted(index, new), new)


__all__ = ["TableView"]
