"""Security defaults: a local cluster listens on loopback only; the API key reaches the endpoint
(preflight included) and the workers, and is never written anywhere under the run folder."""
import ipaddress
import os
from pathlib import Path

import psutil
import pytest

from benchmarks.fake_openai_server import serve_in_thread
from retro_dist.config import load_config
from retro_dist.launch.logs import RunLogs
from retro_dist.launch.netsec import init_local

pytestmark = pytest.mark.integration
SECRET = "sk-test-5ecret-7b1e9c0d4a"


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)  # gRPC binds IPv4 loopback as ::ffff:127.0.0.1
    return addr.is_loopback or bool(mapped and mapped.is_loopback)


def _listening(procs) -> list[tuple[str, str, int]]:
    out = []
    for proc in procs:
        try:
            name = proc.name()
            out += [(name, c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:  # an idle worker that exited between listing and reading
            continue
    return out


def test_local_cluster_listens_on_loopback_only(tmp_path):
    """Started as `retro-dist train` starts it; every process of the cluster (the driver, the GCS,
    the raylet, agents, workers) is a descendant of the driver."""
    import ray

    @ray.remote(num_cpus=1)
    class Probe:
        def pid(self):
            return os.getpid()

    logs = RunLogs(tmp_path)
    try:
        ctx = init_local(num_cpus=2, **logs.ray_init_kwargs({"TOKENIZERS_PARALLELISM": "false"}))
        assert ctx.address_info["node_ip_address"] == "127.0.0.1"  # not rewritten to the routable address
        actors = [Probe.remote() for _ in range(2)]
        worker_pids = set(ray.get([a.pid.remote() for a in actors]))
        me = psutil.Process()
        procs = [me] + me.children(recursive=True)
        assert worker_pids <= {p.pid for p in procs}  # the workers were found
        sockets = _listening(procs)
    finally:
        ray.shutdown()
        logs.close()
    names = {name for name, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets  # the scan saw the cluster, not nothing
    assert len(sockets) >= 4, sockets  # GCS, raylet, driver and workers each listen somewhere
    exposed = [s for s in sockets if not _loopback(s[1])]
    assert not exposed, f"bound beyond loopback: {exposed}"
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ  # scoped to the local ray.init


def test_api_key_sent_never_written(tmp_path, in_repo, tiny_model, monkeypatch):
    from retro_dist.launch.train import train

    monkeypatch.setenv("RETRO_TEST_KEY", SECRET)
    with serve_in_thread(latency_s=0.0, model="fake") as server:
        cfg = load_config("configs/test.yaml", [
            f"run.output_dir={tmp_path}", "run.iterations=1", "actor.backend=openai", "actor.model=fake",
            f"actor.base_url={server.base_url}", "actor.api_key_env=RETRO_TEST_KEY",
            f"reflector.model={tiny_model}"])
        run_dir = train(cfg)
    # preflight's GET /models and the workers' completions both carried the key
    assert server.authorizations["/v1/models"] == {f"Bearer {SECRET}"}
    assert server.authorizations["/v1/completions"] == {f"Bearer {SECRET}"}
    assert server.prompts > 0
    files = _files(run_dir)
    ray_logs = Path(run_dir, "logs", "ray")
    assert ray_logs.is_symlink()  # Ray's own session logs, linked into the run folder: searched too
    files += _files(ray_logs.resolve())
    assert any(p.name == "config.yaml" for p in files) and any(p.name == "metrics.jsonl" for p in files)
    leaked = [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaked, f"the API key was written to {leaked}"


def _files(root) -> list[Path]:
    return [Path(d, f) for d, _, names in os.walk(root) for f in names if Path(d, f).is_file()]


def test_api_key_reaches_joined_cluster_workers_via_runtime_env(tmp_path, in_repo, tiny_model, monkeypatch):
    """A joined cluster's processes do not inherit the driver's environment: the key must travel in
    the runtime env. The cluster starts before the key is set, so its workers can only get it so."""
    import ray
    from ray.cluster_utils import Cluster

    from retro_dist.launch.train import train

    monkeypatch.delenv("RETRO_TEST_KEY", raising=False)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4})
    try:
        monkeypatch.setenv("RETRO_TEST_KEY", SECRET)
        with serve_in_thread(latency_s=0.0, model="fake") as server:
            cfg = load_config("configs/test.yaml", [
                f"run.output_dir={tmp_path}", "run.iterations=1", "actor.backend=openai", "actor.model=fake",
                f"actor.base_url={server.base_url}", "actor.api_key_env=RETRO_TEST_KEY",
                f"reflector.model={tiny_model}"])
            run_dir = train(cfg, address=cluster.address)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert server.authorizations["/v1/completions"] == {f"Bearer {SECRET}"} and server.prompts > 0
    # the run folder itself stays clean (logs/ray, the joined cluster's session logs, is not followed:
    # Ray's runtime_env_agent.log there records runtime env vars)
    leaked = [str(p) for p in _files(run_dir) if SECRET.encode() in p.read_bytes()]
    assert not leaked, f"the API key was written to {leaked}"
