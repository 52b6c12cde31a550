"""Digital Card Game rules engine and AgentBench's baseline opponents, rule by rule.

Each test sets up a position with the engine's own moves (HP edited only to reach a threshold)
and checks the exact numbers the rule text gives (serve/envs/dcg_engine.py docstring).
"""

import random

import pytest

from serve.envs.dcg_engine import FISH_TYPES, Game, IllegalMove, View
from serve.envs.dcg_opponents import Baseline1, Baseline2, make_opponent

ORDER = ["spray", "flame", "eel", "sunfish"]


def game(rules="prompt", enemy=None):
    return Game([ORDER, enemy or ORDER], rules=rules)


def act(g, side, fish, action, target=None, guess=(None, None)):
    """One phase pair for ``side``: assertion ``guess`` then the action."""
    g.do_assert(side, *guess)
    return g.do_action(side, fish, action, target)


def pass_turn(g, side):
    """Hand the turn back: ``side`` skips its assertion and its first living fish attacks the
    first living enemy fish normally."""
    g.do_assert(side, None, None)
    g.do_action(side, g.living(side)[0], "normal", g.living(1 - side)[0])


def hps(g, side):
    return [f.hp for f in g.teams[side]]


def test_initial_state_and_validation():
    g = game()
    assert all(f.hp == 400 and f.atk == 200 and f.alive and not f.revealed for t in g.teams for f in t)
    assert (g.turn, g.phase, g.phases, g.winner) == (0, "assert", 0, None)
    with pytest.raises(ValueError, match="one fish of each type"):
        Game([ORDER, ["spray", "spray", "eel", "sunfish"]])
    with pytest.raises(ValueError, match="rules must be one of"):
        Game([ORDER, ORDER], rules="house")
    with pytest.raises(IllegalMove, match="side 0's assert phase"):
        g.do_action(0, 0, "normal", 0)  # assertion comes first
    with pytest.raises(IllegalMove, match="side 0's assert phase"):
        g.do_assert(1, None, None)  # not side 1's turn


def test_normal_attack_is_half_attack_on_one_living_enemy():
    g = game()
    rec = act(g, 0, 1, "normal", 0)  # flame hits the enemy spray
    assert hps(g, 1) == [300, 400, 400, 400]
    assert (rec.skill, rec.targets, rec.value, rec.is_skill) == ("normal", (0,), 100, False)
    assert (g.turn, g.phase, g.phases) == (1, "assert", 2)
    g.teams[1][3].hp = 0  # a dead fish cannot be targeted or act
    g.teams[1][3].alive = False
    g.do_assert(1, None, None)
    with pytest.raises(IllegalMove, match="cannot act"):
        g.do_action(1, 3, "normal", 0)
    with pytest.raises(IllegalMove, match="living enemy target"):
        g.do_action(1, 0, "normal", 7)


def test_aoe_hits_every_living_enemy_for_35_percent_of_attack():
    g = game(enemy=["spray", "flame", "sunfish", "eel"])
    g.teams[1][1].hp, g.teams[1][1].alive = 0, False  # enemy flame dead: not a target
    rec = act(g, 0, 0, "active")
    assert (rec.skill, rec.targets, rec.value) == ("aoe", (0, 2, 3), 70)
    # spray takes 70; sunfish and eel each deflect: keep int(70*0.3)=21, pass int(70*0.7)=49 split
    # over 2 living mates = 24 each. spray: 70+24+24; sunfish: 21+24; eel: 24+21.
    assert hps(g, 1) == [400 - 118, 0, 400 - 45, 400 - 45]
    # eel's AOE uses its current attack: 240 ATK -> int(240*0.35) = 84
    pass_turn(g, 1)
    g.teams[0][2].atk = 240
    rec = act(g, 0, 2, "active")
    assert rec.value == 84 and rec.targets == (0, 2, 3)


def test_infight_hurts_a_teammate_and_raises_attack():
    g = game()
    rec = act(g, 0, 1, "active", 0)  # flame infights own spray
    assert hps(g, 0) == [325, 400, 400, 400] and g.teams[0][1].atk == 340
    assert (rec.skill, rec.target_side, rec.targets, rec.value) == ("infight", 0, (0,), 75)
    assert rec.passives == [] and all(not h.sourced for h in rec.hits)
    g.do_assert(1, None, None)
    with pytest.raises(IllegalMove, match="teammate other than itself"):
        g.do_action(1, 3, "active", 3)  # sunfish on itself
    g.do_action(1, 3, "active", 2)  # sunfish infights its eel: no deflect (not an attack)
    assert hps(g, 1) == [400, 400, 325, 400] and g.teams[1][3].atk == 340
    assert g.teams[1][2].wound == 75  # but it counts towards the eel's attack gain
    # the boosted flame now hits for 170
    act(g, 0, 1, "normal", 0)
    assert g.teams[1][0].hp == 230


