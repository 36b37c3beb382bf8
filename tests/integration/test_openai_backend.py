"""The OpenAI-compatible actor backend against a real `vllm serve` on loopback."""
import pytest

from benchmarks.vllm_server import VLLMServer
from retro_dist.agents.backends import OpenAIBackend, check_endpoint
from retro_dist.agents.policies import ActorPolicy
from retro_dist.config import ActorConfig, load_config
from retro_dist.launch.preflight import PreflightError, preflight

pytest.importorskip("vllm")
pytestmark = [pytest.mark.integration, pytest.mark.vllm]


@pytest.fixture(scope="module")
def server(tiny_model):
    with VLLMServer(tiny_model, served_name="tiny") as srv:
        yield srv.url


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
