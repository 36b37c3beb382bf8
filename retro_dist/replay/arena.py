"""Arena: every segment a reader holds, placed side by side in one reserved address range.

Why: a sample gathers ~256 random rows spread over hundreds of segments. Arrow's `take` costs
a call per segment touched (and on a many-chunk table concatenates every chunk first), so the
reader gathers with numpy instead, and numpy needs one buffer. The arena reserves a large
PROT_NONE range once and maps each sealed segment file into its own slot of it (MAP_FIXED,
read-only, shared: the bytes stay in the page cache, not on the heap). Then every Arrow buffer
of every segment is an offset into one numpy view, and a gather is a few fancy-index ops
whatever the number of segments (see gather.py).

Segments that are not local files (object stores, or a segment rewritten without duplicate
keys) are copied into an in-memory file (memfd) mapped the same way, so every slot has a file
behind it and `release_pages` (MADV_DONTNEED over the whole arena) only drops this process's
page mappings: the bytes stay in the page cache or the memfd and fault back in on the next
touch. That keeps the reader's resident set to what it touched recently.

A slot is unmapped (turned back into PROT_NONE) when the last Arrow buffer over it is freed:
the buffers hold the slot as their base object. Linux (and other systems with a POSIX mmap
and MAP_FIXED) only.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os

import numpy as np
import pyarrow as pa

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MAP_FIXED = 0x10
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
_MAP_FAILED = ctypes.c_void_p(-1).value
_PROT_NONE = 0
PAGE = mmap.PAGESIZE
# Readable zero bytes after every slot: a gather may read a fixed-width window starting at any
# row (gather.py copies each row as one block of the batch's longest row), so a row at the very
# end of a segment may read up to this far past it without faulting.
GUARD = 64 << 10


def _pmd_size() -> int:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 2 << 20


# A slot of at least this size starts on a multiple of it. The kernel maps a file's large page
# cache folios (ext4, xfs and tmpfs keep big files in them) with one page-table entry per
# PMD_SIZE only where the virtual address is aligned like the file offset; in a packed arena a
# fault mapped at most 16 pages, and at 10M rows a fresh reader took 4x the faults per batch of
# TorchRL's memmaps (whose mappings the kernel places aligned).
PMD_SIZE = _pmd_size()


def _mmap(addr: int, length: int, prot: int, flags: int, fd: int = -1) -> int:
    out = _libc.mmap(addr, length, prot, flags, fd, 0)
    if out in (None, _MAP_FAILED):
        err = ctypes.get_errno()
        raise OSError(err, f"replay arena: mmap failed: {os.strerror(err)}")
    return out


def _round_up(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


class Slot:
    """One segment's bytes inside an arena; unmapped when the last buffer over it goes."""

    def __init__(self, arena: "Arena", offset: int, length: int, size: int) -> None:
        self.arena, self.offset, self.length, self.size = arena, offset, length, size

    @property
    def address(self) -> int:
        return self.arena.base + self.offset

    def buffer(self) -> pa.Buffer:
        """Zero-copy Arrow buffer over the slot's bytes; keeps the slot alive."""
        return pa.foreign_buffer(self.address, self.size, base=self)

    def __del__(self) -> None:
        try:
            self.arena._unmap(self.offset, self.length)
        except Exception:  # interpreter shutdown: the process is unmapping everything anyway
            pass


