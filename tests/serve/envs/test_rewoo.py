"""ReWOO environment on the real shipped data (HotpotQA, GSM8K) and on small hand-written files in
the formats of ReWOO's own data files (``rewoo_fixtures/``: invented questions and speech text).

The LLM tool and the LLM grader talk to a real HTTP server on 127.0.0.1 that speaks OpenAI's chat
protocol and answers by fixed rules (no model weights can be fetched offline); the same server
stands in for the Serper and WolframAlpha APIs.
"""

import json
import pathlib
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pandas as pd
import pytest

import serve.envs
from serve.envs.base import InvalidFormat, Status, run_episode
from serve.envs.rewoo import parse_plan
from serve.envs.rewoo_data import em_f1, gold_answers
from serve.envs.rewoo_tools import LLM_TOOL_INSTRUCTION, LocalWikipedia, PassageSearch, evaluate_arithmetic

FIXTURES = pathlib.Path(__file__).parent / "rewoo_fixtures"


# ---------------------------------------------------------------------- a local model server


def _model_reply(prompt: str) -> str:
    """Rules a small model would follow: grade by containment, read the first context sentence."""
    if prompt.rstrip().endswith("GRADE:"):
        student = re.search(r"STUDENT ANSWER: (.*)\n", prompt).group(1).lower()
        true = re.search(r"TRUE ANSWER: (.*)\n", prompt).group(1).lower()
        return "CORRECT" if true in student else "INCORRECT"
    if "Given context:" in prompt:
        context = prompt.split("Given context:", 1)[1].strip().lstrip("[")
        return context.split(". ")[0].rstrip("].") + "."
    return "I do not know."


