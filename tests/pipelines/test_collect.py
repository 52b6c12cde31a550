"""AgentInstruct construction: derivation, offline collection (scripted expert), a teacher behind a
real OpenAI-compatible HTTP server (the served tiny model; a scripted server that answers 429 /
sleeps / returns malformed JSON), decontamination, dedup and resume (real local Ray)."""

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pytest

from agenttuning.config import ConfigError, load_config
from pipelines.collect import has_thoughts, main, task_start
from pipelines.derive import derive_db, norm_question
from serve.envs import db, db_backends

DEV = "agentbench/dbbench_dev.jsonl"


def _records(bench_data, idx):
    lines = (bench_data / DEV).read_text().splitlines()
    return [json.loads(lines[i]) for i in idx]


def _write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    return str(path)


def _play_all(path, backend):
    from serve.envs import load, run_episode

    env = load("db", str(path), backend=backend)
    try:
        return {tid: run_episode(env, tid) for tid in env.tasks()}
    finally:
        env.shutdown()


# ----------------------------------------------------------------------------- derivation


def test_derive_db_executed_gold_answers(bench_data, tmp_path):
    src = str(bench_data / DEV)
    out = tmp_path / "derived.jsonl"
    stats = derive_db(src, str(out), per_table=3, seed=0, backend="sqlite")
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert stats["tables"] == 60 and len(recs) == stats["written"] >= 170
    kinds = {r["type"][0] for r in recs}
    assert {"SELECT", "counting", "aggregation", "INSERT", "UPDATE", "DELETE"} <= kinds
    # Nothing derived equals a source (evaluation) question; questions are distinct.
    dev_q = {norm_question(r["description"]) for r in _records(bench_data, range(60))}
    assert not dev_q & {norm_question(r["description"]) for r in recs}
    assert len({r["description"] for r in recs}) == len(recs)
    # Labels are executed answers: recount COUNT(*) questions in Python from the table rows.
    n_checked = 0
    for r in recs:
        m = re.fullmatch(r"SELECT COUNT\(\*\) FROM `[^`]+` WHERE `([^`]+)` = '(.*)'", (r.get("sql") or {}).get("query", ""))
        if m:
            i = [c["name"] for c in r["table"]["table_info"]["columns"]].index(m.group(1))
            want = m.group(2).replace("''", "'").lower()
            assert r["label"] == [str(sum(1 for row in r["table"]["table_info"]["rows"] if row[i].lower() == want))]
            n_checked += 1
    assert n_checked >= 10
    # The DB environment plays the file unchanged and its expert (gold SQL) solves every task.
    eps = _play_all(out, "sqlite")
    assert len(eps) == len(recs) and all(e.reward == 1.0 for e in eps.values())
    # A wrong gold answer would fail: a broken hash is not accepted.
    bad = dict(next(r for r in recs if r["type"][0] == "DELETE"), answer_md5="[('0',)]")
    assert _play_all(_write_jsonl(tmp_path / "bad.jsonl", [bad]), "sqlite")["0"].reward == 0.0
    # Deterministic by seed; another seed gives other questions.
    derive_db(src, str(tmp_path / "again.jsonl"), per_table=3, seed=0, backend="sqlite")
    assert (tmp_path / "again.jsonl").read_bytes() == out.read_bytes()
    derive_db(src, str(tmp_path / "seed1.jsonl"), per_table=3, seed=1, backend="sqlite")
    assert (tmp_path / "seed1.jsonl").read_bytes() != out.read_bytes()


def test_derive_db_on_mariadb_replays_on_mariadb(bench_data, tmp_path):
    """Fidelity backend: gold hashes computed by the MariaDB server itself, replayed there."""
    try:
        db.get_backend("mariadb")
    except db_backends.BackendError as exc:
        pytest.skip(f"no MariaDB: {exc}")
    src = _write_jsonl(tmp_path / "seed.jsonl", _records(bench_data, [18, 25, 45]))
    out = tmp_path / "derived.jsonl"
    stats = derive_db(src, str(out), per_table=6, seed=3, backend="mariadb")
    assert stats["backend"] == "mariadb" and stats["written"] >= 15
    eps = _play_all(out, "mariadb")
    assert len(eps) == stats["written"] and all(e.reward == 1.0 for e in eps.values())


def test_react_thought_check():
    conv = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "Action: Answer", "loss": False},
            {"from": "human", "value": "task"}, {"from": "gpt", "value": "Thought: x\nAction: Answer", "loss": True}]
    assert has_thoughts(conv) and task_start(conv) == 2
    conv[-1]["value"] = "Action: Answer\nFinal Answer: [1]"
    assert not has_thoughts(conv)


