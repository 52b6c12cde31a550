"""AgentBench KG environment against a real SPARQL store (pyoxigraph behind HTTP on 127.0.0.1).

The graph is derived from the real dev/std records' gold actions and answers by
``kg_testgraph.py``, the ontology files (AgentBench's ``vocab.json``/``fb_roles`` formats) from the
same records by ``kg_testonto.py``; the environment reaches the graph through the same SPARQL
client it uses for a Freebase Virtuoso endpoint.
"""

import json
import logging
import socket
import urllib.error
import urllib.request

import pytest

import kg_testgraph
import kg_testonto
import serve.envs
from serve.envs.base import EnvError, Status, run_episode
from serve.envs.kg import BAD_VARIABLE, NO_ACTION, NOT_EXECUTED, KGEnv, answer_scores
from serve.envs.kg_ontology import FileOntology, StoreOntology
from serve.envs.kg_prompt import INSTRUCTIONS, ONE_SHOT
from serve.envs.kg_sparql import LocalSparqlEndpoint, SparqlClient


@pytest.fixture(scope="module")
def records():
    return kg_testgraph.load_records()


@pytest.fixture(scope="module")
def onto(records):
    return kg_testonto.derive_ontology(records)


@pytest.fixture(scope="module")
def onto_dir(onto, tmp_path_factory):
    return str(onto.write(tmp_path_factory.mktemp("kg_ontology")))


@pytest.fixture(scope="module")
def graph(records, onto):
    return kg_testgraph.build(records, onto)


@pytest.fixture(scope="module")
def graph_file(graph, tmp_path_factory):
    return graph.write_nt(tmp_path_factory.mktemp("kg") / "freebase_excerpt.nt")


@pytest.fixture(scope="module")
def endpoint(graph_file):
    with LocalSparqlEndpoint(str(graph_file)) as ep:
        yield ep


def _load_splits(bench_data, **options):
    return {split: serve.envs.load("kg", str(bench_data / "agentbench" / "kg" / f"{split}.json"), **options)
            for split in ("dev", "std")}


@pytest.fixture(scope="module")
def envs(endpoint, bench_data, onto_dir):
    out = _load_splits(bench_data, sparql_url=endpoint.url, ontology_dir=onto_dir)
    yield out
    for env in out.values():
        env.close()


@pytest.fixture(scope="module")
def expert_runs(envs, graph):
    """The gold-path expert's episode on every held task, with the ontology files."""
    return {key: run_episode(envs[key[0]], str(key[1])) for key in graph.held}


@pytest.fixture()
def dev(envs):
    return envs["dev"].spawn()


def test_graph_derivation_covers_real_tasks(graph, records):
    # 170 records: 6 name a class or a g. id where an entity belongs, 2 ask for the topic entity
    # itself through a superlative (which AgentBench's query excludes); the other 162 are held.
    assert len(records) == 170 and len(graph.held) == 162
    assert sum(1 for why in graph.left_out.values() if why.startswith("not derivable")) == 6
    assert {k for k, why in graph.left_out.items() if "merged graph" in why} == {("std", 107), ("std", 148)}
    schema = {t for t in graph.triples if t[1] == "type.property.expected_type"}
    assert len(graph.triples) == 2641 and len(schema) == 264  # 2,377 fact triples


