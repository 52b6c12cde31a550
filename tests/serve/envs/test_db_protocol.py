"""DB environment under AgentBench.old's DBBench protocol, on both backends (MariaDB and SQLite):
the database's own error text for malformed SQL, how replies are parsed and judged, and the
gold statements / scripted expert on the paper's standard split (dbbench_std.jsonl, 300 records)."""

import json
import shutil
import time

import pytest

import serve.envs as envs
from serve.envs import db
from serve.envs.base import Status
from serve.envs.db import answers_match, parse_answer
from serve.envs.db_sqlite import MySQLStyleError, transpile_mysql

HAVE_MARIADB = bool(shutil.which("mariadbd", path="/usr/sbin:/usr/bin"))
BACKENDS = ["sqlite", pytest.param("mariadb", marks=pytest.mark.skipif(
    not HAVE_MARIADB, reason="mariadb-server not installed"))]
SYNTAX = ("1064 (42000): You have an error in your SQL syntax; check the manual that corresponds to "
          "your MySQL server version for the right syntax to use near '{}' at line 1")
AMBASSADORS = "US Ambassadors and Envoy Extraordinary to Colombia"  # table of dev record "0"


@pytest.fixture(scope="module", autouse=True)
def _stop_server():
    yield
    db.shutdown_backends()


@pytest.fixture(scope="module", params=BACKENDS)
def dev(request, bench_data):
    return envs.load("db", str(bench_data / "agentbench/dbbench_dev.jsonl"), backend=request.param,
                     statement_timeout=2.0)


@pytest.fixture(scope="module", params=BACKENDS)
def std(request, bench_data):
    return envs.load("db", str(bench_data / "agentbench/dbbench_std.jsonl"), backend=request.param,
                     statement_timeout=5.0)


def op(sql: str) -> str:
    return f"Thought: run it.\nAction: Operation\n```sql\n{sql}\n```"


def answer(text: str) -> str:
    return f"Thought: done.\nAction: Answer\nFinal Answer: {text}"


# ------------------------------------------------------------------ malformed SQL

# The same MySQL text on both backends: MariaDB's own error (worded as AgentBench's MySQL words
# it), SQLite's error mapped to it, sqlglot's own tokenizer/parser failures included.
SAME_ERROR = {
    f"SELECT * FROM `{AMBASSADORS}` WHERE Title = 'Envoy": SYNTAX.format("'Envoy"),  # unterminated quote
    "asdf qwer zxcv": SYNTAX.format("asdf qwer zxcv"),  # garbage
    f"SELECT * FROM `{AMBASSADORS}": SYNTAX.format(f"`{AMBASSADORS}"),  # unterminated name
    f"SELECT Title FROM `{AMBASSADORS}` WHERE": SYNTAX.format(""),  # cut short
    f'SELECT * FROM "{AMBASSADORS}"': SYNTAX.format(f'"{AMBASSADORS}"'),  # MySQL: a string, no table
    f"SELECT Title FROM `{AMBASSADORS}` WHERE Rank = 1": SYNTAX.format("= 1"),  # RANK: MySQL 8 reserved
    f"SELECT nope FROM `{AMBASSADORS}`": "1054 (42S22): Unknown column 'nope' in 'field list'",
    f"SELECT Title FROM `{AMBASSADORS}` WHERE nope = 1": "1054 (42S22): Unknown column 'nope' in 'where clause'",
    "SELECT * FROM no_such_table": f"1146 (42S02): Table '{AMBASSADORS}.no_such_table' doesn't exist",
    f"INSERT INTO `{AMBASSADORS}` VALUES ('x')": "1136 (21S01): Column count doesn't match value count at row 1",
    "SELECT 1; SELECT 2": "Commands out of sync; you can't run this command now",
}


def test_malformed_sql_gets_the_databases_error_and_the_episode_goes_on(dev):
    dev.reset("0")
    for sql, expected in SAME_ERROR.items():
        r = dev.step(op(sql))
        assert (r.observation, r.done, r.status) == (expected, False, None), (dev.backend.name, sql)
        assert "invalid" not in r.info
    r = dev.step(op(f"SELECT COUNT(*) FROM `{AMBASSADORS}`"))
    assert r.observation == "[(37,)]" and not r.done  # the agent goes on after all those errors
    label = dev.task("0").data["label"]
    r = dev.step(answer(json.dumps(label)))
    assert (r.done, r.status, r.reward, dev.turns) == (True, Status.COMPLETED, 1.0, len(SAME_ERROR) + 2)


def test_sqlglot_failures_become_mysql_syntax_errors():
    for sql, near in [("SELECT 'abc", "'abc"), ('SELECT "abc', '"abc'), ("SELECT /* open", "/* open"),
                      ("SELECT `a FROM t", "`a FROM t"), ("SELECT )(", ")("), ("SELECT 1 +", "")]:
        with pytest.raises(MySQLStyleError) as exc:
            transpile_mysql(sql)
        assert str(exc.value) == SYNTAX.format(near), sql
    with pytest.raises(MySQLStyleError, match="^1065 \\(42000\\): Query was empty$"):
        transpile_mysql(";")


