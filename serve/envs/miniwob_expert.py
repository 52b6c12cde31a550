"""Scripted MiniWoB++ solvers: (instruction, task-area DOM) → the next action, decided from the
current page only (so they recover from any state an agent left). Used as the expert policy."""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Dict, List, Optional

Node = Dict[str, Any]


def _walk(node: Node) -> List[Node]:
    out = [node]
    for child in node.get("children") or []:
        out += _walk(child)
    return out


def _quoted(utterance: str) -> str:
    m = re.search(r'"([^"]*)"', utterance)
    if not m:
        raise ValueError(f"no quoted target in instruction {utterance!r}")
    return m.group(1)


def _one(area: Node, pred: Callable[[Node], bool], what: str) -> Node:
    hits = [n for n in _walk(area) if pred(n)]
    if not hits:
        raise ValueError(f"no {what} on the page")
    return hits[0]


def _tag(node: Node) -> str:
    return str(node.get("tag", "")).lower()


def _text(node: Node) -> str:
    return str(node.get("text") or "").strip()


def _click(node: Node) -> str:
    return f"Action: click({node['ref']})"


def _type(node: Node, text: str) -> str:
    return f"Action: type({node['ref']}, {json.dumps(text)})"


def _fill_then_submit(area: Node, fields: List[tuple]) -> str:
    """Type each (element id, text) whose value differs, then click the submit button."""
    for elem_id, text in fields:
        box = _one(area, lambda n, i=elem_id: n.get("id") == i, f"#{elem_id}")
        if str(box.get("value") or "") != text:
            return _type(box, text)
    return _click(_one(area, lambda n: n.get("id") == "subbtn", "submit button"))


def click_test(utterance: str, area: Node) -> str:
    return _click(_one(area, lambda n: _tag(n) == "button", "button"))


def click_test_2(utterance: str, area: Node) -> str:
    target = re.search(r"button (\w+)", utterance).group(1)
    return _click(_one(area, lambda n: _tag(n) == "button" and _text(n) == target, f"button {target}"))


def click_button(utterance: str, area: Node) -> str:
    target = _quoted(utterance)
    return _click(_one(area, lambda n: _tag(n) == "button" and _text(n) == target, f"button {target!r}"))


def click_link(utterance: str, area: Node) -> str:
    target = _quoted(utterance)
    return _click(_one(area, lambda n: "alink" in str(n.get("classes")) and _text(n) == target, f"link {target!r}"))


def focus_text(utterance: str, area: Node) -> str:
    return _click(_one(area, lambda n: _tag(n).startswith("input"), "text box"))


def enter_text(utterance: str, area: Node) -> str:
    return _fill_then_submit(area, [("tt", _quoted(utterance))])


def enter_password(utterance: str, area: Node) -> str:
    password = _quoted(utterance)
    return _fill_then_submit(area, [("password", password), ("verify", password)])


def login_user(utterance: str, area: Node) -> str:
    m = re.search(r'username "([^"]*)" and the password "([^"]*)"', utterance)
    if not m:
        raise ValueError(f"cannot read credentials from {utterance!r}")
    return _fill_then_submit(area, [("username", m.group(1)), ("password", m.group(2))])


SOLVERS: Dict[str, Callable[[str, Node], str]] = {
    "click-test": click_test,
    "click-test-2": click_test_2,
    "click-button": click_button,
    "click-link": click_link,
    "focus-text": focus_text,
    "enter-text": enter_text,
    "enter-password": enter_password,
    "login-user": login_user,
}


def expert_action_for(task: str, utterance: str, area: Node, thought: Optional[str] = None) -> str:
    """The solver's action for ``task`` with a short ReAct thought in front."""
    action = SOLVERS[task](utterance, area)
    return f"Thought: {thought or 'I follow the instruction: ' + utterance}\n{action}"