def test_collect_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="collect.teacher.kind"):
        load_config(None, ["collect.teacher.kind=gpt"])
    # What depends on the environment is checked when the job starts, before any work.
    from pipelines.collect_instruct import check_tasks

    with pytest.raises(ConfigError, match="collect.tasks.0.instructions.source"):
        check_tasks(load_config(None, ["collect.tasks=[{name: db, env: dbbench, instructions: {kind: derive}}]"]).collect.tasks)
    with pytest.raises(ConfigError, match="collect.tasks.0.instructions.kind.*derive exists"):
        check_tasks(load_config(None, ["collect.tasks=[{name: h, env: hotpotqa, instructions: {kind: derive}}]"]).collect.tasks)
    with pytest.raises(ConfigError, match="collect.tasks.0.env.*unknown environment 'dbb'"):
        check_tasks(load_config(None, ["collect.tasks=[{name: d, env: dbb}]"]).collect.tasks)
    with pytest.raises(ConfigError, match="collect.tasks.0.instructions.kind"):
        load_config(None, ["collect.tasks=[{name: os, env: os, instructions: {kind: self_instruct}}]"])


# ----------------------------------------------------------------------------- offline collection


@pytest.fixture(scope="module", autouse=True)
def _serve_down():
    """Serve keeps its first HTTP port for the session: later modules start their own instance."""
    yield
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()


@pytest.fixture(scope="module")
def offline(ray_local, bench_data, tmp_path_factory):
    """DB (derived + the env's own tasks, two of them planted in the evaluation file) and OS."""
    d = tmp_path_factory.mktemp("collect")
    seed = _write_jsonl(d / "seed.jsonl", _records(bench_data, [21, 40, 5]))
    own = _write_jsonl(d / "own.jsonl", _records(bench_data, [0, 1, 3, 5, 5]))  # 5 twice: a duplicate
    evalf = _write_jsonl(d / "eval.jsonl", _records(bench_data, [0, 1]))  # planted contamination
    overrides = [
        f"collect.output_dir={d}/out", "collect.concurrency=4", f"collect.decontamination.paths=[{evalf}]",
        "collect.demo.pool=2", "serve.rollout.num_cpus=0", "serve.port=8431",
        "collect.tasks=["
        f"{{name: db, env: db, options: {{backend: sqlite, max_turns: 5}}, "
        f"instructions: {{kind: derive, source: {seed}, per_table: 4, seed: 0}}}},"
        f"{{name: db_own, env: db, options: {{backend: sqlite}}, instructions: {{kind: env, path: {own}}}}},"
        "{name: os, env: os, instructions: {kind: derive, n: 3, seed: 0}}]",
    ]
    cfg = load_config(None, overrides)
    return cfg, main(cfg), d / "out"


def test_offline_collection_yields_agentinstruct(offline, tiny_model_dir, capsys):
    cfg, res, out = offline
    y = res["yield"]
    assert set(res["outputs"]) == {"db", "db_own", "os"}
    assert y["db"]["instructions"] >= y["db"]["validated"] == 12 and y["db"]["kept"] >= 11
    assert y["os"]["kept"] == y["os"]["validated"] == 3
    for name, path in res["outputs"].items():
        recs = [json.loads(x) for x in open(path)]
        assert len(recs) == y[name]["kept"] and all(set(r) == {"id", "conversations"} for r in recs)
        for r in recs:
            conv = r["conversations"]
            t = task_start(conv)
            # env opening, then a demonstration (another task's full episode, no loss), then the task
            demo = [c for c in conv[:t] if c["from"] == "gpt"]
            assert len(demo) >= 2 and all(c["loss"] is False for c in demo)
            assert conv[-1]["from"] == "gpt" and conv[-1]["loss"] is True and has_thoughts(conv)
    stats = json.load(open(res["stats"]))
    # OS tasks from templates: each reference solution passed its checker in the sandbox
    assert stats["generation"]["os"] == {"candidates": 3, "invalid": 0, "excluded": 0, "written": 3}
    assert stats["tasks"] == y and (out / "yield.md").read_text() == res["yield_table"]
    assert "| db_own |" in res["yield_table"]


