"""Scripted expert for the Digital Card Game: a rule-based player that uses only what it sees.

It never reads the enemy's hidden fish types. Its knowledge is what the prompts show over the
game: its own guesses and their results, the skill each enemy fish used (AOE: spray or eel;
Infight: flame or sunfish) and the passives enemy fish triggered (Counter: spray or flame;
Deflect: eel or sunfish).

* Guess: among the 24 ways the four enemy types can be arranged, keep those consistent with
  that evidence; guess the living hidden (position, type) pair that the most arrangements hold,
  weighting spray and eel x3 — revealed AOE fish matter most, because AgentBench's baselines
  only use the skills of fish that are still hidden. (Counter positions are not used as
  evidence under ``rules="agentbench"``, whose engine reports them at the hurt fish.)
* Act: while two or more enemy fish live, AOE with the stronger of its spray and eel; otherwise
  a normal attack by its highest-ATK fish on the weakest enemy fish.

Measured on the default task list it wins >= 95% of games against both baselines (see
docs/env_dcg.md and tests/serve/envs/test_dcg.py).
"""

from __future__ import annotations

import itertools
import json
from typing import List, Optional, Tuple

from serve.envs.dcg_engine import ACTIVE_SKILL, FISH_TYPES, PASSIVE_SKILL, ActionRecord, AssertRecord, Game, View
from serve.envs.dcg_prompts import AGENT_TEAM

ARRANGEMENTS: List[Tuple[str, ...]] = list(itertools.permutations(FISH_TYPES))
GUESS_WEIGHT = {"spray": 3.0, "eel": 3.0, "flame": 1.0, "sunfish": 1.0}
AOE_FISH = tuple(p for p, k in enumerate(AGENT_TEAM) if ACTIVE_SKILL[k] == "aoe")


def consistent_arrangements(game: Game, side: int) -> List[Tuple[str, ...]]:
    """Enemy team orders that agree with everything ``side`` has observed so far."""
    enemy = 1 - side
    use_counter = game.rules == "prompt"
    evidence: List[Tuple[int, Tuple[str, ...]]] = []  # (position, types it may be)
    for rec in game.log:
        if isinstance(rec, AssertRecord) and rec.side == side and rec.pos is not None:
            if rec.correct:
                evidence.append((rec.pos, (rec.kind,)))
            else:
                evidence.append((rec.pos, tuple(k for k in FISH_TYPES if k != rec.kind)))
        elif isinstance(rec, ActionRecord):
            if rec.side == enemy and rec.skill != "normal":
                evidence.append((rec.fish, tuple(k for k in FISH_TYPES if ACTIVE_SKILL[k] == rec.skill)))
            for event in rec.passives:
                if event.side == enemy and (use_counter or event.kind != "counter"):
                    evidence.append((event.pos, tuple(k for k in FISH_TYPES if PASSIVE_SKILL[k] == event.kind)))
    return [arr for arr in ARRANGEMENTS if all(arr[pos] in kinds for pos, kinds in evidence)]


def _answer(reason: str, move: dict) -> str:
    # AgentBench asks for the thinking process and then the move as a JSON object.
    return f"{reason}\n\n{json.dumps(move)}"


class DCGExpert:
    """The expert playing ``side`` of a game."""

    def __init__(self, side: int) -> None:
        self.side = side

    def choose_guess(self, game: Game) -> Tuple[int, str, str]:
        """(position, type, reason) of the best guess; a revealed fish when none is hidden."""
        view = View(game, self.side)
        arrangements = consistent_arrangements(game, self.side)
        if not arrangements:  # contradictory evidence cannot arise from the rules; stay usable anyway
            arrangements = [a for a in ARRANGEMENTS
                            if all(view.enemy_kind(p) in (None, a[p]) for p in range(4))]
        best: Optional[Tuple[float, int, str, int]] = None
        for pos in view.enemy_living():
            if view.enemy_kind(pos) is not None:
                continue
            for kind in FISH_TYPES:
                count = sum(arr[pos] == kind for arr in arrangements)
                score = count * GUESS_WEIGHT[kind]
                if count and (best is None or score > best[0]):
                    best = (score, pos, kind, count)
        if best is None:
            pos = view.enemy_living()[0]
            kind = view.enemy_kind(pos) or FISH_TYPES[0]
            return pos, kind, "Every living enemy fish is already revealed, so there is nothing left to guess."
        _, pos, kind, count = best
        total = len(arrangements)
        if count == total:
            reason = (f"From the enemy's skills, passives and my earlier guesses, enemy fish {pos} can only be "
                      f"the {kind}.")
        else:
            reason = (f"Enemy fish {pos} is the {kind} in {count} of the {total} team arrangements that fit what I "
                      f"have seen so far. A right guess deals 50 damage to every enemy fish"
                      + (", and revealing an AOE fish matters most." if ACTIVE_SKILL[kind] == "aoe" else "."))
        return pos, kind, reason

    def choose_action(self, game: Game) -> Tuple[int, str, Optional[int], str]:
        """(fish position, "normal"|"active", target, reason)."""
        view = View(game, self.side)
        mine, theirs = view.my_living(), view.enemy_living()
        aoe = [p for p in AOE_FISH if p in mine]
        if len(theirs) >= 2 and aoe:
            pos = max(aoe, key=lambda p: (view.my_atk(p), -p))
            dmg = int(view.my_atk(pos) * 0.35)
            reason = (f"{len(theirs)} enemy fish are alive, so the AOE of my {AGENT_TEAM[pos]} hits all of them for "
                      f"{dmg} damage each.")
            return pos, "active", None, reason
        pos = max(mine, key=lambda p: (view.my_atk(p), -p))
        target = min(theirs, key=lambda p: (view.enemy_hp(p), p))
        why = "Only one enemy fish is alive" if len(theirs) == 1 else "My AOE fish are dead"
        reason = (f"{why}, so my {AGENT_TEAM[pos]}, which has the highest attack ({view.my_atk(pos)}), attacks the "
                  f"weakest enemy fish at position {target} ({view.enemy_hp(target)} HP) for "
                  f"{view.my_atk(pos) // 2} damage.")
        return pos, "normal", target, reason

    def guess_text(self, game: Game) -> str:
        pos, kind, reason = self.choose_guess(game)
        return _answer(reason, {"guess_type": kind, "target_position": pos})

    def action_text(self, game: Game) -> str:
        pos, action, target, reason = self.choose_action(game)
        return _answer(reason, {"pick_fish": AGENT_TEAM[pos], "action": action,
                                "target_position": 0 if target is None else target})
