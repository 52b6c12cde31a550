"""Which Freebase predicates the KG tools may show, and the type a relation leads to.

AgentBench decides both from two ontology files (``src/server/tasks/knowledgegraph/ontology/`` in
THUDM/AgentBench, the GrailQA ontology; not shipped with this project, see docs/env_kg.md):

* ``vocab.json``: ``{"relations": [...], "attributes": [...], ...}``; ``get_relations`` shows only
  the listed relations, ``get_attributes`` only the listed attributes;
* ``fb_roles``: one ``domain relation range`` line per property; ``get_neighbors`` names the
  range type in "variable #n, which are instances of <range>", and ``intersection`` needs two
  variables of the same type.

:class:`FileOntology` reads those files (AgentBench's behaviour). :class:`StoreOntology` needs no
files: it reads Freebase's own schema from the SPARQL store, the property's range type
``type.property.expected_type`` (documented in dki-lab/Freebase-Setup, whose Virtuoso database
AgentBench queries). Its rule mirrors how the GrailQA vocabulary relates to that schema:
*relations* are properties whose range is a non-primitive type (not ``type.*``), *attributes* are
properties whose range is ``type.int``, ``type.float`` or ``type.datetime``. Applied to
the ranges in AgentBench's ``fb_roles``, this rule selects every relation and every attribute of
its ``vocab.json`` and about 3% more properties (420 relations, 13 attributes; mostly ``base.*``
ones that GrailQA left out), so an observation can list a few predicates AgentBench would hide.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Dict, FrozenSet, Iterable, List, Optional

from serve.envs.kg_program import iri, term_value
from serve.envs.kg_sparql import SparqlClient

log = logging.getLogger(__name__)

EXPECTED_TYPE = "type.property.expected_type"  # Freebase: a property's range type
ATTRIBUTE_TYPES = frozenset({"type.int", "type.float", "type.datetime"})
_BATCH = 200  # predicates per schema query (a VALUES list)


class Ontology:
    """The interface the environment uses; ``source`` says where the schema came from."""

    source = ""

    def relations(self, predicates: Iterable[str]) -> List[str]:
        """The relations among ``predicates``, sorted."""
        raise NotImplementedError

    def attributes(self, predicates: Iterable[str]) -> List[str]:
        """The attributes among ``predicates``, sorted."""
        raise NotImplementedError

    def range(self, relation: str) -> Optional[str]:
        """The range type of ``relation``; None when the schema has none."""
        raise NotImplementedError


class FileOntology(Ontology):
    """AgentBench's ``vocab.json`` and ``fb_roles`` in ``directory`` (read once per directory)."""

    def __init__(self, relations: FrozenSet[str], attributes: FrozenSet[str], ranges: Dict[str, str],
                 directory: str) -> None:
        self._relations = relations
        self._attributes = attributes
        self.ranges = ranges
        self.source = directory

    @classmethod
    def load(cls, directory: str) -> "FileOntology":
        """ValueError naming the file when ``directory`` lacks a readable ``vocab.json``/``fb_roles``."""
        key = os.path.realpath(directory)
        with _CACHE_LOCK:
            if key not in _CACHE:
                _CACHE[key] = cls._read(directory)
            return _CACHE[key]

    @classmethod
    def _read(cls, directory: str) -> "FileOntology":
        vocab_path = os.path.join(directory, "vocab.json")
        roles_path = os.path.join(directory, "fb_roles")
        try:
            with open(vocab_path, encoding="utf-8") as fh:
                vocab = json.load(fh)
            with open(roles_path, encoding="utf-8") as fh:
                role_lines = fh.read().splitlines()
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read the KG ontology in {directory}: {exc}") from None
        if not isinstance(vocab, dict) or not all(
                isinstance(vocab.get(k), list) for k in ("relations", "attributes")):
            raise ValueError(f"{vocab_path}: expected an object with lists 'relations' and 'attributes'")
        ranges: Dict[str, str] = {}
        for line in role_lines:
            fields = line.split()
            if len(fields) >= 3:  # AgentBench reads fields 1 and 2 of every line the same way
                ranges[fields[1]] = fields[2]
        return cls(frozenset(vocab["relations"]), frozenset(vocab["attributes"]), ranges, directory)

    def relations(self, predicates: Iterable[str]) -> List[str]:
        return sorted(set(predicates) & self._relations)

    def attributes(self, predicates: Iterable[str]) -> List[str]:
        return sorted(set(predicates) & self._attributes)

    def range(self, relation: str) -> Optional[str]:
        return self.ranges.get(relation)


class StoreOntology(Ontology):
    """Freebase's schema in the store itself: ranges from ``type.property.expected_type``.

    Looked up lazily for the predicates the tools meet (a few per call) and cached, so a full
    Freebase never has to list its whole schema in one result set.
    """

    def __init__(self, client: SparqlClient) -> None:
        self.client = client
        self.source = f"schema in {client.url}"
        self._types: Dict[str, Optional[str]] = {}
        self._lock = threading.Lock()

    def check(self) -> None:
        """ValueError when the store holds no schema triple at all (then no predicate would show)."""
        rows = self.client.select(f"SELECT ?p WHERE {{ ?p {iri(EXPECTED_TYPE)} ?t }} LIMIT 1")
        if not rows:
            raise ValueError(f"the store at {self.client.url} has no Freebase schema triples "
                             f"({EXPECTED_TYPE})")

    def _lookup(self, predicates: Iterable[str]) -> Dict[str, Optional[str]]:
        wanted = sorted(set(predicates))
        with self._lock:
            missing = [p for p in wanted if p not in self._types]
        found: Dict[str, Optional[str]] = {p: None for p in missing}
        for i in range(0, len(missing), _BATCH):
            chunk = missing[i:i + _BATCH]
            values = " ".join(iri(p) for p in chunk)
            rows = self.client.select(f"SELECT ?p ?t WHERE {{ VALUES ?p {{ {values} }} "
                                      f"?p {iri(EXPECTED_TYPE)} ?t }}")
            for row in rows:
                p, t = term_value(row.get("p", "")), term_value(row.get("t", ""))
                if p in found and (found[p] is None or t < str(found[p])):  # one range, chosen stably
                    found[p] = t
        with self._lock:
            self._types.update(found)
            return {p: self._types[p] for p in wanted}

    def relations(self, predicates: Iterable[str]) -> List[str]:
        return sorted(p for p, t in self._lookup(predicates).items() if t and not t.startswith("type."))

    def attributes(self, predicates: Iterable[str]) -> List[str]:
        return sorted(p for p, t in self._lookup(predicates).items() if t in ATTRIBUTE_TYPES)

    def range(self, relation: str) -> Optional[str]:
        return self._lookup([relation])[relation]


_CACHE: Dict[str, FileOntology] = {}
_CACHE_LOCK = threading.Lock()
