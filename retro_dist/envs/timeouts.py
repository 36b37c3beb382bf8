"""Environment calls with a deadline (`env.step_timeout_s`).

Simulators are synchronous: a TextWorldExpress step is a py4j call into a JVM, and a Python thread
blocked in one cannot be interrupted. So a simulator's calls run on a thread of its own and the
caller waits at most `timeout_s`. On a timeout the caller abandons that thread and the simulator
(`MixedEnv` kills the simulator's process, which makes the stuck call fail and its thread end) and
builds a new one. The threads are daemons: one stuck for good never keeps the process alive.
"""
from __future__ import annotations

import concurrent.futures
import itertools
import queue
import threading
from typing import Any, Callable

from retro_dist.envs.base import EnvError

_names = itertools.count()


class EnvTimeout(EnvError):
    """An environment call did not return within `env.step_timeout_s`; its simulator is abandoned."""


def timeout_message(timeout_s: float) -> str:
    return f"env step timed out after {timeout_s:g} s"


class CallThread:
    """One daemon thread that runs calls one at a time; the caller waits for each with a deadline."""

    def __init__(self, name: str = "env-call"):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=f"{name}-{next(_names)}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fut, fn = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                result = fn()
            except BaseException as err:  # handed to the caller, whatever it is
                fut.set_exception(err)
            else:
                fut.set_result(result)

    def call(self, fn: Callable[[], Any], timeout_s: float) -> Any:
        """`fn()` on this thread. Past `timeout_s` raises EnvTimeout and abandons the thread: it ends
        when the stuck call returns (the caller kills what it was waiting on), if it ever does."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fut, fn))
        done, _ = concurrent.futures.wait([fut], timeout=timeout_s)
        if not done:  # checked apart from fut.result(): fn itself may raise TimeoutError
            self.close()
            raise EnvTimeout(timeout_message(timeout_s))
        return fut.result()

    def close(self) -> None:
        """The thread ends after the call it runs now, if any."""
        self._jobs.put(None)
