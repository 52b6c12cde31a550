"""The Ray Data mixed-dataset job: η-mix, masks, packing, determinism, rejects (real local Ray)."""

import json
import os
import pathlib
from collections import Counter

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from agenttuning.chat import IGNORE_INDEX, encode_chat, load_tokenizer
from agenttuning.config import ConfigError, load_config
from agenttuning.sources import SourceError, iter_file, to_messages
from pipelines import mixing
from pipelines.data import main, plan, tokenize_batch
from pipelines.synthetic import agentinstruct_records, sharegpt_records, write_jsonl

BAD_LINES = [  # (raw line bytes, expected reason)
    (b"{not json", "malformed_json"),
    (b'{"id": "x", "conversations": "\xff\xfe"}', "invalid_utf8"),
    (json.dumps({"id": "m"}).encode(), "missing_field"),
    (json.dumps({"id": "r", "conversations": [{"from": "alien", "value": "hi"}]}).encode(), "unknown_role"),
    (json.dumps({"id": "e", "conversations": []}).encode(), "empty_conversation"),
    (json.dumps({"id": "n", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"},
                                             {"from": "gpt", "value": "c"}]}).encode(), "not_alternating"),
    (json.dumps({"id": "f", "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                                             {"from": "human", "value": "c"}]}).encode(), "no_final_assistant"),
    (json.dumps({"id": "l", "conversations": [{"from": "human", "value": "a"},
                                             {"from": "gpt", "value": "word " * 3000}]}).encode(), "overlong"),
    (json.dumps({"id": "z", "conversations": [{"from": "human", "value": "a"},
                                             {"from": "gpt", "value": "b", "loss": False}]}).encode(), "no_supervised_tokens"),
]
MAX_LEN = 1024


def _rows(lines, source="s", group="agent"):
    return [{"source": source, "group": group, "sid": i, "origin": o, "raw": raw, "reject": rej}
            for i, (o, raw, rej) in enumerate(iter_file("f.jsonl", b"\n".join(lines)))]


def _tokenize(tiny_model_dir, rows, overlong="reject", fmt="agentinstruct"):
    model = {"name_or_path": str(tiny_model_dir), "chat_template": "llama2", "trust_remote_code": False,
             "system_prompt": "You are a helpful, respectful and honest assistant."}
    return tokenize_batch(pa.Table.from_pylist(rows), model=model, formats={"s": fmt}, max_seq_len=MAX_LEN,
                          overlong=overlong, ngram_ref=None, ngram=10, threshold=0.8).to_pylist()


def test_bad_records_get_reasons(tiny_model_dir):
    out = _tokenize(tiny_model_dir, _rows([line for line, _ in BAD_LINES]))
    assert [r["reject"].split(":")[0] for r in out] == [reason for _, reason in BAD_LINES]
    assert out[0]["origin"] == "f.jsonl:1" and out[0]["raw"] == "{not json"


def test_overlong_truncated_keeps_mask(tiny_model_dir):
    (r,) = _tokenize(tiny_model_dir, _rows([BAD_LINES[7][0]]), overlong="truncate")
    assert r["reject"] == "" and r["truncated"] and r["n_tokens"] == MAX_LEN == len(r["labels"])
    assert r["n_sup"] == sum(x != IGNORE_INDEX for x in r["labels"]) > 0


def test_plan_mix_is_exact_and_follows_weights():
    meta = pd.DataFrame({
        "source": ["a"] * 700 + ["b"] * 300 + ["g1"] * 6000 + ["g2"] * 900,
        "sid": np.arange(7900), "reject": "", "hash": np.arange(7900), "n_tokens": 100, "n_sup": 50, "truncated": False,
    })
    srcs = [type("S", (), dict(name=n, group=g, weight=w))() for n, g, w in
            [("a", "agent", 1.0), ("b", "agent", 1.0), ("g1", "general", 1.0), ("g2", "general", 2.0)]]
    cfg = load_config(None, ["data.eta=0.2", "data.max_seq_len=1024"])
    p = plan(meta, srcs, cfg)
    assert p["targets"] == {"a": 500, "b": 500, "g1": 1333, "g2": 2667}  # 1000 agent = every one once
    assert len(p["items"][0]) == 5000
    copies = Counter(int(s) for s in p["items"][0])
    assert max(copies[s] for s in range(7000, 7900)) == 3 and min(copies[s] for s in range(7000, 7900)) == 2  # g2 upsampled
    assert all(copies[s] <= 1 for s in range(1000, 7000))  # g1 subsampled without replacement
    assert max(copies[s] for s in range(700)) == 1 and min(copies[s] for s in range(700, 1000)) >= 1
    for eta, agent in ((0.0, 0), (1.0, 1000)):
        q = plan(meta, srcs, load_config(None, [f"data.eta={eta}"]))
        assert sum(v for k, v in q["targets"].items() if k in "ab") == agent


def test_best_fit_decreasing_packs_tightly():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(5.5, 0.9, 20000), 20, 4096).astype(int).tolist()
    bins = mixing.pack_best_fit_decreasing(lengths, 4096)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert max(sum(lengths[i] for i in b) for b in bins) <= 4096
    assert sum(lengths) / (len(bins) * 4096) >= 0.99


def test_overlap_fraction():
    ref = mixing.reference_ngrams(["the quick brown fox jumps over the lazy dog again and again today"], 5)
    assert mixing.overlap_fraction("the quick brown fox jumps", ref, 5) == 1.0
    assert mixing.overlap_fraction("a b c d e f g", ref, 5) == 0.0
    assert mixing.overlap_fraction("x y the quick brown fox jumps", ref, 5) == pytest.approx(5 / 7)


# ----------------------------------------------------------------------------- sizing: natural proportions, schedule

AGENTLM = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "data_agentlm.yaml")
# AgentInstruct as published (AgentTuning Table 1), in data_agentlm.yaml's source order.
TABLE1 = {"os": 195, "db": 538, "kg": 324, "alfworld": 336, "webshop": 351, "mind2web": 122}


