"""The Ray instance a job runs on: the cluster at ``$RAY_ADDRESS`` (``ray job submit``), the one
already initialised in this process, or a local instance that the job starts and stops.

Workers' and replicas' own output stays in Ray's session logs (``log_to_driver=False``): the
console is for the job's stages, progress and results (``agenttuning.console``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator, Optional

log = logging.getLogger(__name__)


def ray_logs_dir() -> Optional[str]:
    """The running Ray session's log folder (workers, Serve replicas), if known."""
    try:
        from ray._private.worker import _global_node

        return os.path.join(_global_node.get_session_dir_path(), "logs") if _global_node else None
    except (ImportError, AttributeError):
        return None


@contextlib.contextmanager
def ray_session(num_cpus: Optional[int] = None) -> Iterator[bool]:
    """Use or start Ray for the body; yields True when this call started it (and stops it after)."""
    import ray

    from agenttuning.console import route_library_logs

    if ray.is_initialized():
        yield False
        return
    import ray.data  # noqa: F401 — configures its loggers on import; route them right after

    route_library_logs()
    address = os.environ.get("RAY_ADDRESS") or None
    # configure_logging=False: Ray keeps its hands off the driver's loggers (agenttuning.console owns them).
    kwargs = {"log_to_driver": False, "configure_logging": False}
    if address is None:
        kwargs.update(include_dashboard=False, num_cpus=num_cpus)
    ray.init(address=address, **kwargs)
    route_library_logs()
    where = ray_logs_dir()
    log.info("Ray %s: %s%s", ray.__version__, f"cluster at {address}" if address else
             f"local instance, {int(ray.cluster_resources().get('CPU', 0))} CPUs",
             f"; worker and Serve replica logs under {where}" if where else "")
    try:
        yield True
    finally:
        ray.shutdown()
