"""ALFWorld on AgentBench's dev games (real game files, real TextWorld engine)."""

import random
import socket
import threading

import pytest

pytest.importorskip("textworld")
pytest.importorskip("alfworld")

import serve.envs  # noqa: E402
from serve.envs.alfworld import bleu, map_action, old_form  # noqa: E402
from serve.envs.base import Status, run_episode  # noqa: E402


@pytest.fixture(scope="module")
def env(bench_data):
    e = serve.envs.load("alfworld", str(bench_data / "alfworld" / "agentbench_dev.json"))
    yield e
    e.shutdown()


def random_policy(env, seed=0):
    rng = random.Random(seed)
    return lambda history: "ACTION: " + rng.choice(env.admissible)


def test_loads_agentbench_dev_split(env):
    assert len(env.tasks()) == 20 and env.splits().keys() == {"dev"}
    assert not env.skipped


def test_task_file_forms_and_skips(bench_data, tmp_path):
    root = bench_data / "alfworld"
    train = serve.envs.load("alfworld", str(root / "train_subset.json"))
    if (root / "json_2.1.1" / "train").is_dir():  # optional data (agenttuning fetch-data alfworld-train)
        assert len(train.tasks()) == 360 and set(train.splits()) == {"train"}
    else:  # not shipped: every game is skipped with the reason, none silently dropped
        assert train.tasks() == [] and len(train.skipped) == 360
        assert all("not found" in why for why in train.skipped.values())
    folder = serve.envs.load("alfworld", str(root / "json_2.1.1" / "valid_unseen"))
    std = serve.envs.load("alfworld", str(root / "agentbench_std.json"))
    assert sorted(folder.tasks()) == sorted(serve.envs.load("alfworld").tasks() + std.tasks())  # 20 + 50
    good = "json_2.1.1/valid_unseen/" + folder.tasks()[0] + "/game.tw-pddl"
    listing = tmp_path / "mine.json"
    listing.write_text('{"test": ["%s", "json_2.1.1/valid_unseen/pick_x-1/trial_1/game.tw-pddl"]}' % good)
    mine = serve.envs.load("alfworld", str(listing), games_root=str(root))
    assert mine.tasks() == [folder.tasks()[0]] and mine.splits().keys() == {"test"}
    assert "not found" in mine.skipped["pick_x-1/trial_1"]


def test_action_mapping_like_agentbench():
    adm = ["go to toilet 1", "move soapbottle 1 to toilet 1", "take soapbottle 1 from toilet 1", "look"]
    assert map_action("THOUGHT: go.\n ACTION: Go to toilet 1\nmore", adm) == "go to toilet 1"
    # AgentBench's wording of this grammar's "move X to Y", exact or snapped by BLEU
    assert map_action("ACTION: put soapbottle 1 in/on toilet 1", adm) == "move soapbottle 1 to toilet 1"
    assert map_action("ACTION: put soapbottle 1 in toilet 1", adm) == "move soapbottle 1 to toilet 1"
    assert map_action("ACTION: go to the toilet 1", adm) == "go to toilet 1"  # BLEU snap
    assert map_action("ACTION: fly away", adm) == "fly away"  # no shared word: sent as it is
    # No ACTION: the reply's first line is the command (AgentBench's process_action)
    assert map_action("I will go to the toilet\nbecause", adm) == "go to toilet 1"
    assert map_action("I should look around first.", adm) == "look"
    assert map_action("Hello there", adm) == "hello there"
    assert old_form("move soapbottle 1 to toilet 1") == "put soapbottle 1 in/on toilet 1"


def test_bleu_is_nltk_method4():
    # Reference values: nltk 3.8.1 sentence_bleu([ref.split()], cand.split(),
    # smoothing_function=SmoothingFunction().method4), the scorer of AgentBench's process_action.
    for ref, cand, value in [("look", "i should look around first.", 0.0456496931223525),
                             ("go to toilet 1", "go to the toilet 1", 0.17141814854755813),
                             ("examine desk 1", "examine", 0.1353352832366127),
                             ("take soapbottle 1 from countertop 1", "take soapbottle from countertop",
                              0.14429214010467267),
                             ("go to toilet 1", "fly away", 0.0), ("look", "look", 1.0)]:
        assert bleu(ref, cand) == pytest.approx(value, abs=1e-12), (ref, cand)


def test_walkthrough_expert_wins_and_exports(env):
    from serve.rollout import to_agentinstruct

    # one game of a short and one of the longest task type
    for tid in (env.tasks()[0], env.tasks()[-1]):
        ep = run_episode(env, tid)
        assert ep.status == Status.COMPLETED and ep.reward == 1.0, tid
    n_open = len(ep.messages) - 2 * ep.turns
    assert ep.messages[n_open - 1]["content"].startswith("Here is your task. You are in the middle of a room")
    conv = to_agentinstruct(ep.messages, n_open)
    assert [c["from"] for c in conv[:2]] == ["human", "gpt"]
    assert all(c["loss"] is False for c in conv[:n_open] if c["from"] == "gpt")
    assert all(c["loss"] is True for c in conv[n_open:] if c["from"] == "gpt")
    assert conv[-1]["value"].startswith("You put the")  # the winning placement, AgentBench's words
    actions = [m["content"] for m in ep.messages[n_open:] if m["role"] == "assistant"]
    assert any(a.startswith("ACTION: put ") and " in/on " in a for a in actions)
    seen = [m["content"] for m in ep.messages[n_open:] if m["role"] == "user"]
    assert not any(o.startswith("You arrive at") or o.startswith("You move") for o in seen)


