"""AgentBench Knowledge Graph (held-in in AgentTuning): question answering over Freebase by tools.

Follows AgentBench as AgentTuning evaluated it (THUDM/AgentTuning ``AgentBench.old/src/tasks/
knowledgegraph``; the same tools and metric live on in THUDM/AgentBench
``src/server/tasks/knowledgegraph``). Written from scratch; see docs/env_kg.md.

Task file: AgentBench's KG JSON, unchanged (default ``agentbench/kg/dev.json``; the standard set is
``agentbench/kg/std.json``): ``question``, ``entities`` (name -> Freebase mid), ``answer``
(``answer_argument`` per gold answer), and for the expert the gold ``actions``.

Episode: the instruction (7 tools, ``#n`` variables, ``Final Answer: #n``) and the one-shot
demonstration, then ``A new question: ...\\nEntities: [names]``. Each agent turn either gives
``Final Answer: #n`` (checked first) or has a line starting ``Action`` with one tool call:
``get_relations(v)``, ``get_neighbors(v, relation)``, ``intersection(v1, v2)``,
``get_attributes(v)``, ``argmax(v, attribute)``, ``argmin(v, attribute)``, ``count(v)``; ``v`` is
``#n``, an entity name from the question, or a raw ``m.`` id. Variables are logical forms
(``serve.envs.kg_program``); the KB is queried through one SPARQL client
(``serve.envs.kg_sparql``) for relation/attribute lists and the final answer. The feedback
texts reproduce AgentBench's published wording verbatim, for fidelity (they are part of the
benchmark's interface; the prompt is in ``serve.envs.kg_prompt``); bad turns cost a round and
the episode goes on (round limit 15). Reward = F1 of the answer set against the gold
``answer_argument`` set; ``info`` also carries ``em`` and ``executable`` (non-empty answer),
AgentBench's three metrics.

Backends (options): ``sparql_url`` (Freebase in Virtuoso, as AgentBench) or ``graph_file`` (an
RDF file served from memory by pyoxigraph on 127.0.0.1). Ontology (``serve.envs.kg_ontology``):
``ontology_dir`` holds AgentBench's ``vocab.json`` and ``fb_roles`` (not shipped; default
``data/agentbench/kg/ontology``); without them (``ontology: auto``/``store``) the store's own
Freebase schema (``type.property.expected_type``) decides relations, attributes and range types.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple, Union

from serve.envs import kg_ontology
from serve.envs import kg_program as kp
from serve.envs.base import (Env, EnvError, InvalidAction, InvalidFormat, StepResult, Task,
                             data_file, read_json, register)
from serve.envs.kg_prompt import ACK, INSTRUCTIONS, ONE_SHOT, expert_turn
from serve.envs.kg_sparql import LocalSparqlEndpoint, SparqlClient, SparqlQueryError, SparqlUnavailable

log = logging.getLogger(__name__)

DEFAULT_FILE = "agentbench/kg/dev.json"
DEFAULT_ONTOLOGY = "agentbench/kg/ontology"

# AgentBench's feedback texts (AgentBench.old task.py), verbatim.
NO_ACTION = "No executable function found! Need to recheck the action."
NOT_EXECUTED = "Function is not executed!"
BAD_VARIABLE = "Invalid variable id! Need to recheck the action."
CANNOT = "{call} cannot be executed. You may make a mistake and need to fix it."
CANNOT_INTERSECT = ("{call} cannot be executed. The two variables are not of the same type. "
                    "You may further explore them by call get_relations")
SYNTAX = ("I may make a syntax error when calling {name} (e.g., unmatched parenthesis). "
          "I need to fix it and reuse the tool")

TOOLS = ("get_relations", "get_neighbors", "intersection", "get_attributes", "argmax", "argmin", "count")
_FINAL = re.compile(r"(?:Find|Final) Answer: #(\d+)")
_ACTION_LINE = re.compile(r"Action.*?:")
_CALL_NAME = re.compile(r"(\w+)\(")


class ToolError(Exception):
    """A tool call that AgentBench answers with "cannot be executed"."""


@dataclass(frozen=True)
class Variable:
    """``#n``: the type AgentBench names in its observation and the logical form behind it."""

    type: str
    program: kp.Program


Arg = Union[Variable, str]


# ---------------------------------------------------------------------- scoring


def answer_scores(predicted: List[str], gold: Set[str]) -> Dict[str, float]:
    """AgentBench's per-question metrics on answer *sets*: F1 (0 without overlap), exact match,
    executability (a non-empty answer)."""
    pred = set(predicted)
    tp = len(pred & gold)
    f1 = 0.0
    if tp:
        precision, recall = tp / len(pred), tp / len(gold)
        f1 = 2 * precision * recall / (precision + recall)
    return {"f1": f1, "em": float(pred == gold), "executable": float(bool(pred))}


