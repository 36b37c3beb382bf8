"""ReplayWriter: one process's append-only writer into a replay store.

Each (writer, table) has at most one open segment, an Arrow IPC stream under a temp name (on
local disk written in whole 2 MB pieces, sink.py, so the page cache holds it in huge folios).
Sealing = close the stream, fsync, atomic rename to the final name, then rewrite this writer's
catalog file (the commit point, see catalog.py). On an object store the segment is uploaded
under its final name (no rename: S3 has none), and the catalog PUT alone commits it. The last three steps run on one background
"sealer" thread, in order, so append() does not stall on the disk; `seal()` waits for them.
Seals queued behind a slow disk are committed as one group (one catalog write).
A crash therefore loses at most rows the caller never saw acknowledged (`committed_rows` did
not count them yet) and resends; keys already stored by this writer are dropped on the way
in (by 64-bit key hash), so a resend after a restart is stored once. One writer_id belongs to one process at a time.
"""
from __future__ import annotations

import os
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from retro_dist.core.records import SCHEMAS
from retro_dist.replay.catalog import (TMP_SUFFIX, Catalog, SegmentEntry, StoreLocation,
                                       catalog_rel, check_name, constant_values, load_catalog,
                                       parse_own_segment, read_segment, segment_name)
from retro_dist.replay.config import ReplayConfig
from retro_dist.replay.gather import hash_keys
from retro_dist.replay.keyset import HashSet
from retro_dist.replay.sink import AlignedSink


class _RowStats:
    """What a segment's catalog entry says about its rows, gathered batch by batch: the range of
    policy_version and the columns holding one value throughout."""

    def __init__(self) -> None:
        self.min_version: Optional[int] = None
        self.max_version: Optional[int] = None
        self.constant: Optional[dict] = None  # {column: its one value so far}, None before rows

    def add(self, batch: pa.RecordBatch) -> None:
        if not batch.num_rows:
            return
        self.constant = constant_values(batch, self.constant)
        if "policy_version" in batch.schema.names:
            mm = pc.min_max(batch.column("policy_version"))
            lo, hi = mm["min"].as_py(), mm["max"].as_py()
            if lo is not None:
                self.min_version = lo if self.min_version is None else min(self.min_version, lo)
                self.max_version = hi if self.max_version is None else max(self.max_version, hi)

    def fields(self) -> tuple:
        """SegmentEntry's (min_version, max_version, constant)."""
        return self.min_version, self.max_version, sorted(self.constant) if self.constant else None


class _OpenSegment:
    """A segment being written: the IPC stream and what its catalog entry will say."""

    def __init__(self, loc: StoreLocation, table: str, name: str, seq: int,
                 schema: pa.Schema, submit, pool: list, aligned: bool = True) -> None:
        self.table, self.name, self.seq = table, name, seq
        self.rel = f"segments/{table}/{name}"
        # Object stores: the upload under the final name is invisible until it completes.
        self.tmp_rel = self.rel + TMP_SUFFIX if loc.local else self.rel
        raw = loc.fs.open_output_stream(loc.path(self.tmp_rel), compression=None)
        # local disk: in whole 2 MB pieces on the sealer thread (sink.py); an object store
        # buffers its own parts
        self.file = AlignedSink(raw, submit, pool) if loc.local and aligned else None
        self.sink = raw if self.file is None else pa.PythonFile(self.file, mode="w")
        self.stream = ipc.new_stream(self.sink, schema)
        self.rows = 0
        self.nbytes_final = 0
        self.opened_at = time.monotonic()
        self.stats = _RowStats()

    def write(self, batch: pa.RecordBatch) -> None:
        self.stream.write_batch(batch)
        self.rows += batch.num_rows
        self.stats.add(batch)

    @property
    def nbytes(self) -> int:
        return self.sink.tell()


