"""The Ray Data mixed-dataset job: η-mix, masks, packing, determinism, rejects (real local Ray)."""

import json
import os
from collections import Counter

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import mixing
from agenttuning.chat import IGNORE_INDEX, encode_chat, load_tokenizer
from agenttuning.config import ConfigError, load_config
from pipelines.data import main, plan, tokenize_batch
from agenttuning.sources import SourceError, iter_file, to_messages
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
