"""Benchmarks: each runs as `python -m benchmarks.<name> --json PATH`, prints a short table and
writes its figures as one JSON object (write_json)."""
import json
from pathlib import Path


def write_json(path: str, figures: dict) -> None:
    """Write a benchmark's figures to `path` (its folder made if missing)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(figures, indent=2) + "\n")
