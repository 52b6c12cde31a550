"""WebArena task files, site URLs and the prompt of AgentTuning's held-out WebArena evaluation.

Task records are WebArena's ``config_files`` format, unchanged: ``task_id``, ``sites``,
``start_url`` (`` |AND| `` for several tabs), ``intent``, ``storage_state`` (a Playwright login
state file), ``geolocation`` and ``eval`` {``eval_types``, ``reference_answers``,
``reference_url``, ``url_note``, ``program_html``, ``string_note``}. Site placeholders
(``__SHOPPING__``, ``__SHOPPING_ADMIN__``, ``__REDDIT__``, ``__GITLAB__``, ``__WIKIPEDIA__``,
``__MAP__``, ``__HOMEPAGE__``; ``{SHOPPING}`` style is accepted too) are replaced by the URLs the
user configures (option ``sites`` or WebArena's environment variables ``SHOPPING`` ...), as
WebArena's ``scripts/generate_test_data.py`` does; files it already generated (real URLs) load
as they are.

The prompt is WebArena's ``p_cot_id_actree_2s`` (the one AgentTuning's ``eval-tgi.sh`` uses),
byte for byte: intro, two chain-of-thought examples, and the per-step template.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

from serve.envs.base import EnvError, read_json
from serve.envs.webarena_eval import EVAL_TYPES, SHOPPING_API_HELPERS, helper_calls

# site name -> WebArena's environment variable
SITE_VARS = {"shopping": "SHOPPING", "shopping_admin": "SHOPPING_ADMIN", "reddit": "REDDIT", "gitlab": "GITLAB",
             "wikipedia": "WIKIPEDIA", "map": "MAP", "homepage": "HOMEPAGE"}
# WebArena's URL_MAPPINGS: how each local site is named to the model.
REAL_URLS = {"reddit": "http://reddit.com", "shopping": "http://onestopmarket.com",
             "shopping_admin": "http://luma.com/admin", "gitlab": "http://gitlab.com",
             "wikipedia": "http://wikipedia.org", "map": "http://openstreetmap.org", "homepage": "http://homepage.com"}
_PLACEHOLDER = re.compile(r"__(SHOPPING_ADMIN|SHOPPING|REDDIT|GITLAB|WIKIPEDIA|MAP|HOMEPAGE)__"
                          r"|\{(SHOPPING_ADMIN|SHOPPING|REDDIT|GITLAB|WIKIPEDIA|MAP|HOMEPAGE)\}")
_REF_KINDS = ("exact_match", "must_include", "fuzzy_match")

INTRO = """You are an autonomous intelligent agent tasked with navigating a web browser. You will be given web-based tasks. These tasks will be accomplished through the use of specific actions you can issue.

Here's the information you'll have:
The user's objective: This is the task you're trying to complete.
The current web page's accessibility tree: This is a simplified representation of the webpage, providing key information.
The current web page's URL: This is the page you're currently navigating.
The open tabs: These are the tabs you have open.
The previous action: This is the action you just performed. It may be helpful to track your progress.

The actions you can perform fall into several categories:

Page Operation Actions:
`click [id]`: This action clicks on an element with a specific id on the webpage.
`type [id] [content] [press_enter_after=0|1]`: Use this to type the content into the field with id. By default, the "Enter" key is pressed after typing unless press_enter_after is set to 0.
`hover [id]`: Hover over an element with id.
`press [key_comb]`:  Simulates the pressing of a key combination on the keyboard (e.g., Ctrl+v).
`scroll [direction=down|up]`: Scroll the page up or down.

Tab Management Actions:
`new_tab`: Open a new, empty browser tab.
`tab_focus [tab_index]`: Switch the browser's focus to a specific tab using its index.
`close_tab`: Close the currently active tab.

URL Navigation Actions:
`goto [url]`: Navigate to a specific URL.
`go_back`: Navigate to the previously viewed page.
`go_forward`: Navigate to the next page (if a previous 'go_back' action was performed).

Completion Action:
`stop [answer]`: Issue this action when you believe the task is complete. If the objective is to find a text-based answer, provide the answer in the bracket. If you believe the task is impossible to complete, provide the answer as "N/A" in the bracket.

Homepage:
If you want to visit other websites, check out the homepage at http://homepage.com. It has a list of websites you can visit.
http://homepage.com/password.html lists all the account name and password for the websites. You can use them to log in to the websites.

