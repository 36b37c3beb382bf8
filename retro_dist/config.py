"""Typed, documented, validated configuration, loaded from YAML.

Each section is a small dataclass; every field carries a docstring (read by `config_reference.py`
to print the README's config reference, so the two cannot drift). Each component receives only
its own section. A typo, a wrong type or a conflict raises one `ConfigError` naming the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from retro_dist.replay.config import ReplayConfig


class ConfigError(ValueError):
    """A configuration problem, reported as one line that names the key."""


@dataclass
class RunConfig:
    name: str = "local"
    """Run name; outputs go to `<output_dir>/<name>/`."""
    output_dir: str = "runs"
    """Folder that holds one sub-folder per run: a path, `file://...`, or `s3://[KEY:SECRET@]bucket/prefix[?endpoint_override=HOST:PORT&scheme=http]` (config, metrics, checkpoints and replay go there; logs stay in a local mirror)."""
    seed: int = 0
    """Seed for task sampling, reflection sampling and LoRA initialisation."""
    iterations: int = 3
    """Rollout → learn → broadcast iterations; the run stops cleanly after the last."""
    resume: bool = False
    """Continue an existing run folder (replay and checkpoints kept) instead of refusing it."""
    mode: Literal["sync", "async"] = "sync"
    """`sync`: roll out, then learn, then broadcast, per iteration; `async`: workers and learner loop independently (streaming actor–learner)."""
    updates: int = 20
    """Async mode: learner gradient steps the run lasts (sync mode counts `run.iterations` instead)."""
    log_every_s: float = 10.0
    """Async mode: seconds between aggregated metrics lines (the terminal status and metrics.jsonl)."""
    wandb_project: Optional[str] = None
    """Also log metrics to this Weights & Biases project (null: off; needs the `wandb` package)."""
    wandb_mode: Literal["offline", "online"] = "offline"
    """`offline` writes W&B files under runs/<run>/wandb without a network; `online` uploads."""


@dataclass
class RayConfig:
    address: Optional[str] = None
    """Ray cluster to join (`auto`, `ray://host:10001`, `host:6379`); null starts a local one on 127.0.0.1."""
    num_cpus: Optional[int] = None
    """Logical CPUs of the local cluster (null: enough for the workers and the learner)."""


@dataclass
class EnvConfig:
    games: list[str] = field(default_factory=lambda: ["twx/coin"])
    """Games to mix, as `<family>/<game>` (families: twx, textworld, hotpotqa, alfworld); each prompt names its game."""
    game_params: str = "numLocations=4,includeDoors=0,numDistractorItems=0"
    """TextWorldExpress game parameters: one string for every twx game, or per game as `coin: numLocations=4; sorting:` (games accept different properties)."""
    data_path: Optional[str] = None
    """Folder or file of user-provided data for the hotpotqa and alfworld families."""
    textworld_cache: str = "runs/cache/textworld"
    """Where games generated with `tw-make` are cached (generated once per game and seed)."""
    split: Literal["train", "dev", "test"] = "train"
    """Fold the training rollouts draw tasks from (eval uses its own --split)."""
    step_limit: int = 6
    """Actor steps per trial before the trial counts as failed."""
    step_limits: str = ""
    """Per-game step limits below `step_limit` for a mix, as `twx/coin: 2; twx/mapreader: 6` (games not named get `step_limit`)."""
    num_tasks: int = 1000
    """Distinct tasks per game in a fold (task numbers cycle through them)."""
    step_timeout_s: Optional[float] = 60.0
    """Longest an environment reset or step may take; past it the episode errors and its simulator is killed and rebuilt (null: no limit)."""


@dataclass
class VLLMConfig:
    kv_cache_gib: int = 1
    """KV-cache size on CPU builds (VLLM_CPU_KVCACHE_SPACE); ignored on GPUs."""
    gpu_memory_utilization: float = 0.5
    """Fraction of GPU memory for the engine (GPU builds only)."""
    max_model_len: int = 1024
    """Longest prompt + generation the engine accepts."""
    dtype: str = "float32"
    """Engine dtype (`float32` on CPU; `bfloat16` on GPUs)."""
    enforce_eager: bool = True
    """Skip CUDA-graph capture (faster start-up, required on CPU)."""
    max_loras: int = 2
    """Adapters resident at once (old and new policy during a swap)."""


@dataclass
class ActorConfig:
    backend: Literal["vllm", "hf", "openai"] = "vllm"
    """How the frozen actor is served: a vLLM engine, HF transformers, or an OpenAI-compatible endpoint."""
    model: str = "models/tiny-lm"
    """Local checkpoint folder or hub name (for `openai`: the served model name)."""
    base_url: Optional[str] = None
    """OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (backend `openai` only)."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the endpoint's API key (may be unset for local servers)."""
    action_selection: Literal["generate", "score_valid"] = "generate"
    """`generate` free text, or `score_valid`: take the valid action whose tokens score highest (action-logit extraction; generates where no actions are listed)."""
    action_scoring: Literal["sum", "mean"] = "sum"
    """With `score_valid`: rank valid actions by the sum of their tokens' log-probs, or by the mean (length-normalised, so long commands are not penalised for their length)."""
    max_new_tokens: int = 8
    """Tokens generated per action."""
    temperature: float = 0.0
    """Actor sampling temperature (0 = greedy)."""
    max_prompt_tokens: int = 768
    """Prompts are cut from the left (oldest trajectory steps first) to this many tokens."""
    request_timeout_s: float = 30.0
    """Per-request timeout for the `openai` backend."""
    max_retries: int = 6
    """`openai` backend: retries of a request after a refused/reset connection, a timeout, HTTP 5xx, 408 or 429 (other 4xx fail at once); then its episode errors."""
    retry_backoff_s: float = 1.0
    """`openai` backend: delay before the first retry; it doubles per retry up to retry_backoff_max_s, with jitter (each delay drawn from [d/2, d])."""
    retry_backoff_max_s: float = 30.0
    """`openai` backend: cap on one retry's delay."""