def _agentlm_meta(n_general: int, rng_seed: int = 0) -> pd.DataFrame:
    """Per-record metadata shaped like the data job's: AgentInstruct at Table 1 counts + ShareGPT."""
    rng = np.random.default_rng(rng_seed)
    names = [f"agentinstruct_{k}" for k in TABLE1] + ["sharegpt"]
    sizes = list(TABLE1.values()) + [n_general]
    source = np.repeat(names, sizes)
    sid = np.concatenate([(i << 40) + np.arange(n) for i, n in enumerate(sizes)])
    return pd.DataFrame({"source": source, "sid": sid, "reject": "", "hash": sid,
                         "n_tokens": rng.integers(200, 3000, len(sid)), "n_sup": 100, "truncated": False})


def _agentlm_sources():
    return list(load_config(AGENTLM).data.sources)


def _copies(p) -> Counter:
    return Counter(int(s) for s in p["items"][0])


def test_natural_proportions_use_every_agentinstruct_record_equally():
    meta = _agentlm_meta(20_000)
    # Equal weights (the old recipe): every split gets ~311 of 1,866, DB loses records, Mind2Web repeats.
    weighted = plan(meta, _agentlm_sources(), load_config(AGENTLM, ["data.natural_groups=[]", "data.size_by=agent"]))
    assert sorted(weighted["targets"][f"agentinstruct_{k}"] for k in TABLE1) == [311] * 6
    # Natural proportions, every agent sample once: exactly Table 1, each trajectory once.
    p = plan(meta, _agentlm_sources(), load_config(AGENTLM, ["data.size_by=agent"]))
    assert {k: p["targets"][f"agentinstruct_{k}"] for k in TABLE1} == TABLE1
    assert p["targets"]["sharegpt"] == 4 * 1866  # eta = 0.2 holds exactly
    copies = _copies(p)
    agent_sids = meta.loc[meta["source"] != "sharegpt", "sid"]
    assert {copies[int(s)] for s in agent_sids} == {1}
    # A larger output repeats AgentInstruct in whole epochs (never a random part of it), η kept.
    p3 = plan(meta, _agentlm_sources(), load_config(AGENTLM, ["data.num_samples=27000"]))  # 0.2 × 27000 / 1866 ≈ 2.9
    assert {k: p3["targets"][f"agentinstruct_{k}"] for k in TABLE1} == {k: 3 * n for k, n in TABLE1.items()}
    copies3 = _copies(p3)
    assert {copies3[int(s)] for s in agent_sids} == {3}
    assert p3["targets"]["sharegpt"] == 4 * 3 * 1866
    # The whole general group once instead (size_by=general): 20,000 ShareGPT → 5,000 agent samples → 3 epochs.
    pg = plan(meta, _agentlm_sources(), load_config(AGENTLM, ["data.size_by=general"]))
    assert pg["targets"]["agentinstruct_db"] == 3 * 538 and pg["targets"]["sharegpt"] == 4 * 3 * 1866


