"""TextWorldExpress fixtures shared by the twx test modules: each module names its games by
`FAMILY_CFG` (an EnvConfig) and `PARAMS` (the game_params its raw TwxEnv uses)."""
import pytest


@pytest.fixture(scope="module")
def family(request):
    from retro_dist.envs.twx import TwxFamily

    fam = TwxFamily(request.module.FAMILY_CFG)
    yield fam
    if fam._probe is not None:
        fam._probe.close()


@pytest.fixture(scope="module")
def env(request):
    from retro_dist.envs.twx import TwxEnv

    e = TwxEnv(request.module.PARAMS, step_limit=40)
    yield e
    e.close()
