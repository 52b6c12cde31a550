"""ALFWorld (held-in) on AgentBench.old's protocol, played offline with ``alfworld`` + ``textworld``.

Task file (``path``), any of:
* a split JSON like AgentBench's ``dev.json`` / ``std.json`` (``{task_type: [game paths]}``) or
  ``{"train": [game paths]}`` — paths relative to the JSON's folder or to ``games_root``;
* a folder (e.g. a full ALFWorld download's ``json_2.1.1/valid_unseen``): every
  ``game.tw-pddl`` below it;
* one ``game.tw-pddl`` file.
Default: ``alfworld/agentbench_dev.json`` (AgentBench's 20 dev games); the paper's held-in set is
``alfworld/agentbench_std.json`` (50 games).

Protocol (THUDM/AgentTuning ``AgentBench.old/src/tasks/alfworld``: ``task.py``, ``utils.py``):
the instruction, the agent's "OK", the one-shot ReAct demonstration for the game's task type
(``alfworld_multiturn_react.json``, demonstration turns carry ``loss: false``), then
``"Here is your task. " + observation``. Each reply becomes one game command the way
AgentBench's ``process_action`` makes it:

* the text after the first ``ACTION:`` — or, when there is none, the whole reply — lowercased,
  first line only;
* kept if it is an admissible command, else replaced by the admissible command with the highest
  sentence BLEU (nltk 3.8's ``sentence_bleu`` with smoothing method 4, re-implemented in
  :func:`bleu`) when that score is above 0.01, else sent as it is;
* sent to the game, which answers ``Nothing happens.`` to anything it cannot do. Such a turn
  is marked ``info["invalid"]`` (``invalid_format`` when the reply had no ``ACTION:``,
  ``invalid_action`` otherwise) and counted, but, as in AgentBench, it never ends the episode.

The episode ends when the game is won or lost (reward 1 if won), when the last three replies
are identical after more than three turns (AgentBench's repetition rule: reward 0, status
``repetition``), or after 35 turns (AgentBench's ``max_step``).

The game files shipped here (ALFWorld's current ``json_2.1.1`` release) use a newer grammar than
the files AgentBench ran: ``move X to Y`` for ``put X in/on Y`` and ``You arrive at Y.`` in
front of what the agent sees at a receptacle. The environment shows the agent AgentBench's
wording (the one its demonstrations and AgentInstruct use): commands are matched in the
``put X in/on Y`` form, ``You move the X to the Y.`` reads ``You put the X in/on the Y.``, and
the arrival sentence is dropped, as AgentBench's ``process_ob`` dropped ``You arrive at loc N.``
The scripted expert replays the game file's ``walkthrough`` in that wording.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence

from serve.envs.pool import BackendPool, PooledBackendMixin
from serve.envs.base import Env, EnvError, Status, StepResult, Task, data_file, read_json, register

log = logging.getLogger(__name__)

DEFAULT_FILE = "alfworld/agentbench_dev.json"
DEFAULT_PROMPTS = "agentbench/alfworld_prompts/alfworld_multiturn_react.json"
SPLIT_NAMES = ("train", "dev", "std", "test", "valid_seen", "valid_unseen", "valid_train")

# Game folder prefix -> key of the demonstration in the prompts file (AgentBench's table).
PROMPT_KEYS = {
    "pick_and_place": "put",
    "pick_clean_then_place": "clean",
    "pick_heat_then_place": "heat",
    "pick_cool_then_place": "cool",
    "look_at_obj": "examine",
    "pick_two_obj": "puttwo",
}

# AgentBench.old's task instruction (the variant without the available-action list).
INSTRUCTION = (
    "Interact with a household to solve a task. Imagine you are an intelligent agent in a household "
    "environment and your target is to perform actions to complete the task goal. At the beginning of "
    "your interactions, you will be given the detailed description of the current environment and your "
    "goal to accomplish. For each of your turn, you will be given a list of actions which you can choose "
    "one to perform in this turn. You should choose from two actions: \"THOUGHT\" or \"ACTION\". If you "
    "choose \"THOUGHT\", you should first think about the current condition and plan for your future "
    "actions, and then output your action in this turn. Your output must strictly follow this format:"
    "\"THOUGHT: your thoughts.\n ACTION: your next action\n\"; If you choose \"ACTION\", you should "
    "directly output the action in this turn. Your output must strictly follow this format:\"ACTION: "
    "your next action\n\". After your each turn, the environment will give you immediate feedback based "
    "on which you plan your next few steps. if the envrionment output \"Nothing happened\", that means "
    "the previous action is invalid and you should try more options.\n Reminder: \n1. the action must be "
    "chosen from the given available actions. Any actions except provided available actions will be "
    "regarded as illegal. \n2. Think when necessary, try to act directly more in the process.\n\n"
)
ACK = "OK. I'll follow your instructions and try my best to solve the task."

# TextWorld's PDDL parser (tatsu) keeps global state: concurrent loads in one process corrupt
# each other. Game logic is pure Python (GIL-bound) anyway, so a lock costs no parallelism;
# scale out with more replicas (processes).
_TEXTWORLD_LOCK = threading.Lock()
_ACTION = re.compile(r"ACTION:(.*)")
_MOVE = re.compile(r"^move (.+) to (.+)$")
_MOVED = re.compile(r"^You move the (.+?) to the (.+?)\.$")


# ---------------------------------------------------------------------- action mapping


def bleu(reference: str, candidate: str, max_n: int = 4) -> float:
    """Sentence BLEU-4 of whitespace tokens as AgentBench computes it (nltk 3.8's
    ``sentence_bleu`` with ``SmoothingFunction().method4``, uniform weights).

    No shared word scores 0; an n-gram order without a match gets the count
    ``1 / (2**k * 5 / ln(len(candidate)))`` (k counts such orders), except for a one-word
    candidate, whose empty orders are left out of the mean.
    """
    ref, cand = reference.split(), candidate.split()
    if not cand:
        return 0.0
    precisions = []
    for n in range(1, max_n + 1):
        c_grams = Counter(tuple(cand[i:i + n]) for i in range(len(cand) - n + 1))
        r_grams = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
        precisions.append((sum((c_grams & r_grams).values()), max(1, sum(c_grams.values()))))
    if precisions[0][0] == 0:
        return 0.0
    k, log_sum = 1, 0.0
    for hits, total in precisions:
        if hits == 0:
            if len(cand) <= 1:
                continue  # nltk skips a zero precision it could not smooth
            hits_f = 1 / (2 ** k * 5 / math.log(len(cand)))
            k += 1
        else:
            hits_f = hits
        log_sum += math.log(hits_f / total) / max_n
    brevity = 1.0 if len(cand) > len(ref) else math.exp(1 - len(ref) / len(cand))
    return brevity * math.exp(log_sum)


def old_form(command: str) -> str:
    """A command in the grammar AgentBench's games used (``move X to Y`` → ``put X in/on Y``)."""
    m = _MOVE.match(command)
    return f"put {m.group(1)} in/on {m.group(2)}" if m else command


