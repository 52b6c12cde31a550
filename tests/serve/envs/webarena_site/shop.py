"""A tiny shop for the WebArena environment's offline tests (our own pages, not WebArena's).

Served by ``http.server`` on 127.0.0.1 (port 0 = a free port) in a background thread:

* ``/``              home: navigation links, a search form (``searchbox 'Search'``), featured items;
* ``/search?q=...``  products whose name holds every word of the query;
* ``/products``      all 12 products, one tall row each (the last ones are below the fold);
* ``/product/<slug>``  name, price, SKU, review count, an "Add to Wish List" button (POST);
* ``/wishlist``      the session's wish list (``#wishlist``) — what program_html checks;
* ``/account``       the signed-in customer's details, when the ``customer=emma`` cookie is set
  (the tests' login state file sets it), with a nickname read from localStorage; else a sign-in
  notice.

Wish lists belong to a session cookie, so each episode (fresh cookies) starts with an empty one.

Run as a script to browse it: ``python tests/serve/envs/webarena_site/shop.py`` (prints the URL).
"""

from __future__ import annotations

import html
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Tuple
from urllib.parse import parse_qs, urlsplit

# slug, name, price, sku, reviews
PRODUCTS: List[Tuple[str, str, str, str, int]] = [
    ("blue-ceramic-mug", "Blue Ceramic Mug", "$12.99", "MUG-001", 3),
    ("green-teapot", "Green Teapot", "$34.50", "TEA-002", 7),
    ("red-kettle", "Red Kettle", "$45.00", "KET-003", 0),
    ("bamboo-cutting-board", "Bamboo Cutting Board", "$19.95", "BCB-004", 12),
    ("cast-iron-skillet", "Cast Iron Skillet", "$39.00", "CIS-005", 25),
    ("glass-water-bottle", "Glass Water Bottle", "$15.49", "GWB-006", 4),
    ("linen-napkins", "Linen Napkins (Set of 4)", "$22.00", "LIN-007", 1),
    ("steel-chef-knife", "Steel Chef Knife", "$59.99", "SCK-008", 9),
    ("walnut-salad-bowl", "Walnut Salad Bowl", "$48.00", "WSB-009", 2),
    ("wool-throw-blanket", "Wool Throw Blanket", "$79.00", "WTB-010", 6),
    ("copper-measuring-cups", "Copper Measuring Cups", "$27.50", "CMC-011", 5),
    ("ceramic-vase", "Ceramic Vase", "$31.00", "VAS-012", 8),
]
BY_SLUG = {p[0]: p for p in PRODUCTS}
STYLE = "body{font-family:sans-serif;margin:8px} .row{height:150px;border-bottom:1px solid #ccc}"


def page(title: str, body: str) -> bytes:
    nav = ('<nav><a href="/">Home</a> | <a href="/products">All Products</a> | <a href="/account">My Account</a>'
           ' | <a href="/wishlist">My Wish List</a></nav>'
           '<form action="/search" method="get" role="search"><input type="search" name="q" aria-label="Search">'
           '<button type="submit">Search</button></form>')
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{nav}<main>{body}</main></body></html>").encode()


def product_rows(items: List[Tuple[str, str, str, str, int]]) -> str:
    return "<ul>" + "".join(f'<li class="row"><a href="/product/{s}">{html.escape(n)}</a> <span>{p}</span></li>'
                            for s, n, p, _, _ in items) + "</ul>"


class Shop(BaseHTTPRequestHandler):
    wishlists: Dict[str, List[str]] = {}  # session id -> product slugs (set per server in serve())

    def log_message(self, fmt: str, *args: object) -> None:  # keep test output quiet
        pass

    def _session(self) -> Tuple[str, bool]:
        cookies = dict(c.strip().split("=", 1) for c in self.headers.get("Cookie", "").split(";") if "=" in c)
        if cookies.get("sid"):
            return cookies["sid"], False
        return secrets.token_hex(8), True

    def _send(self, code: int, body: bytes = b"", location: str = "") -> None:
        sid, new = self._session()
        self.send_response(code)
        if new:
            self.send_header("Set-Cookie", f"sid={sid}; Path=/")
        if location:
            self.send_header("Location", location)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 — http.server's name
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if url.path == "/":
            body = "<h1>One Stop Market</h1><h2>Featured</h2>" + product_rows(PRODUCTS[:3])
            return self._send(200, page("One Stop Market", body))
        if url.path == "/search":
            q = (query.get("q") or [""])[0]
            words = q.lower().split()
            hits = [p for p in PRODUCTS if words and all(w in p[1].lower() for w in words)]
            body = f"<h1>Search results for: {html.escape(q)}</h1>"
            body += product_rows(hits) if hits else "<p>Your search returned no results.</p>"
            return self._send(200, page(f"Search results for: {q}", body))
        if url.path == "/products":
            return self._send(200, page("All Products", "<h1>All Products</h1>" + product_rows(PRODUCTS)))
        if url.path.startswith("/product/") and url.path[len("/product/"):] in BY_SLUG:
            slug, name, price, sku, reviews = BY_SLUG[url.path[len("/product/"):]]
            body = (f"<h1>{html.escape(name)}</h1><p class='price'>{price}</p><p>SKU: {sku}</p>"
                    f"<p>{reviews} Reviews</p><form action='/wishlist/add' method='post'>"
                    f"<input type='hidden' name='slug' value='{slug}'><button>Add to Wish List</button></form>")
            return self._send(200, page(name, body))
        if url.path == "/wishlist":
            items = [BY_SLUG[s][1] for s in self.wishlists.get(self._session()[0], [])]
            listing = "".join(f"<li>{html.escape(n)}</li>" for n in items) or "<li>You have no items in your wish list.</li>"
            return self._send(200, page("My Wish List", f"<h1>My Wish List</h1><ul id='wishlist'>{listing}</ul>"))
        if url.path == "/account":
            if "customer=emma" in self.headers.get("Cookie", ""):
                body = ("<h1>My Account</h1><p>Welcome, Emma Lopez!</p><h2>Contact Information</h2>"
                        "<p>Emma Lopez</p><p>emma.lopez@example.com</p><p id='nick'></p><script>"
                        "document.getElementById('nick').textContent = 'Nickname: ' + "
                        "(localStorage.getItem('nickname') || 'none');</script>")
            else:
                body = "<h1>Customer Login</h1><p>Please sign in to see your account.</p>"
            return self._send(200, page("My Account", body))
        return self._send(404, page("404 Not Found", "<h1>Whoops, our bad...</h1>"))

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        form = parse_qs(self.rfile.read(length).decode())
        sid, _ = self._session()
        if urlsplit(self.path).path == "/wishlist/add" and (form.get("slug") or [""])[0] in BY_SLUG:
            self.wishlists.setdefault(sid, []).append(form["slug"][0])
            return self._send(303, location="/wishlist")
        return self._send(400, page("Bad request", "<h1>Bad request</h1>"))


def serve() -> Tuple[ThreadingHTTPServer, str]:
    """Start the shop on a free 127.0.0.1 port; (server, base URL). Stop with ``server.shutdown()``."""
    handler = type("ShopHandler", (Shop,), {"wishlists": {}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


if __name__ == "__main__":
    srv, base = serve()
    print(base, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        srv.shutdown()
