"""Builds a small Freebase-shaped RDF graph in which the gold actions of real AgentBench KG tasks
run to their gold answers (the offline stand-in for Freebase in Virtuoso).

Everything is derived from the task records themselves (``data/agentbench/kg/{dev,std}.json``):

* the gold ``actions`` fix the graph's shape: ``get_neighbors(x, r)`` needs ``<x-member> r <y>``
  triples, ``intersection`` needs the answer in both inputs (each input also gets one member of
  its own, so the intersection really filters), ``argmax``/``argmin`` need attribute literals
  (the gold answer best, one other member worse), ``count(x)`` needs exactly N members;
* the ``answer`` list gives the final members (real mids; counts come from ``answer_argument``);
* the ``s_expression``'s outer operator (COUNT / ARGMAX / ARGMIN) must agree with the action
  that makes the last variable, else the task is not used;
* intermediate nodes the records do not name are made-up ids ``m.kgt_<hash>_<tag>``, named after
  the derivation they stand for, so identical derivations in two records share nodes.

Entities also get ``type.object.name``/``type.object.type`` triples (not in AgentBench's
vocabulary, so the tools must filter them out). URIs are Freebase's
(``http://rdf.freebase.com/ns/<id>``), as in the Virtuoso dump AgentBench queries.

All records' triples are merged into one graph (they share entities, as in Freebase); a record
is *held* when an independent set-based evaluation of its gold actions over the merged graph
(:func:`evaluate`, no SPARQL) gives exactly its gold answers. The ontology (AgentBench's
``vocab.json``/``fb_roles`` formats) is derived from the same records by ``kg_testonto.py``; the
graph also carries it as Freebase schema triples (``type.property.expected_type``), so the
environment can read it from the store as well. Which records AgentBench's tool rules accept
under that ontology is decided by :func:`agentbench_static_failure`.

Run as a script to write the graph for manual offline runs::

    python tests/serve/envs/kg_testgraph.py /tmp/kg_graph.nt /tmp/kg_ontology
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple, Union

from kg_testonto import Ontology, attribute_type, derive_ontology, schema_triples

DATA = pathlib.Path(__file__).resolve().parents[3] / "data" / "agentbench" / "kg"
NS = "http://rdf.freebase.com/ns/"
XSD = "http://www.w3.org/2001/XMLSchema#"
ENTITY = re.compile(r"^(m|f)\.[\w_]+$")
CREATES = ("get_neighbors", "intersection", "argmax", "argmin", "count")


@dataclass(frozen=True)
class Lit:
    """An RDF literal: lexical form plus a datatype IRI or a language tag."""

    value: str
    datatype: str = ""
    lang: str = ""

    def nt(self) -> str:
        text = json.dumps(self.value, ensure_ascii=False)  # N-Triples escapes are JSON's
        return text + (f"@{self.lang}" if self.lang else f"^^<{self.datatype}>" if self.datatype else "")


Obj = Union[str, Lit]
Triple = Tuple[str, str, Obj]


class Underivable(ValueError):
    """The record's gold actions cannot be turned into triples."""


def parse_actions(rec: dict) -> List[Tuple[str, List[str]]]:
    out = []
    for a in rec["actions"]:
        m = re.match(r"^\s*(\w+)\((.*)\)\s*$", a)
        if not m:
            raise Underivable(f"gold action {a!r} is not a call")
        out.append((m.group(1), [x.strip() for x in m.group(2).split(",")]))
    return out


def agentbench_static_failure(rec: dict, onto: Ontology) -> Optional[str]:
    """The first gold action AgentBench's tool rules refuse whatever the KB holds, or None: an
    argument neither ``#n`` nor an entity id, a relation/attribute outside the vocabulary or
    without a range type, an intersection of two different types."""
    types: List[str] = []

    def kind(arg: str) -> str:
        if arg.startswith("#"):
            return types[int(arg[1:])]
        if not ENTITY.match(arg):
            raise Underivable(f"{arg} is not an entity id")
        return "ENTITY"

    for i, (fn, args) in enumerate(parse_actions(rec)):
        try:
            if fn in ("get_relations", "get_attributes"):
                t = kind(args[0])
                if fn == "get_attributes" and t == "ENTITY":
                    return f"action {i}: get_attributes of an entity"
            elif fn == "get_neighbors":
                kind(args[0])
                if args[1] not in onto.relations:
                    return f"action {i}: relation {args[1]} not in the vocabulary"
                if args[1] not in onto.ranges:
                    return f"action {i}: relation {args[1]} has no range type"
                types.append(onto.ranges[args[1]])
            elif fn == "intersection":
                a, b = kind(args[0]), kind(args[1])
                if a != b or a == "ENTITY":
                    return f"action {i}: intersection of {a} and {b}"
                types.append(a)
            elif fn in ("argmax", "argmin"):
                t = kind(args[0])
                if args[1] not in onto.attributes:
                    return f"action {i}: attribute {args[1]} not in the vocabulary"
                types.append(t)
            elif fn == "count":
                kind(args[0])
                types.append("type.int")
            else:
                return f"action {i}: unknown tool {fn}"
        except Underivable as exc:
            return f"action {i}: {exc}"
    return None


