"""Replay store benchmark: append vs bare pyarrow, sampling vs a JSON-lines log, SIGKILL recovery.

    python -m benchmarks.replay --json /tmp/replay.json [--quick] [--dir DIR]

Rows are reflection-sized (64 prompt ids, 32 reflection ids, 32 log-probs, ~130 chars of text),
built column-wise so the generator never dominates the timings.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.ipc as ipc

from retro_dist.core import sampling
from retro_dist.core.records import SCHEMAS
from retro_dist.replay.config import ReplayConfig
from retro_dist.replay.store import ReplayStore
from retro_dist.replay.writer import ReplayWriter

SCHEMA = SCHEMAS["reflections"]
BATCH_ROWS = 8192
# Big segments for a big store: 65536 rows of ~750 B is ~48 MB per sealed file; up to four
# of them may be unacknowledged, so fsyncs overlap the next segments' writes.
WRITE_CFG = ReplayConfig(seal_rows=65536, seal_bytes=64 << 20, max_unacked_rows=4 * 65536)


def _lists(n: int, width: int, values: np.ndarray) -> pa.ListArray:
    offsets = pa.array(np.arange(0, width * (n + 1), width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values))


def make_batches(n_rows: int, worker: int = 0, m: int = BATCH_ROWS) -> list[pa.RecordBatch]:
    """Reflection batches of `m` rows with unique keys; list columns shared between them."""
    rng = np.random.default_rng(worker)
    shared = {
        "run_id": pa.array(["bench"] * m), "worker_id": pa.array(np.full(m, worker)),
        "task_id": pa.array([f"task{i % 100}" for i in range(m)]),
        "env_name": pa.array(["alfworld"] * m), "trial": pa.array(np.zeros(m, np.int64)),
        "prompt_ids": _lists(m, 64, rng.integers(0, 32000, 64 * m).astype(np.int32)),
        "reflection_ids": _lists(m, 32, rng.integers(0, 32000, 32 * m).astype(np.int32)),
        "behaviour_logprobs": _lists(m, 32, -rng.random(32 * m).astype(np.float32)),
        "reflection_text": pa.array(["I should have checked the drawer before the shelf; next "
                                     f"time open drawer {i % 9} first and then look again."
                                     for i in range(m)]),
        "return_before": pa.array(np.zeros(m)), "return_after": pa.array(rng.random(m)),
        "reward": pa.array(rng.choice([-1.0, 0.0, 0.5, 1.0], m)),
        "created_at": pa.array(np.full(m, time.time())),
    }
    out = []
    for start in range(0, n_rows, m):
        n = min(m, n_rows - start)
        eps = pa.array(np.arange(start, start + n, dtype=np.int64))
        cols = {k: v.slice(0, n) for k, v in shared.items()}
        cols["key"] = pc.binary_join_element_wise(f"bench/w{worker}/e", eps.cast(pa.string()),
                                                  "/t0", "")
        cols["episode_id"] = eps
        cols["policy_version"] = pa.array(np.full(n, start * 8 // max(n_rows, 1), np.int64))
        out.append(pa.RecordBatch.from_pydict({f.name: cols[f.name] for f in SCHEMA},
                                              schema=SCHEMA))
    return out


def time_raw(batches, path: str) -> tuple[float, float]:
    """Bare pyarrow: one IPC stream, same batches, same disk, no keys.

    Returns (seconds to write, seconds to write and fsync once at the end). The second is
    the like-for-like baseline: ReplayWriter's rows are on disk when close() returns.
    """
    fs = pafs.LocalFileSystem()
    t0 = time.perf_counter()
    with fs.open_output_stream(path, compression=None) as sink:
        with ipc.new_stream(sink, SCHEMA) as w:
            for b in batches:
                w.write_batch(b)
    written = time.perf_counter() - t0
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return written, time.perf_counter() - t0


def time_append(batches, root: str) -> float:
    """ReplayWriter: key dedup, segments, fsync + rename + catalog on every seal."""
    t0 = time.perf_counter()
    with ReplayWriter(root, "w0", WRITE_CFG) as w:
        for b in batches:
            w.append("reflections", b)
    return time.perf_counter() - t0


def bench_sample(root: str, n_rows: int, iters: int) -> dict:
    cfg = ReplayConfig(sampler="prioritised", priority_key="advantage_abs", min_size_to_sample=1)
    t0 = time.perf_counter()
    store = ReplayStore(root, cfg)
    open_s = time.perf_counter() - t0
    assert store.num_rows("reflections") == n_rows, store.num_rows("reflections")
    rng = np.random.default_rng(0)
    store.sample("reflections", 256, rng=rng)  # first call builds the priority distribution
    first_s = time.perf_counter() - t0 - open_s
    t1 = time.perf_counter()
    for _ in range(iters):
        store.refresh()
        store.sample("reflections", 256, rng=rng)
    dt = time.perf_counter() - t1
    return {"store_open_s": open_s, "first_sample_s": first_s,
            "sample_rows_per_s": 256 * iters / dt}


def bench_naive(batches, path: str, iters: int) -> dict:
    """Baseline: the same rows as a JSON-lines log, json.loads per row, then the same sampler.

    Generous to the baseline: the log is parsed once and the priorities are computed once;
    each sample gathers 256 row dicts and builds the Arrow batch the learner consumes.
    """
    with open(path, "w") as f:
        for b in batches:
            for row in b.to_pylist():
                f.write(json.dumps(row) + "\n")
    t0 = time.perf_counter()
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    load_s = time.perf_counter() - t0
    reward = np.array([r["reward"] for r in rows])
    tasks = np.unique([r["task_id"] for r in rows], return_inverse=True)[1]
    base = np.bincount(tasks, reward) / np.bincount(tasks)
    cdf = np.cumsum(sampling.prioritised_probs(reward - base[tasks], 0.6))
    rng = np.random.default_rng(0)
    t1 = time.perf_counter()
    for _ in range(iters):
        idx = np.searchsorted(cdf, rng.random(256) * cdf[-1], side="right")
        pa.Table.from_pylist([rows[i] for i in idx], schema=SCHEMA)
    dt = time.perf_counter() - t1
    return {"naive_load_rows_per_s": len(rows) / load_s,
            "naive_sample_rows_per_s": 256 * iters / dt}


# ---- SIGKILL recovery -------------------------------------------------------------------------

CRASH_WRITERS, CRASH_BATCH, CRASH_SEAL_EVERY = 3, 500, 2


def crash_child(root: str, worker: int, n_batches: int) -> None:
    """Writer process: seal every CRASH_SEAL_EVERY batches; print `pending N` / `committed N`."""
    cfg = ReplayConfig(seal_rows=10**9, seal_bytes=2**40, seal_seconds=1e9, max_unacked_rows=10**9)
    w = ReplayWriter(root, f"w{worker}", cfg)
    batches = make_batches(n_batches * CRASH_BATCH, worker, CRASH_BATCH)
    for i, b in enumerate(batches):
        w.append("reflections", b)
        if (i + 1) % CRASH_SEAL_EVERY == 0:
            print(f"pending {w.committed_rows + w.unacked_rows}", flush=True)
            w.seal()
            print(f"committed {w.committed_rows}", flush=True)
    w.close()


def _child_report(path: str) -> tuple[int, int]:
    """(acknowledged rows, rows of a seal that started but was not acknowledged)."""
    committed, pending = 0, 0
    with open(path) as f:
        for line in f:
            tag, _, n = line.strip().partition(" ")
            if tag == "committed":
                committed, pending = int(n), 0
            elif tag == "pending":
                pending = int(n) - committed
    return committed, pending


def _spawn(root: str, worker: int, n_batches: int, out_path: str) -> subprocess.Popen:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(out_path, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "benchmarks.replay", "--crash-child",
                                 root, str(worker), str(n_batches)], stdout=out, cwd=repo)


def bench_crash(workdir: str, n_batches: int, seed: int = 0) -> dict:
    root, rng = os.path.join(workdir, "crash"), np.random.default_rng(seed)
    outs = [os.path.join(workdir, f"crash{i}.out") for i in range(CRASH_WRITERS)]
    procs = [_spawn(root, i, n_batches, outs[i]) for i in range(CRASH_WRITERS)]
    seal_rows = CRASH_SEAL_EVERY * CRASH_BATCH
    # kill each after a random number of its commits, plus a random few ms into the next
    targets = rng.integers(1, n_batches // CRASH_SEAL_EVERY, CRASH_WRITERS) * seal_rows
    alive = set(range(CRASH_WRITERS))
    while alive:
        for i in list(alive):
            if procs[i].poll() is None and _child_report(outs[i])[0] < targets[i]:
                continue
            time.sleep(rng.uniform(0.0, 0.01))
            procs[i].send_signal(signal.SIGKILL)
            procs[i].wait()
            alive.discard(i)
        time.sleep(0.002)
    reports = [_child_report(o) for o in outs]
    store = ReplayStore(root, ReplayConfig())
    per_writer = pc.value_counts(store.read("reflections")["worker_id"]).to_pylist()
    recovered = {d["values"]: d["counts"] for d in per_writer}
    # Acked rows must all be there; beyond them only the one seal that was in flight.
    bad = sum(not (c <= recovered.get(i, 0) <= c + p) for i, (c, p) in enumerate(reports))
    result = {"crash_committed_rows": sum(c for c, _ in reports),
              "crash_recovered_rows": sum(recovered.values()),
              "crash_in_flight_seal_rows": sum(p for _, p in reports),
              "crash_writers_out_of_bounds": bad,
              "crash_duplicates": store.metrics()["replay/duplicates_dropped"]}
    procs = [_spawn(root, i, n_batches, outs[i]) for i in range(CRASH_WRITERS)]  # resend all
    for p in procs:
        p.wait()
    store = ReplayStore(root, ReplayConfig())
    result["crash_resend_rows"] = store.num_rows("reflections")
    result["crash_resend_expected_rows"] = CRASH_WRITERS * n_batches * CRASH_BATCH
    result["crash_resend_duplicates"] = store.metrics()["replay/duplicates_dropped"]
    return result


# ---- driver ------------------------------------------------------------------------------------

def run(workdir: str, quick: bool) -> dict:
    n_rows = 100_000 if quick else 1_000_000
    batches = make_batches(n_rows)
    row_bytes = sum(b.nbytes for b in batches) / n_rows
    raw_s, app_s = [], []
    for rnd in range(4 if quick else 6):  # the disk is shared: pair runs, alternate the order
        for which in ((0, 1) if rnd % 2 == 0 else (1, 0)):
            if which == 0:
                os.sync()  # start each run with no dirty pages from the previous one
                raw_s.append(time_raw(batches, os.path.join(workdir, "raw.arrows")))
                os.remove(os.path.join(workdir, "raw.arrows"))
            else:
                shutil.rmtree(os.path.join(workdir, "store"), ignore_errors=True)
                os.sync()
                app_s.append(time_append(batches, os.path.join(workdir, "store")))
    raw_w, raw_d = np.array([w for w, _ in raw_s]), np.array([d for _, d in raw_s])
    app = np.array(app_s)
    res = {"rows": n_rows, "row_bytes": round(row_bytes, 1),
           "append_rows_per_s": n_rows / app.min(),
           "raw_pyarrow_rows_per_s": n_rows / raw_d.min(),
           "raw_pyarrow_nofsync_rows_per_s": n_rows / raw_w.min(),
           # median over rounds of the paired ratio: robust to a neighbour's I/O bursts
           "append_vs_raw_ratio": float(np.median(raw_d / app)),
           "append_vs_raw_nofsync_ratio": float(np.median(raw_w / app)),
           "append_vs_raw_ratio_best": float(raw_d.min() / app.min()),
           "append_vs_raw_nofsync_ratio_best": float(raw_w.min() / app.min())}
    res.update(bench_sample(os.path.join(workdir, "store"), n_rows, 200 if quick else 500))
    naive_rows = 20_000 if quick else 100_000
    res["naive_rows"] = naive_rows
    res.update(bench_naive(make_batches(naive_rows), os.path.join(workdir, "log.jsonl"),
                           200 if quick else 500))
    res.update(bench_crash(workdir, 20 if quick else 40))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here as one JSON object")
    ap.add_argument("--quick", action="store_true", help="100k-row store instead of 1M")
    ap.add_argument("--dir", help="scratch directory (default: a temp dir, removed after)")
    ap.add_argument("--crash-child", nargs=3, metavar=("ROOT", "WORKER", "N_BATCHES"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.crash_child:
        root, worker, n = args.crash_child
        crash_child(root, int(worker), int(n))
        return 0
    workdir = args.dir or tempfile.mkdtemp(prefix="replay-bench-")
    try:
        res = run(workdir, args.quick)
    finally:
        if not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)
    for k, v in res.items():
        print(f"{k:28s} {v:,.3f}" if isinstance(v, float) else f"{k:28s} {v:,}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