class _Handler(BaseHTTPRequestHandler):
    def _send(self, payload: dict, code: int = 200) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):  # noqa: N802 — http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
        if self.path == "/search":  # Serper
            if self.headers.get("X-API-KEY") != "serper-test-key":
                return self._send({"message": "Unauthorized"}, 403)
            if "capital" in body["q"]:
                return self._send({"answerBox": {"answer": "Paris"}, "organic": [{"snippet": "ignored"}]})
            return self._send({"knowledgeGraph": {"title": "Pear", "type": "Fruit", "description": "A pome fruit."},
                               "organic": [{"snippet": "Pears are less dense than water."}, {"title": "no snippet"}]})
        if self.path == "/v1/chat/completions":
            reply = _model_reply(body["messages"][-1]["content"])
            return self._send({"id": "c1", "object": "chat.completion", "model": body["model"],
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": reply}}]})
        return self._send({"error": {"message": "not found"}}, 404)

    def do_GET(self):  # noqa: N802
        url = urlparse(self.path)
        query = parse_qs(url.query)
        self.server.requests.append({"path": url.path, "query": query})
        if url.path == "/v2/query" and query.get("appid") == ["wolfram-test-id"]:
            return self._send({"queryresult": {"pods": [
                {"title": "Input interpretation", "subpods": [{"plaintext": query["input"][0]}]},
                {"title": "Solution", "primary": True, "subpods": [{"plaintext": "x = 37"}]}]}})
        return self._send({"error": "bad appid"}, 403)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.requests = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


@pytest.fixture(scope="module")
def env():
    return serve.envs.load("rewoo")


def _hotpot(env, i=0):
    tid = env.tasks("hotpot_qa")[i]
    return tid, env.task(tid).data


# ---------------------------------------------------------------------- tasks and expert


def test_default_tasks_are_agenttuning_samples(env, bench_data):
    # AgentTuning: DataLoader(...).load(50) = df.sample(50, random_state=2024) of the train split.
    gsm = pd.read_json(bench_data / "gsm8k" / "train.jsonl", lines=True)
    assert env.tasks("gsm8k") == [f"gsm8k/{i}" for i in gsm.sample(50, random_state=2024).index]
    assert env.tasks("gsm8k")[:3] == ["gsm8k/548", "gsm8k/6592", "gsm8k/6644"]
    first = env.task("gsm8k/548").data
    assert first["answer"] == gsm.loc[548, "answer"].split("#### ")[1]
    pool = pd.concat([pd.read_json(bench_data / "hotpotqa" / f"hotpotqa_{lv}.jsonl", lines=True)
                      for lv in ("easy", "medium", "hard")], ignore_index=True)
    assert env.tasks("hotpot_qa") == [f"hotpot_qa/{i}" for i in pool.sample(50, random_state=2024)["id"]]
    assert len(env.tasks()) == 100
    assert "Hugging Face" in env.skipped["trivia_qa/*"]
    assert "rewoo/bigbench/strategy_qa.csv" in env.skipped["strategy_qa/*"]
    assert "rewoo/SOTU/SOTU_QA.csv" in env.skipped["sotu_qa/*"]


def test_gold_path_expert_on_every_default_task(env):
    solved = 0
    for tid in env.tasks():
        data = env.task(tid).data
        env.reset(tid)
        plan = env.expert_action()
        res = env.step(plan)
        steps = res.info["steps"]
        if data["dataset"] == "hotpot_qa":  # every supporting page found, whole paragraph returned
            pages = LocalWikipedia(data["context"]).pages
            titles = list(dict.fromkeys(t for t, _ in data["supporting_facts"]))
            assert [s["tool_input"] for s in steps] == titles, tid
            assert [s["evidence"] for s in steps] == [pages[t] for t in titles], tid
        else:  # every Calculator step reproduces the solution's own <<expr=value>> annotation
            values = re.findall(r"<<[^<>]*=([^<>=]*)>>", data["solution"])
            assert len(steps) == len(values) > 0, tid
            for step, value in zip(steps, values):
                assert step["tool"] == "Calculator"
                assert float(step["evidence"]) == pytest.approx(float(value)), (tid, step)
        assert f"Evidence:\n{steps[0]['evidence']}\n" in res.observation
        final = env.step(env.expert_action())
        assert final.done and final.status == Status.COMPLETED and final.info["em"] == 1.0
        solved += final.reward == 1.0
    assert solved / len(env.tasks()) >= 0.95
    assert solved == 100


def test_rewoo_data_files_from_the_data_folder(monkeypatch):
    monkeypatch.setenv("AGENTTUNING_DATA_DIR", str(FIXTURES))
    env = serve.envs.load("rewoo", datasets="strategy_qa,physics_question,sports_understanding,sotu_qa")
    assert {k: len(v) for k, v in env.splits().items()} == {
        "strategy_qa": 4, "physics_question": 3, "sports_understanding": 3, "sotu_qa": 3}
    assert env.task("strategy_qa/2").data["answer"] == "No"
    assert env.task("physics_question/0").data["answer"] == "Can be one of ['4500 m', '4.5 km']"
    assert env.task("strategy_qa/1").data["question"] == (
        "Answer with 'Yes' or 'No': Is a week, counted in hours, longer than 150 hours?")  # a quoted CSV cell
    assert env.task("sotu_qa/0").data["question"].endswith("than the old ferry route?")  # stripped
    # SearchSOTU reads the speech found beside the questions (rewoo/docs/state_of_the_union.txt).
    env.reset("sotu_qa/1")
    assert "SearchSOTU[input]" in env.history[0]["content"] and "Wikipedia[input]" not in env.history[0]["content"]
    res = env.step(env.expert_action())
    assert res.info["steps"][0]["tool"] == "SearchSOTU"
    assert "led by Lena Varga, the engineer who built the Harbor Line tunnel" in res.info["steps"][0]["evidence"]
    final = env.step("Lena Varga, an engineer")
    assert final.info["em"] == 0.0 and 0 < final.info["f1"] < 1 and final.reward == 0.0


def test_tasks_needing_an_unavailable_tool_are_skipped(tmp_path, monkeypatch):
    (tmp_path / "rewoo" / "SOTU").mkdir(parents=True)
    (tmp_path / "rewoo" / "SOTU" / "SOTU_QA.csv").write_bytes((FIXTURES / "rewoo/SOTU/SOTU_QA.csv").read_bytes())
    monkeypatch.setenv("AGENTTUNING_DATA_DIR", str(tmp_path))  # the questions, but not the speech
    env = serve.envs.load("rewoo", datasets=["sotu_qa"])
    assert env.tasks() == []
    assert set(env.skipped) == {"sotu_qa/0", "sotu_qa/1", "sotu_qa/2"}
    assert "needs tool SearchSOTU: set option sotu_doc" in env.skipped["sotu_qa/0"]
    # require_all_tools: the paper's whole tool list must run (HotpotQA's LLM needs llm_url).
    strict = serve.envs.load("rewoo", datasets="hotpot_qa", sample_size=3, require_all_tools=True)
    assert strict.tasks() == [] and len(strict.skipped) == 3
    assert all("needs tool LLM: set option llm_url" in r for r in strict.skipped.values())
    ok = serve.envs.load("rewoo", datasets="hotpot_qa", sample_size=3, require_all_tools=True,
                         llm_url="http://127.0.0.1:9/v1")
    assert len(ok.tasks()) == 3


def test_bad_records_and_options(tmp_path):
    good = {"dataset": "strategy_qa", "question": "Is water wet?", "answer": "Yes"}
    f = tmp_path / "tasks.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        good, {"dataset": "strategy_qa", "id": "noans", "question": "q?"},
        {"dataset": "gsm8k", "id": "badtools", "question": "1+1?", "answer": "2", "tools": "Calculator"},
        {"dataset": "hotpot_qa", "id": "badctx", "question": "q?", "answer": "a", "context": ["x"]},
        {"dataset": "gsm8k", "id": "oddtool", "question": "1+1?", "answer": "2", "tools": ["Abacus"]}]) + "\n")
    env = serve.envs.load("rewoo", str(f))
    assert env.tasks() == ["strategy_qa/0"]
    assert "lacks field(s) ['answer']" in env.skipped["strategy_qa/noans"]
    assert "tasks.jsonl:line 2" in env.skipped["strategy_qa/noans"]
    assert "'tools' must be a non-empty list" in env.skipped["gsm8k/badtools"]
    assert "'context' is not" in env.skipped["hotpot_qa/badctx"]
    assert "unknown tool(s) ['Abacus']" in env.skipped["gsm8k/oddtool"]
    unknown = tmp_path / "u.jsonl"
    unknown.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(serve.envs.EnvError, match="u.jsonl:line 1: cannot tell the data set"):
        serve.envs.load("rewoo", str(unknown))
    assert serve.envs.load("rewoo", str(unknown), dataset="strategy_qa").tasks() == ["strategy_qa/0"]
    with pytest.raises(serve.envs.EnvError, match="needs option judge_url"):
        serve.envs.load("rewoo", str(f), metric="judge")
    with pytest.raises(serve.envs.EnvError, match=r"unknown data set\(s\) \['webqa'\]"):
        serve.envs.load("rewoo", datasets="webqa")


