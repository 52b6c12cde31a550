"""AgentBench OS interaction as an environment: shell tasks in a per-episode sandbox.

Task file: AgentBench's OS JSON (a list of tasks, e.g. ``os_dev.json``), unchanged. Per task:
``create.init`` (code, run first), ``start`` (a background program), ``description`` (the
question), ``evaluation`` with ``match`` (exact answer) or ``check`` (a chain; a ``null`` first
entry means "run ``evaluation.example`` in a fresh copy of the environment and take its output as
the expected answer"; named checkers integer-match, string-match, size-match, containing, in).
Tasks naming script files (``{"file": ...}``) that are not available next to the task file are
skipped with the reason. Agent turns follow AgentBench: ``Act: bash`` + a ```bash block,
``Act: answer(...)`` or ``Act: finish``; output is truncated at 800 characters. The sandbox
(serve/envs/sandbox.py) gives each episode its own root filesystem, no network, and limits.

The scripted expert runs ``evaluation.example`` and answers with its output (check tasks), or
answers ``evaluation.match`` (match tasks).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Dict, List, Optional

from serve.envs.base import Env, EnvError, InvalidFormat, StepResult, Task, data_file, read_json, register
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
CHECKERS = ("integer-match", "string-match", "size-match", "containing", "in")

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


_SIZE = re.compile(r"^\s*([\d.]+)\s*([KMGT]?)(I?B?)?\s*$", re.I)


def _size(s: str) -> float:
    m = _SIZE.match(s)
    if not m:
        raise ValueError(f"not a size: {s!r}")
    return float(m.group(1)) * 1024 ** "BKMGT".index((m.group(2) or "B").upper())


def check(name: str, answer: str, expected: str) -> bool:
    """AgentBench's named checkers (check/<name>.py), as Python."""
    a, e = (answer or ""), (expected or "")
    try:
        if name == "integer-match":
            return int(a.strip()) == int(e.strip())
        if name == "string-match":
            norm = lambda s: s.replace("\r\n", "\n").strip()  # noqa: E731
            return norm(a) == norm(e)
        if name == "size-match":
            return abs(_size(a) - _size(e)) < 1e-9
        if name == "containing":
            return e.strip() in a.strip()
        if name == "in":
            return a.strip() in e.strip()
    except ValueError:
        return False
    raise EnvError(f"unknown checker {name!r}")


