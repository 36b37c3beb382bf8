"""What 2 MB page-cache folios cost this machine's writers: the choice behind `replay.huge_page_writes`.

    python -m benchmarks.page_folios --json /tmp/page_folios.json [--mb 768] [--rounds 4] [--idle 6]

The replay writer (huge_page_writes: true) hands the disk whole 2 MB pieces at 2 MB offsets, so
the page cache holds a segment in 2 MB folios and a reader maps it with one fault per 2 MB. A
bare Arrow writer's few dozen unaligned writes per batch land in small folios. This script
writes the same bytes both ways (files of 48 MB, `--mb` in all per run) and reports the system
CPU seconds each way, in two conditions, each way in turn, `--rounds` times:

- reuse: the second of two runs back to back, so its folios reuse the memory that the first
  run's files (same way) freed a moment before;
- idle: a third run, after `--idle` seconds with that memory free;
- growing: after the rounds above, runs whose files all stay (the two ways alternate), so the
  page cache grows into memory no earlier run freed, as a run's writer does (a store only grows).

On a bare-metal host both ways cost about the same in both conditions. On a VM whose host takes
back free guest memory (virtio-balloon free page reporting, or a hypervisor's free-page bitmap),
a 2 MB allocation from memory that was not just freed in 2 MB blocks gets memory the host
reclaimed and must fault back in, and the 2 MB way costs several times the small one; small
allocations are served from recently freed pages. A running replay writer keeps allocating
memory that was not just freed: its case is `idle`.
Where `huge_vs_small_sys_idle` is large, `replay.huge_page_writes: false` makes appends cheaper
and readers slower (benchmarks/replay.py measures both). After each run one file is mapped and
read, and the MB mapped with 2 MB entries (FilePmdMapped) says which folios the writes made.
"""
from __future__ import annotations

import argparse
import mmap
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

from benchmarks import write_json

FILE_BYTES = 48 << 20
PIECE = 2 << 20
CONDITIONS = ("reuse", "idle", "growing")
REPORTED = "/sys/module/page_reporting/parameters/reported_kib"


