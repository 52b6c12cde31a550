"""AgentBench's Digital Card Game prompts, observations and answer parsing (stage 2, English).

Texts follow ``AI_SDK/Python/prompt/en.py`` and ``AI_En.py`` of THUDM/AgentTuning
``AgentBench.old`` (the version the AgentTuning paper evaluated): the two rule descriptions
(action and guess) are built the same way — Python ``%`` formatting of the fish-description and
answer-format dicts — so they match AgentBench character for character; the per-turn prompts
print the game state and the previous actions as AgentBench does. Answers are read as
AgentBench reads them: every ``{...}`` span (non-greedy), single quotes turned into double
quotes, ``json.loads``, and the first object that passes AgentBench's checks is the move.
"""

from __future__ import annotations

import json
import re
from typing import Any, Dict, List, Optional, Tuple

from serve.envs.dcg_engine import FISH_TYPES, ActionRecord, View

# The agent always fields spray, flame, eel, sunfish at positions 0..3 (AgentBench's Pick()).
AGENT_TEAM: Tuple[str, ...] = ("spray", "flame", "eel", "sunfish")
# AgentBench's name_to_pos: a fish may be named by its type or by its position as a string.
NAME_TO_POS: Dict[str, int] = {**{k: i for i, k in enumerate(AGENT_TEAM)}, "0": 0, "1": 1, "2": 2, "3": 3}
OKAY = "Okay, I will play the game with you according to the rules."
SKILL_LABEL = {"normal": "Normal", "aoe": "AOE", "infight": "Infight"}
PASSIVE_LABEL = {"counter": "Counter", "deflect": "Deflect"}

_INFIGHT = ("Infight: Attacks one alive teammate for 75 damage and increases your own attack points by 140. "
            "Notice! You can't attack yourself or dead teamate!")
_DEFLECT = ("Deflect: Distributes 70% damage to teammates and takes 30% when attacked. "
            "Gains 40 attack points after taking 200 damage accumulated. ")
FISH_DESCRIPTION: Dict[str, Dict[str, str]] = {
    "spray": {"passive": "Counter: Deals 30 damage to attacker when a teammate's health is below 30%",
              "active": "AOE: Attacks all enemies for 35% of its attack points."},
    "flame": {"passive": "Counter: Deals 30 damage to attacker when a teammate's health is below 30%. ",
              "active": _INFIGHT},
    "eel": {"passive": _DEFLECT, "active": "AOE: Attacks all enemies for 35% of your attack points."},
    "sunfish": {"passive": _DEFLECT, "active": _INFIGHT},
}
ACTION_FORMAT = {"pick_fish": "pick an alive fish", "action": "choose from [normal, active]",
                 "target_position": "target's position, you must choose from [0,3]"}
GUESS_FORMAT = {"guess_type": "the enemy's fish type you may guess",
                "target_position": "guess target's position, you must choose from [0,3]"}

_ACTION_RULES = """This is a two-player battle game with four pet fish on each team.
Each fish has its 400 initial health, 200 attack power, active ability, and passive ability.
You can choose a live fish to use its active skill or normal attack on an enemy fish each round.
When the conditions are met, the fish's passive ability will automatically trigger, regardless of whether it is chosen.
%s
The victory condition is to have more fish alive at the end of the game.

The following are the four types of the pet fish:
%s

Play the game with me. In each round, you should output your thinking process, and return your move with following json format:
%s

Notice! You must return your move in each round. Otherwise, you will be considered defeated."""

_GUESS_RULE = ("Your fish's identity is initially hidden. The enemy can guess one of your fish's identity in each "
               "round. If the enemy guesses right, your fish's identity is revealed, and each of your fish will get "
               "50 damage.")

_GUESS_RULES = """This is a two-player battle game with four pet fish in each team.
Each fish has its initial health, attack power, active ability, and passive ability.
All fish's identities are initially hidden. You should guess one of the enemy fish's identities in each round. If you guess right, the enemy fish's identity is revealed, and each of the enemy's fish will get 50 damage. You can only guess the identity of the live fish.
The victory condition is to have more fish alive at the end of the game.

The following are the four types of the pet fish:
%s

Play the game with me. In each round, you should output your thinking process, and return your move with following json format:
%s

Notice! You must return your move in each round. Otherwise, you will be considered defeated."""

# Stage 2 (with assertions), the stage AgentBench's card-game task plays.
ACTION_DESCRIPTION = _ACTION_RULES % (_GUESS_RULE, FISH_DESCRIPTION, ACTION_FORMAT)
GUESS_DESCRIPTION = _GUESS_RULES % (FISH_DESCRIPTION, GUESS_FORMAT)


# ---------------------------------------------------------------------- observations


def action_summary(rec: Optional[ActionRecord], skill: bool) -> Dict[str, str]:
    """AgentBench's ``ACTION_FISH``/``ATK``/``TARGET`` (/``SKILL_TYPE``) summary of an action.

    ``ATK`` is the skill's nominal damage per target, ``TARGET`` the targeted positions (for
    Infight: the actor's own teammate).
    """
    if rec is None:
        out = {"ACTION_FISH": "None", "ATK": "None", "TARGET": "None"}
        if skill:
            out["SKILL_TYPE"] = "None"
        return out
    out = {"ACTION_FISH": str(rec.fish), "ATK": str(rec.value), "TARGET": str(list(rec.targets))}
    if skill:
        out["SKILL_TYPE"] = SKILL_LABEL[rec.skill]
    return out


