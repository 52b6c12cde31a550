"""The training job on a real local Ray (2 CPU workers) with DeepSpeed ZeRO on CPU."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from agenttuning.config import ConfigError, load_config

sys.path.insert(0, os.path.dirname(__file__))
from train_data import write_packed_data  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "train_tiny_cpu.yaml")


@pytest.fixture(scope="module")
def data_dir(tiny_model_dir, tmp_path_factory) -> str:
    from agenttuning.chat import load_tokenizer, tokenizer_fingerprint

    tok = load_tokenizer(str(tiny_model_dir))
    return write_packed_data(str(tmp_path_factory.mktemp("train-data")), tok, tokenizer_fingerprint(tok),
                             num_rows=64, max_seq_len=64)


@pytest.fixture(scope="module")
def real_data_dir(ray_local, tiny_model_dir, tmp_path_factory) -> str:
    """A real data job's output (pipelines.data) over small generated AgentInstruct/ShareGPT files."""
    from pipelines import data
    from pipelines.synthetic import agentinstruct_records, sharegpt_records, write_jsonl

    d = tmp_path_factory.mktemp("train-corpus")
    write_jsonl(str(d / "os.jsonl"), agentinstruct_records(40, seed=1, task="os", scale=0.1))
    write_jsonl(str(d / "sharegpt.jsonl"), sharegpt_records(160, seed=2, scale=0.1))
    out = d / "data"
    data.main(load_config(None, [
        f"model.name_or_path={tiny_model_dir}", f"data.output_dir={out}", "data.max_seq_len=512", "data.eta=0.2",
        "data.decontamination.enabled=false", "data.num_samples=200",
        f"data.sources=[{{name: os, group: agent, format: agentinstruct, path: {d}/os.jsonl}},"
        f"{{name: sharegpt, group: general, format: sharegpt, path: {d}/sharegpt.jsonl}}]"]))
    return str(out)


def _cfg(tiny_model_dir, data_dir, out, *overrides):
    return load_config(CONFIG, [f"model.name_or_path={tiny_model_dir}", "model.tiny.enabled=false",
                                f"train.data_dir={data_dir}", f"train.output_dir={out}", "wandb.mode=disabled",
                                *overrides])


def _jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _weights(ckpt_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(ckpt_dir, "model.safetensors"))


def _run(ray_local, cfg):
    from pipelines import train

    result = train.main(cfg)
    assert result.error is None, result.error
    return result


def _check_loadable(ckpt: str) -> None:
    """The checkpoint loads and generates with transformers alone (no project code)."""
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[1]); m = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "ids = tok.apply_chat_template([{'role': 'user', 'content': 'ls'}], add_generation_prompt=True,"
        " return_tensors='pt', return_dict=True)['input_ids']\n"
        "out = m.generate(ids, max_new_tokens=5, do_sample=False)\n"
        "assert out.shape[1] > ids.shape[1]; assert 'pipelines' not in sys.modules; print('OK', out.shape)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, ckpt], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd="/")
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-2000:]


