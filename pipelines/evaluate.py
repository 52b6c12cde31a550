"""`agenttuning eval CONFIG`: agent tasks through the rollout deployment, general tasks, report.

For each policy in ``eval.policies`` (our model, any OpenAI-compatible endpoint, the scripted
expert) and each task in ``eval.tasks``, every task id runs as one episode on the rollout
deployment (``serve.rollout``), with at most ``eval.concurrency`` episodes in flight and
greedy decoding by default. Each finished episode is appended to
``<output_dir>/trajectories.jsonl`` (AgentInstruct format + reward/status/turns) and flushed at
once, so a crash or a killed replica loses no finished episode; a re-run with ``eval.resume``
runs only the episodes that are not in that file yet. General tasks (``eval.general``: kinds
``mc``, ``math``, ``code``, ``mtbench``) are scored by ``pipelines.general_eval`` through each
policy's served model. Outputs: ``report.json``,
``report.md``, ``report.png`` (see ``pipelines.eval_report``), the same numbers to wandb.
"""

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List

from omegaconf import DictConfig

from agenttuning import tracking
from agenttuning.chat import load_tokenizer
from agenttuning.cluster import JobFailed, ray_session
from agenttuning.config import to_dict, to_object, with_updates
from agenttuning.console import progress
from agenttuning.models import ensure_model
from agenttuning.schema import PolicyConfig
from pipelines import eval_report as rep
from pipelines.episodes import EpisodeStore, run_episodes
from pipelines.general_client import endpoint_for_policy, judge_endpoint
from pipelines.general_eval import load_task, not_applicable, score_task
from pipelines.scorers import subset
from serve.app import build_llm_app, build_rollout_app
from serve.eft import build_eft_app
from serve.lifecycle import start_serve
from serve.rollout import PolicySpec

log = logging.getLogger(__name__)
CONFIG_SECTIONS = ('model', 'eval', 'serve', 'wandb')  # what `--help` lists

TRAJECTORIES = "trajectories.jsonl"
# The number each general kind reports, as the report's metric column names it.
GENERAL_METRICS = {"mc": "accuracy", "math": "accuracy", "code": "pass@1", "mtbench": "rating_1_10",
                   "loglik": "token_probability"}


# ----------------------------------------------------------------------------- policies / apps


def resolve_policies(cfg: DictConfig) -> Dict[str, PolicySpec]:
    """Policies for the rollout deployment; model policies get their checkpoint, app and served id."""
    out = {}
    for name, p in (to_object(cfg.eval.policies) or {"model": PolicyConfig()}).items():
        if p.kind == "eft":  # served by the EFT server: prompts in the small fine-tuned model's format
            p.model = name
            out[name] = PolicySpec(p, app_name=f"eft-{name}", deployment="EFTServer",
                                   system_prompt=cfg.model.system_prompt, chat_template=cfg.model.chat_template)
            continue
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

    start_serve(to_object(cfg.serve))
    apps = []
    for name, p in policies.items():
        if p.config.kind == "model":
            serve.run(build_llm_app(cfg, p.config.model_path, model_id=name), name=p.app_name, route_prefix=f"/{name}")
            apps.append(p.app_name)
        elif p.config.kind == "eft":
            beta = cfg.eft.beta if p.config.beta is None else p.config.beta
            app = build_eft_app(with_updates(cfg, {"eft.beta": beta, "eft.model_id": name}))
            serve.run(app, name=p.app_name, route_prefix=f"/{name}")
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
    unavailable: Dict[str, str] = {}
    for t in cfg.eval.tasks:
        try:
            listing = handle.task_ids.remote(t.name).result()
        except Exception as exc:  # noqa: BLE001 — an environment that cannot start is reported, not fatal
            unavailable[t.name] = f"{type(exc).__name__}: {str(exc).splitlines()[-1][:300]}"
            log.warning("task %s unavailable: %s", t.name, unavailable[t.name])
            continue
        limit = t.limit if t.limit is not None else cfg.eval.limit
        ids[t.name] = subset([str(i) for i in listing["ids"]], limit, cfg.eval.sample_seed)
        skipped[t.name] = listing["skipped"]
    jobs = [{"policy": p, "task": t, "task_id": i} for p in policies for t in ids for i in ids[t]
            if (p, t, i) not in done]
    log.info("%d episodes to run (%d already done)", len(jobs), len(done))
    t0 = time.time()
    with store:
        outcome = run_episodes(handle, jobs, store, cfg.eval.concurrency, cfg.eval.max_retries, desc="eval episodes")
    failures = [{"policy": k[0], "task": k[1], "task_id": k[2], "error": o["detail"]}
                for k, o in outcome.items() if "error" in o]
    # The paper's number per (policy, task), computed by the environment that defines it.
    episodes = store.load()
    paper = {p: {t: handle.score.remote(t, [episodes[(p, t, i)] for i in ids[t] if (p, t, i) in episodes]).result()
                 for t in ids} for p in policies}
    restarted = sum(1 for ep in episodes.values() if ep.get("restarts"))
    return {"ids": ids, "skipped": skipped, "unavailable": unavailable, "failures": failures,
            "ran": len(jobs) - len(failures), "resumed": len(done), "restarted": restarted, "paper": paper,
            "wall_s": time.time() - t0}


