"""`agenttuning sweep`: trial planning, resources, resume and the results table (fast), and two
real trials (data → train → eval on the tiny model) on Ray Tune (slow)."""

import json
import os
import pathlib
import socket

import pytest
import yaml

from agenttuning.config import ConfigError, load_config
from pipelines import sweep
from pipelines.sweep_results import write_results
from pipelines.synthetic import agentinstruct_records, sharegpt_records, write_jsonl

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "sweep_tiny.yaml")


def _cfg(tmp_path, *overrides):
    return load_config(TINY, [f"sweep.output_dir={tmp_path}/sweep", *overrides])


def test_overrides_are_grid_times_trials_and_checked():
    sets = sweep.plan_overrides({"train.lr": [1, 2], "data.eta": [0.2]}, [{"train.max_steps": 3}, {"train.max_steps": 5}])
    assert sets == [{"train.max_steps": 3, "train.lr": 1, "data.eta": 0.2}, {"train.max_steps": 3, "train.lr": 2, "data.eta": 0.2},
                    {"train.max_steps": 5, "train.lr": 1, "data.eta": 0.2}, {"train.max_steps": 5, "train.lr": 2, "data.eta": 0.2}]
    assert sweep.plan_overrides({}, [{"train.lr": 1}]) == [{"train.lr": 1}]
    with pytest.raises(ConfigError, match="sweep.grid.train.lr"):
        sweep.plan_overrides({"train.lr": []}, [])
    with pytest.raises(ConfigError, match="nothing to sweep"):
        sweep.plan_overrides({}, [])
    with pytest.raises(ConfigError, match="train.output_dir is set by the sweep"):
        sweep.plan_overrides({"train.output_dir": ["a", "b"]}, [])


def test_trials_get_their_own_config_folders_and_stable_ids(tmp_path):
    cfg = _cfg(tmp_path)
    trials = sweep.plan_trials(cfg)
    assert [t["overrides"] for t in trials] == [{"data.eta": e, "train.lr": lr} for e in (0.2, 0.5) for lr in (1e-3, 3e-3)]
    out = tmp_path / "sweep"
    for t in trials:
        c = t["cfg"]
        assert (c.data.eta, c.train.lr) == (t["overrides"]["data.eta"], t["overrides"]["train.lr"])
        assert c.train.output_dir == str(out / "trials" / t["id"] / "train") and c.eval.output_dir.startswith(t["dir"])
        assert c.train.data_dir == c.data.output_dir == str(out / "data" / t["data"])
        assert c.serve.rollout.app_name == f"{t['policy']}-rollout" and "sweep:tiny" in c.wandb.tags
        assert (c.wandb.group, c.wandb.name) == ("tiny", f"tiny-{t['id']}")  # one wandb group per sweep
    assert len({t["id"] for t in trials}) == len({t["policy"] for t in trials}) == 4
    assert len({t["data"] for t in trials}) == 2  # the lr trials of one eta share their data
    # Ids follow what determines results: a serving port does not change them, the schedule does.
    assert [t["id"] for t in sweep.plan_trials(_cfg(tmp_path, "serve.port=8123"))] == [t["id"] for t in trials]
    assert not {t["id"] for t in sweep.plan_trials(_cfg(tmp_path, "train.max_steps=21"))} & {t["id"] for t in trials}
    # Named list items, bad keys and bad values name the key.
    named = sweep.plan_trials(_cfg(tmp_path, "sweep.trials=[{data.sources.sharegpt_example.weight: 2.0}]"))
    assert {t["cfg"].data.sources[1].weight for t in named} == {2.0} and len(named) == 4
    with pytest.raises(ConfigError, match="data.sources.nope"):
        sweep.plan_trials(_cfg(tmp_path, "sweep.trials=[{data.sources.nope.weight: 2.0}]"))
    with pytest.raises(ConfigError, match="data.eta"):
        sweep.plan_trials(_cfg(tmp_path, "sweep.grid={data.eta: [1.5]}"))