def map_action(text: str, admissible: Sequence[str], limit: float = 0.01) -> str:
    """AgentBench's ``process_action``: the command the reply stands for.

    The text after ``ACTION:`` (the whole reply if there is none), lowercased, first line;
    an admissible command if it is one (in AgentBench's wording ``put X in/on Y`` or this
    grammar's ``move X to Y``), else the admissible command with the highest :func:`bleu`
    above ``limit``, else the text itself (the game then says "Nothing happens.").
    """
    match = _ACTION.search(text)
    command = (match.group(1) if match else text).strip().lower().split("\n")[0]
    if not admissible or command in admissible:
        return command
    forms = [old_form(c) for c in admissible]  # scored as AgentBench scored its own wording
    if command in forms:
        return admissible[forms.index(command)]
    scores = [bleu(form, command) for form in forms]
    best = max(range(len(scores)), key=scores.__getitem__)  # first of equals, like np.argmax
    return admissible[best] if scores[best] > limit else command


def _solvable(game: str) -> bool:
    try:
        with open(game, encoding="utf-8") as fh:
            return bool(json.load(fh).get("solvable", True))
    except (OSError, ValueError):
        return False


def _process_observation(obs: str) -> str:
    """The game's text in the wording AgentBench's games used (see the module docstring)."""
    if obs.startswith("You arrive at ") and ". " in obs:
        obs = obs[obs.find(". ") + 2:]  # AgentBench's process_ob cut "You arrive at loc N. "
    return _MOVED.sub(r"You put the \1 in/on the \2.", obs)


