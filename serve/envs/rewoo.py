"""ReWOO (held-out in AgentTuning): the evaluated model plans with tools, then solves from evidence.

ReWOO ("Reasoning WithOut Observation", Xu et al. 2023; github billxbf/ReWOO, adapted by
THUDM/AgentTuning ``eval_heldout/rewoo``) makes two model calls per question: the *planner*
writes the whole plan up front, ``Plan: ...`` lines each followed by one ``#En = Tool[input]``
line whose input may name earlier evidence (``#E1``); the *workers* run the tools in order,
replacing each ``#Ek`` by ``[evidence k]``; the *solver* gets the plans with their evidence and
answers directly. Here the evaluated model plays planner and solver, in two turns:

====  =================================================  =====================================
turn  user message (from the environment)                assistant (the evaluated model)
====  =================================================  =====================================
0     planner prompt: instruction, tool list,            ``Plan: ...`` / ``#E1 = Tool[input]``
      demonstration, the question                        lines (an unparseable reply gets
                                                         ``invalid_format`` feedback)
1     solver prompt: the question, each plan with its    the answer, directly
      ``Evidence:``, the question again
====  =================================================  =====================================

ReWOO sends the solver prompt as a fresh single-turn prompt; here it is the second user turn of
the same conversation, so the model also still sees its planner prompt and plan (the evidence it
needs is in the solver prompt either way). Reward: ``metric`` (``auto`` = the LLM grader's
accuracy when ``judge_url`` is set, else exact match; or ``judge``/``em``/``f1``); ``info`` always
carries ``em`` and ``f1``, and ``acc`` when judged. Tools: ``serve/envs/rewoo_tools.py``; task
sets and scoring: ``serve/envs/rewoo_data.py``; protocol notes: ``docs/env_rewoo.md``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

from serve.envs.base import Env, EnvError, InvalidFormat, StepResult, Task, data_file, register
from serve.envs.rewoo_data import (DATASETS, NOT_SHIPPED, em_f1, gold_answers, judge, make_task_data,
                                   read_records, sample)
from serve.envs.rewoo_tools import DESCRIPTIONS, TOOL_NAMES, ChatEndpoint, LocalWikipedia, Toolbox

log = logging.getLogger(__name__)

PLANNER_PREFIX = (
    "For the following task, make plans that solve the problem step by step. For each plan, say which "
    "external tool to call, with which input, to retrieve evidence. You can store the evidence in a "
    "variable #E that later tools can use in their input. (Plan, #E1, Plan, #E2, Plan, ...)\n\n")
PLANNER_SUFFIX = "Begin! Describe each plan in detail. Each Plan should be followed by exactly one #E.\n\n"
SOLVER_PREFIX = (
    "Solve the following task or problem. To help you, here are plans with the evidence each one "
    "collected. Some of the evidence may be noisy or wrong, so use it with caution.\n\n")
SOLVER_SUFFIX = "\nNow solve the task or problem. Respond with the answer directly, with no extra words.\n\n"

# Made-up demonstrations (not evaluation data), in ReWOO's format. Like AgentTuning's few-shots,
# HotpotQA/TriviaQA show a Wikipedia + LLM plan and the other data sets a calculation plan.
EXAMPLES = {
    "knowledge": """Question: Which river flows through the capital of the country where the highest peak of the Tatra Mountains lies?
Plan: Search for more information about the Tatra Mountains.
#E1 = Wikipedia[Tatra Mountains]
Plan: Find out the country where the highest peak of the Tatra Mountains lies.
#E2 = LLM[In which country is the highest peak of the Tatra Mountains? Given context: #E1]
Plan: Find out the capital of that country.
#E3 = LLM[What is the capital of #E2?]
Plan: Search for more information about the capital.
#E4 = Wikipedia[#E3]
Plan: Find out which river flows through the capital.
#E5 = LLM[Which river flows through #E3? Given context: #E4]

Question: Which was founded first, the University of Bologna or the University of Oxford?
Plan: Search for more information about the University of Bologna.
#E1 = Wikipedia[University of Bologna]
Plan: Search for more information about the University of Oxford.
#E2 = Wikipedia[University of Oxford]
Plan: Compare the two founding dates and determine which university was founded first.
#E3 = LLM[Which was founded first, the University of Bologna or the University of Oxford? Given context: #E1, #E2]

""",
    "math": """Question: A baker bakes 7 batches of 24 muffins and packs them in boxes of 6. How many boxes does she fill?
