"""Connecting the launchers to Ray: a given cluster, or a local one kept on the loopback interface."""

from __future__ import annotations

import os


def init_ray(address: str | None = None, **kwargs) -> None:
    """Start or join Ray.

    Args:
        address: a cluster address (`auto`, `ray://host:10001`, `host:6379`); None starts a local
            Ray on this machine, bound to 127.0.0.1 with no dashboard.
        **kwargs: passed to `ray.init` (workers' output stays off the driver unless log_to_driver=True).
    """
    if address is None:
        # Ray swaps a 127.0.0.1 node address for the machine's outward IP unless cluster mode is
        # off (ray/_private/services.py get_node_ip_address); off, a local Ray stays on loopback.
        # Read when ray starts, and inherited by the processes it spawns.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        kwargs = {"include_dashboard": False, **kwargs}
    import ray

    ray.init(address=address, **{"log_to_driver": False, "configure_logging": False, **kwargs})
