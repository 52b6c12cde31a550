"""WebShop (held-in) on AgentBench.old's protocol, with WebShop's pages, search and reward.

Data (``path``): a folder laid out like WebShop's ``data/`` (``items_shuffle.json``,
``items_ins_v2.json``, ``items_human_ins.json``; the ``*_1000.json`` preview files are used when
the full ones are absent) — or name each file with the options ``products``, ``attributes``,
``goals`` (WebShop's human-instruction file, or an explicit goals list; see
:mod:`serve.envs.webshop_catalogue`). Default: ``data_file("webshop")`` (not shipped:
docs/env_webshop.md says how to download it). Search: ``search="bm25"`` (built in, any catalogue;
``bm25_cache`` saves the index), ``"lucene"`` (WebShop's pyserini index folder ``index``), or
``"auto"`` (Lucene when ``index`` is set, else BM25).

Tasks are goal indexes into WebShop's shuffled human goals (AgentBench's ``session_int``):
split ``std`` = 0-199 (AgentBench's standard set), ``dev`` = 200-279 (AgentBench.old's dev),
``valid`` = 280-1499 (rest of WebShop's test/validation goals), ``train`` = 1500- (WebShop's
training goals); ``splits={name: [start, end]}`` overrides (end null = to the last goal).

Protocol (AgentBench.old ``src/tasks/webshop/__init__.py``): the instruction prompt, the agent's
"Ok.", a one-shot episode (demonstration turns carry ``loss: false``), then turns of
``Observation:\\n<page text>\\n\\nAvailable Actions:\\n<{'has_search_bar': ..., 'clickables':
[...]}>``. The agent answers ``Thought:\\n...\\n\\nAction:\\nsearch[...]`` or ``click[...]``: the
action is the first match of ``[Aa]ction: *\\n *((search|click)\\[.+?])``; a reply without one
ends the episode (reward 0, status ``invalid_format``), as AgentBench does. A valid action that
WebShop ignores (a click on something not on the page) leaves the page unchanged and is marked
``info["invalid"] = "invalid_action"``; the episode goes on. ``click[Buy Now]`` ends the episode
with WebShop's reward (:mod:`serve.envs.webshop_reward`; ``info`` has its parts). 10 rounds.
"""

from __future__ import annotations

import logging
import os
import random
import re
from typing import Any, Dict, List, Optional, Tuple

from serve.envs.base import Env, EnvError, InvalidAction, Status, StepResult, Task, data_file, register
from serve.envs.webshop_catalogue import (
    Catalogue, cached, explicit_goals, file_fingerprint, human_goals, load_products, product_prices,
    read_json_file,
)
from serve.envs.webshop_pages import BACK_TO_SEARCH, END_BUTTON, NEXT_PAGE, PREV_PAGE, ShopSession
from serve.envs.webshop_reward import goal_option_values, make_noun_tagger, normalize_color, token_set_ratio
from serve.envs.webshop_search import BM25Index, LuceneSearch, SearchEngine, product_document, write_documents

log = logging.getLogger(__name__)

DEFAULT_DIR = "webshop"
FILES = {  # option -> WebShop's file names, full catalogue first, then the 1,000-product preview
    "products": ("items_shuffle.json", "items_shuffle_1000.json"),
    "attributes": ("items_ins_v2.json", "items_ins_v2_1000.json"),
    "goals": ("items_human_ins.json",),
}
DEFAULT_SPLITS = {"std": [0, 200], "dev": [200, 280], "valid": [280, 1500], "train": [1500, None]}

