"""`agenttuning run CONFIG`: AgentTuning end to end on one Ray cluster (the quickstart).

Stages, each the same code as its own job, sharing one Ray instance:

1. model    materialise ``model.name_or_path`` (GGUF → HF folder, or the tiny model)
2. split    split the DB task file by table into training seeds and held-in test tasks
3. collect  AgentInstruct construction: derived DB tasks, scripted-expert rollouts,
            reward filter, decontamination against the test split (``pipelines.collect``)
4. general  offline general data + evaluation subsets (MMLU 5-shot, GSM8K train/test, HumanEval)
5. data     η-mixed, loss-masked, packed dataset (``pipelines.data``)
6. train    Ray Train + DeepSpeed fine-tuning (``pipelines.train``)
7. eval     untuned vs tuned, through Ray Serve (model servers + rollout deployment),
            on held-in test tasks and general tasks (``pipelines.evaluate``)

The YAML wires stages together with interpolations (``train.data_dir: ${data.output_dir}``), so
every stage can also be run alone with the same file. Finished stages are skipped on a re-run
(``run.resume``): a completed collect/data/train output is reused, evaluation resumes per episode.
"""

import json
import logging
import os
import time
from typing import Any, Dict, List

from omegaconf import DictConfig, OmegaConf

from agenttuning.cluster import ray_session
from agenttuning.config import RUN_STAGES as STAGES
from agenttuning.config import ConfigError, with_updates
from agenttuning.models import ensure_model
from pipelines import collect, data, evaluate, general, train
from pipelines.mixing import stable_hash64
from pipelines.train_worker import list_checkpoints
from serve.envs.base import EnvError, data_file

log = logging.getLogger(__name__)
CONFIG_SECTIONS = ('run', 'model', 'collect', 'general', 'data', 'train', 'scaling', 'serve', 'eval', 'wandb')  # what `--help` lists


# ----------------------------------------------------------------------------- stages


