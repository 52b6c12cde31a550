"""The Ray instance a job runs on: the cluster at ``$RAY_ADDRESS`` (``ray job submit``), the one
already initialised in this process, or a local instance that the job starts and stops.

Workers' and replicas' own output stays in Ray's session logs (``log_to_driver=False``): the
console is for the job's stages, progress and results (``agenttuning.console``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from typing import Dict, Iterator, List, Optional

from agenttuning.console import route_library_logs

log = logging.getLogger(__name__)


def ray_logs_dir() -> Optional[str]:
    """The running Ray session's log folder (workers, Serve replicas), if known."""
    try:
        from ray._private.worker import _global_node

        return os.path.join(_global_node.get_session_dir_path(), "logs") if _global_node else None
    except (ImportError, AttributeError):
        return None


def init_ray(address: Optional[str] = None, **kwargs) -> None:
    """``ray.init`` that keeps this process's SIGTERM handler: Ray installs one calling
    ``sys.exit(15)``, which would turn ``ray job stop`` into exit 15 instead of the job's own
    clean stop (``agenttuning.cli``: exit 143 with one line)."""
    import ray

    before = signal.getsignal(signal.SIGTERM)
    ray.init(address=address, **kwargs)
    if before is not None and signal.getsignal(signal.SIGTERM) is not before:
        try:
            signal.signal(signal.SIGTERM, before)
        except ValueError:  # not the main thread: Ray could not install its handler either
            pass


@contextlib.contextmanager
def ray_session(num_cpus: Optional[int] = None) -> Iterator[bool]:
    """Use or start Ray for the body; yields True when this call started it (and stops it after)."""
    import ray

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
    init_ray(address, **kwargs)
    route_library_logs()
    where = ray_logs_dir()
    log.info("Ray %s: %s%s", ray.__version__, f"cluster at {address}" if address else
             f"local instance, {int(ray.cluster_resources().get('CPU', 0))} CPUs",
             f"; worker and Serve replica logs under {where}" if where else "")
    try:
        yield True
    finally:
        ray.shutdown()


# ----------------------------------------------------------------------------- no silent waits


class JobFailed(Exception):
    """The job cannot complete (resources that never come, failed episodes, nothing valid to
    write): ``agenttuning.cli`` prints the one-line reason and exits with ``exit_code``."""

    exit_code = 3


class ResourcesUnavailable(JobFailed):
    """What the job requests does not fit the cluster, or stayed unscheduled too long."""


def node_capacities() -> List[Dict[str, float]]:
    """Total resources of every alive node (CPU, GPU, memory, custom)."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def check_fits(bundles: List[Dict[str, float]], what: str, keys: str, strategy: str = "PACK",
               autoscaling: bool = False) -> None:
    """Fail at once, naming what is missing and the config keys to change, when ``bundles`` (one
    per worker/replica) can never be placed on this cluster. With ``autoscaling`` the cluster may
    add nodes, so only the per-bundle shape is not checked against today's nodes."""
    if autoscaling:
        return
    nodes = node_capacities()
    need: Dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            need[k] = need.get(k, 0.0) + float(v)
    have = {k: sum(n.get(k, 0.0) for n in nodes) for k in need}
    short = {k: (need[k], have[k]) for k in need if need[k] > have[k] + 1e-9}
    problem = ""
    if short:
        problem = ", ".join(f"{k}: needs {n:g}, the cluster has {h:g}" for k, (n, h) in short.items())
    elif strategy.startswith("STRICT_SPREAD") and len(bundles) > len(nodes):
        problem = f"STRICT_SPREAD needs {len(bundles)} nodes, the cluster has {len(nodes)}"
    else:
        for b in bundles:
            if not any(all(n.get(k, 0.0) + 1e-9 >= v for k, v in b.items()) for n in nodes):
                problem = f"no node can hold one of {b} (nodes: {[{k: n.get(k, 0) for k in b} for n in nodes]})"
                break
    if problem:
        raise ResourcesUnavailable(f"{what} cannot be scheduled on this cluster: {problem}. "
                                   f"Change {keys} (or run on a cluster that autoscales: scaling.autoscaling=true)")


@contextlib.contextmanager
def pending_watch(timeout_s: Optional[float], what: str, keys: str) -> Iterator[None]:
    """Raise ResourcesUnavailable in the calling thread when a placement group created inside the
    body stays PENDING (resources that never come) for longer than ``timeout_s``."""
    import _thread
    import threading
    import time

    import ray.util

    if not timeout_s:
        yield
        return
    before = set(ray.util.placement_group_table())
    stop, fired = threading.Event(), []

    def watch() -> None:
        first_pending: Dict[str, float] = {}
        while not stop.wait(2.0):
            try:
                table = ray.util.placement_group_table()
            except Exception:  # noqa: BLE001 — the GCS is going away with the job
                return
            now = time.monotonic()
            for pg, info in table.items():
                if pg in before or info.get("state") != "PENDING":
                    first_pending.pop(pg, None)
                    continue
                since = first_pending.setdefault(pg, now)
                if now - since > timeout_s:
                    fired.append(f"{what}: resources {info.get('bundles')} stayed unscheduled for "
                                 f"{timeout_s:.0f}s (cluster: {node_capacities()}). Change {keys}")
                    _thread.interrupt_main()
                    return

    t = threading.Thread(target=watch, daemon=True, name="pending-watch")
    t.start()
    try:
        yield
    except KeyboardInterrupt:
        if fired:
            raise ResourcesUnavailable(fired[0]) from None
        raise
    finally:
        stop.set()