PROMPT = """
You are web shopping.
I will give you instructions about what to do.
You have to follow the instructions.
Every round I will give you an observation and a list of available actions, \
you have to respond an action based on the state and instruction.
You can use search action if search is available.
You can click one of the buttons in clickables.
An action should be of the following structure:
search[keywords]
click[value]
If the action is not valid, perform nothing.
Keywords in search are up to you, but the value in click must be a value in the list of available actions.
Remember that your keywords in search should be carefully designed.
Your response should use the following format:

Thought:
I think ...

Action:
click[something]
"""
ACK = "Ok."
_INSTR = "i need a long lasting 6.76 fl oz bottle of l'eau d'issey, and price lower than 100.00 dollars"
_ITEM = (f"Instruction: [SEP] {_INSTR} [SEP] Back to Search [SEP] < Prev [SEP] size [SEP] 2.5 fl oz [SEP] "
         "6.76 fl oz (pack of 1) [SEP] L'eau D'issey By Issey Miyake for MenEau De Toilette Spray, 6.7 Fl Oz "
         "Bottle [SEP] Price: $64.98 [SEP] Rating: N.A. [SEP] Description [SEP] Features [SEP] Reviews [SEP] "
         "Buy Now")
_RESULTS = [("B000VOHH8I", "L'eau D'issey By Issey Miyake for MenEau De Toilette Spray, 6.7 Fl Oz Bottle", "$64.98"),
            ("B000MJZOPK", "L'eau d'Issey by Issey Miyake for Women 3.3 oz Eau de Toilette Spray", "$49.98"),
            ("B0012S249E", "L'eau D'issey By Issey Miyake For Women. Shower Cream 6.7-Ounces", "$31.36"),
            ("B01H8PGKZS", "L'eau D'Issey FOR MEN by Issey Miyake - 6.7 oz EDT Spray", "$67.97"),
            ("B00G3C8FHE", "L'Eau d'Issey pour Homme - Eau de Toilette 4.2 fl oz", "$51.25"),
            ("B000R94HRG", "Issey Miyake L'Eau D'Issey Pour Homme Eau De Toilette Natural Spray", "$44.99"),
            ("B000C214CO", "Issey Miyake L'eau D'issey Eau de Toilette Spray for Men, 4.2 Fl Oz", "$53.99"),
            ("B0018SBRDC", "Issey Miyake L'eau d'Issey for Women EDT, White, 0.84 Fl Oz", "$27.04"),
            ("B000XEAZ9Y", "L'eau De Issey By Issey Miyake For Men. Eau De Toilette Spray 6.7 Fl Oz", "$67.08"),
            ("B079HZR2RX", "L'eau d'Issey Pure by Issey Miyake for Women 3.0 oz Nectar de Parfum Spray", "$71.49")]


def _demo_turn(obs: str, n_clickables: int, search_bar: bool = False) -> str:
    clicks = ", ".join(['"..."'] * n_clickables)
    return (f'Observation:\n"{obs}"\n\nAvailable Actions:\n'
            f'{{"has_search_bar": {"true" if search_bar else "false"}, "clickables": [{clicks}]}}')


# AgentBench.old's one-shot episode (user observation, agent reply), in its own wording.
ONE_SHOT: List[Tuple[str, str]] = [
    (_demo_turn(f"WebShop [SEP] Instruction: [SEP] {_INSTR} [SEP] Search", 1, True),
     "Thought:\nI think I should use the search bar to look for the product I need.\n\n"
     "Action:\nsearch[l'eau d'issey 6.76 fl oz bottle price < 100.00]"),
    (_demo_turn(f"Instruction: [SEP] {_INSTR} [SEP] Back to Search [SEP] Page 1 (Total results: 50) [SEP] Next > [SEP] "
                + " [SEP] ".join(" [SEP] ".join(r) for r in _RESULTS), 12),
     "Thought:\nI think I should click on the product I need, which is B000VOHH8I.\n\nAction:\nclick[B000VOHH8I]"),
    (_demo_turn(_ITEM, 8),
     "Thought:\nI think I should click on the '6.76 fl oz (pack of 1)' option to select the size I need.\n\n"
     "Action:\nclick[6.76 fl oz (pack of 1)]"),
    (_demo_turn(_ITEM, 8),
     "Thought:\nI think I should click on the 'Buy Now' button to purchase the product.\n\nAction:\nclick[Buy Now]"),
]

_AGENT_ACTION = re.compile(r"[Aa]ction: *\n *((search|click)\[.+?])")
FORMAT_FEEDBACK = ("Invalid format: no action found. Answer with 'Thought:' and your reasoning, then a line "
                   "'Action:' and on the next line search[keywords] or click[value].")
