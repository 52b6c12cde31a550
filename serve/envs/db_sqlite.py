"""SQLite backend of the DB environment (zero install): sqlglot transpiles the agent's MySQL.

An in-memory database per episode; ``col <op> number`` comparisons are rewritten to compare
numerically (MySQL compares a TEXT column with a number as numbers); columns use a collation
that ignores case and accents and keeps trailing spaces significant, like MySQL 8's default
``utf8mb4_0900_ai_ci``; SUM returns a double as in MySQL; in INSERT/UPDATE/DELETE a non-numeric
value compared with a number fails the statement, as MySQL's strict mode does. An authorizer
forbids ATTACH/PRAGMA and extension loading; VACUUM (``VACUUM INTO`` writes a file) is refused;
a progress handler enforces the time limit.

Errors read as AgentBench's MySQL client prints them: the agent's malformed SQL — including SQL
that sqlglot itself cannot tokenize or parse (an unterminated quote, garbage) — gets MySQL's
``1064 (42000): You have an error in your SQL syntax; ... near '...' at line 1``, and SQLite's
runtime errors are mapped to the MySQL error of the same meaning (``1054`` unknown column,
``1146`` unknown table named ``'<db>.<table>'`` with AgentBench's database name, which is the
table's name, ``1136`` column count, ...). Remaining differences are listed in
docs/environments.md.
"""

import functools
import hashlib
import re
import sqlite3
import time
import unicodedata
from typing import Any, List, Optional, Sequence

from serve.envs.db_backends import (MAX_FETCH_ROWS, OUT_OF_SYNC, format_rows, mysql8_reserved_error,
                                    quote_ident, syntax_error, table_hash_from_rows)


class MySQLStyleError(Exception):
    """A statement the backend refuses; ``str()`` is the MySQL-style error text for the agent."""


