"""One shopper's session in WebShop's text mode: pages, clicks, observations, the purchase.

Follows ``web_agent_site/envs/web_agent_text_env.py`` (``SimServer.receive`` and
``WebAgentTextEnv.step``/``get_available_actions``/``observation`` with
``observation_mode="text"``) over the pages of ``web_agent_site/templates``. Instead of rendering
HTML and parsing it back (Flask + BeautifulSoup), each page is built directly as the sequence
of visible strings WebShop's text mode extracts from it, joined by `` [SEP] `` (checked against
the real templates rendered and parsed the WebShop way), plus its clickables:

* search page: ``WebShop [SEP] Instruction: [SEP] <instruction> [SEP] Search``; search bar;
* results page: ``Instruction: [SEP] <instr> [SEP] Back to Search [SEP] Page p (Total results: n)
  [SEP] [< Prev [SEP]] Next > [SEP] <ASIN> [SEP] <title> [SEP] <price> ...`` (10 per page of
  the top 50; ``Next >`` is always shown, ``< Prev`` from page 2);
* item page: ``... [SEP] Back to Search [SEP] < Prev [SEP] <option name> [SEP] <value> ... [SEP]
  <title> [SEP] Price: <price> [SEP] Rating: N.A. [SEP] Description [SEP] Features [SEP] Reviews
  [SEP] Buy Now``; the chosen options are not shown (as in WebShop's simple text mode);
* Description / Features / Reviews pages: ``... [SEP] Back to Search [SEP] < Prev [SEP] <text>``.

Clickables are the lower-cased button texts and product ASINs, then the option values, in page
order. ``search[...]`` works on every page, ``click[...]`` only on a clickable of the current
page (other than ``search``); anything else changes nothing.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Dict, List, Mapping, Optional, Tuple

from serve.envs.webshop_catalogue import Catalogue
from serve.envs.webshop_reward import NounTagger, get_reward

SEP = " [SEP] "
PRODUCT_WINDOW = 10  # WebShop: results per page
END_BUTTON, NEXT_PAGE, PREV_PAGE, BACK_TO_SEARCH = "Buy Now", "Next >", "< Prev", "Back to Search"
SUB_PAGES = ("Description", "Features", "Reviews", "Attributes")
_ACTION = re.compile(r"(.+)\[(.+)\]")


def parse_action(action: str) -> Tuple[str, Optional[str]]:
    """WebShop ``engine.parse_action``: ``name[arg]`` -> (name, arg); otherwise (action, None)."""
    m = _ACTION.match(action)
    return (action, None) if m is None else (m.group(1), m.group(2))


def _visible(value: Any) -> List[str]:
    """How one template value shows in the text mode: stripped; dropped when empty or when it
    is whitespace with a newline (BeautifulSoup collapses it to '\\n', which is skipped)."""
    text = str(value)
    if text == "" or (not text.strip() and "\n" in text):
        return []
    return [text.strip()]


class ShopSession:
    """Page state of one episode (WebShop's ``user_sessions[session_id]`` plus the browser URL)."""

    def __init__(self, catalogue: Catalogue, goal: Mapping[str, Any], nouns: NounTagger,
                 show_attrs: bool = False) -> None:
        self.catalogue, self.goal, self.nouns, self.show_attrs = catalogue, goal, nouns, show_attrs
        self.done, self.reward = False, 0.0
        self.reward_info: Dict[str, Any] = {}
        self.searches = 0  # search[...] actions executed (the scripted expert's query counter)
        self._to_index()

    # ------------------------------------------------------------------ state changes

    def _to_index(self) -> None:
        self.page_name = "index"
        self.keywords: Optional[List[str]] = None
        self.page: Optional[int] = None
        self.asin: Optional[str] = None
        self.asins: set = set()
        self.options: Dict[str, str] = {}
        self.sub_page: Optional[str] = None
        self.results: List[Dict[str, Any]] = []
        self.actions: Dict[str, int] = defaultdict(int)

    def _to_results(self, keywords: List[str], page: int) -> None:
        self.page_name, self.keywords, self.page = "search_results", keywords, page
        self.actions["search"] += 1
        self.asin, self.options = None, {}
        self.results = self.catalogue.search(" ".join(keywords))

    def step(self, action: str) -> bool:
        """Apply one ``search[...]``/``click[...]``; False when it is not valid here (no change)."""
        if self.done:
            return False
        name, arg = parse_action(action)
        arg = arg.lower() if arg is not None else None
        if name == "search" and arg:
            self.searches += 1
            self._to_results(arg.split(" "), 1)
            return True
        if name == "click" and arg is not None and arg != "search" and arg in self.clickables():
            self._click(arg)
            return True
        return False

    def _click(self, name: str) -> None:
        kind, value = self.clickables()[name]
        if name == END_BUTTON.lower():
            self._buy()
        elif name == BACK_TO_SEARCH.lower():
            self._to_index()
        elif name == NEXT_PAGE.lower() and self.page_name == "search_results":
            self._to_results(self.keywords or [], (self.page or 1) + 1)
        elif name == PREV_PAGE.lower() and self.page_name == "search_results":
            self._to_results(self.keywords or [], (self.page or 1) - 1)
        elif name == PREV_PAGE.lower() and self.page_name == "item_sub_page":
            self.page_name = "item_page"
        elif name == PREV_PAGE.lower() and self.page_name == "item_page":
            self._to_results(self.keywords or [], self.page or 1)
        elif name in {s.lower() for s in SUB_PAGES}:
            self.page_name, self.sub_page = "item_sub_page", next(s for s in SUB_PAGES if s.lower() == name)
            self.actions[self.sub_page] += 1
        else:  # a product link or an option: (re)render the item page
            if kind == "product":
                self.asin = name.upper()
                self.actions["asin"] += 1
                self.asins.add(self.asin)
            elif kind == "option":
                self.options[value] = name
                self.actions["options"] += 1
            self.page_name = "item_page"

    def _buy(self) -> None:
        """WebShop ``SimServer.done``: score the current product and options against the goal."""
        product = self.catalogue.products[self.asin]
        self.actions["purchase"] += 1
        price = self.catalogue.prices[self.asin]
        self.reward, self.reward_info = get_reward(product, self.goal, price, self.options, self.nouns)
        self.reward_info.update(asin=self.asin, options=dict(self.options), price=price)
        self.done, self.page_name = True, "done"

    # ------------------------------------------------------------------ rendering

    def page_results(self) -> List[Dict[str, Any]]:
        """Products shown on the current results page."""
        p = self.page or 1
        return self.results[(p - 1) * PRODUCT_WINDOW:p * PRODUCT_WINDOW]

    def _layout(self) -> Tuple[List[str], List[Tuple[str, str, str]]]:
        """Visible strings and clickables ``(text, kind, option name)`` of the current page."""
        instr = ["Instruction:", *_visible(self.goal["instruction_text"])]
        buttons: List[Tuple[str, str, str]] = []
        if self.page_name == "index":
            return ["WebShop", *instr, "Search"], [("search", "button", "")]
        if self.page_name == "done":
            return ["Thank you for shopping with us!", "Your score (min 0.0, max 1.0)", str(self.reward)], []
        texts = [*instr, BACK_TO_SEARCH]
        buttons.append((BACK_TO_SEARCH, "button", ""))
        if self.page_name == "search_results":
            texts.append(f"Page {self.page} (Total results: {len(self.results)})")
            if (self.page or 1) > 1:
                texts.append(PREV_PAGE)
                buttons.append((PREV_PAGE, "button", ""))
            texts.append(NEXT_PAGE)
            buttons.append((NEXT_PAGE, "button", ""))
            for item in self.page_results():
                texts += [*_visible(item["asin"]), *_visible(item["Title"]), *_visible(item["Price"])]
                buttons.append((item["asin"], "product", ""))
            return texts, buttons
        texts.append(PREV_PAGE)
        buttons.append((PREV_PAGE, "button", ""))
        product = self.catalogue.products[self.asin]
        if self.page_name == "item_sub_page":
            if self.sub_page == "Description":
                texts += _visible(product["Description"])
            elif self.sub_page == "Features":
                for bullet in product["BulletPoints"]:
                    texts += _visible(" " + str(bullet))
            elif self.sub_page == "Attributes":
                for attr in product["Attributes"]:
                    texts += _visible(attr)
            # Reviews: WebShop loads no reviews, so the page has nothing more
            return texts, buttons
        options: List[Tuple[str, str, str]] = []
        for opt_name, values in product["options"].items():
            texts += _visible(opt_name)
            for value in values:
                texts += _visible(value)
                options.append((value, "option", opt_name))
        texts += [*_visible(product["Title"]), f"Price: {product['Price']}",
                  f"Rating: {product['Rating']}"]
        subs = list(SUB_PAGES[:3]) + (["Attributes"] if self.show_attrs else [])
        texts += subs + [END_BUTTON]
        buttons += [(s, "button", "") for s in subs] + [(END_BUTTON, "button", "")]
        return texts, buttons + options

    def clickables(self) -> Dict[str, Tuple[str, str]]:
        """WebShop ``text_to_clickable``: lower-cased buttons/links, then option values (a later
        equal key wins) -> (kind, option name)."""
        out: Dict[str, Tuple[str, str]] = {}
        for text, kind, opt_name in self._layout()[1]:
            out[text if kind == "option" else text.lower()] = (kind, opt_name)
        return out

    def observation(self) -> str:
        """The page in WebShop's simple text mode."""
        return SEP.join(self._layout()[0])

    def available_actions(self) -> Dict[str, Any]:
        """WebShop ``get_available_actions``."""
        return {"has_search_bar": self.page_name == "index", "clickables": list(self.clickables())}