def test_ontology_derived_from_records(onto, onto_dir, records):
    assert (len(onto.relations), len(onto.attributes), len(onto.ranges)) == (253, 12, 262)
    gold_relations = {a.split(",")[1].rstrip(")") for r in records.values() for a in r["actions"]
                      if a.startswith("get_neighbors")}
    assert len(gold_relations) == 178 and gold_relations <= onto.relations
    assert "topic_server.population_number" in onto.attributes
    rules = {rule: sum(1 for r in onto.rule.values() if r == rule) for rule in kg_testonto.RULES}
    assert rules == {"reverse": 194, "class": 23, "next": 20, "intersection": 13}
    assert sorted(onto.relations - set(onto.ranges)) == ["spaceflight.rocket_engine_cycle.rocket_engines",
                                                         "spaceflight.rocket_engine_fuel.rocket_engines",
                                                         "travel.travel_destination.tourist_attractions"]
    # reverse twins: get_neighbors(m.06x5s, time.recurring_event.instances) is
    # (JOIN time.event.instance_of_recurring_event m.06x5s) in dev 14's s_expression
    assert onto.ranges["time.recurring_event.instances"] == "time.event"
    assert onto.ranges["time.event.instance_of_recurring_event"] == "time.recurring_event"
    assert onto.rule["time.recurring_event.instances"] == "reverse"
    assert onto.ranges["time.event.end_date"] == "type.datetime"
    # the files are AgentBench's formats, read back by the environment's own reader
    lines = open(f"{onto_dir}/fb_roles").read().splitlines()
    assert "time.recurring_event time.recurring_event.instances time.event" in lines and len(lines) == 262
    read = FileOntology.load(onto_dir)
    assert read.ranges == onto.ranges
    assert read.relations(["time.recurring_event.instances", "type.object.name", "time.event.end_date"]) == \
        ["time.recurring_event.instances"]
    assert read.attributes(["time.recurring_event.instances", "time.event.end_date"]) == ["time.event.end_date"]


def test_gold_path_expert_on_every_held_task(expert_runs, graph, records, onto):
    solved, refused, shapes = [], {}, set()
    for (split, idx), ep in expert_runs.items():
        rec = records[(split, idx)]
        why = kg_testgraph.agentbench_static_failure(rec, onto)
        if why is None:  # AgentBench's rules accept every gold action: F1 = EM = 1
            assert ep.status == Status.COMPLETED and ep.reward == 1.0, (split, idx, ep.messages[-2:])
            assert ep.info["em"] == 1.0 and ep.info["executable"] == 1.0
            assert set(ep.info["predict"]) == {a["answer_argument"] for a in rec["answer"]}
            assert ep.turns == len(rec["actions"]) + 1
            solved.append((split, idx))
            shapes.add(rec["s_expression"].split()[0])
        else:  # AgentBench refuses one of the gold actions (type mismatch, no range type): so do we
            assert ep.reward == 0.0, (split, idx)
            bad = int(why.split()[1].rstrip(":"))
            obs = [m["content"] for m in ep.messages if m["role"] == "user"][-ep.turns:]
            assert "cannot be executed" in obs[bad], (split, idx, obs[bad])
            refused[(split, idx)] = why
    # every task whose gold actions AgentBench's rules accept is solved: 158 of 158 (of 162 held)
    assert len(solved) == 158 and shapes == {"(AND", "(COUNT", "(ARGMAX", "(ARGMIN"}
    assert refused == {
        ("dev", 14): "action 6: intersection of sports.sports_championship_event and time.event",
        ("std", 9): "action 4: intersection of time.event and base.inaugurations.inauguration",
        ("std", 10): "action 1: relation spaceflight.rocket_engine_cycle.rocket_engines has no range type",
        ("std", 126): "action 6: intersection of book.book and book.written_work"}


def test_store_schema_ontology_matches_the_files(expert_runs, endpoint, bench_data, graph):
    # Without files the environment reads Freebase's schema triples from the store itself: on
    # this graph they encode the same ontology, so every episode must be identical.
    store = _load_splits(bench_data, sparql_url=endpoint.url, ontology="store")
    assert isinstance(store["dev"].ontology, StoreOntology) and store["dev"].ontology_dir is None
    differ = {}
    for (split, idx), ep in expert_runs.items():
        other = run_episode(store[split], str(idx))
        if (other.messages, other.reward, other.status) != (ep.messages, ep.reward, ep.status):
            pairs = zip(ep.messages, other.messages)
            first = next(i for i, (a, b) in enumerate(pairs) if a != b)
            differ[(split, idx)] = (ep.reward, other.reward, ep.messages[first]["content"],
                                    other.messages[first]["content"])
    # std 10: its relation has no range line in the derived fb_roles (a vocabulary relation without
    # a range, which AgentBench's real files never have): the files list it and refuse to follow
    # it; the schema never calls it a relation, so get_relations already hides it.
    assert differ == {("std", 10): (0.0, 0.0, "Observation: [spaceflight.rocket_engine_cycle.rocket_engines]",
                                    "Observation: []")}
    # type.object.name / type.object.type have schema triples too, with primitive ranges: never shown
    assert store["dev"].ontology.range("type.object.name") == "type.text"
    assert store["dev"].ontology.relations(["type.object.type", "sports.mascot.team"]) == ["sports.mascot.team"]


