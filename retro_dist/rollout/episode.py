"""Multi-trial episodes (README "What a run does"), stepped in lockstep so backends see batched prompts.

For each task: trial k runs the actor with the last M reflections in its prompt; if the trial
failed and another trial follows, the reflector writes y_k from (τ_k, G_k, earlier reflections);
trial k+1 then runs with y_k in memory, and y_k's reward is r_k = G_{k+1} − G_k. A task stops
at its first success (cumulative success, as in Reflexion). An environment that raises, or a
request of the episode's that fails for good (the endpoint out of retries, a prompt the engine
rejects), marks that episode errored (reason kept in the trial record and `errors`) and the other
episodes go on. If the engine dies under a batch (`EngineDead`: the backend has rebuilt it), the
episodes of that batch error and later batches run on the new engine.

Every sampled request gets its own seed, `request_seed(episode_seed, trial, step)`, so an episode's
actions and reflections depend on its own seed only, never on which episodes share a batch: the
continuous-batching runner (`rollout/concurrent.py`) shares this bookkeeping and reproduces these
records for the same jobs.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

from retro_dist.agents import prompts
from retro_dist.agents.prompts import PromptBuilder
from retro_dist.agents.backends import BackendError, Generation
from retro_dist.agents.policies import ActorPolicy, ReflectorPolicy
from retro_dist.core.records import ReflectionSample, TrialRecord, make_key
from retro_dist.envs.base import Observation, Task, TextEnv


@dataclass
class EpisodeIds:
    run_id: str
    worker_id: int
    episode_ids: list[int]  # one per task, deterministic so re-runs reuse keys
    seed: int  # episode i of the batch has seed `seed + i` (its `EpisodeJob.seed` in the concurrent runner)


REFLECT_STEP = -1  # the `step` of a reflection's request seed


def request_seed(episode_seed: int, trial: int, step: int) -> int:
    """Seed of one sampled request: a hash of (episode seed, trial, step), in [0, 2^31)."""
    digest = hashlib.blake2b(f"{episode_seed}/{trial}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


@dataclass
class _Episode:
    task: Task
    env: Optional[TextEnv]  # None in the concurrent runner (it borrows pooled simulators)
    episode_id: int
    seed: int = 0
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
    actor_prompts: Optional[PromptBuilder] = None  # token pieces cached for the episode's lifetime
    reflector_prompts: Optional[PromptBuilder] = None

    def start_trial(self, instruction: str, first: Observation) -> None:
        self.instruction, self.last, self.first_obs = instruction, first, first.text

    def record_step(self, action: str, obs: Observation) -> None:
        self.last = obs
        self.steps.append((action, obs.text))
        self.rewards.append(obs.reward)

    def acting(self) -> bool:
        return self.error is None and self.last is not None and not self.last.done

    def actor_prompt(self, actor) -> prompts.PromptText:
        if self.actor_prompts is None:
            self.actor_prompts = PromptBuilder.for_policy(actor)
        return self.actor_prompts.build(prompts.actor_parts(
            self.task.env_name, self.instruction, self.memory, self.first_obs, self.steps))

    def reflection_prompt(self, reflector) -> prompts.PromptText:
        if self.reflector_prompts is None:
            self.reflector_prompts = PromptBuilder.for_policy(reflector)
        return self.reflector_prompts.build(prompts.reflection_parts(
            self.task.env_name, self.instruction, self.memory, self.first_obs, self.steps, self.returns[-1]))

    def valid_actions(self) -> Optional[list[str]]:
        """Only a complete list can be scored; elsewhere (HotPotQA's finish[answer]) the actor generates."""
        return self.last.valid_actions if self.last.actions_complete else None


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


def _run_trial(live: list[_Episode], actor: ActorPolicy, step_limit: int, trial: int) -> None:
    for ep in live:
        ep.steps, ep.rewards, ep.started = [], [], time.time()
        reset = _guard(ep, ep.env.reset, ep.task)
        if reset is not None:
            ep.start_trial(*reset)
    for t in range(step_limit):
        acting = [ep for ep in live if ep.acting()]
        if not acting:
            break
        texts = [ep.actor_prompt(actor) for ep in acting]
        seeds = [request_seed(ep.seed, trial, t) for ep in acting]
        try:
            actions = actor.act(texts, seed=seeds, valid_actions=[ep.valid_actions() for ep in acting])
        except BackendError as err:  # the whole call failed (the engine died): these episodes error
            for ep in acting:
                ep.error = f"{type(err).__name__}: {err}"
            break
        for ep, action in zip(acting, actions):
            if isinstance(action, BackendError):  # this episode's request failed for good: only it errors
                ep.error = f"{type(action).__name__}: {action}"
                continue
            obs = _guard(ep, ep.env.step, action)
            if obs is not None:
                ep.record_step(action, obs)


def trial_record(ep: _Episode, run_id: str, worker_id: int, trial: int, version: int) -> TrialRecord:
    ok = ep.error is None
    ret = ep.last.score if ok and ep.last is not None else 0.0
    success = bool(ok and ep.last is not None and ep.last.success)
    return TrialRecord(
        key=make_key(run_id, worker_id, ep.episode_id, trial), run_id=run_id,
        worker_id=worker_id, episode_id=ep.episode_id, task_id=ep.task.task_id,
        env_name=ep.task.env_name, trial=trial, actions=[a for a, _ in ep.steps],
        observations=[ep.first_obs] + [o for _, o in ep.steps], step_rewards=list(ep.rewards),
        memory=list(ep.memory), ret=float(1.0 if success else ret), success=success,
        policy_version=version, error=ep.error, wall_seconds=time.time() - ep.started,
        created_at=time.time())


def _reflection_sample(ep: _Episode, run_id: str, worker_id: int, trial: int,
                       ret_after: float) -> ReflectionSample:
    gen, text, ret_before, version = ep.pending
    return ReflectionSample(
        key=make_key(run_id, worker_id, ep.episode_id, trial), run_id=run_id,
        worker_id=worker_id, episode_id=ep.episode_id, task_id=ep.task.task_id,
        env_name=ep.task.env_name, trial=trial, prompt_ids=list(gen.prompt_ids),
        reflection_ids=list(gen.token_ids), behaviour_logprobs=list(gen.logprobs),
        reflection_text=text, return_before=ret_before, return_after=ret_after,
        reward=ret_after - ret_before, policy_version=version, created_at=time.time())


def run_episodes(tasks: Sequence[Task], envs: Sequence[TextEnv], ids: EpisodeIds,
                 actor: ActorPolicy, reflector: Optional[ReflectorPolicy], trials: int, memory_size: int,
                 step_limit: int) -> EpisodeOutput:
    """Run len(tasks) multi-trial episodes side by side, one environment each."""
    eps = [_Episode(t, e, i, seed=ids.seed + n) for n, (t, e, i) in enumerate(zip(tasks, envs, ids.episode_ids))]
    out = EpisodeOutput([], [], [])
    for k in range(trials):
        live = [ep for ep in eps if not ep.solved and ep.error is None]
        if not live:
            break
        _run_trial(live, actor, step_limit, trial=k)
        for ep in live:
            finish_trial(ep, out, ids.run_id, ids.worker_id, k, reflector.version if reflector is not None else -1)
        failed = [ep for ep in live if ep.error is None and not ep.solved]
        if k + 1 < trials and failed and reflector is not None:  # None: retries without reflection
            _reflect(failed, reflector, memory_size, k, out)
    return out


def finish_trial(ep: _Episode, out: EpisodeOutput, run_id: str, worker_id: int, trial: int, version: int) -> None:
    """Write trial k's record; its return rewards the reflection written after trial k-1."""
    rec = trial_record(ep, run_id, worker_id, trial, version)
    out.trials.append(rec)
    if ep.error is not None:
        out.errors.append(f"{ep.task.task_id} trial {trial}: {ep.error}")
        return  # an errored trial gives no return to reward the pending reflection
    ep.returns.append(rec.ret)
    ep.solved = rec.success
    if ep.pending is not None:
        out.reflections.append(_reflection_sample(ep, run_id, worker_id, trial - 1, rec.ret))
        ep.pending = None


def remember(ep: _Episode, gen: Generation, version: int, memory_size: int) -> None:
    """y_k goes into the memory of trial k+1; its sample waits there for G_{k+1}."""
    text = prompts.reflection_from_text(gen.text)
    ep.pending = (gen, text, ep.returns[-1], version)
    ep.memory = (ep.memory + [text])[-memory_size:] if memory_size else []


def _reflect(failed: list[_Episode], reflector: ReflectorPolicy, memory_size: int, trial: int,
             out: EpisodeOutput) -> None:
    texts = [ep.reflection_prompt(reflector) for ep in failed]
    seeds = [request_seed(ep.seed, trial, REFLECT_STEP) for ep in failed]
    try:
        gens = reflector.reflect(texts, seed=seeds, tasks=[ep.task for ep in failed])
    except BackendError as err:  # the engine died under the batch: all of its episodes end here
        gens = [err] * len(failed)
    for ep, gen in zip(failed, gens):
        if isinstance(gen, BackendError):  # as the continuous runner: the episode ends, its trials stand
            ep.error = f"{type(gen).__name__}: {gen}"
            out.errors.append(reflection_error(ep, trial, gen))
            continue
        remember(ep, gen, gen.version if gen.version is not None else reflector.version, memory_size)


def reflection_error(ep: _Episode, trial: int, err: BaseException) -> str:
    return f"{ep.task.task_id} reflection after trial {trial}: {type(err).__name__}: {err}"
