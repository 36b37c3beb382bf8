"""The publish ledger: `versions.jsonl` in the run folder, one line per publish (version, weights digest).

A version number must never stand for two different sets of weights, or rows tagged with it would
be trained as if another policy had written them. Checkpoints are written before each publish and
a resumed learner republishes its checkpoint's version, so every line for a version carries the
same digest; the ledger lets a user (and the fault tests) check that after any crash.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def record(run_dir: Path, version: int, digest: str) -> None:
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(run_dir) / "versions.jsonl", "a") as f:
        f.write(json.dumps({"version": version, "digest": digest, "time": time.time()}) + "\n")


def read(run_dir: Path) -> list[dict]:
    """The ledger's entries; a line torn by a crash mid-write is skipped."""
    path = Path(run_dir) / "versions.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def conflicts(entries: list[dict]) -> dict[int, set[str]]:
    """Versions published with more than one digest (empty when the ledger is consistent)."""
    seen: dict[int, set[str]] = {}
    for e in entries:
        seen.setdefault(int(e["version"]), set()).add(e["digest"])
    return {v: d for v, d in seen.items() if len(d) > 1}