def test_several_statements_in_one_block_run_nothing(dev):
    """AgentBench's client: 'Commands out of sync', and its reconnect rolls the block back."""
    tid = next(t for t in dev.tasks() if dev.task(t).data["type"][0] == "UPDATE")
    gold = dev.task(tid).data["label"][0].rstrip(";")
    dev.reset(tid)
    r = dev.step(op(f"{gold}; {gold}"))
    assert r.observation == "Commands out of sync; you can't run this command now" and not r.done
    r = dev.step(answer('["none"]'))
    assert r.reward == 0.0 and r.info["answer"] != dev.task(tid).data["answer_md5"]  # untouched
    dev.reset(tid)
    assert dev.step(op(gold + ";")).observation == "[]"  # one statement and its ';' is fine
    assert dev.step(answer('["none"]')).reward == 1.0


def test_slow_block_of_statements_is_cut(dev):
    if dev.backend.name != "mariadb":
        pytest.skip("SLEEP is MariaDB's")
    dev.reset("0")
    t0 = time.monotonic()
    r = dev.step(op("SELECT 1; SELECT SLEEP(30)"))
    assert r.observation.startswith("Commands out of sync") and time.monotonic() - t0 < 5.0
    assert dev.step(op(f"SELECT COUNT(*) FROM `{AMBASSADORS}`")).observation == "[(37,)]"


# Sorted as MySQL 8's utf8mb4_0900_ai_ci sorts (case and accents ignored, punctuation before
# digits before letters), by MariaDB's UCA collation and by the SQLite backend's own.
ORDERED = ["", " ", "_x", "-x", "–", "(x)", "#1", "$5", "1:52.37", "1/2", "23", "3", "DNF", "Éa", "ob",
           "Øc", "sr", "ß", "st", "x y", "xy", "z", "Zoë"]
