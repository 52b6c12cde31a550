"""ScienceWorld (held-out) as AgentTuning evaluates it: the PyPI ``scienceworld`` simulator, one
JVM per concurrent episode, and the protocol of AgentTuning's ``eval_heldout/science-world``
(details and the script's rules: :mod:`serve.envs.scienceworld_protocol`).

Tasks are ``<task-name>/<variation>``. Default selection = the script's: each task's ``test``
variations shuffled with seed 1, the first 10 (9 for inclined-plane-friction-named-surfaces,
5 for power-component). Options: ``split`` (``train``/``dev``/``test``), ``task_names``,
``max_variations`` (None = all), ``sample_seed`` (None = in order), ``variation_limits``; or
``path`` = a JSON list of ids (``["boil/21", ...]``). Simplification ``easy`` (the script's
``--simplification_str``), a simulator limit of 100 moves (``env_step_limit``) and at most 200
turns (``max_turns``, the script's ``2 * env_step_limit``).

Prompt: the script's instruction, ``Ok.``, the task's few-shot conversation, then the new task;
few-shot turns are dropped oldest first while the opening exceeds ``prompt_budget_tokens``
(estimated at 4 characters per token; None keeps them all). The few-shot (``fewshot``):
``"gold"`` = our own, built by playing the simulator's gold action sequence of a *train*
variation of the same task (``fewshot_train_index``-th, default the first; never a test one) in
the script's Think/Action turn format, deterministic and cached per process; ``"file"`` = the
paper's per-task prompts from a copy of AgentTuning's ``prompts/prompt.json`` that the user
provides (``prompt_file``, else ``scienceworld/agenttuning_prompt.json`` under
``$AGENTTUNING_DATA_DIR`` or the data folder; not shipped with this project); ``"auto"``
(default) = the file when one is found there or given, else ``"gold"``.

Agent turns: ``Think: ...`` (answered ``OK.``) or ``Action: <command>``. With
``action_matching="closest"`` (default, the script's) a command that is not currently valid is
replaced by the valid command sharing the most words with it; ``"strict"`` sends it as is and
answers an unknown one with the simulator's ``No known action matches that input.`` plus a
sample of valid commands (``invalid_action``). The script's early stops apply (``early_stop``):
10 failed commands in a row end the episode with ``invalid_action``, a loop of two alternating
records with ``repetition``.

Score: the simulator's 0–100 task score. An episode is worth its *last* score, however it ends
(finished, failed by a wrong ``focus``, turn or move limit, early stop, context limit): a
negative (failed) score falls back to the score before it, as the script's ``--no_stop`` does.
reward = that score / 100; ``info["score"]`` holds it. The reported number
(``paper_score``, metric ``"mean_score"``) is the mean over tasks of each task's mean score, as
the script's ``metrics.py`` averages its per-task files.

Needs a Java runtime (Debian: ``default-jre-headless``); the simulator runs in a JVM reached over
loopback through py4j. JVMs are pooled per replica (``max_jvms``), reused across episodes and
replaced when dead or stuck (a step over ``step_timeout_s`` ends the episode with
``task_error`` and kills that JVM). The scripted expert plays the variation's gold path; its own
commands are sent as they are and exempt from the early stops (both exist to police model output;
the gold path spells some objects differently from the valid-command list, and waits many turns
running).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from serve.envs import scienceworld_protocol as proto
from serve.envs.base import (Env, EnvError, InvalidAction, InvalidFormat, Status, StepResult, Task, data_file,
                             read_json, register)
from serve.envs.pool import BackendPool, PooledBackendMixin

log = logging.getLogger(__name__)

# Variations per task in the package's (train, dev, test) splits, which are consecutive index
# ranges in that order. Read from scienceworld 1.2 (get_variations_*); test_scienceworld.py
# checks the table against the installed package (slow test).
SPLIT_SIZES: Dict[str, tuple] = {
    "boil": (14, 7, 9), "change-the-state-of-matter-of": (14, 7, 9), "chemistry-mix": (16, 8, 8),
    "chemistry-mix-paint-secondary-color": (18, 9, 9), "chemistry-mix-paint-tertiary-color": (18, 9, 9),
    "find-animal": (150, 75, 75), "find-living-thing": (150, 75, 75),
    "find-non-living-thing": (150, 75, 75), "find-plant": (150, 75, 75), "freeze": (14, 7, 9),
    "grow-fruit": (62, 31, 33), "grow-plant": (62, 31, 33), "identify-life-stages-1": (6, 3, 5),
    "identify-life-stages-2": (4, 2, 4), "inclined-plane-determine-angle": (84, 42, 42),
    "inclined-plane-friction-named-surfaces": (692, 346, 348),
    "inclined-plane-friction-unnamed-surfaces": (80, 40, 42), "lifespan-longest-lived": (62, 31, 32),
    "lifespan-longest-lived-then-shortest-lived": (62, 31, 32), "lifespan-shortest-lived": (62, 31, 32),
    "measure-melting-point-known-substance": (218, 109, 109),
    "measure-melting-point-unknown-substance": (150, 75, 75), "melt": (14, 7, 9),
    "mendelian-genetics-known-plant": (60, 30, 30), "mendelian-genetics-unknown-plant": (240, 120, 120),
    "power-component": (10, 5, 5), "power-component-renewable-vs-nonrenewable-energy": (10, 5, 5),
    "test-conductivity": (450, 225, 225), "test-conductivity-of-unknown-substances": (300, 150, 150),
    "use-thermometer": (270, 135, 135),
}
SPLITS = ("train", "dev", "test")
NO_MATCH = "No known action matches that input."
# Where a user-provided copy of the paper's few-shot prompts is looked for (data roots); not shipped.
PROMPT_FILE = "scienceworld/agenttuning_prompt.json"
PROMPT_SOURCE = "THUDM/AgentTuning eval_heldout/science-world/prompts/prompt.json"
FEWSHOT_MODES = ("auto", "file", "gold")
MATCHING = ("closest", "strict")

# Gold-path few-shots built so far in this process, by (task, variation, simplification, move limit):
# each costs a variation load and a played gold path, and the result never changes.
_gold_fewshots: Dict[Tuple[str, int, str, int], List[str]] = {}

_ACTION = re.compile(r"Action\s*:\s*(.*)", re.I)


def split_of(task_name: str, variation: int) -> str:
    """The package split of a variation index (train, dev, test ranges in that order)."""
    n_train, n_dev, n_test = SPLIT_SIZES[task_name]
    if not 0 <= variation < n_train + n_dev + n_test:
        raise EnvError(f"scienceworld: {task_name} has variations 0..{n_train + n_dev + n_test - 1}, got {variation}")
    return "train" if variation < n_train else "dev" if variation < n_train + n_dev else "test"


def split_variations(task_name: str, split: str) -> List[int]:
    """The variation indices of ``split`` for ``task_name``, in the package's order."""
    n_train, n_dev, n_test = SPLIT_SIZES[task_name]
    first = {"train": 0, "dev": n_train, "test": n_train + n_dev}[split]
    return list(range(first, first + {"train": n_train, "dev": n_dev, "test": n_test}[split]))