def test_concurrency_follows_the_cluster(tmp_path, caplog):
    trials = sweep.plan_trials(_cfg(tmp_path))
    fp = [sweep.footprint(t["cfg"]) for t in trials]
    assert fp[0] == {"CPU": pytest.approx(0.85)}  # Serve's 0.75 (> 1 training worker × 0.5 CPU) + 0.1 for the driver
    assert sweep.auto_concurrency(fp, {"CPU": 2.0}) == 1  # the 2-CPU machine: one trial at a time
    assert sweep.auto_concurrency(fp, {"CPU": 16.0}) == 8
    gpu = sweep.plan_trials(_cfg(tmp_path, "scaling.use_gpu=true", "scaling.num_workers=8", "train.global_batch_size=64",
                                 "scaling.resources_per_worker={CPU: 8, GPU: 1}", "serve.num_gpus=1"))
    gfp = [sweep.footprint(t["cfg"]) for t in gpu]
    assert gfp[0] == {"CPU": pytest.approx(64.1), "GPU": 8.0}
    assert sweep.auto_concurrency(gfp, {"CPU": 192.0, "GPU": 16.0}) == 2
    assert sweep.auto_concurrency(gfp, {"CPU": 192.0}) == 1 and "trials wait" in caplog.text


def test_a_trial_that_would_starve_its_data_reads_fails_early(tmp_path):
    cfg = sweep.plan_trials(_cfg(tmp_path, "scaling.resources_per_worker={CPU: 1}"))[0]["cfg"]
    # 2 CPUs: 1 for the worker + 0.1 for Tune's trial driver leaves 0.9 < 1 for a read task (it hung).
    with pytest.raises(ConfigError, match="scaling.resources_per_worker.*1 CPU a Ray Data read task"):
        sweep.check_data_room(cfg, {"CPU": 2.0})
    sweep.check_data_room(cfg, {"CPU": 3.0})  # room for the reads
    sweep.check_data_room(cfg, {"CPU": 1.0})  # training itself does not fit yet: waits for the cluster to grow
    sweep.check_data_room(sweep.plan_trials(_cfg(tmp_path))[0]["cfg"], {"CPU": 2.0})  # sweep_tiny.yaml: 0.5 per worker


def _finish(trial, scores, loss):
    """What run_trial writes when a trial has finished."""
    os.makedirs(trial["dir"], exist_ok=True)
    with open(os.path.join(trial["dir"], "result.json"), "w") as f:
        json.dump({"trial": trial["id"], "overrides": trial["overrides"], "status": "finished",
                   "categories": {"held_in": {"score": scores[0], "partial": True}},
                   "tasks": {"db": {"score": scores[1], "n": 10}}, "train": {"step": 20, "loss": loss},
                   "data": {"eta_actual": trial["overrides"]["data.eta"]}}, f)


def test_finished_trials_are_skipped_and_tabulated(tmp_path):
    cfg = _cfg(tmp_path)
    trials = sweep.plan_trials(cfg)
    for i, t in enumerate(trials):
        _finish(t, (0.1 * i, 0.2 * i), 2.0 - i / 10)
    # Everything finished: the sweep only rewrites its tables (no Ray, no Tune).
    res = sweep.main(cfg)
    md = (tmp_path / "sweep" / "results.md").read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| trial-")]
    assert len(rows) == 8  # 4 trials in the category table + 4 in the per-task table
    assert rows[1] == f"| {trials[1]['id']} | 0.2 | 0.003 | 0.100* | 1.9000 | 0.200 | finished |"
    data = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert data["swept_keys"] == ["data.eta", "train.lr"]
    assert [r["categories"]["held_in"]["score"] for r in data["trials"]] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert (tmp_path / "sweep" / "results.png").stat().st_size > 10_000 and res["results"]["png"]
    # A failed trial is listed with its error; resume=false refuses to mix with earlier results.
    os.remove(os.path.join(trials[3]["dir"], "result.json"))
    paths = write_results(trials, ["data.eta", "train.lr"], str(tmp_path / "sweep"), {trials[3]["id"]: "boom"})
    assert f"| {trials[3]['id']} | 0.5 | 0.003 |  |  |  | failed: boom |" in open(paths["md"]).read()
    assert [sweep.finished(t) for t in trials] == [True, True, True, False]
    with pytest.raises(ConfigError, match="sweep.resume"):
        sweep.main(_cfg(tmp_path, "sweep.resume=false"))


