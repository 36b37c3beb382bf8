"""An audit of a replay store after a run: what was committed, what reads back, what is stored twice.

Reads every writer's catalog and every segment it names, straight from the files (not through the
reader, which drops repeated keys on the way in), so a key written twice shows up here. Used by
the fault tests and the chaos benchmark; a user can run it on any run folder.
"""
from __future__ import annotations

import collections

from retro_dist.replay.catalog import StoreLocation, load_catalog, read_segment


def writer_ids(loc: StoreLocation) -> list[str]:
    return sorted(info.base_name[:-len(".json")] for info in loc.list("catalog")
                  if info.base_name.endswith(".json"))


def audit(root_uri: str, tables: tuple[str, ...] = ("trials", "reflections")) -> dict:
    """{rows_committed, rows_readable, duplicates, unreadable_segments, evicted_segments} over `tables`.

    rows_committed: rows the catalogs say are sealed; rows_readable: rows of those segments that
    read back and pass their checks; duplicates: readable rows whose key another row already has.
    """
    loc = StoreLocation(root_uri)
    out = collections.Counter()
    keys: dict[str, collections.Counter] = {t: collections.Counter() for t in tables}
    for writer in writer_ids(loc) if loc.exists("catalog") else []:
        for entry in load_catalog(loc, writer).segments:
            if entry.table not in tables:
                continue
            if loc.exists(f"evicted/{entry.table}/{entry.name}"):
                out["evicted_segments"] += 1  # retention removed it on purpose
                continue
            out["rows_committed"] += entry.rows
            try:
                data = read_segment(loc, entry.rel_path, entry.table, entry.rows)
            except Exception:  # noqa: BLE001 — any damage counts as unreadable
                out["unreadable_segments"] += 1
                continue
            out["rows_readable"] += data.num_rows
            keys[entry.table].update(data.column("key").to_pylist())
    out["duplicates"] = sum(n - 1 for c in keys.values() for n in c.values() if n > 1)
    return {k: int(out[k]) for k in ("rows_committed", "rows_readable", "duplicates",
                                     "unreadable_segments", "evicted_segments")}


def committed_rows(root_uri: str) -> int:
    """Rows every writer's catalog says are sealed (catalog files only: cheap to poll)."""
    loc = StoreLocation(root_uri)
    if not loc.exists("catalog"):
        return 0
    return sum(e.rows for w in writer_ids(loc) for e in load_catalog(loc, w).segments)
