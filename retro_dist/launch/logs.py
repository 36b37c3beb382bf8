"""Where a run's output goes: files under `runs/<run>/logs/`, a readable terminal.

- Ray worker/learner actors: everything the process writes (print, Python warnings, tqdm bars,
  C/C++ writes to fd 1/2, child processes such as vLLM's EngineCore) goes to `logs/<name>.log`
  (`redirect_process_output`, first thing in the actor's constructor; `with_output_redirect` builds
  such an actor class). Ray does not forward worker output to the driver (`log_to_driver=False`).
- vLLM's own logger, in every process that imports vLLM (driver, actors, engine subprocesses):
  `logs/vllm.log`, via a generated logging config (`VLLM_LOGGING_CONFIG_PATH`).
- Driver (`RunLogs`): every log record at INFO and up, Ray's driver-side records and Python warnings
  go to `logs/driver.log`; records at WARNING and up also reach the terminal (through `tqdm.write`,
  so they do not garble the progress bar), except Python warnings (library deprecation chatter),
  Ray's one-per-run token-authentication notice and vLLM's few records from before its logging
  config applies: those are file only.
- `logs/ray` links to the local Ray session's own logs (raylet, GCS, Ray's copies of worker output).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Standard record fields only, so the format works with any vLLM version's records.
VLLM_FORMAT = "%(asctime)s %(processName)s pid=%(process)d %(levelname)s [%(filename)s:%(lineno)d] %(message)s"
# Driver-side loggers whose warnings are informational here: file only (vLLM records that reach the root
# logger are the few it emits before its own logging config applies; the rest are in logs/vllm.log).
FILE_ONLY_LOGGERS = ("py.warnings", "ray._private.authentication", "vllm")

_kept_streams: list = []  # the streams replaced by redirect_process_output, never closed (see there)


def log_dir(run_dir) -> Path:
    path = Path(run_dir) / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def redirect_process_output(log_dir: str, name: str) -> Path:
    """Send this whole process's output to `<log_dir>/<name>.log` (appending); returns the file.

    Call it first thing in a Ray actor's constructor, never in the driver (it takes the terminal
    away for the rest of the process). Redirects at the file-descriptor level (os.dup2 onto fds 1
    and 2), so C/C++ writes and child processes started afterwards (vLLM's EngineCore) land there
    too, and rebinds sys.stdout/sys.stderr to line-buffered writers on those fds.
    """
    path = Path(log_dir) / f"{name}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (ValueError, OSError, AttributeError):
            pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    # Keep the old stream objects alive: if one owned fd 1 or 2, collecting it would close the fd
    # that now points at the log file.
    _kept_streams.extend([sys.stdout, sys.stderr])
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
    print(f"--- {name}: pid {os.getpid()} on {socket.gethostname()}, "
          f"{time.strftime('%Y-%m-%d %H:%M:%S')} ---", flush=True)
    return path


def with_output_redirect(cls: type) -> type:
    """`cls` whose constructor takes `(log_dir, log_name, *args, **kwargs)` and first redirects output.

    For Ray actors: `ray.remote(with_output_redirect(RolloutWorker)).remote(logs, "worker-0", spec, ...)`.
    The plain class stays redirect-free, so in-process runs keep the terminal.
    """
    def __init__(self, log_dir: str, log_name: str, *args, **kwargs):
        redirect_process_output(log_dir, log_name)
        cls.__init__(self, *args, **kwargs)

    def where(self) -> dict:
        """The actor's node and pid: answers at once (a liveness ping) and names the process to kill."""
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    # Same name as the wrapped class, so Ray's actor listings and errors read as before.
    return type(cls.__name__, (cls,), {"__init__": __init__, "where": where, "__qualname__": cls.__qualname__,
                                       "__module__": cls.__module__})


def write_vllm_logging_config(logs: Path) -> Path:
    """A logging dictConfig (JSON) that sends the `vllm` logger to `logs/vllm.log`; returns its path."""
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": VLLM_FORMAT}},
        "handlers": {"vllm_file": {"class": "logging.FileHandler", "formatter": "plain", "level": "INFO",
                                   "filename": str((logs / "vllm.log").resolve()), "mode": "a",
                                   "encoding": "utf-8"}},
        "loggers": {"vllm": {"handlers": ["vllm_file"], "level": "INFO", "propagate": False}},
    }
    path = logs / "vllm-logging.json"
    path.write_text(json.dumps(config, indent=2))
    return path


