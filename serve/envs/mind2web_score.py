"""Mind2Web answers and scores: AgentBench's demonstrations, the answer parser, the metrics.

Answer format (AgentBench's chain-of-thought prompt)::

    Thought: <reasoning>
    Answer: C.
    Action: SELECT
    Value: Pickup

``Answer: A.`` means "None of the above" (no Action line needed); ``CLICK`` takes no Value.

Metrics of one step (Mind2Web, as AgentBench computes them): **element accuracy** — the chosen
element is one of the gold elements; **action F1** — F1 between the sets of whitespace tokens
of the predicted ``"OP value"`` and the gold ``"OP value"`` (``"CLICK"`` alone for clicks; case
matters; a click answered with a Value line gets F1 < 1); **step success** — element right
and action F1 = 1. A task succeeds when every step does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from serve.envs.base import InvalidAction, InvalidFormat

# AgentBench's three chain-of-thought demonstrations (AgentBench.old
# data/mind2web/prompt/llm_prompt_cot.json, THUDM, Apache-2.0), verbatim: the question a model
# sees and the answer it should give. They open every episode as loss-free turns.
DEMONSTRATIONS: List[Tuple[str, str]] = [
    (
        "'''\n"
        "<html> <div> <div> <a tock home page /> <button id=0 book a reservation. toggle open> "
        "<span> Book a reservation </span> </button> <button book a reservation. toggle open> "
        "</button> </div> <div> <select id=1 type> <option reservations true> Dine in </option> "
        "<option pickup> Pickup </option> <option delivery> Delivery </option> <option events> "
        "Events </option> <option wineries> Wineries </option> <option all> Everything </option> "
        "</select> <div id=2> <p> Celebrating and supporting leading women shaking up the "
        "industry. </p> <span> Explore now </span> </div> </div> </div> </html>\n"
        "'''\n"
        "\n"
        "Based on the HTML webpage above, try to complete the following task:\n"
        "Task: Check for pickup restaurant available in Boston, NY on March 18, 5pm with just "
        "one guest\n"
        "Previous actions:\n"
        "None\n"
        "What should be the next action? Please select from the following choices (If the "
        "correct action is not in the page above, please select A. 'None of the above'):\n"
        "\n"
        "A. None of the above\n"
        "B. <button id=0 book a reservation. toggle open> <span> Book a\n"
        "C. <select id=1 type> <option reservations true> Dine in </option> <option\n"
        "D. <div id=2> <p> Celebrating and supporting leading women shaking up",
        "Thought: I need to select pickup restaurant first.\n"
        "Answer: C.\n"
        "Action: SELECT\n"
        "Value: Pickup",
    ),
    (
        "'''\n"
        "<html> <div> <main main> <section tabpanel> <div> <ul tablist> <li tab heading level 3 "
        "search and> </li> <li id=0 tab heading level 3 search and> <span> Hotel </span> </li> "
        "<li tab heading level 3 search and> </li> <li tab heading level 3 search and> </li> "
        "</ul> <div tabpanel> <div id=1> <div> <span> Dates* </span> <button button clear dates "
        "/> </div> <div> <label> Travelers </label> <div> <p> 1 Adult </p> <button button> 1 "
        "Adult </button> <div dialog> <button button travel with a pet. this> <span> Travel with "
        "a pet </span> </button> <div> <button button clear all fields> Clear all </button> "
        "<button button> </button> </div> </div> </div> </div> </div> </div> </div> </section> "
        "</main> <footer contentinfo> <div> <h3> Stay Connected </h3> <ul id=2> <a mobile tools> "
        "</a> <a open united's tiktok feed in> </a> <a open united's facebook page in> </a> <a "
        "open united's twitter feed in> </a> <a open united's youtube page in> </a> <a open "
        "united's instagram feed in> </a> <a open united's linkedin profile in> </a> </ul> "
        "</div> </footer> </div> </html>\n"
        "'''\n"
        "\n"
        "Based on the HTML webpage above, try to complete the following task:\n"
        "Task: Compare the fare types to book a 1-adult ticket from Springfiels, IL to Austin, "
        "TX for April 29th 2023\n"
        "Previous actions:\n"
        "[combobox]  Enter your departing city, airport name, or airpor... -> TYPE: SPRINGFIELD\n"
        "[button]  Springfield, IL, US (SPI) -> CLICK\n"
        "[combobox]  Enter your destination city, airport name, or airp... -> TYPE: AUSTIN\n"
        "[button]  Austin, TX, US (AUS) -> CLICK\n"
        "What should be the next action? Please select from the following choices (If the "
        "correct action is not in the page above, please select A. 'None of the above'):\n"
        "\n"
        "A. None of the above\n"
        "B. <li id=0 tab heading level 3 search and> <span> Hotel\n"
        "C. <div id=1> <div> <span> Dates* </span> <button button clear dates\n"
        "D. <ul id=2> <a mobile tools> </a> <a open united's tiktok",
        "Thought: There are no elements that allow setting the date or viewing the fare, so "
        "there is no correct action.\n"
        "Answer: A.",
    ),
    (
        "'''\n"
        "<html> <div> <nav main menu> <ul> <li> <div button> Car Sales </div> <div id=0> <div> "
        "<div> <div> Buy A Car </div> <div> Plan Your Purchase </div> </div> <div> <h4> Its Tax "
        "Refund Time. Treat Yourself to an Upgrade. </h4> <p> With a variety of options, invest "
        "your refund in what you really want - a quality, used vehicle from Enterprise. </p> <a> "
        "View Inventory </a> </div> </div> </div> </li> <div id=1> Enterprise Fleet Management "
        "</div> </ul> </nav> <div region> <button id=2 selected pick-up date 03/19/2023> <span> "
        "<span> 19 </span> <div> <span> Mar </span> <span> 2023 </span> </div> </span> </button> "
        "</div> </div> </html>\n"
        "'''\n"
        "\n"
        "Based on the HTML webpage above, try to complete the following task:\n"
        "Task: Find a mini van at Brooklyn City from April 5th to April 8th for a 22 year old "
        "renter.\n"
        "Previous actions:\n"
        "[searchbox]  Pick-up & Return Location (ZIP, City or Airport) (... -> TYPE: Brooklyn\n"
        "[option]  Brooklyn, NY, US Select -> CLICK\n"
        "What should be the next action? Please select from the following choices (If the "
        "correct action is not in the page above, please select A. 'None of the above'):\n"
        "\n"
        "A. None of the above\n"
        "B. <div id=0> <div> <div> <div> Buy A Car </div> <div>\n"
        "C. <div id=1> Enterprise Fleet Management </div>\n"
        "D. <button id=2 selected pick-up date 03/19/2023> <span> <span> 19 </span>",
        "Thought: The search has already been set to Brooklyn. Next, I should choose pick-up "
        "date.\n"
        "Answer: D.\n"
        "Action: CLICK",
    ),
]

FORMAT_HELP = ("Answer with the letter of your choice and the action, for example:\n"
               "Thought: <your reasoning>\nAnswer: B.\nAction: TYPE\nValue: <text to type>\n"
               "Action is CLICK, TYPE or SELECT; TYPE and SELECT need a Value line; "
               "'Answer: A.' alone means none of the choices is right.")
_ANSWER = re.compile(r"Answer\s*:\s*\(?([A-Z])(?![A-Za-z])")
_ANSWER_NONE = re.compile(r"Answer\s*:\s*None of the above", re.I)
_ANSWER_AB = re.compile(r"Answer: (A|B|C|D|E|F)")  # AgentBench's own pattern
_ACTION = re.compile(r"Action: (CLICK|SELECT|TYPE)")
_ACTION_LOOSE = re.compile(r"Action\s*:\s*(\w+)", re.I)
_VALUE = re.compile(r"Value: (.*)$", re.M)


@dataclass
class Answer:
    """A parsed answer: ``letter`` "A" (none of the above) or a choice letter; ``action`` is
    ``"OP value"`` as AgentBench builds it for scoring."""

    letter: str
    op: str = ""
    value: str = ""

    @property
    def action(self) -> str:
        return f"{self.op.strip()} {self.value.strip()}"


def parse_answer(text: str, n_choices: int, parsing: str = "strict") -> Answer:
    """The agent's answer to a question with ``n_choices`` choices besides A.

    ``strict`` (default): no ``Answer: X`` → InvalidFormat; a letter past the last choice →
    InvalidAction; a choice without ``Action: CLICK|TYPE|SELECT`` → InvalidFormat.
    ``agentbench``: AgentBench's parser, which never refuses — no (or an unknown) letter counts
    as A, a missing Action as an empty operation.
    """
    if parsing == "agentbench":
        m = _ANSWER_AB.search(text.strip())
        letter = m.group(1) if m else "A"
        if letter != "A" and ord(letter) - ord("B") >= n_choices:
            letter = "A"  # AgentBench: IndexError, the round is ignored
        op = _ACTION.search(text)
        value = _VALUE.search(text)
        return Answer(letter, op.group(1) if op else "", value.group(1) if value else "")
    m = _ANSWER.search(text)
    if m is None:
        if _ANSWER_NONE.search(text):
            return Answer("A")
        raise InvalidFormat("Invalid answer: no 'Answer: <letter>' line. " + FORMAT_HELP)
    letter = m.group(1)
    last = chr(ord("B") + n_choices - 1)
    if letter != "A" and (letter < "B" or letter > last):
        raise InvalidAction(f"Invalid answer: {letter} is not a choice (choose A to {last}). " + FORMAT_HELP)
    if letter == "A":
        return Answer("A")
    tail = text[m.end():]
    op = _ACTION.search(tail) or _ACTION.search(text)
    if op is None:
        loose = _ACTION_LOOSE.search(tail)
        what = f"'{loose.group(1)}' is not an action" if loose else "no 'Action:' line"
        raise InvalidFormat(f"Invalid answer: {what}. " + FORMAT_HELP)
    value = _VALUE.search(tail) or _VALUE.search(text)
    return Answer(letter, op.group(1), value.group(1) if value else "")


def action_f1(pred: str, gold: str) -> float:
    """Mind2Web's operation F1 over sets of whitespace tokens (case-sensitive)."""
    p, g = set(pred.split()), set(gold.split())
    if not p and not g:
        return 1.0
    common = len(p & g)
    if not p or not g or common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def score_step(pred_id: Optional[str], pred_action: str, gold_ids: Sequence[str],
               gold_action: str) -> Dict[str, float]:
    """Element accuracy, action F1 and step success of a step's final prediction
    (``pred_id`` None: no element was chosen; a step without gold elements scores 0)."""
    if pred_id is None or not gold_ids:
        return {"element_acc": 0.0, "action_f1": 0.0, "success": 0.0}
    element = 1.0 if pred_id in gold_ids else 0.0
    f1 = action_f1(pred_action, gold_action)
    return {"element_acc": element, "action_f1": f1, "success": float(element == 1.0 and f1 >= 1.0)}


