"""AgentBench's two built-in Digital Card Game opponents, as Python policies.

Re-implemented from the behaviour of AgentBench's ``AI_SDK/Python/action1.py`` ("baseline1")
and ``action2.py`` ("baseline2") in THUDM/AgentTuning ``AgentBench.old`` (the version the
AgentTuning paper evaluated), including the SDK helpers they call (``auto_valid_action``,
``get_*_living_fishes`` which return positions in random order, ``get_lowest_health_enemy``).
Randomness comes from the ``random.Random`` passed in, so a game is reproducible from its seed.

* baseline1 — random: shuffles its pick order; asserts a random type (1..4) on a random living
  enemy; acts with a random living fish via ``auto_valid_action`` (30%: normal attack on a
  random enemy; else its active skill — AOE, or Infight on a random living teammate — and a
  normal attack when no skill applies). As in the SDK, a fish of its own that the enemy has
  revealed has a negative id that matches no skill, so it only attacks normally.
* baseline2 — rule-based: shuffles its pick order; deduces enemy types from their skills and
  passives (AOE vs Infight by whether the acting side hurt itself; Counter/Deflect from passive
  events) and from its failed assertions, asserting fully deduced fish first, then half-known
  ones, then a random guess; acts by finishing a weak enemy with a normal attack (when half the
  highest ATK kills a fish above 70 HP), else AOE with a still-hidden spray/eel while two enemies
  live, else a normal attack with its strongest fish on the fish that attacked it last.

Deviation: AgentBench's baseline2 reads the SDK's fixed-length (24) passive arrays in full, so
stale and uninitialised entries beyond the real events also feed its deduction (C++ memory that
cannot be reproduced); here only the real passive events of the last actions are read.
"""

from __future__ import annotations

import random
from typing import Dict, List, Optional, Tuple, Type

from serve.envs.dcg_engine import FISH_ID, FISH_TYPES, View

ID_KIND = {i: k for k, i in FISH_ID.items()}
Move = Tuple[int, str, Optional[int]]  # (fish position, "normal" | "active", target or None)


class Opponent:
    """A built-in player: ``pick`` its team order, then per turn ``choose_assert`` and ``choose_action``."""

    name = "opponent"

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def pick(self) -> List[str]:
        team = list(FISH_TYPES)
        self.rng.shuffle(team)
        return team

    def choose_assert(self, view: View) -> Optional[Tuple[int, str]]:
        raise NotImplementedError

    def choose_action(self, view: View) -> Move:
        raise NotImplementedError

    # SDK helpers: the C++ SDK shuffles these lists on every call
    def _shuffled(self, items: List[int]) -> List[int]:
        out = list(items)
        self.rng.shuffle(out)
        return out

    @staticmethod
    def _sdk_assert(view: View, pos: int, type_id: int) -> Optional[Tuple[int, str]]:
        """The SDK sends "no assertion" for an out-of-range or already revealed position."""
        if not 0 <= pos < 4 or view.enemy_id(pos) != -1:
            return None
        return pos, ID_KIND[type_id]

    def auto_valid_action(self, view: View, pos: int) -> Move:
        """The SDK's ``auto_valid_action``: mostly the active skill, else a normal attack."""
        if self.rng.random() < 0.3:
            return pos, "normal", self._shuffled(view.enemy_living())[0]
        fid = view.my_id(pos)  # negative when revealed: matches no skill below
        if fid in (FISH_ID["spray"], FISH_ID["eel"]):
            return pos, "active", None
        if fid in (FISH_ID["flame"], FISH_ID["sunfish"]):
            allies = self._shuffled([p for p in view.my_living() if p != pos])
            if allies:
                return pos, "active", allies[0]
        return pos, "normal", self._shuffled(view.enemy_living())[0]


class Baseline1(Opponent):
    """AgentBench ``action1.py``: random assertions, random fish with ``auto_valid_action``."""

    name = "baseline1"

    def choose_assert(self, view: View) -> Optional[Tuple[int, str]]:
        pos = self._shuffled(view.enemy_living())[0]
        return self._sdk_assert(view, pos, self.rng.randint(1, 4))

    def choose_action(self, view: View) -> Move:
        pos = self._shuffled(view.my_living())[0]
        return self.auto_valid_action(view, pos)