def test_data_job_accepts_output_and_demo_has_no_loss(offline, tiny_model_dir):
    from agenttuning.chat import IGNORE_INDEX, encode_chat, load_tokenizer
    from agenttuning.sources import to_messages
    from pipelines.data import tokenize_batch

    _, res, _ = offline
    rows = []
    for name, path in res["outputs"].items():
        rows += [{"source": "s", "group": "agent", "sid": i, "origin": f"{name}:{i}", "raw": line, "reject": ""}
                 for i, line in enumerate(open(path).read().splitlines())]
    model = {"name_or_path": str(tiny_model_dir), "chat_template": "llama2", "trust_remote_code": False,
             "system_prompt": "You are a helpful, respectful and honest assistant."}
    out = tokenize_batch(pa.Table.from_pylist(rows), model=model, formats={"s": "agentinstruct"}, max_seq_len=8192,
                         overlong="reject", ngram_ref=None, ngram=10, threshold=0.8).to_pylist()
    assert len(out) == sum(y["kept"] for y in res["yield"].values()) >= 15
    assert [r["reject"] for r in out] == [""] * len(out) and all(r["n_sup"] > 0 for r in out)
    tok = load_tokenizer(str(tiny_model_dir), "llama2")
    rec = json.loads(open(res["outputs"]["db"]).readline())
    ids, labels = encode_chat(tok, to_messages("agentinstruct", rec))
    supervised = tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])
    conv = rec["conversations"]
    t = task_start(conv)
    demo_sql = re.search(r"```sql\n(.*?)\n```", "".join(c["value"] for c in conv[:t]), re.S).group(1)
    task_sql = re.search(r"```sql\n(.*?)\n```", "".join(c["value"] for c in conv[t:]), re.S).group(1)
    squash = lambda s: re.sub(r"\s+", "", s)  # noqa: E731 - decoding may differ in whitespace
    assert squash(task_sql) in squash(supervised) and squash(demo_sql) not in squash(supervised)


@pytest.mark.slow
def test_data_job_runs_on_collect_output(offline, tiny_model_dir, tmp_path):
    """The whole data job (Ray Data) over the collect outputs: every record accepted."""
    from pipelines.data import main as data_main

    _, res, _ = offline
    srcs = ",".join(f"{{name: {n}, group: agent, format: agentinstruct, path: {p}}}" for n, p in res["outputs"].items())
    m = data_main(load_config(None, [f"model.name_or_path={tiny_model_dir}", f"data.output_dir={tmp_path}/data",
                                     "data.eta=1.0", "data.max_seq_len=4096", f"data.sources=[{srcs}]"]))
    assert m["rejected_total"] == 0
    assert {n: s["records"] for n, s in m["sources"].items()} == {n: y["kept"] for n, y in res["yield"].items()}


def test_planted_evaluation_duplicates_removed(offline):
    _, res, _ = offline
    y = res["yield"]["db_own"]
    assert y["decontaminated"] == 2 and y["duplicates"] == 1
    ids = [json.loads(x)["id"] for x in open(res["outputs"]["db_own"])]
    assert "db_own_0" not in ids and "db_own_1" not in ids and "db_own_3" in ids


def test_rerun_resumes_and_is_identical(offline):
    cfg, res, out = offline
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    again = main(cfg)
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before  # episodes.jsonl unchanged: nothing re-run; outputs identical
    assert again["yield"] == res["yield"]
    # A crash mid-run: half the episodes lost, the last one torn. The re-run runs only the
    # missing ones and writes the same outputs.
    eps = (out / "episodes.jsonl").read_bytes().splitlines(keepends=True)
    keep = len(eps) // 2
    (out / "episodes.jsonl").write_bytes(b"".join(eps[:keep]) + eps[keep][:40])
    main(cfg)
    eps_after = (out / "episodes.jsonl").read_bytes().splitlines(keepends=True)
    key = lambda line: (json.loads(line)["policy"], json.loads(line)["task"], json.loads(line)["task_id"])  # noqa: E731
    assert eps_after[:keep] == eps[:keep] and sorted(map(key, eps_after)) == sorted(map(key, eps))
    for name, data in before.items():
        if name != "episodes.jsonl":
            assert (out / name).read_bytes() == data, name


# ----------------------------------------------------------------------------- teacher over HTTP