Plan: Calculate the total number of muffins.
#E1 = Calculator[7 * 24]
Plan: Calculate how many boxes of 6 the muffins fill.
#E2 = Calculator[#E1 / 6]

Question: What is the square of the number of legs of a spider?
Plan: Find out how many legs a spider has.
#E1 = LLM[How many legs does a spider have? Answer with a number.]
Plan: Square that number.
#E2 = Calculator[#E1 ^ 2]

""",
}

_PLAN = re.compile(r"^Plan\s*\d*\s*:\s*(.*)$", re.I)
_EVIDENCE = re.compile(r"^#E(\d+)\s*[:=]\s*(.*)$")
_INLINE_EVIDENCE = re.compile(r"#E\d+\s*=")
_CALL = re.compile(r"^([A-Za-z]\w*)\s*\[(.*)\]", re.S)
_VAR = re.compile(r"#E(\d+)")


@dataclass
class Step:
    """One ``Plan`` + ``#En = call`` pair of a parsed plan."""

    eid: int
    plan: str
    call: str
    tool: Optional[str] = None  # None: the call is not Tool[input]; ReWOO uses its text as evidence
    tool_input: str = ""
    evidence: str = ""
    error: Optional[str] = None

    def heading(self) -> str:
        return f"Plan: {self.plan}" if self.plan else f"#E{self.eid} = {self.call}"


def parse_plan(text: str) -> List[Step]:
    """The steps of a planner reply (ReWOO's line format; ``Plan: ... #E1 = ...`` on one line too).

    InvalidFormat when no ``#En = Tool[input]`` line is found.
    """
    steps: List[Step] = []
    plan = ""
    for raw in text.splitlines():
        line = raw.strip().lstrip("-*• ").replace("**", "").strip()
        m = _PLAN.match(line)
        if m:
            plan = m.group(1).strip()
            inline = _INLINE_EVIDENCE.search(plan)
            if not inline:
                continue
            plan, line = plan[:inline.start()].strip(), plan[inline.start():]
        m = _EVIDENCE.match(line)
        if not m:
            continue
        call = m.group(2).strip()
        step = Step(int(m.group(1)), plan, call)
        c = _CALL.match(call)
        if c:
            step.tool = c.group(1)
            step.tool_input = c.group(2).strip()
        steps.append(step)
        plan = ""
    if not any(s.tool for s in steps):
        raise InvalidFormat(
            "Your plan could not be parsed. Write one or more steps, each a line 'Plan: <what to do>' "
            "followed by a line '#E<n> = <Tool>[<input>]' (for example '#E1 = Wikipedia[Paris]'); a "
            "later input may use earlier evidence by its name, e.g. '#E2 = LLM[Who founded #E1?]'.")
    return steps


def planner_prompt(tools: Sequence[str], example: str, question: str) -> str:
    """ReWOO's planner prompt layout: prefix, tool list, demonstrations, suffix, the question."""
    tool_list = "Tools can be one of the following:\n" + "".join(
        f"{t}[input]: {DESCRIPTIONS[t]}\n" for t in tools) + "\n"
    return PLANNER_PREFIX + tool_list + EXAMPLES[example] + PLANNER_SUFFIX + f"Question: {question}\n"


def solver_prompt(question: str, steps: Sequence[Step]) -> str:
    """ReWOO's solver prompt layout: prefix, question, plans with evidence, suffix, question."""
    worker_log = "".join(f"{s.heading()}\nEvidence:\n{s.evidence}\n" for s in steps)
    return SOLVER_PREFIX + question + "\n" + worker_log + SOLVER_SUFFIX + question + "\n"


