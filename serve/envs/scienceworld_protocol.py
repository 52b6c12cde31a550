"""AgentTuning's held-out ScienceWorld protocol (``eval_heldout/science-world``), written anew.

What the evaluation script does, and where this module mirrors it:

* Tasks are numbered 0..29 in alphabetical order of their names (scienceworld 1.1.3's
  ``getTaskNames()``; the few-shot file is keyed by that number): :data:`TASK_ORDER`.
* Variations (``load_variation``, set ``test``): the task's test variations, shuffled with
  ``random.seed(1)``, the first ``min(10, n)`` of them, except 9 for
  ``inclined-plane-friction-named-surfaces`` and 5 for ``power-component``:
  :func:`select_variations`.
* Prompt: the instruction :data:`INIT_PROMPT`, the answer ``Ok.``, the task's few-shot
  conversation (the script's ``prompts/prompt.json``, keyed by task number: :func:`load_fewshot`
  reads a copy the user provides; it is not shipped), then ``The preceding task has ended. Now, I
  will start a new task.`` + the first observation + the task description; observations have
  their newlines and tabs replaced by spaces (``clean``). When the prompt is too long, the script
  drops few-shot turns oldest first: :func:`opening_messages`. Without the script's file, the
  few-shot is our own, built from the simulator's gold path of a *train* variation of the same
  task in the same turn format: :func:`gold_fewshot`.
* Actions (``findValidActionNew``): a ``Think: ...`` turn gets ``OK.`` and does not reach the
  simulator; anything else (``Action:`` removed) is matched against the currently valid
  commands and, when it is not one of them, replaced by the valid command sharing the most
  words with it: :func:`closest_valid_action`.
* Early stops: 10 failed actions in a row (:func:`is_action_failed`), or the last five
  ``(action, observation)`` records holding only two distinct values (a loop).

The short texts the model sees (:data:`INIT_PROMPT`, ``Ok.``, :data:`NEW_TASK`, ``OK.``) reproduce
the script's published prompt wording verbatim, for fidelity with the paper's protocol.
"""

from __future__ import annotations

import json
import random
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

# scienceworld 1.1.3 getTaskNames() order = AgentTuning's task_num (keys of prompt.json).
TASK_ORDER: Tuple[str, ...] = (
    "boil", "change-the-state-of-matter-of", "chemistry-mix", "chemistry-mix-paint-secondary-color",
    "chemistry-mix-paint-tertiary-color", "find-animal", "find-living-thing", "find-non-living-thing",
    "find-plant", "freeze", "grow-fruit", "grow-plant", "identify-life-stages-1", "identify-life-stages-2",
    "inclined-plane-determine-angle", "inclined-plane-friction-named-surfaces",
    "inclined-plane-friction-unnamed-surfaces", "lifespan-longest-lived",
    "lifespan-longest-lived-then-shortest-lived", "lifespan-shortest-lived",
    "measure-melting-point-known-substance", "measure-melting-point-unknown-substance", "melt",
    "mendelian-genetics-known-plant", "mendelian-genetics-unknown-plant", "power-component",
    "power-component-renewable-vs-nonrenewable-energy", "test-conductivity",
    "test-conductivity-of-unknown-substances", "use-thermometer",
)
# load_variation's test-set cut-offs: min(10, n), with these two tasks overridden.
AGENTTUNING_MAX_VARIATIONS = 10
AGENTTUNING_LIMITS: Dict[str, int] = {"inclined-plane-friction-named-surfaces": 9, "power-component": 5}
AGENTTUNING_SEED = 1

