"""`agenttuning collect CONFIG`: AgentInstruct construction (AgentTuning §2).

Per task in ``collect.tasks``:

1. instructions (``pipelines.collect_instruct``): the environment's own tasks, task derivation
   (new DB questions with executed gold answers, templated OS tasks), or self-instruct;
2. teacher rollouts through the rollout deployment (``serve.rollout.RolloutServer``; teacher =
   the scripted expert or an OpenAI-compatible endpoint, the same code path), at most
   ``collect.concurrency`` episodes in flight. Each trajectory is the environment's opening
   turns, a ONE-SHOT DEMONSTRATION (a successful scripted-expert episode of another task of the
   same environment, its assistant turns ``loss: false``), then the task in ReAct form;
3. filters, counted per task: teacher errors (retried with backoff first), reward below
   ``reward_threshold``, teacher turns without a thought line, contamination (n-gram overlap
   with the evaluation files), exact duplicates;
4. outputs in ``output_dir``: ``<task>.jsonl`` (AgentInstruct: ``id``, ``conversations``; the
   data job reads it with ``format: agentinstruct``), ``stats.json``, ``yield.md`` (the paper's
   Table 1: instructions → kept, teacher tokens), and ``episodes.jsonl``, every finished episode
   appended and flushed at once: a re-run skips those and writes identical outputs.
"""

import json
import logging
import os
import re
import time
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import DictConfig

from agenttuning.cluster import JobFailed, ray_session
from agenttuning.config import ConfigError, to_dict, to_object
from agenttuning.schema import EvalTaskConfig, PolicyConfig, PolicyKind
from agenttuning.sources import iter_text
from pipelines import collect_instruct as ci
from pipelines import mixing
from pipelines.episodes import EpisodeStore, run_episodes
from serve.lifecycle import start_serve
from serve.rollout import PolicySpec, RolloutServer

log = logging.getLogger(__name__)
CONFIG_SECTIONS = ('model', 'collect', 'serve')  # what `--help` lists

EPISODES = "episodes.jsonl"
# A thought line before the action: "Thought:" (ReAct), "Think:" (AgentBench OS's own syntax).
_THOUGHT = re.compile(r"^\s*(Thought|Think)\s*:\s*\S", re.M | re.I)
COUNTS = ("instructions", "validated", "episodes", "teacher_error", "rollout_error", "reward_passed",
          "no_thought", "decontaminated", "duplicates", "kept", "tokens_in", "tokens_out")


# ----------------------------------------------------------------------------- trajectories


def task_start(conv: List[Dict[str, Any]]) -> int:
    """Index of the task's own message: the human turn before the first trained (loss) turn."""
    for i, c in enumerate(conv):
        if c["from"] == "gpt" and c.get("loss") is not False:
            return i - 1
    return len(conv)


def demo_messages(ep: Dict[str, Any]) -> List[Dict[str, str]]:
    """A finished episode as a demonstration: its task message … its last action."""
    conv = ep["conversations"]
    body = conv[task_start(conv):]
    while body and body[-1]["from"] != "gpt":
        body = body[:-1]  # the final observation (often empty) is not part of the example
    return [{"role": "user" if c["from"] == "human" else "assistant", "content": c["value"]} for c in body]


def trajectory(ep: Dict[str, Any]) -> Dict[str, Any]:
    """AgentInstruct record of an episode: ends with the teacher's last turn."""
    conv = [dict(c) for c in ep["conversations"]]
    while conv and conv[-1]["from"] != "gpt":
        conv.pop()
    return {"id": ep["id"], "conversations": conv}


def has_thoughts(conv: List[Dict[str, Any]]) -> bool:
    return all(_THOUGHT.search(c["value"]) for c in conv if c["from"] == "gpt" and c.get("loss") is not False)


def choose_demo(pool: List[Dict[str, Any]], task_id: str) -> Optional[Dict[str, Any]]:
    """A demonstration from another task, chosen by a stable hash of the task id."""
    others = [d for d in pool if str(d["task_id"]) != str(task_id)]
    if not others:
        return None
    return others[mixing.stable_hash64(str(task_id)) % len(others)]


# ----------------------------------------------------------------------------- running


def deploy(cfg: DictConfig, tasks: List[EvalTaskConfig], teacher: PolicyConfig) -> str:
    """The rollout application for the collect tasks (policies: teacher + scripted expert)."""
    from ray import serve

    start_serve(to_object(cfg.serve))
    r = cfg.serve.rollout
    policies = {"teacher": PolicySpec(teacher), "expert": PolicySpec(PolicyConfig(kind=PolicyKind.expert))}
    app = RolloutServer.options(num_replicas=r.num_replicas, max_ongoing_requests=r.max_ongoing_requests,
                                ray_actor_options={"num_cpus": r.num_cpus}).bind(tasks, policies)
    serve.run(app, name=cfg.collect.app_name, route_prefix=None)
    return cfg.collect.app_name


