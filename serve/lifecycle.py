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
import socket
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from agenttuning.cluster import init_ray
from agenttuning.config import ConfigError
from agenttuning.schema import AutoscalingSection, ServeConfig
from serve.auth import describe_key_config

log = logging.getLogger(__name__)


def placement(num_replicas: int = 1, autoscaling: Optional[AutoscalingSection] = None,
              max_ongoing_requests: int = 64, num_cpus: float = 1.0, num_gpus: float = 0.0,
              max_queued_requests: int = -1, retry_after_s: float = 5.0) -> Dict[str, Any]:
    """``Deployment.options`` kwargs: a fixed replica count, or autoscaling when max > min; with
    ``max_queued_requests`` >= 0 a bounded queue whose overflow gets 429 with ``Retry-After``
    (what OpenAI clients back off on) instead of waiting without limit."""
    from ray.serve.config import BackpressureConfig

    opts: Dict[str, Any] = {"max_ongoing_requests": max_ongoing_requests,
                            "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus}}
    if max_queued_requests >= 0:
        opts["max_queued_requests"] = max_queued_requests
        opts["backpressure_config"] = BackpressureConfig(status_code=429, retry_after_s=retry_after_s)
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
        init_ray(os.environ.get("RAY_ADDRESS") or None, log_to_driver=False, configure_logging=False)
    if s.host not in ("127.0.0.1", "localhost", "::1"):
        source = describe_key_config(s.api_key_env, s.api_key_file)
        if source:
            log.warning("Serve binds %s:%d, reachable from the network; HTTP requests to the model, EFT and "
                        "environment servers need the API key from %s (Authorization: Bearer)", s.host, s.port, source)
        else:
            log.warning("Serve binds %s:%d, reachable from the network, and no API key is set: anyone who can reach "
                        "it can use the models and run actions in the environments (set serve.api_key_env or "
                        "serve.api_key_file)", s.host, s.port)
    if not _serve_running():
        _check_port_free(s.host, s.port)
    serve.start(http_options={"host": s.host, "port": s.port})


def _serve_running() -> bool:
    """Whether this Ray instance already runs Serve (then its proxy holds the port, rightly)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return True


def _check_port_free(host: str, port: int) -> None:
    """Fail before deploying when another process (often another Ray instance's Serve) holds the
    port: Serve's proxy would not bind, and this job's requests would reach that process instead."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free to Serve too
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"config key 'serve.port': {host}:{port} is already in use ({exc.strerror}), "
                              "perhaps by another Ray instance's Serve on this machine; stop it or pick a free "
                              f"port (serve.port=...)") from None


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
            deployed.append(name)  # before run: a stop while it deploys must delete it too
            serve.run(app, name=name, route_prefix=prefix)
            urls.append(url(s, prefix))
            print(f"serving {what} at {urls[-1]} (app '{name}')", flush=True)
        if not blocking:
            return urls
        print("Ctrl-C or SIGTERM (ray job stop) stops it and deletes these apps", flush=True)
        while True:
            time.sleep(3600)
    finally:
        if blocking or len(urls) < len(apps):
            for name in deployed:
                try:
                    serve.delete(name)
                    log.info("deleted Serve app %s", name)
                except Exception as exc:  # noqa: BLE001 — best effort on the way out; the rest still go
                    log.warning("could not delete Serve app %s: %s", name, exc)
