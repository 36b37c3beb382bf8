"""On-disk layout of a replay store, its catalog, and the file operations both sides share.

Layout under the store root (a bare path, file:// or s3:// URI; see location.py):

    segments/<table>/<writer>-<seq:08d>.arrows       sealed Arrow IPC stream segment
    segments/<table>/<writer>-<seq:08d>.arrows.tmp   the writer's open segment (local disk only)
    catalog/<writer>.json                            that writer's sealed segments
    quarantine/<writer>-<seq:08d>.arrows             segments that failed to read
    evicted/<table>/<writer>-<seq:08d>.arrows        empty marker: removed by retention

The catalog is the commit point: a segment is part of the store once its entry is in a
catalog file. Each writer rewrites only its own catalog file (local: temp + fsync + rename;
object store: one PUT of the final name), so any number of writer processes can share a store
without a lock; readers merge all files. On an object store a segment is written once under
its final name (an object appears whole when its upload completes, never partly), and a
reader never opens a segment no catalog lists.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.ipc as ipc
import pyarrow.types as pt

from retro_dist.core.records import SCHEMAS
from retro_dist.replay.gather import check_offsets
from retro_dist.replay.location import fsync_path, open_location, write_once

SEGMENT_SUFFIX = ".arrows"
TMP_SUFFIX = ".tmp"
_NAME_OK = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_name(kind: str, name: str) -> str:
    """Writer ids and table names become path parts: keep them to a safe alphabet."""
    if not _NAME_OK.fullmatch(name) or name.endswith((SEGMENT_SUFFIX, TMP_SUFFIX, ".json")):
        raise ValueError(f"replay {kind} {name!r}: use letters, digits, '_', '.', '-'")
    return name


def segment_name(writer_id: str, seq: int) -> str:
    return f"{writer_id}-{seq:08d}{SEGMENT_SUFFIX}"


def parse_own_segment(writer_id: str, filename: str) -> Optional[tuple[int, bool]]:
    """(seq, is_temp) if `filename` is one of `writer_id`'s segments, else None."""
    m = re.fullmatch(re.escape(writer_id) + r"-(\d{8,})" + re.escape(SEGMENT_SUFFIX)
                     + r"(" + re.escape(TMP_SUFFIX) + r")?", filename)
    return (int(m.group(1)), m.group(2) is not None) if m else None


def constant_values(batch: pa.RecordBatch, before: Optional[dict]) -> dict:
    """{column: value} of the columns whose every row of `batch` holds one non-null value, kept to
    those holding the same value in `before` (the segment's earlier batches; None for its first).

    Integer, bool, string and binary columns only: floats could hold -0.0 beside 0.0 or NaNs,
    which compare equal or unordered but are not the same bytes. Numpy over the Arrow buffers
    (a few microseconds per column of 8192 rows; Arrow's min_max took 60 on strings).
    """
    out = {}
    for name in batch.schema.names if before is None else before:
        col = batch.column(name)
        if col.null_count or not len(col) or not _one_value(col):
            continue
        value = col[0].as_py()
        if before is None or before[name] == value:
            out[name] = value
    return out


def _one_value(col: pa.Array) -> bool:
    """Does every row of `col` (no nulls) hold row 0's value? False for unsupported types."""
    t = col.type
    if pt.is_string(t) or pt.is_binary(t):
        offs = np.frombuffer(col.buffers()[1], np.int32, len(col) + 1, col.offset * 4)
        width = int(offs[1] - offs[0])
        if int(offs[-1] - offs[0]) != width * len(col) or np.any(np.diff(offs) != width):
            return False
        if not width:
            return True
        data = np.frombuffer(col.buffers()[2], np.uint8, int(offs[-1] - offs[0]), int(offs[0]))
        return bool((data.reshape(-1, width) == data[:width]).all())
    if pt.is_integer(t) or pt.is_boolean(t):
        values = col.to_numpy(zero_copy_only=False)
        return bool((values == values[0]).all())
    return False


@dataclass
class SegmentEntry:
    """One sealed segment as recorded in its writer's catalog."""

    table: str
    name: str  # file name inside segments/<table>/
    writer_id: str
    seq: int  # per-writer sequence number, shared by all of the writer's tables
    rows: int
    bytes: int
    sealed_at: float  # unix seconds
    min_version: Optional[int] = None  # policy_version range of its rows, when the table has one
    max_version: Optional[int] = None
    # columns whose rows all hold one value (run_id, worker_id, often env_name and policy_version):
    # a reader gathers them without a read per row (gather.Layout.build)
    constant: Optional[list[str]] = None

    @property
    def rel_path(self) -> str:
        return f"segments/{self.table}/{self.name}"