_PRICE_TEXT = re.compile(r",? and price lower than [\d.]+ dollars$")


def parse_agent_action(text: str) -> Optional[str]:
    """AgentBench's action extraction; None when the reply has no well-formed action."""
    m = _AGENT_ACTION.search(text)
    return m.group(1) if m else None


def format_turn(session: ShopSession) -> str:
    """A user turn as AgentBench writes it (the actions dict in Python's repr, as printed there)."""
    return f"Observation:\n{session.observation()}\n\nAvailable Actions:\n{session.available_actions()}"


def _default_folder() -> str:
    try:
        return data_file(DEFAULT_DIR)
    except EnvError as exc:
        raise EnvError(f"webshop: {exc}. WebShop's catalogue is not shipped; docs/env_webshop.md says how "
                       f"to download it, or pass path=<folder> / products=, goals=") from None


def _pick(folder: Optional[str], option: str, given: Optional[str]) -> Optional[str]:
    if given:
        return given
    for name in FILES[option] if folder else ():
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


@register("webshop")
class WebShopEnv(Env):
    """WebShop shopping episodes over a shared, read-only catalogue (one per configuration)."""

    default_max_turns = 10  # AgentBench.old: for j in range(10)

    def __init__(self, path: Optional[str] = None, *, products: Optional[str] = None,
                 attributes: Optional[str] = None, goals: Optional[str] = None, search: str = "auto",
                 index: Optional[str] = None, bm25_cache: Optional[str] = None,
                 num_products: Optional[int] = None, noun_tagger: str = "auto", price_seed: int = 0,
                 splits: Optional[Dict[str, List[Optional[int]]]] = None, show_attrs: bool = False,
                 **options: Any) -> None:
        folder = path or (None if products else _default_folder())
        if folder and not os.path.isdir(folder):
            raise EnvError(f"webshop: path {folder} must be a folder with WebShop's data files "
                           f"(items_shuffle.json, items_ins_v2.json, items_human_ins.json)")
        self.files = {k: _pick(folder, k, v) for k, v in
                      (("products", products), ("attributes", attributes), ("goals", goals))}
        for key in ("products", "goals"):
            if not self.files[key]:
                raise EnvError(f"webshop: no {key} file: pass {key}=PATH or a data folder holding "
                               f"{' or '.join(FILES[key])} (docs/env_webshop.md)")
        if index is None and folder and os.path.isdir(os.path.join(folder, "indexes")) and search == "lucene":
            index = os.path.join(folder, "indexes")
        if search not in ("auto", "bm25", "lucene"):
            raise EnvError(f"webshop: option 'search' must be auto, bm25 or lucene, got {search!r}")
        self.search_kind = "lucene" if search == "lucene" or (search == "auto" and index) else "bm25"
        if self.search_kind == "lucene" and not index:
            raise EnvError("webshop: search=lucene needs index=<WebShop search_engine/indexes folder>")
        self.index, self.bm25_cache = index, bm25_cache
        self.num_products, self.price_seed, self.show_attrs = num_products, int(price_seed), bool(show_attrs)
        self.split_ranges = dict(splits or DEFAULT_SPLITS)
        try:
            self.nouns = make_noun_tagger(noun_tagger)
        except ValueError as exc:
            raise EnvError(str(exc)) from None
        options.setdefault("max_invalid", options.get("max_turns") or self.default_max_turns)
        super().__init__(folder, **options)

    # ------------------------------------------------------------------ catalogue and tasks

    def _build_catalogue(self) -> Catalogue:
        files = self.files
        log.info("webshop: loading catalogue %s", files["products"])
        raw = read_json_file(files["products"], "products file")
        if not isinstance(raw, list):
            raise EnvError(f"webshop: products file {files['products']} must hold a JSON list of products")
        if self.num_products is not None:
            raw = raw[:int(self.num_products)]  # WebShop: the file is already shuffled
        attrs = read_json_file(files["attributes"], "attributes file") if files["attributes"] else {}
        bad_products: Dict[str, str] = {}
        items = load_products(raw, attrs, bad_products)
        for asin, reason in bad_products.items():
            log.warning("webshop: product %s not loaded: %s", asin, reason)
        by_asin = {p["asin"]: p for p in items}
        rng = random.Random(self.price_seed)
        prices = product_prices(items, rng)
        spec = read_json_file(files["goals"], "goals file")
        bad_goals: Dict[str, str] = {}
        if isinstance(spec, dict):
            goal_list = [(str(i), g) for i, g in enumerate(human_goals(items, spec, prices, rng))]
        elif isinstance(spec, list):
            goal_list = explicit_goals(spec, by_asin, bad_goals)
        else:
            raise EnvError(f"webshop: goals file {files['goals']} must be WebShop's human instructions "
                           f"({{asin: [...]}}) or a list of goals")
        engine = self._search_engine(items)
        return Catalogue(by_asin, prices, goal_list, engine, bad_products, bad_goals)

    def _search_engine(self, items: List[Dict[str, Any]]) -> SearchEngine:
        if self.search_kind == "lucene":
            try:
                return LuceneSearch(self.index)
            except ValueError as exc:
                raise EnvError(str(exc)) from None
        fingerprint = f"{file_fingerprint(self.files['products'], self.files['attributes'])}|{self.num_products}"
        if self.bm25_cache:
            loaded = BM25Index.load(self.bm25_cache, fingerprint)
            if loaded is not None:
                return loaded
        index = BM25Index.build((p["asin"], product_document(p)) for p in items)
        if self.bm25_cache:
            index.save(self.bm25_cache, fingerprint)
        return index

    def load_tasks(self, path: Optional[str]) -> List[Task]:
        key = (tuple(sorted(self.files.items())), self.num_products, self.price_seed, self.search_kind,
               self.index, self.bm25_cache)
        self.catalogue = cached(key, self._build_catalogue)
        ranges = []
        for name, bounds in self.split_ranges.items():
            try:
                lo, hi = list(bounds)
                ranges.append((str(name), int(lo), len(self.catalogue.goals) if hi is None else int(hi)))
            except (TypeError, ValueError):
                raise EnvError(f"webshop: split {name!r} must be [start, end] (end null = last goal), "
                               f"got {bounds!r}") from None
        tasks = []
        for i, (tid, goal) in enumerate(self.catalogue.goals):
            split = next((n for n, lo, hi in ranges if lo <= i < hi), None)
            if split is None:
                continue
            if goal is None:
                self.skip(tid, self.catalogue.skipped_goals.get(tid, "unusable goal record"))
                continue
            tasks.append(Task(tid, {**goal, "index": i}, split=split))
        return tasks

    # ------------------------------------------------------------------ episode

    def start(self, task: Task) -> List[Dict[str, Any]]:
        self.session = ShopSession(self.catalogue, task.data, self.nouns, self.show_attrs)
        messages: List[Dict[str, Any]] = [{"role": "user", "content": PROMPT},
                                          {"role": "assistant", "content": ACK, "loss": False}]
        for user, agent in ONE_SHOT:
            messages += [{"role": "user", "content": user},
                         {"role": "assistant", "content": agent, "loss": False}]
        messages.append({"role": "user", "content": format_turn(self.session)})
        return messages

    def act(self, action: str) -> StepResult:
        parsed = parse_agent_action(action)
        if parsed is None:
            return StepResult(FORMAT_FEEDBACK, done=True, status=Status.INVALID_FORMAT,
                              info={"invalid": Status.INVALID_FORMAT.value})
        if not self.session.step(parsed):
            # WebShop performs nothing: the same page again
            raise InvalidAction(format_turn(self.session))
        info: Dict[str, Any] = {"action": parsed, "page": self.session.page_name}
        if self.session.done:
            info.update(self.session.reward_info)
            return StepResult(format_turn(self.session), reward=float(self.session.reward), done=True, info=info)
        return StepResult(format_turn(self.session), info=info)

    def end_episode(self) -> None:
        pass  # the session holds no resources; it stays readable for inspection after the end

    # ------------------------------------------------------------------ scripted expert

    def expert_queries(self) -> List[str]:
        """Searches the expert tries in turn: the instruction without its price clause, the goal's
        attributes with the product's search query, the product's title."""
        goal = self.current.data
        instruction = _PRICE_TEXT.sub("", goal["instruction_text"]).strip()
        return [instruction, " ".join([*goal["attributes"], goal["query"]]), str(goal["name"])]

    def expert_options(self) -> Dict[str, str]:
        """Option name -> value that best matches each goal option (WebShop's option scoring)."""
        product = self.catalogue.products[self.current.data["asin"]]
        chosen: Dict[str, Tuple[int, str]] = {}
        for g_opt in goal_option_values(self.current.data):
            g_norm = normalize_color(g_opt)
            best: Optional[Tuple[int, str, str]] = None
            for opt_name, values in product["options"].items():
                for value in values:
                    score = 101 if value == g_opt.lower() else token_set_ratio(normalize_color(value), g_norm)
                    if best is None or score > best[0]:
                        best = (score, opt_name, value)
            if best is not None and best[0] > chosen.get(best[1], (-1, ""))[0]:
                chosen[best[1]] = (best[0], best[2])
        return {name: value for name, (_, value) in chosen.items()}

    def expert_action(self) -> str:
        """Search, page to the goal's product, click it, choose the goal's options, buy."""
        sess, target = self.session, self.current.data["asin"]
        queries = self.expert_queries()
        if sess.page_name == "index":
            q = queries[min(sess.searches, len(queries) - 1)]
            return f"Thought:\nI think I should search for the product I need.\n\nAction:\nsearch[{q}]"
        if sess.page_name == "search_results":
            found = [p["asin"] for p in sess.results]
            shown = [p["asin"] for p in sess.page_results()]
            if target in shown:
                return f"Thought:\nI think {target} is the product I need.\n\nAction:\nclick[{target}]"
            if target in found:
                later = found.index(target) >= (sess.page or 1) * 10
                button = NEXT_PAGE if later else PREV_PAGE
                return f"Thought:\nI think the product I need is on another page.\n\nAction:\nclick[{button}]"
            if sess.searches < len(queries):
                return ("Thought:\nI think none of these results fits; I should search again.\n\n"
                        f"Action:\nclick[{BACK_TO_SEARCH}]")
            top = shown[0] if shown else None
            return (f"Thought:\nI think I should look at {top}.\n\nAction:\nclick[{top}]" if top else
                    f"Thought:\nI think I should search again.\n\nAction:\nclick[{BACK_TO_SEARCH}]")
        if sess.page_name == "item_page":
            if sess.asin != target and sess.searches < len(queries):
                return f"Thought:\nI think this is not the product I need.\n\nAction:\nclick[{PREV_PAGE}]"
            for opt_name, value in self.expert_options().items():
                if sess.options.get(opt_name) != value:
                    return (f"Thought:\nI think I should choose the '{value}' option for {opt_name}.\n\n"
                            f"Action:\nclick[{value}]")
            return f"Thought:\nI think I should buy this product now.\n\nAction:\nclick[{END_BUTTON}]"
        return f"Thought:\nI think I should go back to the product.\n\nAction:\nclick[{PREV_PAGE}]"


def export_documents(folder: str, out: str, products: Optional[str] = None,
                     attributes: Optional[str] = None) -> int:
    """Write the Lucene input (WebShop's index documents) for the catalogue in ``folder``."""
    items = load_products(read_json_file(_pick(folder, "products", products) or "", "products file"),
                          read_json_file(p, "attributes file") if (p := _pick(folder, "attributes", attributes)) else {},
                          {})
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    return write_documents(items, out)


if __name__ == "__main__":  # python -m serve.envs.webshop export-documents DATA_DIR OUT.jsonl
    import sys

    if len(sys.argv) != 4 or sys.argv[1] != "export-documents":
        sys.exit("usage: python -m serve.envs.webshop export-documents WEBSHOP_DATA_DIR OUT/documents.jsonl")
    print(f"{export_documents(sys.argv[2], sys.argv[3])} documents written to {sys.argv[3]}")