# ---------------------------------------------------------------------- plan protocol


def test_parse_plan_formats():
    steps = parse_plan("Plan: look up Paris.\n#E1 = Wikipedia[Paris]\n"
                       "- **Plan:** ask. #E2 = LLM[Where is #E1? Given context: #E1]\n"
                       "#E3 = the answer is #E2\n#E4 = Calculator[2 * [3]] extra")
    assert [(s.eid, s.plan, s.tool, s.tool_input) for s in steps] == [
        (1, "look up Paris.", "Wikipedia", "Paris"), (2, "ask.", "LLM", "Where is #E1? Given context: #E1"),
        (3, "", None, ""), (4, "", "Calculator", "2 * [3]")]
    assert steps[2].call == "the answer is #E2" and steps[2].heading() == "#E3 = the answer is #E2"
    for bad in ("The answer is Paris.", "Plan: search Paris.\n#E1 = Paris", ""):
        with pytest.raises(InvalidFormat, match="'#E<n> = <Tool>\\[<input>\\]'"):
            parse_plan(bad)


def test_workers_substitute_evidence_and_report_unavailable_tools(env, monkeypatch):
    monkeypatch.delenv("SERPER_API_KEY", raising=False)
    tid, data = _hotpot(env, 1)
    title = data["supporting_facts"][0][0]
    env.reset(tid)
    plan = (f"Plan: read the page.\n#E1 = Wikipedia[{title}]\n"
            "Plan: ask.\n#E2 = LLM[Who? Given context: #E1]\n"
            "Plan: wrong tool.\n#E3 = Google[#E1]\n"
            "Plan: forward.\n#E4 = Wikipedia[#E5]\n"
            "Plan: missing.\n#E5 = Wikipedia[Zzyzx Qwerty Nonexistent]\n"
            "Plan: no call.\n#E6 = just a note")
    res = env.step(plan)
    assert not res.done and res.info["tool_errors"] == 1  # LLM unavailable; a wrong tool is no tool error
    ev = {s["eid"]: s for s in res.info["steps"]}
    page = LocalWikipedia(data["context"]).pages[title]
    assert ev[1]["evidence"] == page
    assert ev[2]["tool_input"] == f"Who? Given context: [{page}]"  # ReWOO wraps evidence in [...]
    assert ev[2]["evidence"] == "tool unavailable: LLM: set option llm_url (an OpenAI-compatible endpoint) and llm_model"
    assert ev[3]["evidence"] == "No evidence found: Google is not one of the tools (Wikipedia, LLM)."
    assert ev[4]["tool_input"] == "#E5" and ev[4]["evidence"].startswith("Could not find [#E5]")
    assert ev[5]["evidence"].startswith("Could not find [Zzyzx Qwerty Nonexistent]. Similar: [")
    assert ev[6]["evidence"] == "just a note"
    obs = res.observation
    assert obs.startswith("Solve the following task") and obs.rstrip().endswith(data["question"])
    assert f"Plan: read the page.\nEvidence:\n{page}\n" in obs and "Plan: no call.\nEvidence:\njust a note\n" in obs
    final = env.step("\nsurely not the answer xyz\n")
    assert final.done and final.status == Status.COMPLETED and final.reward == 0.0
    assert final.info["answer"] == "surely not the answer xyz" and final.info["metric"] == "em"
    assert final.info["tool_calls"] == 5 and final.info["tool_errors"] == 1