@pytest.mark.parametrize("rules,keep,each", [("prompt", 30, 23), ("agentbench", 70, 10)])
def test_deflect_spreads_an_attack_over_living_teammates(rules, keep, each):
    g = game(rules)
    rec = act(g, 0, 1, "normal", 2)  # 100 on the enemy eel, three living teammates
    assert hps(g, 1) == [400 - each, 400 - each, 400 - keep, 400 - each]
    assert [(e.kind, e.side, e.pos, e.value) for e in rec.passives] == [("deflect", 1, 2, keep)]
    assert [h.sourced for h in rec.hits] == [False, False, False, True]  # only the eel's own share is the attack


def test_deflect_with_one_mate_and_alone():
    g = game()
    for p in (0, 1):
        g.teams[1][p].hp, g.teams[1][p].alive = 0, False
    act(g, 0, 1, "normal", 3)  # sunfish with one living mate (eel): keeps 30, eel takes 70
    assert hps(g, 1)[2:] == [330, 370]
    g.teams[1][2].hp, g.teams[1][2].alive = 0, False
    pass_turn(g, 1)
    rec = act(g, 0, 1, "normal", 3)  # alone: the whole 100, no deflect event
    assert hps(g, 1)[3] == 270 and rec.passives == []


def test_deflect_fish_gain_40_attack_per_200_damage_taken():
    g = game()
    g.teams[1][2].wound = 190
    act(g, 0, 1, "normal", 2)  # eel keeps 30: wound 220 -> +40 ATK, 20 carried over
    assert g.teams[1][2].atk == 240 and g.teams[1][2].wound == 20
    g.teams[1][3].wound = 390
    pass_turn(g, 1)
    act(g, 0, 1, "normal", 3)  # wound 420 -> two steps at once
    assert g.teams[1][3].atk == 280 and g.teams[1][3].wound == 20
    assert g.teams[1][0].atk == 200  # spray/flame never gain attack from damage


def test_counter_when_the_attacked_fish_ends_below_30_percent():
    g = game()
    g.teams[1][1].hp = 220  # enemy flame: 220 - 100 = 120 is not below 120 -> no counter
    rec = act(g, 0, 2, "normal", 1)
    assert rec.passives == [] and g.teams[0][2].hp == 400
    pass_turn(g, 1)
    rec = act(g, 0, 2, "normal", 1)  # 20 HP left: the enemy spray counters, 30 to our eel
    assert [(e.kind, e.side, e.pos) for e in rec.passives] == [("counter", 1, 0)]
    assert g.teams[0][2].hp == 370 and g.teams[0][2].wound == 30  # not deflected, but counted
    pass_turn(g, 1)
    g.teams[1][0].hp = 150
    rec = act(g, 0, 3, "normal", 0)  # the spray drops to 50: only the flame counters for it
    assert [(e.kind, e.pos) for e in rec.passives] == [("counter", 1)]
    assert g.teams[0][3].hp == 370  # the attacking sunfish takes it whole (not an attack)
    g.teams[1][1].hp, g.teams[1][1].alive = 0, False
    pass_turn(g, 1)
    rec = act(g, 0, 3, "normal", 0)  # dead counter fish do not counter
    assert rec.passives == [] and not g.teams[1][0].alive


def test_counter_reports_position_by_rules():
    for rules, pos in (("prompt", [0, 1]), ("agentbench", [3, 3])):
        g = game(rules)
        g.teams[1][3].hp = 120
        rec = act(g, 0, 1, "normal", 3)  # the sunfish deflects and drops below 120 either way
        assert [e.kind for e in rec.passives] == ["deflect", "counter", "counter"]
        assert [e.pos for e in rec.passives if e.kind == "counter"] == pos
        assert g.teams[0][1].hp == 400 - 60


