"""Replay store benchmark: append vs bare pyarrow, the reader at scale vs TorchRL, SIGKILL recovery.

    python -m benchmarks.replay --json /tmp/replay.json [--rows 10000000] [--quick] [--dir DIR]
                                [--sample-only]

Rows are reflection-sized (64 prompt ids, 32 reflection ids, 32 log-probs, ~130 chars of text,
~747 B), built column-wise so the generator never dominates the timings. As in a run, run_id,
worker_id and env_name (one game) hold one value per segment, and policy_version rises slowly
(one value in most segments); trial, task_id, keys and the rest vary from row to row. The big store
(`--rows`, written once) is sampled by child processes, so its peak RSS (VmHWM, file pages
included) is the reader's alone. TorchRL's LazyMemmapStorage + RandomSampler is filled with
rows of the same size by one child and reopened from disk by another, which samples at the
same batch size. Both sides are measured alike: a fresh process, the storage's files read once
just before (page cache warm), then `cold` (the first 50 batches), `steady` (the next ITERS)
and `mapped` (ITERS more after every page of the storage was faulted in). TorchRL is a
benchmark-only dependency: `pip install --no-deps torchrl tensordict pyvers` (no-deps keeps
the pinned torch).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
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

from benchmarks import write_json
from retro_dist.core import sampling
from retro_dist.core.records import SCHEMAS
from retro_dist.replay.config import ReplayConfig
from retro_dist.replay.store import ReplayStore
from retro_dist.replay.writer import ReplayWriter

SCHEMA = SCHEMAS["reflections"]
BATCH_ROWS = 8192
ROUNDS = 3  # sampling rounds per side, alternating
# Big segments for a big store: 65536 rows of ~750 B is ~48 MB per sealed file; up to four
# of them may be unacknowledged, so fsyncs overlap the next segments' writes.
WRITE_CFG = ReplayConfig(seal_rows=65536, seal_bytes=64 << 20, max_unacked_rows=4 * 65536)


def _lists(n: int, width: int, values: np.ndarray) -> pa.ListArray:
    offsets = pa.array(np.arange(0, width * (n + 1), width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values))


def make_batches(n_rows: int, worker: int = 0, m: int = BATCH_ROWS) -> list[pa.RecordBatch]:
    """Reflection batches of `m` rows with unique keys; list columns shared between them."""
    return list(iter_batches(n_rows, worker, m))


def iter_batches(n_rows: int, worker: int = 0, m: int = BATCH_ROWS, versions: int = 8):
    """make_batches, one batch at a time (a 10M-row store never sits in memory).

    policy_version rises from 0 to versions-1 in write order, as in a training run."""
    rng = np.random.default_rng(worker)
    shared = {
        "run_id": pa.array(["bench"] * m), "worker_id": pa.array(np.full(m, worker)),
        "task_id": pa.array([f"task{i % 100}" for i in range(m)]),
        "env_name": pa.array(["alfworld"] * m), "trial": pa.array(rng.integers(0, 2, m)),
        "prompt_ids": _lists(m, 64, rng.integers(0, 32000, 64 * m).astype(np.int32)),
        "reflection_ids": _lists(m, 32, rng.integers(0, 32000, 32 * m).astype(np.int32)),
        "behaviour_logprobs": _lists(m, 32, -rng.random(32 * m).astype(np.float32)),
        "reflection_text": pa.array(["I should have checked the drawer before the shelf; next "
                                     f"time open drawer {i % 9} first and then look again."
                                     for i in range(m)]),
        "return_before": pa.array(np.zeros(m)), "return_after": pa.array(rng.random(m)),
        "reward": pa.array(rng.choice([-1.0, 0.0, 0.5, 1.0], m)),
        "created_at": pa.array(time.time() + np.arange(m) * 1e-3),
    }
    for start in range(0, n_rows, m):
        n = min(m, n_rows - start)
        eps = pa.array(np.arange(start, start + n, dtype=np.int64))
        cols = {k: v.slice(0, n) for k, v in shared.items()}
        cols["key"] = pc.binary_join_element_wise(f"bench/w{worker}/e", eps.cast(pa.string()),
                                                  "/t0", "")
        cols["episode_id"] = eps
        cols["policy_version"] = pa.array(np.full(n, start * versions // max(n_rows, 1), np.int64))
        yield pa.RecordBatch.from_pydict({f.name: cols[f.name] for f in SCHEMA}, schema=SCHEMA)


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


def time_append(batches, root: str, cfg: ReplayConfig = WRITE_CFG) -> float:
    """ReplayWriter: key dedup, segments, fsync + rename + catalog on every seal."""
    t0 = time.perf_counter()
    with ReplayWriter(root, "w0", cfg) as w:
        for b in batches:
            w.append("reflections", b)
    return time.perf_counter() - t0


def build_store(root: str, n_rows: int) -> dict:
    """Write the big store once through ReplayWriter (batches generated on the fly)."""
    t0 = time.perf_counter()
    with ReplayWriter(root, "w0", WRITE_CFG) as w:
        for b in iter_batches(n_rows, versions=100):
            w.append("reflections", b)
    dt = time.perf_counter() - t0
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
    return {"store_rows": n_rows, "store_gb": size / 1e9, "store_write_rows_per_s": n_rows / dt}


def _proc_status(field: str, path: str = "/proc/self/status") -> float:
    with open(path) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024 / 1024  # kB -> GiB
    return float("nan")


def _rate(fn, iters: int, batch: int = 256) -> float:
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return batch * iters / (time.perf_counter() - t0)


CAPPED_RESIDENT_BYTES = 256 << 20
COLD_BATCHES = 50  # "cold": the first batches a fresh process draws after opening its storage


def _touch(u8) -> None:
    """Read one byte of every page of a mapping (puts every page of it in this process)."""
    int(u8[::PAGE_BYTES].sum())


PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def _sampling_phases(sample, iters: int, touch_all) -> dict:
    """Rates of one side in one fresh process: cold, then steady, then with every page mapped.

    cold: the first COLD_BATCHES batches after open (the page cache holds the files, this
    process has mapped none of their pages: each row faults its pages in). steady: the next
    `iters` batches (still faulting: 10M uniform draws touch new pages for a long time).
    mapped: after touch_all() has faulted in every page of the storage (as a process that
    wrote the data itself, or has sampled it for hours, has them), `iters` batches.
    touch_all None: skipped (the capped reader drops its pages on purpose).
    """
    res = {}
    for phase, n in (("cold", COLD_BATCHES), ("steady", iters), ("mapped", iters)):
        if phase == "mapped":
            if touch_all is None:
                break
            t0 = time.perf_counter()
            touch_all()
            res["touch_all_s"] = time.perf_counter() - t0
        faults = _minor_faults()
        res[f"{phase}_rows_per_s"] = _rate(sample, n)
        res[f"{phase}_faults_per_batch"] = (_minor_faults() - faults) / n
    res["rss_peak_uniform_gb"] = _proc_status("VmHWM")
    res["file_pmd_mapped_gb"] = _file_pmd_mapped_gb()
    return res


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _file_pmd_mapped_gb() -> float:
    """File pages this process maps with 2 MB (PMD) entries (one fault and TLB entry per 2 MB)."""
    return _proc_status("FilePmdMapped", "/proc/self/smaps_rollup")


def reader_child(root: str, n_rows: int, iters: int, resident_bytes=None) -> dict:
    """Runs in its own process: open the store, sample uniform then prioritised, read fresh rows.

    resident_bytes: the reader's page budget (ReplayConfig.resident_bytes); None lets the
    kernel keep every page it maps, as TorchRL's memmap does.
    """
    cfg = ReplayConfig(sampler="uniform", priority_key="advantage_abs", min_size_to_sample=1,
                       resident_bytes=resident_bytes)
    t0 = time.perf_counter()
    store = ReplayStore(root, cfg)
    assert store.num_rows("reflections") == n_rows, store.num_rows("reflections")
    res = {"store_open_s": time.perf_counter() - t0, "rss_after_open_gb": _proc_status("VmRSS"),
           "rss_peak_open_gb": _proc_status("VmHWM")}
    rng = np.random.default_rng(0)
    arena = store._arena
    touch = None if resident_bytes is not None else (lambda: [
        _touch(arena.u8[off:off + size]) for off, size in list(arena.spans.items())])
    res.update({f"uniform_{k}": v for k, v in _sampling_phases(
        lambda: store.sample("reflections", 256, rng=rng), iters, touch).items()})
    res["uniform_rows_per_s"] = res.get("uniform_mapped_rows_per_s",
                                        res["uniform_steady_rows_per_s"])
    store.cfg = ReplayConfig(**{**cfg.__dict__, "sampler": "prioritised"})
    t1 = time.perf_counter()
    store.sample("reflections", 256, rng=rng)
    res["prioritised_first_sample_s"] = time.perf_counter() - t1
    # same page state as uniform_rows_per_s (mapped, or capped), so the ratio compares samplers
    res["prioritised_rows_per_s"] = _rate(lambda: store.sample("reflections", 256, rng=rng), iters)
    newest = max(e.max_version for e in store._views["reflections"].entries)
    t2 = time.perf_counter()
    fresh = store.read("reflections", min_policy_version=newest)  # the newest version's rows
    res["fresh_read_s"] = time.perf_counter() - t2
    res["fresh_read_rows"] = fresh.num_rows
    res["fresh_segments_skipped"] = store._views["reflections"].segments_skipped
    res["staleness_dropped_rows"] = store.rows_below_version("reflections", newest)
    res["rss_peak_gb"] = _proc_status("VmHWM")
    return res


def _torchrl_chunk(m: int):
    """65536 rows of the same shape and size as ours, as one TensorDict.

    Text and string ids become fixed-width uint8 / int64 columns (TorchRL stores tensors);
    the row is ~760 B, as ours."""
    import torch
    from tensordict import TensorDict

    g = torch.Generator().manual_seed(0)
    return TensorDict({
        "prompt_ids": torch.randint(0, 32000, (m, 64), dtype=torch.int32, generator=g),
        "reflection_ids": torch.randint(0, 32000, (m, 32), dtype=torch.int32, generator=g),
        "behaviour_logprobs": -torch.rand(m, 32, generator=g),
        "reflection_text": torch.randint(32, 127, (m, 130), dtype=torch.uint8, generator=g),
        "key": torch.randint(32, 127, (m, 32), dtype=torch.uint8, generator=g),
        **{k: torch.zeros(m, dtype=torch.int64) for k in
           ("run_id", "worker_id", "episode_id", "task_id", "env_name", "trial", "policy_version")},
        **{k: torch.rand(m, dtype=torch.float64, generator=g) for k in
           ("return_before", "return_after", "reward", "created_at")},
    }, batch_size=[m])


def torchrl_fill_child(scratch: str, n_rows: int, _iters: int) -> dict:
    """Writes TorchRL's LazyMemmapStorage to `scratch` (then dumps its metadata), in 65536-row
    chunks of one template; the sampling side reopens it in another process."""
    from pathlib import Path

    from torchrl.data import LazyMemmapStorage, ReplayBuffer
    from torchrl.data.replay_buffers.samplers import RandomSampler

    m = 65536
    chunk = _torchrl_chunk(m)
    storage = LazyMemmapStorage(n_rows, scratch_dir=scratch)
    rb = ReplayBuffer(storage=storage, sampler=RandomSampler(), batch_size=256)
    t0 = time.perf_counter()
    for start in range(0, n_rows, m):
        rb.extend(chunk[: min(m, n_rows - start)])
    storage.dumps(Path(scratch))
    return {"torchrl_row_bytes": sum(v.element_size() * v[0].numel() for v in chunk.values()),
            "torchrl_fill_s": time.perf_counter() - t0}


def torchrl_child(scratch: str, n_rows: int, iters: int) -> dict:
    """TorchRL LazyMemmapStorage + RandomSampler, reopened from disk in a fresh process."""
    from pathlib import Path

    import torch
    from torchrl.data import LazyMemmapStorage, ReplayBuffer
    from torchrl.data.replay_buffers.samplers import RandomSampler

    # One thread, as our reader: on this shared 2-core machine torch's two OpenMP threads made
    # TorchRL's sampling 20x slower whenever another process was busy.
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    storage = LazyMemmapStorage(n_rows, scratch_dir=scratch, existsok=True)
    storage.loads(Path(scratch))
    rb = ReplayBuffer(storage=storage, sampler=RandomSampler(), batch_size=256)
    assert len(rb) == n_rows and storage._storage["prompt_ids"].filename
    res = {"torchrl_open_s": time.perf_counter() - t0, "torchrl_threads": torch.get_num_threads()}
    torch.manual_seed(0)

    def touch_all():
        for t in storage._storage.values():
            _touch(t.reshape(-1).view(torch.uint8).numpy())

    res.update({f"torchrl_uniform_{k}": v for k, v in
                _sampling_phases(rb.sample, iters, touch_all).items()})
    res["torchrl_rss_peak_gb"] = _proc_status("VmHWM")
    return res


def reader_capped_child(root: str, n_rows: int, iters: int) -> dict:
    return reader_child(root, n_rows, iters, CAPPED_RESIDENT_BYTES)


def _warm_page_cache(path: str) -> float:
    """Read every file under `path` once, so both sides start with their files in the page
    cache (the state right after a run wrote them); returns the seconds it took."""
    t0 = time.perf_counter()
    for d, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(d, name), "rb", buffering=0) as f:
                while f.read(16 << 20):
                    pass
    return time.perf_counter() - t0


def _child(kind: str, path: str, n_rows: int, iters: int) -> dict:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "benchmarks.replay", f"--{kind}-child", path,
                          str(n_rows), str(iters)], cwd=repo, check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


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

def bench_append(workdir: str, n_rows: int, rounds: int) -> dict:
    """ReplayWriter vs bare pyarrow on the same batches, paired runs in rotating order.

    The writer runs twice a round: as configured by default (segments written in whole 2 MB
    pieces, `replay.huge_page_writes`) and with Arrow's own writes, as the bare writer does.
    """
    batches = make_batches(n_rows)
    small = ReplayConfig(**{**WRITE_CFG.__dict__, "huge_page_writes": False})
    times = {"raw": [], "append": [], "small": []}
    for rnd in range(rounds):  # the disk is shared: rotate the order, start each run clean
        order = ["raw", "append", "small"]
        for which in order[rnd % 3:] + order[:rnd % 3]:
            os.sync()  # no dirty pages from the previous run
            if which == "raw":
                times["raw"].append(time_raw(batches, os.path.join(workdir, "raw.arrows")))
                os.remove(os.path.join(workdir, "raw.arrows"))
                continue
            root = os.path.join(workdir, "store")
            shutil.rmtree(root, ignore_errors=True)
            os.sync()
            times[which].append(time_append(batches, root, WRITE_CFG if which == "append" else small))
            shutil.rmtree(root, ignore_errors=True)
    raw_w, raw_d = np.array([w for w, _ in times["raw"]]), np.array([d for _, d in times["raw"]])
    app, small_app = np.array(times["append"]), np.array(times["small"])
    return {"append_rows": n_rows, "row_bytes": round(sum(b.nbytes for b in batches) / n_rows, 1),
            "append_rows_per_s": n_rows / app.min(),
            "append_small_folios_rows_per_s": n_rows / small_app.min(),
            "raw_pyarrow_rows_per_s": n_rows / raw_d.min(),
            "raw_pyarrow_nofsync_rows_per_s": n_rows / raw_w.min(),
            # median over rounds of the paired ratio: robust to a neighbour's I/O bursts
            "append_vs_raw_ratio": float(np.median(raw_d / app)),
            "append_vs_raw_nofsync_ratio": float(np.median(raw_w / app)),
            "append_vs_raw_ratio_best": float(raw_d.min() / app.min()),
            "append_vs_raw_nofsync_ratio_best": float(raw_w.min() / app.min()),
            "append_small_folios_vs_raw_ratio": float(np.median(raw_d / small_app)),
            "append_vs_raw_ratio_rounds": (raw_d / app).tolist(),
            "append_small_folios_vs_raw_ratio_rounds": (raw_d / small_app).tolist()}


def bench_sampling(workdir: str, n_rows: int, iters: int, rounds: int = ROUNDS) -> dict:
    """Ours and TorchRL's uniform sampling, each side reopened from disk in a fresh process.

    Before each side's sampling process starts, its files are read once (page cache warm for
    both, as right after a run wrote them); what differs is only each library's own reader.
    The two sides alternate for `rounds` rounds; every figure is the median over rounds, every
    ratio the median of the rounds' ratios (this machine's rates swing by 2x from one minute to
    the next; the `*_rounds` lists keep each round's ratio).
    """
    res, big, trl = {}, os.path.join(workdir, "big"), os.path.join(workdir, "torchrl")
    res.update(build_store(big, n_rows))
    res["page_cache_warm_s"] = _warm_page_cache(big)
    capped = _child("reader-capped", big, n_rows, max(iters // 5, 20))
    res.update({f"capped_{k}": v for k, v in capped.items()})
    res.update(_child("torchrl-fill", trl, n_rows, iters))
    ours_runs, theirs_runs = [], []
    for _ in range(rounds):
        res["page_cache_warm_s"] = _warm_page_cache(big)
        ours_runs.append(_child("reader", big, n_rows, iters))
        res["torchrl_page_cache_warm_s"] = _warm_page_cache(trl)
        theirs_runs.append(_child("torchrl", trl, n_rows, iters))
    shutil.rmtree(big, ignore_errors=True)
    shutil.rmtree(trl, ignore_errors=True)
    ours, theirs = _medians(ours_runs), _medians(theirs_runs)
    res.update(ours)
    res.update(theirs)
    tag = f"_{n_rows // 1_000_000}m" if n_rows >= 1_000_000 else f"_{n_rows // 1000}k"
    res["capped_resident_bytes"] = CAPPED_RESIDENT_BYTES
    res["cold_batches"], res["steady_batches"], res["rounds"] = COLD_BATCHES, iters, rounds
    res[f"rss_peak_gb{tag}"] = capped["rss_peak_gb"]  # with the page budget
    res[f"rss_peak_uncapped_gb{tag}"] = ours["rss_peak_gb"]

    def ratio(name: str, key: str, mine: list, other: list, other_key: str) -> None:
        per_round = [a[key] / b[other_key] for a, b in zip(mine, other)]
        res[name], res[f"{name}_rounds"] = float(np.median(per_round)), per_round

    for phase in ("cold", "steady", "mapped"):
        ratio(f"uniform_{phase}_vs_torchrl{tag}", f"uniform_{phase}_rows_per_s", ours_runs,
              theirs_runs, f"torchrl_uniform_{phase}_rows_per_s")
    for phase in ("cold", "steady"):
        res[f"uniform_capped_{phase}_vs_torchrl{tag}"] = (
            capped[f"uniform_{phase}_rows_per_s"] / theirs[f"torchrl_uniform_{phase}_rows_per_s"])
    # the headline: steady state of a fresh process (what a learner that just (re)started and
    # samples for a while sees); cold and mapped bracket it
    res[f"uniform_vs_torchrl{tag}"] = res[f"uniform_steady_vs_torchrl{tag}"]
    ratio(f"prioritised_vs_uniform{tag}", "prioritised_rows_per_s", ours_runs, ours_runs,
          "uniform_rows_per_s")
    return res


def _medians(runs: list) -> dict:
    """Each numeric figure's median over the rounds' result dicts."""
    return {k: float(np.median([r[k] for r in runs])) if isinstance(runs[0][k], (int, float))
            else runs[0][k] for k in runs[0]}


def run(workdir: str, n_rows: int, quick: bool, sample_only: bool = False) -> dict:
    res = {"rows": n_rows}
    if not sample_only:
        res.update(bench_append(workdir, min(n_rows, 1_000_000), 4 if quick else 6))
    iters = 200 if quick else 500
    res.update(bench_sampling(workdir, n_rows, iters))
    if sample_only:
        return res
    naive_rows = 20_000 if quick else 100_000
    res["naive_rows"] = naive_rows
    res.update(bench_naive(make_batches(naive_rows), os.path.join(workdir, "log.jsonl"), iters))
    res["naive_vs_uniform"] = res["naive_sample_rows_per_s"] / res["uniform_rows_per_s"]
    res.update(bench_crash(workdir, 20 if quick else 40))
    return res


def sampling_table(res: dict) -> str:
    """The uniform-sampling figures side by side (rows/s, batch 256)."""
    rows = [("cold: first %d batches after open" % res["cold_batches"], "cold"),
            ("steady: the next %d batches" % res["steady_batches"], "steady"),
            ("mapped: every page faulted in first", "mapped")]
    out = ["| phase (fresh process, files in page cache) | ours | ours, 256 MB page budget "
           "| TorchRL | ours ÷ TorchRL | page faults per batch: ours / TorchRL |",
           "|---|---|---|---|---|---|"]
    for label, phase in rows:
        ours, theirs = res[f"uniform_{phase}_rows_per_s"], res[f"torchrl_uniform_{phase}_rows_per_s"]
        capped = res.get(f"capped_uniform_{phase}_rows_per_s")
        out.append(f"| {label} | {ours:,.0f} | "
                   f"{'-' if capped is None else f'{capped:,.0f}'} | {theirs:,.0f} | "
                   f"{ours / theirs:.2f} | {res[f'uniform_{phase}_faults_per_batch']:.1f} / "
                   f"{res[f'torchrl_uniform_{phase}_faults_per_batch']:.1f} |")
    out.append(f"| open | {res['store_open_s']:.2f} s | {res['capped_store_open_s']:.2f} s | "
               f"{res['torchrl_open_s']:.2f} s | | |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here as one JSON object")
    ap.add_argument("--rows", type=int, default=10_000_000, help="rows in the big store")
    ap.add_argument("--quick", action="store_true", help="100k rows, fewer rounds")
    ap.add_argument("--dir", help="scratch directory (default: a temp dir, removed after)")
    ap.add_argument("--sample-only", action="store_true",
                    help="only the sampling comparison (no append, naive or crash parts)")
    ap.add_argument("--crash-child", nargs=3, metavar=("ROOT", "WORKER", "N_BATCHES"),
                    help=argparse.SUPPRESS)
    for kind in ("reader", "reader-capped", "torchrl", "torchrl-fill"):
        ap.add_argument(f"--{kind}-child", nargs=3, metavar=("PATH", "ROWS", "ITERS"),
                        help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for kind, fn in (("reader", reader_child), ("reader-capped", reader_capped_child),
                     ("torchrl", torchrl_child), ("torchrl-fill", torchrl_fill_child)):
        child = getattr(args, f"{kind.replace('-', '_')}_child")
        if child:
            print(json.dumps(fn(child[0], int(child[1]), int(child[2]))))
            return 0
    if args.crash_child:
        root, worker, n = args.crash_child
        crash_child(root, int(worker), int(n))
        return 0
    workdir = args.dir or tempfile.mkdtemp(prefix="replay-bench-")
    os.makedirs(workdir, exist_ok=True)
    try:
        res = run(workdir, 100_000 if args.quick else args.rows, args.quick, args.sample_only)
    finally:
        if not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)
    for k, v in res.items():
        if isinstance(v, list):
            print(f"{k:36s} " + " ".join(f"{x:.3f}" for x in v))
        else:
            print(f"{k:36s} {v:,.3f}" if isinstance(v, float) else f"{k:36s} {v:,}")
    print(sampling_table(res))
    if args.json:
        write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
