"""Digital Card Game environment: AgentBench's task list, prompts, answer parsing, retries,
reward, and the scripted expert's win rate over the whole default (ext, 200-game) task list."""

import hashlib
import json

import pytest

import serve.envs
from serve.envs.base import EnvError, Status, UnknownTask, run_episode
from serve.envs.dcg import DCGEnv, game_seed
from serve.envs.dcg_engine import Game, View
from serve.envs.dcg_prompts import ACTION_DESCRIPTION, GUESS_DESCRIPTION, OKAY, check_guess, check_move, decode_move

FIRST_GUESS = ("Previous Guess: False\nLive Enemy Fish: ['0', '1', '2', '3']\n"
               "Enemy's previous action: {'ACTION_FISH': 'None', 'ATK': 'None', 'TARGET': 'None', 'SKILL_TYPE': 'None'}\n"
               "Enemy's previous triggered passive ability: {}\n\nPlease output your guess.")
AOE = '{"pick_fish": "spray", "action": "active", "target_position": 0}'


@pytest.fixture(scope="module")
def env():
    return serve.envs.load("dcg")


def test_registered_as_dcg_and_card_game(env):
    assert isinstance(env, DCGEnv) and env.name == "dcg" and env.metric == "win_rate"
    assert serve.envs.get_class("card_game") is DCGEnv  # the alias, once the module is imported


def test_default_task_list_is_agentbench_ext_split(env):
    ids = env.tasks()
    assert len(ids) == 200 and env.splits() == {"ext": ids}
    # AgentBench's order: for base in (baseline1, baseline2): for agent in (0, 1): test_time games
    assert ids[0] == "ext-baseline1-agent0-000" and ids[49] == "ext-baseline1-agent0-049"
    assert ids[50] == "ext-baseline1-agent1-000" and ids[100] == "ext-baseline2-agent0-000"
    assert env.task(ids[150]).data == {"opponent": "baseline2", "side": 1, "seed": game_seed(0, ids[150])}
    seeds = [env.task(t).data["seed"] for t in ids]
    assert len(set(seeds)) == 200 and seeds == [serve.envs.load("dcg").task(t).data["seed"] for t in ids]
    assert len(serve.envs.load("dcg", split="dev").tasks()) == 12  # test_time 3
    assert len(serve.envs.load("dcg", split="std").tasks()) == 20  # test_time 5
    few = serve.envs.load("dcg", games=2, seed=7, opponents=["baseline2"])
    assert few.tasks() == ["ext-baseline2-agent0-000", "ext-baseline2-agent0-001",
                           "ext-baseline2-agent1-000", "ext-baseline2-agent1-001"]
    assert few.task(few.tasks()[0]).data["seed"] != env.task("ext-baseline2-agent0-000").data["seed"]


