"""WebArena's id-based action space: extraction from the model's reply, parsing, descriptions.

Follows AgentTuning's copy of WebArena (``eval_heldout/webarena``): ``CoTPromptConstructor`` takes
the first ```...``` span of the reply (no multi-line spans: the pattern has no DOTALL), maps
real-world URLs back to the local sites, and ``browser_env/actions.py``'s
``create_id_based_action`` turns it into an action. Quirks kept on purpose, because the paper's
numbers were measured with them:

* ``type [id] [text]`` without a trailing ``[0]``/``[1]`` presses Enter (``[1]`` is appended);
  Enter is sent as a newline at the end of the typed text;
* ``scroll`` accepts ``scroll [down]`` / ``scroll [up]`` (and ``scroll down``), but not the
  prompt's literal ``scroll [direction=down]``, which WebArena's pattern rejects;
* ``stop`` without brackets is a stop with an empty answer;
* the description shown as PREVIOUS ACTION (``get_action_description``) names the element's
  accessibility-tree line, reports an element id that was not on the page, or repeats an
  unparseable reply with WebArena's format reminder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

ACTION_SPLITTER = "```"
ANSWER_PHRASE = "In summary, the next action I will perform is"

# Playwright key names of WebArena's SPECIAL_KEY_MAPPINGS (lower-case alias -> name).
_KEY_NAMES = {k.lower(): k for k in (
    "Backquote", "Minus", "Equal", "Backslash", "Backspace", "Meta", "Tab", "Delete", "Escape",
    "ArrowDown", "End", "Enter", "Home", "Insert", "PageDown", "PageUp", "ArrowRight", "ArrowUp",
    "F1", "F2", "F3", "F4", "F5", "F6", "F7", "F8", "F9", "F10", "F11", "F12")}

KINDS = ("none", "click", "hover", "type", "press", "scroll", "goto", "new_tab", "go_back", "go_forward",
         "tab_focus", "close_tab", "stop")


class ActionParseError(ValueError):
    """The reply holds no action WebArena's parser accepts (an ``ActionTypes.NONE`` turn)."""


@dataclass
class Action:
    """One parsed action; ``kind`` is one of :data:`KINDS`."""

    kind: str
    element_id: str = ""
    text: str = ""  # typed text ("\\n" at the end = press Enter), key combination, URL or answer
    direction: str = ""
    tab: int = -1
    raw: str = ""  # the model's whole reply

    def equivalent(self, other: "Action") -> bool:
        """WebArena's ``is_equivalent``: same kind and the same target (typed text is ignored)."""
        if self.kind != other.kind:
            return False
        if self.kind in ("click", "hover", "type"):
            return bool(self.element_id) and self.element_id == other.element_id
        if self.kind == "scroll":
            return self.direction == other.direction
        if self.kind in ("press", "goto", "stop"):
            return self.text == other.text
        if self.kind == "tab_focus":
            return self.tab == other.tab
        return True  # none, new_tab, go_back, go_forward, close_tab


def extract_action(reply: str, url_to_local: Optional[Mapping[str, str]] = None) -> str:
    """The text between the first pair of ``` in ``reply`` (same line), URLs mapped to the local sites."""
    match = re.search(r"```(.*?)```", reply)
    if not match:
        raise ActionParseError(f'Cannot find the answer phrase "{ANSWER_PHRASE}" in "{reply}"')
    return map_urls(match.group(1), url_to_local or {})


def map_urls(text: str, mapping: Mapping[str, str]) -> str:
    """Replace every key of ``mapping`` found in ``text`` by its value (WebArena's URL mapping)."""
    for src, dst in mapping.items():
        if src and src in text:
            text = text.replace(src, dst)
    return text


def map_key_comb(key_comb: str) -> str:
    """``create_key_press_action``: lower-case special key names → Playwright's (``enter`` → ``Enter``)."""
    return "+".join(_KEY_NAMES.get(k.lower(), k) for k in key_comb.split("+"))


