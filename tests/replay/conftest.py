"""An S3-compatible server on loopback (moto, in-process) for the object-store tests.

AWS_EC2_METADATA_DISABLED is set before pyarrow's S3 support starts, and every URI carries
explicit keys, so the AWS SDK never looks for the cloud metadata address.
"""
import logging
import os
import uuid

import pytest

os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
KEY, SECRET = "testing", "testing"
logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request access log


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


@pytest.fixture
def s3_root(s3_endpoint):
    """A fresh store root URI in its own bucket on the loopback server."""
    bucket = f"b{uuid.uuid4().hex[:12]}"
    return f"s3://{KEY}:{SECRET}@{bucket}/store?endpoint_override={s3_endpoint}&scheme=http"
