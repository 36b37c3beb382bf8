"""The learner: baselined policy gradients on the reflector's LoRA parameters.

Per iteration: take `updates_per_iteration` batches of reflection samples (from the replay store,
this version's fresh samples, or the SFT warm start's positive ones), recompute
log P_θ(y|x) under the current policy at the reflection tokens, subtract a baseline from
r_k = G_{k+1} − G_k, and step AdamW; then end the policy version: save the adapter and publish it
with a probe (token ids + the learner's log-probs) that workers must reproduce after loading.

The parts live beside this driver: `policy` (model, log-probs, precision), `batches` (token-budget
micro-batches), `update` (one gradient step), `sources` (where batches come from), `checkpoints`,
`distributed` (the data-parallel group) and `probe`.

With a data-parallel group (`dist`, built by `launch/learner_group.py`), rank 0 is this driver;
ranks > 0 run `follow()`, which takes each step's rows from rank 0 and joins its all-reduce.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from retro_dist.agents.backends import Adapter
from retro_dist.config import LearnerConfig, ReflectorConfig
from retro_dist.core import baselines
from retro_dist.learner import checkpoints, ledger, sources
from retro_dist.learner import value as value_mod
from retro_dist.learner.batches import ReferenceCache, Rows
from retro_dist.learner.distributed import DistSpec, Group
from retro_dist.learner.groups import GroupIndex
from retro_dist.learner.policy import PolicyModel, resolve_device
from retro_dist.learner.probe import PROBE_COMPLETION, PROBE_PROMPT, probe_gap, probe_tolerance
from retro_dist.learner.update import BAD_STEP, gradient_step
from retro_dist.replay import location
from retro_dist.replay.config import ReplayConfig
from retro_dist.replay.store import ReplayStore


class Learner:
    def __init__(self, cfg: LearnerConfig, reflector: ReflectorConfig, replay_root: str,
                 replay_cfg: ReplayConfig, run_dir: str, seed: int, dist: Optional[DistSpec] = None):
        torch.manual_seed(seed)  # same seed on every rank: the same initial LoRA weights
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.policy = PolicyModel(reflector, cfg, self.device)
        self.model, self.tokenizer = self.policy.model, self.policy.tokenizer
        # `baseline: value`: a value head on the reflector's hidden state, in the same AdamW step
        # (built after the LoRA, so the adapter's initialisation does not depend on the baseline)
        self.value_head = (value_mod.ValueHead(self.policy.head.weight.shape[1]).to(self.device)
                           if cfg.baseline == "value" else None)
        groups = [{"params": self.policy.params}]
        if self.value_head is not None:  # its own group: its own learning rate
            groups.append({"params": list(self.value_head.parameters()), "lr": cfg.value_lr})
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
        self.group = Group(dist, self.device)
        self.store = ReplayStore(replay_root, replay_cfg)
        self.baseline = baselines.RunningMeanBaseline(cfg.baseline_decay)
        self.groups = GroupIndex(cfg.baseline_version_window)  # leave-one-out over whole stored groups
        self._baseline_stats: dict = {}  # the last advantages() call's, merged into each step's stats
        self.rng = np.random.default_rng(seed)
        self.reference_cache = ReferenceCache()  # log π_ref per row (by its tokens): the KL reference is fixed
        self.run_dir = str(run_dir)  # a path or pyarrow URI (s3://...): checkpoints/ goes under it
        self.local_dir = Path(location.local_mirror(self.run_dir))  # the publish ledger stays local
        self.version = 0  # policy version of the current weights
        self.steps = 0  # gradient steps taken
        self.bad_steps = 0  # steps skipped for a non-finite loss or gradient (not in `steps`)
        self.bad_in_row = 0
        self.probe_prompt = self.tokenizer(PROBE_PROMPT).input_ids
        self.probe_completion = self.tokenizer(PROBE_COMPLETION, add_special_tokens=False).input_ids
        self._probes: dict[int, list[float]] = {}  # version -> published probe log-probs
        if self.group.distributed:  # start from rank 0's weights, whatever each rank's initialisation did
            state = self.group.broadcast(self._state() if self.group.is_leader else None)
            if not self.group.is_leader:
                self._load_state(state)

    def current_version(self) -> int:
        return self.version

    # ---- weights out -------------------------------------------------------------------------
    def adapter(self) -> Adapter:
        """The current adapter as workers load it, with the probe they must reproduce."""
        ids = (self.probe_prompt, self.probe_completion)
        logprobs = self.policy.probe_logprobs(*ids)
        self._probes[self.version] = logprobs
        older = sorted(v for v in self._probes if v < self.version)
        movement = probe_gap(self._probes[max(older)], logprobs) if older else None
        precision = probe_gap(logprobs, self.policy.probe_logprobs(*ids, precision="bf16"))
        probe = {"prompt_ids": ids[0], "completion_ids": ids[1], "logprobs": logprobs,
                 "tolerance": probe_tolerance(self.cfg.probe_tolerance, precision, movement),
                 "precision_gap": precision, "movement": movement}
        for v in older[:-1]:  # keep the previous version's probe only
            del self._probes[v]
        tensors = self.policy.lora_state()
        digest = ledger.weights_digest(tensors)
        ledger.record(self.local_dir, self.version, digest)  # called once per publish
        return Adapter(self.version, tensors, self.policy.peft_config(), extra={"probe": probe, "digest": digest})

    def save_checkpoint(self) -> Path:
        """peft adapter + learner state (safetensors + JSON), written atomically; rank 0 only."""
        if not self.group.is_leader:
            raise RuntimeError("only rank 0 of a learner group writes checkpoints")
        folder = location.join(self.run_dir, "checkpoints", f"{self.version:06d}")
        state = {"version": self.version, "steps": self.steps, "baseline": self.baseline.state_dict()}
        files = {}
        if self.value_head is not None:  # the learned baseline: its weights beside the adapter, its shape in JSON
            state["value_head"] = self.value_head.shape()
            files[value_mod.TENSORS] = self.value_head.tensors()
        return checkpoints.save(folder, self.policy, self.optimizer, state, files=files)

    def restore(self) -> Optional[int]:
        """Load the newest complete checkpoint of this run, if any; returns its version.
        In a group, rank 0 loads it and hands the state to the other ranks."""
        if not self.group.is_leader:
            raise RuntimeError("in a learner group only rank 0 restores; the others receive its state")
        path = checkpoints.newest(location.join(self.run_dir, "checkpoints"))
        if path is None:
            return None
        if self.value_head is not None and not (path / value_mod.TENSORS).is_file():
            raise RuntimeError(f"checkpoint {path} has no value head, but learner.baseline is 'value': "
                               f"resume with the baseline the run was started with")
        state = checkpoints.load(path, self.policy, self.optimizer)
        self._restore_value_head(path, state)
        self.baseline.load_state_dict(state["baseline"])
        self.version, self.steps = int(state["version"]), int(state["steps"])
        if self.group.distributed:
            self.group.broadcast(("state", self._state()))
        return self.version

    def _restore_value_head(self, path: Path, state: dict) -> None:
        """The value head's weights from a checkpoint (its AdamW moments came with the optimizer's)."""
        if self.value_head is None:
            return
        from safetensors.torch import load_file

        self.value_head.load_tensors(load_file(str(path / value_mod.TENSORS), device=str(self.device)),
                                     state["value_head"], f"checkpoint {path}")

    # ---- learning ----------------------------------------------------------------------------
    def train_iteration(self) -> dict:
        """`updates_per_iteration` gradient steps, then a new policy version and a checkpoint."""
        t0 = time.time()
        self.store.refresh()
        sft = self.version < self.cfg.sft_iterations
        source = (sources.sft_batches if sft else
                  sources.fresh_batches if self.cfg.batch_source == "fresh" else sources.replay_batches)
        stats = [self.update(table, adv, base, on_policy=on_policy) for table, adv, base, on_policy in source(self)]
        stats = [s for s in stats if BAD_STEP not in s]  # skipped steps are counted in learner/bad_steps
        self.version += 1
        ckpt = self.save_checkpoint()
        out = {k: float((np.max if k.endswith("_max") else np.mean)([s[k] for s in stats]))
               for k in stats[0]} if stats else {}
        out.update({"learner/updates": len(stats), "learner/version": self.version, "learner/sft": int(sft),
                    "learner/steps": self.steps, "learner/bad_steps": self.bad_steps,
                    "learner/checkpoint": str(ckpt),
                    "time/learn_seconds": time.time() - t0})
        out.update(self.store.metrics())
        return out

    def advantages(self, table, whole_groups: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(A, b) per row. Leave-one-out groups are samples of the same task and trial: those in
        `table` (a whole version's fresh rows), or with `whole_groups` (a replay batch) every row the
        store holds of the group, within `baseline_version_window` versions (learner/groups.py)."""
        cols = table.select(["task_id", "trial", "reward"]).to_pydict()
        rewards = np.asarray(cols["reward"], dtype=np.float64)
        b = self.baseline.values(cols["task_id"])
        if self.cfg.baseline == "leave_one_out" and whole_groups:
            self.groups.sync(self.store)  # folds in only the segments sealed since the last call
            sums, counts = self.groups.lookup(table)
            b, grouped = baselines.leave_one_out_from_sums(rewards, sums, counts, fallback=b)
            self._baseline_stats = {"learner/group_baseline_fraction": float(grouped.mean()),
                                    "learner/group_size_mean": float(counts.mean())}
        elif self.cfg.baseline == "leave_one_out":
            groups = [f"{t}#{k}" for t, k in zip(cols["task_id"], cols["trial"])]
            b = baselines.leave_one_out(groups, rewards, fallback=b)
            _, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
            self._baseline_stats = {"learner/group_baseline_fraction": float(np.mean(sizes[inverse] > 1)),
                                    "learner/group_size_mean": float(np.mean(sizes[inverse]))}
        elif self.cfg.baseline == "value":  # V(x) from the current adapter and head, before the step
            b = value_mod.predict(self.policy, self.value_head, table.column("prompt_ids").to_pylist(),
                              self.cfg.micro_batch_size)
        elif self.cfg.baseline == "none":
            b = np.zeros_like(rewards)
        self.baseline.update(cols["task_id"], rewards)
        return rewards - b, b

    def update(self, table, adv: Optional[np.ndarray] = None, base: Optional[np.ndarray] = None,
               on_policy: bool = False) -> dict:
        """One gradient step on a batch of reflection samples (an Arrow table)."""
        if adv is None:
            adv, base = self.advantages(table)
        rows = Rows.from_table(table, adv, base, on_policy)
        rows.fit_value = self.version >= self.cfg.sft_iterations  # the SFT rows are the positive ones only
        # by content, not by the row's key: a reference log-prob belongs to these exact tokens
        keys = [hash((tuple(p), tuple(r))) for p, r in zip(rows.prompt_ids, rows.reflection_ids)]
        rows.reference = self.reference_cache.lookup(keys)
        if self.group.distributed:
            self.group.broadcast(("step", (rows, self.version)))
        stats = self._step(rows, self.version)
        stats.update(self._baseline_stats)
        self.reference_cache.store(keys, rows.reference)  # what this step computed, for the rows' next steps
        return stats

    def _step(self, rows: Rows, version: int) -> dict:
        """One gradient step; a non-finite one is skipped and counted, `max_bad_steps` in a row stop
        the run (every rank decides alike: gradient_step decides on all-reduced values)."""
        stats = gradient_step(self.policy, self.optimizer, self.cfg, rows, self.group, version, self.value_head)
        if BAD_STEP not in stats:
            self.steps += 1
            self.bad_in_row = 0
            return stats
        self.bad_steps += 1
        self.bad_in_row += 1
        if self.bad_in_row >= self.cfg.max_bad_steps:
            raise RuntimeError(f"learner: {self.bad_in_row} gradient steps in a row had a non-finite loss or "
                               f"gradient norm (last loss {stats['losses/bad_loss']}, grad norm "
                               f"{stats['losses/bad_grad_norm']}; learner.max_bad_steps={self.cfg.max_bad_steps}); "
                               f"the weights and the last checkpoint are from the last good step")
        return stats

    # ---- data-parallel group -----------------------------------------------------------------
    def follow(self) -> int:
        """Ranks > 0: take rank 0's steps until it closes the group; returns the steps taken."""
        while True:
            op, payload = self.group.broadcast()
            if op == "step":
                self._step(*payload)
            elif op == "state":
                self._load_state(payload)
            else:  # "stop"
                self.group.close()
                return self.steps

    def close_group(self) -> None:
        """Rank 0: release the followers (their `follow()` returns) and leave the group."""
        if self.group.distributed and self.group.is_leader:
            self.group.broadcast(("stop", None))
            self.group.close()

    def _state(self) -> dict:
        opt = self.optimizer.state_dict()  # CPU copies: each rank moves them to its own device
        opt["state"] = {i: {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in st.items()}
                        for i, st in opt["state"].items()}
        return {"lora": self.policy.lora_state(), "optimizer": opt, "version": self.version, "steps": self.steps,
                "value_head": None if self.value_head is None else self.value_head.tensors()}

    def _load_state(self, state: dict) -> None:
        self.policy.load_lora_state(state["lora"], "rank 0's state")
        if self.value_head is not None:
            self.value_head.load_tensors(state["value_head"], self.value_head.shape(), "rank 0's state")
        self.optimizer.load_state_dict(state["optimizer"])
        self.version, self.steps = state["version"], state["steps"]