def parse_action(text: str, strict: bool = True) -> str:
    """The command after the last ``Action:`` (first line), else a bare one-line command.

    ``strict=False`` (the script's reading): text without ``Action:`` is the command as it is,
    for the closest-command matching to make sense of.
    """
    matches = _ACTION.findall(text)
    if matches:
        command = matches[-1].strip()
    elif not strict or (text.strip() and "\n" not in text.strip()):
        command = text.strip()
    else:
        raise InvalidFormat("Your output must end with a line 'Action: <command>'.")
    if not command and strict:
        raise InvalidFormat("The action is empty; write 'Action: <command>'.")
    return command


def hint_sample(valid: Sequence[str], k: int) -> List[str]:
    """Up to ``k`` valid commands, round-robin over their verbs so every kind of action shows."""
    by_verb: Dict[str, List[str]] = {}
    for command in sorted(set(valid)):
        if not command.startswith("connect agent"):  # thousands of useless "connect agent to X"
            by_verb.setdefault(command.split(" ")[0], []).append(command)
    out: List[str] = []
    while len(out) < k and any(by_verb.values()):
        for verb in sorted(by_verb):
            if by_verb[verb] and len(out) < k:
                out.append(by_verb[verb].pop(0))
    return out


def _start_jvm(step_limit: int) -> Any:
    if shutil.which("java") is None:
        raise EnvError("scienceworld needs a Java runtime and none is on PATH: "
                       "install the Debian package default-jre-headless (apt-get install -y default-jre-headless)")
    try:
        from scienceworld import ScienceWorldEnv
    except ImportError as exc:
        raise EnvError("scienceworld needs the PyPI package 'scienceworld' "
                       f"(pip install scienceworld): {exc}") from None
    return ScienceWorldEnv("", envStepLimit=step_limit)