@register("rewoo")
class ReWOOEnv(Env):
    """ReWOO planner/solver episodes over AgentTuning's held-out ReWOO data sets."""

    default_max_turns = 2

    def __init__(self, path: Optional[str] = None, *, datasets: Union[None, str, Sequence[str]] = None,
                 dataset: Optional[str] = None, sample_size: Optional[int] = 50, seed: int = 2024,
                 metric: str = "auto", judge_url: Optional[str] = None, judge_model: str = "gpt-3.5-turbo",
                 judge_api_key_env: str = "OPENAI_API_KEY", llm_url: Optional[str] = None,
                 llm_model: str = "gpt-3.5-turbo", llm_api_key_env: str = "OPENAI_API_KEY",
                 google_key_env: str = "SERPER_API_KEY", google_url: str = "https://google.serper.dev/search",
                 wolfram_key_env: str = "WOLFRAM_ALPHA_APPID",
                 wolfram_url: str = "https://api.wolframalpha.com/v2/query", sotu_doc: Optional[str] = None,
                 tool_timeout: float = 60.0, max_plan_steps: int = 10, require_all_tools: bool = False,
                 **options: Any) -> None:
        if isinstance(datasets, str):
            datasets = [d.strip() for d in datasets.split(",") if d.strip()]
        unknown = sorted((set(datasets or []) | {dataset}) - {None} - set(DATASETS))
        if unknown:
            raise EnvError(f"rewoo: unknown data set(s) {unknown}; known: {', '.join(DATASETS)}")
        if metric not in ("auto", "judge", "em", "f1"):
            raise EnvError(f"rewoo: option 'metric' must be auto, judge, em or f1, got {metric!r}")
        if metric == "judge" and not judge_url:
            raise EnvError("rewoo: metric 'judge' needs option judge_url (an OpenAI-compatible endpoint)")
        if sample_size is not None and int(sample_size) < 0:
            raise EnvError("rewoo: option 'sample_size' must be >= 0 (0 or null = every record)")
        self.datasets = list(datasets) if datasets else list(DATASETS)
        self.dataset = dataset
        self.sample_size, self.seed = (int(sample_size) if sample_size else None), int(seed)
        self.metric = metric if metric != "auto" else ("judge" if judge_url else "em")
        self.judge = (ChatEndpoint(judge_url, judge_model, judge_api_key_env, timeout=tool_timeout)
                      if judge_url else None)
        self.max_plan_steps = int(max_plan_steps)
        self.require_all_tools = bool(require_all_tools)
        if sotu_doc is None:
            try:
                sotu_doc = data_file("rewoo/docs/state_of_the_union.txt")
            except EnvError:
                sotu_doc = None  # SearchSOTU then reports itself unavailable; sotu_qa tasks are skipped
        try:
            self.toolbox = Toolbox(llm_url=llm_url, llm_model=llm_model, llm_api_key_env=llm_api_key_env,
                                   google_key_env=google_key_env, google_url=google_url,
                                   wolfram_key_env=wolfram_key_env, wolfram_url=wolfram_url,
                                   sotu_doc=sotu_doc, tool_timeout=tool_timeout)
        except ValueError as exc:
            raise EnvError(f"rewoo: {exc}") from None
        # The plan turn must parse (ReWOO has no second try); max_invalid=k allows k corrections.
        options.setdefault("max_invalid", 0)
        options.setdefault("max_turns", 2 + int(options["max_invalid"]))
        super().__init__(path, **options)

    # ------------------------------------------------------------------ tasks

    def load_tasks(self, path: Optional[str]) -> List[Task]:
        groups: Dict[str, List[Dict[str, Any]]] = {}
        if path:
            for rec in read_records(path, self.dataset):
                groups.setdefault(rec["dataset"], []).append(rec)
        else:
            for ds in self.datasets:
                spec = DATASETS[ds]
                if not spec.files:
                    self.skip(f"{ds}/*", NOT_SHIPPED[ds])
                    continue
                try:
                    files = [data_file(f) for f in spec.files]
                except EnvError as exc:
                    self.skip(f"{ds}/*", f"{exc} (ReWOO's data files, see docs/env_rewoo.md)")
                    continue
                groups[ds] = [r for f in files for r in read_records(f, ds)]
        tasks: List[Task] = []
        for ds, recs in groups.items():
            for rec in sample(recs, self.sample_size, self.seed):
                tid = f"{ds}/{rec['key']}"
                data, problem = make_task_data(ds, rec["raw"])
                if data is None:
                    self.skip(tid, f"record at {rec['where']} {problem}")
                    continue
                why = self._cannot_run(data)
                if why:
                    self.skip(tid, why)
                    continue
                tasks.append(Task(tid, data, split=ds))
        return tasks

    def _tools(self, data: Dict[str, Any]) -> List[str]:
        return list(data.get("tools") or DATASETS[data["dataset"]].tools)

    def _cannot_run(self, data: Dict[str, Any]) -> str:
        tools = self._tools(data)
        bad = [t for t in tools if t not in DESCRIPTIONS]
        if bad:
            return f"unknown tool(s) {bad} in 'tools'; known: {', '.join(TOOL_NAMES)}"
        needed = tools if self.require_all_tools else [t for t in DATASETS[data["dataset"]].needs if t in tools]
        for tool in needed:
            why = self.toolbox.unavailable(tool, bool(data.get("context")))
            if why:
                return f"needs tool {tool}: {why}"
        return ""

    # ------------------------------------------------------------------ episode

    def start(self, task: Task) -> List[Dict[str, Any]]:
        data = task.data
        self._tool_list = self._tools(data)
        self._wiki = LocalWikipedia(data["context"]) if data.get("context") else None
        self._phase = "plan"
        self._steps: List[Step] = []
        example = DATASETS[data["dataset"]].example
        return [{"role": "user", "content": planner_prompt(self._tool_list, example, data["question"])}]

    def act(self, action: str) -> StepResult:
        if self._phase == "plan":
            steps = parse_plan(action)
            self._run_workers(steps)
            self._steps, self._phase = steps, "solve"
            info = {"phase": "plan", "steps": [s.__dict__.copy() for s in steps],
                    "tool_errors": sum(1 for s in steps if s.error)}
            return StepResult(solver_prompt(self.current.data["question"], steps), info=info)
        return self._score(action.strip("\n"))  # ReWOO takes the solver's reply as the answer

    def _run_workers(self, steps: List[Step]) -> None:
        done: Dict[int, str] = {}
        for i, step in enumerate(steps):
            tool = next((t for t in self._tool_list if step.tool and t.lower() == step.tool.lower()), None)
            if i >= self.max_plan_steps:
                step.evidence = f"No evidence found (the plan has more than {self.max_plan_steps} steps)."
            elif step.tool is None:
                step.evidence = step.call  # ReWOO: a non-call right-hand side is its own evidence
            elif tool is None:
                step.evidence = (f"No evidence found: {step.tool} is not one of the tools "
                                 f"({', '.join(self._tool_list)}).")
            else:
                step.tool = tool
                step.tool_input = _VAR.sub(
                    lambda m: f"[{done[int(m.group(1))]}]" if int(m.group(1)) in done else m.group(0),
                    step.tool_input)
                step.evidence, step.error = self.toolbox.run(tool, step.tool_input, self._wiki)
            done[step.eid] = step.evidence

    def _score(self, prediction: str) -> StepResult:
        data = self.current.data
        em, f1 = em_f1(prediction, data["answer"])
        info: Dict[str, Any] = {"phase": "solve", "dataset": data["dataset"], "answer": prediction,
                                "gold": data["answer"], "em": em, "f1": f1, "metric": self.metric,
                                "tool_calls": sum(1 for s in self._steps if s.tool),
                                "tool_errors": sum(1 for s in self._steps if s.error)}
        if self.judge is not None:
            # An unreachable grader raises: the episode ends as task_error, not as a wrong answer.
            info["acc"], info["judge_reply"] = judge(self.judge, data["question"], prediction, data["answer"])
        reward = {"judge": info.get("acc", 0.0), "em": em, "f1": f1}[self.metric]
        verdict = "CORRECT" if reward >= 1.0 else "INCORRECT"
        return StepResult(f"Answer is {verdict}.", reward=float(reward), done=True, info=info)

    # ------------------------------------------------------------------ expert

    def expert_action(self) -> str:
        """Gold path: a plan that fetches the gold evidence, then the gold answer."""
        if self._phase == "solve":
            return gold_answers(self.current.data["answer"])[0]
        data = self.current.data
        lines: List[str] = []
        titles = list(dict.fromkeys(str(f[0]) for f in data.get("supporting_facts") or [] if f))
        if titles and "Wikipedia" in self._tool_list:
            for t in titles:
                lines += [f"Plan: Search for more information about {t}.", f"#E{len(lines) // 2 + 1} = Wikipedia[{t}]"]
        elif data.get("solution") and "Calculator" in self._tool_list:
            for expr in re.findall(r"<<([^<>]*)=[^<>=]*>>", data["solution"]):
                lines += [f"Plan: Calculate {expr}.", f"#E{len(lines) // 2 + 1} = Calculator[{expr}]"]
        if not lines:
            tool = next((t for t in ("SearchSOTU", "LLM", "Google", "Wikipedia") if t in self._tool_list),
                        self._tool_list[0])
            lines = ["Plan: Find the information the question asks for.", f"#E1 = {tool}[{data['question']}]"]
        return "\n".join(lines)