class ScriptedTeacher(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint on 127.0.0.1: a scripted plan of failures, then answers
    looked up by question; some questions always fail (429 / too slow / malformed JSON)."""

    plan: list = []
    answers: dict = {}
    always: dict = {}
    proposals: list = []
    calls = 0
    lock = threading.Lock()

    def log_message(self, *args):  # keep test output quiet
        pass

    def _send(self, code, body):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls = type(self)
        with cls.lock:
            n = cls.calls
            cls.calls += 1
        msgs = body["messages"]
        behaviour = cls.plan[n] if n < len(cls.plan) else "ok"
        if behaviour == "ok":
            for q, b in cls.always.items():
                if q in msgs[-1]["content"]:
                    behaviour = b
        if behaviour in ("429", "500", "401"):
            return self._send(int(behaviour), {"error": {"message": f"scripted {behaviour}", "type": "scripted"}})
        if behaviour == "slow":
            time.sleep(1.0)
        if behaviour == "malformed":
            return self._send(200, b'{"id": "x", "choices": [{"message": ')
        text = self._reply(msgs)
        self._send(200, {"id": f"c{n}", "object": "chat.completion", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}})

    def _reply(self, msgs):
        cls = type(self)
        if "Propose one new" in msgs[-1]["content"]:
            with cls.lock:
                return cls.proposals.pop(0)
        for m in reversed(msgs):  # the task's own question (the demonstration's comes earlier)
            for q, (kind, ans) in cls.answers.items():
                if m["role"] == "user" and q in m["content"]:
                    if kind == "os":
                        return f"Think: I know it.\n\nAct: answer({ans})"
                    return f"Thought: I know it.\nAction: Answer\nFinal Answer: {json.dumps(ans)}"
        return "Thought: no idea.\nAction: Answer\nFinal Answer: []"


@pytest.fixture()
def scripted_teacher():
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedTeacher)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_openai_policy_retry_classes(scripted_teacher):
    """Transient failures are retried with backoff; a 4xx other than 429 is not; then TeacherError."""
    import asyncio

    from agenttuning.schema import PolicyConfig
    from serve.rollout import OpenAIPolicy, PolicySpec, TeacherError

    S = ScriptedTeacher
    S.answers, S.always, S.proposals = {}, {}, []
    msgs = [{"role": "user", "content": "hello"}]

    def run(plan, retries):
        S.calls, S.plan = 0, plan
        pol = OpenAIPolicy(PolicySpec(PolicyConfig(kind="openai", base_url=scripted_teacher, model="t", max_retries=retries,
                                                   timeout_s=0.5, backoff_s=0.01, api_key_env="AGENTTUNING_TEST_KEY")))
        try:
            return asyncio.run(pol._complete_usage(msgs)), S.calls, pol.retries
        except TeacherError as exc:
            return exc, S.calls, pol.retries

    (text, usage), calls, retries = run(["500", "malformed", "slow", "429"], 4)
    assert text.startswith("Thought:") and usage["prompt_tokens"] == 100 and (calls, retries) == (5, 4)
    err, calls, _ = run(["429", "500", "429"], 2)
    assert isinstance(err, TeacherError) and "3 attempts" in str(err) and calls == 3
    err, calls, _ = run(["401", "401"], 5)
    assert isinstance(err, TeacherError) and "401" in str(err) and calls == 1


def test_db_self_instruct_candidates_are_executed(bench_data):
    from pipelines.collect_instruct import _db_candidate
    from pipelines.derive import read_tables

    tb = read_tables(str(bench_data / DEV))[0][0]  # US ambassadors to Colombia
    rec = _db_candidate({"description": "Who was appointed by Grover Cleveland?", "type": "SELECT",
                         "sql": "SELECT Representative FROM `US Ambassadors and Envoy Extraordinary to Colombia` "
                                "WHERE `Appointed by` = 'Grover Cleveland';"}, tb, "sqlite")
    assert sorted(rec["label"]) == ["Dabney H. Maury", "Luther F. McKinney"]
    for bad, why in [({"description": "x", "sql": "SELECT nope FROM nowhere"}, "gold SQL failed"),
                     ({"description": "x", "sql": "DELETE FROM `US Ambassadors and Envoy Extraordinary to Colombia` "
                                                  "WHERE Title = 'King'"}, "changes nothing"),
                     ({"description": "x", "sql": "DROP TABLE t", "type": "DROP"}, "not SELECT")]:
        with pytest.raises(ValueError, match=why):
            _db_candidate(bad, tb, "sqlite")


def test_teacher_errors_retried_and_counted(ray_local, bench_data, tmp_path, scripted_teacher):
    recs = _records(bench_data, [0, 1, 2, 3, 5])
    own = _write_jsonl(tmp_path / "own.jsonl", recs)
    S = ScriptedTeacher
    S.calls = 0
    S.plan = ["429", "slow", "malformed"]  # the first call fails three ways, then succeeds
    S.answers = {r["description"]: ("db", r["label"]) for r in recs}
    S.answers.update({"in /tmp/si_a?": ("os", "3"), "/tmp/si_b.txt say?": ("os", "hello")})
    S.always = {recs[2]["description"]: "429", recs[3]["description"]: "slow", recs[4]["description"]: "malformed"}
    S.proposals = [
        json.dumps({"description": "How many files are in /tmp/si_a?", "init": "mkdir /tmp/si_a && touch /tmp/si_a/x /tmp/si_a/y /tmp/si_a/z",
                    "solution": "ls /tmp/si_a | wc -l", "checker": "integer-match"}),
        "I cannot think of a task.",  # not JSON: rejected
        json.dumps({"description": "What is in /tmp/nothing?", "init": "true", "solution": "true"}),  # no output
        json.dumps({"description": "What does /tmp/si_b.txt say?", "init": "echo hello > /tmp/si_b.txt",
                    "solution": "cat /tmp/si_b.txt", "checker": "string-match"}),
    ]
    cfg = load_config(None, [
        f"collect.output_dir={tmp_path}/out", "collect.concurrency=2", "collect.demo.pool=1",
        "serve.rollout.num_cpus=0", "serve.port=8432",
        f"collect.teacher={{kind: openai, base_url: '{scripted_teacher}', model: t, max_retries: 3, timeout_s: 0.5, "
        "backoff_s: 0.02, backoff_max_s: 0.1, api_key_env: AGENTTUNING_TEST_KEY}",
        "collect.tasks=["
        f"{{name: db, env: db, options: {{backend: sqlite, max_turns: 3}}, instructions: {{kind: env, path: {own}}}}},"
        "{name: os_si, env: os, instructions: {kind: self_instruct, n: 4}}]",
    ])
    t0 = time.time()
    res = main(cfg)
    y = res["yield"]
    assert y["db"]["teacher_error"] == 3 and y["db"]["episodes"] == 2 and y["db"]["kept"] == 2
    assert y["db"]["tokens_in"] == 200 and y["db"]["tokens_out"] == 20  # from the responses' usage
    gen = json.load(open(res["stats"]))["generation"]["os_si"]
    assert gen["candidates"] == 4 and gen["invalid"] == 2 and gen["written"] == 2 and gen["teacher_error"] == 0
    rejects = [json.loads(x) for x in open(tmp_path / "out/instructions/os_si.rejects.jsonl")]
    assert len(rejects) == 2
    assert y["os_si"]["instructions"] == 4 and y["os_si"]["validated"] == 2 and y["os_si"]["kept"] == 2
    assert y["os_si"]["tokens_in"] == 100 * (4 + 2)
    assert time.time() - t0 < 80


def test_served_tiny_model_as_teacher(ray_local, bench_data, tmp_path, tiny_model_dir):
    """Our OpenAI-compatible model server (quality aside) through the same code path."""
    from serve.llm import HFBackend
    from serve.openai_api import build_openai_app, run_local_server

    own = _write_jsonl(tmp_path / "own.jsonl", _records(bench_data, [0, 1]))
    backend = HFBackend(str(tiny_model_dir), model_id="tiny-teacher", torch_threads=1)
    try:
        with run_local_server(build_openai_app(backend)) as url:
            cfg = load_config(None, [
                f"collect.output_dir={tmp_path}/out", "serve.rollout.num_cpus=0", "serve.port=8433",
                "collect.demo.pool=1",
                f"collect.teacher={{kind: openai, base_url: '{url}', model: tiny-teacher, max_tokens: 8, "
                "max_retries: 1, timeout_s: 60, api_key_env: AGENTTUNING_TEST_KEY}",
                f"collect.tasks=[{{name: db, env: db, options: {{backend: sqlite, max_turns: 1}}, "
                f"instructions: {{kind: env, path: {own}}}, require_thought: false}}]",
            ])
            res = main(cfg)
    finally:
        backend.engine.close()
    y = res["yield"]["db"]
    assert y["episodes"] == 2 and y["teacher_error"] == 0
    eps = [json.loads(x) for x in open(tmp_path / "out/episodes.jsonl")]
    teacher_eps = [e for e in eps if e["kind"] == "episode"]
    assert all(e["usage"]["calls"] >= 1 and e["usage"]["estimated"] == 0 for e in teacher_eps)
    assert y["tokens_in"] == sum(e["usage"]["prompt_tokens"] for e in teacher_eps) > 500 * len(teacher_eps)
    assert y["kept"] == sum(1 for e in teacher_eps if e["reward"] >= 1.0)