def collect_episodes(cfg: DictConfig, handle: Any, listings: Dict[str, Dict[str, Any]], out_dir: str
                     ) -> Tuple[Dict[Tuple[str, str, str], Dict[str, Any]], Dict[Tuple[str, str], str]]:
    """Demonstration episodes first (scripted expert), then every teacher episode; resumable."""
    c = cfg.collect
    store = EpisodeStore(os.path.join(out_dir, EPISODES), resume=c.resume)
    done = store.load()  # keyed (policy, task, task_id): demonstrations are the expert's
    with store:
        pools: Dict[str, List[Dict[str, Any]]] = {}
        if c.demo.enabled:
            # Candidates: the first pool+1 instructions (one more, so every task has "another" task).
            jobs = [{"task": t, "task_id": i, "policy": "expert", "record": {"kind": "demo", "demo_of": None}}
                    for t, lst in listings.items() for i in lst["ids"][: c.demo.pool + 1]
                    if ("expert", t, i) not in done]
            run_episodes(handle, jobs, store, c.concurrency, c.max_episode_retries, desc="demonstrations")
            done = store.load()
            for t, lst in listings.items():
                eps = [done.get(("expert", t, i)) for i in lst["ids"][: c.demo.pool + 1]]
                # pool+1 kept so that every task, one of the pool's included, has `pool` choices
                pools[t] = [e for e in eps if e and e["reward"] >= 1.0 and e["status"] == "completed"]
                if not pools[t]:
                    log.warning("collect task %s: no successful expert episode for a demonstration", t)
        jobs = []
        for t, lst in listings.items():
            for i in lst["ids"]:
                if ("teacher", t, i) in done:
                    continue
                demo = choose_demo(pools.get(t, []), i)
                jobs.append({"task": t, "task_id": i, "policy": "teacher",
                             "demo": demo_messages(demo) if demo else None,
                             "record": {"kind": "episode", "demo_of": demo["task_id"] if demo else None}})
        log.info("collect: %d episodes to run (%d already done)", len(jobs),
                 sum(1 for k in done if k[0] == "teacher"))
        outcome = run_episodes(handle, jobs, store, c.concurrency, c.max_episode_retries, desc="teacher episodes")
    errors = {(k[1], k[2]): o["error"] for k, o in outcome.items() if "error" in o}
    return store.load(), errors


# ----------------------------------------------------------------------------- filtering and outputs


def reference(c: DictConfig):
    dc = c.decontamination
    if not dc.enabled or not dc.paths:
        return None

    return mixing.reference_ngrams(iter_text(ci.expand_paths(list(dc.paths))), dc.ngram)


