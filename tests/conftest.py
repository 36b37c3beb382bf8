import logging
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL = str(ROOT / "models" / "tiny-lm")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Before pyarrow's S3 support starts: the AWS SDK must never probe the cloud metadata address.
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request access log


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


@pytest.fixture(scope="session")
def s3_endpoint():
    """host:port of a moto S3 server on 127.0.0.1 (skipped when moto is not installed)."""
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    assert host == "127.0.0.1"
    yield f"{host}:{port}"
    server.stop()