def state_json(view: View) -> str:
    """The game state as AgentBench prints it: own fish fully, enemy types only once revealed."""
    state: Dict[str, List[Dict[str, str]]] = {"You": [], "Enemy": []}
    for pos in range(4):
        state["You"].append({"ID": view.my_kind(pos), "POSITION": str(pos), "HP": str(view.my_hp(pos)),
                             "ATK": str(view.my_atk(pos))})
    for pos in range(4):
        state["Enemy"].append({"ID": view.enemy_kind(pos) or "unknown", "POSITION": str(pos),
                               "HP": str(view.enemy_hp(pos)), "ATK": "unknown"})
    return json.dumps(state, ensure_ascii=False)


def triggered_passives(view: View) -> Dict[str, str]:
    """Enemy passives triggered during this side's last action and the enemy's last action."""
    out: Dict[str, str] = {}
    for rec in (view.my_action, view.enemy_action):
        for event in rec.passives if rec is not None else []:
            if event.side == view.enemy:
                out[f"Position: {event.pos}"] = PASSIVE_LABEL[event.kind]
    return out


def guess_prompt(view: View) -> str:
    """The assertion-phase prompt."""
    live = [str(p) for p in sorted(view.enemy_living())]
    return (f"Previous Guess: {view.my_assert_correct}\nLive Enemy Fish: {live}\n"
            f"Enemy's previous action: {action_summary(view.enemy_action, True)}\n"
            f"Enemy's previous triggered passive ability: {json.dumps(triggered_passives(view), ensure_ascii=False)}"
            f"\n\nPlease output your guess.")


def action_prompt(view: View) -> str:
    """The action-phase prompt."""
    return (f"Following is the current game state:\n{state_json(view)}\n\n"
            f"Your previous action: {action_summary(view.my_action, False)}\n"
            f"Enemy's previous action: {action_summary(view.enemy_action, False)}\n\n"
            f"Please Output your next action.")


# ---------------------------------------------------------------------- parsing

_OBJECT = re.compile(r"\{[\w\W]*?\}")


def json_objects(text: str) -> List[Dict[str, Any]]:
    """Every ``{...}`` span that loads as JSON once single quotes become double quotes."""
    out = []
    for span in _OBJECT.findall(text):
        try:
            obj = json.loads(span.replace("'", '"'))
        except ValueError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


Move = Tuple[int, str, Optional[int]]  # (fish position, "normal" | "active", target or None)


def check_move(move: Dict[str, Any], my_living: List[int], enemy_living: List[int]) -> Optional[Move]:
    """AgentBench's move checks and SDK target rules: (fish position, "normal"|"active", target)
    or None. The target must be a living enemy position except for an AOE fish named by type —
    also for Infight, whose target (a teammate other than itself, alive) is then read as a
    position on the own side. Naming an Infight fish by position fails in the SDK."""
    try:
        pick, action = move["pick_fish"], move["action"]
        if action not in ("normal", "active"):
            return None
        target = str(move["target_position"])
        if pick in ("spray", "eel") and action == "active":
            target = "0"
        elif int(target) not in enemy_living:
            return None
        pos = NAME_TO_POS[pick]
        if pos not in my_living:
            return None
        dead = [p for p in range(4) if p not in my_living]
        if pick in ("flame", "sunfish") and action == "active" and int(target) in [pos] + dead:
            return None
    except (KeyError, TypeError, ValueError):
        return None
    if action == "normal":
        return pos, "normal", int(target)
    if AGENT_TEAM[pos] in ("spray", "eel"):
        return pos, "active", None
    if pick in ("flame", "sunfish"):
        return pos, "active", int(target)
    return None  # Infight fish named by position: the SDK rejects its enemy target


def check_guess(move: Dict[str, Any], enemy_living: List[int]) -> Optional[Tuple[int, str]]:
    """AgentBench's guess checks: a fish type and a living enemy position "0".."3"."""
    try:
        target, kind = str(move["target_position"]), move["guess_type"]
        if kind not in FISH_TYPES or target not in ("0", "1", "2", "3") or int(target) not in enemy_living:
            return None
    except (KeyError, TypeError, ValueError):
        return None
    return int(target), kind


def decode_move(text: str, view: View) -> Tuple[Optional[Move], bool]:
    """(move or None, whether any JSON object was found at all)."""
    objects = json_objects(text)
    for obj in objects:
        move = check_move(obj, view.my_living(), view.enemy_living())
        if move is not None:
            return move, True
    return None, bool(objects)


def decode_guess(text: str, view: View) -> Tuple[Optional[Tuple[int, str]], bool]:
    """(guess or None, whether any JSON object was found at all)."""
    objects = json_objects(text)
    for obj in objects:
        guess = check_guess(obj, view.enemy_living())
        if guess is not None:
            return guess, True
    return None, bool(objects)
