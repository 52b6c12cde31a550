"""Rules engine of the Digital Card Game (AgentBench's "Aquawar", stage 2), written from its rules.

AgentBench (THUDM/AgentBench ``src/server/tasks/card_game``; the version AgentTuning evaluated is
``AgentBench.old`` in THUDM/AgentTuning) runs a compiled C++ logic program. This module is an
independent Python implementation of the rules that AgentBench's prompt states, with the game
flow, arithmetic (integer truncation) and limits of that program where the prompt is silent:

* Two players, four fish each: spray, flame, eel, sunfish (one of each), 400 HP and 200 ATK.
* A player's turn is an **assertion** phase then an **action** phase. Assertion: name an
  enemy's living, still-hidden fish and its type; right: the fish is revealed and every enemy
  fish loses 50 HP (not below 0); wrong: nothing happens. A player may also skip the assertion.
* Action: one living fish either attacks normally (half its ATK to one living enemy) or uses its
  active skill — AOE (spray, eel: 35% of ATK to every living enemy) or Infight (flame, sunfish:
  75 damage to a living teammate other than itself, +140 ATK to the user).
* Passives trigger automatically. Counter (spray, flame): when a teammate is attacked and ends
  below 30% HP, each living counter fish deals 30 damage to the attacker. Deflect (eel,
  sunfish): when attacked while a teammate lives, the fish takes 30% and its living teammates
  share the other 70% equally; after every 200 damage taken in total it gains 40 ATK.
  "Attacked" means a normal attack or an AOE hit; Infight, Counter, deflected and assertion
  damage are not attacks (neither Counter nor Deflect answers them), as in AgentBench's engine,
  though all but assertion damage count towards the 200-damage ATK gain.
* A fish dies when its HP is at most 0; deaths are settled at the end of each phase. A side
  whose fish are all dead loses (if both are, the player who just moved wins). The game stops
  after 126 phases (63 turns; AgentBench's state limit of 128 minus the two pick phases) and
  is then won by more living fish, then more total HP, then the higher single HP, then the
  player who moved second.

``rules="agentbench"`` reproduces two places where AgentBench's compiled engine differs from
its own prompt (see docs/env_dcg.md): the deflecting fish keeps 70% and its teammates share
30%, and a Counter event is reported at the position of the hurt teammate instead of the
counter-attacking fish. The default ``rules="prompt"`` does what the prompt says.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

FISH_TYPES: Tuple[str, ...] = ("spray", "flame", "eel", "sunfish")
FISH_ID = {name: i + 1 for i, name in enumerate(FISH_TYPES)}  # AgentBench's fish ids 1..4
ACTIVE_SKILL = {"spray": "aoe", "flame": "infight", "eel": "aoe", "sunfish": "infight"}
PASSIVE_SKILL = {"spray": "counter", "flame": "counter", "eel": "deflect", "sunfish": "deflect"}

MAX_HP = 400
BASE_ATK = 200
ASSERT_DAMAGE = 50
AOE_RATE = 0.35
INFIGHT_DAMAGE = 75
INFIGHT_ATK_GAIN = 140
COUNTER_DAMAGE = 30
COUNTER_THRESHOLD = 0.3  # of max HP
DEFLECT_PASS, DEFLECT_KEEP = 0.7, 0.3  # prompt: teammates share 70%, the fish keeps 30% (engine: swapped)
WOUND_STEP = 200
WOUND_ATK_GAIN = 40
PHASE_LIMIT = 126
RULES = ("prompt", "agentbench")


class IllegalMove(ValueError):
    """A move the rules forbid (dead or hidden-rule violations); in AgentBench the mover loses."""


@dataclass
class Fish:
    kind: str
    side: int
    pos: int
    hp: int = MAX_HP
    atk: int = BASE_ATK
    alive: bool = True  # settled at the end of each phase, like the engine's FIGHT/DEAD state
    revealed: bool = False
    wound: int = 0  # damage taken since the last ATK gain (deflect fish only use it)

    @property
    def id(self) -> int:
        return FISH_ID[self.kind]


@dataclass(frozen=True)
class Hit:
    side: int
    pos: int
    value: int
    sourced: bool  # damage from an attack (True) or from a passive/skill side effect (False)


@dataclass(frozen=True)
class PassiveEvent:
    kind: str  # "counter" | "deflect"
    side: int
    pos: int  # the fish reported as triggering it
    value: int


@dataclass
class ActionRecord:
    """One action phase: who acted, the skill, its targets and nominal value, what followed."""

    side: int
    fish: int
    skill: str  # "normal" | "aoe" | "infight"
    target_side: int
    targets: Tuple[int, ...]
    value: int
    hits: List[Hit] = field(default_factory=list)
    passives: List[PassiveEvent] = field(default_factory=list)

    @property
    def is_skill(self) -> bool:
        return self.skill != "normal"


@dataclass(frozen=True)
class AssertRecord:
    side: int
    pos: Optional[int]  # None: no assertion this turn
    kind: Optional[str]
    correct: Optional[bool]


class Game:
    """One game between side 0 and side 1; ``teams[side][pos]`` are fish types in position order."""

    def __init__(self, teams: Sequence[Sequence[str]], *, rules: str = "prompt",
                 first_mover: int = 0, phase_limit: int = PHASE_LIMIT) -> None:
        if rules not in RULES:
            raise ValueError(f"rules must be one of {RULES}, got {rules!r}")
        if len(teams) != 2:
            raise ValueError("a game has exactly two teams")
        for team in teams:
            if sorted(team) != sorted(FISH_TYPES):
                raise ValueError(f"a team is one fish of each type {FISH_TYPES}, got {list(team)}")
        self.rules = rules
        self.first_mover = int(first_mover)
        self.phase_limit = int(phase_limit)
        self.teams: List[List[Fish]] = [[Fish(k, s, p) for p, k in enumerate(team)] for s, team in enumerate(teams)]
        self.turn = self.first_mover  # side whose turn it is
        self.phase = "assert"  # "assert" then "action" within a turn
        self.phases = 0  # assertion and action phases played
        self.turns = 0  # completed turns (assertion + action)
        self.winner: Optional[int] = None
        self.end_reason: Optional[str] = None  # "all_dead" | "phase_limit" | "forfeit"
        self.last_action: List[Optional[ActionRecord]] = [None, None]
        self.last_assert: List[Optional[AssertRecord]] = [None, None]
        self.log: List[object] = []  # every AssertRecord / ActionRecord in play order

    # ------------------------------------------------------------------ queries

    @property
    def over(self) -> bool:
        return self.winner is not None

    def living(self, side: int) -> List[int]:
        return [f.pos for f in self.teams[side] if f.alive]

    def fish(self, side: int, pos: int) -> Fish:
        return self.teams[side][pos]

    def clone(self) -> "Game":
        """An independent copy of the position (for look-ahead); the records themselves are shared."""
        other = Game.__new__(Game)
        other.__dict__.update(self.__dict__)
        other.teams = [[Fish(**vars(f)) for f in team] for team in self.teams]
        other.last_action = list(self.last_action)
        other.last_assert = list(self.last_assert)
        other.log = list(self.log)
        return other

    # ------------------------------------------------------------------ moves

    def do_assert(self, side: int, pos: Optional[int], kind: Optional[str]) -> AssertRecord:
        """Assertion phase of ``side``: guess that enemy fish ``pos`` is ``kind`` (None: skip)."""
        self._check_turn(side, "assert")
        if pos is None:
            rec = AssertRecord(side, None, None, None)
        else:
            if kind not in FISH_TYPES:
                raise IllegalMove(f"unknown fish type {kind!r}")
            if not 0 <= pos < 4:
                raise IllegalMove(f"position {pos} is out of range 0..3")
            target = self.teams[1 - side][pos]
            if not target.alive:
                raise IllegalMove(f"enemy fish {pos} is dead")
            if target.revealed:
                raise IllegalMove(f"enemy fish {pos} is already revealed")
            correct = target.kind == kind
            if correct:
                target.revealed = True
                for f in self.teams[1 - side]:
                    f.hp = f.hp - ASSERT_DAMAGE if f.hp >= ASSERT_DAMAGE else 0
            rec = AssertRecord(side, pos, kind, correct)
        self.last_assert[side] = rec
        self.log.append(rec)
        self._end_phase()
        return rec

    def do_action(self, side: int, fish: int, action: str, target: Optional[int] = None) -> ActionRecord:
        """Action phase: ``action`` "normal" (``target``: enemy position) or "active" (AOE: no
        target; Infight: ``target`` is the teammate's position)."""
        self._check_turn(side, "action")
        if not 0 <= fish < 4 or not self.teams[side][fish].alive:
            raise IllegalMove(f"fish {fish} cannot act: it is dead or not a position")
        actor = self.teams[side][fish]
        enemy = 1 - side
        if action == "normal":
            if target is None or not 0 <= target < 4 or not self.teams[enemy][target].alive:
                raise IllegalMove(f"normal attack needs a living enemy target, got {target}")
            dmg = actor.atk // 2
            rec = ActionRecord(side, fish, "normal", enemy, (target,), dmg)
            self._attack(actor, self.teams[enemy][target], dmg, rec)
        elif action == "active" and ACTIVE_SKILL[actor.kind] == "aoe":
            dmg = int(actor.atk * AOE_RATE)  # fixed before the hits: counters may raise ATK meanwhile
            targets = tuple(self.living(enemy))
            rec = ActionRecord(side, fish, "aoe", enemy, targets, dmg)
            for pos in targets:
                self._attack(actor, self.teams[enemy][pos], dmg, rec)
        elif action == "active":
            if target is None or not 0 <= target < 4 or target == fish or not self.teams[side][target].alive:
                raise IllegalMove(f"infight needs a living teammate other than itself, got {target}")
            rec = ActionRecord(side, fish, "infight", side, (target,), INFIGHT_DAMAGE)
            self._damage(self.teams[side][target], INFIGHT_DAMAGE, None, rec)
            actor.atk += INFIGHT_ATK_GAIN
        else:
            raise IllegalMove(f"action must be 'normal' or 'active', got {action!r}")
        self.last_action[side] = rec
        self.log.append(rec)
        self._end_phase()
        return rec

    def forfeit(self, side: int, reason: str = "forfeit") -> None:
        """``side`` made an illegal move or gave no move: it loses (AgentBench's invalid operation)."""
        if not self.over:
            self.winner, self.end_reason = 1 - side, reason

    # ------------------------------------------------------------------ damage

    def _attack(self, src: Fish, target: Fish, dmg: int, rec: ActionRecord) -> None:
        """An attack hit (normal attack or one AOE target), then the target team's Counters."""
        self._damage(target, dmg, src, rec)
        if target.hp < MAX_HP * COUNTER_THRESHOLD:
            for mate in self.teams[target.side]:
                if PASSIVE_SKILL[mate.kind] == "counter" and mate.alive and mate.pos != target.pos:
                    where = mate.pos if self.rules == "prompt" else target.pos
                    rec.passives.append(PassiveEvent("counter", target.side, where, COUNTER_DAMAGE))
                    self._damage(src, COUNTER_DAMAGE, None, rec)

    def _damage(self, fish: Fish, amount: int, src: Optional[Fish], rec: ActionRecord) -> None:
        """``fish`` takes ``amount``; an attack (``src`` set) on a deflect fish is spread first."""
        team = self.teams[fish.side]
        mates = [f for f in team if f is not fish and f.alive]
        if PASSIVE_SKILL[fish.kind] == "deflect" and src is not None and mates:
            if self.rules == "prompt":
                keep, passed = int(amount * DEFLECT_KEEP), int(amount * DEFLECT_PASS)
            else:
                keep, passed = int(amount * DEFLECT_PASS), int(amount * DEFLECT_KEEP)
            rec.passives.append(PassiveEvent("deflect", fish.side, fish.pos, keep))
            for mate in mates:
                self._damage(mate, passed // len(mates), None, rec)
            self._hit(fish, keep, True, rec)
        else:
            self._hit(fish, amount, src is not None, rec)
        if PASSIVE_SKILL[fish.kind] == "deflect" and fish.wound >= WOUND_STEP:
            fish.atk += WOUND_ATK_GAIN * (fish.wound // WOUND_STEP)
            fish.wound %= WOUND_STEP

    @staticmethod
    def _hit(fish: Fish, value: int, sourced: bool, rec: ActionRecord) -> None:
        rec.hits.append(Hit(fish.side, fish.pos, value, sourced))
        fish.hp -= value
        fish.wound += value

    # ------------------------------------------------------------------ flow

    def _check_turn(self, side: int, phase: str) -> None:
        if self.over:
            raise IllegalMove("the game is over")
        if side != self.turn or phase != self.phase:
            raise IllegalMove(f"it is side {self.turn}'s {self.phase} phase, not side {side}'s {phase} phase")

    def _end_phase(self) -> None:
        for team in self.teams:
            for f in team:
                if f.hp <= 0:
                    f.alive = False
        self.phases += 1
        if self.phases >= self.phase_limit:
            self.winner, self.end_reason = self._limit_winner(), "phase_limit"
        else:
            dead = [not self.living(s) for s in (0, 1)]
            if dead[0] and dead[1]:
                self.winner, self.end_reason = self.turn, "all_dead"
            elif dead[0] or dead[1]:
                self.winner, self.end_reason = (1 if dead[0] else 0), "all_dead"
        if self.phase == "assert":
            self.phase = "action"
        else:
            self.phase, self.turn, self.turns = "assert", 1 - self.turn, self.turns + 1

    def _limit_winner(self) -> int:
        """More living fish, then more total HP, then higher single HP, then the second mover."""
        def key(side: int) -> Tuple[int, int, int]:
            team = self.teams[side]
            return (sum(f.hp > 0 for f in team), sum(f.hp for f in team if f.hp > 0),
                    max([0] + [f.hp for f in team]))
        k0, k1 = key(0), key(1)
        for a, b in zip(k0, k1):
            if a != b:
                return 0 if a > b else 1
        return 1 - self.first_mover


class View:
    """What one player may see (AgentBench's SDK view): its own fish fully, enemy HP, revealed
    enemy types, the last actions of both sides and the result of its own last assertion."""

    def __init__(self, game: Game, side: int) -> None:
        self.game, self.side, self.enemy = game, side, 1 - side

    def my_kind(self, pos: int) -> str:
        return self.game.teams[self.side][pos].kind

    def my_id(self, pos: int) -> int:
        """The SDK's id: negative once the enemy has revealed the fish."""
        f = self.game.teams[self.side][pos]
        return -f.id if f.revealed else f.id

    def my_hp(self, pos: int) -> int:
        f = self.game.teams[self.side][pos]
        return f.hp if f.alive else 0

    def my_atk(self, pos: int) -> int:
        return self.game.teams[self.side][pos].atk

    def enemy_kind(self, pos: int) -> Optional[str]:
        """The enemy fish's type if revealed, else None."""
        f = self.game.teams[self.enemy][pos]
        return f.kind if f.revealed else None

    def enemy_id(self, pos: int) -> int:
        f = self.game.teams[self.enemy][pos]
        return f.id if f.revealed else -1

    def enemy_hp(self, pos: int) -> int:
        f = self.game.teams[self.enemy][pos]
        return f.hp if f.alive else 0

    def my_living(self) -> List[int]:
        return self.game.living(self.side)

    def enemy_living(self) -> List[int]:
        return self.game.living(self.enemy)

    @property
    def my_action(self) -> Optional[ActionRecord]:
        return self.game.last_action[self.side]

    @property
    def enemy_action(self) -> Optional[ActionRecord]:
        return self.game.last_action[self.enemy]

    @property
    def my_assert_correct(self) -> bool:
        """Result of this side's last assertion (False when none or skipped, as the SDK reports)."""
        rec = self.game.last_assert[self.side]
        return bool(rec is not None and rec.correct)