def test_schedule_sizing_fills_the_training_rows():
    meta = _agentlm_meta(30_000)
    cfg = load_config(AGENTLM, ["data.natural_groups=[]", "train.max_steps=100", "train.global_batch_size=16"])
    p = plan(meta, _agentlm_sources(), cfg)
    assert p["rows_target"] == 1600 and abs(p["num_rows"] - 1600) <= 3  # samples per row measured, corrected
    n = len(p["items"][0])
    assert sum(v for k, v in p["targets"].items() if k != "sharegpt") == round(0.2 * n)
    # Natural AgentInstruct: whole epochs, so the rows follow the schedule only up to one epoch's rounding.
    q = plan(meta, _agentlm_sources(), load_config(AGENTLM, ["train.max_steps=400", "train.global_batch_size=16"]))
    k = q["targets"]["agentinstruct_db"] // 538
    assert {q["targets"][f"agentinstruct_{t}"] for t in TABLE1} == {k * n for n in TABLE1.values()} and k >= 2
    assert abs(q["num_rows"] - 6400) / 6400 < 0.5 / k + 0.01


def test_mix_targets_pure():
    counts = {"a": 10, "b": 30, "g": 1000}
    groups = {"a": "agent", "b": "agent", "g": "general"}
    w = {"a": 1.0, "b": 1.0, "g": 1.0}
    assert mixing.mix_targets(counts, groups, w, [], 0.5, 100) == {"a": 25, "b": 25, "g": 50}
    assert mixing.mix_targets(counts, groups, w, ["agent"], 0.5, 160) == {"a": 20, "b": 60, "g": 80}  # 2 epochs
    assert mixing.mix_targets(counts, groups, w, ["agent"], 0.5, 10) == {"a": 10, "b": 30, "g": 40}  # at least one
    assert mixing.mix_targets(counts, groups, w, ["agent"], 0.0, 100) == {"a": 0, "b": 0, "g": 100}
    assert mixing.default_total(40, 1000, 0.2, "agent") == 200 and mixing.default_total(40, 1000, 0.2, "general") == 1250
    assert mixing.default_total(40, 1000, 0.0, "agent") == 1000 and mixing.default_total(40, 1000, 1.0, "general") == 40


# ----------------------------------------------------------------------------- Ray end to end


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("corpus")
    write_jsonl(d / "os.jsonl", agentinstruct_records(700, seed=1, task="os", scale=0.25))
    write_jsonl(d / "db.jsonl", agentinstruct_records(600, seed=2, task="db", scale=0.25))
    write_jsonl(d / "sharegpt.jsonl", sharegpt_records(4000, seed=3, scale=0.25))
    write_jsonl(d / "general2.jsonl", sharegpt_records(1200, seed=4, scale=0.25))
    with open(d / "os.jsonl", "ab") as f:  # bad records and an exact duplicate, inside a real source
        f.write(b"\n".join(line for line, _ in BAD_LINES) + b"\n")
        f.write((json.dumps(next(agentinstruct_records(1, seed=1, task="os", scale=0.25))) + "\n").encode())
    # Evaluation data that one agent record is copied from (planted contamination).
    planted = next(agentinstruct_records(1, seed=2, task="db", scale=0.25))
    with open(d / "eval.jsonl", "w") as f:
        f.write(json.dumps({"prompt": " ".join(t["value"] for t in planted["conversations"])}) + "\n")
    return d


def _cfg(corpus, tiny_model_dir, out, seed=0):
    overrides = [
        f"model.name_or_path={tiny_model_dir}", f"data.seed={seed}", f"data.output_dir={out}",
        f"data.max_seq_len={MAX_LEN}", "data.overlong=truncate", "data.eta=0.2", "data.rows_per_shard=1000",
        f"data.decontamination.paths=[{corpus}/eval.jsonl]",
        "data.sources=["
        f"{{name: os, group: agent, format: agentinstruct, path: {corpus}/os.jsonl}},"
        f"{{name: db, group: agent, format: agentinstruct, path: {corpus}/db.jsonl, weight: 1.0}},"
        f"{{name: sharegpt, group: general, format: sharegpt, path: {corpus}/sharegpt.jsonl, weight: 3.0}},"
        f"{{name: general2, group: general, format: sharegpt, path: {corpus}/general2.jsonl, weight: 1.0}}]",
    ]
    return load_config(None, overrides)


