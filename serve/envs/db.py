"""DBBench (AgentBench) as an environment: one table per task, MySQL-style SQL, two backends.

Task file: AgentBench's DBBench jsonl, unchanged (``dbbench_dev.jsonl`` / ``dbbench_std.jsonl``).
Each record describes one table (``table.table_info`` columns and rows, all TEXT) and asks a
question (``description`` + ``add_description``). The protocol follows AgentBench.old's DBBench
task (THUDM/AgentTuning ``AgentBench.old/src/tasks/dbbench``), which the paper evaluated with:

* A turn is parsed as AgentBench parses it: the first ``Action: <word>`` line; ``Operation``
  runs the first ```` ```sql\n...\n``` ```` block (newlines joined into one line); anything
  else ends the episode and is judged, with the answer taken from the reply's
  ``\nFinal Answer:`` line (empty if none). ``Action: Answer`` is the normal end (``completed``);
  every other reply — no ``Action:`` line, another word, ``Operation`` without a sql block — ends
  it with ``invalid_format`` (still judged, as AgentBench judges it), unless ``max_invalid``
  allows more tries.
* The database's own output is the observation: rows as ``str(cursor.fetchall())``, an error as
  the server's error text (``1064 (42000): You have an error in your SQL syntax; ...``); the
  episode goes on after an error. Output is cut at 800 characters + ``[TRUNCATED]``.
* ``max_round`` = 15 SQL operations, then one more reply (which can only answer): ``max_turns``
  16. No repetition rule (``repetition_k`` 0), as in AgentBench.
* Judging. SELECT-type records: AgentBench's metric on the answer text — evaluated as a Python
  literal and made a list (else the text itself as one element); one element each: equal as
  floats, else as strings; otherwise equal as sets. INSERT/UPDATE/DELETE records: AgentBench's
  table hash (``db_backends.table_hash_from_rows``) against ``answer_md5``, computed whenever
  the episode ends — answer, invalid reply or turn limit — as AgentBench computes it.

The scripted expert plays the gold statement (``label`` of INSERT/UPDATE records) or, for
SELECT records, runs ``sql.query`` when that query runs and then answers ``label``.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
import threading
from typing import Any, Dict, List, Optional

from agenttuning.jsonl import iter_jsonl
from serve.envs import db_backends
from serve.envs.base import Env, EnvError, Status, StepResult, Task, data_file, register
from serve.envs.db_sqlite import SQLiteBackend

log = logging.getLogger(__name__)

# AgentBench.old's DBBench instruction (src/tasks/dbbench/__init__.py), the first user turn.
DB_PROMPT = """
I will ask you a question, then you should help me operate a MySQL database with SQL to answer the question.
You have to explain the problem and your solution to me and write down your thoughts.
After thinking and explaining thoroughly, every round you can choose to operate or to answer.
your operation should be like this:
Action: Operation
```sql
SELECT * FROM table WHERE condition;
```
You MUST put SQL in markdown format without any other comments. Your SQL should be in one line.
Every time you can only execute one SQL statement. I will only execute the statement in the first SQL code block. Every time you write a SQL, I will execute it for you and give you the output.
If you are done operating, and you want to commit your final answer, then write down:
Action: Answer
Final Answer: ["ANSWER1", "ANSWER2", ...]
DO NOT write this pattern unless you are sure about your answer. I expect an accurate and correct answer.
Your answer should be accurate. Your answer must be exactly the same as the correct answer.
If the question is about modifying the database, then after done operation, your answer field can be anything.
If your response cannot match any pattern I mentioned earlier, you will be judged as FAIL immediately.
Your input will be raw MySQL response, you have to deal with it by yourself.
"""

INVALID_FEEDBACK = ("Your response cannot match any pattern: write 'Action: Operation' followed by "
                    "one SQL statement in a ```sql block, or 'Action: Answer' followed by "
                    "'Final Answer: [...]'.")
MODIFY_TYPES = ("INSERT", "UPDATE", "DELETE")
OBS_LIMIT = 800  # AgentBench truncates MySQL output at 800 characters
MAX_ROUND = 15  # AgentBench's DBBench max_round (configs/tasks/dbbench/{dev,std}.yaml)

# AgentBench's own patterns: case-sensitive, "Action: " with one space, the word up to the end
# of its line; the sql block with newlines right after ```sql and before the closing fence.
_ACTION = re.compile(r"Action: (.*?)\n")
_SQL = re.compile(r"```sql\n([\s\S]*?)\n```")
_FINAL = re.compile(r"\nFinal Answer:(.*)")


def parse_answer(text: str) -> List[Any]:
    """The answer as AgentBench's metric reads it: the text evaluated as a Python literal and made
    a list (``list(eval(text))``; a string literal becomes its characters, as there), else
    ``[text]`` unchanged. ``ast.literal_eval`` instead of ``eval``: the text is the agent's."""
    try:
        return list(ast.literal_eval(text))
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return [text]


