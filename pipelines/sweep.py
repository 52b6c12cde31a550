"""`agenttuning sweep CONFIG`: a Ray Tune sweep over config keys; each trial is data → train → eval.

The ``sweep`` section lists the trials: ``grid`` (dotted key → values, every combination) and/or
``trials`` (explicit override sets, each combined with every grid point). Keys are any config keys,
named list items included (``data.sources.sharegpt.weight``). A trial is the same config with its
overrides, run by the jobs' own ``main`` functions, in its own folders::

    <output_dir>/data/<fingerprint>/        pipelines.data output, shared by trials whose model, data
                                            section (and schedule, for data.size_by=schedule) agree
    <output_dir>/trials/<trial>/train/       pipelines.train checkpoints (resumed after a crash)
    <output_dir>/trials/<trial>/eval/        pipelines.evaluate report.json/.md/.png, trajectories.jsonl
    <output_dir>/trials/<trial>/result.json  the finished trial: swept values, category/task scores
    <output_dir>/results.md, results.json, results.png, tune/ (Ray Tune's experiment)

Each distinct data configuration is built once, before the trials (a data job spreads over the whole
cluster itself; trials differing only in train/eval keys would otherwise rebuild identical shards).
Tune then schedules the trials: each reserves ``sweep.trial_resources`` for its driver and at most
``sweep.max_concurrent_trials`` run at once (default: as many as the cluster holds of one trial's
peak, :func:`footprint`). A trial's stages run in a Ray task outside the trial's placement group,
so its training workers, Ray Data reads and Serve replicas take cluster resources like the jobs run
alone (inside the group they would wait forever for resources the group does not hold).

A trial's id hashes the config that determines its results (model, data, train, scaling, the
evaluation suite, sweep.eval_policy and its overrides), so a re-run skips finished trials
(``result.json``), resumes unfinished ones (training from its last checkpoint, evaluation per
episode) and never mixes outputs of a changed config. Every trial's wandb runs (training, eval)
share the group ``sweep.name`` (``wandb.group``), are named ``<name>-<trial>`` and carry the tag
``sweep:<name>``. See docs/sweep.md.
"""

import hashlib
import itertools
import json
import logging
import math
import os
import re
import time
from typing import Any, Dict, List

import ray
from omegaconf import DictConfig
from ray import tune

from agenttuning.cluster import ray_session
from agenttuning.config import ConfigError, to_dict, with_updates
from pipelines import data as data_job
from pipelines import evaluate as eval_job
from pipelines import train as train_job
from pipelines.sweep_results import write_results
from pipelines.train_worker import list_checkpoints

log = logging.getLogger(__name__)
CONFIG_SECTIONS = ('sweep', 'model', 'data', 'train', 'scaling', 'serve', 'eval', 'wandb')  # what `--help` lists

RESULT = "result.json"
# Keys the sweep sets for every trial (folders, evaluated policy, Serve app, wandb run): not sweepable.
MANAGED = ("data.output_dir", "train.data_dir", "train.output_dir", "eval.output_dir", "eval.policies",
           "serve.rollout.app_name", "wandb.group", "wandb.name", "sweep")


# ----------------------------------------------------------------------------- planning


