"""ReplayStore: the reader side of the replay store (the learner's view).

Merges every writer's catalog, maps the sealed segments it lists into one Arena (mmap on
local disk, so a large store costs page cache, not heap; an object store's segments are
downloaded once into memory files), drops repeated keys by 64-bit hash, and serves filtered
reads and uniform / prioritised / curriculum samples. A table's segments are opened only once
the table is first asked for (the learner never opens `trials`), and only the columns a
filter or sampler needs are copied out of them. A segment that fails to read is moved to
quarantine/ with one warning; temp segments are never read (their rows were never
acknowledged, and the writer resends them). `refresh()` re-reads only catalog files whose
size or mtime changed and loads only segments it has not seen.

Resident memory: the heap holds only per-row index arrays (~30 B/row). Gathers map pages of
the segment files; those count in RSS but are clean page cache, which the kernel can take back
at any time. With cfg.resident_bytes set, the store drops its page mappings (MADV_DONTNEED;
the page cache keeps the data) whenever this process maps more file-backed bytes than that
(/proc/self/statm), checked after every gathered column, so RSS stays near the index arrays
plus the budget however large the store is. The price: every sample faults its pages back
in, and on kernels that map 64 KB or more around each fault that costs far more than the
gather itself (see benchmarks/replay.py: capped vs uncapped rows/s). Without a budget the arena
places big segments so the kernel can map them 2 MB at a time (arena.py); with one, it may not.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from retro_dist.core import sampling
from retro_dist.core.records import SCHEMAS
from retro_dist.replay.arena import PAGE, Arena
from retro_dist.replay.catalog import Catalog, SegmentEntry, StoreLocation, check_segment
from retro_dist.replay.config import ReplayConfig
from retro_dist.replay.draw import Cumulative
from retro_dist.replay.gather import hash_keys
from retro_dist.replay.ratelimit import RateLimitedError, RateLimiter
from retro_dist.replay.view import TableView

_BLOCK_POLL_S = 0.05


@dataclass
class SampledBatch:
    table: pa.Table  # (B rows) drawn with replacement
    probs: np.ndarray  # (B,) float64: probability each row had of being drawn (for IS weights)
    indices: np.ndarray  # (B,) int64: row positions in read(table) order (valid until refresh)


class ReplayStore:
    """Reader of the store at `root_uri` (local path or pyarrow URI). Any number of readers
    may share a store; one object is meant for one thread (the learner's)."""

    def __init__(self, root_uri: str, cfg: ReplayConfig) -> None:
        self.cfg = cfg
        self._loc = StoreLocation(root_uri)
        self._arena = Arena(huge_pages=cfg.resident_bytes is None)
        self._views: dict[str, TableView] = {}
        self._pending: dict[str, list[SegmentEntry]] = {}  # catalogued, table not opened yet
        self._limiters: dict[str, RateLimiter] = {}
        self._seen: set[str] = set()  # rel paths already loaded, quarantined or skipped
        self._stamps: dict[str, tuple[int, int]] = {}  # catalog path -> (mtime_ns, size)
        self._cache: dict[tuple, tuple[Optional[np.ndarray], np.ndarray, np.ndarray]] = {}
        self._counts = {"empty_after_filters": 0, "catalog_retries": 0, "quarantined": 0, "missing_segments": 0,
                        "evicted_segments": 0, "evicted_rows": 0, "rate_limited": 0, "sample_batches": 0,
                        "sampled_rows": 0, "blocked_seconds": 0.0, "refresh_seconds": 0.0,
                        "segments_opened": 0, "page_releases": 0}
        self.refresh()

    # ---- catalog -----------------------------------------------------------------------------

    def refresh(self) -> int:
        """Pick up newly catalogued segments, then apply retention.

        Returns how many new segments were found: loaded now for tables already in use,
        queued (not opened) for the others.
        """
        t0 = time.perf_counter()
        new: list[SegmentEntry] = []
        for info in self._loc.list("catalog"):
            if not info.base_name.endswith(".json"):
                continue  # a writer's catalog temp file mid-rename
            stamp = (info.mtime_ns or 0, info.size or 0)
            if self._stamps.get(info.path) == stamp:
                continue
            try:
                with self._loc.fs.open_input_stream(info.path, compression=None) as f:
                    catalog = Catalog.from_json(f.read())
            except (ValueError, OSError):
                # Read while its writer was replacing it (seen on an S3-compatible server under load):
                # keep what we have and read it again at the next refresh.
                self._counts["catalog_retries"] += 1
                continue
            self._stamps[info.path] = stamp
            new += [e for e in catalog.segments if e.rel_path not in self._seen]
        new.sort(key=lambda e: (e.sealed_at, e.writer_id, e.seq))
        for e in new:
            self._seen.add(e.rel_path)
            self._pending.setdefault(e.table, []).append(e)
        for table in list(self._views):
            self._load_pending(table)
        self._apply_retention()
        self._counts["refresh_seconds"] = time.perf_counter() - t0
        return len(new)

    def _view(self, table: str) -> TableView:
        if table not in self._views:
            self._views[table] = TableView(table, SCHEMAS.get(table), self._arena)
            self._limiters[table] = RateLimiter(self.cfg.min_size_to_sample,
                                                self.cfg.samples_per_insert, self.cfg.error_buffer)
            self._load_pending(table)
        return self._views[table]

    def _load_pending(self, table: str) -> None:
        opened, hashes = [], []
        for entry in self._pending.pop(table, []):
            data = self._open(entry)
            if data is not None:
                opened.append((entry, data))
                hashes.append(hash_keys(data.column("key")))
            # The key, offset and version pages just read: drop them segment by segment, so
            # opening a store of any size maps about one segment's worth at a time.
            self._arena.release_pages()
        kept = self._views[table].add_many(opened, hashes)
        self._limiters[table].insert(sum(kept))
        self._arena.release_pages()

    def _open(self, entry: SegmentEntry) -> Optional[pa.Table]:
        """One catalogued segment, zero-copy in the arena; None if missing or quarantined."""
        if not self._loc.exists(entry.rel_path):
            self._account_missing(entry)
            return None
        try:
            if self._loc.local:
                slot = self._arena.map_file(self._loc.path(entry.rel_path))
            else:  # one GET per segment, into a memory file
                slot = self._arena.place(self._loc.read_bytes(entry.rel_path))
            data = ipc.open_stream(pa.BufferReader(slot.buffer())).read_all()
            check_segment(data, entry.table, entry.rows)
        except Exception as err:  # truncated, garbage, wrong schema, wrong row count
            self._quarantine(entry, err)
            return None
        self._counts["segments_opened"] += 1
        return data

    def _account_missing(self, entry: SegmentEntry) -> None:
        """A catalogued segment that is gone: evicted or quarantined by some reader, or lost."""
        if self._loc.exists(f"evicted/{entry.table}/{entry.name}"):
            return
        if self._loc.exists(f"quarantine/{entry.name}"):
            self._counts["quarantined"] += 1
            return
        self._counts["missing_segments"] += 1
        warnings.warn(f"replay: catalogued segment {self._loc.path(entry.rel_path)} is missing; "
                      f"its {entry.rows} rows are skipped", RuntimeWarning, stacklevel=4)

    def _quarantine(self, entry: SegmentEntry, err: Exception) -> None:
        src, dst = self._loc.path(entry.rel_path), self._loc.path(f"quarantine/{entry.name}")
        try:
            self._loc.makedirs("quarantine")
            self._loc.fs.move(src, dst)
        except OSError:
            pass  # another reader moved it first; the warning below still names the file
        self._counts["quarantined"] += 1
        warnings.warn(f"replay: segment {src} is unreadable ({type(err).__name__}: {err}); "
                      f"moved to {dst}, reading the rest", RuntimeWarning, stacklevel=4)

    # ---- retention ----------------------------------------------------------------------------

    def _apply_retention(self) -> None:
        """Evict whole oldest segments of each table past retention_rows/bytes/seconds.

        Tables not opened yet are trimmed from their catalog entries, without reading them.
        """
        cfg, now = self.cfg, time.time()
        for table in set(self._views) | set(self._pending):
            view, queue = self._views.get(table), self._pending.get(table, [])
            rows = (view.num_rows if view else 0) + sum(e.rows for e in queue)
            nbytes = (view.nbytes if view else 0) + sum(e.bytes for e in queue)
            while True:
                oldest = view.segs[0].entry if view and view.segs else (queue[0] if queue else None)
                if oldest is None or not (
                        (cfg.retention_rows is not None and rows > cfg.retention_rows)
                        or (cfg.retention_bytes is not None and nbytes > cfg.retention_bytes)
                        or (cfg.retention_seconds is not None
                            and oldest.sealed_at < now - cfg.retention_seconds)):
                    break
                if view and view.segs:
                    entry, n = view.pop_oldest()
                    self._limiters[table].delete(n)
                else:
                    entry, n = queue.pop(0), oldest.rows
                rows, nbytes = rows - n, nbytes - entry.bytes
                self._evict(entry, n)

    def _evict(self, entry: SegmentEntry, rows: int) -> None:
        # Marker first: a reader that finds the file gone then knows it was evicted.
        self._loc.touch(f"evicted/{entry.table}/{entry.name}")
        try:
            self._loc.fs.delete_file(self._loc.path(entry.rel_path))
        except OSError:
            pass  # already deleted by another reader
        self._counts["evicted_segments"] += 1
        self._counts["evicted_rows"] += rows

    # ---- reads -------------------------------------------------------------------------------

    def num_rows(self, table: str) -> int:
        """Distinct-key rows held for `table` (opens the table on first use)."""
        return self._view(table).num_rows

    def held_segments(self, table: str) -> list[tuple[str, list[pa.RecordBatch]]]:
        """(segment path, record batches) of each held segment of `table`, oldest first: the rows
        as sampled (repeated keys dropped), zero-copy. For indexes kept beside the store, which
        fold in the paths they have not seen (learner/groups.py)."""
        return [(s.entry.rel_path, s.batches) for s in self._view(table).segs]

    def held_version(self, table: str) -> int:
        """A number that changes whenever `table`'s held segments change (a seal folded in, a
        segment evicted): an index kept beside the store skips its walk while it is the same."""
        return self._view(table).version

    def rows_below_version(self, table: str, version: int) -> int:
        """Rows held in `table` with policy_version < `version` (0 for a table without one).

        Whole segments are counted from the catalog's min/max version; only segments that
        straddle `version` look at their (already held) version column.
        """
        return self._view(table).rows_below(version)

    def read(self, table: str, *, min_policy_version: Optional[int] = None,
             tasks: Optional[Sequence[str]] = None, envs: Optional[Sequence[str]] = None,
             max_policy_version: Optional[int] = None,
             columns: Optional[Sequence[str]] = None) -> pa.Table:
        """All held rows of `table` passing the filters, one row per key, oldest segment first.

        min/max_policy_version bound the rows' policy_version (inclusive); segments whose
        catalogued range is outside the bounds are not touched (the fresh-batch path).
        `columns` limits what is read. Without filters the result is zero-copy over the
        mapped segments; with filters it is a heap copy of just the matching rows.
        """
        view = self._view(table)
        pool = view.pool(min_policy_version, tasks, envs, max_policy_version)
        if pool is None:
            data = view.concat()
            return data if columns is None else data.select(list(columns))
        return view.take(pool, columns, self._budget)

    def sample(self, table: str, batch_size: int, *, rng: np.random.Generator, step: int = 0,
               current_version: Optional[int] = None, tasks: Optional[Sequence[str]] = None,
               envs: Optional[Sequence[str]] = None,
               priorities: Optional[np.ndarray] = None,
               max_staleness: Optional[int] = None,
               columns: Optional[Sequence[str]] = None) -> Optional[SampledBatch]:
        """Draw `batch_size` rows with replacement using cfg.sampler (None: nothing to draw).

        With `current_version`, rows with policy_version < current_version − staleness are
        left out, where staleness is `max_staleness` when given, else cfg.max_staleness.
        priorities: optional (num_rows(table),) scores aligned with read(table) order; they
        replace the column-derived ones (priority_key) for "prioritised", and are the quality
        for "curriculum". columns: gather only these. Returns None when the rate limiter
        refuses and on_overflow="drop", or when no row passes the filters.
        """
        if batch_size <= 0:
            raise ValueError("sample: batch_size must be > 0")
        staleness = self.cfg.max_staleness if max_staleness is None else max_staleness
        if staleness is not None and staleness < 0:
            raise ValueError(f"sample: max_staleness must be >= 0, got {staleness}")
        if not self._admit(table, batch_size):
            return None
        view = self._view(table)
        min_version = None
        if current_version is not None and staleness is not None:
            min_version = current_version - staleness
        dist = self._distribution(view, min_version, tasks, envs, step, priorities)
        if dist is None:  # e.g. every row older than max_staleness: nothing to learn from yet
            self._counts["empty_after_filters"] += 1
            return None
        pool, cdf, m = dist
        if cdf is None:
            draws, probs = rng.integers(0, m, batch_size), np.full(batch_size, 1.0 / m)
        else:
            draws, probs = cdf.draw(rng, batch_size)
        indices = (draws if pool is None else pool[draws]).astype(np.int64)
        self._limiters[table].sample(batch_size)
        self._counts["sample_batches"] += 1
        self._counts["sampled_rows"] += batch_size
        return SampledBatch(view.take(indices, columns, self._budget), probs, indices)

    def _budget(self) -> None:
        """After each gathered column: drop mapped pages past cfg.resident_bytes (if set)."""
        if self.cfg.resident_bytes is None:
            return
        try:
            with open("/proc/self/statm", "rb") as f:
                shared = int(f.read().split()[2]) * PAGE  # resident file-backed pages
        except OSError:
            shared = self.cfg.resident_bytes  # no /proc: release after every column
        if shared >= self.cfg.resident_bytes:
            self._arena.release_pages()
            self._counts["page_releases"] += 1

    def _admit(self, table: str, n: int) -> bool:
        """Ask the rate limiter; block (refreshing) or drop per cfg.on_overflow."""
        self._view(table)
        limiter = self._limiters[table]
        if limiter.can_sample(n):
            return True
        if self.cfg.on_overflow == "drop":
            self._counts["rate_limited"] += 1
            return False
        t0 = time.monotonic()
        deadline = t0 + self.cfg.block_timeout_s
        while not limiter.can_sample(n):
            if time.monotonic() >= deadline:
                self._counts["rate_limited"] += 1
                self._counts["blocked_seconds"] += time.monotonic() - t0
                raise RateLimitedError(
                    f"replay: sampling {n} rows from {table!r} refused for "
                    f"{self.cfg.block_timeout_s}s (rows={limiter.size}, min_size_to_sample="
                    f"{limiter.min_size_to_sample}, limiter={limiter.state()})")
            time.sleep(_BLOCK_POLL_S)
            self.refresh()
        self._counts["blocked_seconds"] += time.monotonic() - t0
        return True

    def _distribution(self, view: TableView, min_version, tasks, envs, step, priorities):
        """(pool (M,) int64 or None for all rows, Cumulative or None for uniform, M).

        Cached per (view version, filters, step-if-curriculum) so a learner sampling many
        batches between refreshes pays the O(N) priority pass once. Only the cumulative
        weights are kept (8 B/row); a drawn row's probability is its cdf step.
        """
        sampler = self.cfg.sampler
        key = (view.name, view.version, min_version, _frozen(tasks), _frozen(envs), sampler,
               step if sampler == "curriculum" else None)
        if priorities is None and key in self._cache:
            return self._cache[key]
        pool = view.pool(min_version, tasks, envs)
        m = view.num_rows if pool is None else pool.size
        if m == 0:
            return None
        if priorities is not None:
            priorities = np.asarray(priorities, dtype=np.float64)
            if priorities.shape != (view.num_rows,):
                raise ValueError(f"sample: priorities must have shape ({view.num_rows},), "
                                 f"got {priorities.shape}")
        cdf = None
        if sampler != "uniform":
            score = priorities if priorities is not None else self._scores(view)
            score = score if pool is None else score[pool]
            if sampler == "prioritised":
                probs = sampling.prioritised_probs(score, self.cfg.priority_exponent)
            else:
                quality = score if priorities is not None else score - score.min()
                probs = sampling.curriculum_probs(quality, step, self.cfg.curriculum_anneal_steps)
            cdf = Cumulative(probs)
            self._budget()  # the reward / task pages the scores read count against the budget
        result = (pool, cdf, m)
        if priorities is None:
            self._cache = {key: result}  # older versions are dead: keep one entry
        return result

    def _scores(self, view: TableView) -> np.ndarray:
        """(N,) column-derived priority: |reward| or |reward − mean reward of the row's task|.

        The per-task mean is the store's stand-in for the learner's baseline b(x); pass
        `priorities` to sample() to use the learner's own advantages instead.
        """
        reward = view.numpy("reward").astype(np.float64, copy=False)
        if self.cfg.priority_key == "reward_abs":
            return np.abs(reward)
        codes = view.numpy("task_id")
        means = np.bincount(codes, reward) / np.maximum(np.bincount(codes), 1)
        return np.abs(reward - means[codes])

    # ---- reporting ---------------------------------------------------------------------------

    def stats(self) -> dict:
        """Rows, segments, bytes, quarantine/eviction counts, and per-table breakdowns."""
        tables = {}
        for name in list(self._pending):
            self._view(name)  # stats cover every table: open the ones not used yet
        for name, view in sorted(self._views.items()):
            tables[name] = {"rows": view.num_rows, "segments": len(view.entries),
                            "bytes": view.nbytes, "duplicates_dropped": view.duplicates_dropped,
                            "rows_per_policy_version": _counts_of(view, "policy_version"),
                            "rows_per_task": _counts_of(view, "task_id")}
        return {"root": self._loc.uri,
                "rows": sum(t["rows"] for t in tables.values()),
                "segments": sum(t["segments"] for t in tables.values()),
                "bytes": sum(t["bytes"] for t in tables.values()),
                "quarantined": self._counts["quarantined"],
                "missing_segments": self._counts["missing_segments"],
                "evicted_segments": self._counts["evicted_segments"],
                "rows_per_table": {n: t["rows"] for n, t in tables.items()},
                "tables": tables}

    def metrics(self) -> dict:
        """Flat `replay/...` scalars for the run logger."""
        out = {"replay/rows": sum(v.num_rows for v in self._views.values()),
               "replay/segments": sum(len(v.entries) for v in self._views.values()),
               "replay/bytes": sum(v.nbytes for v in self._views.values()),
               "replay/duplicates_dropped": sum(v.duplicates_dropped
                                                for v in self._views.values()),
               "replay/segments_scanned": sum(v.segments_scanned for v in self._views.values()),
               "replay/segments_skipped": sum(v.segments_skipped for v in self._views.values())}
        out.update({f"replay/{k}": v for k, v in self._counts.items()})
        out.update({f"replay/rows/{n}": v.num_rows for n, v in self._views.items()})
        return out


def _frozen(values: Optional[Sequence[str]]) -> Optional[tuple[str, ...]]:
    return None if values is None else tuple(sorted(values))


def _counts_of(view: TableView, column: str) -> dict:
    if not view.num_rows or column not in view.concat().schema.names:
        return {}
    counts = pc.value_counts(view.column(column))
    return {v.as_py(): c.as_py() for v, c in zip(counts.field("values"), counts.field("counts"))}


__all__ = ["ReplayStore", "SampledBatch", "RateLimitedError"]