def split_db(source: str, out_dir: str, test_fraction: float, seed: int) -> Dict[str, Any]:
    """DBBench records → ``db_seed.jsonl`` (tables reused for derived training tasks) and
    ``db_test.jsonl`` (held-in test tasks), split by table so no table is on both sides."""
    with open(source, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip()]
    by_table: Dict[str, List[str]] = {}
    for n, line in enumerate(lines, 1):
        try:
            name = json.loads(line)["table"]["table_name"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConfigError(f"config key 'run.db_source': {source}:{n} is not a DBBench record "
                              f"with table.table_name ({exc})") from None
        by_table.setdefault(str(name), []).append(line)
    tables = sorted(by_table, key=lambda t: stable_hash64(f"{seed}:{t}"))
    n_test = max(1, round(len(tables) * test_fraction))
    if n_test >= len(tables):
        raise ConfigError(f"config key 'run.db_test_fraction': {test_fraction} leaves no table of {source} "
                          f"({len(tables)} tables) for training tasks")
    parts = {"test": set(tables[:n_test]), "seed": set(tables[n_test:])}
    out = {}
    for part, names in parts.items():
        path = os.path.join(out_dir, f"db_{part}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for t in (t for t in by_table if t in names):  # by_table keeps file order of first use
                f.writelines(ln if ln.endswith("\n") else ln + "\n" for ln in by_table[t])
        out[part] = {"path": path, "tables": len(names), "records": sum(len(by_table[t]) for t in names)}
    log.info("DB tasks split by table: %d tables (%d records) for training seeds, %d (%d) held-in test",
             out["seed"]["tables"], out["seed"]["records"], out["test"]["tables"], out["test"]["records"])
    return out


def _latest_hf_checkpoint(run_directory: str) -> str:
    ckpts = list_checkpoints(run_directory)
    if not ckpts:
        raise RuntimeError(f"training wrote no checkpoint under {run_directory}")
    return ckpts[-1][1]


def results_table(report: Dict[str, Any], policies: List[str]) -> str:
    """Markdown table: one row per task, untuned vs tuned side by side."""
    cats = report["categories"]
    head = "| task | category | metric | " + " | ".join(policies) + " |"
    lines = [head, "|" + "---|" * (3 + len(policies))]
    tasks = list(report["policies"][policies[0]]["tasks"])
    for t in tasks:
        per = [report["policies"][p]["tasks"].get(t, {}) for p in policies]
        if "success_rate" in per[0]:
            rows = [("success rate", lambda s: f"{s['success_rate']:.3f} ({round(s['success_rate'] * s['n'])}/{s['n']})"),
                    ("invalid_format", lambda s: str(s["status_counts"].get("invalid_format", 0))),
                    ("mean turns", lambda s: f"{s['mean_turns']:.2f}")]
        else:
            rows = [(str(per[0].get("metric", "score")), lambda s: f"{s.get('score', 0.0):.3f} (n={s.get('n', 0)})")]
        for metric, fmt in rows:
            cells = [fmt(s) if s and "not_applicable" not in s else "n/a" for s in per]
            lines.append(f"| {t} | {cats.get(t, '')} | {metric} | " + " | ".join(cells) + " |")
    for c in sorted({c for p in policies for c in report["policies"][p]["categories"]}):
        cells = [f"{report['policies'][p]['categories'][c]['score']:.3f}" if c in report["policies"][p]["categories"]
                 else "n/a" for p in policies]
        lines.append(f"| **overall** | {c} | score / W | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- stages as a table


class Run:
    """What the stages share: the config, the output folder and each stage's result."""

    def __init__(self, cfg: DictConfig, source: str) -> None:
        self.cfg, self.source = cfg, source
        self.out_dir = os.path.abspath(cfg.run.output_dir)
        self.base = os.path.abspath(cfg.model.name_or_path)  # the untuned model
        self.run_directory = os.path.join(os.path.abspath(cfg.train.output_dir), cfg.train.run_name)
        self.summary: Dict[str, Any] = {"output_dir": self.out_dir}

    # One method per stage, in RUN_STAGES order; each returns what goes into summary.json.
    def model(self) -> str:

        self.base = os.path.abspath(ensure_model(self.cfg))
        return self.base

    def split(self) -> Dict[str, Any]:
        return split_db(self.source, self.out_dir, self.cfg.run.db_test_fraction, self.cfg.data.seed)

    def collect(self) -> Any:

        stats = os.path.join(self.cfg.collect.output_dir, "stats.json")
        if self.cfg.run.resume and os.path.isfile(stats):
            log.info("collect: reusing %s (run.resume)", stats)
            return {"stats": stats}
        return collect.main(self.cfg)

    def general(self) -> Any:

        return general.build_general(self.cfg.general.output_dir, self.cfg.general)

    def data(self) -> Any:

        return data.main(self.cfg)

    def train(self) -> str:

        done = [step for step, _ in list_checkpoints(self.run_directory)]
        if self.cfg.run.resume and done and done[-1] >= self.cfg.train.max_steps:
            log.info("train: %s already finished (step %d; run.resume)", self.run_directory, done[-1])
        else:
            train.main(self.cfg)
        return _latest_hf_checkpoint(self.run_directory)

    def eval(self) -> Dict[str, Any]:

        tuned = self.summary.get("train") or self.base
        pol = OmegaConf.to_container(self.cfg.run.eval_policy)
        policies = {"untuned": {**pol, "kind": "model", "model_path": self.base},
                    "tuned": {**pol, "kind": "model", "model_path": tuned}}
        return evaluate.main(with_updates(self.cfg, {"eval.policies": policies}))


# ----------------------------------------------------------------------------- driver


def main(cfg: DictConfig) -> Dict[str, Any]:
    """Run the configured stages in order; prints the results table and where everything went."""

    r = cfg.run
    run = Run(cfg, r.db_source or _default_db_source())  # before any work: a missing file fails fast
    os.makedirs(run.out_dir, exist_ok=True)
    t_start = time.time()
    timings: Dict[str, float] = {}
    with ray_session(r.num_cpus):
        for i, name in enumerate(STAGES, 1):
            if name not in r.stages:
                log.info("stage %s: skipped (not in run.stages)", name)
                continue
            log.info("━━ stage %d/%d: %s ━━ (%.0fs elapsed)", i, len(STAGES), name, time.time() - t_start)
            t0 = time.time()
            run.summary[name] = getattr(run, name)()
            timings[name] = round(time.time() - t0, 1)
            log.info("stage %s done in %.1fs", name, timings[name])
    summary = run.summary
    summary["checkpoint"] = summary.get("train")
    summary["timings_s"] = timings
    summary["wall_s"] = round(time.time() - t_start, 1)
    report = summary.pop("eval", None)
    if report:
        table = results_table(report, ["untuned", "tuned"])
        summary["table"] = table
        with open(os.path.join(run.out_dir, "results.md"), "w", encoding="utf-8") as f:
            f.write(f"# AgentTuning quickstart results\n\nModel: {run.base}\n\n{table}\n")
    with open(os.path.join(run.out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1, default=str)
    _print_summary(cfg, summary, run.out_dir)
    return summary


def _default_db_source() -> str:

    try:
        return data_file("agentbench/dbbench_dev.jsonl")
    except EnvError as exc:
        raise ConfigError(f"config key 'run.db_source': not set, and the default is missing ({exc}); "
                          "point it at a DBBench jsonl (AgentBench's dbbench_dev.jsonl)") from None


def _print_summary(cfg: DictConfig, summary: Dict[str, Any], out_dir: str) -> None:
    ev = os.path.abspath(cfg.eval.output_dir)
    print("\n" + summary.get("table", "(no evaluation ran)"))
    print(f"\nfinished in {summary['wall_s']:.0f}s (" + ", ".join(f"{k} {v:.0f}s" for k, v in summary["timings_s"].items()) + ")")
    print(f"results:     {out_dir}/results.md, {out_dir}/summary.json")
    print(f"report:      {ev}/report.md, {ev}/report.json, plot {ev}/report.png")
    print(f"trajectories: {os.path.abspath(cfg.collect.output_dir)} (collected), {ev}/trajectories.jsonl (evaluation)")
    print(f"checkpoint:  {summary.get('checkpoint')}")
    print(f"wandb:       offline runs under {os.path.abspath(cfg.train.output_dir)}/{cfg.train.run_name}/wandb and {ev}/wandb "
          "(`wandb sync <dir>` uploads them)" if cfg.wandb.mode != "disabled" else "wandb:       disabled")


if __name__ == "__main__":
    import sys

    from agenttuning.cli import run_job

    sys.exit(run_job("pipelines.run", sys.argv[1:]))