def test_opening_messages_are_agentbench_prompt(dev, envs):
    rec = dev.task("0").data
    msgs = dev.reset("0")
    assert msgs[0] == {"role": "user", "content": INSTRUCTIONS.format(max_turns=15)}
    assert "You can take at most 15 actions to find the answer to the question." in msgs[0]["content"]
    assert msgs[1] == {"role": "assistant", "content": "I've understood your instruction, start please.",
                       "loss": False}
    assert [m["content"] for m in msgs[2:-1]] == ONE_SHOT and len(ONE_SHOT) == 16
    assert all(m.get("loss") is False for m in msgs[:-1] if m["role"] == "assistant")
    assert msgs[-1]["content"] == ("A new question: " + rec["question"] + "\nEntities: [Did you see that thing? "
                                   "That’s Sidat-Singh! The Syracuse Walking Dream!, Pat Connaughton]")
    plain = KGEnv(dev.path, sparql_url=envs["dev"].client.url, ontology_dir=envs["dev"].ontology_dir, one_shot=False)
    assert len(plain.reset("0")) == 3


def test_observations_on_real_task(dev):
    dev.reset("14")  # Super Bowl / Miles: relation lists, variable types, the failing intersection
    obs = dev.step("Thought: start\nAction: get_relations(Super Bowl)").observation
    # type.object.name / type.object.type are in the graph but not in AgentBench's vocabulary
    assert obs == "Observation: [sports.sports_championship.events, time.recurring_event.instances]"
    res = dev.step("Action: get_neighbors(Super Bowl, time.recurring_event.instances)")
    assert res.observation == "Observation: variable #0, which are instances of time.event"
    assert res.info["variable"] == 0 and not res.done
    assert dev.step("Action: get_relations(m.027l54x)").observation == "Observation: [sports.mascot.team]"
    assert dev.step("Action: get_neighbors(Miles, sports.mascot.team)").observation == \
        "Observation: variable #1, which are instances of sports.sports_team"
    dev.step("Action: get_relations(#1)")
    assert dev.step("Action: get_neighbors(#1, sports.sports_team.championships)").observation == \
        "Observation: variable #2, which are instances of sports.sports_championship_event"
    res = dev.step("Action: intersection(#0, #2)")
    assert res.observation == ("intersection(#0, #2) cannot be executed. The two variables are not of the same "
                               "type. You may further explore them by call get_relations")
    assert res.info["invalid"] == "invalid_action" and not res.done
    assert dev.step("Action: get_attributes(#2)").observation == "Observation: [time.event.end_date]"
    assert dev.step("Action: argmax(#2, time.event.end_date)").observation == \
        "Observation: variable #3, which are instances of sports.sports_championship_event"
    assert dev.step("Action: count(#2)").observation == "Observation: variable #4, which is a number"
    res = dev.step("Thought: done\nFinal Answer: #3")
    assert res.done and res.status == Status.COMPLETED and res.reward == 1.0  # gold: Super Bowl XXXIII
    assert res.info["predict"] == ["m.076y0"]


def test_count_answers(envs):
    env = envs["dev"].spawn()
    for tid, gold in (("4", "1"), ("10", "5"), ("19", "133")):
        ep = run_episode(env, tid)
        assert ep.info["predict"] == [gold] and ep.reward == 1.0
        assert ep.info["program"].startswith("(COUNT ")