@dataclass
class Catalog:
    writer_id: str
    next_seq: int = 0
    segments: list[SegmentEntry] = field(default_factory=list)

    def to_json(self) -> bytes:
        doc = {"format": 1, "writer_id": self.writer_id, "next_seq": self.next_seq,
               "segments": [asdict(s) for s in self.segments]}
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Catalog":
        doc = json.loads(data)
        return cls(doc["writer_id"], int(doc["next_seq"]),
                   [SegmentEntry(**s) for s in doc["segments"]])


class StoreLocation:
    """A store root on some `pyarrow.fs` filesystem, plus the durability calls it supports.

    `local` stores (bare paths, file://) use temp names, fsync and rename; object stores
    write every object once under its final name (see location.py).
    """

    def __init__(self, root_uri: str) -> None:
        fs, root = open_location(root_uri)
        self.local = isinstance(fs, pafs.LocalFileSystem)
        self.fs: pafs.FileSystem = fs
        self.root = root.rstrip("/")
        self.uri = root_uri

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def makedirs(self, rel: str) -> None:
        self.fs.create_dir(self.path(rel), recursive=True)

    def list(self, rel: str, recursive: bool = False) -> list[pafs.FileInfo]:
        sel = pafs.FileSelector(self.path(rel), allow_not_found=True, recursive=recursive)
        return [i for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File]

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def fsync(self, rel: str, directory: bool = False) -> None:
        """Force a local file (or a directory's entries, after a rename) to disk.

        fsync works per inode, so a fresh read-only descriptor flushes what the pyarrow
        stream wrote. Object stores have no such call: a completed PUT is already durable.
        """
        if self.local:
            fsync_path(self.path(rel), directory)

    def write_atomic(self, rel: str, data: bytes) -> None:
        """Replace `rel` with `data` so readers see the old or the new file, never a mix."""
        write_once(self.fs, self.path(rel), data)

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel), compression=None) as f:
            return f.read()

    def touch(self, rel: str) -> None:
        self.makedirs(os.path.dirname(rel))
        with self.fs.open_output_stream(self.path(rel), compression=None):
            pass


def catalog_rel(writer_id: str) -> str:
    return f"catalog/{writer_id}.json"


def load_catalog(loc: StoreLocation, writer_id: str) -> Catalog:
    rel = catalog_rel(writer_id)
    if not loc.exists(rel):
        return Catalog(writer_id)
    return Catalog.from_json(loc.read_bytes(rel))


def read_segment(loc: StoreLocation, rel: str, table: str,
                 expect_rows: Optional[int] = None) -> pa.Table:
    """Read (one GET on an object store) and check one sealed segment; raises on any damage."""
    data = ipc.open_stream(pa.BufferReader(loc.read_bytes(rel))).read_all()
    check_segment(data, table, expect_rows)
    return data


def check_segment(data: pa.Table, table: str, expect_rows: Optional[int] = None) -> None:
    """Raise unless `data` is a sound segment of `table`.

    A stream cut exactly at a message boundary reads cleanly but short, so the catalog's row
    count is what catches it. The offsets check makes bytes damaged in place raise here
    instead of sending a later gather outside the segment; values are not scanned (that
    would read every page of every segment at open).
    """
    want = SCHEMAS.get(table)
    if want is not None and not data.schema.equals(want, check_metadata=False):
        raise ValueError(f"schema differs from {table}'s: {data.schema}")
    if expect_rows is not None and data.num_rows != expect_rows:
        raise ValueError(f"{data.num_rows} rows, catalog says {expect_rows}")
    data.validate()
    for col in data.columns:
        for chunk in col.chunks:
            check_offsets(chunk)


def first_unseen(keys: pa.Array | pa.ChunkedArray, seen: set[str]) -> np.ndarray:
    """Sorted row indices of keys not in `seen`, first occurrence of each key only.

    The slow path of key dedup (a resend, or a key held by two writers): vectorised with
    is_in + group-by-min, so even a fully re-sent batch costs no per-row Python.
    """
    idx = pa.table({"k": keys, "i": np.arange(len(keys), dtype=np.int64)})
    if seen:
        idx = idx.filter(pc.invert(pc.is_in(idx["k"], value_set=pa.array(list(seen), pa.string()))))
    first = idx.group_by("k", use_threads=False).aggregate([("i", "min")])["i_min"]
    return np.sort(first.to_numpy())


__all__ = ["SegmentEntry", "Catalog", "StoreLocation", "catalog_rel", "load_catalog",
           "read_segment", "check_segment", "first_unseen", "segment_name", "parse_own_segment", "check_name"]
