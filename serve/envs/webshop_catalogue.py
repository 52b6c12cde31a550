"""WebShop's product catalogue and goals, read from WebShop's own data files.

Files (the names WebShop's ``setup.sh`` downloads into its ``data/`` folder):

* ``items_shuffle.json`` (1.18M products; ``items_shuffle_1000.json`` is the 1,000-product
  preview): a list of scraped products with ``asin``, ``name``, ``full_description``,
  ``small_description``, ``pricing``, ``customization_options``, ``images``, ``category``,
  ``query``, ``product_category``;
* ``items_ins_v2.json``: ``{asin: {"attributes": [...], ...}}``, the products' annotated attributes;
* ``items_human_ins.json``: ``{asin: [{"instruction", "instruction_attributes",
  "instruction_options"}, ...]}``, the human-written instructions the benchmark's goals come from;
  or instead of it an explicit *goals file*: a JSON list of goals
  (``asin``, ``instruction_text``, ``attributes``, ``goal_options``, ``price_upper``, optionally
  ``query``/``product_category``/``name``/``category``, which default to the product's).

:func:`load_products` follows WebShop's ``engine.load_products`` (asin filter and de-duplication,
``Title``/``Description``/``BulletPoints``, prices parsed from ``pricing``, options lower-cased
with ``/`` shown as `` | ``, ``Attributes`` or ``['DUMMY_ATTR']``, rating ``N.A.``, no reviews);
:func:`human_goals` follows ``goal.get_human_goals`` (the price bound drawn among the next
multiples of ten above the price, instructions without attributes skipped) and the goals are
then shuffled with seed 233 as WebShop's ``SimServer`` does, so goal *i* here is AgentBench's
session *i* for the same files. WebShop draws product prices inside a price range and the price
bounds from Python's unseeded global RNG (so they change from run to run); here they come from
``random.Random(price_seed)`` in the same order, hence reproducible.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Dict, List, Optional, Tuple

from serve.envs.base import EnvError
from serve.envs.webshop_search import SEARCH_RETURN_N, SearchEngine

log = logging.getLogger(__name__)

PRICE_RANGE = [10.0 * i for i in range(1, 100)]  # WebShop goal.PRICE_RANGE
NO_PRICE_UPPER = 1000000  # WebShop's bound when fewer than two price steps remain
GOAL_SHUFFLE_SEED = 233  # WebShop SimServer: random.seed(233); random.shuffle(goals)


def _parse_pricing(pricing: Any) -> Tuple[List[float], str]:
    """WebShop's price parsing: ``"$12.99"`` / ``"$10.00 - $20.00"`` -> floats and the price tag."""
    if not pricing:
        return [100.0], "$100.0"
    values = [float(Decimal(re.sub(r"[^\d.]", "", part))) for part in str(pricing).split("$")[1:]]
    if not values:
        raise ValueError(f"no price in {pricing!r}")
    if len(values) == 1:
        return values, f"${values[0]}"
    return values[:2], f"${values[0]} to ${values[1]}"


def load_products(products: List[Dict[str, Any]], attributes: Dict[str, Any],
                  skipped: Dict[str, str]) -> List[Dict[str, Any]]:
    """Catalogue records in WebShop's rendered shape (``engine.load_products``), file order.

    Records WebShop would skip (asin 'nan' or longer than 10, repeated asin) are skipped
    silently as there; records it would crash on are skipped and named in ``skipped``."""
    seen, out = set(), []
    for n, raw in enumerate(products):
        asin = str(raw.get("asin", "nan")) if isinstance(raw, dict) else "nan"
        if asin == "nan" or len(asin) > 10 or asin in seen:
            continue
        seen.add(asin)
        missing = [k for k in ("name", "category", "query", "product_category") if k not in raw]
        if missing:
            skipped[asin] = f"product record {n} lacks {missing}"
            continue
        try:
            pricing, price_tag = _parse_pricing(raw.get("pricing"))
        except (InvalidOperation, ValueError) as exc:
            skipped[asin] = f"product record {n}: unreadable pricing {raw.get('pricing')!r} ({exc})"
            continue
        options: Dict[str, List[str]] = {}
        for opt_name, contents in (raw.get("customization_options") or {}).items():
            if contents is None:
                continue
            options[opt_name.lower()] = [str(c["value"]).strip().replace("/", " | ").lower() for c in contents]
        small = raw.get("small_description")
        images = raw.get("images") or [""]
        attrs = attributes.get(asin) or {}
        out.append({
            "asin": asin, "name": raw["name"], "category": raw["category"],
            "query": str(raw["query"]).lower().strip(), "product_category": raw["product_category"],
            "Title": raw["name"], "Description": raw.get("full_description") or "",
            "BulletPoints": small if isinstance(small, list) else [small or ""],
            "Reviews": [], "Rating": "N.A.", "pricing": pricing, "Price": price_tag,
            "options": options, "MainImage": images[0],
            "Attributes": list(attrs["attributes"]) if "attributes" in attrs else ["DUMMY_ATTR"],
        })
    return out


