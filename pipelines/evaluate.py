"""`agenttuning eval CONFIG`: agent tasks through the rollout deployment, general tasks, report.

For each policy in ``eval.policies`` (our model, any OpenAI-compatible endpoint, the scripted
expert) and each task in ``eval.tasks``, every task id runs as one episode on the rollout
deployment (``serve.rollout``), with at most ``eval.concurrency`` episodes in flight and
greedy decoding by default. Each finished episode is appended to
``<output_dir>/trajectories.jsonl`` (AgentInstruct format + reward/status/turns) and flushed at
once, so a crash or a killed replica loses no finished episode; a re-run with ``eval.resume``
runs only the episodes that are not in that file yet. General tasks (``eval.general``) use
``pipelines.scorers`` (kinds ``mc``, ``math``, ``code``). Outputs: ``report.json``,
``report.md``, ``report.png`` (see ``pipelines.eval_report``), the same numbers to wandb.
"""

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import DictConfig

from pipelines import eval_report as rep
from pipelines.episodes import EpisodeStore, run_episodes
from agenttuning.config import to_dict, to_object
from agenttuning.schema import PolicyConfig
from serve.rollout import PolicySpec

log = logging.getLogger(__name__)
CONFIG_SECTIONS = ('model', 'eval', 'serve', 'wandb')  # what `--help` lists

TRAJECTORIES = "trajectories.jsonl"


# ----------------------------------------------------------------------------- policies / apps


def resolve_policies(cfg: DictConfig) -> Dict[str, PolicySpec]:
    """Policies for the rollout deployment; model policies get their checkpoint, app and served id."""
    out = {}
    for name, p in (to_object(cfg.eval.policies) or {"model": PolicyConfig()}).items():
        if p.kind != "model":
            out[name] = PolicySpec(p)
            continue
        p.model_path = p.model_path or cfg.model.name_or_path
        p.model = name  # served under the policy's name
        # Count context tokens exactly as the server will (same tokenizer and chat format).
        p.tokenizer = p.tokenizer or p.model_path
        out[name] = PolicySpec(p, app_name=f"llm-{name}", system_prompt=cfg.model.system_prompt,
                               chat_template=cfg.model.chat_template)
    return out


def deploy(cfg: DictConfig, policies: Dict[str, PolicySpec]) -> List[str]:
    """Start the model apps of model policies and the rollout app; returns the app names."""
    from ray import serve

    from serve.app import build_llm_app, build_rollout_app
    from serve.lifecycle import start_serve

    start_serve(to_object(cfg.serve))
    apps = []
    for name, p in policies.items():
        if p.config.kind == "model":
            serve.run(build_llm_app(cfg, p.config.model_path, model_id=name), name=p.app_name, route_prefix=f"/{name}")
            apps.append(p.app_name)
    serve.run(build_rollout_app(cfg, policies), name=cfg.serve.rollout.app_name, route_prefix=None)
    apps.append(cfg.serve.rollout.app_name)
    return apps


# ----------------------------------------------------------------------------- running


def run_agent_tasks(cfg: DictConfig, policies: Dict[str, PolicySpec], out_dir: str) -> Dict[str, Any]:
    """All episodes of the suite; returns task ids, skipped tasks and failures per task."""
    from ray import serve

    handle = serve.get_deployment_handle("RolloutServer", app_name=cfg.serve.rollout.app_name)
    store = EpisodeStore(os.path.join(out_dir, TRAJECTORIES), resume=cfg.eval.resume)
    done = store.load()
    ids: Dict[str, List[str]] = {}
    skipped: Dict[str, Dict[str, str]] = {}
    for t in cfg.eval.tasks:
        listing = handle.task_ids.remote(t.name).result()
        ids[t.name], skipped[t.name] = [str(i) for i in listing["ids"]], listing["skipped"]
    jobs = [{"policy": p, "task": t, "task_id": i} for p in policies for t in ids for i in ids[t]
            if (p, t, i) not in done]
    log.info("%d episodes to run (%d already done)", len(jobs), len(done))
    t0 = time.time()
    with store:
        outcome = run_episodes(handle, jobs, store, cfg.eval.concurrency, cfg.eval.max_retries, desc="eval episodes")
    failures = [{"policy": k[0], "task": k[1], "task_id": k[2], "error": o["detail"]}
                for k, o in outcome.items() if "error" in o]
    return {"ids": ids, "skipped": skipped, "failures": failures, "ran": len(jobs) - len(failures),
            "resumed": len(done), "wall_s": time.time() - t0}


def _mc_remote(model_path: str, records: List[Dict[str, Any]], name: str, chat_template: str) -> Dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from agenttuning.chat import load_tokenizer
    from pipelines.scorers import score_mc

    tok = load_tokenizer(model_path, chat_template)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    return score_mc(records, model, tok, name)


