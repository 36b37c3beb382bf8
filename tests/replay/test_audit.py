"""The replay audit counts what the catalogs commit, what reads back, and keys stored twice."""
from retro_dist.core.records import to_batch
from retro_dist.replay.audit import audit, committed_rows
from retro_dist.replay.config import ReplayConfig
from retro_dist.replay.writer import ReplayWriter
from tests.replay.test_reader import trial


def test_audit_finds_a_key_written_by_two_writers(tmp_path):
    root = str(tmp_path / "replay")
    assert audit(root)["rows_committed"] == 0 and committed_rows(root) == 0
    with ReplayWriter(root, "a", ReplayConfig()) as w:
        w.append("trials", to_batch([trial(0), trial(1)]))
        w.append("trials", to_batch([trial(1)]))  # the same writer drops a key it holds
    with ReplayWriter(root, "b", ReplayConfig()) as w:  # another writer id has its own key set
        w.append("trials", to_batch([trial(1), trial(2)]))
    out = audit(root)
    assert out["rows_committed"] == out["rows_readable"] == committed_rows(root) == 4
    assert out["duplicates"] == 1 and out["unreadable_segments"] == 0


def test_audit_counts_a_damaged_segment_as_unreadable(tmp_path):
    root = tmp_path / "replay"
    with ReplayWriter(str(root), "a", ReplayConfig()) as w:
        w.append("trials", to_batch([trial(0), trial(1)]))
    (seg,) = (root / "segments" / "trials").iterdir()
    seg.write_bytes(seg.read_bytes()[:40])
    out = audit(str(root))
    assert out["rows_committed"] == 2 and out["rows_readable"] == 0 and out["unreadable_segments"] == 1
