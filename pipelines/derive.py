"""Instruction generation by task derivation (AgentTuning §2.1): new DB questions over the tables
of existing DBBench records, and templated OS tasks.

DB: every distinct table of a DBBench jsonl gets ``per_table`` new questions from templates over
its columns and rows — SELECT-type (lookup of a column by another column's value, COUNT with a
condition, COUNT DISTINCT, MAX/MIN/SUM/AVG of a numeric column, argmax/argmin) and
INSERT/UPDATE/DELETE — each with a gold SQL statement. Gold answers come from EXECUTING that SQL
on the DB environment's own backend (``serve.envs.db_backends``): SELECT → ``label`` (the result
values), modifying → ``answer_md5`` (the environment's table hash) with ``label = [gold SQL]``, as
DBBench ships them. The output is a DBBench jsonl that ``serve.envs.load("db", path)`` plays
unchanged (the expert plays ``sql.query`` / ``label[0]``). Deterministic for a seed.

OS: AgentBench OS JSON tasks from templates (init script, question, reference solution in
``evaluation.example``, a named checker); the generator knows the true answer and each task is
kept only when the reference solution, run in the sandbox, produces an answer the checker
accepts against it.
"""

import json
import logging
import os
import random
import re
import tempfile
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

from agenttuning.jsonl import iter_jsonl
from serve.envs import load
from serve.envs.db import column_names, get_backend, record_problem
from serve.envs.os_shell import check

log = logging.getLogger(__name__)

_SPACE = re.compile(r"\s+")


def norm_question(text: str) -> str:
    """Questions compare case- and whitespace-insensitively (the exclusion check)."""
    return _SPACE.sub(" ", str(text)).strip().lower()


def _num(v: Any) -> Optional[float]:
    try:
        f = float(str(v).strip())
    except ValueError:
        return None
    return f if f == f and abs(f) != float("inf") else None


def _sql_str(v: str) -> str:
    return "'" + str(v).replace("\\", "\\\\").replace("'", "''") + "'"


def _fmt(v: Any) -> str:
    """A result value as DBBench labels hold it (numbers from aggregates as Python prints them)."""
    return str(v)


# ============================================================================ DB


def _plain(v: str) -> bool:
    """A value fit for a question and a SQL literal: short, one line, no backslash (MySQL and
    SQLite read backslashes in string literals differently)."""
    return 0 < len(v) <= 60 and "\n" not in v and "\\" not in v


class _Table:
    """One seed table: name, (MySQL-safe) column names, rows, and which columns suit templates."""

    def __init__(self, name: str, cols: List[str], rows: List[List[str]], origin: str):
        self.name, self.cols, self.rows, self.origin = name, cols, rows, origin
        self.t = "`" + name.replace("`", "``") + "`"
        # Key columns: short single-line values (a readable WHERE); numeric: every value a number.
        self.keys = [i for i in range(len(cols)) if sum(1 for r in rows if _plain(r[i])) >= 2]
        self.nums = [i for i in range(len(cols))
                     if len(rows) >= 3 and all(_num(r[i]) is not None for r in rows)]

    def q(self, i: int) -> str:
        return "`" + self.cols[i].replace("`", "``") + "`"

    def cell(self, rng: random.Random, i: int) -> Optional[str]:
        vals = [r[i] for r in self.rows if _plain(r[i])]
        return rng.choice(vals) if vals else None


def _other(rng: random.Random, n: int, not_this: int) -> Optional[int]:
    choices = [i for i in range(n) if i != not_this]
    return rng.choice(choices) if choices else None


# Each template: (kind, function(table, rng) -> (description, sql) or None). Several phrasings per
# template keep the questions diverse; they follow DBBench's (WikiSQL-derived) style.
def _key_value(tb: _Table, rng: random.Random) -> Optional[Tuple[int, str, str]]:
    """A WHERE condition: (column index, column name, a value of it in the table)."""
    if not tb.keys:
        return None
    b = rng.choice(tb.keys)
    v = tb.cell(rng, b)
    return None if v is None else (b, tb.cols[b], v)