def test_deaths_settle_at_the_end_of_the_phase():
    g = game()
    g.teams[1][0].hp = 60  # the spray drops to -10 at the AOE's first hit ...
    g.teams[1][1].hp = 150  # ... yet still counters when the flame drops below 120 next
    rec = act(g, 0, 0, "active")
    assert [e.pos for e in rec.passives if e.kind == "counter"] == [1, 0]
    # ... and still takes its share of both deflections (49 // 3 = 16 each): 60-70-16-16
    assert hps(g, 1) == [-42, 150 - 70 - 16 - 16, 400 - 21 - 16, 400 - 16 - 21]
    assert not g.teams[1][0].alive and g.teams[1][1].alive
    assert g.teams[0][0].hp == 400 - 60  # two counters on our spray
    assert View(g, 0).enemy_hp(0) == 0  # dead fish show 0 HP


def test_assertion_right_reveals_and_hurts_every_enemy_fish():
    g = game(enemy=["eel", "spray", "sunfish", "flame"])
    g.teams[1][3].hp = 30
    rec = g.do_assert(0, 2, "sunfish")
    assert rec.correct and g.teams[1][2].revealed
    assert hps(g, 1) == [350, 350, 350, 0] and not g.teams[1][3].alive  # not below 0
    assert View(g, 0).enemy_kind(2) == "sunfish" and View(g, 0).enemy_kind(0) is None
    assert View(g, 1).my_id(2) == -4 and View(g, 1).my_id(0) == 3  # the SDK's negative id
    g.do_action(0, 0, "normal", 0)
    wrong = g.do_assert(1, 0, "eel")  # wrong guess: nothing happens to anyone
    assert wrong.correct is False and hps(g, 0) == [400] * 4 and not g.teams[0][0].revealed
    g.do_action(1, 0, "normal", 0)
    with pytest.raises(IllegalMove, match="already revealed"):
        g.do_assert(0, 2, "sunfish")
    with pytest.raises(IllegalMove, match="dead"):
        g.do_assert(0, 3, "flame")
    with pytest.raises(IllegalMove, match="unknown fish type"):
        g.do_assert(0, 1, "shark")
    assert g.do_assert(0, None, None).correct is None  # skipping is allowed
    assert View(g, 0).my_assert_correct is False


def test_a_side_with_no_living_fish_loses():
    g = game()
    for p in (0, 1, 2):
        g.teams[1][p].hp = 0
        g.teams[1][p].alive = False
    g.teams[1][3].hp = 40
    g.do_assert(0, 3, "sunfish")  # the assertion damage kills the last fish
    assert (g.over, g.winner, g.end_reason) == (True, 0, "all_dead")
    with pytest.raises(IllegalMove, match="over"):
        g.do_action(0, 0, "normal", 3)


def test_when_both_sides_die_the_mover_wins():
    g = game()
    for side in (0, 1):
        for p in range(4):
            g.teams[side][p].hp = 10 if side == 1 else 0
            g.teams[side][p].alive = side == 1 or p == 0
    g.teams[0][0].hp = 20  # our last fish: its AOE kills all four, their Counters kill it
    g.do_assert(0, None, None)
    rec = g.do_action(0, 0, "active")
    # 1 counter for the spray (by the flame), 1 for the flame, 2 each for the eel and sunfish
    assert len([e for e in rec.passives if e.kind == "counter"]) == 6 and g.teams[0][0].hp == 20 - 180
    assert not g.living(0) and not g.living(1) and (g.winner, g.end_reason) == (0, "all_dead")


def _at_limit(hp0, hp1, first_mover=0):
    """A game stopped by the phase limit right after its first phase, with these HPs."""
    g = Game([ORDER, ORDER], phase_limit=1, first_mover=first_mover)
    for side, hp in ((0, hp0), (1, hp1)):
        for f, h in zip(g.teams[side], hp):
            f.hp = h
    g.do_assert(first_mover, None, None)
    assert (g.phases, g.end_reason) == (1, "phase_limit")
    return g.winner


def test_phase_limit_and_its_tie_breaks():
    assert Game([ORDER, ORDER]).phase_limit == 126  # AgentBench: state limit 128 minus 2 pick phases
    assert _at_limit([400, 400, 400, 0], [10, 10, 10, 10]) == 1  # more living fish first
    assert _at_limit([400, 400, 300, 300], [400, 400, 400, 200]) == 1  # then more total HP
    assert _at_limit([400, 400, 400, 200], [350, 350, 350, 350]) == 0  # then the higher single HP
    assert _at_limit([400] * 4, [400] * 4) == 1  # all equal: the player who moved second
    assert _at_limit([400] * 4, [400] * 4, first_mover=1) == 0
    g = Game([ORDER, ORDER], phase_limit=4)  # the limit counts assertion and action phases
    pass_turn(g, 0)
    assert not g.over and g.phases == 2
    pass_turn(g, 1)
    assert (g.phases, g.over, g.end_reason) == (4, True, "phase_limit")