EQUAL = [("Montréal", "montreal"), ("ß", "ss"), ("Zoë", "ZOE"), ("œ", "oe"), ("Øb", "ob")]
DIFFERENT = [("a", "a "), ("a", "b"), ("1", "1.0")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_text_compares_and_sorts_like_mysql8(backend):
    edb = db.get_backend(backend, 2.0).open("t", ["v", "w"], [[v, ""] for v in reversed(ORDERED)])
    try:
        assert edb.execute("SELECT v FROM t ORDER BY v") == str([(v,) for v in ORDERED])
        for a, b in EQUAL + DIFFERENT:
            edb.execute(f"UPDATE t SET w = '{b}' WHERE v = ''")
            want = "[('',)]" if (a, b) in EQUAL else "[]"
            assert edb.execute(f"SELECT v FROM t WHERE w = '{a}'") == want, (backend, a, b)
    finally:
        edb.close()


# ------------------------------------------------------------------ replies and judging


def _modify_task(env, kind="INSERT"):
    return next(t for t in env.tasks() if env.task(t).data["type"][0] == kind)


def test_reply_parsing_is_agentbenchs(dev):
    tid = _modify_task(dev)
    gold = dev.task(tid).data["label"][0]
    dev.reset(tid)
    assert dev.step(op("")).observation == "[]"  # empty block: nothing sent, "[]" shown
    r = dev.step(f"Action: Operation\n```sql\n{gold}```")  # no newline before the fence
    assert r.done and r.status == Status.INVALID_FORMAT and r.reward == 0.0
    assert r.info["invalid"] == "invalid_format" and "Action: Operation" in r.observation
    for bad in ["Action: operation\n```sql\nSELECT 1\n```", "Action:Operation\n```sql\nSELECT 1\n```",
                "SELECT 1", "Action: Operation"]:
        dev.reset(tid)
        r = dev.step(bad)
        assert r.done and r.status == Status.INVALID_FORMAT, bad


def test_modify_tasks_are_judged_on_the_table_however_the_episode_ends(dev):
    """AgentBench computes the table hash after every episode of an INSERT/UPDATE task."""
    tid = _modify_task(dev, "UPDATE")
    gold = dev.task(tid).data["label"][0]
    dev.reset(tid)
    dev.step(op(gold))
    r = dev.step("I am done.")  # no Action line: ends, judged on the table
    assert (r.done, r.status, r.reward) == (True, Status.INVALID_FORMAT, 1.0)
    short = dev.spawn()
    short.max_turns = 3  # two operations, then the last reply can only answer
    short.reset(tid)
    short.step(op(gold))
    short.step(op("SELECT 1"))
    r = short.step(op("DELETE FROM `{}`".format(dev.task(tid).data["table"]["table_name"])))
    assert (r.done, r.status, r.reward) == (True, Status.TURN_LIMIT, 1.0)  # the DELETE never ran
    dev.reset(tid)
    r = dev.step("Action: Answer\n")  # answers without a Final Answer line: judged, untouched table
    assert (r.done, r.status, r.reward) == (True, Status.COMPLETED, 0.0)


def test_select_answers_are_judged_with_agentbenchs_metric(dev):
    tid = "0"
    label = dev.task(tid).data["label"][0]
    assert dev.task(tid).data["label"] == [label] == ["March 19, 1998"]
    for text, reward in [(json.dumps([label]), 1.0), (label, 0.0), (f"['{label}']", 1.0),
                         (f"'{label}'", 0.0), ("", 0.0), (json.dumps([label, label]), 1.0)]:
        dev.reset(tid)
        r = dev.step(answer(text) if text else "Action: Answer\nFinal Answer:")
        assert r.reward == reward, (text, r.info)
    dev.reset(tid)
    r = dev.step(f"Final Answer: {json.dumps([label])}")  # no Action line, still judged
    assert r.status == Status.INVALID_FORMAT and r.reward == 0.0  # "\nFinal Answer:" needs a line before


def test_answer_metric_rules():
    assert parse_answer(' ["a", "b"]') == ["a", "b"]
    assert parse_answer(" Giza") == [" Giza"]  # not a literal: kept whole, leading space and all
    assert parse_answer("'ab'") == ["a", "b"]  # list(eval("'ab'")), as AgentBench does
    assert parse_answer("5") == ["5"]  # list(5) fails: the text itself
    assert answers_match(["1.0"], ["1"]) and answers_match([" 5"], ["5.00"])
    assert not answers_match(["1.0", "2"], ["1", "2"])  # several: compared as sets, no floats
    assert answers_match(["b", "a"], ["a", "b"]) and not answers_match([1, 2], ["1", "2"])
    assert not answers_match([["x"], "y"], ["x", "y"])  # unhashable: wrong, not a crash
    assert not answers_match([" Giza"], ["Giza"]) and answers_match(["Giza"], ["Giza"])


def test_max_invalid_gives_feedback_and_another_try(bench_data):
    env = envs.load("db", str(bench_data / "agentbench/dbbench_dev.jsonl"), backend="sqlite", max_invalid=1)
    env.reset("0")
    r = env.step("hello")
    assert not r.done and r.info["invalid"] == "invalid_format" and "Action: Answer" in r.observation
    r = env.step("hello again")
    assert r.done and r.status == Status.INVALID_FORMAT


# ------------------------------------------------------------------ standard split

# Why the gold statement misses answer_md5, the same on both backends (checked against MySQL's
# behaviour): 278 and 295 compare a TEXT column holding '?' / 'Replay' with a number in an
# UPDATE, which MySQL's strict mode refuses (1292 Truncated incorrect DOUBLE value) — the hash
# in the file is that of a lenient server; 225's answer_md5 matches neither the gold UPDATE nor
# the untouched table, nor any one-row change of Points (a defect of the record).
STD_GOLD_MISSES = {"225", "278", "295"}
STD_SKIPPED = {"17": "row 25 has 3 of 6 values", "77": "row 12 is empty"}
# A deterministic tenth of the split, plus every record with a known outcome: 206 updates
# 'Montreal-...' where the table says 'Montréal-...' (MySQL's collation ignores accents).
STD_SUBSET = sorted({str(i) for i in range(0, 300, 10)} - set(STD_SKIPPED) | STD_GOLD_MISSES | {"206"}, key=int)


def _expert_misses(env, ids):
    misses = {}
    for tid in ids:
        ep = envs.run_episode(env, tid)
        assert ep.status == Status.COMPLETED, (tid, ep.status)
        if ep.reward != 1.0:
            misses[tid] = ep.info
    return misses


def test_std_split_loads_with_stated_skips(std):
    assert len(std.tasks()) == 298 and set(std.skipped) == set(STD_SKIPPED)
    assert all("must be a list of rows with" in why for why in std.skipped.values())


def test_std_expert_on_a_fixed_subset(std):
    misses = _expert_misses(std, STD_SUBSET)
    assert set(misses) == STD_GOLD_MISSES, (std.backend.name, misses)
    std.reset("278")
    r = std.step(op(std.task("278").data["label"][0]))
    assert r.observation == "1292 (22007): Truncated incorrect " + (
        "DECIMAL" if std.backend.name == "mariadb" else "DOUBLE") + " value: '?'"


@pytest.mark.slow
def test_std_expert_on_every_record(std):
    t0 = time.monotonic()
    misses = _expert_misses(std, std.tasks())
    assert set(misses) == STD_GOLD_MISSES, (std.backend.name, misses)
    assert (len(std.tasks()) - len(misses)) / len(std.tasks()) >= 0.95
    print(f"{std.backend.name}: {len(std.tasks()) - len(misses)}/{len(std.tasks())} in {time.monotonic() - t0:.1f}s")