def _t_lookup(tb: _Table, rng: random.Random):
    kv = _key_value(tb, rng)
    a = _other(rng, len(tb.cols), kv[0]) if kv else None
    if a is None:
        return None
    (b, B, v), A = kv, tb.cols[a]
    desc = rng.choice([f"What is the {A} when the {B} is {v}?", f"Which {A} has a {B} of {v}?",
                       f"Tell me the {A} for the entry whose {B} is {v}.",
                       f"What {A} is listed for {B} {v}?", f"Name the {A} for {B} of {v}"])
    return desc, f"SELECT {tb.q(a)} FROM {tb.t} WHERE {tb.q(b)} = {_sql_str(v)}"


def _t_count(tb: _Table, rng: random.Random):
    kv = _key_value(tb, rng)
    if kv is None:
        return None
    b, B, v = kv
    desc = rng.choice([f"How many entries have a {B} of {v}?", f"How many rows list {v} as the {B}?",
                       f"What is the number of records where {B} is {v}?",
                       f"Count the entries in the table whose {B} equals {v}."])
    return desc, f"SELECT COUNT(*) FROM {tb.t} WHERE {tb.q(b)} = {_sql_str(v)}"


def _t_distinct(tb: _Table, rng: random.Random):
    if not tb.keys:
        return None
    b = rng.choice(tb.keys)
    B = tb.cols[b]
    desc = rng.choice([f"How many different {B} values are there in the table?",
                       f"How many distinct {B} entries does the table have?"])
    return desc, f"SELECT COUNT(DISTINCT {tb.q(b)}) FROM {tb.t}"


def _t_extreme(tb: _Table, rng: random.Random):
    if not tb.nums:
        return None
    n = rng.choice(tb.nums)
    N = tb.cols[n]
    hi = rng.random() < 0.5
    agg, word = ("MAX", rng.choice(["highest", "largest", "maximum"])) if hi else \
        ("MIN", rng.choice(["lowest", "smallest", "minimum"]))
    if tb.keys and rng.random() < 0.5:
        b = rng.choice([k for k in tb.keys if k != n] or [None])
        v = tb.cell(rng, b) if b is not None else None
        if v is not None:
            B = tb.cols[b]
            desc = rng.choice([f"What is the {word} {N} when the {B} is {v}?",
                               f"Which {N} is the {word} one that has a {B} of {v}?"])
            return desc, f"SELECT {agg}({tb.q(n)} + 0) FROM {tb.t} WHERE {tb.q(b)} = {_sql_str(v)}"
    desc = rng.choice([f"What is the {word} {N} in the table?", f"What is the {word} value of {N}?"])
    return desc, f"SELECT {agg}({tb.q(n)} + 0) FROM {tb.t}"


def _t_sum_avg(tb: _Table, rng: random.Random):
    if not tb.nums:
        return None
    n = rng.choice(tb.nums)
    N = tb.cols[n]
    if rng.random() < 0.5:
        return (rng.choice([f"What is the total {N} of all entries?", f"What is the sum of {N}?"]),
                f"SELECT SUM({tb.q(n)}) FROM {tb.t}")
    return (rng.choice([f"What is the average {N}?", f"What is the mean {N} across the table?"]),
            f"SELECT AVG({tb.q(n)} + 0) FROM {tb.t}")


def _t_argmax(tb: _Table, rng: random.Random):
    if not tb.nums:
        return None
    n = rng.choice(tb.nums)
    a = rng.choice([k for k in tb.keys if k != n] or [None])
    if a is None:
        return None
    vals = sorted(_num(r[n]) for r in tb.rows)
    hi = rng.random() < 0.5
    if (hi and vals[-1] == vals[-2]) or (not hi and vals[0] == vals[1]):
        return None  # a tie at the top makes "which one" ambiguous
    word = "highest" if hi else "lowest"
    desc = rng.choice([f"Which {tb.cols[a]} has the {word} {tb.cols[n]}?",
                       f"Name the {tb.cols[a]} with the {word} {tb.cols[n]}."])
    return desc, (f"SELECT {tb.q(a)} FROM {tb.t} ORDER BY {tb.q(n)} + 0 {'DESC' if hi else 'ASC'} LIMIT 1")