def test_evidence_names_substitute_whole_and_plan_length_is_capped():
    env = serve.envs.load("rewoo", datasets="gsm8k", sample_size=1, max_plan_steps=3)
    env.reset(env.tasks()[0])
    res = env.step("#E1 = Calculator[2]\n#E12 = Calculator[30]\n#E3 = Calculator[#E12 + #E1 * 10]\n"
                   "#E4 = Calculator[1 + 1]")
    assert [s["evidence"] for s in res.info["steps"]] == [
        "2", "30", "50", "No evidence found (the plan has more than 3 steps)."]
    assert res.info["steps"][2]["tool_input"] == "[30] + [2] * 10"


def test_unparseable_plan_is_invalid_format(env):
    tid, data = _hotpot(env, 2)
    env.reset(tid)
    res = env.step(f"The answer is {data['answer']}.")
    assert res.done and res.status == Status.INVALID_FORMAT and res.reward == 0.0
    assert "could not be parsed" in res.observation
    lenient = serve.envs.load("rewoo", datasets="hotpot_qa", sample_size=3, max_invalid=1)
    assert lenient.max_turns == 3
    assert run_episode(lenient, tid).reward == 1.0  # the expert path is unchanged
    lenient.reset(tid)
    first = lenient.step("no plan here")
    assert not first.done and first.info["invalid"] == "invalid_format"
    second = lenient.step(f"Plan: p\n#E1 = Wikipedia[{data['supporting_facts'][0][0]}]")
    assert not second.done and second.observation.startswith("Solve the following task")
    assert lenient.step(data["answer"]).reward == 1.0


