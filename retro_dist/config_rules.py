"""The config's validation rules: ranges, conflicts between keys, mode-specific keys, safe names and
output locations. `load_config` runs `validate` on every config; each problem is one `ConfigError`
naming the key.
"""
from __future__ import annotations

import os
import re

from retro_dist.config import Config, ConfigError, EnvConfig

# Keys that mean something in one run.mode only; setting one in the other mode is a mistake.
SYNC_ONLY = ("run.iterations", "rollout.tasks_per_iteration", "rollout.parallel_tasks",
             "learner.updates_per_iteration", "replay.max_staleness")
ASYNC_ONLY = ("run.updates", "run.log_every_s", "rollout.concurrent_episodes", "rollout.simulators",
              "learner.max_policy_lag", "learner.updates_per_version")


def without_other_mode(resolved: dict, mode: str) -> dict:
    """A resolved config (nested dict) without the keys of the mode it does not run, so the saved
    config.yaml loads again as it is (`retro-dist eval --config <run>/config.yaml`)."""
    out = {section: dict(keys) if isinstance(keys, dict) else keys for section, keys in resolved.items()}
    for dotted in (ASYNC_ONLY if mode == "sync" else SYNC_ONLY):
        section, key = dotted.split(".")
        out.get(section, {}).pop(key, None)
    return out


def _at_least(value, low, key: str) -> None:
    if value < low:
        raise ConfigError(f"{key} must be >= {low}, got {value}")


OUTPUT_SCHEMES = ("file", "s3", "s3a")


