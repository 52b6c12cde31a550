"""SQL backends of the DB environment: a project-owned MariaDB server, and SQLite + sqlglot.

Both give each episode a fresh database holding one table (every column TEXT, as AgentBench
builds it), run the agent's statements with a time limit, format results and errors the way
AgentBench's MySQL client (mysql-connector) shows them (``str(cursor.fetchall())``,
``"1064 (42000): ..."``), and compute AgentBench's table hash for INSERT/UPDATE/DELETE scoring.

MariaDB (default when ``mariadbd`` is installed): one server per owning process, started on a
private unix socket (``--skip-networking``: no TCP port), its own datadir in a temp directory,
MySQL 8's strict sql_mode, ``group_concat_max_len=1024`` (so hashes match MySQL's) and the
collation nearest to MySQL 8's default. Each episode gets its own database and a user that can
touch only that database, with a per-user statement time limit. The agent's connection behaves
like AgentBench's: a block of several statements gets "Commands out of sync" and is rolled
back; each call is committed. Where MariaDB 10.11 would accept what MySQL 8 (AgentBench's
server) refuses — words MySQL 8 reserves — the statement is refused with MySQL's error, and
error texts cite MySQL and name the database as AgentBench's (after the table). A watchdog
shell stops the server when the owning process dies, so a crash never leaves a server behind.

SQLite (fallback, zero install) is in ``serve/envs/db_sqlite.py``.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Any, List, Optional, Sequence

log = logging.getLogger(__name__)

MAX_FETCH_ROWS = 1000  # rows read back per statement; the observation is truncated anyway
# MySQL 8's default collation (AgentBench's server) is utf8mb4_0900_ai_ci: UCA-based, accent- and
# case-insensitive, NO PAD ('a' <> 'a '). MariaDB 10.11's nearest is UCA 5.2 with NO PAD.
COLLATION = "utf8mb4_unicode_520_nopad_ci"
MYSQL8_SQL_MODE = ("ONLY_FULL_GROUP_BY,STRICT_TRANS_TABLES,NO_ZERO_IN_DATE,NO_ZERO_DATE,"
                   "ERROR_FOR_DIVISION_BY_ZERO,NO_ENGINE_SUBSTITUTION")
# SQLSTATE of common server errors (pymysql drops it; AgentBench's client prints it).
_SQLSTATE = {1044: "42000", 1045: "28000", 1048: "23000", 1049: "42000", 1050: "42S01",
             1051: "42S02", 1052: "23000", 1054: "42S22", 1055: "42000", 1060: "42S21",
             1062: "23000", 1064: "42000", 1065: "42000", 1066: "42000", 1111: "HY000",
             1136: "21S01", 1140: "42000", 1142: "42000", 1146: "42S02", 1227: "42000",
             1241: "21000", 1242: "21000", 1248: "42000", 1264: "22003", 1292: "22007",
             1305: "42000", 1366: "HY000", 1406: "22001", 1582: "42000", 1630: "42000",
             1969: "70100"}
# What AgentBench's client (mysql-connector, ``cursor.execute(sql, multi=True)`` then
# ``fetchall()`` and ``commit()``) shows when the block holds several statements: the pending
# results make the commit fail, and the reconnect before the next statement rolls them back.
# Checked with mysql-connector-python 8.0.33 against this server.
OUT_OF_SYNC = "Commands out of sync; you can't run this command now"
_SYNTAX = ("1064 (42000): You have an error in your SQL syntax; check the manual that corresponds to "
           "your MySQL server version for the right syntax to use near '{near}' at line {line}")


# MariaDB's clause names in "Unknown column 'x' in '...'" -> MySQL 8's.
MYSQL_CLAUSE = {"SELECT": "field list", "SET": "field list", "INSERT INTO": "field list",
                "WHERE": "where clause", "ORDER BY": "order clause", "GROUP BY": "group statement",
                "HAVING": "having clause", "ON": "on clause"}


class BackendError(RuntimeError):
    """The backend itself is unusable (server failed to start, ...)."""


class MySQL8Refusal(ValueError):
    """A statement MySQL 8 would refuse before running it; ``str()`` is its error text."""


def table_hash_from_rows(rows: Sequence[Sequence[Any]]) -> str:
    """AgentBench's INSERT/UPDATE/DELETE answer, computed in Python from the table's rows.

    ``md5(group_concat(rowhash order by rowhash))`` over
    ``rowhash = substring(md5(concat_ws(',', cols...)), 1, 5)``, MySQL's group_concat cut at
    1024 bytes, printed as ``str(cursor.fetchall())``.
    """
    hashes = sorted(
        hashlib.md5(",".join(str(v) for v in row if v is not None).encode()).hexdigest()[:5]
        for row in rows
    )
    if not hashes:
        return "[(None,)]"  # md5(NULL) over an empty table
    joined = ",".join(hashes)[:1024]
    return str([(hashlib.md5(joined.encode()).hexdigest(),)])


def format_rows(rows: Sequence[Sequence[Any]]) -> str:
    """What AgentBench shows the agent: ``str(cursor.fetchall())``."""
    return str([tuple(r) for r in rows])


def quote_ident(name: str, quote: str = "`") -> str:
    return quote + name.replace(quote, quote * 2) + quote


# Words MySQL 8 (AgentBench's server) reserves but MariaDB 10.11 and SQLite accept as plain
# names, so `SELECT Rank FROM t` must fail here as it fails there (28 of the 300 standard DB
# tables have a "Rank" column). Those that name a function (RANK(), ROW(...)) fail at the token
# after them unless it is "("; the others fail at the word itself.
_MYSQL8_FUNCTION_WORDS = {"cume_dist", "dense_rank", "first_value", "grouping", "json_table", "lag",
                          "last_value", "lead", "nth_value", "ntile", "percent_rank", "rank", "row"}
_MYSQL8_OTHER_WORDS = {"cube", "empty", "function", "generated", "groups", "lateral", "of",
                       "optimizer_costs", "stored", "system", "virtual", "window"}
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")


def _bare_words(sql: str):
    """(start, word) of every unquoted word outside strings, quoted names and comments."""
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c in "'\"`":
            j = i + 1
            while j < n and sql[j] != c:
                j += 2 if sql[j] == "\\" and c != "`" else 1
            i = j + 1
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            i = n if end < 0 else end + 2
        elif c == "#" or sql.startswith("-- ", i):
            end = sql.find("\n", i)
            i = n if end < 0 else end + 1
        else:
            m = _WORD.match(sql, i)
            if m and (i == 0 or not (sql[i - 1].isalnum() or sql[i - 1] in "_$@")):
                yield i, m.group(0)
                i = m.end()
            else:
                i += 1


def mysql8_reserved_error(sql: str) -> Optional[str]:
    """MySQL 8's syntax error for a word it reserves and MariaDB does not, used as a bare name."""
    for start, word in _bare_words(sql):
        low = word.lower()
        if low not in _MYSQL8_FUNCTION_WORDS and low not in _MYSQL8_OTHER_WORDS:
            continue
        before = sql[:start].rstrip()
        if before.endswith("."):  # a name after a dot is always a name in MySQL
            continue
        after = start + len(word)
        rest = sql[after:]
        nxt = after + len(rest) - len(rest.lstrip())
        if low in _MYSQL8_FUNCTION_WORDS:
            if sql[nxt:nxt + 1] == "(":
                continue
            return syntax_error(sql, nxt)
        return syntax_error(sql, start)
    return None


