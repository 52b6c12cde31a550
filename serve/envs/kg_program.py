"""Knowledge-graph variables as logical forms, and their SPARQL.

AgentBench's KG tools (``src/tasks/knowledgegraph/api.py`` in THUDM/AgentTuning's
``AgentBench.old``) never materialise a variable: each ``#n`` is the logical form (s-expression)
that derives it, e.g. ``get_neighbors(m.0zd6, computer.computer.includes_models)`` makes
``(JOIN (R computer.computer.includes_models) m.0zd6)``. The KB is queried only where a tool needs
it: the predicates leaving a variable's members (``get_relations``/``get_attributes``) and the
final answer. This module compiles those forms to SPARQL 1.1 with the same graph patterns as
AgentBench's ``lisp_to_sparql`` (GrailQA's converter):

* members of a form bind ``?x``; ``JOIN (R r) s`` is ``<s-member> r ?x``; ``AND`` shares ``?x``;
* answers exclude the form's own entities (``FILTER (?x != e)``) and non-English literals;
* ``ARGMAX``/``ARGMIN`` keep every member whose attribute equals the best value, found by an
  ordered ``LIMIT 1`` sub-select (ties all come back, as in AgentBench);
* ``COUNT`` is ``COUNT(DISTINCT ?x)``.

Written from scratch; deviations in syntax only: full IRIs instead of ``ns:`` prefixed names
(pyoxigraph 0.5 rejects prefixed names with two dots, e.g. ``ns:type.object.type``) and
``SELECT (COUNT(DISTINCT ?x) AS ?count)`` instead of Virtuoso's non-standard
``SELECT COUNT DISTINCT ?x``, and ``||`` for Virtuoso's ``OR`` in filters. Virtuoso accepts the
standard forms used here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Set

NS = "http://rdf.freebase.com/ns/"
# AgentBench's test for a raw entity argument (api.py): a Freebase mid-like id.
ENTITY_ID = re.compile(r"^(m|f)\.[\w_]+$")
# Characters that cannot appear inside <...> in SPARQL; names come from the ontology or pass
# ENTITY_ID, this is the last line of defence against query injection.
_IRI_UNSAFE = re.compile(r'[\s<>"{}|\\^`]')
LANG_FILTER = "FILTER (!isLiteral(?x) || lang(?x) = '' || langMatches(lang(?x), 'en'))"


class ProgramError(ValueError):
    """A tool was applied to a variable it cannot take (e.g. a count used as a set)."""


def iri(name: str) -> str:
    """``<http://rdf.freebase.com/ns/name>``; ProgramError for a name that is not IRI-safe."""
    if not name or _IRI_UNSAFE.search(name):
        raise ProgramError(f"{name!r} is not a Freebase id")
    return f"<{NS}{name}>"


# ---------------------------------------------------------------------- logical forms


class Program:
    """A logical form; ``lisp()`` is AgentBench's s-expression spelling (``R`` for reverse)."""

    def lisp(self) -> str:
        raise NotImplementedError

    def entities(self) -> Set[str]:
        raise NotImplementedError


@dataclass(frozen=True)
class Entity(Program):
    mid: str

    def lisp(self) -> str:
        return self.mid

    def entities(self) -> Set[str]:
        return {self.mid}


@dataclass(frozen=True)
class Join(Program):
    """Objects of ``relation`` whose subject is a member of ``source`` (get_neighbors)."""

    relation: str
    source: Program

    def lisp(self) -> str:
        return f"(JOIN (R {self.relation}) {self.source.lisp()})"

    def entities(self) -> Set[str]:
        return self.source.entities()


@dataclass(frozen=True)
class And(Program):
    left: Program
    right: Program

    def lisp(self) -> str:
        return f"(AND {self.left.lisp()} {self.right.lisp()})"

    def entities(self) -> Set[str]:
        return self.left.entities() | self.right.entities()


@dataclass(frozen=True)
class Count(Program):
    source: Program

    def lisp(self) -> str:
        return f"(COUNT {self.source.lisp()})"

    def entities(self) -> Set[str]:
        return self.source.entities()


