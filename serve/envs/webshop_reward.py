"""WebShop's purchase reward (Yao et al. 2022, ``web_agent_site/engine/goal.py``), reimplemented.

The reward of buying product ``p`` with chosen options ``o`` for goal ``g`` is

    reward = r_type * (n_att + n_opt + r_price) / (|g.attributes| + |g.goal_options| + 1)

* ``n_att`` (:func:`attribute_matches`): goal attributes found in the product — a fuzzy match
  (token-set ratio > 85) against the product's annotated ``Attributes``, else a plain substring of
  its title, bullet points (features) or description (all lower-cased);
* ``n_opt`` (:func:`option_matches`): goal options matched (token-set ratio > 85) by a chosen
  option, both sides first reduced to the first WebShop colour word they contain
  (:func:`normalize_color`, WebShop's ``COLOR_SET`` in its order, substring test);
* ``r_price``: 1 when the product's price is at most the goal's ``price_upper``;
* ``r_type`` (:func:`type_reward`): 1.0, lowered to 0.5 when neither the search query, nor >= 2
  levels of the product category, nor more than 20% of the goal title's nouns match; to 0.1 when
  under 10% of the nouns match and to 0.0 when none does.

The fuzzy score is thefuzz's ``token_set_ratio`` (:func:`token_set_ratio`, the rapidfuzz
definition: Indel-distance similarity of the sorted token intersection and differences, rounded
to an int). Noun extraction is pluggable (:func:`make_noun_tagger`): WebShop tags titles with
spaCy (``en_core_web_lg`` in AgentBench, ``en_core_web_sm`` upstream) and keeps NOUN/PROPN
tokens; without a spaCy model this module falls back to a deterministic content-word tagger
(see :class:`ContentWordTagger`), which only changes ``r_type`` for *other* products than the
goal's — buying the goal's own product always gives every noun.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

log = logging.getLogger(__name__)

MATCH_THRESHOLD = 85  # WebShop: fuzz.token_set_ratio(...) > 85 counts as a match

# WebShop's normalize.COLOR_SET, same order: the first member that is a substring wins.
COLOR_SET = (
    "alabaster apricot aqua ash asphalt azure banana beige black blue blush bordeaux bronze brown "
    "burgundy camel camo caramel champagne charcoal cheetah chestnut chocolate christmas coffee "
    "cognac copper coral cranberry cream crystal dark denim eggplant elephant espresso fuchsia gold "
    "granite grape graphite grass gray green grey heather indigo ivory ivy khaki lavender lemon "
    "leopard light lilac lime magenta maroon mauve merlot midnight mint mocha multicolor mushroom "
    "mustard natural navy nude olive orange peach pewter pink plum purple rainbow red rose royal "
    "rust sand sapphire seashell silver skull slate steel stone stonewash sunflower tan taupe teal "
    "tiger turquoise violet walnut wheat white wine yellow"
).split()


# ---------------------------------------------------------------------- fuzzy matching


def _fuzz_process(text: str) -> str:
    """thefuzz ``full_process(force_ascii=True)``: drop code points 128-255, non-alphanumerics
    to spaces, lower case, strip."""
    text = "".join(ch for ch in str(text) if not 128 <= ord(ch) <= 255)
    return "".join(ch if ch.isalnum() else " " for ch in text).lower().strip()


def _lcs_len(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for ca in a:
        cur = [0]
        for j, cb in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if ca == cb else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def _indel(a: str, b: str) -> int:
    return len(a) + len(b) - 2 * _lcs_len(a, b)


def _norm(dist: int, lensum: int) -> float:
    return 100.0 - 100.0 * dist / lensum if lensum else 100.0


def token_set_ratio(s1: str, s2: str) -> int:
    """thefuzz ``fuzz.token_set_ratio`` (0-100 int): 100 when one token set contains the other,
    else the best Indel similarity among intersection+rest pairs."""
    a, b = set(_fuzz_process(s1).split()), set(_fuzz_process(s2).split())
    if not a or not b:
        return 0
    common, only_a, only_b = a & b, a - b, b - a
    if common and (not only_a or not only_b):
        return 100
    diff_a, diff_b = " ".join(sorted(only_a)), " ".join(sorted(only_b))
    sect_len = len(" ".join(sorted(common)))
    sep = 1 if sect_len else 0
    sect_a_len, sect_b_len = sect_len + sep + len(diff_a), sect_len + sep + len(diff_b)
    best = _norm(_indel(diff_a, diff_b), sect_a_len + sect_b_len)
    if sect_len:
        best = max(best,
                   _norm(sep + len(diff_a), sect_len + sect_a_len),
                   _norm(sep + len(diff_b), sect_len + sect_b_len))
    return int(round(best))


def normalize_color(text: str) -> str:
    """WebShop ``normalize_color``: the first COLOR_SET word contained in ``text``, else ``text``."""
    for color in COLOR_SET:
        if color in text:
            return color
    return text


# ---------------------------------------------------------------------- noun taggers

NounTagger = Callable[[str], List[str]]

# Function words and shop boilerplate a POS tagger would not call nouns.
_NOT_NOUNS = frozenset("""
a an the and or nor but if of for to in on at by with from into onto over under about as per via
is are was were be been being am do does did has have had will would can could should may might
must shall this that these those it its they them their there here he she his her we our you your
i me my mine not no yes so than then too very more most less least all any each every both either
neither some such only own same other another up down out off again just also which who whom whose
what when where why how new
""".split())


class ContentWordTagger:
    """Offline stand-in for spaCy's NOUN/PROPN filter: lower-cased alphabetic words of two or
    more letters that are not function words. Deterministic, so rewards are reproducible; it
    counts adjectives as nouns, hence ``title_score`` of a *different* product can exceed what
    spaCy gives. The goal's own product always scores 1 (same title)."""

    name = "content_words"

    def __call__(self, title: str) -> List[str]:
        words = re.findall(r"[a-z][a-z']*[a-z]|[a-z]", title.lower())
        return [w for w in words if len(w) > 1 and w not in _NOT_NOUNS]