def run_general(cfg: DictConfig, policies: Dict[str, PolicySpec]) -> Dict[str, Dict[str, Any]]:
    """General tasks per policy (``pipelines.general_eval``): {policy: {task: result}}.

    Each task's data is read once (bad data fails here, before any model is asked); every model
    policy is then scored where it is served, over HTTP (our model apps at ``/<policy>/v1``, outside
    endpoints at their ``base_url``), policies side by side. Not applicable ones say why.
    """
    out: Dict[str, Dict[str, Any]] = {p: {} for p in policies}
    if not cfg.eval.general:
        return out
    general = to_object(cfg.eval.general)
    for g in general:  # eval.limit: N items of every task without its own limit
        g.limit = g.limit if g.limit is not None else cfg.eval.limit
    tasks = [load_task(g, i, cfg.eval.sample_seed) for i, g in enumerate(general)]
    judges = {t.cfg.name: judge_endpoint(t.cfg.judge) for t in tasks if t.cfg.kind == "mtbench"}

    def one_policy(name: str, spec: PolicySpec) -> None:
        p = spec.config
        if p.kind == "expert":
            for t in tasks:
                out[name][t.cfg.name] = not_applicable("the scripted expert has no general ability")
            return
        endpoint = endpoint_for_policy(cfg, name, p)
        # The tokenizer the served model renders prompts with (EFT: the small fine-tuned model's).
        tok_path = {"model": p.model_path, "eft": cfg.eft.small_ft or cfg.model.name_or_path}.get(str(p.kind), p.tokenizer)
        cache: List[Any] = []

        def tokenizer() -> Any:
            if not cache:
                cache.append(load_tokenizer(tok_path, spec.chat_template) if tok_path else None)
            return cache[0]

        for t in tasks:
            t0 = time.time()
            res = score_task(t, endpoint, p, tokenizer, judges.get(t.cfg.name), cfg.eval.concurrency)
            out[name][t.cfg.name] = {**res, "wall_s": round(time.time() - t0, 2)}
            log.info("general %s / %s: %s", name, t.cfg.name, res.get("not_applicable") or f"{res['score']:.4f}")
            bar.update(len(t.records))

    n_models = sum(1 for spec in policies.values() if spec.config.kind != "expert")
    # transformers resolves its names lazily on first import; two policy threads doing that at once
    # can see a half-initialised module ("cannot import name 'AutoTokenizer'").
    import transformers  # noqa: F401

    # Policies side by side: each has its own model replicas, so they decode in parallel.
    pool = ThreadPoolExecutor(max_workers=max(1, len(policies)))
    with progress(total=n_models * sum(len(t.records) for t in tasks), desc="general items", unit="item") as bar:
        try:
            for f in [pool.submit(one_policy, n, p) for n, p in policies.items()]:
                f.result()
        finally:
            # Not `with`: a stop (SIGINT/SIGTERM) must not wait for requests still in flight.
            pool.shutdown(wait=False, cancel_futures=True)
    return out


# ----------------------------------------------------------------------------- report