def check_record(rec: Any) -> Optional[str]:
    """Why a task record cannot run, or None."""
    if not isinstance(rec, dict):
        return "record is not an object"
    if not isinstance(rec.get("question"), str) or not rec["question"].strip():
        return "field 'question' missing or not a string"
    ents = rec.get("entities")
    if not isinstance(ents, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ents.items()):
        return "field 'entities' must map entity names to Freebase ids"
    ans = rec.get("answer")
    if not isinstance(ans, list) or not ans or not all(
            isinstance(a, dict) and isinstance(a.get("answer_argument"), str) for a in ans):
        return "field 'answer' must be a non-empty list of objects with a string 'answer_argument'"
    acts = rec.get("actions")
    if acts is not None and not (isinstance(acts, list) and all(isinstance(a, str) for a in acts)):
        return "field 'actions' must be a list of tool-call strings"
    return None


# ---------------------------------------------------------------------- environment


@register("kg")
class KGEnv(Env):
    """AgentBench KG. Options: ``sparql_url`` | ``graph_file``, ``ontology_dir``, ``ontology``
    (``auto``: the files if found, else the store's schema; ``files``; ``store``), ``timeout_s``,
    ``one_shot`` (the demonstration, default on as in AgentTuning), ``split``."""

    default_max_turns = 15  # AgentBench: round = 15

    def __init__(self, path: Optional[str] = None, *, sparql_url: Optional[str] = None,
                 graph_file: Optional[str] = None, ontology_dir: Optional[str] = None,
                 ontology: str = "auto", timeout_s: float = 60.0, one_shot: bool = True,
                 split: Optional[str] = None, **options: Any) -> None:
        # AgentBench answers every bad turn with feedback and goes on until the round limit.
        options.setdefault("max_invalid", options.get("max_turns") or self.default_max_turns)
        self.split_name = split
        super().__init__(path, **options)
        if bool(sparql_url) == bool(graph_file):
            raise EnvError("kg: set exactly one of the options 'sparql_url' (a Freebase SPARQL endpoint, "
                           "e.g. http://localhost:3001/sparql; docs/env_kg.md) and 'graph_file' (an RDF file "
                           "served locally)")
        self.one_shot = bool(one_shot)
        self.ontology_dir = self._ontology_dir(ontology, ontology_dir)
        self.ontology: kg_ontology.Ontology
        if self.ontology_dir:
            try:
                self.ontology = kg_ontology.FileOntology.load(self.ontology_dir)
            except ValueError as exc:
                raise EnvError(f"kg: option 'ontology_dir': {exc}. It must hold AgentBench's vocab.json and "
                               f"fb_roles (src/server/tasks/knowledgegraph/ontology/ in THUDM/AgentBench; "
                               f"docs/env_kg.md)") from None
        self.endpoint: Optional[LocalSparqlEndpoint] = None
        if graph_file:
            try:
                self.endpoint = LocalSparqlEndpoint(graph_file)
            except (ValueError, RuntimeError) as exc:
                raise EnvError(f"kg: option 'graph_file': {exc}") from None
            sparql_url = self.endpoint.url
        try:
            self.client = SparqlClient(str(sparql_url), timeout_s=timeout_s)
        except ValueError as exc:
            raise EnvError(f"kg: option 'sparql_url': {exc}") from None
        if not self.ontology_dir:
            self.ontology = self._store_ontology()
        log.info("kg: ontology from %s", self.ontology.source)

    @staticmethod
    def _ontology_dir(mode: str, ontology_dir: Optional[str]) -> Optional[str]:
        """The folder of AgentBench's ontology files to read, or None for the store's schema."""
        if mode not in ("auto", "files", "store"):
            raise EnvError(f"kg: option 'ontology' must be 'auto', 'files' or 'store', got {mode!r}")
        if mode == "store":
            if ontology_dir:
                raise EnvError("kg: options 'ontology: store' and 'ontology_dir' contradict each other; "
                               "drop one")
            return None
        if ontology_dir:
            return ontology_dir
        try:
            return data_file(DEFAULT_ONTOLOGY)
        except EnvError:
            if mode == "files":
                raise EnvError(f"kg: no ontology files: set option 'ontology_dir' or place AgentBench's "
                               f"vocab.json and fb_roles in data/{DEFAULT_ONTOLOGY}/ (docs/env_kg.md)") from None
        log.warning("kg: AgentBench's ontology files are not in data/%s and option 'ontology_dir' is unset: "
                    "relations, attributes and range types come from the store's Freebase schema "
                    "(type.property.expected_type), which lists slightly more predicates than AgentBench's "
                    "vocab.json (docs/env_kg.md)", DEFAULT_ONTOLOGY)
        return None

    def _store_ontology(self) -> kg_ontology.StoreOntology:
        onto = kg_ontology.StoreOntology(self.client)
        try:
            onto.check()
        except (ValueError, SparqlQueryError, SparqlUnavailable) as exc:
            self.shutdown()
            raise EnvError(f"kg: no ontology: {exc}. Set option 'ontology_dir' to AgentBench's ontology files "
                           f"(vocab.json, fb_roles; docs/env_kg.md) or serve a store with Freebase's schema") from None
        return onto

    def shutdown(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint = None

    # ------------------------------------------------------------------ tasks

    def load_tasks(self, path: Optional[str]) -> List[Task]:
        path = path or data_file(DEFAULT_FILE)
        records = read_json(path, "kg", "task file")
        if not isinstance(records, list):
            raise EnvError(f"kg: task file {path} must be a JSON list of question records")
        split = self.split_name or os.path.splitext(os.path.basename(path))[0]
        tasks: List[Task] = []
        for i, rec in enumerate(records):
            tid = str(i)  # AgentBench's sample index: the record's position in the file
            problem = check_record(rec)
            if problem:
                self.skip(tid, f"record {i} ({rec.get('qid', '?') if isinstance(rec, dict) else '?'}): {problem}")
            tasks.append(Task(tid, rec, split))
        return tasks

    # ------------------------------------------------------------------ episode

    def start(self, task: Task) -> List[Dict[str, Any]]:
        rec = task.data
        self.entities: Dict[str, str] = dict(rec["entities"])
        self.gold: Set[str] = {a["answer_argument"] for a in rec["answer"]}
        self.variables: List[Variable] = []
        # Per episode (AgentBench keeps these module-global across questions).
        self._relations: Dict[kp.Program, List[str]] = {}
        self._attributes: Dict[kp.Program, List[str]] = {}
        self.executed: List[str] = []
        messages: List[Dict[str, Any]] = [
            {"role": "user", "content": INSTRUCTIONS.format(max_turns=self.max_turns)},
            {"role": "assistant", "content": ACK, "loss": False},
        ]
        if self.one_shot:
            for i, text in enumerate(ONE_SHOT):
                messages.append({"role": "user", "content": text} if i % 2 == 0
                                else {"role": "assistant", "content": text, "loss": False})
        names = ", ".join(self.entities)
        messages.append({"role": "user", "content": f"A new question: {rec['question']}\nEntities: [{names}]"})
        return messages

    def act(self, action: str) -> StepResult:
        message = action.split("Observation:")[0].replace("\\_", "_")
        if self.history and self.history[-1] == {"role": "assistant", "content": action}:
            # AgentBench keeps the cleaned turn (no made-up observation) in the conversation.
            self.history[-1]["content"] = message
        final = _FINAL.findall(message)
        if final:
            idx = int(final[0])
            if idx >= len(self.variables):
                raise InvalidAction(BAD_VARIABLE)
            return self._final(idx)
        for line in message.split("\n"):
            if _ACTION_LINE.match(line):
                return self._run_line(line)
        raise InvalidFormat(NO_ACTION)

    def _final(self, idx: int) -> StepResult:
        var = self.variables[idx]
        try:
            predicted = self._answers(var.program)
        except (SparqlQueryError, kp.ProgramError) as exc:
            log.info("kg: task %s: final answer #%d does not execute: %s", self.current.id, idx, exc)
            predicted = []
        scores = answer_scores(predicted, self.gold)
        info = {**scores, "answer_variable": idx, "predict": predicted, "gold": sorted(self.gold),
                "program": var.program.lisp(), "actions": list(self.executed)}
        return StepResult(f"Final Answer: #{idx} submitted.", reward=scores["f1"], done=True, info=info)

    def _run_line(self, line: str) -> StepResult:
        """The first tool call on an ``Action`` line that executes (AgentBench tries each name)."""
        failure: Optional[InvalidFormat] = None
        for name in _CALL_NAME.findall(line):
            args = re.findall(rf"{name}\((.+?)\)", line)
            if not args:
                failure = InvalidFormat(SYNTAX.format(name=name))
                continue
            raw = re.split(r"\s*,\s*", args[0].strip())
            call = f"{name}({', '.join(raw)})"
            try:
                if name not in TOOLS:
                    raise ToolError(f"unknown function {name}")
                new_var, observation = self._call(name, [self._resolve(a) for a in raw])
            except (ToolError, kp.ProgramError, SparqlQueryError) as exc:
                log.debug("kg: %s failed: %s", call, exc)
                template = CANNOT_INTERSECT if name == "intersection" else CANNOT
                failure = InvalidAction(template.format(call=call))
                continue
            self.executed.append(call)
            info: Dict[str, Any] = {"tool": name}
            if new_var is not None:
                observation = observation.replace("##", f"#{len(self.variables)}")
                info["variable"] = len(self.variables)
                self.variables.append(new_var)
            return StepResult(observation, info=info)
        raise failure or InvalidFormat(NOT_EXECUTED)

    def _resolve(self, raw: str) -> Arg:
        arg = raw.replace("variable ", "").replace("Variable ", "")
        if arg.startswith("#"):
            if not arg[1:].isdigit() or int(arg[1:]) >= len(self.variables):
                raise ToolError(f"no variable {arg}")
            return self.variables[int(arg[1:])]
        return self.entities.get(arg, arg)

    # ------------------------------------------------------------------ tools

    def _call(self, name: str, args: List[Arg]) -> Tuple[Optional[Variable], str]:
        arity = {"get_relations": 1, "get_attributes": 1, "count": 1}.get(name, 2)
        if len(args) != arity:
            raise ToolError(f"{name} takes {arity} argument(s), got {len(args)}")
        if name == "get_relations":
            rels = self._predicates(args[0], self.ontology.relations, self._relations)
            return None, f"Observation: [{', '.join(rels)}]"
        if name == "get_neighbors":
            src, relation = args
            prog = self._program(src)
            if relation not in self._relations.get(prog, ()):  # AgentBench: get_relations first
                raise ToolError(f"{relation} is not among the relations found for this variable")
            rng = self.ontology.range(str(relation))
            if rng is None:
                raise ToolError(f"no range type for {relation}")
            return Variable(rng, kp.Join(relation, prog)), f"Observation: variable ##, which are instances of {rng}"
        if name == "intersection":
            a, b = args
            if not isinstance(a, Variable) or not isinstance(b, Variable) or a.type != b.type:
                raise ToolError("intersection needs two variables of the same type")
            obs = f"Observation: variable ##, which are instances of {a.type}"
            return Variable(a.type, kp.And(a.program, b.program)), obs
        if name == "get_attributes":
            var = self._need_variable(args[0])
            attrs = self._predicates(var, self.ontology.attributes, self._attributes)
            return None, f"Observation: [{', '.join(attrs)}]"
        if name in ("argmax", "argmin"):
            var, attribute = self._need_variable(args[0]), args[1]
            if attribute not in self._attributes.get(var.program, ()):  # get_attributes first
                raise ToolError(f"{attribute} is not among the attributes found for this variable")
            prog = kp.Superlative(name.upper(), var.program, str(attribute))
            return Variable(var.type, prog), f"Observation: variable ##, which are instances of {var.type}"
        var = self._need_variable(args[0])  # count
        return Variable("type.int", kp.Count(var.program)), "Observation: variable ##, which is a number"

    @staticmethod
    def _need_variable(arg: Arg) -> Variable:
        if not isinstance(arg, Variable):  # AgentBench reads .program: entities fail here
            raise ToolError(f"{arg!r} is not a variable")
        return arg

    @staticmethod
    def _program(arg: Arg) -> kp.Program:
        if isinstance(arg, Variable):
            return arg.program
        if not kp.ENTITY_ID.match(arg):
            raise ToolError(f"{arg!r} is neither a variable nor an entity")
        return kp.Entity(arg)

    def _predicates(self, arg: Arg, select: Callable[[Iterable[str]], List[str]],
                    cache: Dict[kp.Program, List[str]]) -> List[str]:
        prog = self._program(arg)
        rows = self.client.select(kp.predicates_query(prog))
        # AgentBench shows only vocabulary predicates; sorted here for a stable observation.
        found = select({kp.term_value(v) for row in rows for v in row.values()})
        cache[prog] = found
        return found

    def _answers(self, prog: kp.Program) -> List[str]:
        rows = self.client.select(kp.answer_query(prog))
        out: List[str] = []
        for row in rows:
            for value in row.values():
                if kp.term_value(value) not in out:
                    out.append(kp.term_value(value))
        return out

    # ------------------------------------------------------------------ expert

    def expert_action(self) -> str:
        """Replay the record's gold ``actions`` (entity ids written as the question's names where
        the name parses back), then ``Final Answer: #k`` for the last variable they make."""
        actions = self.current.data.get("actions") if self.current else None
        if not actions:
            raise EnvError(f"kg: task {self.current.id if self.current else '?'} has no gold 'actions'; no expert")
        made = sum(1 for a in actions if a.split("(")[0].strip() not in ("get_relations", "get_attributes"))
        step = self.turns
        if step < len(actions):
            return expert_turn(actions[step], self.entities)
        return f"Thought: #{made - 1} is the final answer to the question.\nFinal Answer: #{made - 1}"
