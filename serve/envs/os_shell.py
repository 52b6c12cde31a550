"""AgentBench OS interaction as an environment: shell tasks in a per-episode sandbox.

Tasks: AgentBench's OS JSON, unchanged — the dev list (``os_dev.json``, split ``dev``, ids
``"0"``..) or the standard layout (``os_std/{1..7}/*.json``, split ``std``, ids
``std-00N-<file>-<index>``), with the script files they name resolved against the data set's
scripts folder (serve/envs/os_tasks.py has the rules).

An episode follows AgentBench (``src/server/tasks/os_interaction/task.py``, the Oct-2023
version; AgentTuning's ``AgentBench.old`` is the same here): the agent's login shell is opened,
``create.init`` scripts run as independent processes (``bash -c`` / ``python3 -c``, like
``docker exec``), ``start`` is typed into the agent's shell, then the agent answers with
``Act: bash`` + a ```bash block, ``Act: answer(...)`` or ``Act: finish``; command output is cut
at 800 characters (780 kept + a note); 8 rounds. Judging: ``match`` compares the stripped answer
with the string; ``check`` runs its scripts in the same sandbox in order, each given the answer
and the outputs of the earlier ones as arguments (``bash -c code -- answer out1 ...``,
``python3 -c code answer out1 ...``; a ``null`` entry runs ``evaluation.example``), and passes
when every exit code is 0. ``finish`` answers ``None`` (the string "None" for checks).

The scripted expert runs ``evaluation.example`` in the shell and answers its output (check chains
that use the example's output), or says ``finish`` after it (state-changing tasks), or answers
``evaluation.match``.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
from typing import Any, Dict, List, Optional, Tuple

from serve.envs import os_tasks
from serve.envs import sandbox_idmap as idmap
from serve.envs.base import Env, EnvError, InvalidFormat, StepResult, Task, data_file, register
from serve.envs.os_tasks import OSTask, Script
from serve.envs.sandbox import Sandbox, SandboxLimits

log = logging.getLogger(__name__)

# AgentBench's OS instruction and one-shot example (src/server/tasks/os_interaction).
OS_PROMPT = """You are an assistant that will act like a person, I'will play the role of linux(ubuntu) operating system. Your goal is to implement the operations required by me or answer to the question proposed by me. For each of your turn, you should first think what you should do, and then take exact one of the three actions: "bash", "finish" or "answer". 

1. If you think you should execute some bash code, take bash action, and you should print like this:

Think: put your thought here.

Act: bash

```bash
# put your bash code here
```

2. If you think you have finished the task, take finish action, and you should print like this:

Think: put your thought here.

Act: finish

3. If you think you have got the answer to the question, take answer action, and you should print like this:

Think: put your thought here.

Act: answer(Your answer to the question should be put in this pair of parentheses)

If the output is too long, I will truncate it. The truncated output is not complete. You have to deal with the truncating problem by yourself. Attention, your bash code should not contain any input operation. Once again, you should take only exact one of the three actions in each turn.

"""
ONE_SHOT = [
    {"role": "user", "content": 'tell me how many files are in the directory "/etc"?'},
    {"role": "assistant", "content": "Think: To count the files in /etc, I need to print all the files in it.\n\nAct: bash\n\n```bash\nls /etc\n```"},
    {"role": "user", "content": "The output of the OS:\ncpi cron.hourly fuse.conf iproute2 lvm networkd-dispatcher protocols selinux tmpfiles.d [truncated because the output is too long]"},
    {"role": "assistant", "content": "Think: The output has been truncated because it is too long, so I need to count files by script directly.\n\nAct: bash\n\n```bash\nls -1 /etc | wc -l\n```"},
    {"role": "user", "content": "The output of the OS:\n220"},
    {"role": "assistant", "content": "Think: Now I get the answer, it is 220.\n\nAct: answer(220)"},
]
INVALID_FEEDBACK = ("Your response matches none of the actions. Reply with 'Think: ...' and then "
                    "exactly one of: 'Act: bash' with a ```bash code block, 'Act: answer(...)', "
                    "or 'Act: finish'.")
OBS_LIMIT = 800
OBS_KEEP = 780
CHECKERS = os_tasks.NAMED_CHECKERS

_ACT = re.compile(r"Act:\s*(.+)")
_BASH = re.compile(r"```bash\n(.*?)\n```", re.S)


def parse_action(text: str) -> Dict[str, Optional[str]]:
    """AgentBench's extract_action: the LAST valid ``Act:`` line decides."""
    for act in reversed(_ACT.findall(text)):
        low = act.lower()
        if low.startswith("bash"):
            code = "\n\n".join(_BASH.findall(text))
            return {"action": "bash", "content": code}
        if low.startswith("finish"):
            return {"action": "finish", "content": None}
        if low.startswith("answer"):
            content = act[6:].strip()
            left, right = content.find("("), content.rfind(")")
            if left == -1 or right == -1:
                continue
            return {"action": "answer", "content": content[left + 1:right]}
    return {"action": None, "content": None}


