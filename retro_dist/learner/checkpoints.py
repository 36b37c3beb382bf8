"""Checkpoints: the peft adapter plus the learner's state, as safetensors + JSON.

Nothing is unpickled from disk: tensors (LoRA weights, AdamW moments and step counts) are
safetensors, everything else (version, steps, the baseline's per-task means, the optimizer's
hyper-parameters) is JSON. A checkpoint is written to a temp folder and renamed, so a crash
mid-save leaves the previous one intact and `restore` never picks a half-written one.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

STATE_JSON = "learner_state.json"
OPTIMIZER_TENSORS = "optimizer.safetensors"
LEGACY_STATE = "learner_state.pt"  # older checkpoints; read with weights_only=True


def save(folder: Path, policy, optimizer: torch.optim.Optimizer, extra: dict,
         files: Optional[dict] = None) -> Path:
    """Write `folder` atomically: adapter files, optimizer tensors, and `extra` (JSON) as the state.
    `files`: more safetensors files to write inside it, file name -> {tensor name: tensor} (the
    value head's weights); they are renamed into place with the rest."""
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    policy.model.save_pretrained(tmp)
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in opt["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    save_file(tensors, str(tmp / OPTIMIZER_TENSORS))
    for name, more in (files or {}).items():
        save_file(more, str(tmp / name))
    state = dict(extra, optimizer={"param_groups": opt["param_groups"], "scalars": scalars})
    (tmp / STATE_JSON).write_text(json.dumps(state, default=float))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def newest(checkpoints: Path) -> Optional[Path]:
    """The newest complete checkpoint folder (temp folders and folders without a state are skipped)."""
    done = sorted(p for p in checkpoints.glob("[0-9]*")
                  if p.suffix != ".tmp" and ((p / STATE_JSON).is_file() or (p / LEGACY_STATE).is_file()))
    return done[-1] if done else None


def load(folder: Path, policy, optimizer: torch.optim.Optimizer) -> dict:
    """Load adapter and optimizer into `policy` / `optimizer`; returns the JSON state (version, steps, ...)."""
    from safetensors.torch import load_file

    policy.check_adapter_config(json.loads((folder / "adapter_config.json").read_text()), str(folder))
    policy.load_lora_state(load_file(str(folder / "adapter_model.safetensors")), f"checkpoint {folder}")
    if not (folder / STATE_JSON).is_file():
        # the baseline's EMAs were numpy float64 scalars: allow exactly those types, nothing else
        numpy_scalars = [np._core.multiarray.scalar, np.dtype, type(np.dtype(np.float64))]
        with torch.serialization.safe_globals(numpy_scalars):
            state = torch.load(folder / LEGACY_STATE, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state.pop("optimizer"))
        return state
    state = json.loads((folder / STATE_JSON).read_text())
    saved = state.pop("optimizer")
    per_param: dict[int, dict] = {}
    for key, value in load_file(str(folder / OPTIMIZER_TENSORS)).items():
        idx, name = key.split(".", 1)
        per_param.setdefault(int(idx), {})[name] = value
    for key, value in saved["scalars"].items():
        idx, name = key.split(".", 1)
        per_param.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": saved["param_groups"]})
    return state