def product_prices(products: List[Dict[str, Any]], rng: random.Random) -> Dict[str, float]:
    """WebShop ``generate_product_prices``: the price, or a uniform draw inside a price range."""
    return {p["asin"]: p["pricing"][0] if len(p["pricing"]) == 1 else rng.uniform(*p["pricing"][:2])
            for p in products}


def human_goals(products: List[Dict[str, Any]], instructions: Dict[str, Any], prices: Dict[str, float],
                rng: random.Random) -> List[Dict[str, Any]]:
    """WebShop ``get_human_goals``: one goal per human instruction with attributes, in product
    order, with a price bound and its text, then shuffled with seed 233."""
    goals = []
    for p in products:
        for ins in instructions.get(p["asin"]) or []:
            attrs = ins.get("instruction_attributes") or []
            if not attrs:
                continue
            price = prices[p["asin"]]
            steps = [x for x in PRICE_RANGE if x > price][:4]
            if len(steps) >= 2:
                _, upper = sorted(rng.sample(steps, 2))
                price_text = f", and price lower than {upper:.2f} dollars"
            else:
                upper, price_text = NO_PRICE_UPPER, ""
            goals.append({
                "asin": p["asin"], "category": p["category"], "query": p["query"], "name": p["name"],
                "product_category": p["product_category"],
                "instruction_text": str(ins["instruction"]).strip(".") + price_text,
                "attributes": list(attrs), "price_upper": upper,
                "goal_options": list(ins.get("instruction_options") or []),
            })
    random.Random(GOAL_SHUFFLE_SEED).shuffle(goals)
    return goals


def explicit_goals(records: List[Any], by_asin: Dict[str, Dict[str, Any]],
                   skipped: Dict[str, str]) -> List[Tuple[str, Optional[Dict[str, Any]]]]:
    """(id, goal) per record, file order; an unusable record's goal is None, named in ``skipped``."""
    out: List[Tuple[str, Optional[Dict[str, Any]]]] = []
    for i, rec in enumerate(records):
        gid = str(rec.get("id", i)) if isinstance(rec, dict) else str(i)
        problem = None
        if not isinstance(rec, dict):
            problem = "goal is not an object"
        else:
            missing = [k for k in ("asin", "instruction_text", "attributes", "price_upper") if k not in rec]
            if missing:
                problem = f"goal lacks field(s) {missing}"
            elif str(rec["asin"]) not in by_asin:
                problem = f"goal names product {rec['asin']!r}, which is not in the catalogue"
            elif not rec["attributes"] or not isinstance(rec["attributes"], list):
                problem = "goal 'attributes' must be a non-empty list (WebShop skips such goals)"
            elif not float(rec["price_upper"]) > 0:
                problem = "goal 'price_upper' must be > 0"
        if problem:
            skipped[gid] = f"goal record {i}: {problem}"
            out.append((gid, None))
            continue
        product = by_asin[str(rec["asin"])]
        goal = {k: product[k] for k in ("category", "query", "name", "product_category")}
        goal.update(rec)
        goal.update(asin=str(rec["asin"]), id=gid, query=str(goal["query"]).lower().strip(),
                    goal_options=rec.get("goal_options") or [])
        out.append((gid, goal))
    return out


@dataclass
class Catalogue:
    """Products, prices, goals and the search engine of one WebShop instance (read-only, shared)."""

    products: Dict[str, Dict[str, Any]]
    prices: Dict[str, float]
    goals: List[Tuple[str, Optional[Dict[str, Any]]]]  # (task id, goal or None = unusable)
    engine: SearchEngine
    skipped_products: Dict[str, str] = field(default_factory=dict)  # asin -> why it is not loaded
    skipped_goals: Dict[str, str] = field(default_factory=dict)  # goal id -> why it cannot run

    def search(self, query: str, k: int = SEARCH_RETURN_N) -> List[Dict[str, Any]]:
        """WebShop ``get_top_n_product_from_keywords``: top-k hits that are in the catalogue."""
        return [self.products[a] for a in self.engine.search(query, k) if a in self.products]


def read_json_file(path: str, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise EnvError(f"webshop: cannot read {what} {path}: {exc}") from None


def file_fingerprint(*paths: Optional[str]) -> str:
    """Identity of the input files (path, size, mtime): a saved index is reused only for them."""
    parts = []
    for p in paths:
        if p:
            st = os.stat(p)
            parts.append(f"{os.path.abspath(p)}:{st.st_size}:{int(st.st_mtime)}")
    return "|".join(parts)


_CACHE: Dict[Tuple, Catalogue] = {}
_CACHE_LOCK = threading.Lock()


def cached(key: Tuple, build) -> Catalogue:
    """One Catalogue per configuration and process (the full one takes minutes and GBs)."""
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = build()
        return _CACHE[key]