_SIZE_UNITS = (("B", 1), ("Byte", 1), ("K", 1 << 10), ("KB", 1 << 10), ("M", 1 << 20),
               ("MB", 1 << 20), ("G", 1 << 30), ("GB", 1 << 30), ("T", 1 << 40), ("TB", 1 << 40),
               ("P", 1 << 50), ("PB", 1 << 50))


def _size(s: str) -> int:
    # size-match.py's rule, quirks included: units tried in this order, integers only (so
    # "4KB" matches "B" first and fails, and du's "4.0K" is not a size)
    s = s.strip()
    for unit, mult in _SIZE_UNITS:
        if s.endswith(unit):
            return int(s[:-len(unit)]) * mult
    return int(s)


def _norm(s: str) -> str:
    return s.replace("\r\n", "\n").replace("\r", "\n").strip()


def check(name: str, answer: str, expected: str) -> bool:
    """AgentBench's named checkers (``check/<name>.py``) evaluated in Python, for code that
    judges outside a sandbox (pipelines.derive); episodes run the real scripts."""
    a, e = (answer or ""), (expected or "")
    try:
        if name == "integer-match":
            return int(a) == int(e)
        if name == "string-match":
            return _norm(a) == _norm(e)
        if name == "size-match":
            return _size(a) == _size(e)
        if name == "containing":
            return _norm(e) in _norm(a)
        if name == "in":
            return _norm(a) in _norm(e)
    except ValueError:
        return False
    raise EnvError(f"unknown checker {name!r}")


def _as_bash(script: Script) -> str:
    """Shell code that runs ``script`` in the agent's shell (the expert's bash action)."""
    if script.language == "python":
        return f"python3 -c {shlex.quote(script.code)}"
    return script.code


