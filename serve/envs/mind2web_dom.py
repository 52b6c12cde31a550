"""Mind2Web's text view of a web page for one multiple-choice question (own implementation).

A Mind2Web step carries ``cleaned_html``: the page as well-formed XML in which every element
has a ``backend_node_id`` attribute and visible text sits in ``<text>`` elements. A question
about a few candidate elements shows a *pruned* page and the candidates as choices. This module
follows the algorithm of Mind2Web's ``data_utils/dom_utils.py`` (``prune_tree`` and
``get_tree_repr``, used unchanged by AgentBench's Mind2Web task) with the standard library's
ElementTree instead of lxml, so the rendered text is the one models trained on AgentInstruct saw:

* **pruning** keeps each candidate, its ancestors, its descendants down to 5 levels (at most 50)
  and up to 3 siblings on each side; every other element goes, ids stay only on candidates,
  and elements left with no attributes, no text and at most one child are unwrapped;
* **rendering** replaces attributes by a ``meta`` summary of the salient ones (lower-cased,
  words shorter than 15 characters, 5 words per attribute, 20 in all, no URLs) and the candidate
  ids by their index, then writes tags as ``<button id=0 book a table> Book </button>``;
* **choices** are the candidates in document order, each shown as the first 10 words of its own
  rendering; letters start at ``B`` (``A`` is "None of the above").
"""

from __future__ import annotations

import copy
import re
import xml.etree.ElementTree as ET
from typing import Dict, List, Sequence, Tuple

ID = "backend_node_id"
MAX_DEPTH = 5  # descendants kept below a candidate
MAX_CHILDREN = 50  # of which at most this many
MAX_SIBLING = 3  # siblings kept on each side of a candidate
TEXT_WORDS = 20  # words kept of a text node
META_WORDS = 20  # words kept of an element's attribute summary
ATTR_WORDS = 5  # words kept of one attribute value
CHOICE_WORDS = 10  # words of a choice's text

