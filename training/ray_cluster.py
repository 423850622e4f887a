"""Connecting the launchers to Ray: a given cluster, or a local one kept on the loopback interface.

A cluster's security is its own (README, "On a cluster": token authentication, ports on a private
network). A local Ray is reachable from this machine only: its node address is 127.0.0.1, which
`init_ray` checks once Ray is up (training/ray_job.py binds the dashboard it needs there too).
"""

from __future__ import annotations

import os
import sys

LOOPBACK = "127.0.0.1"
# Off, Ray keeps a 127.0.0.1 node address instead of swapping in the machine's outward IP
# (ray/_private/services.py get_node_ip_address). Ray reads it once, when `ray` is first imported,
# and the processes it spawns inherit it.
CLUSTER_MODE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class RayAddressError(RuntimeError):
    """A local Ray would be, or is, reachable from outside this machine."""


def init_ray(address: str | None = None, **kwargs) -> None:
    """Start or join Ray.

    Args:
        address: a cluster address (`auto`, `ray://host:10001`, `host:6379`); None: $RAY_ADDRESS
            where it is set (under `ray job submit`), else a new local Ray on this machine, bound
            to 127.0.0.1 with no dashboard.
        **kwargs: passed to `ray.init` (workers' output stays off the driver unless log_to_driver=True).

    Raises:
        RayAddressError: for a local Ray, when `ray` was imported before this call could turn
            cluster mode off, or when the node came up on another address than 127.0.0.1 (Ray is
            shut down first).
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    local = address is None
    if local:
        if "ray" in sys.modules and os.environ.get(CLUSTER_MODE) != "0":
            raise RayAddressError(
                f"ray was imported before {CLUSTER_MODE}=0 was set, so a local Ray would listen on this "
                f"machine's network address: export {CLUSTER_MODE}=0 before starting Python"
            )
        os.environ[CLUSTER_MODE] = "0"
        # "local": a Ray of its own; ray.init() would join one that `ray start` left on this machine
        address = "local"
        kwargs = {"include_dashboard": False, **kwargs}
    import ray

    ray.init(address=address, **{"log_to_driver": False, "configure_logging": False, **kwargs})
    if local:
        check_loopback(ray.util.get_node_ip_address())


def check_loopback(node_address: str) -> None:
    """Shut down the local Ray and raise RayAddressError unless its node address is 127.0.0.1."""
    if node_address == LOOPBACK:
        return
    import ray

    ray.shutdown()
    raise RayAddressError(
        f"the local Ray came up on {node_address}, not {LOOPBACK}, where other machines could reach "
        f"it; it was shut down. Ray keeps {LOOPBACK} only with {CLUSTER_MODE}=0 set before ray is "
        f"first imported"
    )