@register("os_interaction")
@register("os")
class OSEnv(Env):
    """AgentBench OS interaction. Options: ``split`` (default: ``std`` for the numbered layout,
    else ``dev``), ``scripts_dir`` (see os_tasks), ``uid_mode`` (auto | range | subid | single,
    see sandbox_idmap), ``command_timeout`` (s per agent command), ``script_timeout`` (s per
    init/check/example script), ``workdir`` (``/`` as in AgentBench's images; ``/root`` as
    the 2025 AgentBench), and the sandbox limits ``disk_mb``, ``memory_mb``, ``nproc``,
    ``cpu_s``."""

    default_max_turns = 8
    episode_attrs = ("box",)

    def __init__(self, path: Optional[str] = None, *, command_timeout: float = 10.0,
                 split: Optional[str] = None, scripts_dir: Optional[str] = None,
                 uid_mode: str = "auto", script_timeout: float = 60.0, disk_mb: int = 128,
                 memory_mb: int = 1024, nproc: int = 256, cpu_s: int = 120,
                 workdir: str = "/", **options: Any) -> None:
        if uid_mode not in idmap.MODES:
            raise EnvError(f"os: option 'uid_mode' must be one of {', '.join(idmap.MODES)}, "
                           f"got {uid_mode!r}")
        if workdir not in ("/", "/root"):
            raise EnvError(f"os: option 'workdir' must be '/' (AgentBench's images, the paper) or "
                           f"'/root' (AgentBench 2025), got {workdir!r}")
        self.workdir = workdir
        self.split_name = split
        self.scripts_dir = scripts_dir
        self.uid_mode = uid_mode
        self.command_timeout = float(command_timeout)
        self.script_timeout = float(script_timeout)
        self.limits = SandboxLimits(disk_mb=disk_mb, memory_mb=memory_mb, nproc=nproc, cpu_s=cpu_s)
        self.specs: Dict[str, OSTask] = {}
        self.id_plan: Optional[idmap.IdPlan] = None
        super().__init__(path, **options)
        self.box: Optional[Sandbox] = None

    # ------------------------------------------------------------------ tasks

    def load_tasks(self, path: Optional[str]) -> List[Task]:
        path = path or data_file("agentbench/os_dev.json")
        if not os.path.exists(path):
            raise EnvError(f"os: task path {path} does not exist")
        if self.scripts_dir is not None and not os.path.isdir(self.scripts_dir):
            raise EnvError(f"os: option 'scripts_dir' {self.scripts_dir} is not a directory")
        try:
            self.id_plan = idmap.resolve(self.uid_mode)
        except ValueError as exc:
            raise EnvError(f"os: {exc}") from None
        tasks = []
        try:
            for tid, rec, spec, reason, src in os_tasks.iter_tasks(path, self.scripts_dir):
                if spec is not None and not self.id_plan.multi_uid:
                    cmds = os_tasks.multi_uid_commands(spec)
                    if cmds:
                        reason = (f"needs users other than root ({', '.join(cmds)}), but the "
                                  f"sandbox maps a single uid here: {self.id_plan.note}")
                if reason:
                    self.skip(tid, reason)
                else:
                    self.specs[tid] = spec
                tasks.append(Task(tid, rec, self.split_name or ("std" if src.folder else "dev")))
        except (OSError, ValueError) as exc:
            raise EnvError(f"os: cannot read tasks from {path}: {exc}") from None
        return tasks

    # ------------------------------------------------------------------ episode

    def _new_box(self, spec: OSTask) -> Sandbox:
        box = Sandbox(self.limits, uid_mode=self.uid_mode, writable=os_tasks.usr_files(spec),
                      workdir=self.workdir)
        try:
            for script in spec.init:  # AgentBench runs them and ignores how they end
                rep = box.run(script.code, timeout=self.script_timeout, lang=script.language)
                if rep["rc"] != 0:
                    log.debug("os: init script (%s) ended with %s: %s", script.source,
                              rep["rc"], rep["stderr"][-500:])
            if spec.start is not None:
                box.start(_as_bash(spec.start), timeout=self.command_timeout)
        except BaseException:
            box.close()
            raise
        return box

    def start(self, task: Task) -> List[Dict[str, Any]]:
        self.spec = self.specs[task.id]
        self.box = self._new_box(self.spec)
        self._last_output: Optional[str] = None
        return [
            {"role": "user", "content": OS_PROMPT + "Now, my problem is:\n\n" + ONE_SHOT[0]["content"]},
            *[dict(m, loss=False) if m["role"] == "assistant" else dict(m) for m in ONE_SHOT[1:]],
            {"role": "user", "content": "Now, I will start a new problem in a new OS. My problem is:\n\n"
                                        + self.spec.description},
        ]

    def act(self, action: str) -> StepResult:
        parsed = parse_action(action)
        if parsed["action"] is None:
            raise InvalidFormat(INVALID_FEEDBACK)
        if parsed["action"] == "bash":
            code = parsed["content"] or ""
            # AgentBench sends even an empty block to its shell; that prints nothing.
            rep = (self.box.shell(code, timeout=self.command_timeout) if code.strip()
                   else {"output": "", "timed_out": False})
            out = rep["output"].replace("\r\n", "\n")
            if rep.get("timed_out"):
                out += f"\n[command timed out after {self.command_timeout:g}s and was killed]"
            self._last_output = out
            if len(out) > OBS_LIMIT:
                out = out[:OBS_KEEP] + "\n[truncated because the output is too long]"
            obs = f"The output of the OS:\n\n{out}" if out else "The output of the OS is empty."
            return StepResult(obs, info={"timed_out": bool(rep.get("timed_out"))})
        ok, info = self._judge(parsed["content"])
        return StepResult("", reward=1.0 if ok else 0.0, done=True, info=info)

    def _judge(self, answer: Optional[str]) -> Tuple[bool, Dict[str, Any]]:
        """AgentBench's judgement of ``answer`` (None after ``finish``)."""
        spec = self.spec
        info: Dict[str, Any] = {"answer": answer}
        if spec.match is not None:
            if isinstance(answer, str) and spec.match.get("strip"):
                answer = answer.strip()
            if "answer" in spec.match:
                info["expected"] = spec.match["answer"]
                return answer == spec.match["answer"], info
            info["expected"] = f"regex {spec.match['regex']}"
            return isinstance(answer, str) and re.search(spec.match["regex"], answer) is not None, info
        params = [str(answer)]
        info["checks"] = []
        for script in spec.check or []:
            is_example = script is None
            script = spec.example if script is None else script
            rep = self.box.run(script.code, timeout=self.script_timeout, args=params,
                               lang=script.language, merge=True)  # docker exec: both streams
            info["checks"].append({"source": "example" if is_example else script.source,
                                   "rc": rep["rc"], "output": rep["output"][-500:]})
            if is_example:
                info["expected"] = rep["output"]
            if rep["rc"] != 0:
                return False, info
            params.append(rep["output"])
        return True, info

    def expected_output(self) -> str:
        """``evaluation.example``'s output in the running episode's sandbox (what a check chain's
        ``null`` entry compares the answer with)."""
        if self.current is None or self.box is None or self.spec.example is None:
            raise EnvError("os: expected_output() needs a running episode of a task with an example")
        ex = self.spec.example
        return self.box.run(ex.code, timeout=self.script_timeout, lang=ex.language, merge=True)["output"]

    def expert_action(self) -> str:
        if self.current is None:
            raise EnvError("os: expert_action() needs a running episode")
        spec = self.spec
        if spec.match is not None and "answer" in spec.match:
            return f"Think: I know the answer.\n\nAct: answer({spec.match['answer']})"
        if spec.example is None:
            raise EnvError(f"os: task {self.current.id} has neither an example nor a match "
                           "answer: no scripted expert")
        if self.turns == 0:
            return (f"Think: I will do it with a command.\n\nAct: bash\n\n```bash\n"
                    f"{_as_bash(spec.example)}\n```")
        out = (self._last_output or "").strip()
        if spec.check is not None and None not in spec.check and (not out or "\n" in out):
            # a task that changes the system; a one-line output is still answered, since its
            # checks may read the answer (std-004-Q47: the path of the file it moved)
            return "Think: The command made the change.\n\nAct: finish"
        return f"Think: The output gives the answer.\n\nAct: answer({out})"