def test_thirty_steps_zero3_stop_resume_loss_decreases_checkpoint_loads(ray_local, tiny_model_dir, real_data_dir,
                                                                        tmp_path):
    """ZeRO-3 on 2 CPU workers over a data job's output: 15 steps, stop, resume_from=auto for 15 more."""
    data_dir = real_data_dir
    manifest = json.loads((pathlib.Path(data_dir) / "manifest.json").read_text())
    rows_per_epoch = manifest["num_rows"] // 4 * 4
    common = ["train.zero_stage=3", "train.max_steps=30", "train.save_every=15", "train.log_every=1",
              "train.record_samples=true"]
    _run(ray_local, _cfg(tiny_model_dir, data_dir, tmp_path, *common, "train.stop_after_steps=15", "wandb.mode=offline"))
    result = _run(ray_local, _cfg(tiny_model_dir, data_dir, tmp_path, *common, "wandb.mode=offline"))
    run = tmp_path / "tiny-cpu"
    # Data: every step exactly once over both invocations, the first 16 steps cover each row once.
    steps = [r["step"] for r in _jsonl(run / "samples.jsonl")]
    assert steps == list(range(1, 31))
    rows = {r["step"]: r["rows"] for r in _jsonl(run / "samples.jsonl")}
    per_epoch = rows_per_epoch // 4
    if per_epoch < 30:  # the second epoch replays the first in the same order
        assert rows[per_epoch + 1] == rows[1]
    loss = {m["step"]: m["loss"] for m in _jsonl(run / "metrics.jsonl")}
    assert sorted(loss) == list(range(1, 31))
    assert sum(loss[s] for s in (28, 29, 30)) / 3 < loss[1] - 0.3, loss
    assert set(result.metrics) >= {"loss", "loss_agent", "loss_general", "lr", "grad_norm", "tokens_per_s",
                                   "supervised_tokens_per_s", "peak_mem_gb"}
    # The resubmitted job continued the same wandb run: both invocations logged under one stable id.
    offline = sorted(p.name for p in (run / "wandb").iterdir() if p.name.startswith("offline-run"))
    assert len(offline) == 2 and len({name.rsplit("-", 1)[1] for name in offline}) == 1, offline
    ckpt = result.checkpoint.path
    assert os.path.basename(ckpt) == "checkpoint_000030"
    state = json.loads((pathlib.Path(ckpt) / "trainer_state.json").read_text())
    assert state["step"] == 30 and state["rows_consumed"] == 120 and state["epoch"] == 29 // per_epoch
    _check_loadable(ckpt)


def test_impossible_request_fails_within_seconds_naming_what_is_missing(ray_local, tiny_model_dir, data_dir, tmp_path):
    """8 GPU workers on a 2-CPU, 0-GPU cluster: an error naming the GPUs and the keys, not a wait."""
    import time

    from agenttuning.cluster import ResourcesUnavailable
    from pipelines import train

    cfg = _cfg(tiny_model_dir, data_dir, tmp_path, "scaling.use_gpu=true", "scaling.num_workers=8",
               "train.global_batch_size=8")
    t0 = time.monotonic()
    with pytest.raises(ResourcesUnavailable, match=r"GPU: needs 8, the cluster has 0.*scaling.num_workers"):
        train.main(cfg)
    assert time.monotonic() - t0 < 30


@pytest.mark.slow
def test_killed_worker_restarts_from_last_checkpoint(ray_local, tiny_model_dir, data_dir, tmp_path):
    """ZeRO-2: the last worker dies at step 15 → Ray Train restarts from step 10 → finishes 20 steps."""
    cfg = _cfg(tiny_model_dir, data_dir, tmp_path, "train.max_steps=20", "train.save_every=10",
               "train.fail_at_step=15", "train.max_failures=1", "train.record_samples=true")
    result = _run(ray_local, cfg)
    run = tmp_path / "tiny-cpu"
    assert (run / ".injected_failure_15").exists()
    seen = {}
    for rec in _jsonl(run / "samples.jsonl"):
        seen.setdefault(rec["step"], []).append(rec["rows"])
    assert sorted(seen) == list(range(1, 21))
    # Only steps after the step-10 checkpoint ran twice, on the same rows: nothing lost or repeated beyond it.
    assert sorted(s for s, v in seen.items() if len(v) > 1) == [11, 12, 13, 14]
    assert all(v[0] == v[-1] for v in seen.values())
    assert os.path.basename(result.checkpoint.path) == "checkpoint_000020"
    _check_loadable(result.checkpoint.path)


