"""WebShop's product search: the interface, a built-in BM25 index and the Lucene (pyserini) one.

WebShop (``search_engine/``) indexes one document per product — the lower-cased concatenation
of title, description, first bullet point and ``"name: v1, v2, and name2: ..."`` option text
(:func:`product_document`) — with Pyserini/Lucene (``DefaultEnglishAnalyzer``, BM25 k1=0.9,
b=0.4) and shows the top 50 hits. Two engines implement :class:`SearchEngine`:

* :class:`BM25Index` — in-process BM25 over any catalogue (the offline tests' tens of products,
  or the full 1.18M with ``cache_dir`` to build once and reload). It follows Lucene's analyzer
  (:func:`analyze`: word tokens, possessive ``'s`` removed, lower case, Lucene's 33 English stop
  words, Porter stemmer) and Lucene's BM25 formula (idf = ln(1 + (N - df + 0.5)/(df + 0.5)),
  tf part = tf / (tf + k1 (1 - b + b dl/avgdl)), a repeated query word counts again as Anserini's
  bag-of-words query boosts it; document lengths quantised to one byte as Lucene stores them,
  :func:`lucene_norm_length`); ties go to the smaller product id, as in Anserini.
  Differences to Lucene: Unicode word breaking is approximated by a regular expression, and
  Lucene computes in float32, so scores can differ in the last digits and near-ties may order
  differently.
* :class:`LuceneSearch` — WebShop's own index folder (``search_engine/indexes``) through
  ``pyserini.search.lucene.LuceneSearcher``: the exact ranking of the benchmark (needs Java 21
  and ``pip install pyserini``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
from array import array
from collections import Counter
from typing import Dict, Iterable, List, Mapping, Optional, Protocol, Sequence, Tuple

import numpy as np

log = logging.getLogger(__name__)

K1, B = 0.9, 0.4  # Anserini/Pyserini's BM25 defaults (LuceneSearcher)
SEARCH_RETURN_N = 50  # WebShop: hits fetched per query
INDEX_FORMAT = 1  # bump when the analyzer or the saved layout changes

# Lucene's EnglishAnalyzer.ENGLISH_STOP_WORDS_SET
STOP_WORDS = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such that the their then "
    "there these they this to was will with".split())
_TOKEN = re.compile(r"\w+(?:(?:[.'’]|(?<=\d),(?=\d))\w+)*")


class SearchEngine(Protocol):
    """What the environment needs of a search backend: product ids, best first."""

    def search(self, query: str, k: int = SEARCH_RETURN_N) -> List[str]:
        ...


def product_document(product: Mapping) -> str:
    """The text WebShop indexes for a product (``convert_product_file_format.py``)."""
    option_text = ", and ".join(f"{name}: {', '.join(values)}" for name, values in product["options"].items())
    bullets = product["BulletPoints"]
    return " ".join([product["Title"], product["Description"], bullets[0] if bullets else "",
                     option_text]).lower()


def write_documents(products: Iterable[Mapping], path: str) -> int:
    """Write Pyserini's JsonCollection input (``{"id", "contents"}`` per line) for ``products``:
    index it with ``python -m pyserini.index.lucene --collection JsonCollection --input DIR
    --index INDEX --generator DefaultLuceneDocumentGenerator --threads 1 --storeRaw``
    (WebShop's ``run_indexing.sh``). Returns the number of documents."""
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        for p in products:
            fh.write(json.dumps({"id": p["asin"], "contents": product_document(p)}) + "\n")
            n += 1
    return n


# ---------------------------------------------------------------------- Porter stemmer


def _cons(w: str, i: int) -> bool:
    ch = w[i]
    if ch in "aeiou":
        return False
    if ch == "y":
        return i == 0 or not _cons(w, i - 1)
    return True


def _measure(stem: str) -> int:
    """Porter's m: the number of vowel-consonant sequences in ``stem``."""
    m, i, n = 0, 0, len(stem)
    while i < n and _cons(stem, i):
        i += 1
    while i < n:
        while i < n and not _cons(stem, i):
            i += 1
        if i >= n:
            break
        m += 1
        while i < n and _cons(stem, i):
            i += 1
    return m


def _has_vowel(stem: str) -> bool:
    return any(not _cons(stem, i) for i in range(len(stem)))


def _double_cons(w: str) -> bool:
    return len(w) >= 2 and w[-1] == w[-2] and _cons(w, len(w) - 1)


def _cvc(w: str) -> bool:
    i = len(w) - 1
    return (i >= 2 and _cons(w, i) and not _cons(w, i - 1) and _cons(w, i - 2)
            and w[i] not in "wxy")


_STEP2 = [("ational", "ate"), ("tional", "tion"), ("enci", "ence"), ("anci", "ance"), ("izer", "ize"),
          ("bli", "ble"), ("alli", "al"), ("entli", "ent"), ("eli", "e"), ("ousli", "ous"),
          ("ization", "ize"), ("ation", "ate"), ("ator", "ate"), ("alism", "al"), ("iveness", "ive"),
          ("fulness", "ful"), ("ousness", "ous"), ("aliti", "al"), ("iviti", "ive"), ("biliti", "ble"),
          ("logi", "log")]
_STEP3 = [("icate", "ic"), ("ative", ""), ("alize", "al"), ("iciti", "ic"), ("ical", "ic"),
          ("ful", ""), ("ness", "")]
_STEP4 = ["al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment", "ent", "ion",
          "ou", "ism", "ate", "iti", "ous", "ive", "ize"]


def _replace_first(w: str, rules: Sequence[Tuple[str, str]], min_m: int) -> str:
    # As in Porter's reference code: the first listed suffix that matches decides, even when
    # its condition then fails.
    for suffix, repl in rules:
        if w.endswith(suffix):
            stem = w[:-len(suffix)]
            return stem + repl if _measure(stem) > min_m else w
    return w


def porter_stem(word: str) -> str:
    """The Porter (1980) stemmer as in Lucene's ``PorterStemFilter`` (Porter's reference code,
    with its 'bli'->'ble' and 'logi'->'log' departures); words of 1-2 letters are kept."""
    w = word
    if len(w) <= 2:
        return w
    # step 1a
    if w.endswith("sses"):
        w = w[:-2]
    elif w.endswith("ies"):
        w = w[:-2]
    elif w.endswith("s") and not w.endswith("ss"):
        w = w[:-1]
    # step 1b
    if w.endswith("eed"):
        if _measure(w[:-3]) > 0:
            w = w[:-1]
    else:
        for suffix in ("ed", "ing"):
            if w.endswith(suffix) and _has_vowel(w[:-len(suffix)]):
                w = w[:-len(suffix)]
                if w.endswith(("at", "bl", "iz")):
                    w += "e"
                elif _double_cons(w):
                    if w[-1] not in "lsz":
                        w = w[:-1]
                elif _measure(w) == 1 and _cvc(w):
                    w += "e"
                break
    # step 1c
    if w.endswith("y") and _has_vowel(w[:-1]):
        w = w[:-1] + "i"
    w = _replace_first(w, _STEP2, 0)
    w = _replace_first(w, _STEP3, 0)
    # step 4 ('ion' only after s or t)
    for suffix in _STEP4:
        if w.endswith(suffix):
            stem = w[:-len(suffix)]
            if suffix == "ion" and not stem.endswith(("s", "t")):
                break
            if _measure(stem) > 1:
                w = stem
            break
    # step 5
    m_full = _measure(w[:-1]) if w.endswith("e") else 0
    if w.endswith("e") and (m_full > 1 or (m_full == 1 and not _cvc(w[:-1]))):
        w = w[:-1]
    if w.endswith("l") and _double_cons(w) and _measure(w) > 1:
        w = w[:-1]
    return w


_TERM_CACHE: Dict[str, str] = {}  # raw token -> indexed term ("" = dropped); bounded below


def _term(tok: str) -> str:
    if tok.endswith(("'s", "'S", "’s", "’S")):
        tok = tok[:-2]
    tok = tok.lower()
    if not tok or tok in STOP_WORDS:
        return ""
    return porter_stem(tok) if tok.isalpha() else tok


def analyze(text: str) -> List[str]:
    """Lucene ``EnglishAnalyzer``-like terms of ``text`` (see the module docstring)."""
    terms = []
    for tok in _TOKEN.findall(text):
        term = _TERM_CACHE.get(tok)
        if term is None:
            term = _term(tok)
            if len(_TERM_CACHE) < 4_000_000:
                _TERM_CACHE[tok] = term
        if term:
            terms.append(term)
    return terms


# ---------------------------------------------------------------------- built-in BM25

LUCENE_EXACT_LENGTHS = 24  # SmallFloat.intToByte4: lengths below this are stored exactly


def lucene_norm_length(lengths: np.ndarray) -> np.ndarray:
    """Document lengths as Lucene's BM25 sees them: stored in one byte (``SmallFloat.intToByte4``),
    exact below 24, above that 24 + the excess truncated to its 4 leading bits."""
    x = np.asarray(lengths, dtype=np.int64)
    excess = np.maximum(x - LUCENE_EXACT_LENGTHS, 0)
    bits = np.zeros_like(excess)
    pos = excess > 0
    bits[pos] = np.floor(np.log2(excess[pos])).astype(np.int64) + 1
    shift = np.maximum(bits - 4, 0)
    return np.where(x < LUCENE_EXACT_LENGTHS, x, LUCENE_EXACT_LENGTHS + ((excess >> shift) << shift)).astype(np.float64)



class BM25Index:
    """BM25 over documents held as compressed postings (numpy), searchable from many threads."""

    def __init__(self, doc_ids: List[str], terms: Dict[str, int], indptr: np.ndarray,
                 post_docs: np.ndarray, post_tf: np.ndarray, doc_len: np.ndarray,
                 k1: float = K1, b: float = B) -> None:
        self.doc_ids, self.terms = doc_ids, terms
        self.indptr, self.post_docs, self.post_tf, self.doc_len = indptr, post_docs, post_tf, doc_len
        self.k1, self.b = float(k1), float(b)
        self.avgdl = float(doc_len.mean()) if len(doc_len) else 0.0
        self.norm_len = lucene_norm_length(doc_len)

    @classmethod
    def build(cls, docs: Iterable[Tuple[str, str]], k1: float = K1, b: float = B) -> "BM25Index":
        """Index ``(doc_id, text)`` pairs (order = tie-break order)."""
        doc_ids: List[str] = []
        terms: Dict[str, int] = {}
        t_col, d_col, f_col, lengths = array("i"), array("i"), array("i"), array("i")
        for n, (doc_id, text) in enumerate(docs):
            doc_ids.append(doc_id)
            toks = analyze(text)
            lengths.append(len(toks))
            for term, tf in Counter(toks).items():
                t_col.append(terms.setdefault(term, len(terms)))
                d_col.append(n)
                f_col.append(tf)
        t = np.frombuffer(t_col, dtype=np.int32)
        order = np.argsort(t, kind="stable")  # by term, doc order kept inside a term
        indptr = np.zeros(len(terms) + 1, dtype=np.int64)
        np.cumsum(np.bincount(t, minlength=len(terms)), out=indptr[1:])
        return cls(doc_ids, terms, indptr, np.frombuffer(d_col, dtype=np.int32)[order],
                   np.frombuffer(f_col, dtype=np.int32)[order].astype(np.float32),
                   np.frombuffer(lengths, dtype=np.int32).astype(np.float32), k1, b)

    def scores(self, query: str) -> Dict[int, float]:
        """Document number -> BM25 score, for documents sharing a term with ``query``."""
        n_docs = len(self.doc_ids)
        acc: Optional[np.ndarray] = None
        touched: List[np.ndarray] = []
        for term, qtf in Counter(analyze(query)).items():
            tid = self.terms.get(term)
            if tid is None:
                continue
            lo, hi = self.indptr[tid], self.indptr[tid + 1]
            docs, tf = self.post_docs[lo:hi], self.post_tf[lo:hi]
            idf = math.log(1.0 + (n_docs - (hi - lo) + 0.5) / ((hi - lo) + 0.5))
            norm = self.k1 * (1.0 - self.b + self.b * self.norm_len[docs] / self.avgdl)
            if acc is None:
                acc = np.zeros(n_docs, dtype=np.float64)
            acc[docs] += qtf * idf * tf / (tf + norm)
            touched.append(docs)
        if acc is None:
            return {}
        hit = np.unique(np.concatenate(touched))
        return dict(zip(hit.tolist(), acc[hit].tolist()))

    def search(self, query: str, k: int = SEARCH_RETURN_N) -> List[str]:
        scored = self.scores(query)
        # Anserini ranks by the float32 score, ties by document id (ascending)
        best = sorted(scored.items(), key=lambda kv: (-np.float32(kv[1]), self.doc_ids[kv[0]]))[:k]
        return [self.doc_ids[d] for d, _ in best]

    # ------------------------------------------------------------------ persistence

    def save(self, folder: str, fingerprint: str) -> None:
        """Write the index to ``folder`` (``bm25.npz`` + ``bm25.json``), tagged with ``fingerprint``."""
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, "bm25.tmp.npz")
        np.savez(tmp, indptr=self.indptr, post_docs=self.post_docs, post_tf=self.post_tf, doc_len=self.doc_len)
        with open(os.path.join(folder, "bm25.json.tmp"), "w", encoding="utf-8") as fh:
            json.dump({"format": INDEX_FORMAT, "fingerprint": fingerprint, "k1": self.k1, "b": self.b,
                       "doc_ids": self.doc_ids, "terms": list(self.terms)}, fh)
        os.replace(tmp, os.path.join(folder, "bm25.npz"))
        os.replace(os.path.join(folder, "bm25.json.tmp"), os.path.join(folder, "bm25.json"))

    @classmethod
    def load(cls, folder: str, fingerprint: str) -> Optional["BM25Index"]:
        """The index saved in ``folder`` if it was built from the same catalogue, else None."""
        meta_path, arr_path = os.path.join(folder, "bm25.json"), os.path.join(folder, "bm25.npz")
        if not (os.path.isfile(meta_path) and os.path.isfile(arr_path)):
            return None
        with open(meta_path, encoding="utf-8") as fh:
            meta = json.load(fh)
        if meta.get("format") != INDEX_FORMAT or meta.get("fingerprint") != fingerprint:
            log.info("webshop: BM25 cache %s is stale; rebuilding", folder)
            return None
        arrays = np.load(arr_path)
        terms = {t: i for i, t in enumerate(meta["terms"])}
        return cls(meta["doc_ids"], terms, arrays["indptr"], arrays["post_docs"], arrays["post_tf"],
                   arrays["doc_len"], meta["k1"], meta["b"])


# ---------------------------------------------------------------------- Lucene (pyserini)


class LuceneSearch:
    """WebShop's Lucene index (``search_engine/indexes``) through pyserini's LuceneSearcher."""

    def __init__(self, index_dir: str) -> None:
        if not os.path.isdir(index_dir):
            raise ValueError(f"webshop: Lucene index folder {index_dir} does not exist "
                             f"(build it with WebShop's search_engine/run_indexing.sh; docs/env_webshop.md)")
        try:
            from pyserini.search.lucene import LuceneSearcher
        except ImportError as exc:
            raise ValueError(f"webshop: search=lucene needs pyserini and Java 21 "
                             f"(pip install pyserini): {exc}") from None
        self.searcher = LuceneSearcher(index_dir)
        self._lock = threading.Lock()  # one JVM searcher shared by the replica's episodes

    def search(self, query: str, k: int = SEARCH_RETURN_N) -> List[str]:
        with self._lock:
            hits = self.searcher.search(query, k=k)
        return [h.docid for h in hits]