def syntax_error(sql: str, at: Optional[int]) -> str:
    """MySQL's ER_PARSE_ERROR text for ``sql`` failing at offset ``at``: the rest of the statement
    from there, cut at 80 characters (``near '%-.80s' at line %d``); ``None`` = end of input."""
    at = len(sql) if at is None else max(0, min(int(at), len(sql)))
    return _SYNTAX.format(near=sql[at:][:80], line=sql.count("\n", 0, at) + 1)


# ============================================================================ MariaDB


def _sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def _watchdog_script(argv: List[str], parent: int, datadir_root: str) -> str:
    """A shell that runs mariadbd and stops it when ``parent`` dies or the shell is told to."""
    cmd = " ".join(_sh_quote(a) for a in argv)
    return (f"{cmd} & child=$!\n"
            "trap 'kill -TERM $child 2>/dev/null; wait $child; exit 0' TERM INT\n"
            f"while kill -0 {parent} 2>/dev/null && kill -0 $child 2>/dev/null; do sleep 1 & wait $!; done\n"
            "kill -TERM $child 2>/dev/null; wait $child\n"
            f"rm -rf {_sh_quote(datadir_root)}\n")  # the owner may have died without cleaning up


class MariaDBServer:
    """A private mariadbd: own datadir and unix socket, no TCP, stopped with its owner."""

    def __init__(self, root: Optional[str] = None, statement_timeout: float = 5.0) -> None:
        self.mariadbd = shutil.which("mariadbd", path=os.environ.get("PATH", "") + ":/usr/sbin:/usr/libexec")
        self.install_db = shutil.which("mariadb-install-db")
        if not self.mariadbd or not self.install_db:
            raise BackendError("mariadb-server is not installed (apt-get install mariadb-server)")
        self.statement_timeout = statement_timeout
        # A short path: unix socket paths are limited to ~107 bytes.
        self.dir = tempfile.mkdtemp(prefix="agtdb-", dir=root)
        os.chmod(self.dir, 0o700)  # only our OS user may reach the socket
        self.socket = os.path.join(self.dir, "mysqld.sock")
        self.proc: Optional[subprocess.Popen] = None
        self._lock = threading.Lock()

    def start(self, timeout: float = 60.0) -> "MariaDBServer":
        t0 = time.monotonic()
        data, files = os.path.join(self.dir, "data"), os.path.join(self.dir, "files")
        os.makedirs(files)
        common = ["--no-defaults", f"--datadir={data}", "--innodb-log-file-size=8M",
                  "--innodb-buffer-pool-size=32M"]
        user = ["--user=root"] if os.geteuid() == 0 else []  # mariadbd refuses root without it
        shutil.copytree(self._pristine_datadir(common[1:], user, timeout), data, symlinks=True)
        argv = [self.mariadbd, *common, *user, f"--socket={self.socket}", "--skip-networking",
                f"--pid-file={os.path.join(self.dir, 'mysqld.pid')}",
                f"--log-error={os.path.join(self.dir, 'error.log')}",
                f"--secure-file-priv={files}", f"--sql-mode={MYSQL8_SQL_MODE}",
                "--group-concat-max-len=1024", "--character-set-server=utf8mb4",
                f"--collation-server={COLLATION}", "--performance-schema=OFF",
                "--skip-log-bin", "--innodb-flush-log-at-trx-commit=0", "--innodb-flush-method=nosync",
                "--innodb-doublewrite=0", "--sync-frm=0", "--max-connections=500",
                "--skip-name-resolve", "--local-infile=0"]
        self.proc = subprocess.Popen(["bash", "-c", _watchdog_script(argv, os.getpid(), self.dir)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        atexit.register(self.stop)
        while True:
            try:
                self.connect().close()
                break
            except Exception as exc:  # noqa: BLE001 — retried until the server answers
                if self.proc.poll() is not None or time.monotonic() - t0 > timeout:
                    err = self._error_log_tail()
                    self.stop()
                    raise BackendError(f"mariadbd did not start: {exc}; log: {err}") from None
                time.sleep(0.2)
        log.info("MariaDB started on %s in %.1fs", self.socket, time.monotonic() - t0)
        return self

    def _pristine_datadir(self, opts: List[str], user: List[str], timeout: float) -> str:
        """An initialised, never-started datadir, made once per machine and user (mariadb-install-db
        takes seconds; copying the result takes milliseconds). Every server starts from a copy."""
        version = os.path.basename(os.path.realpath(self.mariadbd)) + str(int(os.stat(self.mariadbd).st_mtime))
        cache = os.path.join(tempfile.gettempdir(), f"agt-mariadb-pristine-{os.geteuid()}-{version}")
        if os.path.isfile(os.path.join(cache, "mysql_upgrade_info")):
            return cache
        build = tempfile.mkdtemp(prefix="agt-mariadb-build-")
        target = os.path.join(build, "data")
        opts = [o for o in opts if not o.startswith("--datadir=")]
        proc = subprocess.run(
            [self.install_db, "--no-defaults", f"--datadir={target}", *opts, *user,
             "--auth-root-authentication-method=normal", "--skip-test-db", "--skip-name-resolve"],
            capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            shutil.rmtree(build, ignore_errors=True)
            raise BackendError(f"mariadb-install-db failed: {proc.stdout[-800:]}{proc.stderr[-800:]}")
        try:
            os.rename(target, cache)  # atomic: a concurrent builder's copy wins, ours is dropped
        except OSError:
            pass
        shutil.rmtree(build, ignore_errors=True)
        return cache

    def _error_log_tail(self) -> str:
        try:
            with open(os.path.join(self.dir, "error.log")) as f:
                return f.read()[-1500:]
        except OSError:
            return "(no error log)"

    def connect(self, user: str = "root", password: str = "", database: Optional[str] = None,
                read_timeout: Optional[float] = None, agent: bool = False):
        """A client connection. ``agent``: the way AgentBench's client talks to its server —
        several statements per call allowed, no autocommit (the caller commits each call)."""
        import pymysql  # imported here: the SQLite backend needs no MySQL client
        from pymysql.constants import CLIENT

        return pymysql.connect(unix_socket=self.socket, user=user, password=password,
                               database=database, autocommit=not agent, charset="utf8mb4", collation=COLLATION,
                               connect_timeout=10, read_timeout=read_timeout, ssl_disabled=True,
                               client_flag=CLIENT.MULTI_STATEMENTS if agent else 0)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Stop the server and delete its datadir. Idempotent."""
        with self._lock:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, 9)
                    self.proc.wait(timeout=10)
            self.proc = None
            shutil.rmtree(self.dir, ignore_errors=True)


class MariaDBBackend:
    """Per-episode databases on a shared MariaDBServer."""

    name = "mariadb"

    def __init__(self, statement_timeout: float = 5.0, root: Optional[str] = None) -> None:
        self.statement_timeout = statement_timeout
        self.server = MariaDBServer(root=root, statement_timeout=statement_timeout).start()
        self._admin = self.server.connect()
        self._admin_lock = threading.Lock()

    def admin(self, sql: str, args: Any = None) -> List[tuple]:
        with self._admin_lock:
            try:
                self._admin.ping(reconnect=True)
            except Exception:  # noqa: BLE001 — a dead admin connection is simply replaced
                self._admin = self.server.connect()
            with self._admin.cursor() as cur:
                cur.execute(sql, args)
                return list(cur.fetchall())

    def open(self, table: str, columns: List[str], rows: List[List[Any]],
             statement_timeout: Optional[float] = None) -> "MariaDBEpisode":
        return MariaDBEpisode(self, table, columns, rows, statement_timeout or self.statement_timeout)

    def shutdown(self) -> None:
        try:
            self._admin.close()
        except Exception:  # noqa: BLE001 — the server is going away anyway
            pass
        self.server.stop()


def _mysql_error(exc: Exception) -> str:
    """``"1064 (42000): You have an error ..."`` as mysql.connector (AgentBench) prints it."""
    args = getattr(exc, "args", ())
    if len(args) >= 2 and isinstance(args[0], int):
        state = getattr(exc, "sqlstate", None) or _SQLSTATE.get(args[0], "HY000")
        # AgentBench's server is MySQL: its manual, not MariaDB's, is what the error cites,
        # and it names clauses its own way in 1054 errors.
        msg = str(args[1]).replace("your MariaDB server version", "your MySQL server version")
        if args[0] == 1054:
            msg = re.sub(r" in '([A-Z ]+)'$", lambda m: f" in '{MYSQL_CLAUSE.get(m.group(1), m.group(1))}'", msg)
        return f"{args[0]} ({state}): {msg}"
    return str(exc)


class MariaDBEpisode:
    """One database + one restricted user + the agent's connection."""

    def __init__(self, backend: MariaDBBackend, table: str, columns: List[str], rows: List[List[Any]],
                 timeout: float):
        self.backend, self.table, self.columns, self.timeout = backend, table, columns, float(timeout)
        self.db = "ep_" + secrets.token_hex(6)
        self.user, password = self.db, secrets.token_hex(16)
        db, t = quote_ident(self.db), quote_ident(table)
        backend.admin(f"CREATE DATABASE {db} CHARACTER SET utf8mb4 COLLATE {COLLATION}")
        try:
            limit = self.timeout
            backend.admin(f"CREATE USER %s@'localhost' IDENTIFIED BY %s "
                          f"WITH MAX_USER_CONNECTIONS 4 MAX_STATEMENT_TIME {limit}", (self.user, password))
            backend.admin(f"GRANT ALL PRIVILEGES ON {db}.* TO %s@'localhost'", (self.user,))
            cols = ", ".join(f"{quote_ident(c)} TEXT" for c in columns)
            backend.admin(f"CREATE TABLE {db}.{t} ({cols})")
            if rows:
                marks = "(" + ", ".join(["%s"] * len(columns)) + ")"
                with backend._admin_lock, backend._admin.cursor() as cur:
                    cur.executemany(f"INSERT INTO {db}.{t} VALUES {marks}",
                                    [[str(v) for v in r] for r in rows])
            # Client-side backstop: the agent can lift its session's max_statement_time with
            # SET, so a read timeout just above the limit kills and replaces the connection.
            self.conn = backend.server.connect(self.user, password, self.db,
                                               read_timeout=limit + 2, agent=True)
        except Exception:
            self.close()
            raise

    def _run(self, sql: str) -> tuple:
        """Send ``sql``; the first result's rows, and whether more statements followed it."""
        refused = mysql8_reserved_error(sql)
        if refused:
            raise MySQL8Refusal(refused)
        cur = self.conn.cursor()
        cur.execute(sql)
        rows = list(cur.fetchmany(MAX_FETCH_ROWS)) if cur.description else []
        # Not cur.close(): that would wait for (and run) every further statement of the block.
        more = bool(getattr(getattr(cur, "_result", None), "has_next", False))
        if more:
            self._reconnect()  # the kill rolls the block back, as AgentBench's next reconnect does
        else:
            self.conn.commit()
        return rows, more

    def execute(self, sql: str) -> str:
        """Run the agent's block; rows or the server's error text, never an exception."""
        import pymysql

        try:
            rows, more = self._run(sql)
            return OUT_OF_SYNC if more else format_rows(rows)
        except MySQL8Refusal as exc:
            return str(exc)
        except pymysql.err.OperationalError as exc:
            if exc.args and exc.args[0] in (2013, 2006):  # our read timeout fired: kill, reconnect
                self._reconnect()
                if exc.args[0] == 2013:
                    return "1969 (70100): Query execution was interrupted (max_statement_time exceeded)"
            return self._error_text(exc)
        except pymysql.MySQLError as exc:
            return self._error_text(exc)

    def _error_text(self, exc: Exception) -> str:
        try:  # end the failed call's transaction (its locks), as AgentBench's reconnect does
            self.conn.rollback()
        except Exception:  # noqa: BLE001 — a broken connection is replaced on the next timeout
            pass
        # AgentBench's database is named after the table: 'Foot ball.nope', not 'ep_1a2b.nope'.
        return _mysql_error(exc).replace(f"{self.db}.", f"{self.table}.")

    def _reconnect(self) -> None:
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001 — already broken
            pass
        import pymysql

        for (pid,) in self.backend.admin(
                "SELECT id FROM information_schema.processlist WHERE user = %s", (self.user,)):
            try:
                self.backend.admin(f"KILL {int(pid)}")
            except pymysql.MySQLError as exc:  # 1094: it ended by itself meanwhile
                if not exc.args or exc.args[0] != 1094:
                    raise
        password = secrets.token_hex(16)
        self.backend.admin("ALTER USER %s@'localhost' IDENTIFIED BY %s", (self.user, password))
        self.conn = self.backend.server.connect(self.user, password, self.db,
                                                read_timeout=self.timeout + 2, agent=True)

    def table_hash(self) -> str:
        """AgentBench's md5 query, run by the server itself (exact MySQL semantics)."""
        cols = ", ".join(quote_ident(c) for c in self.columns)
        sql = (f"SELECT md5(group_concat(rowhash ORDER BY rowhash)) AS hash FROM ("
               f"SELECT substring(md5(concat_ws(',', {cols})), 1, 5) AS rowhash "
               f"FROM {quote_ident(self.db)}.{quote_ident(self.table)}) AS sub")
        try:
            return format_rows(self.backend.admin(sql))
        except Exception as exc:  # noqa: BLE001 — e.g. the agent dropped the table: no match
            return _mysql_error(exc)

    def query(self, sql: str) -> List[tuple]:
        """Run one statement with the agent's rights; raises on error (used by the expert)."""
        rows, more = self._run(sql)
        if more:
            raise ValueError(OUT_OF_SYNC)
        return rows

    def close(self) -> None:
        conn = getattr(self, "conn", None)
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 — best effort
                pass
        for sql in (f"DROP DATABASE IF EXISTS {quote_ident(self.db)}", "DROP USER IF EXISTS %s@'localhost'"):
            try:
                self.backend.admin(sql, (self.user,) if "%s" in sql else None)
            except Exception as exc:  # noqa: BLE001 — logged; the server is dropped at exit anyway
                log.warning("db cleanup %s: %s", self.db, exc)
