"""How every Serve app of the project is placed, started, announced and stopped.

* :func:`placement`: a deployment's ``.options(...)`` from the config's replica/resource keys;
* :func:`start_serve`: Ray (the job's instance, ``$RAY_ADDRESS``, or a local one) and the one HTTP
  proxy every app shares, on ``serve.host:serve.port``;
* :func:`serve_until_stopped`: deploy apps, print their URLs, serve until SIGINT/SIGTERM (what
  Ctrl-C and ``ray job stop`` send), then delete exactly the apps this process deployed — never
  ``serve.shutdown()``, which would remove every app on a shared cluster.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from agenttuning.schema import AutoscalingSection, ServeConfig

log = logging.getLogger(__name__)


def placement(num_replicas: int = 1, autoscaling: Optional[AutoscalingSection] = None,
              max_ongoing_requests: int = 64, num_cpus: float = 1.0, num_gpus: float = 0.0) -> Dict[str, Any]:
    """``Deployment.options`` kwargs: a fixed replica count, or autoscaling when max > min."""
    opts: Dict[str, Any] = {"max_ongoing_requests": max_ongoing_requests,
                            "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus}}
    a = autoscaling
    if a is not None and a.max_replicas > a.min_replicas:
        opts["autoscaling_config"] = {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                                      "target_ongoing_requests": a.target_ongoing_requests}
    else:
        opts["num_replicas"] = a.min_replicas if a is not None else num_replicas
    return opts


def start_serve(s: ServeConfig) -> None:
    """Connect to (or start) Ray and the Serve HTTP proxy on ``serve.host:serve.port``."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=False, configure_logging=False)
    if s.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("Serve binds %s:%d, reachable from the network: anyone who can reach it can use the "
                    "models and run actions in the environments", s.host, s.port)
    serve.start(http_options={"host": s.host, "port": s.port})


def url(s: ServeConfig, route_prefix: str) -> str:
    return f"http://{s.host}:{s.port}{route_prefix.rstrip('/')}"


def serve_until_stopped(s: ServeConfig, apps: Sequence[Tuple[Any, str, str, str]], blocking: bool = True) -> List[str]:
    """Deploy ``apps`` ((app, name, route_prefix, what)), print each URL, and with ``blocking``
    serve until SIGINT/SIGTERM (``agenttuning.cli`` turns both into ``JobStopped``), then delete
    exactly these apps. Non-blocking: the apps stay deployed; returns their URLs."""
    from ray import serve

    start_serve(s)
    urls, deployed = [], []
    try:
        for app, name, prefix, what in apps:
            serve.run(app, name=name, route_prefix=prefix)
            deployed.append(name)
            urls.append(url(s, prefix))
            print(f"serving {what} at {urls[-1]} (app '{name}')", flush=True)
        if not blocking:
            return urls
        print("Ctrl-C or SIGTERM (ray job stop) stops it and deletes these apps", flush=True)
        while True:
            time.sleep(3600)
    finally:
        if blocking or len(deployed) < len(apps):
            for name in deployed:
                try:
                    serve.delete(name)
                    log.info("deleted Serve app %s", name)
                except Exception as exc:  # noqa: BLE001 — best effort on the way out; the rest still go
                    log.warning("could not delete Serve app %s: %s", name, exc)