_NUMBER = re.compile(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")


def _numeric_comparisons(tree):
    """``col <op> 17`` → ``CAST(col AS REAL) <op> 17``: MySQL compares TEXT with a number numerically.

    In INSERT/UPDATE/DELETE the cast is ``mysql_strict_num(col)``, which fails on a value that is
    not entirely a number: MySQL's strict mode turns that truncation warning into an error there
    (``1292 Truncated incorrect DOUBLE value``), while SELECT takes the numeric prefix.
    """
    from sqlglot import exp

    strict = isinstance(tree, (exp.Insert, exp.Update, exp.Delete))

    def is_num(node) -> bool:
        if isinstance(node, exp.Neg):
            node = node.this
        return isinstance(node, exp.Literal) and node.is_number

    def cast(node):
        if strict:
            return exp.Anonymous(this="mysql_strict_num", expressions=[node.copy()])
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
# Words a MySQL statement can begin with (or an opening parenthesis, a comment, nothing at all).
_STATEMENT_START = re.compile(
    r"^\s*($|[(;]|/\*|#|-- |(alter|analyze|begin|call|change|check|checksum|commit|create|deallocate|delete|"
    r"desc|describe|do|drop|execute|explain|flush|grant|handler|help|insert|kill|load|lock|optimize|"
    r"prepare|rename|repair|replace|reset|revoke|rollback|savepoint|select|set|show|start|table|"
    r"truncate|unlock|update|use|values|with|xa)\b)", re.I)
_FORBIDDEN = re.compile(r"^\s*(vacuum|attach|detach|pragma)\b", re.I)


def _unterminated_at(sql: str) -> Optional[int]:
    """Offset of a quote or ``/*`` comment that never closes (MySQL's lexer rules: backslash
    escapes in '...' and "...", doubled quotes), else None."""
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c in "'\"`":
            j = i + 1
            while j < n:
                if sql[j] == "\\" and c != "`":
                    j += 2
                elif sql[j] == c:
                    if j + 1 < n and sql[j + 1] == c:
                        j += 2
                    else:
                        break
                else:
                    j += 1
            if j >= n:
                return i
            i = j + 1
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            if end < 0:
                return i
            i = end + 2
        elif sql.startswith("#", i) or sql.startswith("-- ", i):
            end = sql.find("\n", i)
            i = n if end < 0 else end + 1
        else:
            i += 1
    return None


def _parse_error_at(sql: str, exc: Exception) -> Optional[int]:
    """Where MySQL would say the statement goes wrong, from sqlglot's error position: at the
    offending token, or after it when something is missing (MySQL then says ``near ''``)."""
    errors = getattr(exc, "errors", None) or []
    if not errors:
        return None
    err = errors[0]
    line, col, token = err.get("line"), err.get("col"), err.get("highlight") or ""
    if not isinstance(line, int) or not isinstance(col, int):
        return None
    lines = sql.split("\n")
    end = sum(len(x) + 1 for x in lines[:line - 1]) + col  # sqlglot's col is the token's end
    start = end - len(token)
    if sql[start:end] != token:
        start = sql.find(token) if token else -1
        if start < 0:
            return None
        end = start + len(token)
    desc = str(err.get("description", ""))
    if "missing" in desc or desc.startswith(("Expecting", "Expected")):
        return len(sql) if not sql[end:].strip() else end + (len(sql[end:]) - len(sql[end:].lstrip()))
    return start


def _no_string_tables(sql: str) -> None:
    """MySQL reads 'x' and "x" as strings, never as table names (sqlglot would accept them)."""
    from sqlglot.dialects.dialect import Dialect
    from sqlglot.tokens import TokenType

    tokens = Dialect.get_or_raise("mysql").tokenize(sql)
    for prev, tok in zip(tokens, tokens[1:]):
        if tok.token_type == TokenType.STRING and prev.token_type in (
                TokenType.FROM, TokenType.JOIN, TokenType.INTO, TokenType.UPDATE, TokenType.TABLE):
            raise MySQLStyleError(syntax_error(sql, tok.start))


def transpile_mysql(sql: str, tables: Sequence[str] = (), db: str = "") -> str:
    """The agent's MySQL statement as SQLite SQL; MySQLStyleError (MySQL's text) if it cannot be.

    ``tables``: the database's tables. A name that matches one only up to case is refused as
    unknown, as MySQL on Linux does (SQLite would accept it); ``db`` names the database then.
    """
    import sqlglot
    from sqlglot import exp
    from sqlglot.errors import ParseError, SqlglotError, TokenError

    if not _STATEMENT_START.match(sql):  # MySQL stops at the first word it cannot start with
        raise MySQLStyleError(syntax_error(sql, len(sql) - len(sql.lstrip())))
    try:
        _no_string_tables(sql)
        trees = [t for t in sqlglot.parse(sql, read="mysql") if t is not None]
    except TokenError:  # an unterminated quote or comment, a bad literal
        raise MySQLStyleError(syntax_error(sql, _unterminated_at(sql) or 0)) from None
    except ParseError as exc:
        raise MySQLStyleError(syntax_error(sql, _parse_error_at(sql, exc))) from None
    except (SqlglotError, RecursionError, ValueError) as exc:  # sqlglot gave up some other way
        raise MySQLStyleError(syntax_error(sql, 0)) from exc
    if not trees:
        raise MySQLStyleError("1065 (42000): Query was empty")
    if len(trees) > 1:
        raise MySQLStyleError(OUT_OF_SYNC)  # several statements: what AgentBench's client says
    by_lower = {t.lower(): t for t in tables}
    for node in trees[0].find_all(exp.Table):
        name = node.name
        if name and name not in by_lower.values() and name.lower() in by_lower:
            raise MySQLStyleError(f"1146 (42S02): Table '{db}.{name}' doesn't exist")
    try:
        return _numeric_comparisons(trees[0]).sql(dialect="sqlite")
    except (SqlglotError, RecursionError, ValueError) as exc:
        raise MySQLStyleError(syntax_error(sql, 0)) from exc


def _clause_of(sql: str, column: str) -> str:
    """MySQL's name for the clause where ``column`` appears (its 1054 error names it)."""
    import sqlglot
    from sqlglot import exp

    clauses = ((exp.Where, "where clause"), (exp.Order, "order clause"), (exp.Group, "group statement"),
               (exp.Having, "having clause"), (exp.Join, "on clause"))
    try:
        tree = sqlglot.parse_one(sql, read="mysql")
    except Exception:  # noqa: BLE001 — only used to word an error message
        return "field list"
    for col in tree.find_all(exp.Column):
        if col.sql(dialect="mysql").replace("`", "") != column and col.name != column:
            continue
        node = col.parent
        while node is not None and not isinstance(node, (exp.Select, exp.Update, exp.Delete, exp.Insert)):
            for cls, name in clauses:
                if isinstance(node, cls):
                    return name
            node = node.parent
        return "field list"
    return "field list"


def mysql_error_text(msg: str, sql: str, db: str) -> str:
    """SQLite's runtime error ``msg`` as the MySQL error of the same meaning (``db``: the name
    AgentBench's database has, i.e. the table's name)."""
    m = re.match(r"no such table: (?:main\.)?(.+)$", msg)
    if m:
        return f"1146 (42S02): Table '{db}.{m.group(1)}' doesn't exist"
    m = re.match(r"no such column: (.+)$", msg)
    if m:
        return f"1054 (42S22): Unknown column '{m.group(1)}' in '{_clause_of(sql, m.group(1))}'"
    m = re.match(r"table .+ has no column named (.+)$", msg)
    if m:
        return f"1054 (42S22): Unknown column '{m.group(1)}' in 'field list'"
    if re.match(r"(table \S.* has \d+ columns but \d+ values were supplied|\d+ values for \d+ columns)$", msg):
        return "1136 (21S01): Column count doesn't match value count at row 1"
    m = re.match(r"near \"(.*)\": syntax error$", msg, re.S)
    if m:
        pos = sql.find(m.group(1))
        return syntax_error(sql, pos if pos >= 0 else None)
    if msg in ("incomplete input",) or msg.startswith("unrecognized token"):
        m = re.match(r'unrecognized token: "(.*)"$', msg, re.S)
        pos = sql.find(m.group(1)) if m else -1
        return syntax_error(sql, pos if pos >= 0 else None)
    m = re.match(r"no such function: (.+)$", msg)
    if m:
        return f"1305 (42000): FUNCTION {db}.{m.group(1)} does not exist"
    m = re.match(r"wrong number of arguments to function (\w+)\(\)", msg)
    if m:
        return f"1582 (42000): Incorrect parameter count in the call to native function '{m.group(1)}'"
    if msg.startswith("misuse of aggregate"):
        return "1111 (HY000): Invalid use of group function"
    m = re.match(r"ambiguous column name: (.+)$", msg)
    if m:
        return f"1052 (23000): Column '{m.group(1)}' in field list is ambiguous"
    m = re.match(r"table (.+) already exists$", msg)
    if m:
        return f"1050 (42S01): Table '{m.group(1)}' already exists"
    if re.match(r"sub-select returns \d+ columns", msg):
        return "1241 (21000): Operand should contain 1 column(s)"
    if "interrupted" in msg:
        return "1969 (70100): Query execution was interrupted (max_statement_time exceeded)"
    if "not authorized" in msg:
        return f"1142 (42000): command denied: {msg}"
    if "one statement at a time" in msg:
        return OUT_OF_SYNC
    return f"1105 (HY000): {msg}"  # MySQL's "unknown error", with SQLite's own words


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


# Unicode collation (UCA) order of ASCII punctuation and symbols; all of them sort before digits,
# digits before letters — the order MySQL's UCA collations give.
_UCA_PUNCT = "\t\n\x0b\x0c\r _-\u2010\u2011\u2012\u2013\u2014\u2015,;:!?.'\"()[]{}@*/\\&#%`^+<=>|~$"
# Latin letters that Unicode does not decompose but UCA sorts as (or with) plain ones.
_UCA_LETTERS = str.maketrans({"ø": "o", "œ": "oe", "æ": "ae", "đ": "d", "ł": "l", "ħ": "h", "ı": "i"})


@functools.lru_cache(maxsize=65536)
def _collation_key(s: str) -> tuple:
    """Sort key that ignores case and accents (``'Montréal'`` = ``'montreal'``, ``'ß'`` = ``'ss'``)
    and orders punctuation < digits < letters, approximating MySQL 8's ``utf8mb4_0900_ai_ci``."""
    decomposed = unicodedata.normalize("NFKD", s)
    key = []
    folded = "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()
    for c in folded.translate(_UCA_LETTERS):
        if c.isdigit():
            key.append((1, unicodedata.digit(c, ord(c))))
        elif c.isalpha():
            key.append((2, ord(c)))
        else:
            i = _UCA_PUNCT.find(c)
            key.append((0, i if i >= 0 else 64 + ord(c)))
    return tuple(key)


def _mysql_ai_ci(a: str, b: str) -> int:
    ka, kb = _collation_key(a), _collation_key(b)
    return (ka > kb) - (ka < kb)


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
        self._truncated: Optional[str] = None  # the value a strict conversion refused
        self.conn.create_function("mysql_strict_num", 1, self._strict_num, deterministic=True)
        self.conn.create_collation("mysql_ai_ci", _mysql_ai_ci)
        cols = ", ".join(f"{quote_ident(c, chr(34))} TEXT COLLATE mysql_ai_ci" for c in columns)
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

    def _strict_num(self, value: Any) -> Optional[float]:
        if value is None or isinstance(value, (int, float)):
            return value
        if _NUMBER.match(str(value)):
            return float(value)
        self._truncated = str(value)
        raise ValueError("truncated")  # aborts (and rolls back) the statement

    def _run(self, sql: str) -> List[tuple]:
        self._truncated = None
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
            raise MySQLStyleError("1142 (42000): command denied to user for this statement")
        refused = mysql8_reserved_error(sql)
        if refused:
            raise MySQLStyleError(refused)
        tables = [r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return transpile_mysql(sql, tables, self.table)

    def execute(self, sql: str) -> str:
        """Run one agent statement; rows or a MySQL-style error text, never an exception."""
        try:
            rows = self._run(self._rewrite(sql))
        except MySQLStyleError as exc:
            return str(exc)
        except sqlite3.Error as exc:
            if self._truncated is not None:  # MySQL 8's words (MariaDB says DECIMAL)
                return f"1292 (22007): Truncated incorrect DOUBLE value: '{self._truncated}'"
            return mysql_error_text(str(exc), sql, self.table)
        except (ValueError, OverflowError, MemoryError) as exc:  # e.g. a NUL byte in the statement
            return f"1105 (HY000): {exc}"
        return format_rows(rows)

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