@pytest.fixture(scope="module")
def run0(ray_local, corpus, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("data0")
    return main(_cfg(corpus, tiny_model_dir, out)), out


def _read(out):
    return pq.read_table([os.path.join(out, f) for f in sorted(os.listdir(out)) if f.startswith("part-")])


def test_manifest_mix_and_rejects(run0):
    m, out = run0
    assert abs(m["eta_actual"] - 0.2) <= 0.005
    s = m["sources"]
    agent = s["os"]["samples"] + s["db"]["samples"]
    assert agent == 1300  # every valid, clean, unique agent sample (incl. the truncated one) exactly once
    assert s["os"]["truncated"] == 1
    general = s["sharegpt"]["samples"] + s["general2"]["samples"]
    assert (s["sharegpt"]["samples"], s["general2"]["samples"]) == (s["sharegpt"]["target"], s["general2"]["target"])
    assert general == 5200 and (s["sharegpt"]["samples"], s["general2"]["samples"]) == (3900, 1300)
    assert s["general2"]["records"] == 1200  # so general2 was upsampled, sharegpt (4000) subsampled
    expected = Counter(reason for _, reason in BAD_LINES if reason != "overlong")  # truncated instead
    expected.update({"duplicate": 1, "contaminated": 1})
    assert m["rejected"] == dict(expected)
    lines = [json.loads(x) for x in open(m["rejects_file"])]
    assert len(lines) == m["rejected_total"] == sum(expected.values())
    assert all(r["origin"] and r["reason"] for r in lines)
    assert m["packing_efficiency"] >= 0.97
    assert m["tokenizer"]["fingerprint"] and m["pad_token_id"] is not None


def test_rows_unpack_to_exact_samples(run0, corpus, tiny_model_dir):
    m, out = run0
    t = _read(out)
    assert t.num_rows == m["num_rows"]
    tok = load_tokenizer(str(tiny_model_dir))
    known = {}
    for name, fmt in (("os", "agentinstruct"), ("db", "agentinstruct"), ("sharegpt", "sharegpt"), ("general2", "sharegpt")):
        for line in open(corpus / f"{name}.jsonl", "rb"):
            try:
                ids, labels = encode_chat(tok, to_messages(fmt, json.loads(line)))
            except (ValueError, UnicodeDecodeError):
                continue
            known[tuple(ids)] = labels
    n_samples = 0
    for row in t.slice(0, 60).to_pylist():
        ids, labels, pos, gid = (np.array(row[k]) for k in ("input_ids", "labels", "position_ids", "group_ids"))
        starts = [i for i in range(row["num_tokens"]) if pos[i] == 0]
        assert starts[0] == 0
        for a, b in zip(starts, starts[1:] + [row["num_tokens"]]):
            assert (pos[a:b] == np.arange(b - a)).all()  # restart exactly at sample starts
            assert len(set(gid[a:b].tolist())) == 1 and gid[a] in (0, 1)
            assert known[tuple(ids[a:b].tolist())] == labels[a:b].tolist()
            n_samples += 1
        assert (labels[row["num_tokens"]:] == IGNORE_INDEX).all() and (gid[row["num_tokens"]:] == -1).all()
    assert n_samples == sum(t.slice(0, 60).column("num_samples").to_pylist())


def test_same_seed_identical_other_seed_differs(run0, corpus, tiny_model_dir, tmp_path):
    m, out = run0
    again = main(_cfg(corpus, tiny_model_dir, tmp_path / "again"))
    assert again["shards"] == m["shards"]
    for f in m["shards"]:
        assert (tmp_path / "again" / f).read_bytes() == (out / f).read_bytes()
    other = main(_cfg(corpus, tiny_model_dir, tmp_path / "seed1", seed=1))
    assert abs(other["eta_actual"] - 0.2) <= 0.005
    a, b = _read(tmp_path / "seed1"), _read(out)
    assert not np.array_equal(a.column("input_ids").chunk(0).to_numpy()[:5], b.column("input_ids").chunk(0).to_numpy()[:5])


def test_missing_source_fails_before_ray(tiny_model_dir, tmp_path):
    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", f"data.output_dir={tmp_path}/o",
                             "data.sources=[{name: x, group: agent, format: agentinstruct, path: /nope/data.jsonl}]"])
    with pytest.raises(SourceError, match="/nope/data.jsonl"):
        main(cfg)
    assert not os.path.exists(tmp_path / "o")
    write_jsonl(tmp_path / "g.jsonl", sharegpt_records(3))
    with pytest.raises(ConfigError, match="data.eta"):
        main(load_config(None, [f"data.output_dir={tmp_path}/o", "data.eta=0.5",
                                f"data.sources=[{{name: x, group: general, format: sharegpt, path: {tmp_path}/g.jsonl}}]"]))