class _TerminalHandler(logging.Handler):
    """Log records on stderr through tqdm.write, so a live progress bar is redrawn below them."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(FILE_ONLY_LOGGERS):
            return
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except (ValueError, OSError):  # stderr already closed at interpreter exit: driver.log has it
            pass


class RunLogs:
    """The driver's side of the routing; construct once per run before any worker starts, close at the end."""

    def __init__(self, run_dir, terminal_level: int = logging.WARNING):
        self.dir = log_dir(run_dir).resolve()  # absolute: actors need not share the driver's cwd
        self.vllm_config = write_vllm_logging_config(self.dir)
        self._file = logging.FileHandler(self.dir / "driver.log", encoding="utf-8")
        self._file.setFormatter(logging.Formatter(LOG_FORMAT))
        self._file.setLevel(logging.INFO)
        self._term = _TerminalHandler(level=terminal_level)
        self._term.setFormatter(logging.Formatter("retro-dist: %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        self._root_level = root.level
        root.addHandler(self._file)
        root.addHandler(self._term)
        root.setLevel(min(root.level or logging.WARNING, logging.INFO))
        logging.captureWarnings(True)
        self._ray_state = None
        # vLLM reads these when it is first imported, in this process (in-process runs) and in the
        # children that inherit the environment; Ray actors get them via env_vars(). A user's own
        # logging config wins, and VLLM_CONFIGURE_LOGGING=0 forbids a config file.
        self._env_set = {}
        for key, value in self.env_vars().items():
            if key not in os.environ:
                os.environ[key] = self._env_set[key] = value

    def env_vars(self) -> dict:
        """Environment for Ray actors (merge into runtime_env env_vars)."""
        if os.environ.get("VLLM_CONFIGURE_LOGGING", "1") == "0":
            return {}
        return {"VLLM_LOGGING_CONFIG_PATH": os.environ.get("VLLM_LOGGING_CONFIG_PATH", str(self.vllm_config.resolve()))}

    def ray_init_kwargs(self, env_vars: Optional[dict] = None) -> dict:
        """Keyword arguments for `ray.init`: no worker output on the driver; the actors' environment.

        Also sends the driver's `ray` logger (which Ray gives its own stderr handler) through the
        root handlers, so "Started a local Ray instance" goes to driver.log and Ray's warnings
        (e.g. infeasible resource requests) still reach the terminal.
        """
        import ray  # noqa: F401  (importing ray installs the handler this replaces)

        ray_logger = logging.getLogger("ray")
        if self._ray_state is None:
            self._ray_state = (list(ray_logger.handlers), ray_logger.propagate)
        ray_logger.handlers.clear()
        ray_logger.propagate = True
        return {"log_to_driver": False, "configure_logging": False,
                "runtime_env": {"env_vars": {**(env_vars or {}), **self.env_vars()}}}

    def link_ray_session(self, context=None) -> Optional[Path]:
        """`logs/ray` → this node's Ray session log folder (call after ray.init); None if unknown."""
        session = None
        try:
            session = (context.address_info if context is not None else {}).get("session_dir")
            if session is None:
                import ray

                session = ray._private.worker._global_node.get_session_dir_path()
        except Exception:  # a Ray client connection has no local session: nothing to link
            return None
        link = self.dir / "ray"
        if link.is_symlink():
            link.unlink()
        if not link.exists():
            link.symlink_to(Path(session) / "logs", target_is_directory=True)
        return link

    def close(self) -> None:
        root = logging.getLogger()
        for handler in (self._file, self._term):
            root.removeHandler(handler)
        self._file.close()
        root.setLevel(self._root_level)
        logging.captureWarnings(False)
        if self._ray_state is not None:
            ray_logger = logging.getLogger("ray")
            ray_logger.handlers[:], ray_logger.propagate = self._ray_state
            self._ray_state = None
        for key, value in self._env_set.items():
            if os.environ.get(key) == value:
                del os.environ[key]
        self._env_set = {}
