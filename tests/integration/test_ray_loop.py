"""Two iterations on a local Ray cluster: replay segments written, learner updated, workers on v1."""
import json

import pyarrow as pa
import pytest

from retro_dist.config import load_config
from retro_dist.core.records import SCHEMAS
from retro_dist.launch.train import train

pytestmark = pytest.mark.integration


def test_two_iteration_local_ray_run(tmp_path, in_repo, tiny_model):
    cfg = load_config("configs/test.yaml", [f"run.output_dir={tmp_path}", f"actor.model={tiny_model}",
                                            f"reflector.model={tiny_model}"])
    run_dir = train(cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert rows[0]["rollout/policy_versions"] == [0] and rows[1]["rollout/policy_versions"] == [1]
    assert [r["learner/version"] for r in rows] == [1, 2]
    assert all(r["rollout/episodes"] == 8 for r in rows)  # 2 workers x 4 tasks
    segs = sorted((run_dir / "replay" / "segments" / "trials").glob("*.arrows"))
    assert segs, "no sealed trial segments"
    total = sum(pa.ipc.open_stream(pa.memory_map(str(s))).read_all().num_rows for s in segs)
    assert total == sum(r["rollout/trials"] for r in rows)
    t = pa.ipc.open_stream(pa.memory_map(str(segs[0]))).read_all()
    assert t.schema.remove_metadata().equals(SCHEMAS["trials"].remove_metadata())
    assert {0, 1} == set(pa.concat_tables(
        [pa.ipc.open_stream(pa.memory_map(str(s))).read_all() for s in segs]).column("worker_id").to_pylist())
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["000001", "000002"]
