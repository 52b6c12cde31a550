"""API-key authentication of the project's HTTP servers (model, EFT and environment servers).

Like OpenAI's API and vLLM's ``--api-key``: every request must carry ``Authorization: Bearer
<key>``; a request without it, or with another key, gets 401 in the server's own error shape.
``/health`` stays open (load balancers and Kubernetes probes carry no key).

The key never appears in a config file: ``serve.api_key_env`` names an environment variable
holding it, ``serve.api_key_file`` a file holding it (e.g. a mounted Kubernetes secret). Each
replica reads it where it runs (:func:`resolve_api_key`), so on a cluster the variable or the
file must exist on every node that hosts a replica (a Kubernetes secret mounted or exported in
every Ray pod). Configured but not found anywhere: the server refuses to start (fail closed).
The key is never logged, and the comparison takes constant time.

Serve handle calls (rollouts calling the model deployment, jobs calling the env server's methods)
do not go through HTTP and are not checked: they come from inside the Ray cluster, whose members
can run any code there anyway.
"""

import hmac
import json
import logging
import os
from typing import Any, Callable, Dict, Iterable, Optional

log = logging.getLogger(__name__)

OPEN_PATHS = ("/health",)


class AuthConfigError(ValueError):
    """An API key was configured but could not be read (missing variable or file, or empty)."""


def resolve_api_key(api_key_env: Optional[str] = None, api_key_file: Optional[str] = None) -> Optional[str]:
    """The API key, from the environment variable ``api_key_env`` (first) or the file
    ``api_key_file``; None when neither is configured (no authentication)."""
    if not api_key_env and not api_key_file:
        return None
    tried = []
    if api_key_env:
        value = os.environ.get(api_key_env, "").strip()
        if value:
            return value
        tried.append(f"environment variable {api_key_env} is unset or empty")
    if api_key_file:
        try:
            with open(os.path.expanduser(api_key_file), encoding="utf-8") as f:
                value = f.read().strip()
        except OSError as exc:
            tried.append(f"file {api_key_file} is unreadable ({type(exc).__name__})")
        else:
            if value:
                return value
            tried.append(f"file {api_key_file} is empty")
    raise AuthConfigError("an API key is configured (serve.api_key_env / serve.api_key_file) but none was found: "
                          + "; ".join(tried) + ". Set it there, or unset both keys to serve without authentication")


def describe_key_config(api_key_env: Optional[str], api_key_file: Optional[str]) -> Optional[str]:
    """Where the key comes from, for log lines (never the key itself); None = no key configured."""
    parts = [f"${api_key_env}"] if api_key_env else []
    parts += [f"file {api_key_file}"] if api_key_file else []
    return " or ".join(parts) or None


def bearer_headers(api_key: Optional[str]) -> Dict[str, str]:
    """Request headers a client sends to a server started with this key (none without a key)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class BearerAuth:
    """Pure ASGI middleware (streaming-safe): requests need ``Authorization: Bearer <key>``.

    ``key``: the key, or a function returning it at request time (None = authentication off),
    ``error_body(message)``: the 401 body in the server's error shape; ``open_paths``: paths
    (below the app's root path) served without a key.
    """

    def __init__(self, app: Any, key: Any, error_body: Callable[[str], Dict[str, Any]],
                 open_paths: Iterable[str] = OPEN_PATHS) -> None:
        self.app = app
        self.key = key
        self.error_body = error_body
        self.open_paths = set(open_paths)

    def _path(self, scope: Dict[str, Any]) -> str:
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):  # mounted under a route prefix (Ray Serve)
            path = path[len(root):] or "/"
        return path

    async def __call__(self, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        key = self.key() if callable(self.key) else self.key
        if scope.get("type") != "http" or key is None or self._path(scope) in self.open_paths:
            await self.app(scope, receive, send)
            return
        header = ""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                header = value.decode("latin-1")
                break
        scheme, _, given = header.partition(" ")
        if not header:
            message = "missing API key: send the header 'Authorization: Bearer <key>'"
        elif scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            message = "invalid API key"  # never echo what was sent
        else:
            await self.app(scope, receive, send)
            return
        body = json.dumps(self.error_body(message)).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