def test_malformed_and_invalid_calls(dev):
    dev.reset("0")
    cases = [
        ("I think the answer is Guard.", NO_ACTION, "invalid_format"),
        ("Action: I will look around", NOT_EXECUTED, "invalid_format"),
        ("Action: get_relations(Pat Connaughton", "I may make a syntax error when calling get_relations "
         "(e.g., unmatched parenthesis). I need to fix it and reuse the tool", "invalid_format"),
        ("Action: get_neighbors(Pat Connaughton, basketball.basketball_player.position_s)",
         "get_neighbors(Pat Connaughton, basketball.basketball_player.position_s) cannot be executed. "
         "You may make a mistake and need to fix it.", "invalid_action"),  # no get_relations yet
        ("Action: get_relations(#7)", "get_relations(#7) cannot be executed. You may make a mistake and need "
         "to fix it.", "invalid_action"),  # unknown variable
        ("Action: get_relations(Barack Obama)", "get_relations(Barack Obama) cannot be executed. You may make "
         "a mistake and need to fix it.", "invalid_action"),  # not an entity of this question
        ("Action: get_attributes(Pat Connaughton)", "get_attributes(Pat Connaughton) cannot be executed. You "
         "may make a mistake and need to fix it.", "invalid_action"),
        ("Action: union(#0, #1)", "union(#0, #1) cannot be executed. You may make a mistake and need to fix "
         "it.", "invalid_action"),
        ("Final Answer: #0", BAD_VARIABLE, "invalid_action"),
    ]
    for text, feedback, kind in cases:
        res = dev.step(text)
        assert (res.observation, res.info["invalid"], res.done) == (feedback, kind, False), text
    # AgentBench cuts a made-up observation and unescapes \_ before parsing
    res = dev.step("Action: get_relations(Pat Connaughton)\nObservation: [made.up]")
    assert res.observation == "Observation: [basketball.basketball_player.position_s]"
    assert dev.history[-2] == {"role": "assistant", "content": "Action: get_relations(Pat Connaughton)\n"}
    res = dev.step(r"Action: get_neighbors(variable Pat Connaughton, basketball.basketball\_player.position\_s)")
    assert res.observation == "Observation: variable #0, which are instances of basketball.basketball_position"
    assert dev.turns == 11 and dev.invalid == 9
    strict = dev.spawn()
    strict.max_invalid = 0
    strict.reset("0")
    res = strict.step("no action")
    assert res.done and res.status == Status.INVALID_FORMAT and res.reward == 0.0


def test_wrong_final_answer_f1(envs):
    env = envs["dev"].spawn()
    env.reset("2")  # six gold symptoms; #0 holds them and one more, so P = 6/7, R = 1
    env.step("Action: get_relations(fip)")
    env.step("Action: get_neighbors(fip, base.pethealth.pet_disease_or_medical_condition.symptoms)")
    res = env.step("Final Answer: #0")
    assert res.done and res.status == Status.COMPLETED
    assert res.reward == pytest.approx(12 / 13) and res.info["f1"] == pytest.approx(12 / 13)
    assert res.info["em"] == 0.0 and res.info["executable"] == 1.0 and len(res.info["predict"]) == 7
    env.reset("0")  # a variable with no gold member: F1 0 but executable
    env.step("Action: get_relations(Did you see that thing? That’s Sidat-Singh! The Syracuse Walking Dream!)")
    env.step("Action: get_neighbors(m.09rl290, media_common.quotation.author)")
    res = env.step("Final Answer: #0")
    assert (res.reward, res.info["em"], res.info["executable"]) == (0.0, 0.0, 1.0)


def test_answer_scores_hand_cases():
    assert answer_scores(["a", "b"], {"a"}) == {"f1": pytest.approx(2 / 3), "em": 0.0, "executable": 1.0}
    assert answer_scores(["a", "a"], {"a"}) == {"f1": 1.0, "em": 1.0, "executable": 1.0}  # sets
    assert answer_scores(["a"], {"a", "b", "c", "d"})["f1"] == pytest.approx(2 * 0.25 / 1.25)
    assert answer_scores([], {"a"}) == {"f1": 0.0, "em": 0.0, "executable": 0.0}
    assert answer_scores(["x"], {"a"}) == {"f1": 0.0, "em": 0.0, "executable": 1.0}


