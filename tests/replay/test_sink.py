"""AlignedSink: the bytes are Arrow's, in order; the file only ever grows by whole chunks."""
import os

import numpy as np
import pytest
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as ipc

from retro_dist.replay.sink import AlignedSink


class Recording:
    """A pyarrow output stream that records the length of each write reaching it."""

    def __init__(self, path):
        self.raw = pafs.LocalFileSystem().open_output_stream(path)
        self.writes = []

    def write(self, data):
        self.writes.append(len(memoryview(data).cast("B")))
        return self.raw.write(data)

    def flush(self):
        self.raw.flush()

    def close(self):
        self.raw.close()


def test_same_bytes_as_arrow_in_whole_aligned_chunks(tmp_path):
    rng = np.random.default_rng(0)
    batch = pa.record_batch({"ids": pa.array(rng.integers(0, 1 << 30, 300_000)),
                             "text": pa.array([f"row {i}" * (i % 7) for i in range(300_000)])})
    want = pa.BufferOutputStream()
    with ipc.new_stream(want, batch.schema) as w:
        for _ in range(3):
            w.write_batch(batch)
    rec = Recording(str(tmp_path / "seg"))
    sink = AlignedSink(rec, chunk=1 << 16)
    with ipc.new_stream(pa.PythonFile(sink, mode="w"), batch.schema) as w:
        for _ in range(3):
            w.write_batch(batch)
    assert sink.pos == want.tell()
    sink.close()
    assert (tmp_path / "seg").read_bytes() == want.getvalue().to_pybytes()
    assert all(n % (1 << 16) == 0 for n in rec.writes[:-1])  # only the tail is partial
    assert len(rec.writes) < 3 * 10  # the big buffers' middles went out whole, not piecewise


def test_flush_mid_chunk_keeps_later_chunks_aligned(tmp_path):
    rec = Recording(str(tmp_path / "f"))
    sink = AlignedSink(rec, chunk=16)
    sink.write(b"a" * 5)
    sink.flush()  # 5 bytes out now
    assert os.path.getsize(tmp_path / "f") == 5
    sink.write(b"b" * 30)  # 11 to finish the first chunk, 16 whole, 3 kept
    sink.write(b"c" * 2)
    sink.close()
    assert (tmp_path / "f").read_bytes() == b"a" * 5 + b"b" * 30 + b"c" * 2
    assert rec.writes == [5, 11, 16, 5]


def test_background_writes_keep_order_and_recycle_chunks(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    pool = []
    data = np.random.default_rng(1).integers(0, 256, 10_000, dtype=np.uint8).tobytes()
    with ThreadPoolExecutor(max_workers=1) as ex:
        sink = AlignedSink(pafs.LocalFileSystem().open_output_stream(str(tmp_path / "f")),
                           ex.submit, pool, chunk=256)
        for i in range(0, len(data), 37):
            sink.write(data[i:i + 37])
        sink.close()
    assert (tmp_path / "f").read_bytes() == data
    assert pool and all(len(c) == 256 for c in pool)  # written chunks came back for reuse


def test_a_failed_background_write_is_kept_and_stops_later_writes(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    class Full(Recording):
        def write(self, data):
            if len(self.writes) == 1:
                raise OSError(28, "No space left on device")
            return super().write(data)

    rec = Full(str(tmp_path / "f"))
    with ThreadPoolExecutor(max_workers=1) as ex:
        sink = AlignedSink(rec, ex.submit, [], chunk=16)
        sink.write(b"x" * 16)  # one whole chunk: written
        sink.write(b"y" * 40)  # two more (fails), 8 bytes kept for close (never written)
        with pytest.raises(OSError, match="No space"):
            sink.flush()
        sink.close()
    assert isinstance(sink.error, OSError)
    assert rec.writes == [16]  # nothing after the failure reached the file


def test_writer_files_are_the_same_bytes_either_way(tmp_path):
    from retro_dist.replay.config import ReplayConfig
    from retro_dist.replay.writer import ReplayWriter
    from tests.replay.test_store import T, batch

    for aligned in (True, False):
        cfg = ReplayConfig(seal_rows=700, huge_page_writes=aligned)
        with ReplayWriter(str(tmp_path / str(aligned)), "w0", cfg) as w:
            for i in range(0, 2000, 300):
                w.append(T, batch(i, i + 300))
    seg_dirs = [tmp_path / str(a) / "segments" / T for a in (True, False)]
    names = sorted(os.listdir(seg_dirs[0]))
    assert names == sorted(os.listdir(seg_dirs[1])) and len(names) == 3
    for name in names:
        assert (seg_dirs[0] / name).read_bytes() == (seg_dirs[1] / name).read_bytes()


def test_a_segment_is_catalogued_only_after_all_its_bytes_are_written(tmp_path, monkeypatch):
    """Segment A's writes are slow; B seals meanwhile. A commit must not take B with it before
    B's own writes (queued behind the commit) ran: a kill then would leave B catalogued but short."""
    import time

    from retro_dist.replay.catalog import StoreLocation
    from retro_dist.replay.config import ReplayConfig
    from retro_dist.replay.writer import ReplayWriter
    from tests.replay.test_store import T, batch

    write, calls = AlignedSink._write, []

    def slow_first(self, *args):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.5)  # the caller seals B while A is still being written
        return write(self, *args)

    fsync, sizes = StoreLocation.fsync, {}

    def record(self, rel, directory=False):
        if not directory:
            sizes[rel] = os.path.getsize(self.path(rel))
        return fsync(self, rel, directory)

    monkeypatch.setattr(AlignedSink, "_write", slow_first)
    monkeypatch.setattr(StoreLocation, "fsync", record)
    root = tmp_path / "store"
    with ReplayWriter(str(root), "w0", ReplayConfig(seal_rows=5)) as w:
        w.append(T, batch(0, 10))  # A = rows 0-4, B = rows 5-9, sealed back to back
    seg_dir = root / "segments" / T
    final = {f"segments/{T}/{n}.tmp": (seg_dir / n).stat().st_size for n in os.listdir(seg_dir)}
    assert len(final) == 2 and sizes == final  # each file was whole when fsynced and renamed