@dataclass(frozen=True)
class Superlative(Program):
    """``op`` is ARGMAX or ARGMIN over ``attribute`` of the members of ``source``."""

    op: str
    source: Program
    attribute: str

    def lisp(self) -> str:
        return f"({self.op} {self.source.lisp()} {self.attribute})"

    def entities(self) -> Set[str]:
        return self.source.entities()


# ---------------------------------------------------------------------- SPARQL


class _Fresh:
    """Fresh SPARQL variable names within one query."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, stem: str = "v") -> str:
        self.n += 1
        return f"{stem}{self.n}"


def _pattern(p: Program, var: str, fresh: _Fresh) -> List[str]:
    """Graph patterns binding ``?var`` to the members of ``p``."""
    if isinstance(p, Join):
        if isinstance(p.source, Entity):
            return [f"{iri(p.source.mid)} {iri(p.relation)} ?{var} ."]
        src = fresh()
        return _pattern(p.source, src, fresh) + [f"?{src} {iri(p.relation)} ?{var} ."]
    if isinstance(p, And):
        return _pattern(p.left, var, fresh) + _pattern(p.right, var, fresh)
    if isinstance(p, Superlative):  # nested inside a bigger form: a sub-select projecting ?var
        return ["{ " + _superlative(p, var, fresh, filters=[]) + " }"]
    if isinstance(p, Count):
        raise ProgramError("a count is a number, not a set of entities")
    raise ProgramError("an entity is not a variable")


def _entity_filters(p: Program, var: str) -> List[str]:
    return [f"FILTER (?{var} != {iri(e)})" for e in sorted(p.entities())]


def _superlative(p: Superlative, var: str, fresh: _Fresh, filters: List[str]) -> str:
    # AgentBench's shape: the outer pattern binds every member with its value; the inner
    # sub-select finds the best value (ordered, LIMIT 1) and joins back on it, so ties all stay.
    sk = fresh("sk")
    body = " ".join(_pattern(p.source, var, fresh) + [f"?{var} {iri(p.attribute)} ?{sk} ."])
    order = f"DESC(?{sk})" if p.op == "ARGMAX" else f"?{sk}"
    lang = LANG_FILTER.replace("?x", f"?{var}")
    inner = f"SELECT ?{sk} WHERE {{ {lang} {body} {' '.join(filters)} }} ORDER BY {order} LIMIT 1"
    return f"SELECT DISTINCT ?{var} WHERE {{ {body} {{ {inner} }} }}"


def answer_query(p: Program) -> str:
    """The query whose single column is the answer set of ``p`` (AgentBench's final_execute)."""
    fresh = _Fresh()
    if isinstance(p, Superlative):
        return _superlative(p, "x", fresh, _entity_filters(p, "x"))
    if isinstance(p, Count):
        body = " ".join([LANG_FILTER] + _pattern(p.source, "x", fresh) + _entity_filters(p, "x"))
        return f"SELECT (COUNT(DISTINCT ?x) AS ?count) WHERE {{ {body} }}"
    body = " ".join([LANG_FILTER] + _pattern(p, "x", fresh) + _entity_filters(p, "x"))
    return f"SELECT DISTINCT ?x WHERE {{ {body} }}"


def predicates_query(p: Program) -> str:
    """The predicates leaving the members of ``p`` (get_relations / get_attributes)."""
    if isinstance(p, Entity):
        if not ENTITY_ID.match(p.mid):
            raise ProgramError(f"{p.mid!r} is not an entity id")
        return (f"SELECT DISTINCT ?rel WHERE {{ {iri(p.mid)} ?rel ?obj . "
                f"FILTER (STRSTARTS(STR(?rel), \"{NS}\")) }}")
    if isinstance(p, Count):
        raise ProgramError("a count is a number, not a set of entities")
    return f"SELECT DISTINCT ?rel WHERE {{ ?x ?rel ?obj . {{ {answer_query(p)} }} }}"


def term_value(value: str) -> str:
    """A result value as AgentBench reports it: the Freebase id without the namespace, and
    Virtuoso's ``-08:00`` time-zone suffix dropped from literals."""
    return value.replace(NS, "").replace("-08:00", "")