class SpacyNounTagger:
    """WebShop's tagger: tokens whose spaCy POS is NOUN or PROPN ('PNOUN' is WebShop's typo)."""

    def __init__(self, model: str) -> None:
        # A model is an installed package (en_core_web_lg) or a folder; look before importing
        # spaCy, whose import alone takes seconds.
        if not os.path.isdir(model) and importlib.util.find_spec(model) is None:
            raise OSError(f"spaCy model {model!r} is not installed")
        import spacy  # optional: only when configured

        self.name = f"spacy:{model}"
        self.nlp = spacy.load(model, disable=["ner", "lemmatizer"])

    def __call__(self, title: str) -> List[str]:
        return [t.text.lower() for t in self.nlp(title) if t.pos_ in ("PNOUN", "NOUN", "PROPN")]


_TAGGERS: Dict[str, NounTagger] = {}


def make_noun_tagger(spec: str = "auto") -> NounTagger:
    """``"content_words"``; ``"spacy:<model>"`` (error when the model is not installed); ``"auto"``:
    spaCy ``en_core_web_lg`` (AgentBench's), else ``en_core_web_sm``, else content words."""
    if spec in _TAGGERS:
        return _TAGGERS[spec]
    tagger: Optional[NounTagger] = None
    if spec == "content_words":
        tagger = ContentWordTagger()
    elif spec.startswith("spacy:"):
        try:
            tagger = SpacyNounTagger(spec.split(":", 1)[1])
        except (ImportError, OSError) as exc:
            raise ValueError(f"webshop: noun_tagger {spec!r} unavailable ({exc}); install the spaCy "
                             f"model (python -m spacy download {spec.split(':', 1)[1]}) or use "
                             f"noun_tagger=content_words") from None
    elif spec == "auto":
        for model in ("en_core_web_lg", "en_core_web_sm"):
            try:
                tagger = SpacyNounTagger(model)
                break
            except (ImportError, OSError):
                continue
        if tagger is None:
            log.info("webshop: no spaCy English model installed; type reward uses content words")
            tagger = ContentWordTagger()
    else:
        raise ValueError(f"webshop: unknown noun_tagger {spec!r}; use auto, content_words or spacy:<model>")
    _TAGGERS[spec] = tagger
    return tagger


