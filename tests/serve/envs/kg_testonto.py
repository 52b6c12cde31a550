"""Derives a Freebase ontology, in AgentBench's file formats, from the shipped KG task records.

AgentBench's ontology files (``vocab.json``, ``fb_roles``) are not shipped with this project, so
the offline tests write their own from ``data/agentbench/kg/{dev,std}.json``, using only what the
records say:

* **vocabulary**: the relations of the gold ``get_neighbors`` actions and of the
  ``s_expression`` joins are ``relations``; the attributes of the gold ``argmax``/``argmin`` are
  ``attributes``;
* **domain** of a property: its id without the last segment (Freebase names a property
  ``<domain type>.<key>``);
* **range** of a relation, by the first rule that gives one:

  1. ``reverse``: the gold actions and the ``s_expression`` describe the same logical form;
     aligned, a gold ``get_neighbors(x, r)`` meets either ``(JOIN (R r) x)`` or ``(JOIN r' x)``,
     and ``r'`` is then ``r``'s reverse twin, so range(r) = domain(r') and range(r') = domain(r);
  2. ``class``: the ``s_expression`` constrains r's objects by a class, ``(AND <class> ...)``;
  3. ``next``: the gold path goes on from r's objects with relation r2 or compares attribute a
     on them, so they are instances of domain(r2) / domain(a);
  4. ``intersection``: the gold path intersects r's objects with a variable whose type is known
     (repeated until nothing changes);

  a relation no rule covers gets no ``fb_roles`` line, so AgentBench (and the environment)
  refuses ``get_neighbors`` over it;
* attributes get the range of the literals the test graph gives them: ``type.datetime`` when the
  name says ``date``, else ``type.float``.

Checked once by hand against AgentBench's real ``fb_roles`` (not part of the tests): the
``reverse`` and ``class`` rules agree with it on every relation they cover.
"""

from __future__ import annotations

import json
import pathlib
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set, Tuple, Union

ENTITY = re.compile(r"^(m|f)\.[\w_]+$")
NODE = re.compile(r"^(m|g|f)\.")  # an s-expression leaf that is an id, not a class
SExpr = Union[str, List[Any]]
Form = Union[str, Tuple[Any, ...]]  # an entity id, or ("JOIN", r, src) / ("AND", a, b) / (OP, src, attr)
RULES = ("reverse", "class", "next", "intersection")


@dataclass
class Ontology:
    relations: Set[str]
    attributes: Set[str]
    ranges: Dict[str, str]  # relation or attribute -> range type
    rule: Dict[str, str] = field(default_factory=dict)  # relation -> the rule that gave its range

    def write(self, directory: Union[str, pathlib.Path]) -> pathlib.Path:
        """``vocab.json`` and ``fb_roles`` as AgentBench ships them, in ``directory``."""
        out = pathlib.Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        vocab = {"relations": sorted(self.relations), "attributes": sorted(self.attributes)}
        (out / "vocab.json").write_text(json.dumps(vocab, indent=1) + "\n", encoding="utf-8")
        lines = [f"{domain(p)} {p} {t}" for p, t in sorted(self.ranges.items())]
        (out / "fb_roles").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return out


def domain(prop: str) -> str:
    return prop.rsplit(".", 1)[0]


def attribute_type(attr: str) -> str:
    """The range of an attribute, matching the literal the test graph stores for it."""
    return "type.datetime" if "date" in attr else "type.float"


def parse_sexpr(text: str) -> SExpr:
    tokens = re.findall(r"\(|\)|[^\s()]+", text)
    pos = 0

    def node() -> SExpr:
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        if tok != "(":
            return tok
        items = []
        while tokens[pos] != ")":
            items.append(node())
        pos += 1
        return items

    tree = node()
    if pos != len(tokens):
        raise ValueError(f"trailing tokens in {text!r}")
    return tree


def _calls(rec: dict) -> List[Tuple[str, List[str]]]:
    out = []
    for a in rec["actions"]:
        m = re.match(r"^\s*(\w+)\((.*)\)\s*$", a)
        if m:
            out.append((m.group(1), [x.strip() for x in m.group(2).split(",")]))
    return out


def action_forms(rec: dict) -> List[Form]:
    """The logical form of every variable the gold actions make, in order."""
    made: List[Form] = []

    def ref(arg: str) -> Form:
        return made[int(arg[1:])] if arg.startswith("#") else arg

    for fn, args in _calls(rec):
        if fn == "get_neighbors":
            made.append(("JOIN", args[1], ref(args[0])))
        elif fn == "intersection":
            made.append(("AND", ref(args[0]), ref(args[1])))
        elif fn in ("argmax", "argmin"):
            made.append((fn.upper(), ref(args[0]), args[1]))
        elif fn == "count":
            made.append(("COUNT", ref(args[0])))
    return made


