"""HotpotQA (held-out) as AgentTuning evaluates it: BOLAA's ReAct agent, three levels, reward = F1.

Protocol (AgentTuning ``eval_heldout/hotpotQA``, adopted from salesforce/BOLAA ``hotpotqa_run``):

* Data: AgentTuning's three held-out levels, 100 questions each, one split per level
  (``easy``, ``medium``, ``hard``). ``path`` is a JSON-lines file, a directory holding
  ``hotpotqa_<level>.jsonl`` (or ``<level>.jsonl``) files, or a list of files; default: the
  shipped ``data/hotpotqa`` directory with all three levels. ``levels`` selects some of them.
  Records are HotpotQA's own shape (``id``, ``question``, ``answer``, ``supporting_facts``,
  ``context``); a record's split is its ``level`` field, else its file's level. Task ids are the
  HotpotQA ids, which must be unique over all files loaded.
* Prompt: BOLAA's ``React_HotPotQA_run_Agent`` prompt (instruction, the two ReAct Wikipedia
  examples, ``(END OF EXAMPLES)``, ``Question: ...``) as one opening user message. The agent
  writes ``Thought N: ...`` and ``Action N: Search[entity]`` / ``Lookup[keyword]`` /
  ``Finish[answer]``; the environment answers ``Observation N: ...`` (the scratchpad lines of the
  original completion prompt, one chat turn per step). The instruction and the two examples
  reproduce BOLAA's published prompt verbatim, for fidelity with the paper's protocol.
* Actions: parsed as BOLAA does (``Type[argument]``, type case-sensitive, non-empty argument);
  anything else costs the step and gets BOLAA's ``Invalid Action...`` observation.
  ``Finish`` ends the episode with ``Answer is CORRECT``/``INCORRECT`` (exact match).
  At most 10 steps (BOLAA's ``max_steps``), then the episode is halted (reward 0).
* Score: reward = answer F1 (BOLAA's ``reward()``), ``info`` has ``em`` and ``f1``. Official
  HotpotQA normalisation: lower case, no punctuation, no articles, single spaces; yes/no/noanswer
  only match themselves. The reported number (``paper_score``, metric ``"f1"``) is the mean over
  levels of the level's mean F1, ×100, as AgentTuning's ``eval_hotpot.py`` averages its per-level
  result files.

Offline docstore (deviation): BOLAA searches live Wikipedia through LangChain's
``DocstoreExplorer``. Here each question's docstore is its own ``context`` (HotpotQA's distractor
setting: the two gold paragraphs plus eight distractors, each the intro paragraph of a Wikipedia
article). ``Search`` shows the whole paragraph (LangChain shows a page's first paragraph), else
``Could not find [x]. Similar: [...]`` with the closest of the ten titles. ``Lookup`` steps through
the *sentences* of the last found page (LangChain steps through paragraphs; a one-paragraph page
would make that useless), with LangChain's ``(Result i/n)``, ``No Results`` and
``No More Results``; a failed Search forgets the page, as in LangChain.
"""

from __future__ import annotations

import difflib
import os
import re
import string
from collections import Counter
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from agenttuning.jsonl import iter_jsonl
from serve.envs.base import (
    Env,
    EnvError,
    InvalidAction,
    InvalidFormat,
    StepResult,
    Task,
    data_file,
    register,
)

LEVELS = ("easy", "medium", "hard")
DEFAULT_DIR = "hotpotqa"  # data/hotpotqa/hotpotqa_{easy,medium,hard}.jsonl

# BOLAA's REACT_INSTRUCTION (AgentTuning eval_heldout/hotpotQA/src/pre_prompt.py), verbatim.
INSTRUCTION = """This task involves solving a question-answering exercise through a series of interleaved Thought, Action, and Observation steps. Any thought before the action is allowed, and action can be one of the following three types:
(1) Search[entity]: This action involves searching for a specific entity on Wikipedia and returning the first paragraph of the entity's page if it exists. If the entity does not have a Wikipedia page, the assistant should suggest similar entities to search for.
(2) Lookup[keyword]: This action involves searching for the next sentence containing the specified keyword in the most recent passage successfully found by the Search action.
(3) Finish[answer]: This action concludes the task by providing the answer to the question.
You can take as many steps as necessary to answer the question. The key is to ensure that each step logically follows the previous one and contributes to the final answer. The task aims to emulate a reasoning process that yields accurate and comprehensive answers.
Here are some examples:
{examples}
(END OF EXAMPLES)
Question: {question}"""

