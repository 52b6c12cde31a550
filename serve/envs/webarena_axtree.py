"""WebArena's accessibility-tree observation, computed from two Chrome DevTools Protocol replies.

Follows ``TextObervationProcessor`` of AgentTuning's copy of WebArena
(``browser_env/processors.py``, observation type ``accessibility_tree`` with
``current_viewport_only``), as pure functions over

* ``DOMSnapshot.captureSnapshot`` (``includeDOMRects``): each DOM node's layout box, from which
  the union box of its layout subtree is computed;
* ``Accessibility.getFullAXTree``: the nodes printed, one per line, ``[<AX node id>] <role>
  '<name>' <property>: <value> ...``, indented with tabs by depth.

A node is printed unless it has no role/name, or it is a nameless, property-less generic/img/
list/strong/paragraph/banner/navigation/Section/LabelText/Legend/listitem (or a nameless listitem
with properties); its children are printed either way. Only nodes whose subtree box meets the
window (``pageXOffset``/``pageYOffset`` + screen size) are kept, and the tree is read from the
first kept node. StaticText lines whose text already appears in one of the three lines above are
dropped (so are StaticText lines whose name holds a ``'``, as WebArena's pattern misses them).

Two adjustments for today's Chromium, which WebArena's 2023 Chromium did not need: the
``InlineTextBox`` children that Chromium now reports under every StaticText (Chromium change of
October 2023, crbug.com/1492122) and the ``url`` property it now reports on links and the root
are dropped, and its ``image`` role (ARIA 1.3's name) is printed as ``img``, so the text matches
what the paper's models saw.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

# WebArena's IGNORED_ACTREE_PROPERTIES, plus "url" (see the module docstring).
IGNORED_PROPERTIES = frozenset({"focusable", "editable", "readonly", "level", "settable", "multiline", "invalid",
                                "url"})
HIDDEN_WHEN_EMPTY = frozenset({"generic", "img", "list", "strong", "paragraph", "banner", "navigation", "Section",
                               "LabelText", "Legend", "listitem"})
DROPPED_ROLES = frozenset({"InlineTextBox"})
RENAMED_ROLES = {"image": "img"}  # Chromium now follows ARIA 1.3's name; WebArena's Chromium said "img"
_STATIC_TEXT = re.compile(r"\[\d+\] StaticText '([^']+)'")

Box = List[float]  # [x, y, width, height] in document (CSS pixel) coordinates


@dataclass
class Window:
    """The visible part of the page: ``left``/``top`` = scroll offsets, ``width``/``height`` = screen size."""

    left: float
    top: float
    width: float
    height: float

    def meets(self, box: Box) -> bool:
        """WebArena's ``partially_in_viewport`` test."""
        x, y, w, h = box
        return x < self.left + self.width and x + w >= self.left and y < self.top + self.height and y + h >= self.top


def _valid(box: Optional[Box]) -> bool:
    return box is not None and abs(box[2]) > 1e-8 and abs(box[3]) > 1e-8


def layout_boxes(snapshot: Dict[str, Any]) -> Dict[int, Tuple[Box, Box]]:
    """Backend DOM node id → (own layout box, union box of its layout subtree), main document only.

    As WebArena's ``retrieve_viewport_info``: the union covers the node's box and its children's
    unions, ignoring empty boxes ([0, 0, 0, 0] when all are empty); a node without a layout box
    has no union and hides its whole subtree from the union computation.
    """
    doc = snapshot["documents"][0]
    nodes, layout = doc["nodes"], doc["layout"]
    parent: Sequence[int] = nodes["parentIndex"]
    backend: Sequence[int] = nodes["backendNodeId"]
    cursor: Dict[int, int] = {}
    for i, node_index in enumerate(layout["nodeIndex"]):
        cursor.setdefault(node_index, i)  # WebArena takes the first layout entry of a node
    bounds = layout["bounds"]
    n = len(parent)
    # Reached from the document root through layout nodes only (nodes come in document order).
    reached = [False] * n
    children: Dict[int, List[int]] = {}
    for idx in range(n):
        p = parent[idx]
        if p == -1:
            reached[idx] = idx in cursor
        else:
            children.setdefault(p, []).append(idx)
            reached[idx] = idx in cursor and reached[p]
    union: Dict[int, Box] = {}
    for idx in range(n - 1, -1, -1):  # children before parents
        if not reached[idx]:
            continue
        boxes = [b for b in [list(bounds[cursor[idx]])] + [union.get(c) for c in children.get(idx, [])] if _valid(b)]
        if boxes:
            left = min(b[0] for b in boxes)
            top = min(b[1] for b in boxes)
            right = max(b[0] + b[2] for b in boxes)
            bottom = max(b[1] + b[3] for b in boxes)
            union[idx] = [left, top, right - left, bottom - top]
        else:
            union[idx] = [0.0, 0.0, 0.0, 0.0]
    return {backend[idx]: (list(bounds[cursor[idx]]), union[idx]) for idx in union}