def _t_insert(tb: _Table, rng: random.Random):
    if len(tb.rows) < 2:
        return None
    # A new row mixing values seen in each column (a plausible record that is not in the table).
    row = [rng.choice(tb.rows)[i] for i in range(len(tb.cols))]
    if row in tb.rows or not all(_plain(v) for v in row):
        return None
    pairs = ", ".join(f"{c} '{v}'" for c, v in zip(tb.cols, row))
    desc = rng.choice([f"Insert a new record into the table with {pairs}.",
                       f"Add an entry to the {tb.name} table: {pairs}.",
                       f"Please add a row where {pairs}."])
    cols = ", ".join(tb.q(i) for i in range(len(tb.cols)))
    return desc, f"INSERT INTO {tb.t} ({cols}) VALUES ({', '.join(_sql_str(v) for v in row)})"


def _t_update(tb: _Table, rng: random.Random):
    kv = _key_value(tb, rng)
    a = _other(rng, len(tb.cols), kv[0]) if kv else None
    new = tb.cell(rng, a) if a is not None else None
    if new is None:
        return None
    (b, B, v), A = kv, tb.cols[a]
    desc = rng.choice([f"Update the {A} to '{new}' for the entries whose {B} is '{v}'.",
                       f"Change the {A} of the record with {B} '{v}' to '{new}'.",
                       f"In the {tb.name} table, set {A} to '{new}' where {B} equals '{v}'."])
    return desc, f"UPDATE {tb.t} SET {tb.q(a)} = {_sql_str(new)} WHERE {tb.q(b)} = {_sql_str(v)}"


def _t_delete(tb: _Table, rng: random.Random):
    kv = _key_value(tb, rng)
    if kv is None:
        return None
    b, B, v = kv
    desc = rng.choice([f"Delete the entries whose {B} is '{v}'.", f"Remove every record with {B} '{v}' from the table.",
                       f"Delete all rows of the {tb.name} table where {B} equals '{v}'."])
    return desc, f"DELETE FROM {tb.t} WHERE {tb.q(b)} = {_sql_str(v)}"


DB_TEMPLATES: List[Tuple[str, Callable]] = [
    ("SELECT", _t_lookup), ("counting", _t_count), ("counting", _t_distinct), ("aggregation", _t_extreme),
    ("aggregation", _t_sum_avg), ("ranking", _t_argmax), ("INSERT", _t_insert), ("UPDATE", _t_update),
    ("DELETE", _t_delete),
]
MODIFY = ("INSERT", "UPDATE", "DELETE")


def read_tables(path: str) -> Tuple[List[_Table], Set[str], int]:
    """Distinct tables of a DBBench jsonl, the questions it asks, and its unusable record count."""
    tables: Dict[str, _Table] = {}
    questions: Set[str] = set()
    bad = 0
    for n, rec, problem in iter_jsonl(path, on_error="keep", objects=False):
        if problem or record_problem(rec):  # unusable records are counted (the env skips them too)
            bad += 1
            continue
        questions.add(norm_question(rec["description"]))
        info = rec["table"]["table_info"]
        cols = column_names([str(c["name"]) for c in info["columns"]])
        rows = [[str(v) for v in r] for r in info.get("rows", [])]
        key = json.dumps([rec["table"]["table_name"], cols, rows], ensure_ascii=False)
        tables.setdefault(key, _Table(str(rec["table"]["table_name"]), cols, rows, f"{path}:{n}"))
    return list(tables.values()), questions, bad


def _execute(backend: Any, tb: _Table, kind: str, sql: str) -> Dict[str, Any]:
    """Gold fields by running ``sql`` on a fresh copy of the table; ValueError when unusable."""
    ep = backend.open(tb.name, tb.cols, tb.rows)
    try:
        before = ep.table_hash() if kind in MODIFY else None
        try:
            rows = ep.query(sql)
        except Exception as exc:  # noqa: BLE001 - any backend error: the candidate is invalid
            raise ValueError(f"gold SQL failed: {type(exc).__name__}: {exc}") from None
        if kind in MODIFY:
            after = ep.table_hash()
            if after == before:
                raise ValueError("gold statement changes nothing")
            return {"answer_md5": after, "label": [sql]}
        label = [_fmt(v) for r in rows for v in r if v is not None]
        if not label or len(label) > 5 or "" in label:
            raise ValueError(f"gold query returns {len(label)} values")
        return {"label": label, "sql": {"query": sql}}
    finally:
        ep.close()


