import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL = str(ROOT / "models" / "tiny-lm")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model() -> str:
    if not Path(MODEL, "config.json").is_file():
        from retro_dist.agents.tiny_models import make_models

        make_models(MODEL)
    return MODEL


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)
    return ROOT
