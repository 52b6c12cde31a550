"""DB environment on the real DBBench dev file, on both backends (MariaDB server and SQLite)."""

import ast
import json
import re
import shutil
import time

import pytest

import serve.envs as envs
from serve.envs import db
from serve.envs.db import answers_match, parse_answer

BACKENDS = ["sqlite", pytest.param("mariadb", marks=pytest.mark.skipif(
    not shutil.which("mariadbd", path="/usr/sbin:/usr/bin"), reason="mariadb-server not installed"))]


@pytest.fixture(scope="module", autouse=True)
def _stop_server():
    yield
    db.shutdown_backends()  # the module owns the MariaDB server it started


@pytest.fixture(scope="module", params=BACKENDS)
def env(request, bench_data):
    e = envs.load("db", str(bench_data / "agentbench/dbbench_dev.jsonl"), backend=request.param,
                  statement_timeout=2.0)
    assert e.backend.name == request.param
    return e


def _records(env):
    return {tid: env.task(tid).data for tid in env.tasks()}


def _modify_ids(env):
    return [t for t, r in _records(env).items() if r["type"][0] in ("INSERT", "UPDATE", "DELETE")]


def test_expert_scores_every_record(env):
    assert len(env.tasks()) == 60 and not env.skipped
    results = {tid: envs.run_episode(env, tid) for tid in env.tasks()}
    bad = {t: (e.reward, e.status, e.info) for t, e in results.items() if e.reward != 1.0}
    assert not bad
    assert all(e.status == envs.Status.COMPLETED for e in results.values())


def _answer(env, tid, sql=None, answer='["none"]'):
    env.reset(tid)
    if sql:
        obs = env.step(f"Action: Operation\n```sql\n{sql}\n```")
        assert not obs.done and not re.match(r"^\d{4} \(", obs.observation), obs.observation
    return env.step(f"Action: Answer\nFinal Answer: {answer}")


def _perturb(sql: str) -> str:
    """Change the last quoted literal (or number) of a gold statement."""
    lits = list(re.finditer(r"'((?:[^'\\]|\\.|'')*)'", sql))
    if lits:
        m = lits[-1]
        return sql[:m.end() - 1] + "_x" + sql[m.end() - 1:]
    m = list(re.finditer(r"\b\d+\b", sql))[-1]
    return sql[:m.start()] + str(int(m.group()) + 1) + sql[m.end():]


def test_hash_gold_reproduces_perturbed_and_untouched_do_not(env):
    ids = _modify_ids(env)
    assert len(ids) == 40
    for tid in ids:
        rec = env.task(tid).data
        gold = _answer(env, tid, rec["label"][0])
        assert gold.reward == 1.0 and gold.info["answer"] == rec["answer_md5"], tid
        assert _answer(env, tid).reward == 0.0, tid  # untouched table
        perturbed = _answer(env, tid, _perturb(rec["label"][0]))
        assert perturbed.reward == 0.0, (tid, _perturb(rec["label"][0]))


def test_wrong_select_answers_score_zero(env):
    selects = [t for t in env.tasks() if t not in _modify_ids(env)]
    assert len(selects) == 20
    for tid in selects:
        label = env.task(tid).data["label"]
        assert _answer(env, tid, answer=json.dumps(label)).reward == 1.0
        assert _answer(env, tid, answer='["definitely wrong", "42.5"]').reward == 0.0
        if len(label) > 1:  # a subset of a multi-row answer is wrong too
            assert _answer(env, tid, answer=json.dumps(label[:-1])).reward == 0.0


def test_answer_comparison_rules():
    assert answers_match(parse_answer('["1.0"]'), ["1"])
    assert answers_match(parse_answer("['b', 'a']"), ["a", "b"])
    assert answers_match(parse_answer("Giza"), ["Giza"])
    assert not answers_match(parse_answer('["giza"]'), ["Giza"])
    assert not answers_match(parse_answer('["2"]'), ["2.5"])


def test_bad_agent_output_and_sql_errors(env):
    tid = env.tasks()[0]
    env.reset(tid)
    r = env.step("SELECT * FROM t")  # no Action line
    assert r.done and r.status == envs.Status.INVALID_FORMAT and "Action: Operation" in r.observation
    env.reset(tid)
    r = env.step("Action: Operation\n```sql\nSELEC oops FROM nowhere\n```")
    assert not r.done and r.observation.startswith("1064 (42000): ")
    r = env.step("Action: Operation\n```sql\nSELECT * FROM no_such_table\n```")
    assert not r.done and r.observation.startswith("1146 (42S02): ")
    r = env.step("Action: Operation\n```sql\nSELECT * FROM `US Ambassadors and Envoy Extraordinary to Colombia`\n```")
    assert r.observation.endswith("[TRUNCATED]") and len(r.observation) == 800 + len("[TRUNCATED]")


HOSTILE = {
    "sqlite": ["ATTACH DATABASE '/tmp/agt_attack.db' AS x", "VACUUM INTO '/tmp/agt_attack.db'",
               "SELECT load_extension('/tmp/evil')", "PRAGMA writable_schema = ON"],
    "mariadb": ["SELECT * FROM mysql.user", "SELECT 1 INTO OUTFILE '/tmp/agt_attack.txt'",
                "CREATE DATABASE other_db", "GRANT ALL ON *.* TO CURRENT_USER()",
                "LOAD DATA INFILE '/etc/passwd' INTO TABLE t"],
}


