"""SQLite backend of the DB environment (zero install): sqlglot transpiles the agent's MySQL.

An in-memory database per episode; ``col <op> number`` comparisons are rewritten to compare
numerically (MySQL compares a TEXT column with a number as numbers); columns use
``COLLATE NOCASE`` (MySQL's default collation is case-insensitive); SUM returns a double as in
MySQL. An authorizer forbids ATTACH/PRAGMA and extension loading; VACUUM (``VACUUM INTO`` writes
a file) is refused; a progress handler enforces the time limit. Remaining differences are listed
in docs/environments.md.
"""

import hashlib
import re
import sqlite3
import time
from typing import Any, List, Optional

from serve.envs.db_backends import MAX_FETCH_ROWS, format_rows, quote_ident, table_hash_from_rows



def _numeric_comparisons(tree):
    """``col <op> 17`` → ``CAST(col AS REAL) <op> 17``: MySQL compares TEXT with a number numerically."""
    from sqlglot import exp

    def is_num(node) -> bool:
        if isinstance(node, exp.Neg):
            node = node.this
        return isinstance(node, exp.Literal) and node.is_number

    def cast(node):
        return exp.Cast(this=node.copy(), to=exp.DataType.build("REAL"))

    for node in list(tree.find_all(exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE)):
        if node.arg_key == "expressions" and isinstance(node.parent, exp.Update):
            continue  # `SET col = 6` is an assignment, not a comparison
        left, right = node.left, node.right
        if isinstance(left, exp.Column) and is_num(right):
            left.replace(cast(left))
        elif isinstance(right, exp.Column) and is_num(left):
            right.replace(cast(right))
    for node in list(tree.find_all(exp.Between)):
        if isinstance(node.this, exp.Column) and is_num(node.args["low"]) and is_num(node.args["high"]):
            node.this.replace(cast(node.this))
    for node in list(tree.find_all(exp.Sum)):  # MySQL's SUM over TEXT is a DOUBLE
        node.replace(exp.Anonymous(this="mysql_sum", expressions=[node.this.copy()]))
    for node in list(tree.find_all(exp.In)):
        exprs = node.args.get("expressions") or []
        if isinstance(node.this, exp.Column) and exprs and all(is_num(e) for e in exprs):
            node.this.replace(cast(node.this))
    return tree


_SHOW_TABLES = re.compile(r"^\s*show\s+(full\s+)?tables\b", re.I)
_DESCRIBE = re.compile(r"^\s*(?:describe|desc|explain|show\s+(?:full\s+)?(?:columns|fields)\s+from)\s+"
                       r"(`[^`]+`|\"[^\"]+\"|\S+)\s*;?\s*$", re.I)
_FORBIDDEN = re.compile(r"^\s*(vacuum|attach|detach|pragma)\b", re.I)


def transpile_mysql(sql: str) -> str:
    """The agent's MySQL statement as SQLite SQL; raises ValueError with a parse message."""
    import sqlglot
    from sqlglot.errors import ParseError

    try:
        trees = [t for t in sqlglot.parse(sql, read="mysql") if t is not None]
    except ParseError as exc:
        raise ValueError(str(exc).splitlines()[0]) from None
    if len(trees) != 1:
        raise ValueError("exactly one SQL statement expected")
    return _numeric_comparisons(trees[0]).sql(dialect="sqlite")


def _concat_ws(sep, *args):
    return None if sep is None else str(sep).join(str(a) for a in args if a is not None)


