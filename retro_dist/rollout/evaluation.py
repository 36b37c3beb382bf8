"""Evaluation arms: the same episode loop, four sources of reflections (a plain class, like the worker).

- `none`: no reflection, retries only (memory stays empty);
- `initial`: the reflector's starting checkpoint (LoRA B = 0: the base model), Reflexion-style;
- `trained`: the reflector with a trained adapter loaded (Retroformer);
- `oracle`: the environment's oracle plan written as a reflection (an upper bound for the actor).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from retro_dist.agents.backends import Adapter, Generation
from retro_dist.agents.policies import build_policies
from retro_dist.agents.pretrain import plan_reflection
from retro_dist.config import Config
from retro_dist.core.stats import first_success
from retro_dist.envs.base import Task
from retro_dist.envs.registry import MixedEnv, family, split_game
from retro_dist.rollout.episode import EpisodeIds, run_episodes

ARMS = ("none", "initial", "trained", "oracle")


def load_adapter(checkpoint: str, version: int = 10**6) -> Adapter:
    """A peft adapter folder (adapter_model.safetensors + adapter_config.json) as workers load it."""
    from safetensors.torch import load_file

    path = Path(checkpoint)
    if not (path / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(f"no peft adapter in {checkpoint} (expected adapter_model.safetensors)")
    return Adapter(version, load_file(str(path / "adapter_model.safetensors")),
                   json.loads((path / "adapter_config.json").read_text()))


class OracleReflector:
    """Writes the oracle plan as the reflection (same text format the reflector's output takes)."""

    version = -1

    def __init__(self, cfg):
        self.cfg = cfg
        self._families: dict = {}

    def fits(self, text: str) -> bool:
        return True

    def reflect(self, prompt_texts: Sequence[str], seed: int, tasks: Sequence[Task] = ()) -> list[Generation]:
        out = []
        for task in tasks:
            fam = split_game(task.env_name)[0]
            if fam not in self._families:
                self._families[fam] = family(fam, self.cfg)
            plan = self._families[fam].oracle_plan(task) or ["look around"]
            text = plan_reflection(plan)[len("In the next trial I will "):]
            out.append(Generation([], [], [], " " + text))
        return out


class Evaluator:
    def __init__(self, cfg: Config, worker_id: int = 0):
        self.cfg = cfg
        self.worker_id = worker_id
        self.actor, self.reflector = build_policies(cfg.actor, cfg.reflector, cfg.vllm, seed=cfg.run.seed)
        self.envs = [MixedEnv(cfg.env) for _ in range(cfg.rollout.parallel_tasks)]
        self.oracle = OracleReflector(cfg.env)

    def run_arm(self, arm: str, tasks: Sequence[Task], trials: int,
                adapter: Optional[Adapter] = None) -> list[Optional[int]]:
        """First successful trial per task (None if never), over `trials` trials."""
        if arm not in ARMS:
            raise ValueError(f"unknown arm '{arm}' (arms: {', '.join(ARMS)})")
        if arm == "trained":
            if adapter is None:
                raise ValueError("the trained arm needs an adapter")
            self.reflector.load(adapter)
        reflector = {"none": None, "oracle": self.oracle}.get(arm, self.reflector)
        if arm == "initial" and self.reflector.version >= 0:
            raise RuntimeError("run the initial arm before loading a trained adapter")
        first: dict[int, int] = {}
        step = self.cfg.rollout.parallel_tasks
        for lo in range(0, len(tasks), step):
            chunk = list(tasks[lo: lo + step])
            ids = EpisodeIds("eval", self.worker_id, list(range(lo, lo + len(chunk))), seed=self.cfg.run.seed + lo)
            out = run_episodes(chunk, self.envs[: len(chunk)], ids, self.actor, reflector, trials,
                               self.cfg.rollout.memory_size, self.cfg.env.step_limit)
            first.update(first_success(out.trials))
        return [first.get(i) for i in range(len(tasks))]

    def close(self) -> None:
        for env in self.envs:
            env.close()