def filter_task(task: DictConfig, ids: List[str], episodes: Dict[Tuple[str, str, str], Dict[str, Any]],
                errors: Dict[Tuple[str, str], str], ref: Any, c: DictConfig, counts: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Kept AgentInstruct records of one task, in instruction order; fills ``counts``."""
    dc = c.decontamination
    kept, hashes = [], set()
    for i in ids:
        err = errors.get((task.name, i))
        if err:
            counts[err] += 1
        ep = episodes.get(("teacher", task.name, i))
        if ep is None:
            continue
        counts["episodes"] += 1
        usage = ep.get("usage") or {}
        counts["tokens_in"] += int(usage.get("prompt_tokens", 0))
        counts["tokens_out"] += int(usage.get("completion_tokens", 0))
        if float(ep["reward"]) < task.reward_threshold:
            continue
        counts["reward_passed"] += 1
        rec = trajectory(ep)
        conv = rec["conversations"]
        if task.require_thought and not has_thoughts(conv):
            counts["no_thought"] += 1
            continue
        start = task_start(conv)
        if ref is not None:
            text = conv[start]["value"] if dc.scope == "instruction" else "\n".join(x["value"] for x in conv[start:])
            if mixing.overlap_fraction(text, ref, dc.ngram) > dc.threshold:
                counts["decontaminated"] += 1
                continue
        h = mixing.stable_hash64(json.dumps([[x["from"], x["value"]] for x in conv[start:]], ensure_ascii=False))
        if c.dedup and h in hashes:
            counts["duplicates"] += 1
            continue
        hashes.add(h)
        kept.append(rec)
    counts["kept"] = len(kept)
    return kept


def yield_table(counts: Dict[str, Dict[str, Any]]) -> str:
    """The paper's Table 1 per task, as Markdown."""
    cols = ["task", "instructions", "validated", "episodes", "teacher_error", "reward_passed", "no_thought",
            "decontaminated", "duplicates", "kept", "kept %", "tokens_in", "tokens_out"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    total = {k: 0 for k in COUNTS}
    for name, c in list(counts.items()) + [("total", total)]:
        if name != "total":
            for k in COUNTS:
                total[k] += c[k]
        pct = 100.0 * c["kept"] / c["instructions"] if c["instructions"] else 0.0
        row = [name] + [str(c[k]) for k in cols[1:10]] + [f"{pct:.1f}", str(c["tokens_in"]), str(c["tokens_out"])]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(cfg: DictConfig) -> Dict[str, Any]:
    """Build AgentInstruct data for ``collect.tasks``; prints the yield table and where outputs went."""
    from ray import serve

    c = cfg.collect
    if not c.tasks:
        raise ConfigError("config key 'collect.tasks': nothing to collect")
    ci.check_tasks(c.tasks)
    out_dir = c.output_dir
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    teacher = to_object(c.teacher)
    if teacher.kind == "model":
        raise ConfigError("config key 'collect.teacher.kind': model is not a teacher here; serve it "
                          "(agenttuning serve) and use kind: openai with its base_url")
    exclude = ci.eval_questions(list(c.decontamination.paths)) if c.decontamination.paths else set()
    preps = {t.name: ci.prepare(t, teacher, out_dir, exclude) for t in c.tasks}
    ref = reference(c)
    rollout_tasks = [EvalTaskConfig(name=t.name, env=t.env, path=preps[t.name]["path"], split=preps[t.name]["split"],
                                    options=to_dict(t.options)) for t in c.tasks]
    app = None
    with ray_session():
        try:
            app = deploy(cfg, rollout_tasks, teacher)
            handle = serve.get_deployment_handle("RolloutServer", app_name=app)
            listings = {t.name: handle.task_ids.remote(t.name).result() for t in c.tasks}
            listings = {t.name: {"ids": [str(i) for i in listings[t.name]["ids"]][:t.instructions.limit],
                                 "skipped": listings[t.name]["skipped"]} for t in c.tasks}
            episodes, errors = collect_episodes(cfg, handle, listings, out_dir)
        finally:
            if app is not None and c.teardown:
                serve.delete(app)
    outputs, counts = {}, {}
    for t in c.tasks:
        lst = listings[t.name]
        n = counts[t.name] = {k: 0 for k in COUNTS}
        n["instructions"] = ci.instruction_count(preps[t.name], lst)
        n["validated"] = len(lst["ids"])  # the task file's valid instructions, limit applied
        gen = preps[t.name]["generated"]
        n["tokens_in"], n["tokens_out"] = int(gen.get("tokens_in", 0)), int(gen.get("tokens_out", 0))
        kept = filter_task(t, lst["ids"], episodes, errors, ref, c, n)
        outputs[t.name] = os.path.join(out_dir, f"{t.name}.jsonl")
        with open(outputs[t.name], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in kept)
    table = yield_table(counts)
    stats = {"tasks": counts, "generation": {k: p["generated"] for k, p in preps.items()},
             "skipped": {k: v["skipped"] for k, v in listings.items()}, "outputs": outputs,
             "teacher": {k: v for k, v in to_dict(c.teacher).items() if k != "api_key_env"},
             "decontamination": to_dict(c.decontamination), "episodes": os.path.join(out_dir, EPISODES)}
    stats_path = os.path.join(out_dir, "stats.json")
    with open(stats_path, "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=1, ensure_ascii=False, sort_keys=True)
    with open(os.path.join(out_dir, "yield.md"), "w", encoding="utf-8") as f:
        f.write(table)
    print(table)
    print(f"AgentInstruct data: {out_dir} ({sum(v['kept'] for v in counts.values())} trajectories kept, "
          f"{time.time() - t0:.1f}s); stats: {stats_path}")
    lost = sum(v["rollout_error"] for v in counts.values())
    if lost:  # infrastructure, not the teacher: the outputs are written but incomplete
        raise JobFailed(f"collect incomplete: {lost} episodes failed on the rollout deployment; re-run to complete them")
    return {"outputs": outputs, "stats": stats_path, "yield": counts, "yield_table": table}


if __name__ == "__main__":
    import sys

    from agenttuning.cli import run_job

    sys.exit(run_job("pipelines.collect", sys.argv[1:]))
