"""Telling a dead vLLM engine from a failed request, and checking a rebuilt engine.

vLLM V1 runs its EngineCore in a child process (unless VLLM_ENABLE_V1_MULTIPROCESSING=0, which this
project never sets). When that process dies (SIGKILL, OOM killer, a crash in a kernel), every later
call raises `EngineDeadError` and the engine is useless: the backend must be rebuilt. A request that
raises while the engine lives (a prompt longer than max_model_len) fails only itself.
"""
from __future__ import annotations

import threading
from multiprocessing import connection
from typing import Optional

from retro_dist.agents.backends import Adapter, EngineRebuildFailed

# The fallback cap on the probe gap when a probe carries no tolerance (LearnerConfig.probe_tolerance's default).
PROBE_TOLERANCE = 0.02


def engine_is_dead(err: BaseException, core) -> bool:
    """Did `err` come from a dead engine? `core`: the engine's client (LLMEngine.engine_core / AsyncLLM.engine_core)."""
    from vllm.v1.engine.exceptions import EngineDeadError

    return isinstance(err, EngineDeadError) or bool(getattr(getattr(core, "resources", None), "engine_dead", False))


def engine_processes(core) -> list:
    """The EngineCore processes of a multiprocess client (empty for an in-process engine)."""
    manager = getattr(getattr(core, "resources", None), "engine_manager", None)
    return list(getattr(manager, "processes", []) or [])


def watch_sync_engine(core) -> Optional[threading.Thread]:
    """Wake a sync `LLM` call blocked on a dead engine.

    vLLM's own monitor notices the EngineCore's death, marks the client dead and stops its output
    thread, but a `generate` already waiting on the output queue is never told (vLLM 0.32's
    SyncMPClient: `get_output` blocks forever; the async client does push `EngineDeadError`). This
    thread waits on the same process sentinels and pushes `EngineDeadError` itself."""
    procs = engine_processes(core)
    queue = getattr(core, "outputs_queue", None)
    if not procs or queue is None:
        return None

    def watch():
        from vllm.v1.engine.exceptions import EngineDeadError

        connection.wait([p.sentinel for p in procs])
        if getattr(core, "_retro_closing", False):  # our own shutdown, not a death
            return
        core.resources.engine_dead = True
        queue.put_nowait(EngineDeadError())

    t = threading.Thread(target=watch, name="engine-death-watch", daemon=True)
    t.start()
    return t


def check_rebuilt(adapter: Optional[Adapter], logprobs: list[float]) -> float:
    """A rebuilt engine must reproduce the learner's probe log-probs for the adapter it reloaded."""
    from retro_dist.learner.probe import probe_matches

    ok, gap, tol = probe_matches(adapter.extra["probe"], logprobs, PROBE_TOLERANCE)
    if not ok:
        raise EngineRebuildFailed(f"the rebuilt engine's probe log-probs for adapter v{adapter.version} differ "
                                  f"from the learner's by {gap:.4f} > {tol:.4f}")
    return gap


def has_probe(adapter: Optional[Adapter]) -> bool:
    return adapter is not None and "probe" in (adapter.extra or {})