def test_round_limit(envs):
    env = envs["dev"].spawn()
    env.reset("0")
    for i in range(15):  # alternating, so no repetition; never a final answer
        res = env.step(f"Action: get_relations({'Pat Connaughton' if i % 2 else 'm.09rl290'})")
    assert res.done and res.status == Status.TURN_LIMIT and res.reward == 0.0 and env.turns == 15
    env.reset("4")  # a final answer in the last round still counts
    for action in env.task("4").data["actions"]:
        env.step("Action: " + action)
    for _ in range(15 - 1 - env.turns):
        env.step("Action: get_relations(mac)" if env.turns % 2 else "Action: get_relations(Motorola 68040)")
    assert env.turns == 14 and not env.done
    res = env.step("Final Answer: #3")  # #3 = count(#2)
    assert res.done and res.status == Status.COMPLETED and res.reward == 1.0 and env.turns == 15
    assert res.info["predict"] == ["1"]


def _hand_graph(tmp_path, schema):
    ns = "http://rdf.freebase.com/ns/"
    rows = [("m.e", "a.b.rel", "m.1"), ("m.e", "a.b.rel", "m.2"), ("m.e", "a.b.rel", "m.3"), ("m.e", "a.b.rel", "m.e"),
            ("m.e", "a.b.other", "m.1")]
    if schema:  # Freebase's schema: ranges; a.b.other has none, a.b.note is text (neither is shown)
        expected = "type.property.expected_type"
        rows += [("a.b.rel", expected, "a.c"), ("a.b.size", expected, "type.int"), ("a.b.note", expected, "type.text")]
    lines = [f"<{ns}{s}> <{ns}{p}> <{ns}{o}> ." for s, p, o in rows]
    for mid, v in (("m.1", 5), ("m.2", 9), ("m.3", 9), ("m.e", 99)):
        lines.append(f'<{ns}{mid}> <{ns}a.b.size> "{v}"^^<http://www.w3.org/2001/XMLSchema#integer> .')
        lines.append(f'<{ns}{mid}> <{ns}a.b.note> "n{v}"@en .')
    (tmp_path / "g.ttl").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "g.ttl")


@pytest.mark.parametrize("source", ["files", "store"])
def test_superlative_ties_and_entity_filter(tmp_path, source):
    (tmp_path / "t.json").write_text(json.dumps([{"question": "q", "entities": {"E": "m.e"},
                                                  "answer": [{"answer_argument": "m.2"}]}]))
    options = {"ontology": "store"}
    if source == "files":
        onto = kg_testonto.Ontology({"a.b.rel"}, {"a.b.size"}, {"a.b.rel": "a.c", "a.b.size": "type.int"})
        options = {"ontology_dir": str(onto.write(tmp_path / "onto"))}
    env = serve.envs.load("knowledgegraph", str(tmp_path / "t.json"), graph_file=_hand_graph(tmp_path, True),
                          **options)
    try:
        assert isinstance(env, KGEnv) and isinstance(env.ontology, FileOntology if source == "files" else StoreOntology)
        env.reset("0")
        assert env.step("Action: get_relations(E)").observation == "Observation: [a.b.rel]"
        assert env.step("Action: get_neighbors(E, a.b.other)").info["invalid"] == "invalid_action"  # not listed
        assert env.step("Action: get_neighbors(E, a.b.rel)").observation == \
            "Observation: variable #0, which are instances of a.c"
        assert env.step("Action: get_attributes(#0)").observation == "Observation: [a.b.size]"
        assert env.step("Action: argmax(#0, a.b.note)").observation == \
            "argmax(#0, a.b.note) cannot be executed. You may make a mistake and need to fix it."
        env.step("Action: argmax(#0, a.b.size)")  # m.e (99) is the question's entity: not ranked
        env.step("Action: argmin(#0, a.b.size)")
        env.step("Action: count(#0)")
        got = {i: env._answers(env.variables[i].program) for i in range(4)}
        assert sorted(got[0]) == ["m.1", "m.2", "m.3"] and sorted(got[1]) == ["m.2", "m.3"]  # a tie
        assert got[2] == ["m.1"] and got[3] == ["3"]
        res = env.step("Final Answer: #1")
        assert res.reward == pytest.approx(2 / 3)
    finally:
        url = env.client.url
        env.shutdown()
    with pytest.raises(urllib.error.URLError):  # the environment's own endpoint is gone
        urllib.request.urlopen(url, timeout=2)


