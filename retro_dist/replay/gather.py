"""Vectorised row gather over Arrow record batches that live in one Arena, and key hashing.

A `Layout` records, for one column and every record batch of a table, where the column's
buffers sit in the arena (as element indices into a typed numpy view of it). Gathering rows
(b_i, r_i) (batch, row in batch) is then one fancy index per buffer, the same work for 3
segments or 3000: fixed-width values read `view[base[b] + r]`; strings and lists read their
two offsets, then every value between them (`np.repeat` + `arange`), and a list recurses into
its child with the child row ranges. The output arrays are fresh heap copies in the order
asked, so a sampled batch never points into a segment that retention may unmap.

A column the writer found constant in a segment (`SegmentEntry.constant`) has row step 0 in
that segment's batches: every row reads the batch's one value, from the batch's row 0 or, with
many such batches, from a small pool of them all (a few hot pages instead of one page per
batch). A column with one value in the whole store (a run's run_id) is not read at all.

Supported: fixed-width primitives, bool, string/binary, and lists of any of them (nested),
each with or without nulls. Anything else (or a buffer outside the arena) makes
`Layout.build` return None and the view falls back to Arrow's per-batch take.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.types as pt

from retro_dist.replay.arena import GUARD, Arena

_HASH_MULT = np.uint64(0x9E3779B97F4A7C15)
_HASH_MIX = np.uint64(0xBF58476D1CE4E5B9)
# Constant batches of a column get a pool from this many on. A pool costs an arena slot (a page
# and GUARD of address space, never reused) each time the view changes.
POOL_MIN_BATCHES = 512


def _rel(arena: Arena, buf: Optional[pa.Buffer], width: int,
         need: int = 0) -> Optional[int]:
    """Element index of `buf` in the arena's `width`-byte view, or None if not placeable
    (outside the arena, misaligned, or shorter than the `need` bytes a gather may read)."""
    if buf is None or buf.size < need:
        return None
    off = buf.address - arena.base
    if off < 0 or off + buf.size > arena.top or off % width:
        return None
    return off // width


class Layout:
    """Where one column's buffers are, per record batch (arrays indexed by batch number)."""

    def __init__(self, dtype: pa.DataType, kind: str, width: int, validity: Optional[np.ndarray],
                 values: np.ndarray, offsets: Optional[np.ndarray] = None,
                 child: Optional["Layout"] = None) -> None:
        self.dtype, self.kind, self.width = dtype, kind, width
        self.validity = validity  # (n_batches,) absolute bit index of row 0, -1 = no bitmap
        self.values = values  # (n_batches,) element index (bits for bool) of row 0's value
        self.offsets = offsets  # (n_batches,) int32 index of row 0's offset (strings, lists)
        self.child = child
        self.step: Optional[np.ndarray] = None  # (n_batches,) 0 where every row equals row 0
        self.pool = None  # the arena slot holding constant batches' values (kept alive here)
        self.single: Optional[pa.Array] = None  # the one value of a column constant store-wide
        self._repeated: dict[int, pa.Array] = {}

    @classmethod
    def build(cls, arena: Arena, arrays: Sequence[pa.Array],
              constant: Optional[Sequence[bool]] = None) -> Optional["Layout"]:
        """Layout of one column over its per-batch arrays (same type), or None if unsupported.

        constant: per batch, True where every row holds row 0's value (the writer's word)."""
        layout = cls._build(arena, arrays)
        if layout is not None and constant is not None and any(constant):
            constant = np.asarray(constant, bool)
            if layout.kind in ("fixed", "bytes"):
                layout._place_constants(arena, np.flatnonzero(constant))
            layout.step = np.where(constant, 0, 1).astype(np.int64)
        return layout

    def _place_constants(self, arena: Arena, batches: np.ndarray) -> None:
        """Where the constant batches' values are read from: nowhere when every batch holds the
        same one (`single`); else, from POOL_MIN_BATCHES such batches on, a small slot holding
        each batch's value, so a sample reads a few hot pages for the column, not one page per
        batch (at 10M rows, 1,200 batches' first rows cost a TLB miss each, nearly a cold read)."""
        firsts = self.gather(arena, batches, np.zeros(batches.size, np.int64))
        if batches.size == self.values.size and len(firsts.unique()) == 1:
            self.single = firsts.slice(0, 1)  # run_id; with one game, env_name: nothing to read
        if batches.size < POOL_MIN_BATCHES:
            return  # their first rows sit on few pages: read them in place
        if self.kind == "fixed":
            self.pool = arena.place(firsts.buffers()[1])
            self.values[batches] = self.pool.offset // self.width + np.arange(batches.size)
            return
        offsets, data = firsts.buffers()[1], firsts.buffers()[2]
        head = (offsets.size + 7) // 8 * 8
        blob = bytearray(head + (0 if data is None else data.size))
        blob[:offsets.size] = offsets.to_pybytes()
        if data is not None:
            blob[head:] = data.to_pybytes()
        self.pool = arena.place(blob)
        self.offsets[batches] = self.pool.offset // 4 + np.arange(batches.size)
        self.values[batches] = self.pool.offset + head

    @classmethod
    def _build(cls, arena: Arena, arrays: Sequence[pa.Array]) -> Optional["Layout"]:
        dtype = arrays[0].type
        validity = []
        for a in arrays:
            bufs = a.buffers()
            v = _rel(arena, bufs[0], 1, (a.offset + len(a) + 7) // 8) if a.null_count else None
            if a.null_count and v is None:
                return None
            validity.append(-1 if v is None else v * 8 + a.offset)
        validity_arr = np.array(validity, np.int64) if any(v >= 0 for v in validity) else None
        if pt.is_boolean(dtype) or (pt.is_primitive(dtype) and dtype.bit_width in (8, 16, 32, 64)):
            width = 1 if pt.is_boolean(dtype) else dtype.bit_width // 8
            need = [(a.offset + len(a) + 7) // 8 if width == 1 and pt.is_boolean(dtype)
                    else (a.offset + len(a)) * width for a in arrays]
            base = [_rel(arena, a.buffers()[1], width, k) for a, k in zip(arrays, need)]
            if any(b is None for b in base):
                return None
            if pt.is_boolean(dtype):
                vals = np.array([b * 8 + a.offset for b, a in zip(base, arrays)], np.int64)
                return cls(dtype, "bool", 1, validity_arr, vals)
            vals = np.array([b + a.offset for b, a in zip(base, arrays)], np.int64)
            return cls(dtype, "fixed", width, validity_arr, vals)
        if pt.is_string(dtype) or pt.is_binary(dtype) or pt.is_list(dtype):
            offs = [_rel(arena, a.buffers()[1], 4, (a.offset + len(a) + 1) * 4) for a in arrays]
            if any(o is None for o in offs):
                return None
            offs = np.array([o + a.offset for o, a in zip(offs, arrays)], np.int64)
            if pt.is_list(dtype):
                child = cls._build(arena, [a.values for a in arrays])
                if child is None:
                    return None
                return cls(dtype, "list", 4, validity_arr, np.zeros(len(arrays), np.int64), offs,
                           child)
            # no data buffer: every string is empty, so no byte is ever read from it
            data = [0 if a.buffers()[2] is None else _rel(arena, a.buffers()[2], 1)
                    for a in arrays]
            if any(d is None for d in data):
                return None
            return cls(dtype, "bytes", 1, validity_arr, np.array(data, np.int64), offs)
        return None

    def gather(self, arena: Arena, b: np.ndarray, r: np.ndarray) -> pa.Array:
        """Values at rows `r` (n,) of batches `b` (n,), as one contiguous Arrow array."""
        n = int(r.size)
        if self.single is not None:
            out = self._repeated.get(n)
            if out is None:
                out = self.single.take(pa.array(np.zeros(n, np.int64)))
                if n <= 4096 and len(self._repeated) < 8:  # sample sizes, not filtered reads
                    self._repeated[n] = out  # Arrow arrays are immutable: batches may share it
            return out
        if self.step is not None:
            r = r * self.step[b]
        valid = None
        if self.validity is not None:
            bits = self.validity[b]
            has = bits >= 0  # batches without a bitmap have no nulls: read nothing for them
            valid = np.ones(n, bool)
            pos = bits[has] + r[has]
            valid[has] = (arena.u8[pos >> 3] >> (pos & 7).astype(np.uint8)) & 1
        nulls = 0 if valid is None else int(n - valid.sum())
        vbuf = None if not nulls else pa.py_buffer(np.packbits(valid, bitorder="little"))
        if self.kind == "fixed":
            vals = arena.view(f"u{self.width}")[self.values[b] + r]
            return pa.Array.from_buffers(self.dtype, n, [vbuf, pa.py_buffer(vals)], nulls)
        if self.kind == "bool":
            pos = self.values[b] + r
            bits = ((arena.u8[pos >> 3] >> (pos & 7).astype(np.uint8)) & 1).astype(bool)
            return pa.Array.from_buffers(self.dtype, n, [vbuf, pa.py_buffer(
                np.packbits(bits, bitorder="little"))], nulls)
        pair = arena.windows(np.int32, 2)[self.offsets[b] + r]  # (n, 2): each row's offsets
        start = pair[:, 0].astype(np.int64)
        lens = pair[:, 1] - start
        out = np.zeros(n + 1, np.int64)
        np.cumsum(lens, out=out[1:])
        total = int(out[-1])
        obuf = pa.py_buffer(out.astype(np.int32))
        if self.kind == "bytes":
            data = _copy_ranges(arena, np.uint8, self.values[b] + start, lens, out, total)
            return pa.Array.from_buffers(self.dtype, n, [vbuf, obuf, pa.py_buffer(data)], nulls)
        child = self.child
        if child.kind == "fixed" and child.validity is None:
            # The common list<number> case: one copy per row, no per-element batch ids.
            vals = _copy_ranges(arena, f"u{child.width}", child.values[b] + start, lens, out,
                                total)
            inner = pa.Array.from_buffers(child.dtype, total, [None, pa.py_buffer(vals)], 0)
        else:
            inner = child.gather(arena, np.repeat(b, lens), _ranges(start, lens, out, total))
        return pa.Array.from_buffers(self.dtype, n, [vbuf, obuf], nulls, children=[inner])


def _copy_ranges(arena: Arena, dtype, base: np.ndarray, lens: np.ndarray, out: np.ndarray,
                 total: int) -> np.ndarray:
    """Elements [base_i, base_i + lens_i) of the arena's `dtype` view, one row after another.

    Rows of similar length are copied as whole blocks of the longest row (one memcpy-like
    fancy index over an overlapping window view, reading at most GUARD bytes past a row's
    end), then trimmed; very uneven or very long rows go element by element.
    """
    n, width = lens.size, int(lens.max(initial=0))
    itemsize = np.dtype(dtype).itemsize
    if n == 0 or width == 0 or width * itemsize > GUARD or n * width > 2 * total + 8 * n:
        return arena.view(dtype)[_ranges(base, lens, out, total)]
    rows = arena.windows(dtype, width)[base]
    if int(lens.min()) == width:
        return rows.reshape(-1)
    return rows[_ARANGE[:width] < lens[:, None]]


_ARANGE = np.arange(1 << 16, dtype=np.int64)


def _ranges(base: np.ndarray, lens: np.ndarray, out: np.ndarray, total: int) -> np.ndarray:
    """The ranges [base_i, base_i + lens_i) one after another (out: the lens' running sum)."""
    global _ARANGE
    if total > _ARANGE.size:
        _ARANGE = np.arange(max(total, 2 * _ARANGE.size), dtype=np.int64)
    idx = np.repeat(base - out[:-1], lens)
    idx += _ARANGE[:total]
    return idx


def hash_keys(keys: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """(n,) uint64 hash of each string (64-bit, so key indexes need no Python strings).

    Reads each string 8 bytes at a time through an overlapping (stride 1) uint64 view, masks
    the bytes past its end, and mixes words and length splitmix-style; two distinct keys
    collide with probability ~2^-64 per pair. A string's hash depends on that string alone:
    it takes one round per 8 of its own bytes, whatever the longest string beside it.
    """
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks() if keys.num_chunks != 1 else keys.chunk(0)
    n = len(keys)
    offs = np.frombuffer(keys.buffers()[1], np.int32, n + 1, keys.offset * 4).astype(np.int64)
    data_buf = keys.buffers()[2]
    raw = np.zeros((0 if data_buf is None else data_buf.size) + 8, np.uint8)
    if data_buf is not None:
        raw[:data_buf.size] = np.frombuffer(data_buf, np.uint8)
    words = np.ndarray((raw.size - 7,), np.uint64, buffer=raw, strides=(1,))
    start, lens = offs[:-1], offs[1:] - offs[:-1]
    h = lens.astype(np.uint64) * _HASH_MULT
    for j in range(0, int(lens.max(initial=0)), 8):
        left = np.clip(lens - j, 0, 8).astype(np.uint64)
        word = words[np.minimum(start + j, words.size - 1)]
        word &= np.where(left >= 8, np.uint64(0xFFFFFFFFFFFFFFFF),
                         (np.uint64(1) << (left * np.uint64(8))) - np.uint64(1))
        mixed = (h ^ word) * _HASH_MULT
        mixed ^= mixed >> np.uint64(31)
        mixed *= _HASH_MIX
        mixed ^= mixed >> np.uint64(29)
        h = np.where(lens > j, mixed, h)  # strings that ended before byte j are done
    return h


def check_offsets(arr: pa.Array) -> None:
    """Raise if a string/list array's offsets could send a gather outside its buffers.

    Arrow's cheap `validate()` checks buffer sizes, not offset values; a segment damaged in
    place must fail here, at load, and not as a wild read in a later gather.
    """
    t = arr.type
    if not (pt.is_string(t) or pt.is_binary(t) or pt.is_list(t)) or len(arr) == 0:
        return
    offs = np.frombuffer(arr.buffers()[1], np.int32, len(arr) + 1, arr.offset * 4)
    if pt.is_list(t):
        limit = len(arr.values)
    else:
        data = arr.buffers()[2]
        limit = 0 if data is None else data.size
    if offs[0] < 0 or offs[-1] > limit or np.any(offs[1:] < offs[:-1]):
        raise ValueError(f"column of type {t}: offsets out of order or out of bounds")
    if pt.is_list(t):
        check_offsets(arr.values)
__all__ = ["Layout", "hash_keys", "check_offsets"]
