"""Serve application builders (used by the CLI, the evaluation job and Serve config files).

``agenttuning serve CONFIG`` starts the OpenAI-compatible model server described by the
``model`` and ``serve`` sections and serves until interrupted. With ``serve run``::

    serve run serve.app:llm_builder config=configs/serve_tiny.yaml

Placement: ``serve.num_cpus``/``serve.num_gpus`` per replica; ``serve.autoscaling`` (min/max
replicas, target ongoing requests) or a fixed ``serve.num_replicas``.
"""

import logging
import os
import time
from typing import Any, Dict, Optional

from omegaconf import DictConfig

from agenttuning.config import load_config, to_dict

log = logging.getLogger(__name__)
CONFIG_SECTIONS = ('model', 'serve')  # what `--help` lists


def _placement(s: Dict[str, Any]) -> Dict[str, Any]:
    opts: Dict[str, Any] = {
        "max_ongoing_requests": s["max_ongoing_requests"],
        "ray_actor_options": {"num_cpus": s["num_cpus"], "num_gpus": s["num_gpus"]},
    }
    a = s.get("autoscaling")
    if a and a["max_replicas"] > a["min_replicas"]:
        opts["autoscaling_config"] = {"min_replicas": a["min_replicas"], "max_replicas": a["max_replicas"],
                                      "target_ongoing_requests": a["target_ongoing_requests"]}
    else:
        opts["num_replicas"] = a["min_replicas"] if a else s["num_replicas"]
    return opts


def build_llm_app(cfg: DictConfig, model_path: Optional[str] = None, model_id: Optional[str] = None):
    """The model server application (``serve.llm.LLMServer``) for ``cfg.model``/``cfg.serve``."""
    from serve.llm import LLMServer

    c = to_dict(cfg)
    s, m = c["serve"], c["model"]
    if model_path:
        m["name_or_path"] = model_path
    if model_id:
        s["model_id"] = model_id
    serve_cfg = {k: v for k, v in s.items() if k != "rollout"}
    return LLMServer.options(**_placement(s)).bind(serve_cfg, m)


def build_rollout_app(cfg: DictConfig, policies: Dict[str, Dict[str, Any]]):
    """The rollout application for ``cfg.eval.tasks`` with the given (resolved) policies."""
    from serve.rollout import RolloutServer

    c = to_dict(cfg)
    r = c["serve"]["rollout"]
    return RolloutServer.options(
        num_replicas=r["num_replicas"], max_ongoing_requests=r["max_ongoing_requests"],
        ray_actor_options={"num_cpus": r["num_cpus"]},
    ).bind(c["eval"]["tasks"], policies)


def llm_builder(args: Dict[str, str]):
    """Entry for Serve config files / ``serve run``: ``config=PATH`` plus dotted overrides."""
    args = dict(args)
    path = args.pop("config", None)
    return build_llm_app(load_config(path, [f"{k}={v}" for k, v in args.items()]))


def start_serve(cfg: DictConfig) -> None:
    """Connect to (or start) Ray and the Serve HTTP proxy on ``serve.host:serve.port``."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=False)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})


def serve_app(cfg: DictConfig, app: Any, name: str, route_prefix: str, blocking: bool, what: str) -> str:
    """Deploy ``app`` on Serve's HTTP proxy, print its OpenAI base URL, and (``blocking``) serve
    until interrupted, then delete the app. Shared by ``agenttuning serve`` and ``eft``."""
    from ray import serve

    start_serve(cfg)
    serve.run(app, name=name, route_prefix=route_prefix)
    url = f"http://{cfg.serve.host}:{cfg.serve.port}{route_prefix.rstrip('/')}/v1"
    print(f"serving {what} at {url} (OpenAI-compatible; app '{name}')")
    if blocking:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.delete(name)
    return url


def main(cfg: DictConfig) -> None:
    """`agenttuning serve CONFIG`: deploy the model server and serve until interrupted."""
    from agenttuning.models import ensure_model

    ensure_model(cfg)
    serve_app(cfg, build_llm_app(cfg), cfg.serve.app_name, cfg.serve.route_prefix, cfg.serve.blocking,
              cfg.model.name_or_path)


if __name__ == "__main__":
    import sys

    from agenttuning.cli import run_job

    sys.exit(run_job("serve.app", sys.argv[1:]))
