"""Operator tools for a replay store: `retro-dist replay stats PATH` and `... export PATH`.

Both open the store read-only in effect: a default ReplayConfig has no retention, so nothing is
evicted; a damaged segment is still quarantined (with its warning), as any reader would.
"""
from __future__ import annotations

import argparse
import os

import pyarrow.parquet as pq

from retro_dist.replay.config import ReplayConfig
from retro_dist.replay.store import ReplayStore


def stats_text(root_uri: str) -> str:
    """Human-readable summary of the store at `root_uri`."""
    st = ReplayStore(root_uri, ReplayConfig()).stats()
    lines = [f"replay store {st['root']}",
             f"  rows {st['rows']}  segments {st['segments']}  bytes {st['bytes']:,}  "
             f"quarantined {st['quarantined']}  evicted {st['evicted_segments']}  "
             f"missing {st['missing_segments']}"]
    for name, t in st["tables"].items():
        lines.append(f"  table {name}: rows {t['rows']}  segments {t['segments']}  "
                     f"bytes {t['bytes']:,}  duplicates dropped {t['duplicates_dropped']}")
        versions = sorted(t["rows_per_policy_version"].items())
        if versions:
            lines.append("    rows per policy_version: "
                         + ", ".join(f"v{v}={n}" for v, n in versions))
        tasks = sorted(t["rows_per_task"].items(), key=lambda kv: -kv[1])
        if tasks:
            shown = ", ".join(f"{k}={n}" for k, n in tasks[:10])
            more = f" (+{len(tasks) - 10} more tasks)" if len(tasks) > 10 else ""
            lines.append(f"    rows per task: {shown}{more}")
    return "\n".join(lines)


def export(root_uri: str, out_path: str, fmt: str = "parquet") -> list[str]:
    """Write each table's rows (one per key) to `<out_path>/<table>.parquet`. Returns the paths."""
    if fmt != "parquet":
        raise ValueError(f"replay export: unsupported format {fmt!r} (only 'parquet')")
    store = ReplayStore(root_uri, ReplayConfig())
    os.makedirs(out_path, exist_ok=True)
    written = []
    for table in sorted(store.stats()["tables"]):
        path = os.path.join(out_path, f"{table}.parquet")
        pq.write_table(store.read(table), path)
        written.append(path)
    return written


def _cmd_stats(args: argparse.Namespace) -> int:
    print(stats_text(args.path))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    for path in export(args.path, args.output, args.format):
        print(path)
    return 0


def add_subcommands(subparsers) -> argparse.ArgumentParser:
    """Register `replay stats PATH` and `replay export PATH --format parquet --output DIR`.

    subparsers: the object returned by `parser.add_subparsers()`. Each leaf sets `func`
    (args -> exit code) via set_defaults, for the caller to dispatch.
    """
    replay = subparsers.add_parser("replay", help="inspect or export a replay store")
    sub = replay.add_subparsers(dest="replay_command", required=True)
    stats = sub.add_parser("stats", help="rows, segments, versions and tasks in a store")
    stats.add_argument("path", help="store root (local path or pyarrow filesystem URI)")
    stats.set_defaults(func=_cmd_stats)
    exp = sub.add_parser("export", help="write one file per table")
    exp.add_argument("path", help="store root (local path or pyarrow filesystem URI)")
    exp.add_argument("--format", default="parquet", choices=["parquet"])
    exp.add_argument("--output", required=True, help="directory for <table>.parquet files")
    exp.set_defaults(func=_cmd_export)
    return replay


__all__ = ["stats_text", "export", "add_subcommands"]
