"""Serve application builders (used by the CLI, the evaluation job and Serve config files).

``agenttuning serve CONFIG`` starts the OpenAI-compatible model server described by the
``model`` and ``serve`` sections and serves until interrupted. With ``serve run``::

    serve run serve.app:llm_builder config=configs/serve_tiny.yaml

Placement: ``serve.num_cpus``/``serve.num_gpus`` per replica; ``serve.autoscaling`` (min/max
replicas, target ongoing requests) or a fixed ``serve.num_replicas``.
"""

import logging
from typing import Dict, Optional

from omegaconf import DictConfig

from agenttuning.cluster import ray_session
from agenttuning.config import load_config, to_object
from agenttuning.models import ensure_model
from agenttuning.schema import PolicyConfig
from serve.lifecycle import placement, serve_until_stopped
from serve.llm import LLMServer
from serve.rollout import RolloutServer

log = logging.getLogger(__name__)
CONFIG_SECTIONS = ('model', 'serve')  # what `--help` lists


def build_llm_app(cfg: DictConfig, model_path: Optional[str] = None, model_id: Optional[str] = None):
    """The model server application (``serve.llm.LLMServer``) for ``cfg.model``/``cfg.serve``."""

    s, m = to_object(cfg.serve), to_object(cfg.model)
    m.name_or_path = model_path or m.name_or_path
    s.model_id = model_id or s.model_id
    opts = placement(s.num_replicas, s.autoscaling, s.max_ongoing_requests, s.num_cpus, s.num_gpus,
                     s.max_queued_requests, s.retry_after_s)
    return LLMServer.options(**opts).bind(s, m)


def build_rollout_app(cfg: DictConfig, policies: Dict[str, PolicyConfig]):
    """The rollout application for ``cfg.eval.tasks`` with the given (resolved) policies."""

    r = cfg.serve.rollout
    return RolloutServer.options(
        num_replicas=r.num_replicas, max_ongoing_requests=r.max_ongoing_requests,
        ray_actor_options={"num_cpus": r.num_cpus},
    ).bind(to_object(cfg.eval.tasks), policies)


def llm_builder(args: Dict[str, str]):
    """Entry for Serve config files / ``serve run``: ``config=PATH`` plus dotted overrides."""
    args = dict(args)
    path = args.pop("config", None)
    return build_llm_app(load_config(path, [f"{k}={v}" for k, v in args.items()]))


def main(cfg: DictConfig) -> None:
    """`agenttuning serve CONFIG`: deploy the model server and serve until stopped."""

    ensure_model(cfg)
    with ray_session():
        serve_until_stopped(to_object(cfg.serve), [(build_llm_app(cfg), cfg.serve.app_name, cfg.serve.route_prefix,
                                                    f"{cfg.model.name_or_path} (OpenAI API under /v1)")],
                            cfg.serve.blocking)


if __name__ == "__main__":
    import sys

    from agenttuning.cli import run_job

    sys.exit(run_job("serve.app", sys.argv[1:]))
