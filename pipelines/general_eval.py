"""General tasks of the eval job: each task's data is read once, then scored for every policy.

Kinds (``eval.general[*].kind``): ``mc`` (MMLU, :func:`pipelines.scorers.score_mc`), ``math``
(GSM8K, :func:`pipelines.scorers.score_math`), ``code`` (HumanEval,
:func:`pipelines.general_code.score_code`), ``mtbench`` (:func:`pipelines.mtbench.score_mtbench`),
``loglik`` (held-out answer likelihood, :func:`pipelines.scorers.score_loglik`).
Every policy is reached where it is served (:mod:`pipelines.general_client`). A task a policy
cannot do (the scripted expert; MMLU or likelihood at an endpoint without prompt log-probabilities
or without a known tokenizer; code where sandboxes cannot start) is reported ``not_applicable`` with the reason.
"""

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from pipelines import mtbench
from pipelines.general_client import Endpoint, EndpointError
from pipelines.general_code import score_code
from pipelines.scorers import RecordError, read_jsonl, score_loglik, score_math, score_mc, shots_by_subject, subset
from serve.envs.sandbox import SandboxUnavailable

log = logging.getLogger(__name__)

MMLU_SHOTS = 5  # the paper's MMLU shots
GSM8K_SHOTS = 8  # the paper's GSM8K chain-of-thought exemplars
MMLU_DEV_FILE = "mmlu_dev.jsonl"  # written by `agenttuning general` beside mmlu_eval.jsonl


@dataclass
class GeneralTask:
    """A general task's config with its data, read once for all policies."""

    cfg: Any  # GeneralTaskConfig
    records: List[Dict[str, Any]]
    shots: int = 0  # mc: dev questions per subject; math: exemplars
    dev: Dict[str, List[Dict[str, Any]]] = field(default_factory=dict)  # mc: dev questions by subject
    dev_source: str = ""  # mc: where the dev questions came from
    prompts: Dict[str, Any] = field(default_factory=dict)  # mtbench: judge prompts
    references: Dict[Any, List[str]] = field(default_factory=dict)  # mtbench: reference answers


def hub_mmlu_dev() -> List[Dict[str, Any]]:
    """The dev split of the hub's cais/mmlu (5 questions per subject)."""
    import datasets  # only here: a heavy import, and offline runs never need it

    ds = datasets.load_dataset("cais/mmlu", "all", split="dev")
    return [{"subject": r["subject"], "question": r["question"], "choices": list(r["choices"]),
             "answer": int(r["answer"])} for r in ds]


def load_dev(g: Any, key: str) -> tuple:
    """(dev records, where from): `shots_path`, else mmlu_dev.jsonl beside `path`, else the hub."""
    if g.shots_path:
        if not os.path.isfile(g.shots_path):
            raise RecordError(f"config key '{key}.shots_path': {g.shots_path} is not a file")
        return read_jsonl(g.shots_path), g.shots_path
    beside = os.path.join(os.path.dirname(os.path.abspath(g.path)), MMLU_DEV_FILE)
    if os.path.isfile(beside):
        return read_jsonl(beside), beside
    try:
        return hub_mmlu_dev(), "hub cais/mmlu dev"
    except Exception as exc:  # noqa: BLE001 - any hub failure: say which key fixes it
        raise RecordError(f"config key '{key}.shots_path': no {MMLU_DEV_FILE} beside {g.path} and the hub's "
                          f"cais/mmlu dev split is unreachable ({type(exc).__name__}: {str(exc)[:200]}); "
                          "point shots_path at a dev jsonl (agenttuning general writes one)") from None


def load_task(g: Any, index: int, sample_seed: Optional[int] = None) -> GeneralTask:
    """Read the task's data (records, shots, judge prompts); bad data raises naming the file.
    ``g.limit`` records: the first ones, or with ``sample_seed`` a seeded sample (``subset``)."""
    key = f"eval.general.{index}"
    if not os.path.isfile(g.path):
        raise RecordError(f"config key '{key}.path': {g.path} is not a file")
    if g.kind == "mtbench":
        return GeneralTask(g, subset(mtbench.load_questions(g.path), g.limit, sample_seed), prompts=mtbench.load_judge_prompts(
            g.judge_prompts_path), references=mtbench.load_references(g.reference_path))
    task = GeneralTask(g, subset(read_jsonl(g.path), g.limit, sample_seed))
    if g.kind == "mc":
        task.shots = MMLU_SHOTS if g.few_shot is None else int(g.few_shot)
        if task.shots:
            dev, task.dev_source = load_dev(g, key)
            task.dev = shots_by_subject(dev)
    elif g.kind == "math":
        task.shots = GSM8K_SHOTS if g.few_shot is None else int(g.few_shot)
    return task


def not_applicable(reason: str) -> Dict[str, Any]:
    return {"n": 0, "score": 0.0, "not_applicable": reason}


def score_task(task: GeneralTask, endpoint: Endpoint, policy: Any, tokenizer: Callable[[], Any],
               judge: Optional[Endpoint] = None, concurrency: int = 1) -> Dict[str, Any]:
    """One task for one policy served at `endpoint` (`policy`: its PolicyConfig).

    `tokenizer()` returns the policy's tokenizer (MMLU builds token-level prompts) or None.
    """
    g = task.cfg

    def generate(messages: List[Dict[str, str]]) -> str:
        return endpoint.chat(messages, g.max_tokens, temperature=policy.temperature, top_p=policy.top_p)

    try:
        if g.kind == "mc":
            tok = tokenizer()
            if tok is None:
                return not_applicable("MMLU builds token-level prompts: set the policy's `tokenizer`")
            res = score_mc(task.records, task.dev, task.shots, tok, endpoint.loglik, g.name, concurrency)
            return {**res, "shots_from": task.dev_source}
        if g.kind == "loglik":
            tok = tokenizer()
            if tok is None:
                return not_applicable("likelihood scoring builds token-level prompts: set the policy's `tokenizer`")
            return score_loglik(task.records, tok, endpoint.loglik, g.name, concurrency)
        if g.kind == "math":
            return score_math(task.records, generate, task.shots, g.name, concurrency)
        if g.kind == "code":
            try:
                return score_code(task.records, generate, g.name, g.timeout_s, concurrency, g.sandbox_workers)
            except SandboxUnavailable as exc:
                return not_applicable(f"programs run only in the OS sandbox, which cannot start here: {exc}")
        if g.kind == "mtbench":
            if judge is None:
                raise ValueError(f"task {g.name}: MT-Bench needs a judge endpoint")
            j = g.judge

            def chat(messages: List[Dict[str, str]], temperature: float, seed: int) -> str:
                return endpoint.chat(messages, g.max_tokens, temperature=temperature, top_p=policy.top_p, seed=seed)

            def grade(messages: List[Dict[str, str]]) -> str:
                return judge.chat(messages, j.max_tokens, temperature=j.temperature, top_p=j.top_p)

            return mtbench.score_mtbench(task.records, chat, grade, task.prompts, task.references, g.category_temperature,
                                 policy.temperature, concurrency)
    except EndpointError as exc:
        log.warning("general task %s at %s: %s", g.name, endpoint, exc)
        return not_applicable(f"endpoint error: {exc}")
    raise ValueError(f"unknown general task kind {g.kind!r}")
