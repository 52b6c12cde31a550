"""Loading AgentBench OS-interaction tasks: files, folder layouts, ids, script files.

Follows AgentBench's loader (THUDM/AgentBench ``src/server/tasks/os_interaction/task.py``
``_load_configs``, the same in AgentTuning's ``AgentBench.old/src/tasks/os_interaction``):

* a script is a string (bash code), ``{"code": ..., "language": ...}`` or ``{"file": ...,
  "language": ...}`` (language defaults to bash); ``file`` is relative to the data set's
  scripts folder and is read when the tasks are loaded;
* ``create.init`` is one script or a list; ``start`` one script; ``evaluation.match`` a string
  (compared after stripping the answer) or ``{"answer"|"regex": ..., "strip": bool}``;
  ``evaluation.check`` one script or a chain whose ``null`` entries stand for
  ``evaluation.example``; ``match`` wins when both are present, and ``example`` is only kept
  for check tasks (as in AgentBench; the scripted expert uses it otherwise too).

Accepted paths: a JSON file holding a list of tasks (or one task object) or a JSONL file
(``os_dev.json``), or a directory in AgentBench's standard layout: numbered folders
(``os_std/1`` .. ``os_std/7``) each holding ``*.json``, or one such numbered folder.

Task ids: a file outside a numbered folder gives ids ``"0"``, ``"1"``, ... (index in the file;
the dev split's ids). A file inside numbered folder N gives AgentBench's own sample names,
``std-00N-<file stem>-<index:05d>`` (e.g. ``std-004-N41-00002``), stable when files are added.

Scripts folder (AgentBench's ``script_dir``): the ``scripts_dir`` option, which for a directory
of numbered folders holds one script folder per number, and otherwise is the script folder
itself; else found beside the data set: ``os_scripts/<key>`` or ``scripts/<key>`` in the data
set's folder or its parent, where key is the numbered folder (``os_std/3`` → ``os_scripts/3``)
or the file's stem without ``os_`` (``os_dev.json`` → ``os_scripts/dev``; AgentBench's
``data/dev.json`` → ``scripts/dev``). AgentBench's five named checkers
(``check/integer-match.py`` ...) not present there resolve to the copies shipped in
``data/agentbench/os_scripts/dev/check`` so task files written elsewhere (pipelines.derive)
work. A task naming a file that is missing is skipped with the reason.
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

from agenttuning import paths

LANGUAGES = ("bash", "python")
NAMED_CHECKERS = ("integer-match", "string-match", "size-match", "containing", "in")


class RecordError(ValueError):
    """A record that cannot run; the message is the skip reason."""


@dataclass(frozen=True)
class Script:
    """One resolved script: its language and code; ``source`` says where it came from."""

    language: str
    code: str
    source: str = "inline"


@dataclass
class OSTask:
    """A resolved AgentBench OS task (AgentBench's JudgeConfig)."""

    description: str
    init: List[Script] = field(default_factory=list)
    start: Optional[Script] = None
    match: Optional[Dict[str, Any]] = None
    check: Optional[List[Optional[Script]]] = None
    example: Optional[Script] = None
    image: str = "default"
    file: str = ""
    index: int = 0

    def scripts(self) -> List[Script]:
        """Every script of the task (init, start, check chain, example)."""
        out = list(self.init) + [s for s in (self.start, self.example) if s is not None]
        return out + [s for s in (self.check or []) if s is not None]


@dataclass
class Source:
    """One task file and where its script files live."""

    path: str
    scripts_dir: Optional[str]
    looked_in: Tuple[str, ...]
    folder: Optional[str]  # the numbered folder (std layout) or None


def _numbered(name: str) -> bool:
    return name.isdigit()


def _task_files(folder: str) -> List[str]:
    return sorted(f for f in glob.glob(os.path.join(folder, "*"))
                  if f.endswith((".json", ".jsonl")) and os.path.isfile(f))


def _beside(root: str, key: str) -> List[str]:
    parent = os.path.dirname(root)
    return [os.path.join(d, name, key) for d in (root, parent) for name in ("os_scripts", "scripts")]


def sources(path: str, scripts_dir: Optional[str] = None) -> List[Source]:
    """The task files ``path`` stands for, each with its scripts folder (see module doc)."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        if _numbered(os.path.basename(path)):
            folders = [path]
        else:
            folders = sorted((os.path.join(path, d) for d in os.listdir(path)
                              if _numbered(d) and os.path.isdir(os.path.join(path, d))),
                             key=lambda d: int(os.path.basename(d)))
        out = []
        for folder in folders:
            num = os.path.basename(folder)
            if scripts_dir is not None:
                cands = [scripts_dir if folder == path else os.path.join(scripts_dir, num)]
            else:
                cands = _beside(os.path.dirname(folder), num)
            found = next((c for c in cands if os.path.isdir(c)), None)
            out += [Source(f, found, tuple(cands), num) for f in _task_files(folder)]
        return out
    folder = os.path.basename(os.path.dirname(path))
    if scripts_dir is not None:
        cands = [scripts_dir]
    elif _numbered(folder):
        cands = _beside(os.path.dirname(os.path.dirname(path)), folder)
    else:
        stem = os.path.splitext(os.path.basename(path))[0]
        cands = _beside(os.path.dirname(path), stem[3:] if stem.startswith("os_") else stem)
    found = next((c for c in cands if os.path.isdir(c)), None)
    return [Source(path, found, tuple(cands), folder if _numbered(folder) else None)]


def read_records(path: str) -> List[Any]:
    """Records of one task file: a JSON list, one JSON object, or JSONL (AgentBench accepts all
    three); ValueError naming the file otherwise."""
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        data = json.load(f)
    if isinstance(data, dict):
        return [data]
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a JSON list of tasks or one task object")
    return data


def task_id(src: Source, index: int) -> str:
    """Stable id of record ``index`` of ``src`` (module doc)."""
    if src.folder is None:
        return str(index)
    stem = os.path.splitext(os.path.basename(src.path))[0]
    return f"std-{int(src.folder):03d}-{stem}-{index:05d}"


def _shipped_checker(rel: str) -> Optional[str]:
    stem, ext = os.path.splitext(os.path.basename(rel))
    if os.path.dirname(rel).strip("/") != "check" or ext != ".py" or stem not in NAMED_CHECKERS:
        return None
    try:
        return paths.data_file(f"agentbench/os_scripts/dev/check/{stem}.py")
    except paths.DataFileMissing:
        return None


def load_script(obj: Any, src: Source, what: str) -> Script:
    """AgentBench's load_script: str → bash code; {"code"|"file", "language"}."""
    if isinstance(obj, str):
        return Script("bash", obj)
    if not isinstance(obj, dict):
        raise RecordError(f"{what} must be a string or an object with 'code' or 'file', got {obj!r}")
    language = obj.get("language", "bash")
    if language not in LANGUAGES:
        raise RecordError(f"{what} is in language {language!r}; supported: {', '.join(LANGUAGES)}")
    if isinstance(obj.get("file"), str):
        rel = obj["file"]
        cands = [os.path.join(src.scripts_dir, rel)] if src.scripts_dir else []
        shipped = _shipped_checker(rel)
        cands += [shipped] if shipped else []
        for cand in cands:
            if os.path.isfile(cand):
                with open(cand, encoding="utf-8") as f:
                    return Script(language, f.read(), cand)
        where = (f"in {src.scripts_dir}" if src.scripts_dir else
                 f"(no scripts folder for {src.path}: looked in {', '.join(src.looked_in)}; "
                 f"pass the option scripts_dir)")
        raise RecordError(f"{what} file {rel!r} not found {where}")
    if isinstance(obj.get("code"), str):
        return Script(language, obj["code"])
    raise RecordError(f"{what} needs 'code' or 'file', got {json.dumps(obj)[:200]}")


def resolve(rec: Any, src: Source, index: int) -> OSTask:
    """The runnable task of record ``rec``; RecordError (the skip reason) if it cannot run."""
    if not isinstance(rec, dict):
        raise RecordError("record is not an object")
    if not isinstance(rec.get("description"), str):
        raise RecordError("missing field 'description'")
    ev = rec.get("evaluation")
    if not isinstance(ev, dict) or not ("match" in ev or "check" in ev):
        raise RecordError("field 'evaluation' needs 'match' or 'check'")
    task = OSTask(rec["description"], file=src.path, index=index)
    create = rec.get("create")
    # AgentBench reads create.init only from an object; a malformed list (two records have one)
    # means no init, exactly as there.
    if isinstance(create, dict):
        task.image = str(create.get("local", create.get("image", "default")))
        init = create.get("init")
        if init is not None:
            items = init if isinstance(init, list) else [init]
            task.init = [load_script(s, src, "create.init") for s in items]
    if rec.get("start") is not None:
        task.start = load_script(rec["start"], src, "start")
    if "match" in ev:
        m = ev["match"]
        task.match = {"answer": m, "strip": True} if isinstance(m, str) else m
        if not isinstance(task.match, dict) or not ("answer" in task.match or "regex" in task.match):
            raise RecordError("evaluation.match must be a string or an object with 'answer' or 'regex'")
    else:
        chain = ev["check"] if isinstance(ev["check"], list) else [ev["check"]]
        task.check = [None if s is None else load_script(s, src, "evaluation.check") for s in chain]
    if ev.get("example") is not None:
        try:
            task.example = load_script(ev["example"], src, "evaluation.example")
        except RecordError:
            if task.check is not None:  # AgentBench reads the example of check tasks only
                raise
    if task.check is not None and None in task.check and task.example is None:
        raise RecordError("evaluation.check has a null entry (the example's output) but there "
                          "is no evaluation.example")
    return task


# Commands that need users other than root inside the sandbox (single-uid mode cannot run them).
MULTI_UID = re.compile(r"(?<![\w/.-])(useradd|adduser|userdel|deluser|usermod|groupadd|addgroup|"
                       r"groupdel|groupmod|gpasswd|newgrp|chown|chgrp|runuser|su|sudo\s+-u)(?![\w.-])")


def multi_uid_commands(task: OSTask) -> List[str]:
    """The commands of the task's own scripts that switch to or create other users/groups."""
    found: Dict[str, None] = {}
    for s in task.scripts():
        for m in MULTI_UID.finditer(s.code):
            found[re.sub(r"\s+", " ", m.group(1))] = None
    return list(found)


USR_PATH = re.compile(r"/usr/[A-Za-z0-9_.+/-]+")


def usr_files(task: OSTask) -> List[str]:
    """Files under /usr that the task's scripts name (they must be changeable in the sandbox)."""
    out: Dict[str, None] = {}
    for s in task.scripts():
        for p in USR_PATH.findall(s.code):
            p = p.rstrip("/.")
            if os.path.isfile(p):
                out[p] = None
    return list(out)


def iter_tasks(path: str, scripts_dir: Optional[str] = None
               ) -> Iterator[Tuple[str, Any, Optional[OSTask], Optional[str], Source]]:
    """(task id, raw record, resolved task or None, skip reason or None, source) per record."""
    srcs = sources(path, scripts_dir)
    if not srcs:
        raise ValueError(f"no task files (*.json, *.jsonl) under {path}")
    for src in srcs:
        for i, rec in enumerate(read_records(src.path)):
            try:
                yield task_id(src, i), rec, resolve(rec, src, i), None, src
            except RecordError as exc:
                yield task_id(src, i), rec, None, str(exc), src
