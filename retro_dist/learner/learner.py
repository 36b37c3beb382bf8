"""The learner: baselined policy gradients on the reflector's LoRA parameters (HF + peft).

Each update samples reflection samples from the replay store, recomputes log P_θ(y|x) under the
current policy (batched, micro-batched), subtracts a baseline from r_k = G_{k+1} − G_k, and steps
AdamW. Each iteration ends a policy version: the adapter is saved in peft format and published
with a probe (token ids + the learner's log-probs) that workers must reproduce after loading.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from retro_dist.agents.backends import Adapter, check_lora_config, load_tokenizer
from retro_dist.config import LearnerConfig, ReflectorConfig
from retro_dist.core import baselines, losses
from retro_dist.core.sampling import importance_weights
from retro_dist.replay.config import ReplayConfig
from retro_dist.replay.store import ReplayStore

PROBE_PROMPT = "Game: twx/coin\nTask: probe the weights after a sync.\nReflection: In the next trial I will"
PROBE_COMPLETION = " go north, then take the coin"


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v)))


def pad(rows: list, width: int, value) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.float32 if isinstance(value, float) else torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r, dtype=out.dtype)
    return out


class Learner:
    def __init__(self, cfg: LearnerConfig, reflector: ReflectorConfig, replay_root: str,
                 replay_cfg: ReplayConfig, run_dir: str, seed: int):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        self.cfg = cfg
        self.device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                                   else ("cpu" if cfg.device == "auto" else cfg.device))
        self.tokenizer = load_tokenizer(reflector.model)
        base = AutoModelForCausalLM.from_pretrained(reflector.model, dtype=torch.float32)
        lora = LoraConfig(r=reflector.lora_rank, lora_alpha=reflector.lora_alpha,
                          target_modules=list(reflector.lora_target_modules), lora_dropout=0.0)
        self.model = get_peft_model(base, lora).to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr)
        self.store = ReplayStore(replay_root, replay_cfg)
        self.baseline = baselines.RunningMeanBaseline(cfg.baseline_decay)
        self.rng = np.random.default_rng(seed)
        self.run_dir = Path(run_dir)
        self.version = 0  # policy version of the current weights
        self.steps = 0  # gradient steps taken
        self.probe_prompt = self.tokenizer(PROBE_PROMPT).input_ids
        self.probe_completion = self.tokenizer(PROBE_COMPLETION, add_special_tokens=False).input_ids

    def current_version(self) -> int:
        return self.version

    # ---- weights out -------------------------------------------------------------------------
    def adapter(self) -> Adapter:
        """The current adapter as workers load it, with the probe they must reproduce."""
        from peft import get_peft_model_state_dict

        tensors = {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(self.model).items()}
        probe = {"prompt_ids": self.probe_prompt, "completion_ids": self.probe_completion,
                 "logprobs": self._probe_logprobs()}
        return Adapter(self.version, tensors, _jsonable(self.model.peft_config["default"].to_dict()),
                       extra={"probe": probe})

    @torch.no_grad()
    def _probe_logprobs(self) -> list[float]:
        ids = torch.tensor([self.probe_prompt + self.probe_completion], device=self.device)
        lp = losses.token_logprobs(self.model(input_ids=ids).logits, ids)[0]
        return lp[len(self.probe_prompt) - 1:].tolist()

    def save_checkpoint(self) -> Path:
        """peft adapter + learner state, written to a temp folder and renamed: a crash mid-save
        leaves no half checkpoint for `restore` to pick."""
        final = self.run_dir / "checkpoints" / f"{self.version:06d}"
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp)
        torch.save({"optimizer": self.optimizer.state_dict(), "baseline": self.baseline.state_dict(),
                    "version": self.version, "steps": self.steps}, tmp / "learner_state.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return final

    def restore(self) -> Optional[int]:
        """Load the newest complete checkpoint of this run, if any; returns its version."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        ckpts = sorted(p for p in (self.run_dir / "checkpoints").glob("[0-9]*")
                       if p.suffix != ".tmp" and (p / "learner_state.pt").is_file())
        if not ckpts:
            return None
        path = ckpts[-1]
        check_lora_config(json.loads((path / "adapter_config.json").read_text()), self.model, str(path))
        result = set_peft_model_state_dict(self.model, load_file(str(path / "adapter_model.safetensors")))
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing:
            raise RuntimeError(f"checkpoint {path} lacks {len(missing)} LoRA tensors, e.g. {missing[0]}")
        state = torch.load(path / "learner_state.pt", map_location=self.device, weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.baseline.load_state_dict(state["baseline"])
        self.version, self.steps = state["version"], state["steps"]
        return self.version

    # ---- learning ----------------------------------------------------------------------------
    def train_iteration(self) -> dict:
        """`updates_per_iteration` gradient steps, then a new policy version and a checkpoint."""
        t0 = time.time()
        self.store.refresh()
        sft = self.version < self.cfg.sft_iterations
        if sft:
            stats = self._sft_steps()
        elif self.cfg.batch_source == "fresh":
            stats = self._fresh_steps()
        else:
            stats = self._replay_steps()
        self.version += 1
        ckpt = self.save_checkpoint()
        out = {k: float((np.max if k.endswith("_max") else np.mean)([s[k] for s in stats]))
               for k in stats[0]} if stats else {}
        out.update({"learner/updates": len(stats), "learner/version": self.version, "learner/sft": int(sft),
                    "learner/steps": self.steps, "learner/checkpoint": str(ckpt),
                    "time/learn_seconds": time.time() - t0})
        out.update(self.store.metrics())
        return out

    def _replay_steps(self) -> list[dict]:
        stats = []
        for _ in range(self.cfg.updates_per_iteration):
            batch = self.store.sample("reflections", self.cfg.batch_size, rng=self.rng,
                                      step=self.steps, current_version=self.version)
            if batch is None or batch.table.num_rows == 0:
                break
            adv, base = self.advantages(batch.table)
            if self.store.cfg.sampler != "uniform":  # undo the sampler's bias (Schaul et al. 2016)
                adv = adv * importance_weights(batch.probs, self.store.num_rows("reflections"))
            stats.append(self.update(batch.table, adv, base))
        return stats

    def _fresh_steps(self) -> list[dict]:
        """On-policy: this version's samples, advantages computed over whole groups first."""
        table = self.store.read("reflections", min_policy_version=self.version)
        if table.num_rows == 0:
            return []
        adv, base = self.advantages(table)
        stats = []
        for _ in range(self.cfg.updates_per_iteration):
            idx = self.rng.choice(table.num_rows, size=min(self.cfg.batch_size, table.num_rows), replace=False)
            stats.append(self.update(table.take(idx), adv[idx], base[idx]))
        return stats

    def _sft_steps(self) -> list[dict]:
        """Likelihood of positively rewarded reflections: REINFORCE with A = 1 and on-policy weights."""
        table = self.store.read("reflections")
        reward = np.asarray(table.column("reward").to_numpy(zero_copy_only=False))
        table = table.filter(reward > 0)
        stats = []
        for _ in range(self.cfg.updates_per_iteration if table.num_rows else 0):
            idx = self.rng.choice(table.num_rows, size=min(self.cfg.batch_size, table.num_rows), replace=False)
            stats.append(self.update(table.take(idx), np.ones(len(idx)), np.zeros(len(idx)), on_policy=True))
        return stats

    def advantages(self, table) -> tuple[np.ndarray, np.ndarray]:
        """(A, b) per row. Leave-one-out groups are samples of the same task and trial."""
        cols = table.select(["task_id", "trial", "reward"]).to_pydict()
        rewards = np.asarray(cols["reward"], dtype=np.float64)
        b = self.baseline.values(cols["task_id"])
        if self.cfg.baseline == "leave_one_out":
            groups = [f"{t}#{k}" for t, k in zip(cols["task_id"], cols["trial"])]
            b = baselines.leave_one_out(groups, rewards, fallback=b)
        elif self.cfg.baseline == "none":
            b = np.zeros_like(rewards)
        self.baseline.update(cols["task_id"], rewards)
        return rewards - b, b

    def update(self, table, adv: Optional[np.ndarray] = None, base: Optional[np.ndarray] = None,
               on_policy: bool = False) -> dict:
        """One gradient step on a batch of reflection samples (an Arrow table)."""
        cols = table.to_pydict()
        rewards = np.asarray(cols["reward"], dtype=np.float64)
        if adv is None:
            adv, base = self.advantages(table)
        n = len(rewards)
        self.optimizer.zero_grad(set_to_none=True)
        parts = []
        for lo in range(0, n, self.cfg.micro_batch_size):
            sl = slice(lo, lo + self.cfg.micro_batch_size)
            loss, st = self._micro_loss(cols["prompt_ids"][sl], cols["reflection_ids"][sl],
                                        None if on_policy else cols["behaviour_logprobs"][sl], adv[sl], normalizer=n)
            loss.backward()
            parts.append(st)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.steps += 1
        lag = self.version - np.asarray(cols["policy_version"])
        return {"losses/pg": sum(p.loss for p in parts), "losses/grad_norm": float(grad_norm),
                "losses/mean_ratio": float(np.mean([p.mean_ratio for p in parts])),
                "losses/clip_fraction": float(np.mean([p.clip_fraction for p in parts])),
                "losses/logprob": float(np.mean([p.mean_logprob for p in parts])),
                "reward/mean": float(rewards.mean()), "reward/baseline": float(np.mean(base)),
                "reward/advantage_abs": float(np.abs(adv).mean()),
                "staleness/version_lag_mean": float(lag.mean()), "staleness/version_lag_max": int(lag.max())}

    def _micro_loss(self, prompt_ids, refl_ids, behaviour, adv, normalizer: int):
        seqs = [list(p) + list(r) for p, r in zip(prompt_ids, refl_ids)]
        width = max(len(s) for s in seqs)
        ids = pad(seqs, width, self.tokenizer.pad_token_id).to(self.device)
        attn = pad([[1] * len(s) for s in seqs], width, 0).to(self.device)
        t_max = max(max(len(r) for r in refl_ids), 1)
        # Reflection token r of row i sits at position P_i + r; its log-prob is at P_i + r - 1.
        gather = pad([[len(p) - 1 + r for r in range(len(y))] for p, y in zip(prompt_ids, refl_ids)], t_max, 0)
        mask = pad([[1.0] * len(y) for y in refl_ids], t_max, 0.0).to(self.device)
        tok_lp = losses.token_logprobs(self.model(input_ids=ids, attention_mask=attn).logits, ids)
        logp = tok_lp.gather(1, gather.to(self.device)) * mask
        # behaviour None: treat the samples as on-policy (importance weights 1), as SFT does
        beh = (logp.detach() if behaviour is None else pad([list(x) for x in behaviour], t_max, 0.0).to(self.device))
        a = torch.as_tensor(adv, dtype=torch.float32, device=self.device)
        if self.cfg.loss == "ppo_clip":
            return losses.ppo_clip_loss(logp, beh, a, mask, normalizer, self.cfg.clip_eps)
        return losses.reinforce_loss(logp, beh, a, mask, normalizer, self.cfg.is_truncation)