# ---------------------------------------------------------------------- tools


def test_calculator_is_a_safe_arithmetic_evaluator():
    assert evaluate_arithmetic("(2 * [37] - 10) - 8") == "56"  # substituted evidence in brackets
    assert evaluate_arithmetic("2^10") == "1024" and evaluate_arithmetic("10 ** -2") == "0.01"
    assert evaluate_arithmetic("1,250 * 15%") == "187.5" and evaluate_arithmetic("17 % 5") == "2"
    assert evaluate_arithmetic("What is 12 * 4?") == "48" and evaluate_arithmetic("7/2 =") == "3.5"
    assert evaluate_arithmetic("sqrt(16) + round(2.567, 1)") == "6.6"
    assert evaluate_arithmetic("1/3") == "0.3333333333"
    for bad, why in [("__import__('os').system('true')", "unknown function"), ("2 ** 100000", "too large"),
                     ("1/0", "division by zero"), ("x + 1", "unknown name 'x'"), ("hello", "unknown name"),
                     ("(-8) ** 0.5", "not a real number"), ("factorial(5000)", "between 0 and 1000")]:
        with pytest.raises(ValueError, match=why):
            evaluate_arithmetic(bad)


def test_local_wikipedia_and_passage_search():
    wiki = LocalWikipedia([["Milhouse Van Houten", ["Milhouse is a character.", " He wears glasses."]],
                           ["High Plains (United States)", ["The High Plains are a subregion."]],
                           ["Arthur's Magazine", ["Arthur's Magazine was a periodical."]]])
    assert wiki.search("Milhouse") == "Milhouse is a character. He wears glasses."  # auto-suggest
    assert wiki.find("[High Plains (United States)]") == "High Plains (United States)"
    assert wiki.find("arthurs magazine") == "Arthur's Magazine"
    assert wiki.find("Arthurs Magazne") == "Arthur's Magazine"  # near spelling
    assert wiki.search("Colorado orogeny").startswith("Could not find [Colorado orogeny]. Similar: [")
    speech = (FIXTURES / "rewoo" / "docs" / "state_of_the_union.txt").read_text()
    search = PassageSearch(speech)
    assert len(search.chunks) == 4 and all(len(c) <= 1000 for c in search.chunks[:-1])
    assert "Lena Varga" in search.search("who leads the Coastal Rail Authority")
    assert search.search("islands that chose to be joined").startswith("The story of Valdoria is a story of islands")
    found = search.search("parties in this chamber cannot agree")  # passages start at paragraph breaks
    assert found.startswith("We will also reopen the village libraries") and "cannot agree on anything" in found


def test_scoring_accepts_any_listed_gold():
    assert gold_answers("Can be one of ['4500 m', '4.5 km']") == ["4500 m", "4.5 km"]
    assert em_f1("4.5 km", "Can be one of ['4500 m', '4.5 km']") == (1.0, 1.0)
    assert em_f1("The answer is 4.5 km", "Can be one of ['4500 m', '4.5 km']")[0] == 0.0
    assert em_f1("yes", "Yes") == (1.0, 1.0) and em_f1("no", "Yes") == (0.0, 0.0)