# eval.py INIT_PROMPT, verbatim (its "household" wording included: it is what the models saw).
INIT_PROMPT = (
    "Interact with a household to solve a task. Each turn, you can choose from one of the following options:\n"
    "1. Think: You could think step-by-step to tell your reasoning and planning to solve the task, which will "
    "help you handle the task easier.\n"
    "2. Action: You could interact with the environment freely to solve the task, but remember to refer to "
    "your thought and act accordingly.\n"
    'Prepend your action with "Think: " or "Action: ", e.g. "Think: Now I have picked up the object. Next, I '
    'need to move to the location of the answer box." or "Action: go to kitchen".\n'
    "Exactly only one option could be chosen in a turn."
)
INIT_REPLY = "Ok."
NEW_TASK = "The preceding task has ended. Now, I will start a new task.\n"
THINK_REPLY = "OK."
TASK_DESC_PREFIX = "Task Description:\n"  # eval.py drops it: taskdescription()[18:]

ROOMS = ("hallway", "greenhouse", "green house", "kitchen", "bathroom", "outside", "workshop", "art studio",
         "foundry", "bedroom", "living room")
MAX_FAILED_IN_A_ROW = 10
LOOP_WINDOW, LOOP_DISTINCT = 5, 2


def clean(text: str) -> str:
    """eval.py ``clean``: newlines and tabs become spaces."""
    return text.replace("\n", " ").replace("\t", " ")


def select_variations(name: str, variations: Sequence[int], max_variations: Optional[int],
                      seed: Optional[int], limits: Mapping[str, int]) -> List[int]:
    """The variations of ``name`` to evaluate: shuffled with ``random.seed(seed)`` (None: kept in
    order), then the first ``min(max_variations, limits[name])`` of them."""
    chosen = list(variations)
    if seed is not None:
        random.Random(seed).shuffle(chosen)  # = random.seed(seed); random.shuffle(chosen)
    count = len(chosen) if max_variations is None else min(len(chosen), int(max_variations))
    if name in limits:
        count = min(count, int(limits[name]))
    return chosen[:count]


def load_fewshot(path: str) -> Dict[str, List[str]]:
    """``{task name: [user, assistant, user, ...]}`` from a file in the format of AgentTuning's
    ``prompt.json``: a JSON object keyed by task number (:data:`TASK_ORDER`), each value an
    even-length list of strings starting with a user turn. ValueError naming the problem when
    the file does not fit."""
    with open(path, encoding="utf-8") as fh:
        raw = json.load(fh)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object keyed by task number '0'..'29'")
    out: Dict[str, List[str]] = {}
    for key, turns in raw.items():
        if not (str(key).isdigit() and int(key) < len(TASK_ORDER)):
            raise ValueError(f"{path}: key {key!r} is not a task number 0..{len(TASK_ORDER) - 1}")
        if not isinstance(turns, list) or len(turns) % 2 or not all(isinstance(t, str) for t in turns):
            raise ValueError(f"{path}: task {key} must be an even-length list of strings (user, assistant, ...)")
        out[TASK_ORDER[int(key)]] = list(turns)
    return out


def _plan_thought(task_desc: str) -> str:
    """Our opening thought of a gold-path example: the task's first sentence, as the agent's goal."""
    first = task_desc.strip().split(". ")[0].rstrip(".")
    goal = first[len("Your task is to "):] if first.startswith("Your task is to ") else "do this: " + first
    return f"Think: I need to {goal}. I will act one step at a time and read each observation before the next."


def gold_fewshot(first_obs: str, task_desc: str, steps: Sequence[Tuple[str, str]]) -> List[str]:
    """A few-shot conversation in ``prompt.json``'s turn format, built from a played gold path.

    ``steps`` are the ``(command, observation)`` pairs of the simulator's gold action sequence.
    Turns: the first observation and the task description (user); a ``Think:`` stating the goal,
    answered ``OK.``; then ``Action: <command>`` / observation pairs, with a ``Think:`` (answered
    ``OK.``) before each ``focus on`` (the task-defining, irreversible command). The last
    observation is left out, so the example ends on the agent's turn as the script's do.
    """
    turns = [clean(first_obs).strip() + "\n" + task_desc.strip(), _plan_thought(task_desc), THINK_REPLY]
    for command, obs in steps:
        if command.startswith("focus on "):
            turns += [f"Think: The {command[len('focus on '):]} is what the task is about, so I focus on it now.",
                      THINK_REPLY]
        turns += ["Action: " + command, clean(obs).strip()]
    return turns[:-1]  # without steps: the goal thought alone (its "OK." dropped)