def test_backend_down_is_task_error(dev):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dev.spawn()
    env.client = SparqlClient(f"http://127.0.0.1:{port}/sparql", timeout_s=2)
    env.reset("0")
    res = env.step("Action: get_relations(Pat Connaughton)")
    assert res.done and res.status == Status.TASK_ERROR and "unavailable" in res.observation


def test_options_and_records(tmp_path, endpoint, bench_data, onto_dir, caplog):
    dev_file = str(bench_data / "agentbench" / "kg" / "dev.json")
    with pytest.raises(EnvError, match="sparql_url"):
        serve.envs.load("kg", dev_file, ontology_dir=onto_dir)
    with pytest.raises(EnvError, match="exactly one"):
        serve.envs.load("kg", dev_file, ontology_dir=onto_dir, sparql_url=endpoint.url, graph_file="x.nt")
    with pytest.raises(EnvError, match="ontology_dir.*vocab.json"):
        serve.envs.load("kg", dev_file, ontology_dir=str(tmp_path), sparql_url=endpoint.url)
    with pytest.raises(EnvError, match="sparql_url"):
        serve.envs.load("kg", dev_file, ontology_dir=onto_dir, sparql_url="localhost:3001")
    with pytest.raises(EnvError, match="contradict"):
        serve.envs.load("kg", dev_file, ontology="store", ontology_dir=onto_dir, sparql_url=endpoint.url)
    with pytest.raises(EnvError, match="'auto', 'files' or 'store'"):
        serve.envs.load("kg", dev_file, ontology="vocab", sparql_url=endpoint.url)
    with pytest.raises(EnvError, match="no Freebase schema triples"):  # a store without schema, no files
        serve.envs.load("kg", dev_file, ontology="store", graph_file=_hand_graph(tmp_path, False))
    recs = json.loads((bench_data / "agentbench" / "kg" / "dev.json").read_text())[:3]
    del recs[1]["answer"]
    recs[2] = dict(recs[2], actions=None)
    (tmp_path / "bad.json").write_text(json.dumps(recs))
    env = serve.envs.load("kg", str(tmp_path / "bad.json"), sparql_url=endpoint.url, ontology_dir=onto_dir)
    assert env.tasks() == ["0", "2"] and env.splits() == {"bad": ["0", "2"]}
    assert "'answer'" in env.skipped["1"] and "4300861012000_grailqa" in env.skipped["1"]
    env.reset("2")
    with pytest.raises(EnvError, match="no gold 'actions'"):
        env.expert_action()
    default = serve.envs.load("kg", sparql_url=endpoint.url, ontology_dir=onto_dir)
    assert len(default.tasks("dev")) == 20
    # ontology "auto" (the default): AgentBench's files from data/ when placed there (they are not
    # shipped), else the store's schema, announced by a warning
    with caplog.at_level(logging.WARNING, logger="serve.envs.kg"):
        auto = serve.envs.load("kg", sparql_url=endpoint.url)
    if (bench_data / "agentbench" / "kg" / "ontology").is_dir():
        assert isinstance(auto.ontology, FileOntology)
    else:
        assert isinstance(auto.ontology, StoreOntology) and "type.property.expected_type" in caplog.text
        with pytest.raises(EnvError, match="no ontology files"):
            serve.envs.load("kg", sparql_url=endpoint.url, ontology="files")