def answers_match(answer: List[Any], label: List[Any]) -> bool:
    """AgentBench.old's DBBench metric: one element each → equal as floats when both parse,
    else equal as they are; otherwise equal as sets (no number normalisation)."""
    if len(answer) == 1 and len(label) == 1:
        try:
            return float(answer[0]) == float(label[0])
        except (ValueError, TypeError):
            return answer[0] == label[0]
    try:
        return set(answer) == set(label)
    except TypeError:  # unhashable elements (a nested list): AgentBench counts it wrong
        return False


def _one_line(sql: str) -> str:
    return re.sub(r"\s+", " ", sql).strip()


@register("dbbench")
@register("db")
class DBEnv(Env):
    """AgentBench DBBench. Options: ``backend`` (auto|mariadb|sqlite), ``statement_timeout`` (s)."""

    default_max_turns = MAX_ROUND + 1  # 15 operations, then a reply that can only answer
    episode_attrs = ("edb",)

    def __init__(self, path: Optional[str] = None, *, backend: str = "auto",
                 statement_timeout: float = 5.0, split: str = "dev", **options: Any) -> None:
        self.split_name = split
        options.setdefault("repetition_k", 0)  # AgentBench's DBBench has no repetition rule
        super().__init__(path, **options)
        self.statement_timeout = float(statement_timeout)
        self.backend = get_backend(backend, statement_timeout)
        self.edb: Any = None  # the running episode's database

    # ------------------------------------------------------------------ tasks

    def load_tasks(self, path: Optional[str]) -> List[Task]:
        path = path or data_file("agentbench/dbbench_dev.jsonl")
        tasks: List[Task] = []
        if not os.path.isfile(path):
            raise EnvError(f"db: task file {path} does not exist")
        # A bad line is a skipped task (with the reason), so the other records keep AgentBench's ids.
        for lineno, rec, problem in iter_jsonl(path, on_error="keep", objects=False):
            tid = str(len(tasks))  # AgentBench's index: the record's position in the file
            problem = f"line {lineno}: {problem}" if problem else self._check_record(rec)
            if problem:
                self.skip(tid, problem)
                tasks.append(Task(tid, None, self.split_name))
            else:
                tasks.append(Task(tid, rec, self.split_name))
        return tasks

    @staticmethod
    def _check_record(rec: Any) -> Optional[str]:
        """Why a record cannot run, or None."""
        if not isinstance(rec, dict):
            return "record is not an object"
        for key in ("description", "table", "label"):
            if key not in rec:
                return f"missing field '{key}'"
        table = rec["table"]
        if not isinstance(table, dict) or "table_name" not in table or "table_info" not in table:
            return "field 'table' needs 'table_name' and 'table_info'"
        info = table["table_info"]
        if not isinstance(info, dict) or not isinstance(info.get("columns"), list) or not info["columns"]:
            return "field 'table.table_info.columns' missing or empty"
        if any(not isinstance(c, dict) or "name" not in c for c in info["columns"]):
            return "a column in 'table.table_info.columns' has no 'name'"
        ncol = len(info["columns"])
        rows = info.get("rows", [])
        if not isinstance(rows, list) or any(not isinstance(r, list) or len(r) != ncol for r in rows):
            return f"field 'table.table_info.rows' must be a list of rows with {ncol} values"
        if _task_type(rec) in MODIFY_TYPES and "answer_md5" not in rec:
            return f"{_task_type(rec)} record without 'answer_md5'"
        return None

    # ------------------------------------------------------------------ episode

    def start(self, task: Task) -> List[Dict[str, Any]]:
        rec = task.data
        raw = [str(c["name"]) for c in rec["table"]["table_info"]["columns"]]
        cols = column_names(raw)
        self.edb = self.backend.open(rec["table"]["table_name"], cols, rec["table"]["table_info"].get("rows", []),
                                     self.statement_timeout)
        add = rec.get("add_description") if cols == raw else None
        add = add or (f"The name of this table is {rec['table']['table_name']}, and the headers of "
                      f"this table are {','.join(cols)}.")
        return [
            {"role": "user", "content": DB_PROMPT},
            {"role": "assistant", "content": "Ok.", "loss": False},
            {"role": "user", "content": f"{rec['description']}\n{add}"},
        ]

    def act(self, action: str) -> StepResult:
        m = _ACTION.search(action)
        word = m.group(1) if m else None
        last = self.turns >= self.max_turns
        if word == "Operation" and not last:
            sql = _SQL.search(action)
            if not sql:  # AgentBench stops here with an empty answer and judges
                return self._invalid("", last)
            statement = sql.group(1).strip().replace("\n", " ")
            # An empty block: AgentBench's client sends nothing and shows "[]".
            out = self.edb.execute(statement) if statement else "[]"
            if len(out) > OBS_LIMIT:
                out = out[:OBS_LIMIT] + "[TRUNCATED]"
            return StepResult(out, info={"backend": self.backend.name})
        final = _FINAL.search(action)
        answer = final.group(1) if final else ""
        if word == "Answer":
            return self._judge(answer, Status.COMPLETED)
        if word == "Operation":  # max_round operations ran: judged without running this one
            return self._judge(answer, Status.TURN_LIMIT)
        return self._invalid(answer, last)

    def _invalid(self, answer: str, last: bool) -> StepResult:
        """A reply that is neither an operation nor an answer: judged at once (AgentBench),
        or, while ``max_invalid`` allows, feedback and another try."""
        self.invalid += 1
        if self.invalid <= self.max_invalid and not last:
            return StepResult(INVALID_FEEDBACK, info={"backend": self.backend.name,
                                                      "invalid": Status.INVALID_FORMAT.value})
        result = self._judge(answer, Status.INVALID_FORMAT if self.invalid > self.max_invalid
                             else Status.TURN_LIMIT)
        result.observation = INVALID_FEEDBACK
        result.info["invalid"] = Status.INVALID_FORMAT.value
        return result

    def _judge(self, answer: str, status: Status) -> StepResult:
        """End the episode with AgentBench's verdict on ``answer`` (the Final Answer text)."""
        rec = self.current.data
        info: Dict[str, Any] = {"backend": self.backend.name}
        if _task_type(rec) in MODIFY_TYPES:
            got = self.edb.table_hash()
            ok = got == rec["answer_md5"]
            info.update(answer=got, expected=rec["answer_md5"])
        else:
            parsed = parse_answer(answer)
            ok = answers_match(parsed, rec["label"])
            info.update(answer=parsed, expected=rec["label"])
        return StepResult("", reward=1.0 if ok else 0.0, done=True, status=status, info=info)

    def expert_action(self) -> str:
        if self.current is None:
            raise EnvError("db: expert_action() needs a running episode")
        rec = self.current.data
        kind, table = _task_type(rec), rec["table"]["table_name"]
        # ReAct form: a "Thought:" line, then the action (trajectory construction relies on it).
        if self.turns == 0:
            sql = self._expert_sql(rec)
            if sql:
                why = (f"the request changes the table {table}, so I will run one {kind} statement on it"
                       if kind in MODIFY_TYPES else
                       f"the answer is in the table {table}; I will select the rows that match the question")
                return f"Thought: {why[0].upper()}{why[1:]}.\nAction: Operation\n```sql\n{sql}\n```"
        if kind in MODIFY_TYPES:
            return 'Thought: The statement ran, so the table is updated.\nAction: Answer\nFinal Answer: ["none"]'
        why = "The query result answers the question." if self.turns else "I can answer from the question directly."
        return f"Thought: {why}\nAction: Answer\nFinal Answer: {json.dumps(rec['label'], ensure_ascii=False)}"

    def _expert_sql(self, rec: Dict[str, Any]) -> Optional[str]:
        if _task_type(rec) in MODIFY_TYPES:
            label = rec.get("label") or []
            return _one_line(label[0]) if label and isinstance(label[0], str) else None
        query = (rec.get("sql") or {}).get("query") if isinstance(rec.get("sql"), dict) else None
        if not query or not query.lstrip().lower().startswith("select"):
            return None
        try:  # read-only probe: only show the query when it runs on this table
            self.edb.query(_one_line(query))
        except Exception:  # noqa: BLE001 — any failure means "answer without the query"
            return None
        return _one_line(query)

    def shutdown(self) -> None:
        shutdown_backends()