# Attributes summarised into "meta", in this order (Mind2Web's list).
META_ATTRS = (
    "role", "aria_role", "type", "alt", "aria_description", "aria_label", "label", "title", "name",
    "text_value", "value", "placeholder", "input_checked", "input_value", "option_selected", "class",
)
UNINFORMATIVE = {"hidden", "none", "presentation", "null", "undefined"}
UNESCAPE = (
    ("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">"), ("&nbsp;", " "),
    ("&ndash;", "-"), ("&rsquo;", "'"), ("&lsquo;", "'"), ("&ldquo;", '"'), ("&rdquo;", '"'),
    ("&#39;", "'"), ("&#40;", "("), ("&#41;", ")"),
)

Choice = Tuple[str, str]  # (backend_node_id, shown text)


def parse_page(html: str) -> ET.Element:
    """The page's element tree; ``ValueError`` naming the parser's complaint if it is not XML."""
    try:
        return ET.fromstring(html)
    except ET.ParseError as exc:
        raise ValueError(f"cleaned_html is not well-formed XML: {exc}") from None


def _parent_map(root: ET.Element) -> Dict[ET.Element, ET.Element]:
    return {child: parent for parent in root.iter() for child in parent}


def _descendants(node: ET.Element, max_depth: int, depth: int = 0) -> List[ET.Element]:
    """Pre-order descendants of ``node`` down to ``max_depth`` levels below its children."""
    if depth > max_depth:
        return []
    out: List[ET.Element] = []
    for child in node:
        out.append(child)
        out.extend(_descendants(child, max_depth, depth + 1))
    return out


def _kept_ids(root: ET.Element, candidate_ids: Sequence[str]) -> set:
    """Ids of the elements that stay around the candidates ("" stands for elements without id)."""
    parents = _parent_map(root)
    first: Dict[str, ET.Element] = {}
    for el in root.iter():
        first.setdefault(el.get(ID, ""), el)
    keep = set()
    for cid in candidate_ids:
        node = first.get(cid)
        if node is None:
            raise KeyError(f"no element with backend_node_id={cid!r} in cleaned_html")
        keep.add(cid)
        up = parents.get(node)
        while up is not None:
            keep.add(up.get(ID, ""))
            up = parents.get(up)
        keep.update([d.get(ID, "") for d in _descendants(node, MAX_DEPTH)][:MAX_CHILDREN])
        parent = parents.get(node)
        if parent is not None:
            siblings = [s for s in parent if s.tag != "text"]
            if node in siblings:
                i = siblings.index(node)
                keep.update(s.get(ID, "") for s in siblings[max(0, i - MAX_SIBLING): i + MAX_SIBLING + 1])
    return keep


def prune(root: ET.Element, candidate_ids: Sequence[str]) -> ET.Element:
    """A pruned copy of the page around ``candidate_ids`` (see the module docstring)."""
    keep = _kept_ids(root, candidate_ids)
    candidates = set(candidate_ids)
    tree = copy.deepcopy(root)
    parents = _parent_map(tree)
    # Bottom-up (reverse document order): children are settled before their parent, and the
    # parent links of elements not yet visited never change.
    for node in reversed(list(tree.iter())):
        parent = parents.get(node)
        owner = node if node.tag != "text" else parent  # a text node belongs to its element
        nid = owner.get(ID, "") if owner is not None else ""
        if nid not in keep and parent is not None:
            parent.remove(node)
            continue
        if nid not in candidates or node.tag == "text":
            node.attrib.pop(ID, None)
        if (parent is not None and node.tag != "text" and not node.attrib and len(node) <= 1
                and not any(child.tag == "text" for child in node)):
            at = list(parent).index(node)
            for offset, child in enumerate(list(node)):
                parent.insert(at + offset, child)
            parent.remove(node)
    return tree


def _meta(node: ET.Element) -> str:
    seen: set = set()
    parts: List[str] = []
    for attr in META_ATTRS:
        value = node.get(attr)
        if value is None:
            continue
        value = value.lower()
        if value in UNINFORMATIVE or value.startswith("http"):
            continue
        value = " ".join([w for w in value.split() if len(w) < 15][:ATTR_WORDS])
        if value and value not in seen:
            seen.add(value)
            parts.append(value)
    return " ".join(" ".join(parts).split()[:META_WORDS])


def render(tree: ET.Element, id_map: Dict[str, int]) -> str:
    """Mind2Web's one-line rendering of ``tree``; candidate ids are numbered through ``id_map``
    (shared between the page and its choices, filled in document order)."""
    tree = copy.deepcopy(tree)
    for node in tree.iter():
        if node.tag == "text":
            node.text = " ".join((node.text or "").split()[:TEXT_WORDS])
            continue
        uid = node.get(ID)
        if uid is not None:
            uid = str(id_map.setdefault(uid, len(id_map)))
        meta = _meta(node)
        node.attrib.clear()
        if uid:
            node.set("id", uid)
        if meta:
            node.set("meta", meta)
    # ElementTree writes empty elements as "<x />", lxml (whose output Mind2Web post-processes)
    # as "<x/>"; align first so the replacements below give the same text.
    text = ET.tostring(tree, encoding="unicode").replace(" />", "/>")
    text = text.replace('"', " ").replace("meta= ", "").replace("id= ", "id=").replace(" >", ">")
    text = re.sub(r"<text>(.*?)</text>", r"\1", text)
    for escaped, plain in UNESCAPE:
        text = text.replace(escaped, plain)
    return re.sub(r"\s+", " ", text).strip()


def page_and_choices(root: ET.Element, candidate_ids: Sequence[str]) -> Tuple[str, List[Choice]]:
    """The pruned page's rendering and its choices ``[(backend_node_id, text)]`` in page order."""
    tree = prune(root, candidate_ids)
    id_map: Dict[str, int] = {}
    page = render(tree, id_map)
    choices = [(el.get(ID), " ".join(render(el, id_map).split()[:CHOICE_WORDS]))
               for el in tree.iter() if el.get(ID) is not None]
    return page, choices


def question(page: str, choices: Sequence[Choice], task: str, previous: Sequence[str]) -> str:
    """AgentBench's multiple-choice question (its wording), page in a ''' block."""
    history = "\n".join(previous) if previous else "None"
    lines = [f"{chr(ord('B') + i)}. {text}" for i, (_, text) in enumerate(choices)]
    return (
        f"'''\n{page}\n'''\n\n"
        "Based on the HTML webpage above, try to complete the following task:\n"
        f"Task: {task}\n"
        f"Previous actions:\n{history}\n"
        "What should be the next action? Please select from the following choices "
        "(If the correct action is not in the page above, please select A. 'None of the above'):\n\n"
        "A. None of the above\n" + "".join(line + "\n" for line in lines)
    )