def build_report(cfg: DictConfig, policies: Dict[str, PolicySpec], run: Dict[str, Any],
                 general: Dict[str, Dict[str, Any]], out_dir: str) -> Dict[str, Any]:
    """report.json's content: per policy, per task and per category, beside the paper's columns."""
    episodes = EpisodeStore(os.path.join(out_dir, TRAJECTORIES)).load()
    paper = rep.load_paper_table(cfg.eval.paper_table)
    thresholds = {t.name: t.success_threshold for t in cfg.eval.tasks}
    categories = {t.name: t.category for t in cfg.eval.tasks}
    categories.update({g.name: g.category for g in cfg.eval.general})
    reference = {**paper["reference"], **dict(cfg.eval.reference_scores)}
    # A full category: the paper's tasks for it, plus every configured task (an unavailable one is missing).
    expected = {c: list(ts) for c, ts in paper["categories"].items()}
    for name, cat in categories.items():
        if name not in expected.setdefault(cat, []):
            expected[cat].append(name)
    report: Dict[str, Any] = {"categories": categories, "policies": {},
                              "trajectories": os.path.join(out_dir, TRAJECTORIES),
                              "failures": run["failures"], "skipped": run["skipped"],
                              "unavailable": run.get("unavailable", {}),
                              "wall_s": run["wall_s"], "episodes_run": run["ran"], "episodes_resumed": run["resumed"],
                              "episodes_restarted": run.get("restarted", 0),
                              "paper": {"table": cfg.eval.paper_table, "columns": paper["columns"]}}
    for p in policies:
        tasks: Dict[str, Any] = {}
        for t, ids in run["ids"].items():
            eps = [episodes[(p, t, i)] for i in ids if (p, t, i) in episodes]
            tasks[t] = rep.task_summary(eps, thresholds[t], len(ids), len(run["skipped"].get(t, {})))
            ps = run.get("paper", {}).get(p, {}).get(t, {})
            tasks[t].update(paper_score=ps.get("score", 100.0 * tasks[t]["score"]), metric=ps.get("metric", "mean_reward"))
        for g, res in general.get(p, {}).items():
            tasks[g] = {k: v for k, v in res.items() if k != "predictions"}
            # The paper's scale: percentages, MT-Bench its 1-10 rating as is.
            kind = next((str(x.kind) for x in cfg.eval.general if x.name == g), "")
            tasks[g].setdefault("paper_score", tasks[g].get("score", 0.0) * (1.0 if kind == "mtbench" else 100.0))
            tasks[g].setdefault("metric", GENERAL_METRICS.get(kind, kind))
        scored = {t: s for t, s in tasks.items() if "not_applicable" not in s}
        report["policies"][p] = {"kind": str(policies[p].config.kind), "tasks": tasks,
                                 "categories": rep.category_scores(scored, categories, reference, expected)}
    return report


def log_wandb(cfg: DictConfig, policies: Dict[str, PolicySpec], report: Dict[str, Any], files: List[str]) -> None:
    """The same numbers to wandb (run of job_type eval in the experiment's group, a stable id, the
    evaluated models in its config, per-task scores, the report image); offline without credentials."""
    w = cfg.wandb
    name = w.name or os.path.basename(os.path.normpath(cfg.eval.output_dir))
    run_cfg = tracking.resolve(str(w.mode), w.project, w.group or cfg.train.run_name, "eval", name, list(w.tags) + ["eval"])
    evaluated = {p: {"kind": str(s.config.kind), "model": s.config.model_path or s.config.model,
                     "base_url": s.config.base_url} for p, s in policies.items()}
    run = tracking.init(run_cfg, cfg.eval.output_dir, {"eval": to_dict(cfg.eval), "evaluated": evaluated})
    if run is None:
        return
    try:
        import wandb

        summary = {}
        for p, r in report["policies"].items():
            for t, s in r["tasks"].items():
                summary[f"{p}/{t}/score"] = s.get("paper_score", s.get("score"))
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
    log_wandb(cfg, policies, report, files)
    lost, unavailable = len(run["failures"]), run.get("unavailable", {})
    print(f"evaluation report: {files[1]} ({run['ran']} episodes run, {run['resumed']} resumed"
          f"{f', {lost} failed: re-run to complete them' if lost else ''})")
    if (lost or unavailable) and cfg.eval.strict:
        # The report is written, but it is partial: say so in the exit code (scripts, CI, sweeps).
        why = ([f"{lost} episodes failed (re-run to complete them)"] if lost else []) + (
            [f"tasks unavailable: {', '.join(sorted(unavailable))}"] if unavailable else [])
        raise JobFailed(f"evaluation incomplete: {'; '.join(why)}; partial report {files[1]}")
    return report


if __name__ == "__main__":
    import sys

    from agenttuning.cli import run_job

    sys.exit(run_job("pipelines.evaluate", sys.argv[1:]))
