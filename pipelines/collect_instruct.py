"""Instructions of the collect job, per task: the environment's own tasks (any split, e.g. ALFWorld
train games), task derivation (``pipelines.derive``), or self-instruct by the teacher.

Self-instruct: the teacher (an OpenAI-compatible endpoint, called with the rollout code's
``OpenAIPolicy``, so the same retries/backoff apply) proposes a task with a reference solution
and a checker as JSON. Every candidate is validated by running its reference solution in the
environment (OS: in the sandbox, after the task's init script; DB: the gold SQL on the DB
backend) before use; invalid ones are counted and written, with the reason, to
``<output_dir>/instructions/<task>.rejects.jsonl``, never used.
"""

import asyncio
import dataclasses
import json
import logging
import os
import random
import re
from typing import Any, Dict, List, Set

from agenttuning.config import ConfigError
from agenttuning.schema import PolicyConfig
from agenttuning.sources import iter_text
from pipelines import derive
from serve.envs import available, canonical
from serve.envs.db import backend_running, get_backend, shutdown_backends
from serve.rollout import OpenAIPolicy, PolicySpec, TeacherError

log = logging.getLogger(__name__)

OS_SELF_INSTRUCT = """Propose one new, self-contained Linux shell task for an agent benchmark, different from these examples:
{examples}
Reply with ONLY a JSON object with the keys:
"description": the question asked of the agent (one or two sentences),
"init": a bash script that sets up the files the question is about (no network),
"solution": a bash script whose printed output is exactly the answer,
"checker": "integer-match" if the answer is an integer, else "string-match"."""

DB_SELF_INSTRUCT = """Here is a database table named `{table}` with the columns {columns}. Some rows:
{rows}
Propose one new question about this table that one MySQL statement answers (a SELECT), or a request to change it (INSERT, UPDATE or DELETE).
Reply with ONLY a JSON object with the keys "description" (the question or request), "sql" (the MySQL statement, one line) and "type" (SELECT, INSERT, UPDATE or DELETE)."""


def eval_questions(paths: List[str]) -> Set[str]:
    """Every string of the evaluation files, normalised: no derived question may equal one."""

    return {derive.norm_question(t) for t in iter_text(expand_paths(paths))}


def expand_paths(paths: List[str]) -> List[str]:
    """Files named directly or found under directories (json/jsonl/txt); ValueError if missing."""
    files: List[str] = []
    for p in paths:
        if os.path.isdir(p):
            files += sorted(os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs
                            if f.endswith((".json", ".jsonl", ".txt")))
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise ValueError(f"config key 'collect.decontamination.paths': {p} does not exist")
    return files


def check_tasks(tasks: Any) -> None:
    """Before any work: each task names a known environment, and the instruction kind exists for it."""
    for i, task in enumerate(tasks):
        k = f"collect.tasks.{i}"
        env = canonical(task.env)
        if env not in available() and ":" not in task.env:
            raise ConfigError(f"config key '{k}.env': unknown environment {task.env!r}; known: {', '.join(available())}")
        kind = task.instructions.kind
        if kind == "derive" and env not in ("db", "os"):
            raise ConfigError(f"config key '{k}.instructions.kind': derive exists for the db and os environments, "
                              f"not {task.env!r}")
        if kind != "env" and env == "db" and not task.instructions.source:
            raise ConfigError(f"config key '{k}.instructions.source': db derivation/self-instruct needs a "
                              "DBBench jsonl whose tables it reuses")


def prepare(task: Any, teacher: PolicyConfig, out_dir: str, exclude: Set[str]) -> Dict[str, Any]:
    """The task file and split the rollout deployment will load for ``task`` and generation
    counts: ``{"path", "split", "generated": {...}}``."""
    had_server = backend_running("mariadb")
    try:
        return _prepare(task, teacher, out_dir, exclude)
    finally:
        if not had_server:  # a MariaDB server started here for gold answers is not needed any more
            shutdown_backends()


def _prepare(task: Any, teacher: PolicyConfig, out_dir: str, exclude: Set[str]) -> Dict[str, Any]:
    ins = task.instructions
    for key in ("source", "path"):
        if ins[key] and not os.path.isfile(ins[key]):
            raise ValueError(f"collect task {task.name!r}: config key 'instructions.{key}': {ins[key]} does not exist")
    inst_dir = os.path.join(out_dir, "instructions")
    os.makedirs(inst_dir, exist_ok=True)
    opts = dict(task.options or {})
    db = canonical(task.env) == "db"
    if ins.kind == "env":
        return {"path": ins.path or task.path, "split": ins.split, "generated": {}}
    if ins.kind == "derive":
        if db:
            path = os.path.join(inst_dir, f"{task.name}.jsonl")
            stats = derive.derive_db(ins.source, path, ins.per_table, ins.seed, opts.get("backend", "auto"), exclude)
        else:
            path = os.path.join(inst_dir, f"{task.name}.json")
            stats = derive.generate_os(path, ins.n, ins.seed, True, opts, exclude)
        return {"path": path, "split": None, "generated": stats}

    # Diverse candidates: sample at a temperature of at least 0.7.
    policy = OpenAIPolicy(PolicySpec(dataclasses.replace(teacher, temperature=max(0.7, teacher.temperature))))
    ext = "jsonl" if db else "json"
    path = os.path.join(inst_dir, f"{task.name}.{ext}")
    rejects = os.path.join(inst_dir, f"{task.name}.rejects.jsonl")
    stats = asyncio.run(_self_instruct(policy, task, path, rejects, exclude))
    return {"path": path, "split": None, "generated": stats}