def derive_db(source: str, out_path: str, per_table: int = 8, seed: int = 0, backend: str = "auto",
              exclude: Iterable[str] = ()) -> Dict[str, Any]:
    """Write ``per_table`` derived DBBench records per distinct table of ``source`` to ``out_path``.

    ``exclude``: questions (e.g. every evaluation question) no derived question may equal; the
    source's own questions are always excluded. Returns counts: ``tables``, ``candidates``,
    ``invalid`` (gold SQL failed, empty result, no change), ``excluded``, ``written``, by kind.
    """
    tables, seen, bad = read_tables(source)
    seen |= {norm_question(q) for q in exclude}
    be = get_backend(backend)
    stats: Dict[str, Any] = {"tables": len(tables), "bad_source_records": bad, "candidates": 0, "invalid": 0,
                             "excluded": 0, "written": 0, "by_kind": {}, "backend": be.name}
    out: List[Dict[str, Any]] = []
    for tb in tables:
        rng = random.Random(f"{seed}|{tb.name}|{len(tb.rows)}")
        kept: List[Dict[str, Any]] = []
        order = list(range(len(DB_TEMPLATES)))
        for attempt in range(per_table * 6):
            if len(kept) >= per_table:
                break
            if attempt % len(order) == 0:
                rng.shuffle(order)  # cycle through all templates before repeating one: diversity
            kind, make = DB_TEMPLATES[order[attempt % len(order)]]
            cand = make(tb, rng)
            if cand is None:
                continue
            desc, sql = cand
            stats["candidates"] += 1
            if norm_question(desc) in seen:
                stats["excluded"] += 1
                continue
            try:
                gold = _execute(be, tb, kind, sql)
            except ValueError as exc:
                log.debug("derive: %s: %s: %s", tb.name, sql, exc)
                stats["invalid"] += 1
                continue
            seen.add(norm_question(desc))
            stats["by_kind"][kind] = stats["by_kind"].get(kind, 0) + 1
            add = f"The name of this table is {tb.name}, and the headers of this table are {','.join(tb.cols)}."
            kept.append({"description": desc, **gold, "type": [kind], "add_description": add,
                         "table": {"table_name": tb.name, "table_info": {
                             "columns": [{"name": c, "type": "TEXT"} for c in tb.cols], "rows": tb.rows}},
                         "heads": tb.cols, "source": f"derived:{tb.origin}"})
        out += kept
    with open(out_path, "w", encoding="utf-8") as f:
        for rec in out:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    stats["written"] = len(out)
    log.info("derived %d DB tasks from %d tables of %s (%s)", len(out), len(tables), source, stats)
    return stats


# ============================================================================ OS


_WORDS = ["apple", "river", "stone", "cloud", "maple", "tiger", "ember", "lotus", "orbit", "piano"]


def _os_count_files(rng: random.Random, k: int):
    d, n = f"/tmp/data_{k}", rng.randint(3, 25)
    init = f"mkdir -p {d} && for i in $(seq 1 {n}); do echo $i > {d}/f_$i.txt; done"
    return (f"How many files are in the directory {d}?", init, f"ls -1 {d} | wc -l", "integer-match", str(n))


def _os_grep_count(rng: random.Random, k: int):
    f, w = f"/tmp/notes_{k}.txt", rng.choice(_WORDS)
    lines = [" ".join(rng.choice(_WORDS) for _ in range(4)) for _ in range(rng.randint(5, 30))]
    n = sum(1 for ln in lines if w in ln.split())
    init = "printf '%s\\n' " + " ".join(f"'{ln}'" for ln in lines) + f" > {f}"
    return (f"How many lines of {f} contain the word '{w}'?", init, f"grep -cw {w} {f}", "integer-match", str(n))


def _os_sum(rng: random.Random, k: int):
    f = f"/tmp/numbers_{k}.txt"
    nums = [rng.randint(-50, 500) for _ in range(rng.randint(4, 20))]
    init = "printf '%s\\n' " + " ".join(map(str, nums)) + f" > {f}"
    return (f"{f} holds one integer per line. What is their sum?", init,
            f"awk '{{s+=$1}} END {{print s}}' {f}", "integer-match", str(sum(nums)))