# ---------------------------------------------------------------------- reward components


def type_reward(product: Mapping[str, Any], goal: Mapping[str, Any], nouns: NounTagger) -> Dict[str, Any]:
    """WebShop ``get_type_reward``: query / category / title-noun agreement -> r_type."""
    query_match = product["query"] == goal["query"]
    cats_p = {c.strip() for c in str(product["product_category"]).split("›")}
    cats_g = {c.strip() for c in str(goal["product_category"]).split("›")}
    category_match = len(cats_p & cats_g) >= 2
    bought, wanted = nouns(str(product["name"])), nouns(str(goal["name"]))
    # WebShop divides the *set* intersection by the *list* length of the goal's nouns.
    title_score = 0.2 if not wanted else len(set(bought) & set(wanted)) / len(wanted)
    r_type = 1.0
    if not (query_match or category_match or title_score > 0.2):
        r_type = 0.5
    if title_score < 0.1:
        r_type = 0.1
    if title_score == 0.0:
        r_type = 0.0
    return {"r_type": r_type, "query_match": query_match, "category_match": category_match,
            "title_score": title_score}


def attribute_matches(product: Mapping[str, Any], goal_attrs: Sequence[str]) -> int:
    """WebShop ``get_attribute_reward``: goal attributes found in the product (count)."""
    title = str(product["Title"]).lower()
    bullets = " ".join(product["BulletPoints"]).lower()
    desc = str(product["Description"]).lower()
    hits = 0
    for g_attr in goal_attrs:
        if any(token_set_ratio(p_attr, g_attr) > MATCH_THRESHOLD for p_attr in product["Attributes"]):
            hits += 1
        elif g_attr in title or g_attr in bullets or g_attr in desc:
            hits += 1
    return hits


def option_matches(chosen: Iterable[str], goal_options: Sequence[str]) -> int:
    """WebShop ``get_option_reward``: goal options matched by some chosen option (count)."""
    chosen_n = [normalize_color(o) for o in chosen]
    hits = 0
    for g_opt in (normalize_color(o) for o in goal_options):
        if any(token_set_ratio(p_opt, g_opt) > MATCH_THRESHOLD for p_opt in chosen_n):
            hits += 1
    return hits


def goal_option_values(goal: Mapping[str, Any]) -> List[str]:
    """Goal options as a list of values (human goals store a list; a dict's values are used)."""
    opts = goal.get("goal_options") or []
    return [str(v) for v in (opts.values() if isinstance(opts, dict) else opts)]


def get_reward(product: Mapping[str, Any], goal: Mapping[str, Any], price: float,
               options: Mapping[str, str], nouns: NounTagger) -> Tuple[float, Dict[str, Any]]:
    """WebShop ``get_reward`` (verbose form): the total reward and its components."""
    attrs, g_opts = list(goal["attributes"]), goal_option_values(goal)
    denom = len(attrs) + len(g_opts) + 1
    rt = type_reward(product, goal, nouns)
    r_price = float(price <= float(goal["price_upper"]))
    n_att = attribute_matches(product, attrs)
    n_opt = option_matches(list(options.values()), g_opts)
    total = (n_att + n_opt + r_price) / denom * rt["r_type"]
    info: Dict[str, Any] = {
        **rt, "r_att": n_att / len(attrs) if attrs else 0.0, "w_att": len(attrs) / denom,
        "r_price": r_price, "w_price": 1 / denom,
    }
    if g_opts:
        info.update(r_option=n_opt / len(g_opts), w_option=len(g_opts) / denom)
    return total, info