To be successful, it is very important to follow the following rules:
1. You should only issue an action that is valid given the current observation
2. You should only issue one action at a time.
3. You should follow the examples to reason step by step and then issue the next action.
4. Generate the action in the correct format. Start with a "In summary, the next action I will perform is" phrase, followed by action inside ``````. For example, "In summary, the next action I will perform is ```click [1234]```".
5. Issue stop action when you think you have achieved the objective. Don't generate anything after stop."""

EXAMPLES: Tuple[Tuple[str, str], ...] = (
    ("""OBSERVATION:
[1744] link 'HP CB782A#ABA 640 Inkjet Fax Machine (Renewed)'
\t\t[1749] StaticText '$279.49'
\t\t[1757] button 'Add to Cart'
\t\t[1760] button 'Add to Wish List'
\t\t[1761] button 'Add to Compare'
URL: http://onestopmarket.com/office-products/office-electronics.html
OBJECTIVE: What is the price of HP Inkjet Fax Machine
PREVIOUS ACTION: None""",
     "Let's think step-by-step. This page list the information of HP Inkjet Fax Machine, which is the product "
     "identified in the objective. Its price is $279.49. I think I have achieved the objective. I will issue the stop "
     "action with the answer. In summary, the next action I will perform is ```stop [$279.49]```"),
    ("""OBSERVATION:
[164] textbox 'Search' focused: True required: False
[171] button 'Go'
[174] link 'Find directions between two points'
[212] heading 'Search Results'
[216] button 'Close'
URL: http://openstreetmap.org
OBJECTIVE: Show me the restaurants near CMU
PREVIOUS ACTION: None""",
     "Let's think step-by-step. This page has a search box whose ID is [164]. According to the nominatim rule of "
     "openstreetmap, I can search for the restaurants near a location by \"restaurants near\". I can submit my typing "
     "by pressing the Enter afterwards. In summary, the next action I will perform is "
     "```type [164] [restaurants near CMU] [1]```"),
)

TEMPLATE = """OBSERVATION:
{observation}
URL: {url}
OBJECTIVE: {objective}
PREVIOUS ACTION: {previous_action}"""


def opening_messages(first_observation: str) -> List[Dict[str, Any]]:
    """AgentTuning's chat layout for its Llama models (``get_lm_api_input``, provider ``llama``):
    intro, "Ok.", the two examples as turns, then the current step (all stripped)."""
    msgs: List[Dict[str, Any]] = [{"role": "user", "content": INTRO.strip()},
                                  {"role": "assistant", "content": "Ok.", "loss": False}]
    for obs, answer in EXAMPLES:
        msgs += [{"role": "user", "content": obs.strip()},
                 {"role": "assistant", "content": answer.strip(), "loss": False}]
    msgs.append({"role": "user", "content": first_observation.strip()})
    return msgs


# ---------------------------------------------------------------------- sites


def site_urls(option: Optional[Mapping[str, str]]) -> Dict[str, str]:
    """Configured site URLs: option ``sites`` first, then WebArena's environment variables."""
    option = dict(option or {})
    unknown = sorted(set(option) - set(SITE_VARS))
    if unknown:
        raise EnvError(f"webarena: option 'sites' has unknown site(s) {unknown}; known: {sorted(SITE_VARS)}")
    urls = {}
    for site, var in SITE_VARS.items():
        url = str(option.get(site) or os.environ.get(var) or "").strip()
        if url:
            # WebArena's README writes "<host>:7770"; a browser needs the scheme
            urls[site] = (url if "://" in url else "http://" + url).rstrip("/")
    return urls


def url_mappings(sites: Mapping[str, str]) -> Dict[str, str]:
    """Local site URL → the real-world name the model sees (configured sites only)."""
    return {url: REAL_URLS[site] for site, url in sites.items() if url}


