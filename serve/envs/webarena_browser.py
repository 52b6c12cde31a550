"""A thin WebArena browser over headless Chromium: Selenium for tabs and keys, CDP for the rest.

WebArena drives Chromium with Playwright; what its agents see and do goes through the Chrome
DevTools Protocol anyway (``Accessibility.getFullAXTree``, ``DOMSnapshot.captureSnapshot``, mouse
clicks at an element's centre). Debian's ``chromium`` + ``chromium-driver`` and Selenium are
installed everywhere this project runs (MiniWoB++ uses them), while Playwright's own browser
cannot be downloaded offline; so this adapter sends the same CDP commands through Selenium's
``execute_cdp_cmd`` and mirrors Playwright's calls:

* episode start = a fresh browser context in WebArena (``new_context(viewport=1280x720,
  storage_state=...)``): here a new tab replaces all others, cookies, cache and the storage of
  the origins visited are cleared, the viewport is set with ``Emulation.setDeviceMetricsOverride``
  and the storage-state file's cookies (``Network.setCookies``) and localStorage (a scratch tab
  per origin) are loaded; JavaScript dialogs are dismissed, as Playwright does by default;
* ``page.mouse.click(x, y)`` = ``Input.dispatchMouseEvent`` (move, press, release);
  ``keyboard.type`` / ``keyboard.press`` = WebDriver key actions on the focused element;
* tabs are kept in creation order, as Playwright's ``context.pages`` (pages a link opens join the
  end; the current tab does not change).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any, Dict, Iterable, List, Optional, Tuple
from urllib.parse import urlsplit

from serve.envs.base import EnvError
from serve.envs.webarena_actions import Action
from serve.envs.webarena_axtree import Window, attach_boxes, element_center, in_window, layout_boxes, render

log = logging.getLogger(__name__)

CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                "--disable-extensions", "--mute-audio")
_MODIFIERS = {"control": "CONTROL", "ctrl": "CONTROL", "shift": "SHIFT", "alt": "ALT", "meta": "META",
              "cmd": "COMMAND", "command": "COMMAND", "controlormeta": "CONTROL"}
_KEYS = {"enter": "ENTER", "tab": "TAB", "backspace": "BACKSPACE", "delete": "DELETE", "escape": "ESCAPE",
         "arrowdown": "ARROW_DOWN", "arrowup": "ARROW_UP", "arrowleft": "ARROW_LEFT", "arrowright": "ARROW_RIGHT",
         "end": "END", "home": "HOME", "insert": "INSERT", "pagedown": "PAGE_DOWN", "pageup": "PAGE_UP",
         "space": "SPACE", "backquote": "`", "minus": "-", "equal": "=", "backslash": "\\",
         **{f"f{i}": f"F{i}" for i in range(1, 13)}}


class ActionFailed(RuntimeError):
    """The action could not be carried out (WebArena's ``fail_error``: the step is a no-op)."""


def browser_paths() -> Tuple[str, str]:
    """(chromium binary, chromedriver); EnvError saying how to install them when absent."""
    binary = (os.environ.get("WEBARENA_CHROME_BINARY") or shutil.which("chromium")
              or shutil.which("chromium-browser") or shutil.which("google-chrome"))
    driver = os.environ.get("WEBARENA_CHROMEDRIVER") or shutil.which("chromedriver")
    if not binary or not driver:
        raise EnvError("webarena needs headless Chromium and its driver: apt-get install -y chromium "
                       "chromium-driver (or set WEBARENA_CHROME_BINARY and WEBARENA_CHROMEDRIVER)")
    return binary, driver


class Browser:
    """One Chromium with WebArena's page operations; not thread-safe (one episode at a time)."""

    def __init__(self, width: int = 1280, height: int = 720, page_load_timeout_s: float = 60.0) -> None:
        binary, driver_path = browser_paths()
        try:
            from selenium import webdriver
            from selenium.webdriver.chrome.service import Service
        except ImportError as exc:
            raise EnvError(f"webarena needs the PyPI package 'selenium': {exc}") from None
        opts = webdriver.ChromeOptions()
        for flag in CHROME_FLAGS + (f"--window-size={width},{height}",):
            opts.add_argument(flag)
        opts.binary_location = binary
        opts.set_capability("unhandledPromptBehavior", "dismiss")  # Playwright dismisses dialogs too
        self.driver = webdriver.Chrome(service=Service(driver_path), options=opts)
        self.driver.set_page_load_timeout(page_load_timeout_s)
        self.driver.set_script_timeout(30)
        self.width, self.height = int(width), int(height)
        self.tabs: List[str] = list(self.driver.window_handles)
        self._configured: set = set()
        self._origins: set = set()
        self.nodes: Dict[str, Dict[str, Any]] = {}  # element id -> node info of the last observation
        self.window = Window(0, 0, width, height)

    # ------------------------------------------------------------------ lifecycle

    def alive(self) -> bool:
        """The browser answers (a WebDriver round trip that does not touch the current tab)."""
        return bool(self.driver.window_handles)

    def close(self) -> None:
        self.driver.quit()

    def cdp(self, cmd: str, params: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        return self.driver.execute_cdp_cmd(cmd, params or {})

    def new_session(self, storage_state: Optional[Dict[str, Any]] = None,
                    geolocation: Optional[Dict[str, Any]] = None) -> None:
        """Forget the previous episode (tabs, history, cookies, storage) and log in as the state says."""
        d = self.driver
        d.switch_to.window(d.window_handles[0])  # the current tab may have been closed by its page
        d.switch_to.new_window("tab")
        fresh = d.current_window_handle
        for handle in list(d.window_handles):
            if handle != fresh:
                d.switch_to.window(handle)
                d.close()
        d.switch_to.window(fresh)
        self.tabs, self._configured = [fresh], set()
        self._configure()
        self.cdp("Network.clearBrowserCookies")
        self.cdp("Network.clearBrowserCache")
        for origin in self._origins:
            self.cdp("Storage.clearDataForOrigin", {"origin": origin, "storageTypes": "all"})
        self._origins = set()
        if geolocation:
            where = {k: geolocation[k] for k in ("latitude", "longitude", "accuracy") if k in geolocation}
            self.cdp("Emulation.setGeolocationOverride", where)
        if storage_state:
            self._load_storage_state(storage_state)

    def _load_storage_state(self, state: Dict[str, Any]) -> None:
        """Playwright's ``storage_state`` file: cookies, and localStorage per origin."""
        cookies = []
        for c in state.get("cookies") or []:
            cookie = {k: c[k] for k in ("name", "value", "domain", "path", "secure", "httpOnly") if k in c}
            if c.get("sameSite") in ("Strict", "Lax", "None"):
                cookie["sameSite"] = c["sameSite"]
            if isinstance(c.get("expires"), (int, float)) and c["expires"] > 0:
                cookie["expires"] = c["expires"]
            cookies.append(cookie)
        if cookies:
            self.cdp("Network.setCookies", {"cookies": cookies})
        origins = [o for o in state.get("origins") or [] if o.get("localStorage")]
        if not origins:
            return
        # localStorage needs a document of the origin: set it in a scratch tab (as Playwright
        # does), so the episode's tab has no history before its start URL
        episode_tab = self.driver.current_window_handle
        self.driver.switch_to.new_window("tab")
        for origin in origins:
            self.driver.get(origin["origin"])
            self.driver.execute_script("for (const [k, v] of arguments[0]) localStorage.setItem(k, v);",
                                       [[item["name"], item["value"]] for item in origin["localStorage"]])
            self._origins.add(origin["origin"])
        self.driver.close()
        self.driver.switch_to.window(episode_tab)

    def _configure(self) -> None:
        """Viewport of the current tab (once per tab): WebArena's 1280x720, device scale 1."""
        handle = self.driver.current_window_handle
        if handle in self._configured:
            return
        self.cdp("Emulation.setDeviceMetricsOverride", {
            "width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False,
            "screenWidth": self.width, "screenHeight": self.height})
        self.cdp("Accessibility.enable")
        self._configured.add(handle)

    # ------------------------------------------------------------------ pages

    @property
    def url(self) -> str:
        return self.driver.current_url

    def content(self) -> str:
        """The page's serialised DOM (Playwright's ``page.content()``)."""
        return self.driver.page_source

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the current page (``page.evaluate("() => expr")``)."""
        return self.driver.execute_script(f"return ({expression});")

    def goto(self, url: str) -> None:
        self.driver.get(url)
        self.wait_ready()

    def open(self, urls: Iterable[str]) -> None:
        """WebArena's ``start_url`` (`` |AND| ``-separated): one tab per URL, the first one current."""
        for i, url in enumerate(urls):
            if i:
                self.driver.switch_to.new_window("tab")
                self._sync_tabs()
                self._configure()
            self.goto(url)
        self._focus(0)

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Until the current document has loaded (the driver also waits for pending navigations)."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            try:
                if self.driver.execute_script("return document.readyState;") == "complete":
                    break
            except Exception as exc:  # noqa: BLE001 — a page between documents; try again
                log.debug("webarena: readyState not available yet: %s", exc)
            time.sleep(0.05)
        origin = urlsplit(self.url)
        if origin.scheme in ("http", "https"):
            self._origins.add(f"{origin.scheme}://{origin.netloc}")

    def _sync_tabs(self) -> None:
        handles = self.driver.window_handles
        self.tabs = [h for h in self.tabs if h in handles] + [h for h in handles if h not in self.tabs]

    def _focus(self, index: int) -> None:
        self.driver.switch_to.window(self.tabs[index])
        self._configure()
        self.cdp("Page.bringToFront")

    # ------------------------------------------------------------------ observation

    def observe(self, viewport_only: bool = True) -> str:
        """Tab list + accessibility tree of the current tab; ``self.nodes`` maps its element ids."""
        self._sync_tabs()
        try:
            current = self.driver.current_window_handle
        except Exception:  # noqa: BLE001 — the page closed its own tab (window.close())
            current = ""
        if current not in self.tabs:
            self._focus(len(self.tabs) - 1)
        self._configure()
        titles = {t["targetId"]: (t.get("title") or "", t.get("url") or "")
                  for t in self.cdp("Target.getTargets")["targetInfos"] if t.get("type") == "page"}
        current = self.driver.current_window_handle
        parts = []
        for i, handle in enumerate(self.tabs):
            title, url = titles.get(handle, ("", ""))
            title = "" if title == url else title  # Chromium reports the URL of an untitled page
            parts.append(f"Tab {i} (current): {title}" if handle == current else f"Tab {i}: {title}")
        snapshot = self.cdp("DOMSnapshot.captureSnapshot",
                            {"computedStyles": [], "includeDOMRects": True, "includePaintOrder": True})
        left, top, width, height = self.driver.execute_script(
            "return [window.pageXOffset, window.pageYOffset, window.screen.width, window.screen.height];")
        self.window = Window(float(left), float(top), float(width), float(height))
        nodes = attach_boxes(self.cdp("Accessibility.getFullAXTree")["nodes"], layout_boxes(snapshot))
        if viewport_only:
            nodes = in_window(nodes, self.window)
        tree, self.nodes = render(nodes)
        return " | ".join(parts) + "\n\n" + tree

    # ------------------------------------------------------------------ actions

    def execute(self, action: Action) -> None:
        """Carry out one action (WebArena's ``execute_action``); ActionFailed when it cannot."""
        k = action.kind
        if k in ("click", "hover", "type"):
            node = self.nodes.get(action.element_id)
            center = element_center(node, self.window) if node else None
            if center is None:
                raise ActionFailed(f"no element [{action.element_id}] with a position on the page")
            self._mouse(*center, click=k != "hover")
            if k == "type":
                self._type(action.text)
        elif k == "scroll":
            sign = "-" if action.direction == "up" else "+"
            self.driver.execute_script("const e = document.scrollingElement || document.body; "
                                       f"e.scrollTop = e.scrollTop {sign} window.innerHeight;")
        elif k == "press":
            self._press(action.text)
        elif k == "goto":
            try:
                self.driver.get(action.text)
            except Exception as exc:  # noqa: BLE001 — a bad URL is a failed action, as in Playwright
                raise ActionFailed(f"cannot open {action.text!r}: {type(exc).__name__}") from exc
        elif k == "go_back":
            self.driver.back()
        elif k == "go_forward":
            self.driver.forward()
        elif k == "new_tab":
            self.driver.switch_to.new_window("tab")
            self._sync_tabs()
            self._configure()
        elif k == "tab_focus":
            self._sync_tabs()
            if not 0 <= action.tab < len(self.tabs):
                raise ActionFailed(f"there is no tab {action.tab}")
            self._focus(action.tab)
        elif k == "close_tab":
            self._sync_tabs()
            if len(self.tabs) == 1:  # Playwright opens a blank page; closing Selenium's last window ends it
                self.driver.switch_to.new_window("tab")
                self._sync_tabs()
                self._focus(0)
            self.driver.close()
            self._sync_tabs()
            self._focus(len(self.tabs) - 1)
        if k in ("click", "type", "press"):
            time.sleep(0.15)  # let a click or key start its navigation before waiting for the load
        self.wait_ready()

    def _mouse(self, x: float, y: float, click: bool) -> None:
        self.cdp("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})
        if click:
            for kind in ("mousePressed", "mouseReleased"):
                self.cdp("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left",
                                                      "clickCount": 1})

    def _type(self, text: str) -> None:
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.keys import Keys

        chain = ActionChains(self.driver)
        for chunk in text.split("\n")[:-1]:
            chain.send_keys(chunk).send_keys(Keys.ENTER)
        chain.send_keys(text.split("\n")[-1])
        chain.perform()

    def _press(self, key_comb: str) -> None:
        """Playwright-style ``Control+a`` / ``Enter`` / ``PageDown`` combinations."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.keys import Keys

        parts = key_comb.split("+") if key_comb != "+" else ["+"]
        mods, key = parts[:-1], parts[-1]
        try:
            mod_keys = [getattr(Keys, _MODIFIERS[m.lower()]) for m in mods]
        except KeyError as exc:
            raise ActionFailed(f"unknown modifier in {key_comb!r}") from exc
        if len(key) == 1:
            main = key
        elif key.lower() in _MODIFIERS:
            main = getattr(Keys, _MODIFIERS[key.lower()])
        elif key.lower() in _KEYS:
            name = _KEYS[key.lower()]
            main = getattr(Keys, name) if len(name) > 1 else name
        else:
            raise ActionFailed(f"unknown key {key!r}")
        chain = ActionChains(self.driver)
        for m in mod_keys:
            chain.key_down(m)
        chain.send_keys(main)
        for m in reversed(mod_keys):
            chain.key_up(m)
        chain.perform()