def _code(spec: Any) -> Optional[str]:
    """Inline code of an init/example entry: a string, or {"code": ...}; None otherwise."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, dict) and isinstance(spec.get("code"), str):
        return spec["code"]
    return None


def _checker_name(entry: Any) -> Optional[str]:
    if isinstance(entry, dict) and isinstance(entry.get("file"), str):
        stem = os.path.splitext(os.path.basename(entry["file"]))[0]
        return stem if stem in CHECKERS else None
    return None


@register("os_interaction")
@register("os")
class OSEnv(Env):
    """AgentBench OS interaction. Options: ``command_timeout`` (s per agent command) and the
    sandbox limits ``disk_mb``, ``memory_mb``, ``nproc``, ``cpu_s``."""

    default_max_turns = 8
    episode_attrs = ("box",)

    def __init__(self, path: Optional[str] = None, *, command_timeout: float = 10.0,
                 split: str = "dev", disk_mb: int = 128, memory_mb: int = 1024, nproc: int = 256,
                 cpu_s: int = 120, **options: Any) -> None:
        self.split_name = split
        self.command_timeout = float(command_timeout)
        self.limits = SandboxLimits(disk_mb=disk_mb, memory_mb=memory_mb, nproc=nproc, cpu_s=cpu_s)
        super().__init__(path, **options)
        self.box: Optional[Sandbox] = None

    # ------------------------------------------------------------------ tasks

    def load_tasks(self, path: Optional[str]) -> List[Task]:
        path = path or data_file("agentbench/os_dev.json")
        records = read_json(path, "os", "task file")
        if not isinstance(records, list):
            raise EnvError(f"os: {path} must hold a JSON list of tasks")
        tasks = []
        for i, rec in enumerate(records):
            tid = str(i)
            problem = self._check_record(rec)
            if problem:
                self.skip(tid, problem)
            tasks.append(Task(tid, rec, self.split_name))
        return tasks

    @staticmethod
    def _check_record(rec: Any) -> Optional[str]:
        if not isinstance(rec, dict):
            return "record is not an object"
        if not isinstance(rec.get("description"), str):
            return "missing field 'description'"
        ev = rec.get("evaluation")
        if not isinstance(ev, dict) or not ("match" in ev or "check" in ev):
            return "field 'evaluation' needs 'match' or 'check'"
        create = rec.get("create") if isinstance(rec.get("create"), dict) else {}
        init = create.get("init")
        if init is not None and _code(init) is None:
            return f"init script file {init.get('file') if isinstance(init, dict) else init!r} is not available"
        if "check" in ev:
            chain = ev["check"] if isinstance(ev["check"], list) else [ev["check"]]
            for entry in chain:
                if entry is None:
                    if _code(ev.get("example")) is None:
                        return f"example script {ev.get('example')!r} is not available"
                elif _checker_name(entry) is None:
                    return f"check script {entry.get('file') if isinstance(entry, dict) else entry!r} is not available"
        return None

    # ------------------------------------------------------------------ episode

    def _new_box(self, task: Task) -> Sandbox:
        rec = task.data
        box = Sandbox(self.limits)
        try:
            create = rec.get("create") if isinstance(rec.get("create"), dict) else {}
            init = _code(create.get("init"))
            if init:
                box.run(init, timeout=60.0)
            if isinstance(rec.get("start"), str):
                box.start(rec["start"])
        except BaseException:
            box.close()
            raise
        return box

    def start(self, task: Task) -> List[Dict[str, Any]]:
        self.box = self._new_box(task)
        self.expected: Optional[str] = None
        return [
            {"role": "user", "content": OS_PROMPT + "Now, my problem is:\n\n" + ONE_SHOT[0]["content"]},
            *[dict(m, loss=False) if m["role"] == "assistant" else dict(m) for m in ONE_SHOT[1:]],
            {"role": "user", "content": "Now, I will start a new problem in a new OS. My problem is:\n\n"
                                        + task.data["description"]},
        ]

    def act(self, action: str) -> StepResult:
        parsed = parse_action(action)
        if parsed["action"] is None:
            raise InvalidFormat(INVALID_FEEDBACK)
        if parsed["action"] == "bash":
            if not (parsed["content"] or "").strip():
                raise InvalidFormat(INVALID_FEEDBACK)
            rep = self.box.shell(parsed["content"], timeout=self.command_timeout)
            out = rep["output"].replace("\r\n", "\n")
            if rep.get("timed_out"):
                out += f"\n[command timed out after {self.command_timeout:g}s and was killed]"
            if len(out) > OBS_LIMIT:
                out = out[:OBS_LIMIT - 20] + "\n[truncated because the output is too long]"
            obs = f"The output of the OS:\n\n{out}" if out else "The output of the OS is empty."
            return StepResult(obs, info={"timed_out": bool(rep.get("timed_out"))})
        answer = parsed["content"]
        ok, info = self._judge(answer)
        return StepResult("", reward=1.0 if ok else 0.0, done=True, info=info)

    def _judge(self, answer: Optional[str]) -> tuple:
        ev = self.current.data["evaluation"]
        info: Dict[str, Any] = {"answer": answer}
        if "match" in ev:
            info["expected"] = ev["match"]
            return answer is not None and answer.strip() == str(ev["match"]).strip(), info
        chain = ev["check"] if isinstance(ev["check"], list) else [ev["check"]]
        params = [str(answer)]
        for entry in chain:
            if entry is None:
                params.append(self.expected_output())
                info["expected"] = params[-1]
            elif not check(_checker_name(entry), params[0], params[-1]):
                return False, info
        return True, info

    def expected_output(self) -> str:
        """``evaluation.example`` run in a fresh copy of the task's environment (cached)."""
        if self.expected is None:
            box = self._new_box(self.current)
            try:
                rep = box.run(_code(self.current.data["evaluation"]["example"]), timeout=60.0)
            finally:
                box.close()
            self.expected = rep["output"]
        return self.expected

    def expert_action(self) -> str:
        if self.current is None:
            raise EnvError("os: expert_action() needs a running episode")
        ev = self.current.data["evaluation"]
        if "match" in ev:
            return f"Think: I know the answer.\n\nAct: answer({ev['match']})"
        example = _code(ev.get("example"))
        if self.turns == 0:
            return f"Think: I will compute it with a command.\n\nAct: bash\n\n```bash\n{example}\n```"
        out = self.last.observation if self.last else ""
        out = out.split("The output of the OS:\n\n", 1)[-1].strip()
        if out == "The output of the OS is empty.":
            out = ""
        return f"Think: The output gives the answer.\n\nAct: answer({out})"