@pytest.mark.parametrize("options,message", [
    ({"split": "test"}, "option 'split'"), ({"games": 0}, "option 'games'"),
    ({"opponents": ["baseline3"]}, "option 'opponents'"), ({"rules": "house"}, "option 'rules'"),
    ({"max_tries": 0}, "option 'max_tries'"),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(EnvError, match=message):
        serve.envs.load("dcg", **options)


def test_opening_is_agentbench_rule_texts_then_the_first_guess(env):
    # md5 of AgentBench.old's ACTION_DESCRIPTION[2] and GUESS_DESCRIPTION[2] (prompt/en.py)
    assert hashlib.md5(ACTION_DESCRIPTION.encode()).hexdigest() == "d523fb5003a8695f7ed98fa456886296"
    assert hashlib.md5(GUESS_DESCRIPTION.encode()).hexdigest() == "b9ed3190961329eb386378d2ba24f18f"
    msgs = env.reset("ext-baseline1-agent0-000")
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user"]
    assert (msgs[0]["content"], msgs[2]["content"]) == (ACTION_DESCRIPTION, GUESS_DESCRIPTION)
    assert msgs[1] == msgs[3] == {"role": "assistant", "content": OKAY, "loss": False}
    assert msgs[4]["content"] == FIRST_GUESS  # the agent moves first: nothing happened yet


def test_second_mover_sees_the_opponents_first_turn(env):
    msgs = env.reset("ext-baseline2-agent1-000")
    assert [f.kind for f in env._game.teams[0]] == ["sunfish", "spray", "eel", "flame"]  # seeded pick
    # baseline2 guessed wrong, then its eel (2) AOEd our four fish for 70 each
    assert msgs[-1]["content"] == (
        "Previous Guess: False\nLive Enemy Fish: ['0', '1', '2', '3']\n"
        "Enemy's previous action: {'ACTION_FISH': '2', 'ATK': '70', 'TARGET': '[0, 1, 2, 3]', 'SKILL_TYPE': 'AOE'}\n"
        "Enemy's previous triggered passive ability: {}\n\nPlease output your guess.")
    res = env.step('I guess {"guess_type": "eel", "target_position": 2}')
    assert res.info["correct"] is True and not res.done
    state = {"You": [{"ID": k, "POSITION": str(p), "HP": str(hp), "ATK": "200"} for p, (k, hp) in
                     enumerate(zip(["spray", "flame", "eel", "sunfish"], [298, 298, 363, 363]))],
             "Enemy": [{"ID": "eel" if p == 2 else "unknown", "POSITION": str(p), "HP": "350", "ATK": "unknown"}
                       for p in range(4)]}
    assert res.observation == (
        f"Following is the current game state:\n{json.dumps(state)}\n\n"
        "Your previous action: {'ACTION_FISH': 'None', 'ATK': 'None', 'TARGET': 'None'}\n"
        "Enemy's previous action: {'ACTION_FISH': '2', 'ATK': '70', 'TARGET': '[0, 1, 2, 3]'}\n\n"
        "Please Output your next action.")
    res = env.step(AOE)
    assert res.info["skill"] == "aoe" and "Previous Guess: True\n" in res.observation
    # our AOE hit their eel (2) and sunfish (0): both deflected
    assert 'passive ability: {"Position: 0": "Deflect", "Position: 2": "Deflect"}' in res.observation


def _view(mine=(0, 1, 2, 3), theirs=(0, 1, 2, 3)):
    g = Game([["spray", "flame", "eel", "sunfish"]] * 2)
    for side, alive in ((0, mine), (1, theirs)):
        for f in g.teams[side]:
            if f.pos not in alive:
                f.hp, f.alive = 0, False
    return View(g, 0)


def test_moves_are_read_as_agentbench_reads_them():
    v = _view(mine=(0, 1, 3), theirs=(0, 2, 3))
    ok = lambda text: decode_move(text, v)[0]  # noqa: E731
    assert ok("Let me think... {'pick_fish': 'spray', 'action': 'active', 'target_position': 1}") == (0, "active", None)
    assert ok('{"bad json} then {"pick_fish": "sunfish", "action": "normal", "target_position": "2"}') == (3, "normal", 2)
    assert ok('{"pick_fish": "flame", "action": "active", "target_position": 3}') == (1, "active", 3)  # infight
    assert ok('{"pick_fish": "0", "action": "active", "target_position": 2}') == (0, "active", None)  # by position
    # Infight targets must pass AgentBench's enemy-target check too: our spray (0) is a legal
    # target only because enemy fish 0 is alive as well
    assert ok('{"pick_fish": "flame", "action": "active", "target_position": 0}') == (1, "active", 0)
    rejected = [
        '{"pick_fish": "eel", "action": "active", "target_position": 0}',  # our eel is dead
        '{"pick_fish": "flame", "action": "active", "target_position": 1}',  # infight on itself
        '{"pick_fish": "flame", "action": "active", "target_position": 2}',  # own fish 2 dead (and enemy 2 alive)
        '{"pick_fish": "sunfish", "action": "active", "target_position": 1}',  # own flame alive, enemy 1 dead
        '{"pick_fish": "flame", "action": "normal", "target_position": 1}',  # enemy 1 is dead
        '{"pick_fish": "1", "action": "active", "target_position": 3}',  # infight fish named by position: SDK error
        '{"pick_fish": "0", "action": "active", "target_position": 1}',  # AOE by position needs a living enemy target
        '{"pick_fish": 0, "action": "normal", "target_position": 2}',  # position as a number
        '{"pick_fish": "spray", "action": "attack", "target_position": 2}',
        '{"pick_fish": "spray", "action": "normal", "target_position": "2.0"}',
        '{"pick_fish": "spray", "action": "normal"}',
        '{"pick_fish": "spray", "action": "active", "target_position": {"x": 1}}',  # nested braces cut the span
        "spray, active, 0",
    ]
    results = [decode_move(t, v) for t in rejected]
    assert [r[0] for r in results] == [None] * 13
    assert [r[1] for r in results] == [True] * 11 + [False, False]  # the last two hold no JSON object


def test_guesses_are_read_as_agentbench_reads_them():
    living = [0, 2, 3]
    assert check_guess({"guess_type": "eel", "target_position": 2}, living) == (2, "eel")
    assert check_guess({"guess_type": "eel", "target_position": "3"}, living) == (3, "eel")
    for bad in ({"guess_type": "eel", "target_position": 1}, {"guess_type": "shark", "target_position": 2},
                {"guess_type": "eel", "target_position": 4}, {"guess_type": "eel"}, {"guess_type": ["eel"], "target_position": 2}):
        assert check_guess(bad, living) is None
    assert check_move({"pick_fish": ["spray"], "action": "normal", "target_position": 0}, [0], [0]) is None


def test_unusable_answers_get_the_same_prompt_five_times(env):
    msgs = env.reset("ext-baseline1-agent0-001")
    for n in range(4):
        res = env.step("I am not sure what to do.")
        assert not res.done and res.info["invalid"] == "invalid_format" and res.observation == msgs[-1]["content"]
    res = env.step("{'guess_type': 'whale', 'target_position': 0}")  # 5th try: the guess is skipped
    assert not res.done and res.info["guess_skipped"] and res.observation.startswith("Following is the current game state")
    assert env._game.last_assert[0].pos is None
    prompt = res.observation
    for n in range(4):
        res = env.step("{'pick_fish': 'shark', 'action': 'normal', 'target_position': 0}")
        assert res.info["invalid"] == "invalid_action" and res.observation == prompt
    res = env.step("no move")  # 5th unusable action: AgentBench's agent is out of the game
    assert res.done and res.status == Status.INVALID_ACTION and res.reward == 0.0
    assert res.info["winner"] == "opponent" and res.info["end_reason"] == "no_valid_action"
    assert res.observation == "Game over: you lose, you gave no valid action in 5 tries."
    assert env.turns == 10


def test_a_valid_answer_resets_the_tries_and_format_only_failures(env):
    env.reset("ext-baseline1-agent0-002")
    for _ in range(4):
        env.step("pass")
    assert env.step('{"guess_type": "spray", "target_position": 0}').info["phase"] == "guess"
    for _ in range(4):
        env.step("pass")
    res = env.step(AOE)
    assert not res.done and res.info["skill"] == "aoe"
    one = serve.envs.load("dcg", max_tries=1, games=1)
    one.reset(one.tasks()[0])
    one.step('{"guess_type": "spray", "target_position": 0}')
    res = one.step("I attack!")
    assert res.done and res.status == Status.INVALID_FORMAT and res.info["invalid"] == "invalid_format"


def test_guessing_a_revealed_fish_asserts_nothing(env):
    env.reset("ext-baseline1-agent0-003")
    kind = env._game.teams[1][1].kind
    res = env.step(json.dumps({"guess_type": kind, "target_position": 1}))
    assert res.info["correct"] is True and env._game.teams[1][1].hp == 350
    env.step(AOE)
    hp = [f.hp for f in env._game.teams[1]]
    res = env.step(json.dumps({"guess_type": kind, "target_position": 1}))
    assert res.info["correct"] is None and [f.hp for f in env._game.teams[1]] == hp


def _play(env, tid, policy):
    """Play ``tid`` with ``policy(env) -> answer``; the final StepResult and every step's info."""
    env.reset(tid)
    infos = []
    while not env.done:
        res = env.step(policy(env))
        infos.append(res.info)
    return res, infos


@pytest.mark.parametrize("rules", ["prompt", "agentbench"])
def test_expert_wins_at_least_95_percent_of_the_default_games(rules):
    env = serve.envs.load("dcg", rules=rules)
    episodes = []
    for tid in env.tasks():
        res, infos = _play(env, tid, lambda e: e.expert_action())
        assert res.status == Status.COMPLETED and res.reward == (res.info["winner"] == "agent"), tid
        assert not any("invalid" in i for i in infos), tid  # every expert answer parses
        assert res.observation.startswith("Game over: you " + ("win" if res.reward else "lose"))
        episodes.append({"task_id": tid, "reward": res.reward, "info": res.info})
    report = env.paper_score(episodes)
    assert report["n"] == 200 and report["score"] >= 95.0, report
    assert report["groups"]["baseline1-agent0"] == {"n": 50, "win_rate": 100.0}
    assert 0.0 < report["damage_rate"] <= 1.0


def test_reward_is_the_win_and_losses_score_zero(env):
    def weak(e):  # always the same wrong-ish guess; the sunfish pokes the first living enemy
        if e._game.phase == "assert":
            return '{"guess_type": "spray", "target_position": %d}' % e._game.living(1)[0]
        fish = "sunfish" if e._game.teams[0][3].alive else ["spray", "flame", "eel"][e._game.living(0)[0]]
        return json.dumps({"pick_fish": fish, "action": "normal", "target_position": e._game.living(1)[0]})
    results = [_play(env, tid, weak)[0] for tid in env.tasks()[100:106]]  # baseline2, agent first
    assert all(r.status == Status.COMPLETED and r.reward == (r.info["winner"] == "agent") for r in results)
    lost = [r for r in results if r.reward == 0.0]
    assert lost and all(r.info["agent_alive"] == 0 and r.observation == "Game over: you lose, all your fish are dead."
                        for r in lost)
    report = env.paper_score([{"task_id": t, "reward": r.reward, "info": r.info}
                              for t, r in zip(env.tasks()[100:106], results)])
    assert report["score"] == pytest.approx(100 * (6 - len(lost)) / 6) and report["n"] == 6


def test_games_replay_identically_and_spawned_episodes_are_independent(env):
    tid = "ext-baseline1-agent1-007"
    first = run_episode(env, tid).messages
    other = env.spawn()
    other.reset("ext-baseline2-agent0-001")
    assert run_episode(env, tid).messages == first
    other.step(other.expert_action())
    assert other.turns == 1 and other.current.id == "ext-baseline2-agent0-001"
    turn_limited = serve.envs.load("dcg", games=1, max_turns=3)
    ep = run_episode(turn_limited, turn_limited.tasks()[0])
    assert ep.status == Status.TURN_LIMIT and ep.reward == 0.0 and ep.turns == 3


def test_game_list_file(tmp_path):
    games = [{"id": "g1", "opponent": "baseline2", "side": 1, "seed": 5},
             {"opponent": "baseline1", "side": 0, "seed": 6},
             {"id": "bad-opp", "opponent": "human", "side": 0, "seed": 1},
             {"id": "bad-side", "opponent": "baseline1", "side": 2, "seed": 1},
             {"id": "no-seed", "opponent": "baseline1", "side": 0}]
    path = tmp_path / "games.json"
    path.write_text(json.dumps(games))
    env = serve.envs.load("dcg", str(path))
    assert env.tasks() == ["g1", "game001"] and env.task("g1").data == {"opponent": "baseline2", "side": 1, "seed": 5}
    assert "opponent" in env.skipped["bad-opp"] and "'side'" in env.skipped["bad-side"]
    assert "seed" in env.skipped["no-seed"]
    with pytest.raises(UnknownTask, match="skipped"):
        env.reset("no-seed")
    lines = tmp_path / "games.jsonl"
    lines.write_text("\n".join(json.dumps(g) for g in games[:2]) + "\n")
    assert serve.envs.load("dcg", str(lines)).tasks() == ["g1", "game001"]
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(EnvError, match="neither a JSON list nor JSON lines"):
        serve.envs.load("dcg", str(tmp_path / "broken.json"))


@pytest.mark.slow  # importing serve.env_server pulls in Ray Serve (~12 s here)
def test_served_through_the_session_manager():
    from serve.env_server import SessionManager

    mgr = SessionManager({"card_game": {"env": "dcg", "options": {"games": 1, "split": "dev"}}})
    listing = mgr.list_envs()["envs"][0]
    assert (listing["env"], listing["tasks"], listing["splits"]) == ("dcg", 4, {"dev": 4})
    sid = mgr.create("card_game", "dev-baseline2-agent0-000")["session_id"]
    done = False
    while not done:
        out = mgr.step(sid, mgr.expert(sid)["action"])
        json.dumps(out)  # every step result is JSON-ready
        done = out["done"]
    assert out["status"] == "completed" and out["reward"] == 1.0 and out["info"]["winner"] == "agent"