def _syn(key: str, tag: str) -> str:
    return f"m.kgt_{hashlib.sha1(key.encode()).hexdigest()[:10]}_{tag}"


def _attr_values(attr: str, best: bool, op: str) -> Lit:
    high = best == (op == "argmax")  # argmax: the best value is the highest
    if attribute_type(attr) == "type.datetime":
        return Lit("2001-06-15" if high else "1987-03-02", XSD + "date")
    return Lit("250.5" if high else "12.25", XSD + "float")


def derive(rec: dict) -> Set[Triple]:
    """Triples that make the record's gold actions reach its gold answers."""
    steps = parse_actions(rec)
    made: List[Tuple[str, List[str], str]] = []  # per variable: tool, args, derivation key
    for fn, args in steps:
        for a in args[:1] + (args[1:] if fn == "intersection" else []):
            if a.startswith("#"):
                if int(a[1:]) >= len(made):
                    raise Underivable(f"{fn} uses {a} before it exists")
            elif not ENTITY.match(a):
                raise Underivable(f"argument {a} is not an entity id")
        if fn in CREATES:
            keys = [made[int(a[1:])][2] if a.startswith("#") else a for a in args]
            made.append((fn, args, f"({fn} {' '.join(keys)})"))
    if not made:
        raise Underivable("the gold actions make no variable")
    outer = rec["s_expression"].split()[0].lstrip("(")
    last_fn = made[-1][0]
    if (outer in ("COUNT", "ARGMAX", "ARGMIN")) != (last_fn in ("count", "argmax", "argmin")) or \
            (outer in ("COUNT", "ARGMAX", "ARGMIN") and outer.lower() != last_fn):
        raise Underivable(f"s_expression {outer} disagrees with the last action {last_fn}")
    gold = [a["answer_argument"] for a in rec["answer"]]
    required: Dict[int, List[str]] = defaultdict(list)
    triples: Set[Triple] = set()

    def need(var: int, nodes: List[str]) -> None:
        for n in nodes:
            if n not in required[var]:
                required[var].append(n)

    def members(arg: str, tag: str = "m0") -> List[str]:
        if not arg.startswith("#"):
            return [arg]
        var = int(arg[1:])
        if not required[var]:
            need(var, [_syn(made[var][2], tag)])
        return required[var]

    if last_fn == "count":
        if len(gold) != 1 or not gold[0].isdigit():
            raise Underivable(f"count answer {gold} is not one number")
        src = int(made[-1][1][0][1:])
        need(src, [_syn(made[src][2], f"c{i}") for i in range(int(gold[0]))])
    else:
        need(len(made) - 1, gold)
    for k in range(len(made) - 1, -1, -1):
        fn, args, key = made[k]
        if fn == "count":
            if k != len(made) - 1:
                raise Underivable("a count that is not the answer")
            continue
        out = members(f"#{k}")
        if fn == "get_neighbors":
            src = members(args[0])[0]
            triples |= {(src, args[1], o) for o in out}
        elif fn == "intersection":
            for side in args[:2]:
                own = _syn(made[int(side[1:])][2], "only")
                need(int(side[1:]), out + [own])
        else:  # argmax / argmin: the answers best, one other member worse
            var = int(args[0][1:])
            rest = _syn(made[var][2], "rest")
            need(var, out + [rest])
            triples |= {(o, args[1], _attr_values(args[1], True, fn)) for o in out}
            triples.add((rest, args[1], _attr_values(args[1], False, fn)))
    for name, mid in rec["entities"].items():
        if ENTITY.match(mid):
            triples.add((mid, "type.object.name", Lit(name, lang="en")))
            triples.add((mid, "type.object.type", "common.topic"))
    for a in rec["answer"]:
        if a.get("entity_name") and ENTITY.match(a["answer_argument"]):
            triples.add((a["answer_argument"], "type.object.name", Lit(a["entity_name"], lang="en")))
    return triples