def test_hostile_sql_is_refused_and_slow_sql_is_cut(env, tmp_path):
    name = env.backend.name
    env.reset(env.tasks()[0])
    for sql in HOSTILE[name]:
        r = env.step(f"Action: Operation\n```sql\n{sql}\n```")
        assert re.match(r"^\d{4} \(\w{5}\): ", r.observation), (sql, r.observation)
        env.reset(env.tasks()[0])  # fresh episode: avoids the repetition rule, checks cleanup
    assert not any(p.exists() for p in map(__import__("pathlib").Path,
                                           ["/tmp/agt_attack.db", "/tmp/agt_attack.txt"]))
    slow = ("SELECT SLEEP(30)" if name == "mariadb" else
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c")
    t0 = time.monotonic()
    r = env.step(f"Action: Operation\n```sql\n{slow}\n```")
    assert time.monotonic() - t0 < 2.0 + 6.0 and r.observation.startswith("1969 (70100)")
    if name == "mariadb":  # lifting the session limit does not help: the client cuts it
        env.step("Action: Operation\n```sql\nSET SESSION max_statement_time = 0\n```")
        t0 = time.monotonic()
        r = env.step("Action: Operation\n```sql\nSELECT SLEEP(30)\n```")
        assert time.monotonic() - t0 < 2.0 + 8.0 and r.observation.startswith("1969 (70100)")
        r = env.step("Action: Operation\n```sql\nSELECT COUNT(*) FROM `US Ambassadors and Envoy Extraordinary to Colombia`\n```")
        assert r.observation == "[(37,)]"  # the episode goes on, on a fresh connection


def test_skipped_records_have_reasons(tmp_path, bench_data):
    good = json.loads(open(bench_data / "agentbench" / "dbbench_dev.jsonl").readline())
    bad = dict(good)
    del bad["table"]
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join([json.dumps(good), json.dumps(bad), "{not json"]) + "\n")
    e = envs.load("db", str(p), backend="sqlite")
    assert e.tasks() == ["0"]
    assert e.skipped == {"1": "missing field 'table'", "2": e.skipped["2"]}
    assert "not JSON" in e.skipped["2"]


# MySQL-style agent queries: numeric comparison on TEXT columns, CONCAT, LIMIT a,b, escapes,
# case-insensitive equality; both backends must agree on these.
ROWS = [["5", "a", "x"], ["29", "B", "y"], ["100", "c", None], ["17", "O'Neil", "z"]]
SAME = {
    "SELECT Name FROM `Foot ball` WHERE Goal < 17": "[('a',)]",  # SQLite alone: '100','17' too
    "SELECT Name FROM `Foot ball` WHERE Goal > '17'": "[('B',), ('a',)]",  # string compare
    "SELECT Name FROM `Foot ball` WHERE Goal BETWEEN 10 AND 50": "[('B',), ('O\\'Neil',)]",
    "SELECT CONCAT(Name, '-', Club) FROM `Foot ball` LIMIT 1,2": "[('B-y',), ('c-None',)]",
    "SELECT Goal FROM `Foot ball` WHERE Name = 'O\\'Neil'": "[('17',)]",
    "SELECT Name FROM `Foot ball` WHERE Name = 'b'": "[('B',)]",
    "SELECT CAST(Goal AS UNSIGNED) FROM `Foot ball` WHERE Goal IN (5, 100)": "[(5,), (100,)]",
    "SELECT MAX(Goal) FROM `Foot ball`": "[('5',)]",
    "SELECT SUM(Goal), COUNT(*) FROM `Foot ball`": "[(151.0, 4)]",
    "SELECT IFNULL(NULL, Name) FROM `Foot ball` WHERE Goal = 5": "[('a',)]",
    "SELECT 'a' = 'a '": "[(0,)]",  # MySQL 8's collation is NO PAD
    "SELECT Name FROM `Foot ball` WHERE Name = 'ó\\'néil'": "[('O\\'Neil',)]",  # accents ignored
    "SELECT Name FROM `Foot ball` ORDER BY Name": "[('a',), ('B',), ('c',), ('O\\'Neil',)]",
}
# Where SQLite still differs (documented in docs/environments.md).
DIFFERENT = ["SELECT 7/2", "SELECT YEAR('2001-05-02')", "SELECT Goal + 0 FROM `Foot ball`"]


def test_mysql_style_queries_agree_across_backends(env):
    edb = env.backend.open("Foot ball", ["Goal", "Name", "Club"], ROWS)
    try:
        for sql, expected in SAME.items():
            got = edb.execute(sql)
            # Row order is unspecified without ORDER BY: compare sorted rows.
            assert sorted(ast.literal_eval(got)) == sorted(ast.literal_eval(expected)), (
                env.backend.name, sql, got)
    finally:
        edb.close()


def test_known_differences_are_real(bench_data):
    outs = {}
    for b in ("sqlite", "mariadb"):
        if b == "mariadb" and not shutil.which("mariadbd", path="/usr/sbin:/usr/bin"):
            pytest.skip("mariadb-server not installed")
        edb = db.get_backend(b, 2.0).open("Foot ball", ["Goal", "Name", "Club"], ROWS)
        outs[b] = [edb.execute(q) for q in DIFFERENT]
        edb.close()
    for q, s, m in zip(DIFFERENT, outs["sqlite"], outs["mariadb"]):
        assert s != m, q