def _validate_output_dir(out: str) -> None:
    """run.output_dir: a path, file:// or s3:// URI (S3 with credentials: never the metadata service)."""
    from urllib.parse import urlsplit

    if "://" not in out:
        return
    parts = urlsplit(out)
    if parts.scheme not in OUTPUT_SCHEMES:
        raise ConfigError(f"run.output_dir: scheme {parts.scheme!r} is not supported; use a path, "
                          f"file:// or s3://")
    if parts.scheme == "file" and parts.netloc not in ("", "localhost"):
        raise ConfigError(f"run.output_dir: file:// URIs name a local path (file:///abs/path), "
                          f"got host {parts.netloc!r}")
    if parts.scheme != "file":
        if not parts.hostname:
            raise ConfigError("run.output_dir: an s3:// URI needs a bucket (s3://bucket/prefix)")
        if not (parts.username and parts.password) and not (
                os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY")):
            raise ConfigError("run.output_dir: s3:// needs explicit credentials (s3://KEY:SECRET@bucket/... "
                              "or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY); the cloud metadata "
                              "service is never asked")


def _check_game_params(env: EnvConfig) -> None:
    from retro_dist.envs.twx import parse_game_params

    try:
        per_game = parse_game_params(env.game_params)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    twx = {g.partition("/")[2] for g in env.games if g.startswith("twx/")}
    for game in per_game or {}:
        if game not in twx:
            raise ConfigError(f"env.game_params names '{game}', which is not a twx game in env.games "
                              f"({', '.join(sorted(twx)) or 'none'})")


def _check_step_limits(env: EnvConfig) -> None:
    from retro_dist.envs.registry import parse_step_limits

    try:
        limits = parse_step_limits(env.step_limits)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    for game, limit in limits.items():
        if game not in env.games:
            raise ConfigError(f"env.step_limits names '{game}', which is not in env.games ({', '.join(env.games)})")
        if limit > env.step_limit:
            raise ConfigError(f"env.step_limits: {game}: {limit} exceeds env.step_limit ({env.step_limit}), "
                              "the steps every trial runs at most")


def validate(cfg: Config, given: set[str] = frozenset()) -> None:
    """Cross-field checks; each conflict names the keys involved. `given`: the keys the user set."""
    _validate_mode(cfg, given)
    _validate_output_dir(cfg.run.output_dir)
    r, a, lrn = cfg.rollout, cfg.actor, cfg.learner
    for key, value, low in (("run.iterations", cfg.run.iterations, 1), ("rollout.trials", r.trials, 1),
                            ("rollout.tasks_per_iteration", r.tasks_per_iteration, 1),
                            ("rollout.parallel_tasks", r.parallel_tasks, 1), ("rollout.num_workers", r.num_workers, 0),
                            ("rollout.max_consecutive_errors", r.max_consecutive_errors, 1),
                            ("rollout.max_worker_restarts", r.max_worker_restarts, 0),
                            ("env.step_limit", cfg.env.step_limit, 1), ("env.num_tasks", cfg.env.num_tasks, 1),
                            ("learner.batch_size", lrn.batch_size, 1), ("learner.micro_batch_size", lrn.micro_batch_size, 1),
                            ("learner.updates_per_iteration", lrn.updates_per_iteration, 1),
                            ("learner.sft_iterations", lrn.sft_iterations, 0),
                            ("learner.max_bad_steps", lrn.max_bad_steps, 1)):
        _at_least(value, low, key)
    if cfg.env.step_timeout_s is not None and not 0 < cfg.env.step_timeout_s < float("inf"):
        raise ConfigError(f"env.step_timeout_s must be a number of seconds > 0, or null for no limit; "
                          f"got {cfg.env.step_timeout_s}")
    if r.memory_size < 1:
        raise ConfigError("rollout.memory_size must be >= 1: with no memory, reflections never reach the actor "
                          "and their rewards are noise")
    _at_least(r.repeats_per_task, 1, "rollout.repeats_per_task")
    if cfg.run.mode == "sync" and (r.tasks_per_iteration % r.repeats_per_task or r.parallel_tasks % r.repeats_per_task):
        raise ConfigError("rollout.tasks_per_iteration and rollout.parallel_tasks must be multiples of "
                          "rollout.repeats_per_task (a task's repeats run side by side)")
    _at_least(a.max_retries, 0, "actor.max_retries")
    if not 0 < a.retry_backoff_s <= a.retry_backoff_max_s < float("inf"):
        raise ConfigError(f"actor.retry_backoff_s ({a.retry_backoff_s}) must be > 0 and <= actor.retry_backoff_max_s "
                          f"({a.retry_backoff_max_s}), both finite seconds")
    if a.backend == "openai" and not a.base_url:
        raise ConfigError("actor.base_url is required when actor.backend is 'openai'")
    if a.backend != "openai" and a.base_url:
        raise ConfigError(f"actor.base_url is set but actor.backend is '{a.backend}'")
    if lrn.batch_size % lrn.micro_batch_size:
        raise ConfigError("learner.batch_size must be a multiple of learner.micro_batch_size")
    for key in ("kl_coef", "entropy_coef", "value_lr"):
        value = getattr(lrn, key)
        if not 0.0 <= value < float("inf"):
            raise ConfigError(f"learner.{key} must be a finite number >= 0, got {value}")
    if lrn.micro_batch_tokens is not None and lrn.micro_batch_tokens < 1:
        raise ConfigError(f"learner.micro_batch_tokens must be >= 1 or null, got {lrn.micro_batch_tokens}")
    if lrn.num_gpus > 1 and lrn.num_gpus != int(lrn.num_gpus):
        raise ConfigError(f"learner.num_gpus {lrn.num_gpus}: more than one learner GPU must be a whole number "
                          f"(one data-parallel process per GPU)")
    if lrn.num_gpus > 1 and lrn.device not in ("auto", "cuda"):
        raise ConfigError(f"learner.device '{lrn.device}' with learner.num_gpus {lrn.num_gpus}: each data-parallel "
                          f"process uses the GPU Ray gives it; set learner.device to auto or cuda")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", lrn.device):
        raise ConfigError(f"learner.device: '{lrn.device}' is not auto, cpu, cuda or cuda:N")
    if lrn.baseline_version_window is not None and lrn.baseline_version_window < 0:
        raise ConfigError(f"learner.baseline_version_window must be >= 0 or null, got {lrn.baseline_version_window}")
    if cfg.reflector.temperature != 1.0:
        raise ConfigError("reflector.temperature must be 1.0: behaviour log-probs are stored untempered, so "
                          "importance ratios would compare different distributions")
    if cfg.replay.on_overflow == "block" and cfg.run.mode == "sync":
        raise ConfigError("replay.on_overflow 'block' would wait forever: the train loop rolls out, then learns, "
                          "so no rows arrive while the learner waits; use 'drop'")
    _check_name("run.name", cfg.run.name)
    if not cfg.env.games:
        raise ConfigError("env.games must name at least one game")
    _check_game_params(cfg.env)
    _check_step_limits(cfg.env)
    for g in cfg.env.games:
        fam = g.partition("/")[0]
        if fam not in ("twx", "textworld", "hotpotqa", "alfworld") or not g.partition("/")[2]:
            raise ConfigError(f"env.games: '{g}' must be <family>/<game> with family twx, textworld, hotpotqa or alfworld")
        _check_name(f"env.games: '{g}': the game", g.partition("/")[2])
        if fam in ("hotpotqa", "alfworld") and not cfg.env.data_path:
            raise ConfigError(f"env.data_path is required for '{g}' (point it at your {fam} data)")


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _check_name(key: str, value) -> None:
    """Names that become one folder name (run folder, game cache) must not reach outside it."""
    if not isinstance(value, str) or not _SAFE_NAME.fullmatch(value) or ".." in value:
        raise ConfigError(f"{key} '{value}' must be a plain name: letters, digits, '.', '_' and '-', starting "
                          f"with a letter or digit (no path separators, no '..')")


def _validate_mode(cfg: Config, given: set[str]) -> None:
    """Mode-specific keys, and the async runtime's own limits."""
    mode = cfg.run.mode
    wrong = [k for k in (ASYNC_ONLY if mode == "sync" else SYNC_ONLY) if k in given]
    if wrong:
        other = "async" if mode == "sync" else "sync"
        raise ConfigError(f"{wrong[0]} applies to run.mode '{other}' only, but run.mode is '{mode}'")
    if mode == "sync":
        return
    r, lrn, rp = cfg.rollout, cfg.learner, cfg.replay
    for key, value, low in (("run.updates", cfg.run.updates, 1), ("learner.max_policy_lag", lrn.max_policy_lag, 0),
                            ("learner.updates_per_version", lrn.updates_per_version, 1),
                            ("rollout.concurrent_episodes", r.concurrent_episodes, 1),
                            ("rollout.simulators", r.simulators, 1)):
        _at_least(value, low, key)
    if cfg.run.log_every_s <= 0:
        raise ConfigError(f"run.log_every_s must be > 0, got {cfg.run.log_every_s}")
    if lrn.batch_source != "replay":
        raise ConfigError("learner.batch_source must be 'replay' in run.mode 'async': the learner samples the "
                          "stream (staleness-filtered, IS-corrected) instead of waiting for a whole version's rows")
    if r.concurrent_episodes % r.repeats_per_task:
        raise ConfigError("rollout.concurrent_episodes must be a multiple of rollout.repeats_per_task "
                          "(a task's repeats run side by side)")
    if rp.retention_rows is not None and rp.min_size_to_sample > rp.retention_rows:
        raise ConfigError(f"replay.min_size_to_sample ({rp.min_size_to_sample}) > replay.retention_rows "
                          f"({rp.retention_rows}): the async learner could never be fed")
    if rp.min_size_to_sample < 1:
        raise ConfigError("replay.min_size_to_sample must be >= 1 in run.mode 'async'")
