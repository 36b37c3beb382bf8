"""Writer process for test_crash.py: appends batches, reports what is durable, may be SIGKILLed.

usage: crash_child.py ROOT WRITER_NUM N_BATCHES BATCH_ROWS SEAL_EVERY

Before each explicit seal it prints `pending N` (rows that seal would make durable) and after
it `committed N` (writer.committed_rows), each flushed at once. A kill between the catalog
rename and the second print leaves `pending` as the last line; the test accepts either count
then, and only then.
"""
import sys

from retro_dist.core.records import ReflectionSample, make_key, to_batch
from retro_dist.replay.config import ReplayConfig
from retro_dist.replay.writer import ReplayWriter


def rows(worker: int, lo: int, hi: int):
    return to_batch([ReflectionSample(make_key("crash", worker, e, 0), "crash", worker, e,
                                      f"task{e % 5}", "env", 0, list(range(64)), list(range(32)),
                                      [-0.5] * 32, "reflect", 0.0, 1.0, 1.0, e % 7)
                     for e in range(lo, hi)])


def main(root: str, worker: int, n_batches: int, batch_rows: int, seal_every: int) -> None:
    # seal only when told, so every commit is bracketed by the two prints
    cfg = ReplayConfig(seal_rows=10**9, seal_bytes=2**40, seal_seconds=1e9,
                       max_unacked_rows=10**9)
    w = ReplayWriter(root, f"w{worker}", cfg)
    print(f"committed {w.committed_rows}", flush=True)
    for b in range(n_batches):
        w.append("reflections", rows(worker, b * batch_rows, (b + 1) * batch_rows))
        if (b + 1) % seal_every == 0 or b + 1 == n_batches:
            print(f"pending {w.committed_rows + w.unacked_rows}", flush=True)
            w.seal()
            print(f"committed {w.committed_rows}", flush=True)
    w.close()
    print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:]))