def _resolve(value: Any, sites: Mapping[str, str], missing: set) -> Any:
    if isinstance(value, str):
        def sub(m: "re.Match[str]") -> str:
            site = (m.group(1) or m.group(2)).lower()
            if site not in sites:
                missing.add(site)
                return m.group(0)
            return sites[site]
        return _PLACEHOLDER.sub(sub, value)
    if isinstance(value, list):
        return [_resolve(v, sites, missing) for v in value]
    if isinstance(value, dict):
        return {k: _resolve(v, sites, missing) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------- records


def read_records(path: str) -> Tuple[List[Dict[str, Any]], str]:
    """(records, folder their relative paths start from) from a config folder or a JSON file."""
    if os.path.isdir(path):
        numbered = sorted((f for f in os.listdir(path) if re.fullmatch(r"\d+\.json", f)), key=lambda f: int(f[:-5]))
        if numbered:
            return [read_json(os.path.join(path, f), "webarena", "task file") for f in numbered], path
        for name in ("test.json", "test.raw.json"):
            if os.path.isfile(os.path.join(path, name)):
                return read_records(os.path.join(path, name))
        raise EnvError(f"webarena: {path} holds no WebArena task files (<n>.json, test.json or test.raw.json)")
    data = read_json(path, "webarena", "task file")
    records = data if isinstance(data, list) else [data]
    if not all(isinstance(r, dict) for r in records):
        raise EnvError(f"webarena: {path} must hold a task object or a JSON list of task objects")
    return records, os.path.dirname(os.path.abspath(path))


def check_record(rec: Mapping[str, Any]) -> str:
    """Why a record cannot run as a WebArena task ("" when it can)."""
    if not isinstance(rec.get("intent"), str) or not rec["intent"].strip():
        return "field 'intent' must be a non-empty string"
    if not isinstance(rec.get("start_url"), str) or not rec["start_url"].strip():
        return "field 'start_url' must be a non-empty string"
    ev = rec.get("eval")
    if not isinstance(ev, dict) or not isinstance(ev.get("eval_types"), list) or not ev["eval_types"]:
        return "field 'eval.eval_types' must be a non-empty list"
    bad = [t for t in ev["eval_types"] if t not in EVAL_TYPES]
    if bad:
        return f"eval.eval_types {bad} not supported (have {list(EVAL_TYPES)})"
    if "string_match" in ev["eval_types"]:
        refs = ev.get("reference_answers")
        if not isinstance(refs, dict) or not refs or set(refs) - set(_REF_KINDS):
            return f"string_match needs eval.reference_answers with keys among {list(_REF_KINDS)}"
        if not isinstance(refs.get("must_include", []), list):
            return "eval.reference_answers.must_include must be a list"
    if "url_match" in ev["eval_types"] and not str(ev.get("reference_url") or "").strip():
        return "url_match needs eval.reference_url"
    if "program_html" in ev["eval_types"]:
        targets = ev.get("program_html")
        if not isinstance(targets, list):  # an empty list checks nothing: WebArena scores it 1.0 (task 369)
            return "program_html needs an eval.program_html list"
        for t in targets:
            if not isinstance(t, dict) or not {"url", "locator", "required_contents"} <= set(t):
                return "each eval.program_html target needs url, locator and required_contents"
            req = t["required_contents"]
            known = isinstance(req, dict) and bool({"exact_match", "must_include"} & set(req))
            if not isinstance(req, str) and not known:
                return "required_contents must be a string or {exact_match: ...} / {must_include: [...]}"
    return ""


def helpers_used(rec: Mapping[str, Any]) -> List[str]:
    """Names of the evaluation helper functions a record's program_html calls (EnvError if unknown)."""
    names = []
    for t in rec["eval"].get("program_html") or []:
        for key in ("url", "locator"):
            value = str(t.get(key, ""))
            if value.startswith("func:"):
                names.append(helper_calls(value.split("func:", 1)[1]))
    return names


def needs_judge(rec: Mapping[str, Any]) -> bool:
    ev = rec["eval"]
    return "string_match" in ev["eval_types"] and "fuzzy_match" in (ev.get("reference_answers") or {})


def needs_shop_api(rec: Mapping[str, Any]) -> bool:
    return any(h in SHOPPING_API_HELPERS for h in helpers_used(rec))


def resolve_record(rec: Mapping[str, Any], sites: Mapping[str, str]) -> Tuple[Dict[str, Any], List[str]]:
    """(record with site placeholders replaced, sites it needs that have no URL)."""
    missing: set = set()
    out = _resolve(dict(rec), sites, missing)
    for site in rec.get("sites") or []:
        if site in SITE_VARS and site not in sites:
            missing.add(site)
    return out, sorted(missing)


def storage_state_file(value: Optional[str], auth_dir: Optional[str], task_dir: str) -> Optional[str]:
    """Where a record's ``storage_state`` (``./.auth/<sites>_state.json``) is on this machine."""
    if not value:
        return None
    candidates = [value] if os.path.isabs(value) else []
    if auth_dir:
        candidates.append(os.path.join(auth_dir, os.path.basename(value)))
    if not os.path.isabs(value):
        candidates += [os.path.join(task_dir, value), os.path.join(task_dir, "..", value)]
    for c in candidates:
        if os.path.isfile(c):
            return os.path.abspath(c)
    return None


def load_storage_state(path: str) -> Dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        state = json.load(fh)
    if not isinstance(state, dict):
        raise EnvError(f"webarena: {path} is not a Playwright storage state (an object with cookies/origins)")
    return state