def _jvm_alive(sw: Any) -> bool:
    return sw._gateway.java_process.poll() is None


def _stop_jvm(sw: Any) -> None:
    proc = sw._gateway.java_process
    try:
        sw.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


@register("scienceworld")
@register("sciworld")
class ScienceWorldTaskEnv(PooledBackendMixin, Env):
    """ScienceWorld task variations under AgentTuning's protocol; reward = last score / 100."""

    name = "scienceworld"
    default_max_turns = 200  # eval.py: max_steps = 2 * env_step_limit agent turns (Think included)
    metric = "mean_score"  # paper_score(): mean over tasks of the mean episode score (0-100)

    def __init__(self, path: Optional[str] = None, *, split: str = "test",
                 task_names: Optional[Sequence[str]] = None,
                 max_variations: Optional[int] = proto.AGENTTUNING_MAX_VARIATIONS,
                 sample_seed: Optional[int] = proto.AGENTTUNING_SEED,
                 variation_limits: Optional[Mapping[str, int]] = None,
                 simplification: str = "easy", env_step_limit: int = 100,
                 action_matching: str = "closest", early_stop: bool = True,
                 fewshot: str = "auto", prompt_file: Optional[str] = None, fewshot_train_index: int = 0,
                 prompt_budget_tokens: Optional[int] = 2048,
                 valid_action_hints: bool = True, max_hints: int = 30,
                 max_jvms: int = 4, step_timeout_s: float = 60.0, load_timeout_s: float = 180.0,
                 **options: Any) -> None:
        if split not in SPLITS:
            raise EnvError(f"scienceworld: option 'split' must be one of {SPLITS}, got {split!r}")
        if fewshot not in FEWSHOT_MODES:
            raise EnvError(f"scienceworld: option 'fewshot' must be one of {FEWSHOT_MODES}, got {fewshot!r}")
        if fewshot == "gold" and prompt_file:
            raise EnvError("scienceworld: fewshot='gold' builds its own examples; drop 'prompt_file' or use "
                           "fewshot='file'")
        if action_matching not in MATCHING:
            raise EnvError(f"scienceworld: option 'action_matching' must be one of {MATCHING}, got {action_matching!r}")
        unknown = sorted(set(task_names or ()) - set(SPLIT_SIZES))
        if unknown:
            raise EnvError(f"scienceworld: unknown task_names {unknown}; known: {sorted(SPLIT_SIZES)}")
        self.split, self.task_names = split, list(task_names or SPLIT_SIZES)
        self.max_variations, self.sample_seed = max_variations, sample_seed
        self.variation_limits = dict(proto.AGENTTUNING_LIMITS if variation_limits is None else variation_limits)
        self.simplification, self.env_step_limit = simplification, int(env_step_limit)
        self.action_matching, self.early_stop = action_matching, bool(early_stop)
        self.valid_action_hints, self.max_hints = valid_action_hints, max_hints
        self.prompt_budget_tokens = prompt_budget_tokens
        self.step_timeout_s, self.load_timeout_s = step_timeout_s, load_timeout_s
        self.fewshot_train_index = int(fewshot_train_index)
        self.prompt_file = self._find_prompt_file(fewshot, prompt_file)
        self.fewshot: Dict[str, List[str]] = {}
        if self.prompt_file:
            try:
                self.fewshot = proto.load_fewshot(self.prompt_file)
            except (OSError, ValueError) as exc:
                raise EnvError(f"scienceworld: cannot read the few-shot prompt file {self.prompt_file}: "
                               f"{exc}") from None
        # Bad agent output never ends an episode by itself (the script has no such rule), and the
        # gold paths repeat actions on purpose (waiting, watching a block slide): the script's own
        # loop test replaces the generic repetition check.
        options.setdefault("max_invalid", options.get("max_turns") or self.default_max_turns)
        options.setdefault("repetition_k", 0)
        super().__init__(path, **options)
        self._check_fewshot_covers_tasks()
        limit = self.env_step_limit
        self.pool: BackendPool = BackendPool("scienceworld", lambda: _start_jvm(limit), _stop_jvm,
                                             alive=_jvm_alive, max_size=int(max_jvms))
        self.score = 0

    # ------------------------------------------------------------------ tasks

    def load_tasks(self, path: Optional[str]) -> List[Task]:
        if path:
            ids = read_json(path, "scienceworld", "task list")
            if not isinstance(ids, list):
                raise EnvError(f"scienceworld: {path} must hold a JSON list of '<task>/<variation>' ids")
        else:
            ids = [f"{name}/{v}" for name in self.task_names for v in proto.select_variations(
                name, split_variations(name, self.split), self.max_variations, self.sample_seed,
                self.variation_limits)]
        tasks = []
        for tid in map(str, ids):
            name, _, var = tid.rpartition("/")
            if name not in SPLIT_SIZES or not var.isdigit():
                self.skip(tid, "not '<task-name>/<variation>' with a known ScienceWorld task")
                continue
            try:
                split = split_of(name, int(var))
            except EnvError as exc:
                self.skip(tid, str(exc))
                continue
            tasks.append(Task(tid, {"task": name, "variation": int(var)}, split=split))
        return tasks

    # ------------------------------------------------------------------ few-shot

    @property
    def fewshot_source(self) -> str:
        """``"gold"`` (examples built from train-variation gold paths) or the prompt file's path."""
        return self.prompt_file or "gold"

    @staticmethod
    def _find_prompt_file(mode: str, prompt_file: Optional[str]) -> Optional[str]:
        """The paper's prompt file to use, or None for our gold-path examples."""
        if mode == "gold":
            return None
        if prompt_file:
            if not os.path.isfile(prompt_file):
                raise EnvError(f"scienceworld: prompt_file {prompt_file!r} is not a file; it should be a copy of "
                               f"{PROMPT_SOURCE} (see docs/environments_heldout.md)")
            return prompt_file
        try:
            return data_file(PROMPT_FILE)
        except EnvError as exc:
            if mode == "auto":
                return None
            raise EnvError(f"scienceworld: fewshot='file' needs the paper's few-shot prompts, which this project "
                           f"does not ship: put a copy of {PROMPT_SOURCE} at {PROMPT_FILE} under "
                           f"$AGENTTUNING_DATA_DIR or pass prompt_file ({exc})") from None

    def _check_fewshot_covers_tasks(self) -> None:
        names = sorted({self.task(tid).data["task"] for tid in self.tasks()})
        if self.prompt_file:
            missing = [n for n in names if n not in self.fewshot]
            if missing:
                raise EnvError(f"scienceworld: the prompt file {self.prompt_file} has no few-shot for "
                               + ", ".join(f"{n} (task number {proto.TASK_ORDER.index(n)})" for n in missing)
                               + f"; use a complete copy of {PROMPT_SOURCE} or fewshot='gold'")
            return
        short = [n for n in names if not 0 <= self.fewshot_train_index < SPLIT_SIZES[n][0]]
        if short:
            raise EnvError(f"scienceworld: fewshot_train_index {self.fewshot_train_index} is not a train variation "
                           f"index of {short} (train sizes: {[SPLIT_SIZES[n][0] for n in short]})")

    def fewshot_variation(self, name: str) -> int:
        """The train variation whose gold path makes the task's own few-shot."""
        return split_variations(name, "train")[self.fewshot_train_index]

    def _examples(self, sw: Any, name: str) -> List[str]:
        """The task's few-shot turns: the prompt file's, else the cached or newly built gold ones."""
        if self.prompt_file:
            return self.fewshot[name]
        key = (name, self.fewshot_variation(name), self.simplification, self.env_step_limit)
        if key not in _gold_fewshots:
            _gold_fewshots[key] = self._play_gold(sw, *key[:2])
        return _gold_fewshots[key]

    def _play_gold(self, sw: Any, name: str, variation: int) -> List[str]:
        """Play ``variation``'s gold action sequence (to completion or the move limit) into few-shot turns."""
        self._call(sw.load, name, variation, self.simplification, True, timeout_s=self.load_timeout_s)
        gold = [a for a in sw.get_gold_action_sequence() if a]
        obs, _ = self._call(sw.reset)
        desc = self._call(sw.taskdescription)
        desc = desc[len(proto.TASK_DESC_PREFIX):] if desc.startswith(proto.TASK_DESC_PREFIX) else desc
        steps: List[Tuple[str, str]] = []
        for command in gold:
            steps.append((command, self._call(sw.server.step, command)))
            if self._call(sw.server.getCompleted) or self._call(sw.server.getNumMoves) >= self.env_step_limit:
                break
        log.info("scienceworld: few-shot for %s built from the gold path of train variation %d (%d of %d actions)",
                 name, variation, len(steps), len(gold))
        return proto.gold_fewshot(obs, desc, steps)

    # ------------------------------------------------------------------ episode

    def start(self, task: Task) -> List[Dict[str, Any]]:
        sw = self._checkout()
        examples = self._examples(sw, task.data["task"])  # before the load: building one plays another variation
        self._call(sw.load, task.data["task"], task.data["variation"], self.simplification, True,
                   timeout_s=self.load_timeout_s)
        self._gold = [a for a in sw.get_gold_action_sequence() if a]
        obs, _ = self._call(sw.reset)
        desc = self._call(sw.taskdescription)
        desc = desc[len(proto.TASK_DESC_PREFIX):] if desc.startswith(proto.TASK_DESC_PREFIX) else desc
        self.score = 0  # the episode's last non-negative score
        self._records = ["look around"]  # the script's recent_actions
        self._failed = 0
        self._expert_next: Optional[str] = None
        return proto.opening_messages(examples, obs, desc, self.prompt_budget_tokens)

    def act(self, action: str) -> StepResult:
        text = action.strip()
        if text.startswith("Think:"):  # the script never sends thoughts to the simulator
            return self._after(text, proto.THINK_REPLY, failed=None, done=False)
        sw = self._backend
        prediction = parse_action(text, strict=False).replace("Action:", "").strip()
        # The gold path names objects as the simulator resolves them, not always as its
        # valid-command list spells them ("pick up seed jar", "0" for an ambiguity), and it waits
        # many turns running: the expert's own commands go unmatched and are exempt from the early
        # stops, which exist to police model output. Model output always gets both.
        expert = prediction == self._expert_next
        if expert:
            command = prediction
        elif self.action_matching == "closest":
            valid = self._call(sw.get_valid_action_object_combinations)
            cands = proto.candidate_actions(valid, self._call(sw.look), self._call(sw.inventory), self._records)
            command = proto.closest_valid_action(prediction, cands)
        else:
            command = parse_action(text)
        obs = self._call(sw.server.step, command)
        if self.action_matching == "strict" and obs.strip() == NO_MATCH:
            hint = obs.strip()
            if self.valid_action_hints:
                valid = self._call(sw.get_valid_action_object_combinations)
                hint += " Some valid commands now: " + "; ".join(hint_sample(valid, self.max_hints))
            raise InvalidAction(hint)
        policed = self.early_stop and not expert
        failed = proto.is_action_failed(obs)
        if policed and failed and self._failed + 1 >= proto.MAX_FAILED_IN_A_ROW:
            # the script stops before reading this step's score
            return self._after(command, obs, failed=True, done=True, status=Status.INVALID_ACTION,
                               why=f"{proto.MAX_FAILED_IN_A_ROW} failed commands in a row")
        score = int(round(100 * self._call(sw.server.getScore)))
        completed = bool(self._call(sw.server.getCompleted))
        moves = int(self._call(sw.server.getNumMoves))
        if score >= 0:
            self.score = score  # a failed task (negative score) keeps the score before it
        if score < 0 or completed:
            return self._after(command, obs, failed, done=True)
        if moves > self.env_step_limit:
            return self._after(command, obs, failed, done=True, status=Status.TURN_LIMIT,
                               why=f"more than {self.env_step_limit} simulator moves")
        return self._after(command, obs, failed, done=False, policed=policed)

    def _after(self, command: str, obs: str, failed: Optional[bool], done: bool,
               status: Optional[Status] = None, why: str = "", policed: bool = True) -> StepResult:
        """Bookkeeping of the script's early stops, then the step's result."""
        self._expert_next = None
        obs = proto.clean(obs).strip()
        if failed is not None:
            self._failed = self._failed + 1 if failed else 0
        self._records.append(f"({command}, {obs})")
        info: Dict[str, Any] = {"score": self.score, "command": command}
        if not done and policed and self.early_stop and proto.is_loop(self._records):
            done, status, why = True, Status.REPETITION, "the last 5 turns alternate between 2 records"
        if why:
            info["stopped"] = why
        return StepResult(obs, reward=self.score / 100.0, done=done, status=status, info=info)

    def step(self, action: str) -> StepResult:
        """As :meth:`Env.step`; an episode that ends in any way is worth its last score."""
        return self._final(super().step(action))

    def abort(self, status: Status, reason: str = "") -> StepResult:
        return self._final(super().abort(status, reason))

    def _final(self, result: StepResult) -> StepResult:
        if result.done:
            result.reward = max(0.0, min(1.0, self.score / 100.0))
            result.info["score"] = self.score
        return result

    def expert_action(self) -> str:
        """The next command of the variation's gold action sequence (sent unmatched)."""
        step = self.turns
        self._expert_next = self._gold[step] if step < len(self._gold) else "look around"
        return "Action: " + self._expert_next

    # ------------------------------------------------------------------ reported metric

    def paper_score(self, episodes: Iterable[Mapping[str, Any]]) -> Dict[str, Any]:
        """AgentTuning's SciWorld number from finished episodes (``task_id``, ``reward``).

        ``score`` = mean over task names of the task's mean episode score (reward × 100), as
        ``metrics.py`` averages the per-task ``Average score`` lines of ``eval.py``.
        """
        by_task: Dict[str, List[float]] = {}
        for ep in episodes:
            name = self.task(str(ep["task_id"])).data["task"]
            by_task.setdefault(name, []).append(100.0 * float(ep["reward"]))
        tasks = {name: {"n": len(v), "score": sum(v) / len(v)} for name, v in sorted(by_task.items())}
        score = sum(t["score"] for t in tasks.values()) / len(tasks) if tasks else 0.0
        return {"metric": self.metric, "score": score, "n": sum(t["n"] for t in tasks.values()), "tasks": tasks}