@dataclass
class ReflectorConfig:
    backend: Literal["vllm", "hf"] = "vllm"
    """How the retrospective model is served to workers (the learner always uses HF + peft)."""
    model: str = "models/tiny-lm"
    """Base checkpoint of the retrospective model (local folder or hub name)."""
    max_new_tokens: int = 24
    """Tokens per reflection."""
    temperature: float = 1.0
    """Sampling temperature; 1.0 keeps the stored behaviour log-probs exact for importance ratios."""
    lora_rank: int = 8
    """LoRA rank of the trainable adapter."""
    lora_alpha: int = 16
    """LoRA scaling numerator (scale = alpha / rank)."""
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Linear layers that get LoRA adapters."""


@dataclass
class RolloutConfig:
    num_workers: int = 2
    """Rollout workers (Ray actors); 0 runs one worker inside the driver process."""
    worker_num_cpus: float = 1.0
    """Ray CPUs reserved per worker."""
    worker_num_gpus: float = 0.0
    """Ray GPUs reserved per worker (for vLLM on GPU clusters)."""
    tasks_per_iteration: int = 8
    """Multi-trial episodes each worker runs per iteration."""
    parallel_tasks: int = 4
    """Episodes a worker steps in lockstep, so the engine sees batched prompts."""
    trials: int = 3
    """Trials per task (K); a reflection is written after each failed trial but the last."""
    memory_size: int = 3
    """Reflections kept in the actor's prompt (M, Reflexion's long-term memory)."""
    max_consecutive_errors: int = 20
    """A worker stops with an error after this many errored episodes in a row (a dead simulator or endpoint)."""
    max_worker_restarts: int = 10
    """Replacement workers the driver starts over the whole run when a worker process dies (killed, node lost); past it the run stops."""
    repeats_per_task: int = 1
    """Episodes per task per iteration (G): with a greedy actor, G reflections of the same failed trial, for the leave-one-out baseline."""
    concurrent_episodes: int = 16
    """Async mode: episodes a worker runs at once as independent tasks against one engine (continuous batching)."""
    simulators: int = 4
    """Async mode: environment simulators a worker keeps (a bounded pool; episodes borrow one per step)."""


@dataclass
class LearnerConfig:
    device: str = "auto"
    """`auto` (CUDA if present), `cpu`, `cuda` or `cuda:N`."""
    num_gpus: float = 0.0
    """Ray GPUs for the learner; a whole number > 1 runs that many data-parallel learner processes (one GPU each, NCCL)."""
    lr: float = 5e-4
    """AdamW learning rate on the LoRA parameters."""
    batch_size: int = 16
    """Reflection samples per gradient step."""
    micro_batch_size: int = 8
    """Most samples per forward pass (gradients are accumulated)."""
    micro_batch_tokens: Optional[int] = None
    """Most padded tokens (rows × longest row) per forward pass; rows are sorted by length and packed up to it (null: rows only)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Forward-pass precision: `auto` = bf16 autocast on CUDA, fp32 on CPU; master weights and the LM head's log-softmax stay fp32."""
    gradient_checkpointing: bool = False
    """Recompute the transformer's activations in the backward pass (less activation memory for long prompts, for about one more forward pass of compute)."""
    updates_per_iteration: int = 2
    """Gradient steps per iteration (one policy version per iteration)."""
    loss: Literal["reinforce", "ppo_clip"] = "reinforce"
    """REINFORCE with truncated importance weights, or PPO's clipped surrogate."""
    clip_eps: float = 0.2
    """PPO clip range."""
    is_truncation: float = 2.0
    """Upper bound of the per-token importance ratio for `reinforce`."""
    baseline: Literal["running_mean", "leave_one_out", "value", "none"] = "running_mean"
    """Baseline b(x): per-task running mean, leave-one-out over the other samples of the same task and trial (a fresh batch's; with replay batches every stored one, see `baseline_version_window`), a learned value head on the reflector's hidden state at the prompt's end (`value`), or none."""
    baseline_decay: float = 0.9
    """EMA decay of the per-task running-mean baseline."""
    baseline_version_window: Optional[int] = 2
    """`leave_one_out` on replay batches: a row's group is every stored row of its task and trial whose policy_version is within this many versions of its own (the row itself left out); null = any version. Rows alone in their group fall back to the running mean."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    kl_coef: float = 0.0
    """Weight of the KL penalty to the initial reflector (the same model with the LoRA adapter disabled), k3 estimate summed over a reflection's tokens; 0 = off (losses/kl is logged either way)."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (per-token entropy of the reflector at the reflection tokens, summed per reflection); 0 = off (losses/entropy is logged either way)."""
    value_lr: float = 1e-3
    """`baseline: value` only: AdamW learning rate of the value head (trained on the rewards by squared error, on the reflector's hidden state detached, so it never moves the adapter)."""
    batch_source: Literal["replay", "fresh"] = "replay"
    """`replay`: sample batches from the store (sampler, staleness filter); `fresh`: this iteration's on-policy samples, whole groups kept together."""
    sft_iterations: int = 0
    """Warm start (the paper's SFT stage): the first n iterations (async: policy versions) maximise the likelihood of positively rewarded reflections in the store (async: those in each sampled batch)."""
    probe_tolerance: float = 2e-2
    """Cap on the probe check after a sync: mean absolute log-prob gap per probe token, learner vs worker; each version's tolerance lies between the bf16 precision floor and half the distance the version moved the probe (learner/probe.py)."""
    max_policy_lag: int = 2
    """Async mode: rows more than this many versions behind the learner are never trained on (counted), and workers this far behind pause."""
    updates_per_version: int = 1
    """Async mode: gradient steps between published (and checkpointed) policy versions."""
    max_bad_steps: int = 10
    """Gradient steps in a row with a non-finite loss or gradient norm (each skipped, counted in `learner/bad_steps`) before the run stops with an error."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    reflector: ReflectorConfig = field(default_factory=ReflectorConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)

    @property
    def run_location(self) -> str:
        """Where the run's durable outputs go (config.yaml, metrics.jsonl, checkpoints/, replay/):
        an absolute path, or a pyarrow URI as given (never resolved)."""
        from retro_dist.replay import location

        out = self.run.output_dir
        return location.join(out if location.is_uri(out) else os.path.abspath(out), self.run.name)

    @property
    def run_dir(self) -> Path:
        """The run's local folder: the run location itself on a local disk (a path or `file://`),
        else its local mirror (logs, TensorBoard, events, downloaded checkpoints; replay/location.py)."""
        from retro_dist.replay import location

        return Path(location.local_mirror(self.run_location))

    def outputs_of(self, run_dir) -> str:
        """Where the durable outputs of the run whose local folder is `run_dir` go: run_location
        for this config's own run folder (a remote output_dir's mirror included), else run_dir."""
        return self.run_location if Path(run_dir) == self.run_dir else os.path.abspath(run_dir)


def _check_type(value: Any, hint: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check_type(value, inner, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_type(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:  # an empty YAML section (`ray:` with nothing under it)
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{near[0]}'?)" if near else ""
            raise ConfigError(f"unknown config key '{dotted}'{hint}")
        hint_t = hints[key]
        if dataclasses.is_dataclass(hint_t):
            kwargs[key] = _build(hint_t, value, f"{dotted}.")
        else:
            kwargs[key] = _check_type(value, hint_t, dotted)
    try:
        return cls(**kwargs)
    except ValueError as err:  # a section's own __post_init__ check
        raise ConfigError(str(err)) from None


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: '{p}' is not a section")
    node[leaf] = value


def _override_value(raw: str):
    """An override's value, typed as YAML reads it (`5`, `1e-3`, `[a, b]`, `{k: v}`), except that text
    YAML cannot read or would read as a block mapping stays a string, as the shell gave it:
    `env.game_params=coin: numLocations=6; mapreader: numLocations=11`."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw.strip()
    return raw.strip() if isinstance(value, dict) and not raw.lstrip().startswith("{") else value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """YAML file (or defaults when None) + `key.sub=value` overrides -> validated Config."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML ({str(err).splitlines()[0]})") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), _override_value(raw))
    cfg = _build(Config, data, "")
    from retro_dist.config_rules import validate  # the rules import this module's dataclasses

    validate(cfg, given=_given_keys(data))
    return cfg


def _given_keys(data: dict, prefix: str = "") -> set[str]:
    """Dotted keys the user set (YAML or --set), so mode-specific keys can be checked by presence."""
    keys = set()
    for k, v in (data or {}).items():
        keys.add(f"{prefix}{k}")
        if isinstance(v, dict):
            keys |= _given_keys(v, f"{prefix}{k}.")
    return keys


def as_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