def _parse_json(text: str) -> Dict[str, Any]:
    m = re.search(r"\{.*\}", text, re.S)
    if not m:
        raise ValueError("no JSON object in the reply")
    obj = json.loads(m.group(0))
    if not isinstance(obj, dict):
        raise ValueError("the reply's JSON is not an object")
    return obj


async def _self_instruct(policy: Any, task: Any, path: str, rejects_path: str, exclude: Set[str]) -> Dict[str, Any]:
    """Ask the teacher for ``instructions.n`` candidates, validate each, write valid ones."""

    ins, db = task.instructions, canonical(task.env) == "db"
    rng = random.Random(f"self|{ins.seed}")
    tables = derive.read_tables(ins.source)[0] if db else []
    backend = str((task.options or {}).get("backend", "auto"))
    if db and not tables:
        raise ValueError(f"collect task {task.name!r}: no usable table in {ins.source}")
    stats = {"candidates": 0, "teacher_error": 0, "invalid": 0, "excluded": 0, "written": 0,
             "tokens_in": 0, "tokens_out": 0}
    seen = set(exclude)
    good: List[Dict[str, Any]] = []
    with open(rejects_path, "w", encoding="utf-8") as rej:
        for k in range(ins.n):
            tb = rng.choice(tables) if db else None
            if db:
                rows = "\n".join(str(r) for r in tb.rows[:5])
                prompt = DB_SELF_INSTRUCT.format(table=tb.name, columns=", ".join(tb.cols), rows=rows)
            else:
                examples = "\n".join(f"- {t['description']}" for t in good[-3:]) or "- How many files are in /etc?"
                prompt = OS_SELF_INSTRUCT.format(examples=examples)
            stats["candidates"] += 1
            try:
                text, usage = await policy._complete_usage([{"role": "user", "content": prompt}])
            except TeacherError as exc:
                stats["teacher_error"] += 1
                rej.write(json.dumps({"candidate": k, "reason": f"teacher_error: {exc}"}) + "\n")
                continue
            stats["tokens_in"] += int(usage.get("prompt_tokens", 0))
            stats["tokens_out"] += int(usage.get("completion_tokens", 0))
            try:
                obj = _parse_json(text)
                rec = _db_candidate(obj, tb, backend) if db else _os_candidate(obj)
                if derive.norm_question(rec["description"]) in seen:
                    stats["excluded"] += 1
                    raise ValueError("equals an evaluation or earlier question")
            except (ValueError, KeyError, TypeError) as exc:
                stats["invalid"] += 1
                rej.write(json.dumps({"candidate": k, "reason": str(exc)[:300], "reply": text[:2000]},
                                     ensure_ascii=False) + "\n")
                continue
            seen.add(derive.norm_question(rec["description"]))
            good.append(rec)
    if not db and good:  # OS: validate all reference solutions in the sandbox in one pass
        outs = derive.run_references(good, dict(task.options or {}))
        valid = []
        with open(rejects_path, "a", encoding="utf-8") as rej:
            for rec, out in zip(good, outs):
                if out and out.strip():
                    valid.append(rec)
                else:
                    stats["invalid"] += 1
                    rej.write(json.dumps({"reason": "reference solution gave no output in the sandbox",
                                          "task": rec}, ensure_ascii=False) + "\n")
        good = valid
    with open(path, "w", encoding="utf-8") as f:
        if db:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in good)
        else:
            json.dump(good, f, ensure_ascii=False, indent=1)
    stats["written"] = len(good)
    log.info("self-instruct %s: %s", task.name, stats)
    return stats


def _os_candidate(obj: Dict[str, Any]) -> Dict[str, Any]:
    for key in ("description", "init", "solution"):
        if not isinstance(obj.get(key), str) or not obj[key].strip():
            raise ValueError(f"field {key!r} missing or empty")
    checker = obj.get("checker") if obj.get("checker") in ("integer-match", "string-match") else "string-match"
    return derive.os_task(obj["description"].strip(), obj["init"], obj["solution"], checker)


def _db_candidate(obj: Dict[str, Any], tb: Any, backend: str) -> Dict[str, Any]:

    desc, sql = obj.get("description"), obj.get("sql")
    if not isinstance(desc, str) or not desc.strip() or not isinstance(sql, str) or not sql.strip():
        raise ValueError("fields 'description' and 'sql' must be non-empty strings")
    kind = str(obj.get("type") or sql.split()[0]).upper()
    if kind not in ("SELECT", *derive.MODIFY):
        raise ValueError(f"type {kind!r} is not SELECT/INSERT/UPDATE/DELETE")
    sql = " ".join(sql.split()).rstrip(";")
    gold = derive._execute(get_backend(backend), tb, kind, sql)
    add = f"The name of this table is {tb.name}, and the headers of this table are {','.join(tb.cols)}."
    return {"description": desc.strip(), **gold, "type": [kind], "add_description": add,
            "table": {"table_name": tb.name, "table_info": {"columns": [{"name": c, "type": "TEXT"} for c in tb.cols],
                                                            "rows": tb.rows}},
            "source": "self_instruct"}


def instruction_count(prep: Dict[str, Any], listing: Dict[str, Any]) -> int:
    """Instructions before validation: generated candidates, or the task file's records."""
    gen = prep.get("generated") or {}
    if "candidates" in gen:
        return int(gen["candidates"])
    return len(listing["ids"]) + len(listing.get("skipped") or {})