class Baseline2(Opponent):
    """AgentBench ``action2.py``: deduction-based assertions and a greedy action rule."""

    name = "baseline2"

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.has_failed = [[False] * 5 for _ in range(4)]  # [pos][type id]
        self.last_fish, self.last_type = -1, -1
        self.to_assert: Dict[int, Dict[str, int]] = {p: {"skill": -1, "passive": -1} for p in range(4)}

    def _add_possible(self, view: View, pos: int, what: str, val: int) -> None:
        if view.enemy_id(pos) == -1:
            self.to_assert[pos][what] = val

    def _ass(self, pos: int, type_id: int) -> Optional[Tuple[int, str]]:
        self.last_fish, self.last_type = pos, type_id
        return pos, ID_KIND[type_id]

    def choose_assert(self, view: View) -> Optional[Tuple[int, str]]:
        if not view.my_assert_correct:
            # The original indexes with last_fish = last_type = -1 before its first guess, which
            # in Python marks has_failed[3][4]; kept, since it changes which guesses it tries.
            self.has_failed[self.last_fish][self.last_type] = True
        live = sorted(view.enemy_living())
        enemy_act, my_act = view.enemy_action, view.my_action
        acting = enemy_act.fish if enemy_act is not None else -1
        if 0 <= acting < 4 and view.enemy_id(acting) == -1:
            if enemy_act.is_skill:
                self_hurt = any(h.side == view.enemy for h in enemy_act.hits)
                self._add_possible(view, acting, "skill", 1 if self_hurt else 0)  # 1 infight, 0 aoe
            events = [e for e in (enemy_act.passives if enemy_act else []) if e.side == view.enemy]
            events += [e for e in (my_act.passives if my_act else []) if e.side == view.enemy]
            for e in events:
                self._add_possible(view, e.pos, "passive", 0 if e.kind == "counter" else 1)
        unknown_live = [p for p in range(4) if view.enemy_id(p) == -1 and p in live]
        for p in unknown_live:  # fully deduced
            s, q = self.to_assert[p]["skill"], self.to_assert[p]["passive"]
            if s != -1 and q != -1:
                return self._ass(p, s + q * 2 + 1)
        for p in unknown_live:  # skill known: try both passives
            s = self.to_assert[p]["skill"]
            for k in range(2):
                if s != -1 and not self.has_failed[p][s + k * 2 + 1]:
                    return self._ass(p, s + k * 2 + 1)
        for p in unknown_live:  # passive known: try both skills
            q = self.to_assert[p]["passive"]
            for k in range(2):
                if q != -1 and not self.has_failed[p][k + q * 2 + 1]:
                    return self._ass(p, k + q * 2 + 1)
        know_pos, know_type = [0, 1, 2, 3], [1, 2, 3, 4]
        for p in range(4):
            if view.enemy_id(p) != -1 or p not in live:
                know_pos.remove(p)
                if view.enemy_id(p) != -1:
                    know_type.remove(view.enemy_id(p))
        if not know_pos:
            return None
        return self._ass(self.rng.choice(know_pos), self.rng.choice(know_type))

    def choose_action(self, view: View) -> Move:
        my_alive = self._shuffled(view.my_living())
        enemy_alive = self._shuffled(view.enemy_living())
        max_atk_pos, max_atk = -1, 0
        for p in my_alive:
            if max_atk < view.my_atk(p):
                max_atk, max_atk_pos = view.my_atk(p), p
        lowest = -1
        for p in range(4):  # get_lowest_health_enemy: first position with the lowest positive HP
            if view.enemy_hp(p) > 0 and (lowest == -1 or view.enemy_hp(p) < view.enemy_hp(lowest)):
                lowest = p
        if view.my_atk(max_atk_pos) * 0.5 >= view.enemy_hp(lowest) and view.enemy_hp(lowest) > 70:
            return max_atk_pos, "normal", lowest
        if len(enemy_alive) >= 2:
            for p in my_alive:
                if view.my_id(p) in (FISH_ID["spray"], FISH_ID["eel"]):  # hidden spray/eel only
                    return p, "active", None
        acting = view.enemy_action.fish if view.enemy_action is not None else -1
        target = acting if acting in enemy_alive else enemy_alive[0]
        return max_atk_pos, "normal", target


OPPONENTS: Dict[str, Type[Opponent]] = {"baseline1": Baseline1, "baseline2": Baseline2}


def make_opponent(name: str, rng: random.Random) -> Opponent:
    """The built-in opponent called ``name`` (``baseline1`` or ``baseline2``)."""
    try:
        return OPPONENTS[name](rng)
    except KeyError:
        raise ValueError(f"unknown opponent {name!r}; choose from {sorted(OPPONENTS)}") from None