# BOLAA's REACT_EXAMPLE (src/fewshots.py; the two ReAct HotpotQA demonstrations), verbatim,
# including its mis-decoded en dash ("\u00e2\u0080\u0093"): that is the text the paper's models saw.
EXAMPLES = (
    'Question: Musician and satirist Allie Goertz wrote a song about the "The Simpsons" character Milhouse, '
    'who Matt Groening named after who?\n'
    'Thought 1: The question simplifies to "The Simpsons" character Milhouse is named after who. '
    'I only need to search Milhouse and find who it is named after.\n'
    'Action 1: Search[Milhouse]\n'
    'Observation 1: Milhouse Mussolini Van Houten is a recurring character in the Fox animated television '
    'series The Simpsons voiced by Pamela Hayden and created by Matt Groening.\n'
    'Thought 2: The paragraph does not tell who Milhouse is named after, maybe I can look up "named after".\n'
    'Action 2: Lookup[named after]\n'
    'Observation 2: (Result 1 / 1) Milhouse was named after U.S. president Richard Nixon, whose middle '
    'name was Milhous. \n'
    'Thought 3: Milhouse was named after U.S. president Richard Nixon, so the answer is Richard Nixon.\n'
    'Action 3: Finish[Richard Nixon]\n'
    '\n'
    'Question: Were Pavel Urysohn and Leonid Levin known for the same type of work?\n'
    'Thought 1: I need to search Pavel Urysohn and Leonid Levin, find their types of work, then find if '
    'they are the same.\n'
    'Action 1: Search[Pavel Urysohn]\n'
    'Observation 1: Pavel Samuilovich Urysohn (February 3, 1898 \u00e2\u0080\u0093 August 17, 1924) was a '
    'Soviet mathematician who is best known for his contributions in dimension theory.\n'
    'Thought 2: Pavel Urysohn is a mathematician. I need to search Leonid Levin next and find its type of work.\n'
    'Action 2: Search[Leonid Levin]\n'
    'Observation 2: Leonid Anatolievich Levin is a Soviet-American mathematician and computer scientist. \n'
    'Thought 3: Leonid Levin is a mathematician and computer scientist. So Pavel Urysohn and Leonid Levin '
    'have the same type of work. \n'
    'Action 3: Finish[yes]\n'
)

# BOLAA's observation texts (agent_arch.py) and LangChain's DocstoreExplorer wording.
INVALID_FEEDBACK = "Invalid Action. Valid Actions are Lookup[<topic>] Search[<topic>] and Finish[<answer>]."
NO_PAGE = ("The last page Searched was not found, so you cannot Lookup a keyword in it. "
           "Please try one of the similar pages given.")
_ACTION = re.compile(r"Action\s*\d*\s*:\s*(.*)", re.I)
_CALL = re.compile(r"^(\w+)\[(.+)\]", re.S)  # BOLAA: ^(\w+)\[(.+)\] after stripping ' ' and '.'


# ---------------------------------------------------------------------- scoring