def attach_boxes(ax_nodes: Sequence[Dict[str, Any]], boxes: Dict[int, Tuple[Box, Box]]) -> List[Dict[str, Any]]:
    """AX nodes (deduplicated, InlineTextBox dropped) with ``bound``/``union_bound`` set.

    A node whose DOM node has no layout box borrows the boxes of its nearest ancestor that has a
    union box (WebArena's refinement step).
    """
    seen, nodes = set(), []
    for node in ax_nodes:
        if node["nodeId"] in seen or _role(node) in DROPPED_ROLES:
            continue
        seen.add(node["nodeId"])
        nodes.append(dict(node))
    by_id = {n["nodeId"]: n for n in nodes}
    parents = {n["nodeId"]: n.get("parentId") for n in nodes}
    refine = []
    for node in nodes:
        backend = node.get("backendDOMNodeId")
        if backend is None:
            node["bound"] = node["union_bound"] = None
        elif backend in boxes:
            node["bound"], node["union_bound"] = boxes[backend]
        else:
            refine.append(node)
    for node in refine:
        ancestor, cur = None, node["nodeId"]
        while parents.get(cur) in by_id:
            cur = parents[cur]
            ancestor = by_id[cur]
            if ancestor.get("union_bound") is not None:
                break
        node["bound"] = ancestor.get("bound") if ancestor else None
        node["union_bound"] = ancestor.get("union_bound") if ancestor else None
    return nodes


def in_window(nodes: Sequence[Dict[str, Any]], window: Window) -> List[Dict[str, Any]]:
    """``current_viewport_accessibility_tree``: the nodes whose union box meets the window."""
    return [n for n in nodes if n.get("union_bound") and window.meets(n["union_bound"])]


def _role(node: Dict[str, Any]) -> Optional[str]:
    role = node.get("role")
    return role.get("value") if isinstance(role, dict) else None


def _line(node: Dict[str, Any]) -> Optional[str]:
    """The node's printed line, or None when WebArena hides it."""
    role, name = _role(node), node.get("name")
    role = RENAMED_ROLES.get(role, role) if role is not None else None
    if role is None or not isinstance(name, dict) or "value" not in name:
        return None
    name = name["value"]
    props = []
    for prop in node.get("properties") or []:
        value = prop.get("value")
        if prop.get("name") in IGNORED_PROPERTIES or not isinstance(value, dict) or "value" not in value:
            continue
        props.append(f"{prop['name']}: {value['value']}")  # Python's str(): True/False, as WebArena prints
    line = f"[{node['nodeId']}] {role} {name!r}"
    if props:
        line += " " + " ".join(props)
    if not str(name).strip():
        if (not props and role in HIDDEN_WHEN_EMPTY) or (props and role == "listitem"):
            return None
    return line


def render(nodes: Sequence[Dict[str, Any]]) -> Tuple[str, Dict[str, Dict[str, Any]]]:
    """``parse_accessibility_tree`` + ``clean_accesibility_tree``: (tree text, id → node info)."""
    if not nodes:
        return "", {}
    by_id = {n["nodeId"]: n for n in nodes}
    lines: List[str] = []
    info: Dict[str, Dict[str, Any]] = {}
    stack: List[Tuple[str, int]] = [(nodes[0]["nodeId"], 0)]
    while stack:
        node_id, depth = stack.pop()
        node = by_id[node_id]
        line = _line(node)
        if line is not None:
            lines.append("\t" * depth + line)
            info[str(node_id)] = {"backend_id": node.get("backendDOMNodeId"), "bound": node.get("bound"),
                                  "union_bound": node.get("union_bound"), "text": line}
        child_depth = depth + 1 if line is not None else depth
        for child in reversed([c for c in node.get("childIds") or [] if c in by_id]):
            stack.append((child, child_depth))
    return clean("\n".join(lines)), info


def clean(tree: str) -> str:
    """Drop StaticText lines repeating text from the three lines above (and unmatched ones)."""
    kept: List[str] = []
    for line in tree.split("\n"):
        if "statictext" in line.lower():
            m = _STATIC_TEXT.search(line)
            if m and all(m.group(1) not in prev for prev in kept[-3:]):
                kept.append(line)
        else:
            kept.append(line)
    return "\n".join(kept)


def element_center(node: Dict[str, Any], window: Window) -> Optional[Tuple[float, float]]:
    """Viewport coordinates of the centre of a node's own box (where WebArena clicks)."""
    box = node.get("bound")
    if not box:
        return None
    x, y, w, h = box
    return (x - window.left) + w / 2, (y - window.top) + h / 2