def test_llm_tool_and_judge_over_a_local_model_server(server, monkeypatch):
    httpd, url = server
    monkeypatch.setenv("REWOO_TEST_KEY", "sk-test")
    env = serve.envs.load("rewoo", datasets="hotpot_qa", sample_size=4, llm_url=url + "/v1", llm_model="tiny-llm",
                          llm_api_key_env="REWOO_TEST_KEY", judge_url=url + "/v1/chat/completions",
                          judge_model="tiny-judge")
    assert env.metric == "judge"
    tid = env.tasks()[0]
    data = env.task(tid).data
    title = data["supporting_facts"][0][0]
    page = LocalWikipedia(data["context"]).pages[title]
    httpd.requests.clear()
    env.reset(tid)
    res = env.step(f"Plan: read.\n#E1 = Wikipedia[{title}]\nPlan: extract.\n#E2 = LLM[Summarise. Given context: #E1]")
    llm_step = res.info["steps"][1]
    assert llm_step["evidence"] == page.split(". ")[0].rstrip("].") + "." and llm_step["error"] is None
    (req,) = httpd.requests
    assert req["path"] == "/v1/chat/completions" and req["headers"]["Authorization"] == "Bearer sk-test"
    assert req["body"]["model"] == "tiny-llm" and req["body"]["temperature"] == 0.0
    assert req["body"]["messages"] == [{"role": "user", "content": f"{LLM_TOOL_INSTRUCTION}Summarise. Given context: [{page}]"}]
    final = env.step(f"I believe it is {data['answer']}, as the evidence says.")
    assert final.info["acc"] == 1.0 and final.reward == 1.0 and final.info["em"] == 0.0
    assert final.info["judge_reply"] == "CORRECT" and httpd.requests[-1]["body"]["model"] == "tiny-judge"
    env.reset(tid)
    env.step(f"Plan: read.\n#E1 = Wikipedia[{title}]")
    wrong = env.step("certainly not the answer qqq")
    assert wrong.info["acc"] == 0.0 and wrong.reward == 0.0 and wrong.status == Status.COMPLETED


def test_unreachable_judge_ends_the_episode_as_task_error():
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = serve.envs.load("rewoo", datasets="hotpot_qa", sample_size=1, judge_url=f"http://127.0.0.1:{port}/v1",
                          tool_timeout=2)
    ep = run_episode(env, env.tasks()[0])
    assert ep.status == Status.TASK_ERROR and "127.0.0.1" in ep.messages[-1]["content"]


def test_google_and_wolfram_clients(server, monkeypatch):
    httpd, url = server
    monkeypatch.setenv("AGENTTUNING_DATA_DIR", str(FIXTURES))
    monkeypatch.delenv("SERPER_API_KEY", raising=False)
    monkeypatch.delenv("WOLFRAM_ALPHA_APPID", raising=False)
    plan = "Plan: g.\n#E1 = Google[capital of France]\nPlan: g2.\n#E2 = Google[pear]\nPlan: w.\n#E3 = WolframAlpha[x + 3 = 40]"
    offline = serve.envs.load("rewoo", datasets="strategy_qa", google_url=url + "/search", wolfram_url=url + "/v2/query")
    offline.reset("strategy_qa/2")
    ev = [s["evidence"] for s in offline.step(plan).info["steps"]]
    assert ev[0] == "tool unavailable: Google: set $SERPER_API_KEY (a Serper API key; option google_key_env names the variable)"
    assert ev[2].startswith("tool unavailable: WolframAlpha: set $WOLFRAM_ALPHA_APPID")
    monkeypatch.setenv("MY_SERPER", "serper-test-key")
    monkeypatch.setenv("MY_WOLFRAM", "wolfram-test-id")
    online = serve.envs.load("rewoo", datasets="strategy_qa", google_url=url + "/search", google_key_env="MY_SERPER",
                             wolfram_url=url + "/v2/query", wolfram_key_env="MY_WOLFRAM")
    online.reset("strategy_qa/2")
    ev = [s["evidence"] for s in online.step(plan).info["steps"]]
    assert ev == ["Paris", "Pear: Fruit. A pome fruit. Pears are less dense than water.", "x = 37"]
    assert httpd.requests[-1]["query"]["input"] == ["x + 3 = 40"]
    assert online.step("No").reward == 1.0