class ReplayWriter:
    """Appends to the store at `root_uri` as `writer_id` (one process per id at a time).

    Use as a context manager or call close(): rows still open at exit are sealed then.
    """

    def __init__(self, root_uri: str, writer_id: str, cfg: ReplayConfig) -> None:
        self.cfg = cfg
        self.writer_id = check_name("writer_id", writer_id)
        self._loc = StoreLocation(root_uri)
        for d in ("segments", "catalog", "quarantine"):
            self._loc.makedirs(d)
        self._catalog: Catalog = load_catalog(self._loc, writer_id)
        self._open: dict[str, _OpenSegment] = {}
        self._written = 0  # rows written to segments by this object
        self._committed = 0  # of those, rows sealed and catalogued (written by the sealer thread)
        self._lock = threading.Lock()  # guards _catalog between append and the sealer thread
        self._sealer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"seal-{writer_id}")
        self._inflight: list[Future] = []
        self._queued: list[_OpenSegment] = []  # sealed, waiting for the sealer thread
        self._chunks: list[bytearray] = []  # spare 2 MB write chunks (sink.py)
        # Hashes of the keys this writer has stored, per table (trials and reflections share
        # keys by design): a numpy hash set, so a batch costs a few vectorised probes.
        self._known: dict[str, HashSet] = {}
        self._made_dirs: set[str] = set()
        self._closed = False
        self._recover()

    # ---- restart -----------------------------------------------------------------------------

    def _recover(self) -> None:
        """Pick up where an earlier process with this writer_id stopped.

        Its temp segments were never acknowledged: delete them (the caller resends). On local
        disk a segment renamed but not yet catalogued (killed between the two steps) is
        complete and fsynced: adopt it. On an object store every uncatalogued segment is
        deleted (its rows were never acknowledged either). Sequence numbers continue past every file seen, so nothing is overwritten.
        """
        listed = {e.name for e in self._catalog.segments}
        adopted = False
        for info in self._loc.list("segments", recursive=True):
            parsed = parse_own_segment(self.writer_id, info.base_name)
            if parsed is None:
                continue
            seq, is_temp = parsed
            self._catalog.next_seq = max(self._catalog.next_seq, seq + 1)
            table = os.path.basename(os.path.dirname(info.path))
            if is_temp or (info.base_name not in listed and not self._loc.local):
                # Never acknowledged. On an object store an uncatalogued object may also be an
                # abandoned upload that a destructor completed: only the catalog commits.
                self._loc.fs.delete_file(info.path)
            elif info.base_name not in listed:
                adopted |= self._adopt(table, info.base_name, seq, info.size)
        if adopted:
            self._loc.write_atomic(catalog_rel(self.writer_id), self._catalog.to_json())
        for entry in self._catalog.segments:
            self._load_keys(entry)

    def _adopt(self, table: str, name: str, seq: int, size: int) -> bool:
        rel = f"segments/{table}/{name}"
        try:
            data = read_segment(self._loc, rel, table)
        except Exception as err:  # any damage: leave the evidence, keep it out of the store
            self._loc.fs.move(self._loc.path(rel), self._loc.path(f"quarantine/{name}"))
            warnings.warn(f"replay: quarantined uncatalogued segment {self._loc.path(rel)}: {err}",
                          RuntimeWarning, stacklevel=3)
            return False
        stats = _RowStats()
        for batch in data.to_batches():
            stats.add(batch)
        self._catalog.segments.append(SegmentEntry(table, name, self.writer_id, seq,
                                                   data.num_rows, size, time.time(),
                                                   *stats.fields()))
        return True

    def _load_keys(self, entry: SegmentEntry) -> None:
        if not self._loc.exists(entry.rel_path):
            return  # evicted or quarantined by a reader: its rows are no longer stored
        try:
            data = read_segment(self._loc, entry.rel_path, entry.table, entry.rows)
        except Exception:
            return  # damaged: the reader quarantines it with a warning
        self._known.setdefault(entry.table, HashSet()).add(hash_keys(data.column("key")))

    # ---- append ------------------------------------------------------------------------------

    def append(self, table: str, batch: pa.RecordBatch) -> int:
        """Store the rows of `batch` whose key this writer has not stored yet.

        batch: (B rows) with the table's schema (records.SCHEMAS) and a non-null `key` column.
        Returns the number of rows newly written (B minus already-stored or repeated keys).
        Rows become durable when their segment seals; `committed_rows` counts them then.
        """
        if self._closed:
            raise RuntimeError("ReplayWriter is closed")
        self._check_schema(check_name("table", table), batch)
        self._reap(wait=False)  # surface a failed seal on the next call, not at close()
        self._seal_due()
        fresh, hashes = self._drop_known(table, batch)
        known = self._known.setdefault(table, HashSet())
        offset = 0
        while offset < fresh.num_rows:
            seg = self._open.get(table) or self._start(table, fresh.schema)
            room = min(self.cfg.seal_rows - seg.rows, self.cfg.max_unacked_rows - self.unacked_rows)
            part = fresh.slice(offset, max(room, 1))
            seg.write(part)
            offset += part.num_rows
            self._written += part.num_rows
            if seg.rows >= self.cfg.seal_rows or seg.nbytes >= self.cfg.seal_bytes:
                self._seal_one(table)
            if self.unacked_rows >= self.cfg.max_unacked_rows:
                self.seal()  # the bound: wait for the disk before taking more rows
        known.add(hashes)  # after the writes: a failed append leaves its keys resendable
        return fresh.num_rows

    def _check_schema(self, table: str, batch: pa.RecordBatch) -> None:
        want = SCHEMAS.get(table)
        if want is not None and not batch.schema.equals(want, check_metadata=False):
            raise ValueError(f"replay table {table!r}: batch schema differs from records.SCHEMAS:"
                             f"\n{batch.schema}\nexpected\n{want}")
        key = batch.schema.field("key") if "key" in batch.schema.names else None
        if key is None or key.type != pa.string():
            raise ValueError(f"replay table {table!r}: needs a string 'key' column")
        if batch.column("key").null_count:
            raise ValueError(f"replay table {table!r}: 'key' has nulls")

    def _drop_known(self, table: str, batch: pa.RecordBatch) -> tuple[pa.RecordBatch, np.ndarray]:
        """Drop rows whose key is already stored or repeats earlier in the batch.

        Keys are compared by 64-bit hash (gather.hash_keys): one vectorised hash, one probe
        of the writer's HashSet and a sort for repeats inside the batch; no per-row Python.
        Returns (kept rows, their key hashes).
        """
        hashes = hash_keys(batch.column("key"))
        known = self._known.get(table)
        stored = known.contains(hashes) if known is not None else np.zeros(hashes.size, bool)
        ordered = np.sort(hashes)
        if not stored.any() and not (ordered[1:] == ordered[:-1]).any():
            return batch, hashes
        keep = np.zeros(hashes.size, bool)
        keep[np.unique(hashes, return_index=True)[1]] = True  # first occurrence wins
        keep &= ~stored
        return batch.filter(pa.array(keep)), hashes[keep]

    # ---- seal --------------------------------------------------------------------------------

    def _start(self, table: str, schema: pa.Schema) -> _OpenSegment:
        if table not in self._made_dirs:  # one mkdir per table per process, not per segment
            self._loc.makedirs(f"segments/{table}")
            self._made_dirs.add(table)
        while True:  # belt and braces: never reuse a name that exists, sealed or temp
            with self._lock:
                seq = self._catalog.next_seq
                self._catalog.next_seq += 1
            name = segment_name(self.writer_id, seq)
            rel = f"segments/{table}/{name}"
            if not (self._loc.exists(rel) or self._loc.exists(rel + TMP_SUFFIX)):
                break
        seg = _OpenSegment(self._loc, table, name, seq, schema, self._background, self._chunks,
                           self.cfg.huge_page_writes)
        self._open[table] = seg
        return seg

    def _seal_due(self) -> None:
        now = time.monotonic()
        for table in [t for t, seg in self._open.items()
                      if now - seg.opened_at >= self.cfg.seal_seconds]:
            self._seal_one(table)

    def _background(self, fn, *args) -> Future:
        """Run fn on the sealer thread after everything queued there; its error surfaces in
        the next append or seal (`_reap`)."""
        future = self._sealer.submit(fn, *args)
        self._inflight.append(future)
        return future

    def _seal_one(self, table: str) -> None:
        """Close one open segment and hand it to the sealer thread.

        The sealer, in FIFO order behind the segment's own writes, then fsyncs, renames and
        catalogues while append() goes on: the disk work overlaps the next segment's
        appends instead of stalling them.
        """
        seg = self._open.pop(table)
        seg.stream.close()  # writes the end-of-stream marker
        seg.nbytes_final = seg.nbytes
        seg.sink.close()
        # Ready for a commit only once the sealer thread has run the segment's own writes (queued
        # just above): a commit still waiting in the queue would otherwise take it along,
        # cataloguing a file that is not all written yet.
        self._background(self._ready, seg)
        self._background(self._commit_queued)
        self._reap(wait=False)

    def _ready(self, seg: _OpenSegment) -> None:
        with self._lock:
            self._queued.append(seg)

    def _commit_queued(self) -> None:
        """Sealer thread: commit every segment sealed so far, as one group.

        fsync and rename each file (local disk), fsync each directory once, then one
        catalog write commits them all. When the caller outpaces the disk several seals
        queue up, and the directory and catalog fsyncs (a journal commit each) are paid once
        per group instead of once per segment.
        """
        with self._lock:
            group, self._queued = self._queued, []
        if not group:
            return  # an earlier call committed these
        for seg in group:
            err = seg.file.error if seg.file is not None else None
            if err is not None:  # never catalogue a segment whose bytes did not all land
                raise OSError(f"replay: writing segment {seg.rel} failed: {err}") from err
        renamed = [seg for seg in group if seg.tmp_rel != seg.rel]
        for seg in renamed:
            self._loc.fsync(seg.tmp_rel)
            self._loc.fs.move(self._loc.path(seg.tmp_rel), self._loc.path(seg.rel))
        for table in sorted({seg.table for seg in renamed}):
            self._loc.fsync(f"segments/{table}", directory=True)
        now = time.time()
        with self._lock:
            self._catalog.segments += [
                SegmentEntry(seg.table, seg.name, self.writer_id, seg.seq, seg.rows,
                             seg.nbytes_final, now, *seg.stats.fields())
                for seg in group]
            data = self._catalog.to_json()
        # A crash before this write leaves uncatalogued segments; _recover adopts them.
        self._loc.write_atomic(catalog_rel(self.writer_id), data)
        self._committed += sum(seg.rows for seg in group)

    def _reap(self, wait: bool) -> None:
        """Collect finished seals (all of them if `wait`); re-raise a sealer error here."""
        while self._inflight and (wait or self._inflight[0].done()):
            self._inflight.pop(0).result()

    def seal(self) -> int:
        """Seal every open segment and wait until all are committed.

        Returns the rows committed while this call ran (including earlier in-flight seals).
        """
        before = self._committed
        for table in list(self._open):
            self._seal_one(table)
        self._reap(wait=True)
        return self._committed - before

    @property
    def committed_rows(self) -> int:
        """Rows sealed and catalogued by this writer object: what the caller may treat as acked."""
        return self._committed

    @property
    def unacked_rows(self) -> int:
        """Rows written but not yet committed (open segments and seals in flight)."""
        return self._written - self._committed

    def close(self) -> None:
        if not self._closed:
            try:
                self.seal()
            finally:
                self._sealer.shutdown(wait=True)
                self._closed = True

    def __enter__(self) -> "ReplayWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["ReplayWriter"]