@pytest.fixture(scope="module")
def agentinstruct_standins(tmp_path_factory):
    """A local stand-in of THUDM/AgentInstruct (one file per split, Table 1's counts) + ShareGPT."""
    d = tmp_path_factory.mktemp("agentinstruct")
    for i, (task, n) in enumerate(TABLE1.items()):
        write_jsonl(d / f"{task}.jsonl", agentinstruct_records(n, seed=100 + i, task=task, scale=0.1))
    write_jsonl(d / "sharegpt.jsonl", sharegpt_records(1500, seed=7, scale=0.1))
    return d


@pytest.mark.slow  # a whole data job over ~11k records: 1-2 min on a loaded 2-CPU machine
def test_agentlm_config_takes_agentinstruct_at_its_natural_counts(ray_local, agentinstruct_standins, tiny_model_dir,
                                                                  tmp_path, caplog):
    """configs/data_agentlm.yaml as shipped, its sources pointed (by name) at local stand-ins and its
    schedule shrunk to ~one AgentInstruct epoch: every trajectory exactly once, ShareGPT filling
    the schedule's rows at η = 0.2, and its repetition reported."""
    d = agentinstruct_standins
    cfg = load_config(AGENTLM, [
        f"model.name_or_path={tiny_model_dir}", f"data.output_dir={tmp_path}/out",
        *[f"data.sources.agentinstruct_{t}.path={d}" for t in TABLE1],  # split selects <split>.jsonl
        f"data.sources.sharegpt.path={d}/sharegpt.jsonl",
        "train.max_steps=56", "train.global_batch_size=8",  # 448 rows ≈ 9,330 samples of ~20 per row
    ])
    caplog.set_level("WARNING", logger="pipelines.data")
    m = main(cfg)
    src = m["sources"]
    assert {t: src[f"agentinstruct_{t}"]["samples"] for t in TABLE1} == TABLE1
    assert {src[f"agentinstruct_{t}"]["valid"] for t in TABLE1} == set(TABLE1.values())
    assert {src[f"agentinstruct_{t}"]["epochs"] for t in TABLE1} == {1.0}
    assert src["sharegpt"]["samples"] == 4 * 1866 and m["eta_actual"] == pytest.approx(0.2)
    assert m["size_by"] == "schedule" and m["rows_target"] == 448 and abs(m["num_rows"] - 448) <= 448 // 2
    assert m["repeated"] == {"sharegpt": pytest.approx(7464 / 1500, abs=1e-4)}
    assert any("source sharegpt" in r.getMessage() and "used 5.0 times" in r.getMessage()
               for r in caplog.records if r.levelname == "WARNING")
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["sources"]["agentinstruct_db"]["samples"] == 538


@pytest.mark.slow
def test_killed_data_job_leaves_no_output_that_looks_complete(tiny_model_dir, tmp_path):
    """SIGKILL the data job while it writes: the output folder keeps the previous complete dataset
    (or none); the half-written one sits in a `.partial` sibling that no job reads."""
    import signal
    import subprocess
    import sys
    import time

    from pipelines.synthetic import agentinstruct_records, sharegpt_records, write_jsonl

    write_jsonl(str(tmp_path / "a.jsonl"), agentinstruct_records(60, seed=1, task="os", scale=0.2))
    write_jsonl(str(tmp_path / "g.jsonl"), sharegpt_records(240, seed=2, scale=0.2))
    out = tmp_path / "data"
    cmd = [sys.executable, "-m", "pipelines.cli", "data", "configs/data_example.yaml", f"data.output_dir={out}",
           f"model.name_or_path={tiny_model_dir}", "model.tiny.enabled=false",
           f"data.sources=[{{name: a, group: agent, format: agentinstruct, path: {tmp_path}/a.jsonl}},"
           f"{{name: g, group: general, format: sharegpt, path: {tmp_path}/g.jsonl}}]"]
    repo = pathlib.Path(__file__).resolve().parents[2]
    assert subprocess.run(cmd, cwd=repo, capture_output=True, timeout=600).returncode == 0
    before = json.loads((out / "manifest.json").read_text())
    proc = subprocess.Popen(cmd + ["data.seed=1"], cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    partial = pathlib.Path(f"{out}.partial")
    deadline = time.time() + 600
    while time.time() < deadline and not (partial.exists() and any(partial.iterdir())):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(60)
    assert json.loads((out / "manifest.json").read_text()) == before  # untouched, complete
    assert not (partial / "manifest.json").exists()
