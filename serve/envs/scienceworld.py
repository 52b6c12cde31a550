"""ScienceWorld (held-out): the PyPI ``scienceworld`` simulator, one JVM per concurrent episode.

Tasks are ``<task-name>/<variation>`` pairs of the package's 30 tasks. ``split`` picks the
package's own train / dev / test variations (default ``test``), ``task_names`` a subset of tasks,
``max_variations`` caps variations per task (first ones of the split). ``path`` may instead name
a JSON file listing task ids (``["boil/21", ...]``).

Agent turns: ``Thought: ...`` then ``Action: <ScienceWorld command>`` (a bare one-line command
is accepted too). Valid-action hints: the opening message lists the action templates, and an
unrecognised command gets the simulator's own answer followed by a sample of currently valid
commands (``valid_action_hints``). Reward: the task score / 100, clamped to [0, 1] (a failed
task scores 0); ``info["score"]`` holds the raw score. The scripted expert plays the package's
gold action sequence for the variation.

Needs a Java runtime (Debian: ``default-jre-headless``); the simulator runs in a JVM reached
over loopback through py4j. JVMs are pooled per replica (``max_jvms``), reused across episodes
and replaced when dead or stuck (a step over ``step_timeout_s`` ends the episode with
``task_error`` and kills that JVM).
"""

from __future__ import annotations

import logging
import re
import shutil
from typing import Any, Dict, List, Optional, Sequence

from serve.envs.pool import BackendPool, PooledBackendMixin
from serve.envs.base import Env, EnvError, InvalidAction, InvalidFormat, StepResult, Task, read_json, register

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

INSTRUCTION = """You are an agent in ScienceWorld, a simulated world for elementary science experiments. You get a task and explore rooms, use objects and run experiments to complete it.
Every turn, write one line "Thought: <your reasoning>" and then one line "Action: <command>", where the command follows one of these templates (OBJ is an object you can see or hold):
{templates}
Useful: "look around" describes the room, "focus on OBJ" marks the object the task is about (focusing on a wrong object ends the task), "wait1" lets one time step pass. If the command is not understood you get a list of valid commands."""

_ACTION = re.compile(r"Action\s*:\s*(.+)", re.I)


def split_of(task_name: str, variation: int) -> str:
    """The package split of a variation index (train, dev, test ranges in that order)."""
    n_train, n_dev, n_test = SPLIT_SIZES[task_name]
    if not 0 <= variation < n_train + n_dev + n_test:
        raise EnvError(f"scienceworld: {task_name} has variations 0..{n_train + n_dev + n_test - 1}, got {variation}")
    return "train" if variation < n_train else "dev" if variation < n_train + n_dev else "test"


def parse_action(text: str) -> str:
    """The command after the last ``Action:`` (or a bare one-line command)."""
    matches = _ACTION.findall(text)
    if matches:
        command = matches[-1].strip()
    elif text.strip() and "\n" not in text.strip():
        command = text.strip()
    else:
        raise InvalidFormat("Your output must end with a line 'Action: <command>'.")
    if not command:
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
        raise EnvError(f"scienceworld needs the PyPI package 'scienceworld' (pip install scienceworld): {exc}") from None
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
    """ScienceWorld task variations with score/100 reward and the gold-path expert."""

    name = "scienceworld"
    default_max_turns = 200  # gold paths take up to 192 actions (inclined-plane-friction-unnamed)

    def __init__(self, path: Optional[str] = None, *, split: str = "test",
                 task_names: Optional[Sequence[str]] = None, max_variations: Optional[int] = 10,
                 simplification: str = "", valid_action_hints: bool = True, max_hints: int = 30,
                 max_jvms: int = 4, step_timeout_s: float = 60.0, load_timeout_s: float = 180.0,
                 **options: Any) -> None:
        if split not in SPLITS:
            raise EnvError(f"scienceworld: option 'split' must be one of {SPLITS}, got {split!r}")
        unknown = sorted(set(task_names or ()) - set(SPLIT_SIZES))
        if unknown:
            raise EnvError(f"scienceworld: unknown task_names {unknown}; known: {sorted(SPLIT_SIZES)}")
        self.split, self.task_names = split, list(task_names or SPLIT_SIZES)
        self.max_variations = max_variations
        self.simplification, self.valid_action_hints, self.max_hints = simplification, valid_action_hints, max_hints
        self.step_timeout_s, self.load_timeout_s = step_timeout_s, load_timeout_s
        options.setdefault("max_invalid", options.get("max_turns") or self.default_max_turns)
        # ScienceWorld tasks repeat actions on purpose (gold paths wait 10 times running or watch
        # a block slide 39 times), so repetition does not end episodes unless asked for.
        options.setdefault("repetition_k", 0)
        super().__init__(path, **options)
        limit = self.max_turns + 1  # the agent's turn limit, not the simulator's, ends episodes
        self.pool: BackendPool = BackendPool("scienceworld", lambda: _start_jvm(limit), _stop_jvm,
                                             alive=_jvm_alive, max_size=int(max_jvms))

    # ------------------------------------------------------------------ tasks

    def load_tasks(self, path: Optional[str]) -> List[Task]:
        if path:
            ids = read_json(path, "scienceworld", "task list")
            if not isinstance(ids, list):
                raise EnvError(f"scienceworld: {path} must hold a JSON list of '<task>/<variation>' ids")
        else:
            ids = []
            for name in self.task_names:
                n_train, n_dev, n_test = SPLIT_SIZES[name]
                first = {"train": 0, "dev": n_train, "test": n_train + n_dev}[self.split]
                count = {"train": n_train, "dev": n_dev, "test": n_test}[self.split]
                count = min(count, self.max_variations or count)
                ids += [f"{name}/{v}" for v in range(first, first + count)]
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

    # ------------------------------------------------------------------ episode

    def start(self, task: Task) -> List[Dict[str, Any]]:
        sw = self._checkout()
        self._call(sw.load, task.data["task"], task.data["variation"], self.simplification, True,
                   timeout_s=self.load_timeout_s)
        self._gold = [a for a in sw.get_gold_action_sequence() if a]
        obs, _ = self._call(sw.reset)
        templates = "\n".join(f"- {a}" for a in sw.get_possible_actions() if a != "reset task")
        self.score = 0
        return [
            {"role": "user", "content": INSTRUCTION.format(templates=templates)},
            {"role": "assistant", "content": "OK. I'll follow the format and do my best.", "loss": False},
            {"role": "user", "content": f"{sw.get_task_description()}\n{obs.strip()}"},
        ]

    def act(self, action: str) -> StepResult:
        command = parse_action(action)
        sw = self._backend
        obs = self._call(sw.server.step, command)
        if obs.strip() == NO_MATCH:
            hint = obs.strip()
            if self.valid_action_hints:
                valid = self._call(sw.get_valid_action_object_combinations)
                hint += " Some valid commands now: " + "; ".join(hint_sample(valid, self.max_hints))
            raise InvalidAction(hint)
        self.score = int(round(100 * self._call(sw.server.getScore)))
        done = bool(self._call(sw.server.getCompleted)) or self.score < 0
        reward = max(0.0, min(1.0, self.score / 100.0))
        return StepResult(obs.strip(), reward=reward, done=done,
                          info={"score": self.score, "command": command})

    def expert_action(self) -> str:
        """The next command of the variation's gold action sequence."""
        step = self.turns
        return "Action: " + (self._gold[step] if step < len(self._gold) else "look around")