def _os_largest(rng: random.Random, k: int):
    d = f"/tmp/files_{k}"
    sizes = rng.sample(range(1, 60), rng.randint(3, 8))
    names = [f"{rng.choice(_WORDS)}_{i}.bin" for i in range(len(sizes))]
    init = f"mkdir -p {d} && " + " && ".join(f"head -c {s}00 /dev/zero > {d}/{n}" for s, n in zip(sizes, names))
    big = names[sizes.index(max(sizes))]
    return (f"Which file in {d} is the largest? Answer with its file name only.", init,
            f"ls -S {d} | head -n 1", "string-match", big)


def _os_nth_line(rng: random.Random, k: int):
    f = f"/tmp/list_{k}.txt"
    lines = [f"{rng.choice(_WORDS)}-{rng.randint(1, 999)}" for _ in range(rng.randint(4, 12))]
    i = rng.randint(1, len(lines))
    init = "printf '%s\\n' " + " ".join(lines) + f" > {f}"
    return (f"What is line number {i} of the file {f}?", init, f"sed -n {i}p {f}", "string-match", lines[i - 1])


def _os_ext_count(rng: random.Random, k: int):
    d = f"/tmp/logs_{k}"
    exts = [rng.choice(["log", "txt", "csv"]) for _ in range(rng.randint(4, 16))]
    init = f"mkdir -p {d}/a/b && " + " && ".join(
        f"touch {d}/{rng.choice(['', 'a/', 'a/b/'])}file{i}.{e}" for i, e in enumerate(exts))
    return (f"How many .log files are there under {d}, including its subdirectories?", init,
            f"find {d} -type f -name '*.log' | wc -l", "integer-match", str(exts.count("log")))


OS_TEMPLATES = [_os_count_files, _os_grep_count, _os_sum, _os_largest, _os_nth_line, _os_ext_count]


def os_task(description: str, init: str, example: str, checker: str) -> Dict[str, Any]:
    """An AgentBench OS JSON task (the check chain: run ``example`` for the expected answer, then
    compare with ``checker``)."""
    return {"description": description, "create": {"local": "default", "init": {"code": init}},
            "evaluation": {"check": [None, {"language": "python", "file": f"check/{checker}.py"}],
                           "example": {"code": example}}, "labels": ["derived"]}


def generate_os(out_path: str, n: int = 12, seed: int = 0, validate: bool = True,
                env_options: Optional[Dict[str, Any]] = None, exclude: Iterable[str] = ()) -> Dict[str, Any]:
    """Write ``n`` templated OS tasks, each validated in the sandbox: the reference solution's
    output must pass the task's checker against the generator's own answer."""
    rng = random.Random(f"os|{seed}")
    seen = {norm_question(q) for q in exclude}
    tasks, stats = [], {"candidates": 0, "invalid": 0, "excluded": 0, "written": 0}
    for k in range(n * 2):
        if len(tasks) >= n:
            break
        desc, init, example, checker, truth = OS_TEMPLATES[k % len(OS_TEMPLATES)](rng, k)
        stats["candidates"] += 1
        if norm_question(desc) in seen:
            stats["excluded"] += 1
            continue
        seen.add(norm_question(desc))
        tasks.append((os_task(desc, init, example, checker), checker, truth))
    keep = [t for t, _, _ in tasks]
    if validate:
        outs = run_references([t for t, _, _ in tasks], env_options or {})
        keep = []
        for (t, checker, truth), out in zip(tasks, outs):
            if out is not None and out.strip() and check(checker, out, truth):
                keep.append(t)
            else:
                log.info("os template rejected (reference gave %r, expected %r): %s", out, truth, t["description"])
                stats["invalid"] += 1
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(keep, f, ensure_ascii=False, indent=1)
    stats["written"] = len(keep)
    return stats


def run_references(tasks: List[Dict[str, Any]], env_options: Dict[str, Any]) -> List[Optional[str]]:
    """Output of each OS task's reference solution, run in a fresh sandbox after its init (None
    when the sandbox or the script fails)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tasks.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(tasks, f)
        opts = {k: v for k, v in env_options.items() if k != "max_turns"}
        env = load("os", path, **opts)
        outs: List[Optional[str]] = []
        for i in range(len(tasks)):
            try:
                env.reset(str(i))
                outs.append(env.expected_output())
            except Exception as exc:  # noqa: BLE001 - a failing reference makes the task invalid
                log.info("os reference %d failed: %s", i, exc)
                outs.append(None)
            finally:
                env.close()
        env.shutdown()
    return outs