@pytest.mark.slow
def test_zero3_resume_is_equivalent_to_a_straight_run(ray_local, tiny_model_dir, data_dir, tmp_path):
    """20 steps straight == 10 steps, stop, resume_from=PATH for 10 more (ZeRO-3, consolidated weights)."""
    common = ["train.zero_stage=3", "train.max_steps=20", "train.save_every=10", "train.log_every=5",
              "train.record_samples=true"]
    _run(ray_local, _cfg(tiny_model_dir, data_dir, tmp_path, *common, "train.run_name=straight"))
    _run(ray_local, _cfg(tiny_model_dir, data_dir, tmp_path, *common, "train.run_name=first",
                         "train.stop_after_steps=10"))
    _run(ray_local, _cfg(tiny_model_dir, data_dir, tmp_path, *common, "train.run_name=resumed",
                         f"train.resume_from={tmp_path / 'first' / 'checkpoint_000010'}"))
    a = _weights(tmp_path / "straight" / "checkpoint_000020")
    b = _weights(tmp_path / "resumed" / "checkpoint_000020")
    base = _weights(tiny_model_dir)
    assert a.keys() == b.keys() == base.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(a[k], base[k]) for k in a)  # it did train
    rows = lambda name: [(r["step"], r["rows"]) for r in _jsonl(tmp_path / name / "samples.jsonl")]  # noqa: E731
    assert rows("straight") == rows("first") + rows("resumed") and len(rows("straight")) == 20


def test_bad_data_fails_before_workers_start(tiny_model_dir, data_dir, tmp_path):
    from pipelines import train

    with pytest.raises(ConfigError, match="'train.data_dir'.*not found"):
        train.prepare(_cfg(tiny_model_dir, tmp_path / "missing", tmp_path))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    manifest = json.loads((pathlib.Path(data_dir) / "manifest.json").read_text())
    manifest["tokenizer"] = {"name_or_path": "meta-llama/Llama-2-7b-chat-hf", "fingerprint": "0123456789abcdef"}
    (foreign / "manifest.json").write_text(json.dumps(manifest))
    for shard in pathlib.Path(data_dir).glob("part-*.parquet"):
        (foreign / shard.name).symlink_to(shard)
    with pytest.raises(ConfigError, match="Llama-2-7b-chat-hf.*rebuild the data"):
        train.prepare(_cfg(tiny_model_dir, foreign, tmp_path))
    with pytest.raises(ConfigError, match="'train.global_batch_size'.*only 64 rows"):
        train.prepare(_cfg(tiny_model_dir, data_dir, tmp_path, "train.global_batch_size=128"))
    with pytest.raises(ConfigError, match="'train.resume_from'"):
        train.prepare(_cfg(tiny_model_dir, data_dir, tmp_path, f"train.resume_from={tmp_path}"))


@pytest.mark.slow
def test_objective_is_independent_of_worker_count(ray_local, tiny_model_dir, data_dir, tmp_path):
    """ZeRO-0: 1 worker × 4 accumulation steps and 2 workers × 2 give the same parameters."""
    common = ["train.zero_stage=0", "train.max_steps=3", "train.warmup_steps=0", "train.save_every=3",
              "train.global_batch_size=4"]
    _run(ray_local, _cfg(tiny_model_dir, data_dir, tmp_path, *common, "scaling.num_workers=1", "train.run_name=w1"))
    _run(ray_local, _cfg(tiny_model_dir, data_dir, tmp_path, *common, "scaling.num_workers=2", "train.run_name=w2"))
    a, b = _weights(tmp_path / "w1" / "checkpoint_000003"), _weights(tmp_path / "w2" / "checkpoint_000003")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_ray_job_submit_against_a_separate_local_cluster(tiny_model_dir, data_dir, tmp_path):
    """`ray job submit --working-dir . -- python -m pipelines.train CONFIG` on its own `ray start --head`."""
    cmd = [sys.executable, str(REPO / "scripts" / "ray_job_submit_train.py"), CONFIG,
           f"model.name_or_path={tiny_model_dir}", "model.tiny.enabled=false", f"train.data_dir={data_dir}",
           f"train.output_dir={tmp_path}", "train.max_steps=4", "train.warmup_steps=0", "train.save_every=4",
           "wandb.mode=disabled"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert (tmp_path / "tiny-cpu" / "checkpoint_000004" / "model.safetensors").exists()
