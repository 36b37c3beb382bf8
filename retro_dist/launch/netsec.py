"""Network and secret defaults for the Ray clusters a run starts or joins.

A local cluster listens on loopback only. `ray.init(_node_ip_address="127.0.0.1")` alone is not
enough: Ray 2.60 resolves a loopback node address to the machine's routable one unless
`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, and then the GCS, the raylet, every worker and the driver
listen on all interfaces (seen with `ss -ltnp`). Ray reads that variable once, when `ray` is
imported, so `local_cluster()` also sets the constant it was read into, for the duration of
`ray.init`; the processes `ray.init` spawns inherit the variable.

Ray's token auth (on by default in 2.60; the token lives in `~/.ray/auth_token`) is left on.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator, Optional

LOOPBACK = "127.0.0.1"
_CLUSTER_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
log = logging.getLogger(__name__)


@contextlib.contextmanager
def local_cluster() -> Iterator[dict]:
    """Around a local `ray.init`: keep the node address on loopback. Yields the ray.init kwargs that
    go with it (node address, no dashboard)."""
    from ray._private import ray_constants

    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        log.warning("RAY_AUTH_MODE=disabled: the local Ray cluster accepts any local process without a token")
    old_env, old_const = os.environ.get(_CLUSTER_VAR), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_CLUSTER_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield {"_node_ip_address": LOOPBACK, "include_dashboard": False}
    finally:
        # Restored: a later ray.init(address=...) in this process must resolve its routable address.
        ray_constants.ENABLE_RAY_CLUSTER = old_const
        if old_env is None:
            os.environ.pop(_CLUSTER_VAR, None)
        else:
            os.environ[_CLUSTER_VAR] = old_env


def init_local(**kwargs):
    """`ray.init` of a new local cluster bound to loopback (no dashboard); returns Ray's context.

    `address="local"`: without it Ray joins the newest `ray start` head on the machine (its
    ray_current_cluster file), or RAY_ADDRESS, and a run meant to be local lands on someone else's
    cluster, or fails there because it sets num_cpus."""
    import ray

    with local_cluster() as loopback:
        return ray.init(**{**kwargs, **loopback, "address": "local"})


def secret_env_vars(api_key_env: Optional[str]) -> dict:
    """The API key for the runtime environment of a joined cluster's actors, if the driver has one.

    Remote workers do not inherit the driver's environment, so the key travels this way. Only for
    joined clusters: Ray's runtime_env_agent.log records runtime env vars at INFO (seen in 2.60),
    and a local cluster's workers inherit the driver's environment anyway, so a local run keeps the
    key out of Ray's session logs (which `logs/ray` links into the run folder)."""
    if api_key_env and os.environ.get(api_key_env):
        return {api_key_env: os.environ[api_key_env]}
    return {}
