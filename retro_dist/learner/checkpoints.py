"""Checkpoints: the peft adapter plus the learner's state, as safetensors + JSON.

Nothing is unpickled from disk: tensors (LoRA weights, AdamW moments and step counts) are
safetensors, everything else (version, steps, the baseline's per-task means, the optimizer's
hyper-parameters) is JSON.

Where a checkpoint goes (`folder`: a path, or a pyarrow URI such as s3://...):
- local disk: written to a temp folder, every file and the folder fsynced, then renamed (and
  the parent fsynced), so a crash mid-save leaves the previous one intact and `newest` never
  picks a half-written one;
- object store (no atomic rename): written once into a local staging folder, each file
  uploaded once under its final name, then the COMMIT marker (the file list) last. `newest`
  only returns folders whose marker is there, downloaded into the run's local mirror, so
  `load` always reads a local folder.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from retro_dist.replay import location

STATE_JSON = "learner_state.json"
OPTIMIZER_TENSORS = "optimizer.safetensors"
LEGACY_STATE = "learner_state.pt"  # older checkpoints; read with weights_only=True
COMMIT = "COMMIT"  # object stores: written last, lists the checkpoint's files

Where = Union[Path, str]


def save(folder: Where, policy, optimizer: torch.optim.Optimizer, extra: dict,
         files: Optional[dict] = None) -> Where:
    """Write `folder` atomically: adapter files, optimizer tensors, and `extra` (JSON) as the state.
    `files`: more safetensors files to write inside it, file name -> {tensor name: tensor} (the
    value head's weights); they are committed with the rest. Returns the folder: a Path on a
    local disk, the URI otherwise."""
    if location.is_local(str(folder)):
        local = Path(location.local_path(str(folder)))
        tmp = local.with_name(local.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        _write(tmp, policy, optimizer, extra, files)
        for p in tmp.rglob("*"):  # the data, then the rename: never a renamed folder of lost pages
            location.fsync_path(str(p), directory=p.is_dir())
        location.fsync_path(str(tmp), directory=True)
        shutil.rmtree(local, ignore_errors=True)
        os.replace(tmp, local)
        location.fsync_path(str(local.parent), directory=True)
        return local
    with tempfile.TemporaryDirectory(prefix="retro-ckpt-") as staging:
        tmp = Path(staging) / "ckpt"
        _write(tmp, policy, optimizer, extra, files)
        _upload(tmp, str(folder))
    return folder


def _upload(tmp: Path, folder: str) -> None:
    """Each file once under its final name, then the marker: a reader that sees COMMIT sees all."""
    fs, root = location.open_location(folder)
    fs.create_dir(root, recursive=True)  # the bucket, on a fresh object store
    marker = f"{root}/{COMMIT}"
    if fs.get_file_info(marker).type != location.pafs.FileType.NotFound:
        fs.delete_file(marker)  # re-saving a version: it is not committed until the new marker
    names = sorted(p.name for p in tmp.iterdir() if p.is_file())
    for name in names:
        with open(tmp / name, "rb") as src, fs.open_output_stream(f"{root}/{name}",
                                                                   compression=None) as out:
            shutil.copyfileobj(src, out, 8 << 20)
    sizes = {name: (tmp / name).stat().st_size for name in names}
    location.write_once(fs, marker, json.dumps({"files": sizes}).encode())


def _write(tmp: Path, policy, optimizer, extra: dict, files: Optional[dict]) -> None:
    from safetensors.torch import save_file

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


def newest(checkpoints: Where) -> Optional[Path]:
    """The newest complete checkpoint folder, as a local folder.

    Local disk: temp folders and folders without a state are skipped. Object store: only
    folders with a COMMIT marker count; the newest is downloaded into the local mirror
    (replay/location.local_mirror) unless already there, and that copy is returned."""
    if location.is_local(str(checkpoints)):
        done = sorted(p for p in Path(location.local_path(str(checkpoints))).glob("[0-9]*")
                      if p.suffix != ".tmp" and ((p / STATE_JSON).is_file() or (p / LEGACY_STATE).is_file()))
        return done[-1] if done else None
    fs, root = location.open_location(str(checkpoints))
    found = fs.get_file_info(location.pafs.FileSelector(root, allow_not_found=True))
    names = sorted((i.base_name for i in found
                    if i.type == location.pafs.FileType.Directory and i.base_name[:1].isdigit()),
                   reverse=True)
    for name in names:
        marker = f"{root}/{name}/{COMMIT}"
        if fs.get_file_info(marker).type == location.pafs.FileType.File:
            return _download(fs, f"{root}/{name}", location.join(str(checkpoints), name))
    return None


def _download(fs, remote: str, uri: str) -> Path:
    """The committed checkpoint at `remote` as a local folder (its mirror; fetched once)."""
    with fs.open_input_stream(f"{remote}/{COMMIT}", compression=None) as f:
        listed = json.loads(f.read())["files"]
    local = Path(location.local_mirror(uri))
    if local.is_dir() and (local / COMMIT).is_file() and \
            json.loads((local / COMMIT).read_text())["files"] == listed:
        return local
    tmp = local.with_name(local.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in listed:
        with fs.open_input_stream(f"{remote}/{name}", compression=None) as src, \
                open(tmp / name, "wb") as out:
            shutil.copyfileobj(src, out, 8 << 20)
    (tmp / COMMIT).write_text(json.dumps({"files": listed}))  # last: the copy is complete
    shutil.rmtree(local, ignore_errors=True)
    os.replace(tmp, local)
    return local


def load_adapter(folder: Path, policy) -> None:
    """Load a checkpoint's LoRA weights into `policy`, after checking they have its shape and scale."""
    from safetensors.torch import load_file

    policy.check_adapter_config(json.loads((folder / "adapter_config.json").read_text()), str(folder))
    policy.load_lora_state(load_file(str(folder / "adapter_model.safetensors")), f"checkpoint {folder}")


def load(folder: Path, policy, optimizer: torch.optim.Optimizer) -> dict:
    """Load adapter and optimizer into `policy` / `optimizer`; returns the JSON state (version, steps, ...)."""
    from safetensors.torch import load_file

    load_adapter(folder, policy)
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
