"""Digital Card Game (AgentBench's "Aquawar" card game; held-out in AgentTuning) as an Env.

One task is one game of stage 2 (assertions on) against one of AgentBench's built-in opponents,
with the agent moving first (``side`` 0) or second (``side`` 1). AgentBench's task list is
stage 2 x {baseline1, baseline2} x {agent first, agent second} x ``test_time`` games, with
``test_time`` 3 (dev), 5 (std) and 50 (ext, the split the AgentTuning paper reports: 200
games). The task list is generated, not read: option ``split`` (default "ext") picks
``test_time``, ``games`` overrides it, and each game's seed derives from option ``seed`` and the
game id, so the list and every game are reproducible. ``path`` may instead name a JSON list (or
JSON lines) of games ``{"id", "opponent", "side", "seed"}``.

The game: rules engine :mod:`serve.envs.dcg_engine`, opponents :mod:`serve.envs.dcg_opponents`,
texts and answer parsing :mod:`serve.envs.dcg_prompts` (AgentBench's own wording). Every agent
turn of the game is two steps: a guess (assertion phase) and then an action. AgentBench asks up
to 5 times per decision, re-sending the same prompt after an answer it cannot use; so does this
environment (option ``max_tries``). After 5 unusable guesses the turn goes on without an
assertion; after 5 unusable actions the agent loses the game (status ``invalid_action`` when any
answer held a JSON object, else ``invalid_format``). Reward: 1 for a win, 0 otherwise, so the
mean reward is AgentBench's win rate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from serve.envs.base import Env, EnvError, InvalidAction, InvalidFormat, Status, StepResult, Task, register
from serve.envs.dcg_engine import MAX_HP, RULES, Game, IllegalMove, View
from serve.envs.dcg_expert import DCGExpert
from serve.envs.dcg_opponents import OPPONENTS, Opponent, make_opponent
from serve.envs.dcg_prompts import (ACTION_DESCRIPTION, AGENT_TEAM, GUESS_DESCRIPTION, OKAY, action_prompt,
                                    decode_guess, decode_move, guess_prompt)

log = logging.getLogger(__name__)

# AgentBench.old configs/tasks/card_game/{dev,std,ext}.yaml: test_time per (opponent, side).
SPLIT_GAMES = {"dev": 3, "std": 5, "ext": 50}
DEFAULT_SPLIT = "ext"
MAX_TRIES = 5  # AgentBench's guess_try_times / action_try_times
# The agent plays at most 32 turns (63 turns in all), each a guess and an action of up to 5 tries.
MAX_AGENT_STEPS = 32 * 2 * MAX_TRIES


def game_seed(seed: int, game_id: str) -> int:
    """A stable 31-bit seed for one game (not Python's salted ``hash``)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{game_id}".encode()).digest()[:4], "big") >> 1


def generate_games(split: str = DEFAULT_SPLIT, games: Optional[int] = None, seed: int = 0,
                   opponents: Tuple[str, ...] = tuple(OPPONENTS)) -> List[Task]:
    """AgentBench's task list: for each opponent, for each side, ``games`` games (its order)."""
    count = SPLIT_GAMES[split] if games is None else int(games)
    tasks = []
    for opponent in opponents:
        for side in (0, 1):
            for i in range(count):
                gid = f"{split}-{opponent}-agent{side}-{i:03d}"
                tasks.append(Task(gid, {"opponent": opponent, "side": side, "seed": game_seed(seed, gid)}, split=split))
    return tasks


@register("dcg")
class DCGEnv(Env):
    """AgentBench's Digital Card Game against its baseline opponents; reward 1 = win."""

    name = "dcg"
    metric = "win_rate"  # paper_score(): games won / games played, x100 (AgentTuning's DCG column)
    default_max_turns = MAX_AGENT_STEPS  # the game's own phase limit ends it first

    def __init__(self, path: Optional[str] = None, *, split: str = DEFAULT_SPLIT, games: Optional[int] = None,
                 seed: int = 0, opponents: Optional[List[str]] = None, rules: str = "prompt",
                 max_tries: int = MAX_TRIES, **options: Any) -> None:
        if split not in SPLIT_GAMES:
            raise EnvError(f"dcg: option 'split' must be one of {sorted(SPLIT_GAMES)}, got {split!r}")
        if games is not None and int(games) < 1:
            raise EnvError(f"dcg: option 'games' must be >= 1 (games per opponent and side), got {games}")
        self.opponents = tuple(opponents) if opponents is not None else tuple(OPPONENTS)
        unknown = [o for o in self.opponents if o not in OPPONENTS]
        if unknown or not self.opponents:
            raise EnvError(f"dcg: option 'opponents' must list some of {sorted(OPPONENTS)}, got {opponents!r}")
        if rules not in RULES:
            raise EnvError(f"dcg: option 'rules' must be one of {RULES}, got {rules!r}")
        if int(max_tries) < 1:
            raise EnvError(f"dcg: option 'max_tries' must be >= 1, got {max_tries}")
        self.split, self.games, self.seed, self.rules = split, games, int(seed), rules
        self.max_tries = int(max_tries)
        # Retries are counted per decision here (AgentBench's 5 tries), not per episode by the base
        # class; identical answers in a row are normal play (the same AOE every turn).
        options.setdefault("max_invalid", 10 ** 9)
        options.setdefault("repetition_k", 0)
        super().__init__(path, **options)

    # ------------------------------------------------------------------ tasks

    def load_tasks(self, path: Optional[str]) -> List[Task]:
        if path is None:
            return generate_games(self.split, self.games, self.seed, self.opponents)
        return self._read_games(path)

    def _read_games(self, path: str) -> List[Task]:
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise EnvError(f"dcg: cannot read game list {path}: {exc}") from None
        try:
            records = json.loads(text)
        except json.JSONDecodeError:
            try:
                records = [json.loads(line) for line in text.splitlines() if line.strip()]
            except json.JSONDecodeError as exc:
                raise EnvError(f"dcg: {path} is neither a JSON list nor JSON lines: {exc}") from None
        if not isinstance(records, list):
            raise EnvError(f"dcg: {path} must hold a list of games {{'opponent', 'side', 'seed'}}")
        tasks = []
        for n, rec in enumerate(records):
            gid = str(rec.get("id", f"game{n:03d}")) if isinstance(rec, dict) else f"game{n:03d}"
            problem = self._record_problem(rec)
            if problem:
                self.skip(gid, f"record {n} in {path}: {problem}")
                continue
            tasks.append(Task(gid, {"opponent": rec["opponent"], "side": int(rec["side"]), "seed": int(rec["seed"])},
                              split=str(rec.get("split", self.split))))
        return tasks

    @staticmethod
    def _record_problem(rec: Any) -> Optional[str]:
        if not isinstance(rec, dict):
            return "not an object"
        missing = [k for k in ("opponent", "side", "seed") if k not in rec]
        if missing:
            return f"lacks field(s) {missing}"
        if rec["opponent"] not in OPPONENTS:
            return f"'opponent' must be one of {sorted(OPPONENTS)}, got {rec['opponent']!r}"
        if isinstance(rec["side"], bool) or rec["side"] not in (0, 1):
            return f"'side' must be 0 (agent moves first) or 1, got {rec['side']!r}"
        if not isinstance(rec["seed"], int) or isinstance(rec["seed"], bool):
            return f"'seed' must be an integer, got {rec['seed']!r}"
        return None

    # ------------------------------------------------------------------ episode

    def start(self, task: Task) -> List[Dict[str, Any]]:
        rec = task.data
        self._side = int(rec["side"])
        self._opponent: Opponent = make_opponent(rec["opponent"], random.Random(rec["seed"]))
        teams: List[Any] = [None, None]
        teams[self._side], teams[1 - self._side] = list(AGENT_TEAM), self._opponent.pick()
        self._game = Game(teams, rules=self.rules, first_mover=0)
        self._expert = DCGExpert(self._side)
        self._tries, self._parsed_any = 0, False
        if self._side == 1:
            self._opponent_turn()
        # AgentBench sends each rule text as a user turn answered by a canned "Okay" before the
        # prompt; here both open the one conversation, and the first prompt is a guess.
        return [
            {"role": "user", "content": ACTION_DESCRIPTION},
            {"role": "assistant", "content": OKAY, "loss": False},
            {"role": "user", "content": GUESS_DESCRIPTION},
            {"role": "assistant", "content": OKAY, "loss": False},
            {"role": "user", "content": guess_prompt(self._view())},
        ]

    def act(self, action: str) -> StepResult:
        game = self._game
        if game.phase == "assert":
            guess, parsed = decode_guess(action, self._view())
            if guess is None:
                return self._retry(parsed, guess_prompt(self._view()), guessing=True)
            self._tries, self._parsed_any = 0, False
            pos, kind = guess
            if game.fish(1 - self._side, pos).revealed:
                kind = None  # the SDK turns a guess on a revealed fish into no assertion
            rec = game.do_assert(self._side, None if kind is None else pos, kind)
            info = {"phase": "guess", "guess": [pos, guess[1]], "correct": rec.correct}
            return self._final(info) if game.over else StepResult(action_prompt(self._view()), info=info)
        move, parsed = decode_move(action, self._view())
        if move is None:
            return self._retry(parsed, action_prompt(self._view()), guessing=False)
        self._tries, self._parsed_any = 0, False
        rec = game.do_action(self._side, *move)
        info = {"phase": "action", "move": list(move), "skill": rec.skill}
        if not game.over:
            self._opponent_turn()
        return self._final(info) if game.over else StepResult(guess_prompt(self._view()), info=info)

    def expert_action(self) -> str:
        """The rule-based expert's answer to the current prompt (see serve/envs/dcg_expert.py)."""
        if self.current is None or self.done:
            raise EnvError("dcg: no game in progress")
        if self._game.phase == "assert":
            return self._expert.guess_text(self._game)
        return self._expert.action_text(self._game)

    # ------------------------------------------------------------------ reported metric

    def paper_score(self, episodes: Iterable[Mapping[str, Any]]) -> Dict[str, Any]:
        """The win rate (x100) over finished episodes (``task_id``, ``reward``, ``info``), as the
        AgentTuning paper reports DCG; a game that did not finish counts as lost. Also per
        opponent and side, and the later AgentBench's damage rate and combined score
        (0.7 x win rate + min(0.3, 0.3 x damage rate), damage out of 1600 HP per game)."""
        groups: Dict[str, List[float]] = {}
        wins = damage = n = 0.0
        for ep in episodes:
            data = self.task(str(ep["task_id"])).data
            won = float(ep["reward"]) >= 1.0
            key = f"{data['opponent']}-agent{data['side']}"
            groups.setdefault(key, []).append(won)
            wins, n = wins + won, n + 1
            damage += float((ep.get("info") or {}).get("damage_dealt", 0))
        win_rate = wins / n if n else 0.0
        damage_rate = damage / (4 * MAX_HP * n) if n else 0.0
        return {"metric": self.metric, "score": 100 * win_rate, "n": int(n), "wins": int(wins),
                "groups": {k: {"n": len(v), "win_rate": 100 * sum(v) / len(v)} for k, v in sorted(groups.items())},
                "damage_rate": damage_rate, "agentbench_v2_score": 0.7 * win_rate + min(0.3, 0.3 * damage_rate)}

    # ------------------------------------------------------------------ internals

    def _view(self) -> View:
        return View(self._game, self._side)

    def _retry(self, parsed: bool, prompt: str, guessing: bool) -> StepResult:
        """AgentBench re-sends the same prompt; after ``max_tries`` it skips the guess or the
        agent loses (no action)."""
        self._tries += 1
        self._parsed_any = self._parsed_any or parsed
        if self._tries < self.max_tries:
            raise (InvalidAction if parsed else InvalidFormat)(prompt)
        status = Status.INVALID_ACTION if self._parsed_any else Status.INVALID_FORMAT
        self._tries, self._parsed_any = 0, False
        info: Dict[str, Any] = {"invalid": status.value}
        if guessing:
            info.update(phase="guess", guess_skipped=True)
            self._game.do_assert(self._side, None, None)
            return self._final(info) if self._game.over else StepResult(action_prompt(self._view()), info=info)
        self._game.forfeit(self._side, "no_valid_action")
        result = self._final(info)
        result.status = status
        return result

    def _opponent_turn(self) -> None:
        game, side = self._game, 1 - self._side
        view = View(game, side)
        try:
            guess = self._opponent.choose_assert(view)
            game.do_assert(side, *(guess if guess is not None else (None, None)))
            if not game.over:
                game.do_action(side, *self._opponent.choose_action(view))
        except IllegalMove as exc:  # cannot happen with the built-in opponents; AgentBench: mover loses
            log.warning("dcg: task %s: opponent %s made an illegal move: %s", self.current.id, self._opponent.name, exc)
            game.forfeit(side, "opponent_illegal_move")

    def _final(self, info: Dict[str, Any]) -> StepResult:
        game, side = self._game, self._side
        won = game.winner == side
        mine, theirs = len(game.living(side)), len(game.living(1 - side))
        reasons = {
            "all_dead": "all enemy fish are dead" if won else "all your fish are dead",
            "phase_limit": f"the round limit was reached with {mine} of your fish alive against {theirs}",
            "no_valid_action": f"you gave no valid action in {self.max_tries} tries",
            "opponent_illegal_move": "the opponent made an illegal move",
        }
        text = f"Game over: you {'win' if won else 'lose'}, {reasons.get(game.end_reason, game.end_reason)}."
        info.update(winner="agent" if won else "opponent", end_reason=game.end_reason, agent_alive=mine,
                    opponent_alive=theirs, game_turns=game.turns, opponent=self._opponent.name,
                    damage_dealt=sum(MAX_HP - max(f.hp, 0) for f in game.teams[1 - side]))
        return StepResult(text, reward=1.0 if won else 0.0, done=True, info=info)
