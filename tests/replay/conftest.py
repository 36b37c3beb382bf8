"""An S3-compatible server on loopback (moto, in-process) for the object-store tests.

AWS_EC2_METADATA_DISABLED is set before pyarrow's S3 support starts, and every URI carries
explicit keys, so the AWS SDK never looks for the cloud metadata address.
"""
import os
import uuid

import pytest

os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
KEY, SECRET = "testing", "testing"


@pytest.fixture
def s3_root(s3_endpoint):
    """A fresh store root URI in its own bucket on the loopback server."""
    bucket = f"b{uuid.uuid4().hex[:12]}"
    return f"s3://{KEY}:{SECRET}@{bucket}/store?endpoint_override={s3_endpoint}&scheme=http"