# ---------------------------------------------------------------------- opponents


def test_opponents_pick_a_seeded_permutation():
    picks = [make_opponent("baseline1", random.Random(s)).pick() for s in range(20)]
    assert all(sorted(p) == sorted(FISH_TYPES) for p in picks) and len({tuple(p) for p in picks}) > 5
    assert picks[3] == make_opponent("baseline1", random.Random(3)).pick()
    with pytest.raises(ValueError, match="unknown opponent"):
        make_opponent("baseline3", random.Random(0))


def test_baseline1_is_random_but_legal():
    g = game()
    bot = Baseline1(random.Random(7))
    skills = set()
    for _ in range(300):
        view = View(g, 1)
        guess = bot.choose_assert(view)
        assert guess is None or (guess[0] in view.enemy_living() and view.enemy_id(guess[0]) == -1)
        fish, action, target = bot.choose_action(view)
        assert fish in view.my_living()
        if action == "normal":
            assert target in view.enemy_living()
        elif ORDER[fish] in ("flame", "sunfish"):
            assert target in view.my_living() and target != fish
        skills.add((ORDER[fish], action))
    assert skills == {(k, a) for k in ORDER for a in ("normal", "active")}
    g.teams[1][0].revealed = g.teams[1][2].revealed = True  # revealed AOE fish: normal attacks only
    view = View(g, 1)
    for _ in range(100):
        fish, action, _ = bot.auto_valid_action(view, 0)
        assert action == "normal"


def test_baseline2_deduces_and_asserts_what_it_saw():
    g = game()
    bot = Baseline2(random.Random(1))  # plays side 1; side 0 is its enemy
    act(g, 0, 1, "active", 3)  # enemy flame (1) infights: it hurt its own side -> Infight
    assert bot.choose_assert(View(g, 1)) == (1, "flame")  # skill known: first passive tried
    assert bot.to_assert[1] == {"skill": 1, "passive": -1}
    g.do_assert(1, 1, "flame")
    g.do_action(1, 0, "normal", 2)  # the bot hits the enemy eel, which Deflects
    act(g, 0, 0, "active")  # enemy spray (0) AOEs without drawing counters -> AOE
    assert bot.choose_assert(View(g, 1)) == (0, "spray")
    assert bot.to_assert[0]["skill"] == 0 and bot.to_assert[2]["passive"] == 1
    g.do_assert(1, 0, "spray")
    g.do_action(1, 0, "normal", 3)
    act(g, 0, 2, "active")  # the eel (Deflect seen) now AOEs: fully deduced
    assert bot.choose_assert(View(g, 1)) == (2, "eel")
    assert bot.has_failed[3][4]  # AgentBench's index -1 quirk before the first guess


def test_baseline2_action_rules():
    g = game()
    bot = Baseline2(random.Random(3))
    g.do_assert(0, None, None)
    g.do_action(0, 1, "normal", 0)  # our flame hit the bot: its last attacker is our fish 1
    view = View(g, 1)
    assert bot.choose_action(view)[:2] in ((0, "active"), (2, "active"))  # hidden spray/eel AOE
    g.teams[1][0].revealed = g.teams[1][2].revealed = True
    fish, action, target = bot.choose_action(view)
    assert (action, target) == ("normal", 1) and view.my_atk(fish) == 200  # answers the attacker
    g.teams[0][3].hp = 90  # finish a weak fish: 100 >= 90 > 70
    assert bot.choose_action(view)[1:] == ("normal", 3)
    g.teams[0][3].hp = 60  # not when it is at 70 or less
    assert bot.choose_action(view)[1:] == ("normal", 1)


def test_same_seed_same_game():
    def play(seed):
        bots = [Baseline2(random.Random(seed)), Baseline1(random.Random(seed + 1))]
        g = Game([bots[0].pick(), bots[1].pick()])
        while not g.over:
            s = g.turn
            a = bots[s].choose_assert(View(g, s))
            g.do_assert(s, *(a or (None, None)))
            if not g.over:
                g.do_action(s, *bots[s].choose_action(View(g, s)))
        return g.winner, g.phases, tuple(f.hp for t in g.teams for f in t)
    assert play(11) == play(11)
    assert len({play(s) for s in range(8)}) > 1