def aggregate(results: List[Dict[str, Any]], n_steps: int) -> Dict[str, float]:
    """Task metrics over its ``n_steps`` posed steps (steps never reached count as 0)."""
    def mean(key: str) -> float:
        return sum(float(r[key]) for r in results) / n_steps if n_steps else 0.0

    sr = mean("success")
    return {"element_acc": mean("element_acc"), "action_f1": mean("action_f1"), "step_sr": sr,
            "task_success": float(n_steps > 0 and len(results) == n_steps and sr == 1.0)}


_REPR = re.compile(r"^\s*\[(?P<role>[^\]]*)\]\s*(?P<label>.*?)\s*->\s*(?P<op>[A-Z]+)")


def expert_answer(letter: str, op: str, value: str, action_repr: str) -> str:
    """The gold answer in the demonstrations' form, with a short thought from the step's
    ``action_repr`` (``"[combobox]  From -> TYPE: Denver"``)."""
    if letter == "A":
        return ("Thought: None of these elements is the one to act on next, so the answer is "
                "none of the above.\nAnswer: A.")
    m = _REPR.match(action_repr or "")
    role = (m.group("role").strip() if m else "") or "element"
    label = (m.group("label").strip() if m else "").rstrip(". ")
    target = f"the {role} \"{label}\"" if label else f"the {role}"
    verb = {"CLICK": f"click {target}", "TYPE": f"type \"{value}\" into {target}",
            "SELECT": f"select \"{value}\" in {target}"}[op]
    text = f"Thought: The next step of the task is to {verb}.\nAnswer: {letter}.\nAction: {op}"
    return text + (f"\nValue: {value}" if op != "CLICK" else "")
