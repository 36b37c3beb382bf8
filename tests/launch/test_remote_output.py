"""run.output_dir on pyarrow.fs URIs end to end: a short run on file:// and on an S3-compatible
server on loopback (moto), then resumed; everything durable is read back through pyarrow.fs.

Every S3 filesystem here gets explicit keys from the URI, and AWS_EC2_METADATA_DISABLED is set
before pyarrow's S3 support starts: the cloud metadata address is never contacted.
"""
import json
import os
import shutil
import uuid

import pyarrow.fs as pafs
import pytest
import yaml

os.environ["AWS_EC2_METADATA_DISABLED"] = "true"

from retro_dist.config import load_config  # noqa: E402
from retro_dist.launch.train import train  # noqa: E402
from retro_dist.learner import checkpoints  # noqa: E402
from retro_dist.replay import location  # noqa: E402
from retro_dist.replay.config import ReplayConfig  # noqa: E402
from retro_dist.replay.store import ReplayStore  # noqa: E402

pytestmark = pytest.mark.component
KEY, SECRET = "testing", "testing"


def _base(output_dir: str, tiny_model: str, *more: str) -> list[str]:
    return [f"run.output_dir={output_dir}", f"actor.model={tiny_model}", f"reflector.model={tiny_model}",
            "rollout.num_workers=0", "rollout.tasks_per_iteration=2", "rollout.parallel_tasks=2", *more]


def _read(uri: str) -> bytes:
    return location.read_file(uri)


def _check_run(where: str, iterations: int) -> None:
    """What a finished sync run left at `where`, read through pyarrow.fs only."""
    cfg = yaml.safe_load(_read(location.join(where, "config.yaml")))
    assert SECRET + "@" not in json.dumps(cfg)  # URI credentials are not saved
    rows = [json.loads(line) for line in _read(location.join(where, "metrics.jsonl")).splitlines()]
    assert [r["iteration"] for r in rows] == list(range(iterations))
    assert rows[-1]["learner/version"] == iterations
    fs, root = location.open_location(location.join(where, "checkpoints"))
    names = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(root)))
    assert names == [f"{v:06d}" for v in range(1, iterations + 1)]
    state = json.loads(_read(location.join(where, "checkpoints", names[-1], checkpoints.STATE_JSON)))
    assert state["version"] == iterations
    store = ReplayStore(location.join(where, "replay"), ReplayConfig())
    assert store.num_rows("trials") > 0 and store.num_rows("reflections") > 0
    assert store.metrics()["replay/quarantined"] == 0


def test_file_uri_run_and_resume(tmp_path, in_repo, tiny_model):
    out = f"file://{tmp_path}/runs"
    run_dir = train(load_config("configs/test.yaml", _base(out, tiny_model, "run.iterations=1")))
    assert run_dir == tmp_path / "runs" / "test"  # file:// is the local disk itself
    train(load_config("configs/test.yaml", _base(out, tiny_model, "run.iterations=2", "run.resume=true")))
    _check_run(f"{out}/test", 2)
    assert not list((tmp_path / "runs" / "test" / "checkpoints").glob("*.tmp"))


def test_s3_run_resume_on_a_fresh_machine(tmp_path, in_repo, tiny_model, s3_endpoint, monkeypatch, capfd):
    monkeypatch.setenv("RETRO_DIST_MIRROR", str(tmp_path / "mirror"))
    bucket = f"b{uuid.uuid4().hex[:12]}"
    out = f"s3://{KEY}:{SECRET}@{bucket}/runs?endpoint_override={s3_endpoint}&scheme=http"
    where = location.join(out, "test")
    run_dir = train(load_config("configs/test.yaml", _base(out, tiny_model, "run.iterations=1")))
    assert str(run_dir).startswith(str(tmp_path / "mirror"))  # logs: the local mirror
    assert f"logs, TensorBoard and events stay in {run_dir}" in capfd.readouterr().err
    assert (run_dir / "logs").is_dir() and not (run_dir / "replay").exists()
    _check_run(where, 1)
    # A fresh machine: no local mirror at all. The resumed run reads its config, metrics and
    # newest checkpoint from the object store and continues at iteration 1.
    shutil.rmtree(tmp_path / "mirror")
    train(load_config("configs/test.yaml", _base(out, tiny_model, "run.iterations=2", "run.resume=true")))
    _check_run(where, 2)
    rows = [json.loads(line) for line in _read(location.join(where, "metrics.jsonl")).splitlines()]
    assert rows[1]["rollout/policy_versions"] == [1]  # rolled out with the restored version 1
    # A checkpoint whose upload never finished (no COMMIT marker) is never picked.
    fs, root = location.open_location(location.join(where, "checkpoints"))
    with fs.open_output_stream(f"{root}/000009/{checkpoints.STATE_JSON}") as f:
        f.write(b'{"version": 9}')
    newest = checkpoints.newest(location.join(where, "checkpoints"))
    assert newest.name == "000002" and json.loads((newest / checkpoints.STATE_JSON).read_text())["version"] == 2
    listed = json.loads((newest / checkpoints.COMMIT).read_text())["files"]
    assert {p.name for p in newest.iterdir()} == set(listed) | {checkpoints.COMMIT}


def test_refused_outputs(tmp_path, in_repo, tiny_model, s3_endpoint):
    from retro_dist.config import ConfigError

    with pytest.raises(ConfigError, match=r"^run.output_dir: scheme 'ftp'"):
        load_config("configs/test.yaml", _base("ftp://host/runs", tiny_model))
    bucket = f"b{uuid.uuid4().hex[:12]}"
    out = f"s3://{KEY}:{SECRET}@{bucket}/runs?endpoint_override={s3_endpoint}&scheme=http"
    location.write_file_once(location.join(out, "test", "config.yaml"), b"run: {}\n")
    with pytest.raises(ConfigError, match=r"run folder s3://\*\*\*@b.* already exists"):
        train(load_config("configs/test.yaml", _base(out, tiny_model, "run.iterations=1")))


def test_s3_async_run(tmp_path, in_repo, tiny_model, s3_endpoint, monkeypatch):
    """The async loops (streaming worker + learner loop, in-process) on the object store."""
    monkeypatch.setenv("RETRO_DIST_MIRROR", str(tmp_path / "mirror"))
    bucket = f"b{uuid.uuid4().hex[:12]}"
    out = f"s3://{KEY}:{SECRET}@{bucket}/runs?endpoint_override={s3_endpoint}&scheme=http"
    train(load_config("configs/test-async.yaml", [
        f"run.output_dir={out}", f"actor.model={tiny_model}", f"reflector.model={tiny_model}",
        "rollout.num_workers=0", "run.updates=4", "run.log_every_s=1"]))
    where = location.join(out, "test-async")
    rows = [json.loads(line) for line in _read(location.join(where, "metrics.jsonl")).splitlines()]
    assert rows and max(r["learner/steps"] for r in rows) == 4
    newest = checkpoints.newest(location.join(where, "checkpoints"))
    assert json.loads((newest / checkpoints.STATE_JSON).read_text())["steps"] == 4
    store = ReplayStore(location.join(where, "replay"), ReplayConfig())
    assert store.num_rows("reflections") >= 4 and store.metrics()["replay/quarantined"] == 0