def column_names(names: List[str]) -> List[str]:
    """Names MySQL accepts: no empty or space-padded names (one dev record has a '' column,
    which MySQL rejects), no case-insensitive duplicates."""
    out: List[str] = []
    for i, name in enumerate(names):
        name = name.strip() or f"column_{i + 1}"
        base, k = name, 2
        while name.lower() in (o.lower() for o in out):
            name, k = f"{base}_{k}", k + 1
        out.append(name[:64])
    return out


def record_problem(rec: Any) -> Optional[str]:
    """Why a DBBench record cannot run (None when it can): the check the loader skips records by,
    public for task derivation (pipelines.derive) to validate new records the same way."""
    return DBEnv._check_record(rec)


def _task_type(rec: Dict[str, Any]) -> str:
    t = rec.get("type")
    t = t[0] if isinstance(t, list) and t else t
    return str(t or "SELECT").upper()


# ----------------------------------------------------------------------------- the process-wide backend

_shared_lock = threading.Lock()
_shared: dict = {}


def get_backend(kind: str = "auto", statement_timeout: float = 5.0):
    """A process-wide backend: "mariadb", "sqlite", or "auto" (MariaDB if installed)."""
    if kind not in ("auto", "mariadb", "sqlite"):
        raise ValueError(f"db backend must be auto, mariadb or sqlite; got {kind!r}")
    with _shared_lock:
        if kind in ("auto", "mariadb"):
            b = _shared.get("mariadb")
            if b is not None and b.server.alive():
                return b
            try:
                b = _shared["mariadb"] = db_backends.MariaDBBackend(statement_timeout)
                return b
            except db_backends.BackendError as exc:
                if kind == "mariadb":
                    raise
                log.warning("MariaDB unavailable (%s); using the SQLite fallback", exc)
        return _shared.setdefault("sqlite", SQLiteBackend(statement_timeout))


def backend_running(kind: str = "mariadb") -> bool:
    """Whether this process already holds a backend of ``kind`` (e.g. a MariaDB server it started)."""
    with _shared_lock:
        return kind in _shared


def shutdown_backends() -> None:
    """Stop the process-wide MariaDB server, if one was started."""
    with _shared_lock:
        b = _shared.pop("mariadb", None)
    if b is not None:
        b.shutdown()