def parse_action(action_str: str, raw: str = "") -> Action:
    """``create_id_based_action``: one action from the text inside the ``` pair."""
    s = action_str.strip()
    if not s:
        raise ActionParseError("Invalid action (empty)")
    name = s.split("[")[0].strip() if "[" in s else s.split()[0].strip()

    def need(pattern: str) -> "re.Match[str]":
        m = re.search(pattern, s)
        if not m:
            raise ActionParseError(f"Invalid {name} action {s}")
        return m

    if name in ("click", "hover"):
        return Action(name, element_id=need(name + r" ?\[(\d+)\]").group(1), raw=raw)
    if name == "type":
        if not (s.endswith("[0]") or s.endswith("[1]")):
            s += " [1]"  # WebArena: Enter is pressed unless the model says [0]
        m = need(r"type ?\[(\d+)\] ?\[(.+)\] ?\[(\d+)\]")
        text = m.group(2) + ("\n" if m.group(3) == "1" else "")
        return Action("type", element_id=m.group(1), text=text, raw=raw)
    if name == "press":
        return Action("press", text=map_key_comb(need(r"press ?\[(.+)\]").group(1)), raw=raw)
    if name == "scroll":
        return Action("scroll", direction=need(r"scroll ?\[?(up|down)\]?").group(1), raw=raw)
    if name == "goto":
        return Action("goto", text=need(r"goto ?\[(.+)\]").group(1), raw=raw)
    if name in ("new_tab", "go_back", "go_forward", "close_tab"):
        return Action(name, raw=raw)
    if name == "tab_focus":
        return Action("tab_focus", tab=int(need(r"tab_focus ?\[(\d+)\]").group(1)), raw=raw)
    if name == "stop":
        m = re.search(r"stop ?\[(.+)\]", s)
        return Action("stop", text=m.group(1) if m else "", raw=raw)
    raise ActionParseError(f"Invalid action {s}")


def parse_reply(reply: str, url_to_local: Optional[Mapping[str, str]] = None) -> Action:
    """The action of a model reply; ``Action("none")`` when WebArena's parser would fail."""
    try:
        return parse_action(extract_action(reply, url_to_local), raw=reply)
    except ActionParseError:
        return Action("none", raw=reply)


# action2str's wording per kind ({line}: the element's line of the observation); a kind not listed
# (none, new_tab, close_tab, go_back, go_forward) is written as its name.
_ACTION_WORDING = {
    "click": "click [{a.element_id}] where [{a.element_id}] is {line}",
    "type": "type [{a.element_id}] [{a.text}] where [{a.element_id}] is {line}",
    "hover": "hover [{a.element_id}] where [{a.element_id}] is {line}",
    "scroll": "scroll [{a.direction}]",
    "press": "press [{a.text}]",
    "goto": "goto [{a.text}]",
    "tab_focus": "page_focus [{a.tab}]",  # WebArena's wording for this action
    "stop": "stop [{a.text}]",
}


def action_to_str(action: Action, element_line: str = "") -> str:
    """``action2str`` for the id-based action set (``where [id] is <element line>`` for element actions)."""
    wording = _ACTION_WORDING.get(action.kind)
    return wording.format(a=action, line=element_line) if wording else action.kind


def describe(action: Action, nodes: Mapping[str, Dict[str, Any]]) -> str:
    """``get_action_description``: the PREVIOUS ACTION line for the next prompt.

    ``nodes`` is the observation the action was chosen on (element id → node info with ``text``).
    """
    if action.kind in ("click", "hover", "type"):
        node = nodes.get(action.element_id)
        if node is None:
            return (f'Attempt to perfom "{action.kind}" on element "[{action.element_id}]" but no matching '
                    "element found. Please check the observation more carefully.")  # sic, WebArena's text
        return action_to_str(action, " ".join(str(node["text"]).split()[1:]))
    if action.kind == "none":
        return (f'The previous prediction you issued was "{action.raw}". However, the format was incorrect. '
                f"Ensure that the action is wrapped inside a pair of {ACTION_SPLITTER} and enclose arguments "
                f"within [] as follows: {ACTION_SPLITTER}action [arg] ...{ACTION_SPLITTER}.")
    return action_to_str(action)


def early_stop(actions: List[Action], max_steps: int, parsing_failure_th: int,
               repeating_action_th: int) -> str:
    """``run.py``'s ``early_stop`` after the actions taken so far: the reason, or "" to go on."""
    if len(actions) >= max_steps:
        return f"Reach max steps {max_steps}"
    k = parsing_failure_th
    if k and len(actions) >= k and all(a.kind == "none" for a in actions[-k:]):
        return f"Failed to parse actions for {k} times"
    k = repeating_action_th
    if not actions or not k:
        return ""
    last = actions[-1]
    if last.kind != "type":
        if len(actions) >= k and all(a.equivalent(last) for a in actions[-k:]):
            return f"Same action for {k} times"
    elif sum(a.equivalent(last) for a in actions) >= k:  # typing into one field k times, anywhere
        return f"Same typing action for {k} times"
    return ""
