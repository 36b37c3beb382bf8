"""Multi-trial episodes (DESIGN §1), stepped in lockstep so backends see batched prompts.

For each task: trial k runs the actor with the last M reflections in its prompt; if the trial
failed and another trial follows, the reflector writes y_k from (τ_k, G_k, earlier reflections);
trial k+1 then runs with y_k in memory, and y_k's reward is r_k = G_{k+1} − G_k. A task stops
at its first success (cumulative success, as in Reflexion). An environment that raises marks
its episode errored (reason kept in the trial record) and the other episodes go on.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

from retro_dist.agents import prompts
from retro_dist.agents.backends import BackendError, Generation
from retro_dist.agents.policies import ActorPolicy, ReflectorPolicy
from retro_dist.core.records import ReflectionSample, TrialRecord, make_key
from retro_dist.envs.base import Observation, Task, TextEnv


@dataclass
class EpisodeIds:
    run_id: str
    worker_id: int
    episode_ids: list[int]  # one per task, deterministic so re-runs reuse keys
    seed: int


@dataclass
class _Episode:
    task: Task
    env: TextEnv
    episode_id: int
    memory: list[str] = field(default_factory=list)
    returns: list[float] = field(default_factory=list)
    solved: bool = False
    error: Optional[str] = None
    pending: Optional[tuple[Generation, str, float, int]] = None  # (y_k, text, G_k, version)
    # current trial
    instruction: str = ""
    first_obs: str = ""
    steps: list[tuple[str, str]] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    last: Optional[Observation] = None
    started: float = 0.0


@dataclass
class EpisodeOutput:
    trials: list[TrialRecord]
    reflections: list[ReflectionSample]
    errors: list[str]


def _guard(ep: _Episode, fn, *args):
    """Run an environment call; an exception marks the episode errored instead of ending the run."""
    try:
        return fn(*args)
    except Exception as err:  # environments are user code: any exception is the episode's, not ours
        ep.error = f"{type(err).__name__}: {err}"
        return None


def _run_trial(live: list[_Episode], actor: ActorPolicy, step_limit: int, seed: int) -> None:
    for ep in live:
        ep.steps, ep.rewards, ep.started = [], [], time.time()
        reset = _guard(ep, ep.env.reset, ep.task)
        if reset is not None:
            ep.instruction, ep.last = reset
            ep.first_obs = ep.last.text
    for t in range(step_limit):
        acting = [ep for ep in live if ep.error is None and not ep.last.done]
        if not acting:
            break
        texts = [prompts.actor_prompt(ep.task.env_name, ep.instruction, ep.memory, ep.first_obs,
                                      ep.steps, actor.fits) for ep in acting]
        # only a complete list can be scored; elsewhere (e.g. HotPotQA's finish[answer]) the actor generates
        valid = [ep.last.valid_actions if ep.last.actions_complete else None for ep in acting]
        try:
            actions = actor.act(texts, seed=seed + t, valid_actions=valid)
        except BackendError as err:  # e.g. the actor endpoint timed out: these episodes error, others go on
            for ep in acting:
                ep.error = f"BackendError: {err}"
            break
        for ep, action in zip(acting, actions):
            obs = _guard(ep, ep.env.step, action)
            if obs is not None:
                ep.last = obs
                ep.steps.append((action, obs.text))
                ep.rewards.append(obs.reward)


def _trial_record(ep: _Episode, ids: EpisodeIds, trial: int, version: int) -> TrialRecord:
    ok = ep.error is None
    ret = ep.last.score if ok and ep.last is not None else 0.0
    success = bool(ok and ep.last is not None and ep.last.success)
    return TrialRecord(
        key=make_key(ids.run_id, ids.worker_id, ep.episode_id, trial), run_id=ids.run_id,
        worker_id=ids.worker_id, episode_id=ep.episode_id, task_id=ep.task.task_id,
        env_name=ep.task.env_name, trial=trial, actions=[a for a, _ in ep.steps],
        observations=[ep.first_obs] + [o for _, o in ep.steps], step_rewards=list(ep.rewards),
        memory=list(ep.memory), ret=float(1.0 if success else ret), success=success,
        policy_version=version, error=ep.error, wall_seconds=time.time() - ep.started,
        created_at=time.time())


def _reflection_sample(ep: _Episode, ids: EpisodeIds, trial: int, ret_after: float) -> ReflectionSample:
    gen, text, ret_before, version = ep.pending
    return ReflectionSample(
        key=make_key(ids.run_id, ids.worker_id, ep.episode_id, trial), run_id=ids.run_id,
        worker_id=ids.worker_id, episode_id=ep.episode_id, task_id=ep.task.task_id,
        env_name=ep.task.env_name, trial=trial, prompt_ids=list(gen.prompt_ids),
        reflection_ids=list(gen.token_ids), behaviour_logprobs=list(gen.logprobs),
        reflection_text=text, return_before=ret_before, return_after=ret_after,
        reward=ret_after - ret_before, policy_version=version, created_at=time.time())


def run_episodes(tasks: Sequence[Task], envs: Sequence[TextEnv], ids: EpisodeIds,
                 actor: ActorPolicy, reflector: Optional[ReflectorPolicy], trials: int, memory_size: int,
                 step_limit: int) -> EpisodeOutput:
    """Run len(tasks) multi-trial episodes side by side, one environment each."""
    eps = [_Episode(t, e, i) for t, e, i in zip(tasks, envs, ids.episode_ids)]
    out = EpisodeOutput([], [], [])
    for k in range(trials):
        live = [ep for ep in eps if not ep.solved and ep.error is None]
        if not live:
            break
        _run_trial(live, actor, step_limit, seed=ids.seed + 1000 * k)
        for ep in live:
            rec = _trial_record(ep, ids, k, reflector.version if reflector is not None else -1)
            out.trials.append(rec)
            if ep.error is not None:
                out.errors.append(f"{ep.task.task_id} trial {k}: {ep.error}")
                continue  # an errored trial gives no return to reward the pending reflection
            ep.returns.append(rec.ret)
            ep.solved = rec.success
            if ep.pending is not None:
                out.reflections.append(_reflection_sample(ep, ids, k - 1, rec.ret))
                ep.pending = None
        failed = [ep for ep in live if ep.error is None and not ep.solved]
        if k + 1 < trials and failed and reflector is not None:  # None: retries without reflection
            _reflect(failed, reflector, memory_size, seed=ids.seed + 1000 * k + 500)
    return out


def _reflect(failed: list[_Episode], reflector: ReflectorPolicy, memory_size: int, seed: int) -> None:
    texts = [prompts.reflection_prompt(ep.task.env_name, ep.instruction, ep.memory, ep.first_obs,
                                       ep.steps, ep.returns[-1], reflector.fits) for ep in failed]
    gens = reflector.reflect(texts, seed=seed, tasks=[ep.task for ep in failed])
    for ep, gen in zip(failed, gens):
        text = prompts.reflection_from_text(gen.text)
        ep.pending = (gen, text, ep.returns[-1], reflector.version)
        ep.memory = (ep.memory + [text])[-memory_size:] if memory_size else []