def normalize_answer(text: str) -> str:
    """HotpotQA/SQuAD normalisation: lower case, strip punctuation, articles and extra spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised strings are equal."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Token-level F1 of normalised answers (HotpotQA's official definition)."""
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    # yes/no/noanswer are atomic answers: partial token overlap does not count.
    if (pred in ("yes", "no", "noanswer") or ref in ("yes", "no", "noanswer")) and pred != ref:
        return 0.0
    pred_toks, ref_toks = pred.split(), ref.split()
    same = sum((Counter(pred_toks) & Counter(ref_toks)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_toks), same / len(ref_toks)
    return 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------------- parsing


def parse_action(text: str) -> Tuple[str, str]:
    """(type, argument) of the agent's action, BOLAA style.

    The action is the first ``Action N:`` line (else the last line): BOLAA generates the action
    after ``Action N:`` up to the first newline, so anything a model writes after that line (an
    imagined observation, further steps) is ignored. ``type`` keeps its case, as BOLAA compares
    it with ``Search``/``Lookup``/``Finish`` exactly. No ``Type[argument]`` at all raises
    InvalidFormat, an unknown type InvalidAction; both carry BOLAA's invalid-action text.
    """
    matches = _ACTION.findall(text)
    line = matches[0] if matches else (text.strip().splitlines() or [""])[-1]
    call = _CALL.match(line.strip(" ").strip("."))
    if not call:
        raise InvalidFormat(INVALID_FEEDBACK)
    if call.group(1) not in ("Search", "Lookup", "Finish"):
        raise InvalidAction(INVALID_FEEDBACK)
    return call.group(1), call.group(2)


def _level_of_file(path: str) -> Optional[str]:
    stem = os.path.basename(path).split(".")[0]
    for level in LEVELS:
        if stem in (level, f"hotpotqa_{level}"):
            return level
    return None


@register("hotpotqa")
class HotpotQAEnv(Env):
    """Multi-hop QA with Search/Lookup/Finish over each question's own context paragraphs."""

    default_max_turns = 10  # BOLAA's BaseAgent max_steps
    metric = "f1"  # paper_score(): mean over levels of the level's mean answer F1, x100

    def __init__(self, path: Union[str, Sequence[str], None] = None, *,
                 levels: Optional[Sequence[str]] = None, **options: Any) -> None:
        unknown = sorted(set(levels or ()) - set(LEVELS))
        if unknown:
            raise EnvError(f"hotpotqa: unknown levels {unknown}; known: {list(LEVELS)}")
        self.levels = list(levels) if levels else None
        # An unparseable turn gets BOLAA's feedback and costs a step; the episode goes on.
        options.setdefault("max_invalid", options.get("max_turns") or self.default_max_turns)
        super().__init__(path, **options)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ tasks

    def _files(self, path: Union[str, Sequence[str], None]) -> List[str]:
        if path is None:
            path = data_file(DEFAULT_DIR)
        if not isinstance(path, str):
            return [str(p) for p in path]
        if not os.path.isdir(path):
            return [path]
        files = [os.path.join(path, name) for level in (self.levels or LEVELS)
                 for name in (f"hotpotqa_{level}.jsonl", f"{level}.jsonl")
                 if os.path.isfile(os.path.join(path, name))]
        if not files:
            raise EnvError(f"hotpotqa: {path} holds no hotpotqa_<level>.jsonl or <level>.jsonl file "
                           f"(levels {list(LEVELS)}); pass a JSON-lines file or a list of files")
        return files

    def load_tasks(self, path: Union[str, Sequence[str], None]) -> List[Task]:
        tasks: List[Task] = []
        seen: Dict[str, str] = {}  # task id -> where it came from
        for fname in self._files(path):
            if not os.path.isfile(fname):
                raise EnvError(f"hotpotqa: task file {fname} does not exist")
            file_level = _level_of_file(fname)
            for lineno, rec, _ in iter_jsonl(fname, error=EnvError, who="hotpotqa"):
                tid = str(rec.get("id", rec.get("_id", f"{os.path.basename(fname)}:{lineno}")))
                if tid in seen:
                    raise EnvError(f"hotpotqa: task id {tid!r} appears twice ({seen[tid]} and "
                                   f"{fname}:{lineno}); ids must be unique over all levels")
                seen[tid] = f"{fname}:{lineno}"
                split = str(rec.get("level") or file_level or "dev")
                if self.levels and split not in self.levels:
                    continue
                missing = [k for k in ("question", "answer", "context") if k not in rec]
                if missing:
                    self.skip(tid, f"record at {fname}:{lineno} lacks field(s) {missing}")
                    continue
                if not isinstance(rec["context"], list) or not all(
                        isinstance(c, list) and len(c) == 2 for c in rec["context"]):
                    self.skip(tid, f"record at {fname}:{lineno}: 'context' is not [[title, [sentences]], ...]")
                    continue
                tasks.append(Task(tid, rec, split=split))
        return tasks

    # ------------------------------------------------------------------ episode

    def start(self, task: Task) -> List[Dict[str, Any]]:
        rec = task.data
        self._pages: Dict[str, List[str]] = {
            str(t): [str(s).strip() for s in sents if str(s).strip()] for t, sents in rec["context"]}
        self._paragraphs: Dict[str, str] = {
            str(t): " ".join("".join(str(s) for s in sents).split()) for t, sents in rec["context"]}
        self._page: Optional[str] = None
        self._lookup: Tuple[str, int] = ("", 0)
        self._expert_plan = self._make_expert_plan(rec)
        prompt = INSTRUCTION.format(examples=EXAMPLES, question=rec["question"])
        return [{"role": "user", "content": prompt}]

    def act(self, action: str) -> StepResult:
        prefix = f"Observation {self.turns}: "
        try:
            kind, arg = parse_action(action)
        except InvalidFormat as exc:  # InvalidAction too; the observation keeps BOLAA's numbering
            raise type(exc)(prefix + exc.feedback) from None
        if kind == "Search":
            return StepResult(prefix + self._search(arg))
        if kind == "Lookup":
            return StepResult(prefix + self._do_lookup(arg))
        gold = str(self.current.data["answer"])
        em, f1 = exact_match(arg, gold), f1_score(arg, gold)
        verdict = "CORRECT" if em else "INCORRECT"
        return StepResult(f"{prefix}Answer is {verdict}", reward=f1, done=True,
                          info={"em": em, "f1": f1, "answer": arg, "gold": gold,
                                "level": self.current.split})

    def _search(self, entity: str) -> str:
        title = self._find_title(entity)
        if title is None:
            self._page = None  # LangChain forgets the document after a failed search
            similar = difflib.get_close_matches(entity, list(self._pages), n=5, cutoff=0.0)
            return f"Could not find [{entity}]. Similar: {similar}"
        self._page = title
        self._lookup = ("", 0)
        return self._paragraphs[title]

    def _find_title(self, entity: str) -> Optional[str]:
        key = normalize_answer(entity)
        for title in self._pages:
            if title == entity or normalize_answer(title) == key:
                return title
        return None

    def _do_lookup(self, keyword: str) -> str:
        if self._page is None:
            return NO_PAGE
        term, index = self._lookup
        # LangChain: the same term again moves to the next hit, a new term starts over.
        index = index + 1 if keyword.lower() == term else 0
        self._lookup = (keyword.lower(), index)
        hits = [s for s in self._pages[self._page] if keyword.lower() in s.lower()]
        if not hits:
            return "No Results"
        if index >= len(hits):
            return "No More Results"
        return f"(Result {index + 1}/{len(hits)}) {hits[index]}"

    # ------------------------------------------------------------------ expert

    @staticmethod
    def _make_expert_plan(rec: Dict[str, Any]) -> List[Tuple[str, str]]:
        titles: List[str] = []
        for fact in rec.get("supporting_facts") or []:
            if fact and str(fact[0]) not in titles:
                titles.append(str(fact[0]))
        plan = [(f"I should read about {t}.", f"Search[{t}]") for t in titles]
        plan.append(("I have what I need to answer.", f"Finish[{rec['answer']}]"))
        return plan

    def expert_action(self) -> str:
        """Search every supporting-fact title, then finish with the gold answer."""
        n = self.turns + 1
        thought, action = self._expert_plan[min(self.turns, len(self._expert_plan) - 1)]
        return f"Thought {n}: {thought}\nAction {n}: {action}"

    # ------------------------------------------------------------------ reported metric

    def paper_score(self, episodes: Iterable[Mapping[str, Any]]) -> Dict[str, Any]:
        """AgentTuning's HotpotQA number from finished episodes (``task_id``, ``reward``, ``info``).

        ``score`` = mean over levels of the level's mean reward (answer F1), ×100, as
        ``eval_hotpot.py`` averages its per-level files; also EM and per-level figures.
        """
        by_level: Dict[str, List[Tuple[float, float]]] = {}
        for ep in episodes:
            level = self.task(str(ep["task_id"])).split
            info = ep.get("info") or {}
            by_level.setdefault(level, []).append((float(ep["reward"]), float(info.get("em", 0.0))))
        levels = {lv: {"n": len(v), "f1": 100 * sum(r for r, _ in v) / len(v),
                       "em": 100 * sum(e for _, e in v) / len(v)} for lv, v in sorted(by_level.items())}
        n = sum(v["n"] for v in levels.values())
        score = sum(v["f1"] for v in levels.values()) / len(levels) if levels else 0.0
        em = sum(v["em"] for v in levels.values()) / len(levels) if levels else 0.0
        return {"metric": self.metric, "score": score, "em": em, "n": n, "levels": levels}
