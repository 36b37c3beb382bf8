"""The arena's slot placement and the view's key dedup (pure numpy, no store)."""
import numpy as np

from retro_dist.replay.arena import PAGE, PMD_SIZE, Arena
from retro_dist.replay.view import _first_occurrences


def test_big_slots_start_on_a_huge_page_small_ones_pack(tmp_path):
    big, small = tmp_path / "big", tmp_path / "small"
    big.write_bytes(bytes(range(256)) * (PMD_SIZE // 256 + 3))  # just over one huge page
    small.write_bytes(b"x" * 100)
    arena = Arena(1 << 32)
    first = arena.map_file(str(small))
    second = arena.map_file(str(big))
    third = arena.map_file(str(small))
    assert second.address % PMD_SIZE == 0  # the kernel may map it with huge-page entries
    assert second.offset > first.offset + first.length - PMD_SIZE  # skipped less than one
    assert third.offset == second.offset + second.length  # small files are packed, page-aligned
    assert third.address % PAGE == 0
    got = np.frombuffer(second.buffer(), np.uint8)
    assert got.tobytes() == big.read_bytes()
    assert arena.spans == {s.offset: s.size for s in (first, second, third)}
    offset = second.offset
    del got, second
    assert offset not in arena.spans  # unmapped with its last buffer; the gap was never mapped


def test_a_reader_on_a_page_budget_packs_every_slot(tmp_path):
    big = tmp_path / "big"
    big.write_bytes(b"y" * (PMD_SIZE + 5))
    arena = Arena(1 << 32, huge_pages=False)
    first = arena.map_file(str(big))
    second = arena.map_file(str(big))
    assert second.offset == first.offset + first.length
    assert bytes(second.buffer()) == big.read_bytes()


def test_first_occurrences_matches_np_unique():
    rng = np.random.default_rng(0)
    for n, distinct in ((1, 1), (1000, 10**9), (5000, 300)):
        flat = rng.integers(0, distinct, n).astype(np.uint64)
        keep, fresh = _first_occurrences(flat)
        want = np.zeros(n, bool)
        want[np.unique(flat, return_index=True)[1]] = True
        assert (keep == want).all()
        assert (fresh == np.unique(flat)).all()
