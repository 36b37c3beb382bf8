"""Checks run before any worker starts, so bad input costs one clear line, not a dead cluster."""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from retro_dist.config import Config


class PreflightError(RuntimeError):
    """Something the run needs is missing or unreachable."""


def _looks_local(name: str) -> bool:
    """A path, not a hub id: explicit prefixes, nested folders, or a first part that is a local folder."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name.split("/")[0]).is_dir()


def check_model(key: str, name: str) -> None:
    """A local checkpoint folder, or a hub name the loader can resolve (cache or network)."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PreflightError(f"{key}: {name} has no config.json (not a model checkpoint folder)")
        return
    if _looks_local(name):
        hint = " (run `retro-dist make-models` to build the tiny local models)" if "tiny" in name else ""
        raise PreflightError(f"{key}: model path not found: {name}{hint}")
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(name)
    except Exception as err:
        raise PreflightError(f"{key}: cannot load model '{name}' from the hub or its cache: "
                             f"{str(err).splitlines()[0]}") from None


def check_envs(cfg: Config) -> None:
    """Data present, packages installed, every game known: list the training fold's tasks once."""
    from retro_dist.envs.registry import TaskMix

    if cfg.env.data_path and not Path(cfg.env.data_path).exists():
        raise PreflightError(f"env.data_path not found: {cfg.env.data_path}")
    for fam, module in (("textworld", "textworld"), ("alfworld", "alfworld"), ("twx", "textworld_express")):
        if any(g.startswith(fam + "/") for g in cfg.env.games) and importlib.util.find_spec(module) is None:
            raise PreflightError(f"env.games uses {fam} but `{module}` is not installed: pip install retro-dist[envs]")
    try:
        TaskMix(cfg.env, cfg.env.split)
    except Exception as err:  # unknown game names surface here, as whatever the simulator raises
        first = (str(err).strip().splitlines() or [""])[0]
        raise PreflightError(f"env.games {cfg.env.games}: {type(err).__name__}: {first}") from None


def preflight(cfg: Config) -> None:
    from retro_dist.launch.placement import check_gpu_memory

    check_gpu_memory(cfg)  # engines sharing a GPU must fit in it
    if cfg.actor.backend != "openai":
        check_model("actor.model", cfg.actor.model)
    check_model("reflector.model", cfg.reflector.model)
    if "vllm" in (cfg.actor.backend, cfg.reflector.backend) and importlib.util.find_spec("vllm") is None:
        raise PreflightError("vLLM is not installed: `pip install retro-dist[cpu]` (or [gpu]), "
                             "or set actor.backend and reflector.backend to hf")
    check_envs(cfg)
    if any(g.startswith("twx/") for g in cfg.env.games) and shutil.which("java") is None:
        raise PreflightError("twx games (TextWorldExpress) need Java on PATH (e.g. apt install openjdk-17-jre)")
    if cfg.actor.backend == "openai":
        from retro_dist.agents.backends import BackendError, check_endpoint

        try:
            served = check_endpoint(cfg.actor.base_url, api_key=os.environ.get(cfg.actor.api_key_env))
        except BackendError as err:
            raise PreflightError(str(err)) from None
        if served and cfg.actor.model not in served:
            raise PreflightError(f"actor.model '{cfg.actor.model}' is not served at {cfg.actor.base_url} "
                                 f"(served: {', '.join(served)})")