def test_replies_that_are_no_command_get_nothing_happens_and_the_episode_goes_on(env):
    tid = env.tasks()[0]
    env.reset(tid)
    r = env.step("I should look around first.")  # no ACTION: its first line snaps to "look"
    assert r.info["command"] == "look" and "invalid" not in r.info and r.observation.startswith("You are in")
    r = env.step("ACTION: fly away")
    assert (r.observation, r.done, r.info["invalid"], r.info["command"]) == (
        "Nothing happens.", False, "invalid_action", "fly away")
    r = env.step("Hmm, what now?")
    assert (r.observation, r.done, r.info["invalid"]) == ("Nothing happens.", False, "invalid_format")
    for i in range(12):  # never ends the episode (AgentBench counts nothing)
        r = env.step(f"ACTION: jump{'!' * i}")  # no word in common with any command
        assert r.observation == "Nothing happens." and not r.done
    assert env.invalid == 14
    r = env.step("ACTION: jump 1")  # "1" is in "go to cabinet 1": BLEU snaps it, as in AgentBench
    assert r.info["command"].endswith(" 1") and "invalid" not in r.info
    r = env.step("THOUGHT: the countertop.\n ACTION: go to countertop 1")
    assert r.observation.startswith("On the countertop 1, you see") and "invalid" not in r.info
    assert "take soapbottle 1 from countertop 1" in r.info["admissible_commands"]
    env.close()


def test_repetition_rule_is_agentbenchs(env):
    tid = env.tasks()[5]
    ep = run_episode(env, tid, lambda h: "ACTION: look")
    assert (ep.status, ep.turns, ep.reward) == (Status.REPETITION, 4, 0.0)  # checked after turn 3
    replies = iter(["ACTION: look"] * 3 + ["ACTION: inventory"] * 3)
    ep = run_episode(env, tid, lambda h: next(replies))
    assert (ep.status, ep.turns) == (Status.REPETITION, 6)  # look x3 then inventory x3
    replies = iter(["ACTION: look", " ACTION: look", "ACTION: look ", "ACTION: look"])
    env.reset(tid)
    for reply in replies:  # identical after normalisation, but not identical replies
        r = env.step(reply)
    assert not r.done
    env.close()


def test_random_policy_loses(env):
    tid = env.tasks()[5]
    short = env.spawn()
    short.max_turns = 12
    ep = run_episode(short, tid, random_policy(short))
    assert ep.reward == 0.0 and ep.status in (Status.TURN_LIMIT, Status.REPETITION)


def test_concurrent_episodes_share_a_bounded_engine_pool(bench_data):
    env = serve.envs.load("alfworld", max_engines=1)
    ids, rewards = env.tasks(), []

    def play(i):
        rewards.append(run_episode(env.spawn(), ids[i]).reward)

    threads = [threading.Thread(target=play, args=(i,)) for i in (0, 1)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert rewards == [1.0, 1.0]
    assert env.pool.started == 1 and env.pool.size == 1  # capped: the second episode waited, reused it
    env.shutdown()
    assert env.pool.size == 0


@pytest.fixture(scope="module")
def env_server(ray_local, bench_data):
    """The env server (serve.env_server) on local Ray Serve, serving ALFWorld over HTTP."""
    server_mod = pytest.importorskip("serve.env_server")
    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.shutdown()  # a Serve left by an earlier module would keep its own HTTP port
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    envs = {"alfworld": {"path": str(bench_data / "alfworld" / "agentbench_dev.json")}}
    app = server_mod.EnvServer.options(ray_actor_options={"num_cpus": 0}).bind(envs, 16, 600.0)
    serve.run(app, name="alfworld_env_server", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _http_expert_episode(base: str, task_id: str) -> dict:
    import requests

    r = requests.post(f"{base}/envs/alfworld/sessions", json={"task_id": task_id}, timeout=120)
    assert r.status_code == 200, r.text
    sid = r.json()["session_id"]
    for _ in range(40):
        action = requests.get(f"{base}/sessions/{sid}/expert", timeout=60).json()["action"]
        out = requests.post(f"{base}/sessions/{sid}/step", json={"action": action}, timeout=60).json()
        if out["done"]:
            break
    requests.delete(f"{base}/sessions/{sid}", timeout=60)
    return out


def test_expert_wins_through_env_server(env_server, env):
    import requests

    listing = {e["name"]: e for e in requests.get(f"{env_server}/envs", timeout=30).json()["envs"]}
    assert listing["alfworld"]["tasks"] == 20 and listing["alfworld"]["splits"] == {"dev": 20}
    out = _http_expert_episode(env_server, env.tasks()[0])
    assert out["done"] and out["status"] == "completed" and out["reward"] == 1.0


@pytest.mark.slow
def test_expert_wins_all_dev_games_through_env_server(env_server, env):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda t: _http_expert_episode(env_server, t), env.tasks()))
    assert sum(o["reward"] for o in outs) / len(outs) >= 0.95


@pytest.mark.slow
def test_expert_wins_all_dev_games_random_wins_none(env):
    wins = sum(run_episode(env, tid).reward for tid in env.tasks())
    assert wins / len(env.tasks()) >= 0.95
    rand = sum(run_episode(env, tid, random_policy(env, i)).reward for i, tid in enumerate(env.tasks()))
    assert rand <= 1
