"""AlignedSink: a segment file written in whole, aligned 2 MB pieces, off the caller's thread.

Arrow's IPC writer emits a record batch as a few dozen writes: a few bytes of framing and
metadata, then each buffer, at whatever offset the previous one ended. Linux sizes the page
cache folios of a buffered write by that write's length and alignment, so such a file lands in
small folios, and a reader that maps it faults once per 64 KB at best. Handed whole 2 MB
pieces at 2 MB offsets, the page cache keeps the file in 2 MB folios that a reader maps with
one fault each (arena.py places big slots to allow it): at 10M rows a fresh reader took 12
faults per batch of 256 instead of 73 (benchmarks/replay.py, `*_faults_per_batch`).

Small writes are copied into a 2 MB chunk; the aligned middle of a big Arrow buffer is written
as it is (no copy: the view keeps the immutable buffer alive). With `submit`, every write to the
file runs on the writer's sealer thread, in order, so the caller only serialises; full chunks go
back to a shared pool once written, so steady writing touches no fresh memory.
"""
from __future__ import annotations

from concurrent.futures import Future
from typing import Callable, Optional

import pyarrow as pa

CHUNK = 2 << 20


class AlignedSink:
    """Write-only file object over `raw` (a pyarrow output stream), for pa.PythonFile.

    submit(fn, *args) -> Future: runs fn on one background thread in submission order (the
    writer's sealer); None writes inline. pool: spare chunks (bytearrays of `chunk` bytes).
    """

    closed = False

    def __init__(self, raw: pa.NativeFile, submit: Optional[Callable[..., Future]] = None,
                 pool: Optional[list] = None, chunk: int = CHUNK) -> None:
        self.raw, self.submit, self.chunk = raw, submit, chunk
        self.pool = [] if pool is None else pool
        self.pending = self._take_chunk()
        self.fill = 0  # bytes of `pending` in use
        self.done = 0  # of those, bytes already handed to the file (a flush() mid-chunk)
        self.pos = 0  # bytes written by the caller
        self.error: Optional[BaseException] = None  # the first failed background write
        self._last: Optional[Future] = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        n, i = len(view), 0
        if self.fill:  # top up the chunk first
            i = min(n, self.chunk - self.fill)
            self.pending[self.fill:self.fill + i] = view[:i]
            self.fill += i
            if self.fill == self.chunk:
                self._out(self.pending, self.done, self.chunk, recycle=True)
                self.pending, self.fill, self.done = self._take_chunk(), 0, 0
        whole = (n - i) // self.chunk * self.chunk
        if whole:  # the chunk is empty here: the file is at a chunk boundary
            self._out(view, i, i + whole)
            i += whole
        if i < n:
            self.pending[:n - i] = view[i:]
            self.fill = n - i
        self.pos += n
        return n

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        """Hand the file what the chunk holds and wait until every write so far is done (later
        writes still fill the chunk up to its 2 MB boundary)."""
        self._flush_pending()
        if self._last is not None:
            self._last.result()
        if self.error is not None:  # an earlier write failed: later ones were skipped
            raise self.error

    def close(self) -> None:
        """Queue the last partial chunk and the close; a background error shows in `error`
        (and in the writer's next append or seal)."""
        if not self.closed:
            self._flush_pending()  # a copy: the chunk can go back to the pool now
            self.pool.append(self.pending)
            self.closed = True
            self._run(self._close_raw)

    def _flush_pending(self) -> None:
        if self.fill > self.done:
            self._out(bytes(self.pending[self.done:self.fill]), 0, self.fill - self.done)
            self.done = self.fill

    def _take_chunk(self) -> bytearray:
        try:
            return self.pool.pop()
        except IndexError:
            return bytearray(self.chunk)

    def _out(self, buf, start: int, stop: int, recycle: bool = False) -> None:
        self._run(self._write, buf, start, stop, recycle)

    def _run(self, fn, *args) -> None:
        if self.submit is None:
            fn(*args)
        else:
            self._last = self.submit(fn, *args)

    def _write(self, buf, start: int, stop: int, recycle: bool) -> None:
        try:
            if self.error is None:  # after a failure nothing more reaches the file
                self.raw.write(memoryview(buf)[start:stop])
        except BaseException as err:
            self.error = err
            raise
        finally:
            if recycle:
                self.pool.append(buf)

    def _close_raw(self) -> None:
        try:
            self.raw.close()
        except BaseException as err:
            self.error = self.error or err
            raise


__all__ = ["AlignedSink", "CHUNK"]
