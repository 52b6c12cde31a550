"""The KG environment's one SPARQL client, and a small local SPARQL endpoint for offline use.

:class:`SparqlClient` speaks the SPARQL 1.1 Protocol (form-encoded POST, JSON results) to any
endpoint: the Freebase Virtuoso server AgentBench uses (``http://HOST:3001/sparql``) or
:class:`LocalSparqlEndpoint`, which serves a pyoxigraph store loaded from an RDF file on
127.0.0.1 (a free port). The environment's tools therefore run the same queries through the same
client in both cases.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional

log = logging.getLogger(__name__)

RESULTS_JSON = "application/sparql-results+json"


class SparqlUnavailable(RuntimeError):
    """The endpoint did not answer (connection refused, timeout): an infrastructure failure."""


class SparqlQueryError(RuntimeError):
    """The endpoint answered with an error for this query (bad query, query too expensive)."""


class SparqlClient:
    """SELECT queries against one SPARQL endpoint; rows are ``{variable: value string}``."""

    def __init__(self, url: str, timeout_s: float = 60.0) -> None:
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"sparql_url must be an http(s) URL such as http://localhost:3001/sparql, got {url!r}")
        self.url = url
        self.timeout_s = float(timeout_s)

    def select(self, query: str) -> List[Dict[str, str]]:
        """Run a SELECT query; the value of every bound variable of every row, in result order."""
        body = urllib.parse.urlencode({"query": query}).encode("utf-8")
        req = urllib.request.Request(self.url, data=body, method="POST", headers={
            "Accept": RESULTS_JSON,
            "Content-Type": "application/x-www-form-urlencoded",
        })
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:500]
            raise SparqlQueryError(f"SPARQL endpoint {self.url} answered HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:  # refused, unreachable, timed out
            raise SparqlUnavailable(f"SPARQL endpoint {self.url} unavailable: {exc}") from None
        try:
            doc = json.loads(payload)
            bindings = doc["results"]["bindings"]
        except (ValueError, KeyError, TypeError) as exc:
            raise SparqlQueryError(f"SPARQL endpoint {self.url} sent no JSON results: {exc}") from None
        return [{var: str(cell.get("value", "")) for var, cell in row.items()} for row in bindings]


class LocalSparqlEndpoint:
    """An in-memory pyoxigraph store loaded from ``graph_file``, served on 127.0.0.1.

    Formats by file suffix: ``.nt`` (N-Triples), ``.ttl`` (Turtle), ``.nq``, ``.trig``,
    ``.rdf``/``.xml`` (RDF/XML). Read-only: only SELECT/ASK queries are answered.
    """

    def __init__(self, graph_file: str) -> None:
        try:
            import pyoxigraph
        except ImportError as exc:
            raise RuntimeError("option 'graph_file' needs the pyoxigraph package (pip install pyoxigraph)") from exc
        self._ox = pyoxigraph
        fmt = self._format(graph_file)
        self.store = pyoxigraph.Store()  # in memory: nothing written to disk
        try:
            with open(graph_file, "rb") as fh:
                self.store.bulk_load(fh, format=fmt)
        except (OSError, SyntaxError, ValueError) as exc:
            raise ValueError(f"cannot load graph_file {graph_file}: {exc}") from None
        self.triples = len(self.store)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="kg-sparql", daemon=True)
        self._thread.start()
        host, port = self._server.server_address[:2]
        self.url = f"http://{host}:{port}/sparql"
        log.info("local SPARQL endpoint on %s (%d triples from %s)", self.url, self.triples, graph_file)

    def _format(self, path: str) -> Any:
        fmts = self._ox.RdfFormat
        suffix = os.path.splitext(path)[1].lower()
        table = {".nt": fmts.N_TRIPLES, ".ttl": fmts.TURTLE, ".nq": fmts.N_QUADS, ".trig": fmts.TRIG,
                 ".rdf": fmts.RDF_XML, ".xml": fmts.RDF_XML}
        if suffix not in table:
            raise ValueError(f"graph_file {path}: unknown RDF suffix {suffix!r}; use one of {sorted(table)}")
        return table[suffix]

    def query_json(self, query: str) -> bytes:
        """SPARQL JSON results of a SELECT/ASK query; SyntaxError/ValueError for a bad one."""
        result = self.store.query(query)
        if isinstance(result, (self._ox.QuerySolutions, self._ox.QueryBoolean)):
            return result.serialize(format=self._ox.QueryResultsFormat.JSON)
        raise ValueError("only SELECT and ASK queries are served")

    def _handler(self) -> type:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 — http.server's naming
                qs = urllib.parse.urlparse(self.path).query
                self._answer(urllib.parse.parse_qs(qs).get("query", [""])[0])

            def do_POST(self) -> None:  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode("utf-8")
                if self.headers.get("Content-Type", "").startswith("application/sparql-query"):
                    self._answer(raw)
                else:
                    self._answer(urllib.parse.parse_qs(raw).get("query", [""])[0])

            def _answer(self, query: str) -> None:
                if not query:
                    return self._send(400, b"missing 'query'", "text/plain")
                try:
                    body = endpoint.query_json(query)
                except (SyntaxError, ValueError, OSError) as exc:
                    return self._send(400, str(exc).encode("utf-8"), "text/plain")
                self._send(200, body, RESULTS_JSON)

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: Any) -> None:  # quiet: one line per query otherwise
                log.debug("kg-sparql: " + fmt, *args)

        return Handler

    def close(self) -> None:
        """Stop serving (idempotent)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None  # type: ignore[assignment]

    def __enter__(self) -> "LocalSparqlEndpoint":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_endpoint(graph_file: Optional[str]) -> Optional[LocalSparqlEndpoint]:
    """A local endpoint over ``graph_file``, or None when no file is given."""
    return LocalSparqlEndpoint(graph_file) if graph_file else None