def evaluate(rec: dict, index: Dict[Tuple[str, str], Set[Obj]]) -> Set[str]:
    """The gold actions' answer over ``index`` with plain set operations (no SPARQL), with
    AgentBench's answer semantics: the question's entities are never answers, except that a
    superlative keeps every member whose value equals the best value among the non-entities."""
    vals: List[Set[str]] = []
    ents: List[Set[str]] = []
    superlative = False

    def get(arg: str) -> Tuple[Set[str], Set[str]]:
        return (vals[int(arg[1:])], ents[int(arg[1:])]) if arg.startswith("#") else ({arg}, {arg})

    for fn, args in parse_actions(rec):
        superlative = fn in ("argmax", "argmin")
        if fn == "get_neighbors":
            src, e = get(args[0])
            vals.append({o for s in src for o in index.get((s, args[1]), ()) if isinstance(o, str)})
            ents.append(e)
        elif fn == "intersection":
            (a, ea), (b, eb) = get(args[0]), get(args[1])
            vals.append(a & b)
            ents.append(ea | eb)
        elif superlative:
            src, e = get(args[0])
            value = {s: [o.value for o in index.get((s, args[1]), ()) if isinstance(o, Lit)] for s in src}
            value = {s: (v[0] if "date" in args[1] else float(v[0])) for s, v in value.items() if v}
            candidates = [v for s, v in value.items() if s not in e]
            best = (max if fn == "argmax" else min)(candidates) if candidates else None
            vals.append({s for s, v in value.items() if v == best})
            ents.append(e)
        elif fn == "count":
            src, e = get(args[0])
            vals.append({str(len(src - e))})
            ents.append(set())
    return vals[-1] if superlative else vals[-1] - ents[-1]


@dataclass
class Graph:
    triples: Set[Triple] = field(default_factory=set)
    held: List[Tuple[str, int]] = field(default_factory=list)  # (split, index) reproduced exactly
    left_out: Dict[Tuple[str, int], str] = field(default_factory=dict)

    def write_nt(self, path: Union[str, pathlib.Path]) -> pathlib.Path:
        lines = []
        for s, p, o in sorted(self.triples, key=lambda t: (t[0], t[1], str(t[2]))):
            obj = o.nt() if isinstance(o, Lit) else f"<{NS}{o}>"
            lines.append(f"<{NS}{s}> <{NS}{p}> {obj} .")
        path = pathlib.Path(path)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path


def load_records(splits: Tuple[str, ...] = ("dev", "std")) -> Dict[Tuple[str, int], dict]:
    out = {}
    for split in splits:
        for i, rec in enumerate(json.loads((DATA / f"{split}.json").read_text())):
            out[(split, i)] = rec
    return out


def build(records: Dict[Tuple[str, int], dict], onto: Optional[Ontology] = None) -> Graph:
    """Merge the triples of every derivable record, then keep the records whose gold actions
    still reach exactly their gold answers over the merged graph (records share entities, so
    each one's neighbourhoods also hold the others' facts, as in Freebase). With ``onto``, its
    schema triples are added (their subjects are properties, never reached by the tools)."""
    graph = Graph()
    if onto is not None:
        graph.triples |= schema_triples(onto)
    facts: Dict[Tuple[str, str], Set[Obj]] = defaultdict(set)
    merged = []
    for key, rec in records.items():
        try:
            triples = derive(rec)
        except (Underivable, KeyError, ValueError) as exc:
            graph.left_out[key] = f"not derivable: {exc}"
            continue
        for s, p, o in triples:
            facts[(s, p)].add(o)
        graph.triples |= triples
        merged.append(key)
    for key in merged:
        gold = {a["answer_argument"] for a in records[key]["answer"]}
        got = evaluate(records[key], facts)
        if got == gold:
            graph.held.append(key)
        else:
            graph.left_out[key] = f"the merged graph gives {sorted(got)[:5]}, not the gold answer"
    return graph


if __name__ == "__main__":
    recs = load_records()
    ontology = derive_ontology(recs)
    g = build(recs, ontology)
    out = g.write_nt(sys.argv[1] if len(sys.argv) > 1 else "kg_graph.nt")
    onto_dir = ontology.write(sys.argv[2] if len(sys.argv) > 2 else "kg_ontology")
    print(f"{out}: {len(g.triples)} triples; {len(g.held)} tasks held, {len(g.left_out)} left out")
    print(f"{onto_dir}: {len(ontology.relations)} relations, {len(ontology.attributes)} attributes, "
          f"{len(ontology.ranges)} fb_roles lines")
    for k, why in g.left_out.items():
        print(" ", k, why)