class Arena:
    """A reserved address range handed out as page-aligned slots (bump allocation)."""

    def __init__(self, reserve: int = 1 << 40, huge_pages: bool = True) -> None:
        """huge_pages: let the kernel map big slots in PMD_SIZE steps (fewer faults and TLB
        misses per sample). False for a reader on a page budget: a fault there must not map
        2 MB of a segment when the gather wanted one row of it."""
        self.huge_pages = huge_pages
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
        while True:  # a smaller reservation where the address space is limited
            try:
                self.base = _mmap(0, reserve, _PROT_NONE, flags)
                break
            except OSError:
                if reserve <= 1 << 30:
                    raise
                reserve //= 2
        self.size, self.top = reserve, 0
        self._raw = (ctypes.c_uint8 * reserve).from_address(self.base)
        self.u8 = np.frombuffer(self._raw, dtype=np.uint8)  # views over the whole range: gather.py
        self._views: dict[np.dtype, np.ndarray] = {}
        self.live = 0  # bytes in slots not yet unmapped
        self.spans: dict[int, int] = {}  # offset -> bytes mapped there, of every live slot

    def view(self, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        if dtype not in self._views:
            self._views[dtype] = self.u8.view(dtype)
        return self._views[dtype]

    def windows(self, dtype, width: int) -> np.ndarray:
        """(n, width) overlapping view: row i is the `width` elements from element i on."""
        dtype = np.dtype(dtype)
        step = dtype.itemsize
        return np.ndarray((self.size // step - width + 1, width), dtype, buffer=self._raw,
                          strides=(step, step))

    def _take(self, size: int) -> tuple[int, int]:
        length = _round_up(max(size, 1)) + GUARD
        start = self.top
        if self.huge_pages and size >= PMD_SIZE:  # aligned: the kernel may map huge pages of it
            start = (self.base + start + PMD_SIZE - 1) // PMD_SIZE * PMD_SIZE - self.base
        if start + length > self.size:
            raise MemoryError(f"replay arena: {self.size >> 30} GiB of address space used up; "
                              "open a new ReplayStore")
        offset, self.top = start, start + length
        self.live += length
        return offset, length

    def map_file(self, path: str) -> Slot:
        """Map a local file read-only into a fresh slot."""
        fd = os.open(path, os.O_RDONLY)
        try:
            return self._map_fd(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)

    def place(self, data) -> Slot:
        """Copy bytes (bytes or an Arrow buffer) into a memfd and map it into a fresh slot."""
        view = memoryview(data.to_pybytes() if isinstance(data, pa.Buffer) else data)
        fd = os.memfd_create("retro-replay-segment", os.MFD_CLOEXEC)
        try:
            done = 0
            while done < len(view):
                done += os.write(fd, view[done:])
            return self._map_fd(fd, len(view))
        finally:
            os.close(fd)

    def _map_fd(self, fd: int, size: int) -> Slot:
        offset, length = self._take(size)
        if size:
            _mmap(self.base + offset, size, mmap.PROT_READ, mmap.MAP_SHARED | _MAP_FIXED, fd)
            self.spans[offset] = size
            if not self.huge_pages:
                _libc.madvise(self.base + offset, _round_up(size), mmap.MADV_NOHUGEPAGE)
            # No MADV_RANDOM: it cost more than it saved. A fault maps the cached pages around
            # it (a 64 KB window holds 256-8192 rows of one column, so a few hundred batches map
            # most of a 10M-row store) and reads ahead when a page is not cached; one page per
            # fault made a fresh reader 6x slower than TorchRL's plain memmap at 10M rows.
        guard = self.base + offset + length - GUARD
        if _libc.mprotect(guard, GUARD, mmap.PROT_READ) != 0:  # zero pages, never written
            err = ctypes.get_errno()
            raise OSError(err, f"replay arena: mprotect failed: {os.strerror(err)}")
        return Slot(self, offset, length, size)

    def release_pages(self) -> None:
        """Drop this process's resident pages of every slot (they stay in the page cache)."""
        if self.top:
            _libc.madvise(self.base, self.top, mmap.MADV_DONTNEED)

    def __del__(self) -> None:  # runs only once every slot (each holds the arena) is gone
        try:
            _libc.munmap(ctypes.c_void_p(self.base), ctypes.c_size_t(self.size))
        except Exception:
            pass

    def _unmap(self, offset: int, length: int) -> None:
        self.spans.pop(offset, None)
        _mmap(self.base + offset, length, _PROT_NONE,
              mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE | _MAP_FIXED)
        self.live -= length


__all__ = ["Arena", "Slot", "PAGE"]