def approx_tokens(text: str) -> int:
    """~4 characters per token (the rollout's estimate when no tokenizer is at hand)."""
    return len(text) // 4 + 1


def opening_messages(examples: Sequence[str], first_obs: str, task_desc: str,
                     budget_tokens: Optional[int]) -> List[Dict[str, Any]]:
    """The script's opening conversation, with few-shot turns dropped as the script drops them
    (the pair after the example's first exchange; the example's first exchange last) until the
    estimated size fits ``budget_tokens`` (None: keep all)."""
    msgs: List[Dict[str, Any]] = [{"role": "user", "content": INIT_PROMPT},
                                  {"role": "assistant", "content": INIT_REPLY, "loss": False}]
    for i, text in enumerate(examples):
        msgs.append({"role": "user", "content": text} if i % 2 == 0
                    else {"role": "assistant", "content": text, "loss": False})
    msgs.append({"role": "user", "content": (NEW_TASK + clean(first_obs) + "\n" + task_desc).strip()})
    if budget_tokens is None:
        return msgs
    while sum(approx_tokens(m["content"]) for m in msgs) > budget_tokens and len(msgs) > 3:
        if len(msgs) > 5 and not msgs[4]["content"].startswith(NEW_TASK):
            del msgs[4:6]
        else:
            del msgs[2:4]
    return msgs


def is_action_failed(obs: str) -> bool:
    """eval_utils ``is_action_failed``: the script's (loose) test of a failed command."""
    return obs == "No known action matches that input." or "can't" in obs or "not" in obs or "doesn't" in obs


_FOCUS_WORDS = re.compile(r"\b(?:focus|on|in|to)\b", re.I)


def candidate_actions(valid: Iterable[str], look: str, inventory: str, recent: Sequence[str]) -> Set[str]:
    """The valid commands the script accepts at this point (``findValidActionNew``'s filters).

    ``recent`` is the script's ``recent_actions`` list: ``"look around"`` followed by one
    ``"(action, observation)"`` record per turn. The script removes its last three entries from
    the valid commands; as only the first entry is a bare command, the visible effect is that
    ``look around`` is not accepted during the first three turns (it is then matched to a
    ``look at ...`` command like any other unknown text).
    """
    cands = set(valid)
    cands.update("open door to " + room for room in ROOMS)
    cands.difference_update("focus on " + x for x in ("agent", "air") + ROOMS)
    cands.difference_update(recent[-3:])
    seen = look + " " + inventory.lower()
    for command in list(cands):
        if "door" in command and "open" not in command:
            cands.discard(command)
        elif command.startswith("focus on"):
            # a focus target must be something in view (room description or inventory)
            if any(word not in seen for word in _FOCUS_WORDS.sub("", command).split(" ")):
                cands.discard(command)
    return cands


def closest_valid_action(prediction: str, candidates: Set[str]) -> str:
    """The prediction itself when it is a candidate, else the candidate sharing the most words.

    As ``findValidActionNew`` without a sentence encoder: ``green house`` → ``greenhouse``
    first; word overlap counts distinct space-separated words; with no overlap at all the
    prediction is kept; the chosen text loses everything but letters, digits and spaces. Ties go
    to the first candidate in sorted order (the script takes the first in Python's set order,
    which changes from run to run).
    """
    exact = prediction.replace("green house", "greenhouse").strip()
    if exact in candidates:
        return exact
    words = set(prediction.split(" "))
    best, best_overlap = prediction, 0
    for command in sorted(candidates):
        overlap = len(words & set(command.split(" ")))
        if overlap > best_overlap:
            best, best_overlap = command, overlap
    return re.sub(r"[^A-Za-z0-9 ]+", "", best)


def is_loop(recent: Sequence[str]) -> bool:
    """The script's loop test: the last five records hold only two distinct values."""
    return len(recent) >= LOOP_WINDOW and len(set(recent[-LOOP_WINDOW:])) == LOOP_DISTINCT