def align(form: Form, sx: SExpr, cls: Optional[str], found: List[Tuple[str, str, str]]) -> bool:
    """Whether the gold form and the s-expression match; appends (relation, rule, evidence)."""
    # (AND <class> X) constrains X's members; the actions have no class filter, so skip it
    while isinstance(sx, list) and sx[0] == "AND" and isinstance(sx[1], str) and not NODE.match(sx[1]):
        cls, sx = sx[1], sx[2]
    if isinstance(form, str):
        return form == sx
    if not isinstance(sx, list):
        return False
    op = form[0]
    if op == "JOIN" and sx[0] == "JOIN":
        rel = sx[1]
        same = isinstance(rel, list) and rel == ["R", form[1]]
        if not (same or isinstance(rel, str)) or not align(form[2], sx[2], None, found):
            return False
        if not same:
            found.append((form[1], "reverse", str(rel)))
        if cls:
            found.append((form[1], "class", cls))
        return True
    if op == "AND" and sx[0] == "AND":
        for left, right in ((sx[1], sx[2]), (sx[2], sx[1])):
            trial: List[Tuple[str, str, str]] = []
            if align(form[1], left, cls, trial) and align(form[2], right, cls, trial):
                found.extend(trial)
                return True
        return False
    if op in ("ARGMAX", "ARGMIN") and sx[0] == op:
        return form[2] == sx[2] and align(form[1], sx[1], None, found)
    if op == "COUNT" and sx[0] == "COUNT":
        return align(form[1], sx[1], None, found)
    return False


def _sexpr_relations(sx: SExpr) -> Set[str]:
    if not isinstance(sx, list):
        return set()
    out: Set[str] = set()
    if sx and sx[0] == "JOIN":
        rel = sx[1]
        out.add(rel[1] if isinstance(rel, list) else rel)
    for child in sx[1:]:
        out |= _sexpr_relations(child)
    return out


def _most_common(counts: Counter) -> str:
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]


def derive_ontology(records: Dict[Tuple[str, int], dict]) -> Ontology:
    relations: Set[str] = set()
    attributes: Set[str] = set()
    evidence: Dict[str, Dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    for rec in records.values():
        calls = _calls(rec)
        relations |= {args[1] for fn, args in calls if fn == "get_neighbors"}
        attributes |= {args[1] for fn, args in calls if fn in ("argmax", "argmin")}
        forms = action_forms(rec)
        sx = parse_sexpr(rec["s_expression"])
        relations |= _sexpr_relations(sx)
        found: List[Tuple[str, str, str]] = []
        if forms and align(forms[-1], sx, None, found):
            for rel, rule, what in found:
                if rule == "reverse":
                    evidence[rel]["reverse"][domain(what)] += 1
                    evidence[what]["reverse"][domain(rel)] += 1
                else:
                    evidence[rel][rule][what] += 1
        for form in forms:  # rule "next": what the path does with a join's objects
            if form[0] != "JOIN":
                continue
            for later in forms:
                if later[0] == "JOIN" and later[2] == form:
                    evidence[form[1]]["next"][domain(later[1])] += 1
                elif later[0] in ("ARGMAX", "ARGMIN") and later[1] == form:
                    evidence[form[1]]["next"][domain(later[2])] += 1
    relations -= attributes
    ranges: Dict[str, str] = {}
    rule_of: Dict[str, str] = {}
    for rule in RULES[:3]:
        for rel in sorted(relations):
            if rel not in ranges and evidence[rel][rule]:
                ranges[rel], rule_of[rel] = _most_common(evidence[rel][rule]), rule
    changed = True
    while changed:  # rule "intersection", to a fixed point
        changed = False
        for rec in records.values():
            for form in action_forms(rec):
                if form[0] != "AND":
                    continue
                sides = [f for f in form[1:] if not isinstance(f, str)]
                types = [_form_type(f, ranges) for f in sides]
                for f, t in zip(sides, types):
                    other = [u for u in types if u]
                    if t is None and other and f[0] == "JOIN" and f[1] not in ranges:
                        ranges[f[1]], rule_of[f[1]] = other[0], "intersection"
                        changed = True
    for attr in attributes:
        ranges[attr] = attribute_type(attr)
    return Ontology(relations, attributes, ranges, rule_of)


def _form_type(form: Form, ranges: Dict[str, str]) -> Optional[str]:
    """The type AgentBench gives the variable of ``form``: a join's range, else its input's."""
    if isinstance(form, str):
        return None
    if form[0] == "JOIN":
        return ranges.get(form[1])
    if form[0] == "COUNT":
        return "type.int"
    return _form_type(form[1], ranges)


def schema_triples(onto: Ontology) -> Set[Tuple[str, str, str]]:
    """Freebase's schema for the ontology, as a store holds it: ``<p> type.property.expected_type
    <range>``, plus the two meta predicates the test graph uses (which are not relations)."""
    out = {(p, "type.property.expected_type", t) for p, t in onto.ranges.items()}
    out.add(("type.object.name", "type.property.expected_type", "type.text"))
    out.add(("type.object.type", "type.property.expected_type", "type.type"))
    return out