def _arrow_like_pieces(seed: int = 1) -> list[int]:
    """Piece lengths like an Arrow IPC writer's: framing of a few bytes to buffers of MBs."""
    rng = np.random.default_rng(seed)
    return [int(x) for x in rng.integers(100, 3 << 20, FILE_BYTES // (1 << 20))]


def write_file(path: str, data: memoryview, pieces) -> None:
    """Write `data` to a fresh file in `pieces` (lengths; None: whole 2 MB pieces)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        i = 0
        for n in pieces if pieces is not None else [PIECE] * (len(data) // PIECE):
            if i >= len(data):
                break
            i += os.write(fd, data[i:i + n])
        while i < len(data):
            i += os.write(fd, data[i:])
    finally:
        os.close(fd)


def pmd_mapped_mb(path: str) -> float:
    """Map `path`, read a byte of every page, return the MB this process maps with 2 MB entries."""
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    try:
        np.frombuffer(m, np.uint8)[::mmap.PAGESIZE].sum()
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("FilePmdMapped:"):
                    return int(line.split()[1]) / 1024
        return 0.0
    finally:
        m.close()


def _reported_kib() -> int | None:
    try:
        with open(REPORTED) as f:
            return int(f.read())
    except OSError:
        return None


def one_run(workdir: str, data: memoryview, pieces, n_files: int, keep: str = "") -> dict:
    """Write `n_files` files; remove them after unless `keep` (a name prefix that keeps them)."""
    os.sync()
    r0, t0, w0 = _reported_kib(), os.times(), time.perf_counter()
    paths = [os.path.join(workdir, f"{keep or 'f'}{k}") for k in range(n_files)]
    for p in paths:
        write_file(p, data, pieces)
    t1, w1, r1 = os.times(), time.perf_counter(), _reported_kib()
    res = {"sys_s": t1.system - t0.system, "wall_s": w1 - w0, "pmd_mapped_mb": pmd_mapped_mb(paths[0]),
           "reported_mb": None if r0 is None else (r1 - r0) / 1024}
    for p in paths if not keep else []:
        os.remove(p)
    return res


def run(workdir: str, total_mb: int, rounds: int, idle_s: float) -> dict:
    data = memoryview(np.random.default_rng(0).integers(0, 255, FILE_BYTES, np.uint8).tobytes())
    n_files = max(1, (total_mb << 20) // FILE_BYTES)
    ways = {"huge": None, "small": _arrow_like_pieces()}
    runs = {f"{way}_{cond}": [] for way in ways for cond in CONDITIONS}
    for rnd in range(rounds):
        for way in list(ways) if rnd % 2 == 0 else list(ways)[::-1]:
            one_run(workdir, data, ways[way], n_files)  # frees memory in this way's blocks
            runs[f"{way}_reuse"].append(one_run(workdir, data, ways[way], n_files))
            time.sleep(idle_s)
            runs[f"{way}_idle"].append(one_run(workdir, data, ways[way], n_files))
    for rnd in range(rounds):
        for way in list(ways) if rnd % 2 == 0 else list(ways)[::-1]:
            runs[f"{way}_growing"].append(one_run(workdir, data, ways[way], n_files, f"kept-{way}-{rnd}-"))
    res = {"mb_per_run": n_files * FILE_BYTES >> 20, "rounds": rounds, "idle_s": idle_s,
           "kernel": platform.release(), "free_page_reporting": _reported_kib() is not None}
    for name, rs in runs.items():
        res[f"{name}_sys_s"] = float(np.median([r["sys_s"] for r in rs]))
        res[f"{name}_wall_s"] = float(np.median([r["wall_s"] for r in rs]))
        res[f"{name}_pmd_mapped_mb"] = float(np.median([r["pmd_mapped_mb"] for r in rs]))
        res[f"{name}_sys_s_runs"] = [round(r["sys_s"], 3) for r in rs]
        if rs[0]["reported_mb"] is not None:
            res[f"{name}_reported_mb"] = float(np.median([r["reported_mb"] for r in rs]))
    for cond in CONDITIONS:
        res[f"huge_vs_small_sys_{cond}"] = res[f"huge_{cond}_sys_s"] / max(res[f"small_{cond}_sys_s"], 1e-3)
        res[f"huge_vs_small_wall_{cond}"] = res[f"huge_{cond}_wall_s"] / res[f"small_{cond}_wall_s"]
    return res


def table(res: dict) -> str:
    out = [f"{res['mb_per_run']} MB per run, median of {res['rounds']} runs "
           f"(idle: {res['idle_s']:.0f} s before each run)",
           "| writes | condition | system CPU s | wall s | 2 MB-mapped MB of a 48 MB file |",
           "|---|---|---|---|---|"]
    for cond in CONDITIONS:
        for way, label in (("huge", "whole 2 MB pieces"), ("small", "Arrow-like pieces")):
            k = f"{way}_{cond}"
            out.append(f"| {label} | {cond} | {res[k + '_sys_s']:.2f} | {res[k + '_wall_s']:.2f} | "
                       f"{res[k + '_pmd_mapped_mb']:.0f} |")
    out.append("2 MB pieces ÷ small, system CPU: " + ", ".join(
        f"{cond} {res[f'huge_vs_small_sys_{cond}']:.2f}x" for cond in CONDITIONS))
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here as one JSON object")
    ap.add_argument("--mb", type=int, default=768, help="MB written per run (48 MB files)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--idle", type=float, default=6.0, help="seconds idle before an idle run")
    ap.add_argument("--dir", help="scratch directory on the disk to test (default: a temp dir)")
    args = ap.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="page-folios-", dir=args.dir)
    try:
        res = run(workdir, args.mb, args.rounds, args.idle)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(table(res))
    if args.json:
        write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