def run_general(cfg: DictConfig, policies: Dict[str, PolicySpec]) -> Dict[str, Dict[str, Any]]:
    """General tasks per policy: {policy: {task: result}}; not applicable ones say why."""
    import ray
    from ray import serve

    from pipelines.scorers import read_jsonl, score_code, score_math

    out: Dict[str, Dict[str, Any]] = {p: {} for p in policies}
    if not cfg.eval.general:
        return out
    handle = serve.get_deployment_handle("RolloutServer", app_name=cfg.serve.rollout.app_name)
    mc_task = ray.remote(num_cpus=cfg.serve.num_cpus, num_gpus=cfg.serve.num_gpus)(_mc_remote)
    tasks = [(g, read_jsonl(g.path, None if g.limit is None else g.limit + g.few_shot)) for g in cfg.eval.general]

    def one_policy(name: str, spec: PolicySpec) -> None:
        p = spec.config
        for g, records in tasks:
            if p.kind == "expert":
                out[name][g.name] = {"n": 0, "score": 0.0, "not_applicable": "the scripted expert has no general ability"}
            elif g.kind == "mc" and p.kind != "model":
                out[name][g.name] = {"n": 0, "score": 0.0, "not_applicable": "log-likelihood needs local weights"}
            elif g.kind == "mc":
                out[name][g.name] = ray.get(mc_task.remote(p.model_path, records, g.name, cfg.model.chat_template))
            else:
                def generate(messages, _p=name, _max=g.max_tokens):
                    return handle.chat.remote(_p, messages, _max).result()

                if g.kind == "code":
                    out[name][g.name] = score_code(records, generate, g.name, g.timeout_s, cfg.eval.concurrency)
                else:
                    out[name][g.name] = score_math(records, generate, g.few_shot, g.name, cfg.eval.concurrency)

    # Policies side by side: each has its own model replicas, so they decode in parallel.
    with ThreadPoolExecutor(max_workers=max(1, len(policies))) as pool:
        for f in [pool.submit(one_policy, n, p) for n, p in policies.items()]:
            f.result()
    return out


# ----------------------------------------------------------------------------- report


def build_report(cfg: DictConfig, policies: Dict[str, PolicySpec], run: Dict[str, Any],
                 general: Dict[str, Dict[str, Any]], out_dir: str) -> Dict[str, Any]:
    episodes = EpisodeStore(os.path.join(out_dir, TRAJECTORIES)).load()
    thresholds = {t.name: t.success_threshold for t in cfg.eval.tasks}
    categories = {t.name: t.category for t in cfg.eval.tasks}
    categories.update({g.name: g.category for g in cfg.eval.general})
    weights, reference = dict(cfg.eval.weights), dict(cfg.eval.reference_scores)
    report: Dict[str, Any] = {"categories": categories, "policies": {},
                              "trajectories": os.path.join(out_dir, TRAJECTORIES),
                              "failures": run["failures"], "skipped": run["skipped"],
                              "wall_s": run["wall_s"], "episodes_run": run["ran"], "episodes_resumed": run["resumed"]}
    for p in policies:
        tasks: Dict[str, Any] = {}
        for t, ids in run["ids"].items():
            eps = [episodes[(p, t, i)] for i in ids if (p, t, i) in episodes]
            tasks[t] = rep.task_summary(eps, thresholds[t], len(ids), len(run["skipped"].get(t, {})))
        for g, res in general.get(p, {}).items():
            tasks[g] = {k: v for k, v in res.items() if k != "predictions"}
        scored = {t: s for t, s in tasks.items() if "not_applicable" not in s}
        report["policies"][p] = {"kind": str(policies[p].config.kind), "tasks": tasks,
                                 "categories": rep.category_scores(scored, categories, weights, reference)}
    return report


def log_wandb(cfg: DictConfig, report: Dict[str, Any], files: List[str]) -> None:
    """Same numbers to wandb; offline without credentials; never blocks or fails the job."""
    if cfg.wandb.mode == "disabled":
        return
    try:
        import wandb

        mode = cfg.wandb.mode
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        run = wandb.init(project=cfg.wandb.project, name=cfg.wandb.name, tags=list(cfg.wandb.tags) + ["eval"],
                         mode=mode, dir=cfg.eval.output_dir, config=to_dict(cfg)["eval"], reinit="finish_previous")
        summary = {}
        for p, r in report["policies"].items():
            for t, s in r["tasks"].items():
                summary[f"{p}/{t}/score"] = s["score"]
                if "success_rate" in s:
                    summary[f"{p}/{t}/success_rate"] = s["success_rate"]
            for c, s in r["categories"].items():
                summary[f"{p}/overall/{c}"] = s["score"]
        run.log(summary)
        run.summary.update(summary)
        for f in files:
            if f.endswith(".png"):
                run.log({"report": wandb.Image(f)})
        run.finish()
    except Exception as exc:  # noqa: BLE001 - logging must never fail an evaluation
        log.warning("wandb logging skipped: %s", exc)


def main(cfg: DictConfig) -> Dict[str, Any]:
    """Run the configured evaluation; prints where the report went."""
    from ray import serve

    from agenttuning.cluster import ray_session
    from agenttuning.models import ensure_model

    out_dir = cfg.eval.output_dir
    os.makedirs(out_dir, exist_ok=True)
    if not cfg.eval.tasks and not cfg.eval.general:
        raise ValueError("config key 'eval.tasks': nothing to evaluate (no tasks and no general tasks)")
    policies = resolve_policies(cfg)
    if any(p.config.kind == "model" and p.config.model_path == cfg.model.name_or_path for p in policies.values()):
        ensure_model(cfg)
    with ray_session():
        apps = deploy(cfg, policies) if cfg.eval.deploy else []
        try:
            run = run_agent_tasks(cfg, policies, out_dir)
            general = run_general(cfg, policies)
        finally:
            for app in apps if cfg.eval.teardown else []:
                serve.delete(app)
    report = build_report(cfg, policies, run, general, out_dir)
    files = [os.path.join(out_dir, "report.json"), os.path.join(out_dir, "report.md")]
    rep.write_json(report, files[0])
    rep.write_markdown(report, files[1])
    if cfg.eval.plot:
        files.append(rep.write_plot(report, os.path.join(out_dir, "report.png")))
    log_wandb(cfg, report, files)
    lost = len(run["failures"])
    print(f"evaluation report: {files[1]} ({run['ran']} episodes run, {run['resumed']} resumed"
          f"{f', {lost} failed: re-run to complete them' if lost else ''})")
    return report


if __name__ == "__main__":
    import sys

    from agenttuning.cli import run_job

    sys.exit(run_job("pipelines.evaluate", sys.argv[1:]))