# ---------------------------------------------------------------------- environment


@register("alfworld")
class AlfWorldEnv(PooledBackendMixin, Env):
    """One TextWorld PDDL game per episode; the game engine is reused across episodes."""

    default_max_turns = 35

    def __init__(self, path: Optional[str] = None, *, games_root: Optional[str] = None,
                 prompts_path: Optional[str] = None, split: Optional[str] = None,
                 max_engines: int = 16, **options: Any) -> None:
        """``max_engines``: game engines kept by this replica (= concurrent episodes)."""
        self.games_root = games_root
        self.default_split = split
        self.prompts = self._load_prompts(prompts_path or data_file(DEFAULT_PROMPTS))
        # AgentBench never ends an episode on a bad command: the game answers "Nothing happens."
        options.setdefault("max_invalid", options.get("max_turns") or self.default_max_turns)
        # AgentBench's own repetition rule (three identical replies after turn three) is in act().
        options.setdefault("repetition_k", 0)
        self.pool: BackendPool = BackendPool("alfworld", self._new_engine, lambda e: e.close(),
                                             max_size=int(max_engines))
        super().__init__(path, **options)

    @staticmethod
    def _load_prompts(path: str) -> Dict[str, List[str]]:
        prompts = read_json(path, "alfworld", "prompts file")
        missing = sorted(set(PROMPT_KEYS.values()) - set(prompts))
        if missing:
            raise EnvError(f"alfworld: prompts file {path} lacks demonstrations {missing}")
        return prompts

    # ------------------------------------------------------------------ tasks

    def load_tasks(self, path: Optional[str]) -> List[Task]:
        path = path or data_file(DEFAULT_FILE)
        if os.path.isdir(path):
            games = [(os.path.join(root, "game.tw-pddl"), self.default_split or "dev")
                     for root, _, files in sorted(os.walk(path)) if "game.tw-pddl" in files]
        elif path.endswith(".tw-pddl"):
            games = [(path, self.default_split or "dev")]
        else:
            games = self._games_from_split_file(path)
        tasks = []
        for game, split in games:
            tid = "/".join(os.path.normpath(game).split(os.sep)[-3:-1])
            if not os.path.isfile(game):
                self.skip(tid, f"game file {game} not found (set games_root or point path at an ALFWorld download)")
                continue
            if not _solvable(game):  # ALFWorld's own loader drops these too
                self.skip(tid, f"game file {game} is marked unsolvable or unreadable")
                continue
            task_type = tid.split("-", 1)[0]
            key = next((v for k, v in PROMPT_KEYS.items() if task_type.startswith(k)), None)
            if key is None:
                self.skip(tid, f"unknown ALFWorld task type {task_type!r}")
                continue
            tasks.append(Task(tid, {"game": game, "task_type": task_type, "prompt_key": key}, split=split))
        return tasks

    def _games_from_split_file(self, path: str) -> List[tuple]:
        spec = read_json(path, "alfworld", "task file")
        if isinstance(spec, list):
            spec = {self.default_split or "dev": spec}
        if not isinstance(spec, dict):
            raise EnvError(f"alfworld: {path} must map a split or task type to a list of game paths")
        root = self.games_root or os.path.dirname(os.path.abspath(path))
        # A file keyed by task type (AgentBench's dev.json / std.json) is one split, named
        # after the file when its name ends with one (agentbench_std.json -> "std").
        stem = os.path.splitext(os.path.basename(path))[0].lower()
        named = next((n for n in SPLIT_NAMES if stem == n or stem.endswith("_" + n)), "dev")
        games = []
        for key, files in spec.items():
            if not isinstance(files, list):
                raise EnvError(f"alfworld: {path}: key {key!r} must hold a list of game paths")
            split = self.default_split or (key if key in SPLIT_NAMES else named)
            games += [(os.path.join(root, str(f)), split) for f in files]
        return games

    # ------------------------------------------------------------------ episode

    def _new_engine(self) -> Any:
        try:
            import textworld
            from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos
            from textworld.envs.pddl import PddlEnv
        except ImportError as exc:
            raise EnvError(f"alfworld needs the PyPI packages 'alfworld' and 'textworld[pddl]' "
                           f"(pip install alfworld 'textworld[pddl]'): {exc}") from None
        infos = textworld.EnvInfos(won=True, admissible_commands=True, extras=["gamefile"])
        # Each engine loads its own copy of the planner library, so engines run concurrently;
        # what textworld.start does, minus loading a game (start() loads one per episode).
        return AlfredInfos(AlfredDemangler(shuffle=False)(PddlEnv(infos)))

    def start(self, task: Task) -> List[Dict[str, Any]]:
        engine = self._checkout()
        with _TEXTWORLD_LOCK:
            engine.load(task.data["game"])
            state = engine.reset()
        self.admissible: List[str] = list(state["admissible_commands"])
        self._replies: List[str] = []  # the agent's raw replies (AgentBench's repetition rule)
        with open(task.data["game"], encoding="utf-8") as fh:
            self._walkthrough = list(json.load(fh).get("walkthrough") or [])
        # Opening text "-= Welcome ... =-\n\n<room>\n\n<task>": AgentBench keeps all but the banner.
        ob = "\n".join(state.feedback.split("\n\n")[1:])
        demo = list(self.prompts[task.data["prompt_key"]])
        demo[0] = "Here is one example.\n" + demo[0]
        messages: List[Dict[str, Any]] = [
            {"role": "user", "content": INSTRUCTION},
            {"role": "assistant", "content": ACK, "loss": False},
        ]
        for i, text in enumerate(demo):
            role = "user" if i % 2 == 0 else "assistant"
            messages.append({"role": role, "content": text} if role == "user"
                            else {"role": role, "content": text, "loss": False})
        messages.append({"role": "user", "content": "Here is your task. " + ob})
        return messages

    def act(self, action: str) -> StepResult:
        command = map_action(action, self.admissible)
        invalid = None
        if command not in self.admissible:
            invalid = Status.INVALID_ACTION if _ACTION.search(action) else Status.INVALID_FORMAT
        with _TEXTWORLD_LOCK:  # every command goes to the game, as in AgentBench
            state, _, done = self._backend.step(command)
        self.admissible = list(state["admissible_commands"])
        won = bool(state["won"])
        info: Dict[str, Any] = {"command": command, "won": won, "admissible_commands": self.admissible}
        result = StepResult(_process_observation(state.feedback), reward=float(won), done=bool(done or won),
                            info=info)
        self._replies.append(action)
        if len(self._replies) > 3 and len(set(self._replies[-3:])) == 1:
            # AgentBench: three identical replies in a row (checked after the step) fail the game.
            result.reward, result.done, result.status = 0.0, True, Status.REPETITION
        elif invalid is not None:
            self.invalid += 1
            info["invalid"] = invalid.value
            if self.invalid > self.max_invalid and not result.done:
                result.done, result.status = True, invalid
        return result

    def expert_action(self) -> str:
        """The next command of the game's walkthrough (then 'look' if the walkthrough ran out),
        in AgentBench's wording."""
        step = self.turns
        command = self._walkthrough[step] if step < len(self._walkthrough) else "look"
        return f"ACTION: {old_form(command)}"