def test_baseline_is_the_untrained_model_on_the_same_suite(tmp_path):
    cfg = _cfg(tmp_path, "sweep.baseline=untuned")
    trials = sweep.plan_trials(cfg)
    base, rest = trials[0], trials[1:]
    assert len(rest) == 4 and base["baseline"] == "untuned" and base["id"].startswith("untuned-")
    assert base["data"] is None and base["overrides"] == {} and base["cfg"].eval.output_dir == os.path.join(base["dir"], "eval")
    # Its id follows the model and the suite, not the training schedule.
    assert sweep.plan_trials(_cfg(tmp_path, "sweep.baseline=untuned", "train.max_steps=21"))[0]["id"] == base["id"]
    assert sweep.plan_trials(_cfg(tmp_path, "sweep.baseline=untuned", "eval.tasks.db.limit=3"))[0]["id"] != base["id"]
    for i, t in enumerate(rest):
        _finish(t, (0.1 * (i + 1), 0.2), 2.0)
    _finish({**base, "overrides": {"data.eta": None}}, (0.05, 0.0), None)
    for t, errors in ((base, {"invalid_format": 8, "refusal": 1}), (rest[0], {"invalid_action": 2, "turn_limit": 5})):
        path = os.path.join(t["dir"], "result.json")
        res = json.load(open(path))
        res["tasks"]["db"]["errors"] = errors
        json.dump(res, open(path, "w"))
    paths = write_results(trials, ["data.eta", "train.lr"], str(tmp_path / "sweep"), {})
    md = open(paths["md"]).read()
    assert f"| {base['id']} | (untuned) | (untuned) | 0.050* |  |  | finished |" in md
    rows = json.load(open(paths["json"]))["trials"]
    from pipelines.sweep_results import error_shares
    assert error_shares(rows[0]) == {"invalid_format": 0.8, "refusal": 0.1}  # of its 10 DB episodes
    assert error_shares(rows[1]) == {"invalid_action": 0.2, "turn_limit": 0.5} and error_shares(rows[2]) == {}
    assert os.path.getsize(paths["errors_png"]) > 10_000 and os.path.getsize(paths["png"]) > 10_000


# ----------------------------------------------------------------------------- Ray Tune end to end


@pytest.fixture(scope="module", autouse=True)
def _serve_down():
    """Serve keeps its first HTTP port for the session: later modules start their own instance."""
    yield
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two trials of data → train → eval with Tune: a few minutes on 2 CPUs
def test_two_trials_on_the_tiny_model(ray_local, tiny_model_dir, tmp_path, capsys):
    write_jsonl(tmp_path / "agent.jsonl", agentinstruct_records(24, seed=1, task="db", scale=0.1))
    write_jsonl(tmp_path / "general.jsonl", sharegpt_records(48, seed=2, scale=0.1))
    raw = yaml.safe_load(open(TINY))
    raw["sweep"]["grid"] = {"train.lr": [1.0e-3, 2.0e-3]}
    raw["data"]["sources"][0]["path"] = str(tmp_path / "agent.jsonl")
    raw["data"]["sources"][1]["path"] = str(tmp_path / "general.jsonl")
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(str(tmp_path / "sweep.yaml"), [
        f"model.name_or_path={tiny_model_dir}", "model.tiny.enabled=false", "data.max_seq_len=512",
        "data.decontamination.enabled=false", "train.max_steps=2", "train.warmup_steps=0", "train.global_batch_size=1",
        "scaling.resources_per_worker={CPU: 0.5}", "serve.num_cpus=0", "serve.rollout.num_cpus=0",
        f"serve.port={_free_port()}", "eval.tasks.db.limit=2", "eval.tasks.db.options.max_turns=2",
        "sweep.eval_policy.max_tokens=8", "wandb.mode=disabled", f"sweep.output_dir={tmp_path}/out",
    ])
    res = sweep.main(cfg)
    out = tmp_path / "out"
    data = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in data["trials"]] == ["finished", "finished"]
    assert [r["values"]["train.lr"] for r in data["trials"]] == [1e-3, 2e-3]
    for r, t in zip(data["trials"], res["trials"]):
        assert r["tasks"]["db"]["n"] == 2 and "held_in" in r["categories"] and r["train"]["step"] == 2
        report = json.loads((out / "trials" / t["id"] / "eval" / "report.json").read_text())
        assert list(report["policies"]) == [t["policy"]]  # this trial's checkpoint, and only it
        assert r["checkpoint"].startswith(str(out / "trials" / t["id"] / "train"))
    assert len(os.listdir(out / "data")) == 1  # one data job for both learning rates
    md = (out / "results.md").read_text()
    assert all(f"| {t['id']} |" in md for t in res["trials"]) and (out / "results.png").is_file()
    # Re-running skips both finished trials: no Tune experiment, same results.
    before = {t["id"]: os.path.getmtime(os.path.join(t["dir"], "result.json")) for t in res["trials"]}
    runs = sorted(os.listdir(out / "tune"))
    sweep.main(cfg)
    assert sorted(os.listdir(out / "tune")) == runs
    assert {t["id"]: os.path.getmtime(os.path.join(t["dir"], "result.json")) for t in res["trials"]} == before