def plan_overrides(grid: Dict[str, List[Any]], trials: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Override sets, one per trial: every grid combination × every explicit set (in order)."""
    for key, values in grid.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"config key 'sweep.grid.{key}': needs a non-empty list of values")
    keys = list(grid)
    points = [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))] if keys else [{}]
    sets = [dict(t) for t in trials] or [{}]
    out = [{**s, **p} for s in sets for p in points]
    if out == [{}]:
        raise ConfigError("config key 'sweep.grid': nothing to sweep (give sweep.grid and/or sweep.trials)")
    for o in out:
        for key in o:
            if any(key == m or key.startswith(m + ".") for m in MANAGED):
                raise ConfigError(f"config key 'sweep': {key} is set by the sweep for each trial and cannot be swept")
    return out


def _digest(obj: Any, n: int = 10) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def _without(d: Dict[str, Any], keys: tuple) -> Dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


def data_fingerprint(cfg: DictConfig) -> str:
    """What determines the data job's output: the model (tokenizer, template), the data section and,
    for data.size_by=schedule, the training schedule."""
    c = to_dict(cfg)
    key = {"model": c["model"], "data": _without(c["data"], ("output_dir", "overwrite"))}
    if cfg.data.num_samples is None and cfg.data.size_by == "schedule":
        key["schedule"] = [cfg.train.max_steps, cfg.train.global_batch_size]
    return _digest(key, 12)


def trial_fingerprint(cfg: DictConfig, trained: bool = True) -> str:
    """What determines a trial's results (not where they are written); trained=False: the baseline's
    (the base model on the suite)."""
    c = to_dict(cfg)
    key = {"eval": {k: c["eval"][k] for k in ("tasks", "general", "reference_scores")},
           "paper_table": c["eval"].get("paper_table"), "policy": c["sweep"]["eval_policy"]}
    if trained:
        key.update({"data": data_fingerprint(cfg), "train": _without(c["train"], ("data_dir", "output_dir")),
                    "scaling": c["scaling"]})
    else:
        key["model"] = c["model"]
    return _digest(key, 10)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "sweep"


def plan_trials(cfg: DictConfig) -> List[Dict[str, Any]]:
    """The sweep's trials: id, overrides, data fingerprint and the trial's own config (folders set)."""
    s = cfg.sweep
    out = os.path.abspath(s.output_dir)
    name = _slug(s.name)
    trials: List[Dict[str, Any]] = []
    for overrides in plan_overrides(to_dict(s.grid), to_dict(s.trials)):
        tcfg = with_updates(cfg, overrides)
        tid = f"trial-{trial_fingerprint(tcfg)}"
        if any(t["id"] == tid for t in trials):
            raise ConfigError(f"config key 'sweep': two trials have the same configuration {overrides} "
                              f"and {next(t['overrides'] for t in trials if t['id'] == tid)}")
        dfp = data_fingerprint(tcfg)
        trials.append(_placed(tcfg, tid, overrides, dfp, out, name))
    if s.baseline:  # the base model on the same suite: no data, no training
        bid = f"{_slug(s.baseline)}-{trial_fingerprint(cfg, trained=False)}"
        trials.insert(0, {**_placed(cfg, bid, {}, None, out, name), "baseline": s.baseline})
    return trials


def _placed(cfg: DictConfig, tid: str, overrides: Dict[str, Any], dfp: Any, out: str, name: str) -> Dict[str, Any]:
    """A planned trial: its config with its own folders, Serve app and wandb run."""
    tdir = os.path.join(out, "trials", tid)
    app = f"{name}-{tid.split('-', 1)[1]}"  # unique per trial: concurrent trials share Serve
    data_dir = os.path.join(out, "data", dfp) if dfp else cfg.data.output_dir
    tcfg = with_updates(cfg, {
        "data.output_dir": data_dir, "train.data_dir": data_dir,
        "train.output_dir": os.path.join(tdir, "train"), "eval.output_dir": os.path.join(tdir, "eval"),
        "serve.rollout.app_name": f"{app}-rollout", "wandb.group": name, "wandb.name": f"{name}-{tid}",
        "wandb.tags": list(cfg.wandb.tags) + [f"sweep:{name}"],
    })
    return {"id": tid, "overrides": overrides, "data": dfp, "dir": tdir, "policy": app, "cfg": tcfg}


def swept_keys(trials: List[Dict[str, Any]]) -> List[str]:
    """Override keys in first-seen order."""
    keys: List[str] = []
    for t in trials:
        keys += [k for k in t["overrides"] if k not in keys]
    return keys


def finished(trial: Dict[str, Any]) -> bool:
    return os.path.isfile(os.path.join(trial["dir"], RESULT))


# ----------------------------------------------------------------------------- resources


def training_resources(cfg: DictConfig) -> Dict[str, float]:
    """What a trial's training workers reserve together (1 CPU per worker, and 1 GPU with use_gpu,
    when resources_per_worker does not say)."""
    s = cfg.scaling
    per_worker = {str(k): float(v) for k, v in s.resources_per_worker.items()} or {"CPU": 1.0}
    if s.use_gpu:
        per_worker.setdefault("GPU", 1.0)
    return {k: v * s.num_workers for k, v in per_worker.items()}


def footprint(cfg: DictConfig) -> Dict[str, float]:
    """One trial's peak resources: its driver's reservation plus the larger of its training workers
    and its Serve replicas (model + rollout); stages run one after the other."""
    sv = cfg.serve
    train = training_resources(cfg)
    replicas = sv.autoscaling.max_replicas if sv.autoscaling is not None else sv.num_replicas
    serve = {"CPU": replicas * sv.num_cpus + sv.rollout.num_replicas * sv.rollout.num_cpus,
             "GPU": replicas * sv.num_gpus}
    peak = {k: max(train.get(k, 0.0), serve.get(k, 0.0)) for k in set(train) | set(serve)}
    for k, v in cfg.sweep.trial_resources.items():
        peak[str(k)] = peak.get(str(k), 0.0) + float(v)
    return {k: v for k, v in peak.items() if v > 0}


def auto_concurrency(footprints: List[Dict[str, float]], cluster: Dict[str, float]) -> int:
    """Trials at once: how many of the largest footprint the cluster holds (at least 1). CPUs count
    as whole cores plus one per trial: fractional reservations (a tiny config's 0.5-CPU workers)
    leave out the stage's own work — Ray Data reads, episode loops — which still needs a core."""
    worst: Dict[str, float] = {}
    for f in footprints:
        for k, v in f.items():
            worst[k] = max(worst.get(k, 0.0), v)
    short = {k: v for k, v in worst.items() if cluster.get(k, 0.0) < v}
    if short:
        log.warning("a trial needs %s but the cluster has %s: trials wait until the cluster grows",
                    short, {k: cluster.get(k, 0.0) for k in short})
    need = {k: (math.ceil(v - 1e-9) + 1 if k == "CPU" else v) for k, v in worst.items()}
    fits = [int(cluster.get(k, 0.0) // v) for k, v in need.items() if v > 0]
    return max(1, min(fits) if fits else 1)


def check_data_room(cfg: DictConfig, cluster: Dict[str, float]) -> None:
    """Fail before any trial starts when a trial's training would fit the cluster but starve its
    own Ray Data reads: the workers and Tune's reservation for the trial driver leave less than the
    1 CPU a read task takes, and training waits forever for its first batch."""
    workers = training_resources(cfg).get("CPU", 0.0)
    train = workers + float(cfg.sweep.trial_resources.get("CPU", 0.0))
    total = float(cluster.get("CPU", 0.0))
    if train <= total < train + 1.0:
        raise ConfigError(
            f"config key 'scaling.resources_per_worker': a trial's training workers ({workers:g} CPU in all) "
            f"and its driver's reservation (sweep.trial_resources) take {train:g} of the cluster's {total:g} CPUs, "
            "leaving less than the 1 CPU a Ray Data read task needs, so training would wait forever for data; reserve "
            "less per worker (e.g. scaling.resources_per_worker={CPU: 0.5}: the worker still computes on "
            "train.torch_threads threads) or run on a larger cluster")


# ----------------------------------------------------------------------------- one trial


def _atomic_json(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def _train_summary(run_directory: str) -> Dict[str, Any]:
    path = os.path.join(run_directory, "metrics.jsonl")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip()]
    last = json.loads(lines[-1]) if lines else {}
    return {k: last[k] for k in ("step", "epoch", "loss") if k in last}


def run_trial(trial: Dict[str, Any]) -> Dict[str, Any]:
    """train → eval of one trial (its data is built); writes and returns its result.json content."""
    t0 = time.time()
    cfg = trial["cfg"]
    run_directory = os.path.join(cfg.train.output_dir, cfg.train.run_name)
    if trial.get("baseline"):
        checkpoint = cfg.model.name_or_path
    else:
        done = [step for step, _ in list_checkpoints(run_directory)]
        if done and done[-1] >= cfg.train.max_steps:
            log.info("trial %s: training already finished (step %d)", trial["id"], done[-1])
        else:
            train_job.main(cfg)
        ckpts = list_checkpoints(run_directory)
        if not ckpts:
            raise RuntimeError(f"trial {trial['id']}: training wrote no checkpoint under {run_directory}")
        checkpoint = ckpts[-1][1]
    policy = {**to_dict(cfg.sweep.eval_policy), "kind": "model", "model_path": checkpoint}
    # Only this trial's checkpoint: the config's own eval.policies (baselines) are replaced.
    report = eval_job.main(with_updates(cfg, {"eval.policies": {trial["policy"]: policy}}, merge=False))
    mine = report["policies"][trial["policy"]]
    data: Dict[str, Any] = {}  # a baseline has none
    if not trial.get("baseline"):
        with open(os.path.join(cfg.data.output_dir, "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
        data = {"dir": cfg.data.output_dir, "eta_actual": manifest.get("eta_actual"), "num_rows": manifest.get("num_rows"),
                "epochs": {k: v.get("epochs") for k, v in manifest.get("sources", {}).items()}}
    result = {
        "trial": trial["id"], "overrides": trial["overrides"], "status": "finished",
        "categories": {c: {"score": v["score"], "partial": v.get("partial", False)} for c, v in mine["categories"].items()},
        "baseline": trial.get("baseline"),
        "tasks": {t: {k: v[k] for k in ("score", "paper_score", "success_rate", "n", "errors") if k in v}
                  for t, v in mine["tasks"].items() if "not_applicable" not in v},
        "train": _train_summary(run_directory), "checkpoint": checkpoint,
        "data": data,
        "report": os.path.join(cfg.eval.output_dir, "report.json"), "wall_s": round(time.time() - t0, 1),
    }
    _atomic_json(result, os.path.join(trial["dir"], RESULT))
    return result


def _trainable(config: Dict[str, Any], trials: Dict[str, Dict[str, Any]]) -> None:
    """Tune's function trainable: run the trial's stages in a task outside the trial's placement group."""
    trial = trials[config["trial"]]
    # An explicit scheduling strategy keeps the task (and everything it starts) out of the trial's
    # placement group.
    stages = ray.remote(run_trial).options(num_cpus=0, scheduling_strategy="DEFAULT")
    result = ray.get(stages.remote(trial))
    metrics = {f"score/{c}": v["score"] for c, v in result["categories"].items()}
    metrics.update({f"task/{t}": v["score"] for t, v in result["tasks"].items()})
    if "loss" in result["train"]:
        metrics["train_loss"] = result["train"]["loss"]
    tune.report(metrics)


# ----------------------------------------------------------------------------- driver


def build_data(trials: List[Dict[str, Any]]) -> None:
    """The data job once per distinct data configuration among these trials (skipped when built)."""
    built = set()
    for t in trials:
        if t["data"] is None or t["data"] in built:  # a baseline needs no data
            continue
        built.add(t["data"])
        manifest = os.path.join(t["cfg"].data.output_dir, "manifest.json")
        if os.path.isfile(manifest):
            log.info("data %s: reusing %s", t["data"], manifest)
            continue
        log.info("data %s: building for %d trial(s)", t["data"], sum(x["data"] == t["data"] for x in trials))
        data_job.main(t["cfg"])


def main(cfg: DictConfig) -> Dict[str, Any]:
    """Plan, run the unfinished trials on Ray Tune, write the results table and plot."""
    s = cfg.sweep
    out = os.path.abspath(s.output_dir)
    trials = plan_trials(cfg)
    todo = [t for t in trials if not finished(t)]
    if not s.resume and len(todo) < len(trials):
        raise ConfigError(f"config key 'sweep.resume': false, but {out} holds finished trials of this sweep; "
                          "use another sweep.output_dir or sweep.resume=true")
    log.info("sweep %s: %d trials (%d finished earlier) over %s", s.name, len(trials), len(trials) - len(todo),
             ", ".join(swept_keys(trials)))
    os.makedirs(out, exist_ok=True)
    errors: Dict[str, str] = {}
    if todo:  # a finished sweep only rewrites its tables: no Ray
        with ray_session():
            for t in todo:  # before any data job or trial starts
                if not t.get("baseline"):
                    check_data_room(t["cfg"], ray.cluster_resources())
            build_data(todo)
            for t in todo:
                os.makedirs(t["dir"], exist_ok=True)
                _atomic_json({"trial": t["id"], "overrides": t["overrides"], "data": t["data"]},
                             os.path.join(t["dir"], "trial.json"))
            errors = _tune(cfg, todo, out)
    paths = write_results(trials, swept_keys(trials), out, errors, plot_png=s.plot)
    print(f"sweep {s.name}: {len(trials) - len(errors)}/{len(trials)} trials finished; results {paths['md']} "
          f"({', '.join(os.path.basename(p) for p in paths.values())}); trials under {out}/trials/")
    if errors:
        raise RuntimeError(f"{len(errors)} trial(s) failed (re-run the sweep to retry them): "
                           + "; ".join(f"{k}: {v}" for k, v in errors.items()))
    return {"trials": trials, "results": paths}


def _tune(cfg: DictConfig, todo: List[Dict[str, Any]], out: str) -> Dict[str, str]:
    """Run `todo` on Ray Tune; returns {trial id: error} for the failed ones."""
    s = cfg.sweep
    conc = s.max_concurrent_trials or auto_concurrency([footprint(t["cfg"]) for t in todo], ray.cluster_resources())
    log.info("sweep %s: %d trial(s) to run, at most %d at once, each reserving %s for its driver",
             s.name, len(todo), conc, dict(s.trial_resources))
    by_id = {t["id"]: t for t in todo}
    trainable = tune.with_resources(tune.with_parameters(_trainable, trials=by_id),
                                    {str(k): float(v) for k, v in s.trial_resources.items()})
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search([t["id"] for t in todo])},
        tune_config=tune.TuneConfig(max_concurrent_trials=conc, trial_name_creator=lambda tr: tr.config["trial"],
                                    trial_dirname_creator=lambda tr: tr.config["trial"]),
        run_config=tune.RunConfig(name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=os.path.join(out, "tune"),
                                  failure_config=tune.FailureConfig(max_failures=0), verbose=1),
    )
    grid = tuner.fit()
    errors = {}
    for r in grid:
        tid = r.config.get("trial") if r.config else None
        if r.error is not None and tid:
            errors[tid] = str(r.error).strip().splitlines()[-1][:300]
            log.error("trial %s failed: %s", tid, errors[tid])
    return errors


if __name__ == "__main__":
    import sys

    from agenttuning.cli import run_job

    sys.exit(run_job("pipelines.sweep", sys.argv[1:]))
