"""Mind2Web (held-in) as AgentBench poses it: multiple-choice element selection over real pages.

Data: Mind2Web records unchanged (``serve/envs/mind2web_data.py``): a JSON/JSON-lines file, a
folder of them (Mind2Web's split folders ``train``, ``test_task``, ``test_website``,
``test_domain`` give each task its split), a glob, or the hub id ``osunlp/Mind2Web`` (option
``split``). Default: ``$AGENTTUNING_DATA_DIR/mind2web`` (or the repo's ``data/mind2web``) when
present, else the hub.

Each step of a task becomes a question (AgentBench.old ``src/tasks/mind2web``, Mind2Web's
multiple-choice formulation): the page pruned around a few candidate elements, the task, the
gold previous actions (the last 5), and the choices ``A. None of the above``, ``B.`` ... The
episode opens with AgentBench's three chain-of-thought demonstrations (``loss: false``).
Candidates per question (``num_candidates``, 5 as in AgentBench):

* ``candidates: sample`` (default; works on any record): the gold element and
  ``num_candidates - 1`` negatives drawn from the step's ``neg_candidates``, seeded by
  ``(seed, annotation_id, action_uid)`` — one question per step, the same on every run;
* ``candidates: ranked`` (AgentBench's evaluation): the candidate generator's top ``top_k`` (10)
  elements, positives and negatives (ranks from the records or ``scores_file``), in a seeded
  order, asked ``num_candidates`` at a time; a chosen element goes on to the next round, until one
  chosen element is left — several questions per step. A step whose gold is outside the top k
  is still asked and scores 0, as in AgentBench.

The episode follows the gold history: after each step (right or wrong) the next question shows
the gold previous actions, as Mind2Web evaluates. ``episode: task`` (default) plays a whole task,
reward = mean step success (the value AgentTuning's r >= 2/3 filter reads); ``episode: step``
makes each step its own episode (task id ``<annotation_id>:<step>``), reward = step success,
so the mean reward over episodes is AgentBench's Step SR. ``info`` carries element accuracy,
action F1, step SR and task success. Scoring: ``serve/envs/mind2web_score.py``.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
from typing import Any, Dict, Iterator, List, Optional, Tuple

from serve.envs.base import (Env, EnvError, InvalidAction, InvalidFormat, Status, StepResult, Task, data_file,
                             register)
from serve.envs.mind2web_data import (HUB_ID, Record, RecordError, Step, hub_file, load_ranks, parse_record,
                                      read_hub, read_local)
from serve.envs.mind2web_dom import page_and_choices, parse_page, question
from serve.envs.mind2web_score import DEMONSTRATIONS, aggregate, expert_answer, parse_answer, score_step

log = logging.getLogger(__name__)

DEFAULT_DIR = "mind2web"
EPISODES = ("task", "step")
CANDIDATES = ("sample", "ranked")
PARSINGS = ("strict", "agentbench")


@register("mind2web")
class Mind2WebEnv(Env):
    """Mind2Web steps as multiple-choice questions; see the module docstring for the options."""

    default_max_turns = 200  # the episode ends by itself after its last step; this is a safeguard

    def __init__(self, path: Optional[str] = None, *, split: Optional[str] = None,
                 episode: str = "task", candidates: str = "sample", num_candidates: int = 5,
                 top_k: int = 10, seed: int = 0, scores_file: Optional[str] = None,
                 previous_k: int = 5, parsing: str = "strict", skip_unanswerable: bool = False,
                 zip_password: Optional[str] = None, cache_dir: Optional[str] = None,
                 **options: Any) -> None:
        for name, value, allowed in (("episode", episode, EPISODES), ("candidates", candidates, CANDIDATES),
                                     ("parsing", parsing, PARSINGS)):
            if value not in allowed:
                raise EnvError(f"mind2web: option {name!r} must be one of {allowed}, got {value!r}")
        if int(num_candidates) < 2 or int(top_k) < 1 or int(previous_k) < 0:
            raise EnvError("mind2web: options need num_candidates >= 2, top_k >= 1, previous_k >= 0")
        self.split, self.episode, self.candidates = split, episode, candidates
        self.num_candidates, self.top_k, self.seed = int(num_candidates), int(top_k), int(seed)
        self.previous_k, self.parsing = int(previous_k), parsing
        self.skip_unanswerable = bool(skip_unanswerable)
        self.zip_password, self.cache_dir = zip_password, cache_dir
        self.ranks: Dict[str, Dict[str, int]] = {}
        if scores_file:
            local = scores_file if os.path.exists(scores_file) or ":" not in scores_file else hub_file(scores_file)
            try:
                self.ranks = load_ranks(local, self.top_k)
            except (OSError, ValueError, EOFError, pickle.UnpicklingError) as exc:
                raise EnvError(f"mind2web: cannot read scores_file {scores_file}: {exc}") from None
        # Every turn answers a new question, so the same answer twice in a row is no loop.
        options.setdefault("repetition_k", 0)
        super().__init__(path, **options)

    # ------------------------------------------------------------------ tasks

    def _records(self, path: Optional[str]) -> Iterator[Tuple[Any, str]]:
        if path is None:
            try:
                path = data_file(DEFAULT_DIR)
            except EnvError:
                path = HUB_ID
        if os.path.exists(path) or any(ch in path for ch in "*?["):
            return read_local(path, self.split)
        # "owner/name" that is no local path: a hub dataset id
        if path.count("/") == 1 and not path.startswith((".", "/")) and not path.endswith((".json", ".jsonl")):
            return read_hub(path, self.split, self.zip_password, self.cache_dir)
        raise EnvError(f"mind2web: {path}: no such file or folder (give Mind2Web JSON files, a "
                       f"folder of them, or the hub id {HUB_ID} with option split)")

    def load_tasks(self, path: Optional[str]) -> List[Task]:
        tasks: List[Task] = []
        try:
            for n, (raw, split) in enumerate(self._records(path)):
                tid = str(raw.get("annotation_id") or f"record{n}") if isinstance(raw, dict) else f"record{n}"
                try:
                    rec = parse_record(raw, split, self.ranks)
                except RecordError as exc:
                    self.skip(tid, f"{exc} (record {n} of {path or 'the default data'})")
                    continue
                if self.split is not None and rec.split != self.split:
                    continue
                tasks.extend(self._tasks_of(rec))
        except (OSError, RecordError) as exc:
            raise EnvError(f"mind2web: cannot read {path or 'the default data'}: {exc}") from None
        log.info("mind2web: %d tasks (%d steps) from %s, %d skipped", len(tasks),
                 sum(len(t.data[1]) for t in tasks), path or "the default data", len(self.skipped))
        return tasks

    def _problem(self, step: Step) -> Optional[Tuple[str, str]]:
        """``("error", why)`` when a step cannot be posed, ``("unanswerable", why)`` when it is
        left out under ``skip_unanswerable``, else None."""
        if self.candidates == "ranked" and step.ranks is None:
            return "error", (f"step {step.index} ({step.action_uid}) has no candidate ranks; give "
                             f"scores_file (Mind2Web's scores_all_data.pkl) or use candidates: sample")
        if not self._pool_ids(step):
            return "error", f"step {step.index} ({step.action_uid}) has no candidate element in its cleaned_html"
        if self.skip_unanswerable and not self._gold_in_pool(step):
            return "unanswerable", (f"step {step.index} ({step.action_uid}): no gold element among its "
                                    f"candidates (skip_unanswerable)")
        return None

    def _tasks_of(self, rec: Record) -> List[Task]:
        """Task mode: one task per record (a step that cannot be posed skips the whole task;
        unanswerable steps are left out under skip_unanswerable). Step mode: one per step."""
        problems: Dict[int, Tuple[str, str]] = {
            i: ("error", f"step {i}: {why}") for i, why in rec.step_errors.items()}
        for step in rec.steps:
            found = self._problem(step)
            if found:
                problems[step.index] = found
        if self.episode == "step":
            for i, (_, why) in sorted(problems.items()):
                self.skip(f"{rec.annotation_id}:{i}", why)
            return [Task(f"{rec.annotation_id}:{s.index}", (rec, [s]), rec.split)
                    for s in rec.steps if s.index not in problems]
        errors = sorted((i, why) for i, (kind, why) in problems.items() if kind == "error")
        if errors:
            self.skip(rec.annotation_id, errors[0][1])
            return []
        steps = [s for s in rec.steps if s.index not in problems]
        if not steps:
            self.skip(rec.annotation_id, "no step has a gold element among its candidates (skip_unanswerable)")
            return []
        return [Task(rec.annotation_id, (rec, steps), rec.split)]

    # ------------------------------------------------------------------ candidates

    def _pool_ids(self, step: Step) -> List[str]:
        if self.candidates == "ranked":
            return [c for c in step.pos + step.neg if (step.ranks or {}).get(c, self.top_k) < self.top_k]
        return step.pos + step.neg

    def _gold_in_pool(self, step: Step) -> bool:
        return bool(set(step.pos) & set(self._pool_ids(step)))

    def _rng(self, rec: Record, step: Step) -> random.Random:
        # A string seed is hashed with SHA-512: the same draw in every process and run.
        return random.Random(f"{self.seed}:{rec.annotation_id}:{step.action_uid}")

    def _step_pool(self, rec: Record, step: Step) -> List[str]:
        """The candidates of this step's questions, in the order they are asked."""
        rng = self._rng(rec, step)
        if self.candidates == "ranked":
            pool = self._pool_ids(step)
            rng.shuffle(pool)
            return pool
        negatives = rng.sample(step.neg, min(len(step.neg), self.num_candidates - (1 if step.pos else 0)))
        return ([rng.choice(step.pos)] if step.pos else []) + negatives

    # ------------------------------------------------------------------ episode

    def start(self, task: Task) -> List[Dict[str, Any]]:
        self._rec, self._steps = task.data
        self._si = 0
        self._results: List[Dict[str, Any]] = []
        self._malformed = 0
        messages: List[Dict[str, Any]] = []
        for q, a in DEMONSTRATIONS:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a, "loss": False}]
        messages.append({"role": "user", "content": self._begin_step()})
        return messages

    def _begin_step(self) -> str:
        step = self._steps[self._si]
        try:
            self._root = parse_page(step.html)
        except ValueError as exc:
            raise ValueError(f"task {self._rec.annotation_id} step {step.index} ({step.action_uid}): {exc}") from None
        self._pool = self._step_pool(self._rec, step)
        self._picked: Dict[str, str] = {}  # element id -> the action chosen with it
        self._last: Optional[str] = None
        self._rounds = 0
        return self._next_question()

    def _next_question(self) -> str:
        step = self._steps[self._si]
        self._round_ids, self._pool = self._pool[: self.num_candidates], self._pool[self.num_candidates:]
        page, self._choices = page_and_choices(self._root, self._round_ids)
        self._rounds += 1
        previous = step.previous[-self.previous_k:] if self.previous_k else []
        return question(page, self._choices, self._rec.task, previous)

    def _step_over(self) -> bool:
        """Sample mode: one question. Ranked: rounds go on while more than one candidate is
        left, or one that no round has chosen yet."""
        if self.candidates == "sample":
            return True
        return not (len(self._pool) > 1 or (len(self._pool) == 1 and self._pool[0] not in self._picked))

    def act(self, action: str) -> StepResult:
        try:
            answer = parse_answer(action, len(self._choices), self.parsing)
        except InvalidFormat as exc:
            self._malformed += 1
            if self.invalid + 1 > self.max_invalid:
                return self._end_invalid(exc)
            raise
        if answer.letter != "A":
            chosen = self._choices[ord(answer.letter) - ord("B")][0]
            self._picked[chosen] = answer.action
            self._last = chosen
            self._pool.append(chosen)
        if not self._step_over():
            return StepResult(self._next_question(), reward=self._partial(), info=self._progress())
        result = self._close_step()
        self._si += 1
        if self._si < len(self._steps):
            return StepResult(self._begin_step(), reward=self._partial(), info={**self._progress(), "step": result})
        metrics = aggregate(self._results, len(self._steps))
        ok = sum(int(r["success"]) for r in self._results)
        return StepResult(f"The task is over: {ok} of {len(self._steps)} steps were right.",
                          reward=metrics["step_sr"], done=True, info={**self._summary(metrics), "step": result})

    def _close_step(self) -> Dict[str, Any]:
        step = self._steps[self._si]
        # The step's prediction is the one element left standing (AgentBench's tournament);
        # in sample mode, whatever the single question's answer chose.
        final = self._last if self.candidates == "sample" else (
            self._pool[0] if len(self._pool) == 1 and self._pool[0] in self._picked else None)
        pred_action = self._picked.get(final, "") if final is not None else ""
        gold_ids = [c for c in step.pos if c in self._pool_ids(step)]
        scores = score_step(final, pred_action, gold_ids, step.gold_action)
        result = {"step": step.index, "action_uid": step.action_uid, "prediction": final,
                  "predicted_action": pred_action.strip(), "gold": gold_ids, "gold_action": step.gold_action,
                  "rounds": self._rounds, **scores}
        self._results.append(result)
        return result

    def _partial(self) -> float:
        return sum(r["success"] for r in self._results) / len(self._steps)

    def _progress(self) -> Dict[str, Any]:
        return {"steps_done": len(self._results), "steps": len(self._steps)}

    def _summary(self, metrics: Dict[str, float]) -> Dict[str, Any]:
        return {**metrics, "steps": len(self._steps), "steps_done": len(self._results),
                "malformed": self._malformed, "per_step": list(self._results),
                "annotation_id": self._rec.annotation_id, "website": self._rec.website}

    def _end_invalid(self, exc: InvalidFormat) -> StepResult:
        """The malformed answer that ends the episode: it keeps the score of the steps done."""
        status = Status.INVALID_ACTION if isinstance(exc, InvalidAction) else Status.INVALID_FORMAT
        metrics = aggregate(self._results, len(self._steps))
        info = {**self._summary(metrics), "invalid": status.value}
        return StepResult(exc.feedback, reward=metrics["step_sr"], done=True, status=status, info=info)

    # ------------------------------------------------------------------ expert

    def expert_action(self) -> str:
        """The gold answer: the gold element when it is among the choices (with the gold
        operation and value), else A."""
        step = self._steps[self._si]
        for i, (cid, _) in enumerate(self._choices):
            if cid in step.pos:
                return expert_answer(chr(ord("B") + i), step.op, step.value, step.repr)
        return expert_answer("A", step.op, step.value, step.repr)

    def end_episode(self) -> None:
        self._root = None  # the parsed page is the only large per-episode object