class _MySQLSum:
    """SUM as MySQL computes it over TEXT: strings become doubles; NULL when no rows."""

    def __init__(self) -> None:
        self.total: Optional[float] = None

    def step(self, value: Any) -> None:
        if value is None:
            return
        try:
            v = float(value)
        except (TypeError, ValueError):
            m = re.match(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", str(value))
            v = float(m.group(0)) if m else 0.0  # MySQL takes the numeric prefix, else 0
        self.total = v if self.total is None else self.total + v

    def finalize(self) -> Optional[float]:
        return self.total


def _md5(x):
    return None if x is None else hashlib.md5(str(x).encode()).hexdigest()


class SQLiteBackend:
    """In-memory SQLite per episode (no server)."""

    name = "sqlite"

    def __init__(self, statement_timeout: float = 5.0) -> None:
        self.statement_timeout = statement_timeout

    def open(self, table: str, columns: List[str], rows: List[List[Any]],
             statement_timeout: Optional[float] = None) -> "SQLiteEpisode":
        return SQLiteEpisode(self, table, columns, rows, statement_timeout or self.statement_timeout)

    def shutdown(self) -> None:
        """Nothing to stop."""


class SQLiteEpisode:
    def __init__(self, backend: SQLiteBackend, table: str, columns: List[str], rows: List[List[Any]],
                 timeout: float):
        self.backend, self.table, self.columns, self.timeout = backend, table, columns, float(timeout)
        self.conn = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
        self.conn.execute("PRAGMA temp_store = MEMORY")  # sorts of big joins never touch disk
        for name, n, fn in (("md5", 1, _md5), ("concat_ws", -1, _concat_ws)):
            self.conn.create_function(name, n, fn, deterministic=True)
        self.conn.create_aggregate("mysql_sum", 1, _MySQLSum)
        cols = ", ".join(f"{quote_ident(c, chr(34))} TEXT COLLATE NOCASE" for c in columns)
        t = quote_ident(table, '"')
        self.conn.execute(f"CREATE TABLE {t} ({cols})")
        marks = ", ".join("?" * len(columns))
        self.conn.executemany(f"INSERT INTO {t} VALUES ({marks})", [[str(v) for v in r] for r in rows])
        self.conn.set_authorizer(self._authorize)
        self._deadline = 0.0
        self.conn.set_progress_handler(lambda: int(time.monotonic() > self._deadline), 10000)

    @staticmethod
    def _authorize(action: int, arg1, arg2, db_name, trigger) -> int:
        if action == sqlite3.SQLITE_PRAGMA and str(arg1).lower() in ("table_info", "table_xinfo"):
            return sqlite3.SQLITE_OK  # read-only; DESCRIBE is emulated with it
        if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH, sqlite3.SQLITE_PRAGMA):
            return sqlite3.SQLITE_DENY
        if action == sqlite3.SQLITE_FUNCTION and str(arg2).lower() in (
                "load_extension", "readfile", "writefile", "fts3_tokenizer", "edit"):
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    def _run(self, sql: str) -> List[tuple]:
        self._deadline = time.monotonic() + self.timeout
        cur = self.conn.execute(sql)
        return list(cur.fetchmany(MAX_FETCH_ROWS)) if cur.description else []

    def _rewrite(self, sql: str) -> str:
        if _SHOW_TABLES.match(sql):
            return "SELECT name FROM sqlite_master WHERE type = 'table'"
        m = _DESCRIBE.match(sql)
        if m:  # MySQL DESCRIBE rows: (Field, Type, Null, Key, Default, Extra)
            name = m.group(1).strip("`\"")
            return ("SELECT name, lower(type), CASE WHEN \"notnull\" THEN 'NO' ELSE 'YES' END, '', "
                    f"dflt_value, '' FROM pragma_table_info({_sql_str(name)})")
        if _FORBIDDEN.match(sql):
            raise PermissionError("1142 (42000): command denied to user for this statement")
        return transpile_mysql(sql)

    def execute(self, sql: str) -> str:
        """Run one agent statement; rows or a MySQL-style error text, never an exception."""
        try:
            sql = self._rewrite(sql)
        except ValueError as exc:
            return ("1064 (42000): You have an error in your SQL syntax; check the manual that "
                    f"corresponds to your MySQL server version for the right syntax to use ({exc})")
        except PermissionError as exc:
            return str(exc)
        try:
            return format_rows(self._run(sql))
        except sqlite3.Error as exc:
            msg = str(exc)
            if "interrupted" in msg:
                return "1969 (70100): Query execution was interrupted (max_statement_time exceeded)"
            if "not authorized" in msg:
                return f"1142 (42000): command denied: {msg}"
            if "no such table" in msg:
                return f"1146 (42S02): Table doesn't exist: {msg}"
            if "no such column" in msg:
                return f"1054 (42S22): Unknown column: {msg}"
            return f"1064 (42000): {msg}"

    def query(self, sql: str) -> List[tuple]:
        """Transpile and run; raises on error (used by the expert)."""
        return self._run(self._rewrite(sql))

    def table_hash(self) -> str:
        self.conn.set_authorizer(None)
        try:
            cols = ", ".join(quote_ident(c, '"') for c in self.columns)
            return table_hash_from_rows(self._run(f"SELECT {cols} FROM {quote_ident(self.table, chr(34))}"))
        except sqlite3.Error as exc:
            return f"1146 (42S02): {exc}"
        finally:
            self.conn.set_authorizer(self._authorize)

    def close(self) -> None:
        self.conn.close()


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


