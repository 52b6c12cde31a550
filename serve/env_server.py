"""Environment server: agent environments as a Ray Serve application (HTTP + handle API).

HTTP (DESIGN.md), JSON bodies, errors as ``{"error": {"reason": ..., "status": code}}``::

    GET    /envs                         names, task counts, splits, skipped tasks
    POST   /envs/{env}/sessions          {"task_id": "3"}  -> {session_id, messages}
    POST   /sessions/{session_id}/step   {"action": "..."} -> {observation, reward, done, status, info}
    DELETE /sessions/{session_id}        -> {closed: true}
    GET    /sessions/{session_id}/expert -> {action}: the scripted expert's next action

Authentication (``serve.api_key_env`` / ``serve.api_key_file``, see ``serve.auth``): with a key
configured every HTTP request needs ``Authorization: Bearer <key>`` (else 401 in the error shape
above); ``GET /health`` stays open. Handle calls come from inside the cluster and are not checked.

The same operations are methods for a DeploymentHandle: ``list_envs()``,
``create_session(env, task_id)``, ``step(session_id, action)``, ``expert_action(session_id)``,
``close_session(session_id)``.

Sessions live in the replica that created them (an episode holds a sandbox or a database): a
per-replica cap (over it: 429 with the reason), an idle timeout (expired: 410), and ids that
name their replica. A custom Serve request router (``SessionRouter``) sends every request of a
session, over HTTP or a handle, to that replica, so the deployment can run several replicas or
autoscale; a request for a session whose replica is gone gets 410 with that reason instead of
hanging. Blocking environment work runs in a thread pool, so sessions step
concurrently. Run it with ``python -m serve.env_server CONFIG`` (section ``envs``).
"""


import asyncio
import logging
import math
import re
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import RequestRouter

from agenttuning.cluster import ray_session
from agenttuning.config import to_object
from agenttuning.schema import EnvsConfig, EnvSpec, ServeConfig
from serve.auth import BearerAuth, resolve_api_key
from serve.envs import EnvError, EpisodeOver, TaskSetupError, UnknownTask, load
from serve.lifecycle import placement, serve_until_stopped

log = logging.getLogger(__name__)
CONFIG_SECTIONS = ('envs',)  # what `--help` lists


class EnvServerError(Exception):
    """An API error: HTTP status code and a reason for the client."""

    def __init__(self, status: int, reason: str, retry_after_s: Optional[float] = None):
        super().__init__(reason)
        self.status, self.reason, self.retry_after_s = status, reason, retry_after_s

    def body(self) -> Dict[str, Any]:
        return {"error": {"reason": self.reason, "status": self.status}}


@dataclass
class _Session:
    id: str
    env_name: str
    task_id: str
    env: Any
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_used: float = field(default_factory=time.monotonic)
    turns: int = 0


class SessionManager:
    """Sessions of one replica (plain Python: usable without Serve, and unit-testable)."""

    def __init__(self, envs: Dict[str, Union[EnvSpec, Dict[str, Any]]], max_sessions: int = 64,
                 idle_timeout_s: float = 600.0, tag: Optional[str] = None, retry_after_s: float = 5.0) -> None:
        """``envs``: served name -> its EnvSpec (registry name, default the served name; task file;
        options). ``tag`` names this replica inside every session id (the Serve replica id, so the
        request router can find the session's replica)."""
        self.tag = tag or secrets.token_hex(4)
        self.max_sessions, self.idle_timeout_s = int(max_sessions), float(idle_timeout_s)
        self.retry_after_s = retry_after_s  # a 429's Retry-After: a session slot frees when one closes
        self.envs: Dict[str, Any] = {}
        self.errors: Dict[str, str] = {}
        for name, spec in envs.items():
            spec = EnvSpec(**spec) if isinstance(spec, dict) else spec  # outside callers may pass plain dicts
            try:
                self.envs[name] = load(spec.env or name, spec.path, **dict(spec.options))
            except Exception as exc:  # noqa: BLE001 — one broken env must not take the others down
                log.error("env %s unavailable: %s", name, exc)
                self.errors[name] = f"{type(exc).__name__}: {exc}"
        self.sessions: Dict[str, _Session] = {}
        self.expired: Dict[str, str] = {}  # recently ended session id -> why
        self._lock = threading.Lock()

    def list_envs(self) -> Dict[str, Any]:
        out = []
        for name, env in self.envs.items():
            out.append({"name": name, "env": env.name, "tasks": len(env.tasks()),
                        "splits": {k: len(v) for k, v in env.splits().items()},
                        "skipped": dict(env.skipped)})
        out += [{"name": n, "error": e} for n, e in self.errors.items()]
        return {"envs": out, "sessions": len(self.sessions), "max_sessions": self.max_sessions}

    def create(self, env_name: str, task_id: Union[str, int]) -> Dict[str, Any]:
        if env_name in self.errors:
            raise EnvServerError(503, f"environment {env_name!r} is unavailable: {self.errors[env_name]}")
        if env_name not in self.envs:
            raise EnvServerError(404, f"unknown environment {env_name!r}; have {sorted(self.envs)}")
        sid = f"{self.tag}-{secrets.token_hex(8)}"
        with self._lock:
            if len(self.sessions) >= self.max_sessions:
                raise EnvServerError(429, f"this replica already runs {len(self.sessions)} sessions "
                                          f"(max_sessions={self.max_sessions}); retry later or close sessions",
                                     self.retry_after_s)
            self.sessions[sid] = _Session(sid, env_name, str(task_id), None)  # reserves the slot
        env = self.envs[env_name].spawn()
        try:
            messages = env.reset(str(task_id))
        except UnknownTask as exc:
            self._drop(sid)
            raise EnvServerError(404, str(exc)) from None
        except (TaskSetupError, EnvError) as exc:
            self._drop(sid)
            raise EnvServerError(500 if isinstance(exc, TaskSetupError) else 400, str(exc)) from None
        except Exception as exc:  # noqa: BLE001 — reported, never a hang
            self._drop(sid)
            raise EnvServerError(500, f"{env_name}: reset failed: {type(exc).__name__}: {exc}") from None
        self.sessions[sid].env = env
        return {"session_id": sid, "env": env_name, "task_id": str(task_id), "messages": messages}

    def _get(self, sid: str) -> _Session:
        s = self.sessions.get(sid)
        if s is not None and s.env is not None:
            return s
        if sid in self.expired:
            raise EnvServerError(410, f"session {sid} {self.expired[sid]}")
        if not sid.startswith(self.tag + "-"):
            raise EnvServerError(410, f"session {sid} is not held by this env-server replica: it was "
                                      "lost with the replica that created it (restarted or scaled down)")
        raise EnvServerError(404, f"no session {sid}")

    def step(self, sid: str, action: str) -> Dict[str, Any]:
        s = self._get(sid)
        if not s.lock.acquire(blocking=False):
            raise EnvServerError(409, f"session {sid} is already running a step")
        try:
            s.last_used = time.monotonic()
            try:
                result = s.env.step(action)
            except EpisodeOver as exc:
                raise EnvServerError(409, str(exc)) from None
            except EnvError as exc:
                raise EnvServerError(400, str(exc)) from None
            s.turns += 1
            s.last_used = time.monotonic()
            return result.to_dict()
        finally:
            s.lock.release()

    def expert(self, sid: str) -> Dict[str, Any]:
        """The scripted expert's next action for this session (offline trajectory construction)."""
        s = self._get(sid)
        with s.lock:
            try:
                return {"action": s.env.expert_action()}
            except EnvError as exc:
                raise EnvServerError(409, str(exc)) from None

    def close(self, sid: str, why: str = "was closed") -> Dict[str, Any]:
        s = self._get(sid)
        self._drop(sid, why)
        with s.lock:  # wait for a running step to finish before freeing its resources
            s.env.close()
        return {"session_id": sid, "closed": True, "turns": s.turns}

    def _drop(self, sid: str, why: Optional[str] = None) -> None:
        with self._lock:
            self.sessions.pop(sid, None)
            if why:
                self.expired[sid] = why
                while len(self.expired) > 10000:
                    self.expired.pop(next(iter(self.expired)))

    def reap_idle(self) -> int:
        """Close sessions idle longer than idle_timeout_s; returns how many."""
        now = time.monotonic()
        idle = [s.id for s in list(self.sessions.values())
                if s.env is not None and not s.lock.locked() and now - s.last_used > self.idle_timeout_s]
        for sid in idle:
            try:
                self.close(sid, f"expired after {self.idle_timeout_s:g}s without a request")
            except EnvServerError:
                pass
        return len(idle)

    def shutdown(self) -> None:
        for sid in list(self.sessions):
            try:
                self.close(sid, "was closed when its replica shut down")
            except EnvServerError:
                pass
        for env in self.envs.values():
            env.shutdown()


# ----------------------------------------------------------------------------- Serve

app = FastAPI(title="AgentTuning environment server")


class _Auth:
    """This process's API key (each replica is its own process; set by EnvServer.__init__)."""

    key: Optional[str] = None


app.add_middleware(BearerAuth, key=lambda: _Auth.key, error_body=lambda msg: EnvServerError(401, msg).body())


class CreateBody(BaseModel):
    task_id: Union[str, int]


class StepBody(BaseModel):
    action: str


@app.exception_handler(EnvServerError)
async def _api_error(request: Request, exc: EnvServerError) -> JSONResponse:
    headers = {"Retry-After": str(math.ceil(exc.retry_after_s))} if exc.retry_after_s is not None else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


@app.exception_handler(RequestValidationError)
async def _bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    where = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return JSONResponse({"error": {"reason": f"bad request body: {where}", "status": 400}}, status_code=400)


_SID = re.compile(rb"/sessions/([0-9a-z]+)-[0-9a-f]{16}")
_SESSION_METHODS = {"step", "expert_action", "close_session"}


def session_replica_tag(pending_request: Any) -> Optional[str]:
    """The replica tag of the session a request is for (HTTP or handle call), else None."""
    args = getattr(pending_request, "args", None) or []
    if not args:
        return None
    first = args[0]
    if isinstance(first, (bytes, bytearray)):  # an HTTP request as the proxy ships it
        m = _SID.search(first)
        return m.group(1).decode() if m else None
    method = getattr(getattr(pending_request, "metadata", None), "call_method", None)
    if method in _SESSION_METHODS and isinstance(first, str) and "-" in first:
        return first.split("-", 1)[0]
    return None


class SessionRouter(RequestRouter):
    """Sends a session's requests to the replica holding it (its id is in the session id);
    new sessions and unknown ids go to any replica (which answers 410 for a lost session).

    New sessions rotate over the replicas: Serve picks the shortest queue and breaks ties by list
    order (or prefers the one whose queue length it has cached), so without rotation sequential
    clients would fill one replica's session cap (429) while the others stay empty."""

    _turn = 0

    async def choose_replicas(self, candidate_replicas: List[Any],
                              pending_request: Optional[Any] = None) -> List[List[Any]]:
        tag = session_replica_tag(pending_request)
        if tag:
            owner = [r for r in candidate_replicas if r.replica_id.unique_id == tag]
            if owner:
                return [owner]
        if not candidate_replicas:
            return [candidate_replicas]
        self._turn = (self._turn + 1) % len(candidate_replicas)
        turn = candidate_replicas[self._turn:] + candidate_replicas[: self._turn]
        # The turn's replica alone in the first rank: within a rank Serve prefers replicas whose
        # queue length it has cached, which sent every new session to one replica on CI.
        return [turn[:1], turn[1:]]


@serve.deployment(max_ongoing_requests=256,
                  request_router_config=RequestRouterConfig(request_router_class=SessionRouter))
@serve.ingress(app)
class EnvServer:
    """Serve deployment hosting environment sessions (see module docstring)."""

    def __init__(self, envs: Dict[str, Union[EnvSpec, Dict[str, Any]]], max_sessions: int = 64,
                 idle_timeout_s: float = 600.0, reap_every_s: float = 5.0, api_key_env: Optional[str] = None,
                 api_key_file: Optional[str] = None, retry_after_s: float = 5.0) -> None:
        # Read here, in the replica: the key never travels in the app's arguments (serve.auth).
        _Auth.key = resolve_api_key(api_key_env, api_key_file)
        try:
            tag = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 — outside Serve (direct construction): a random tag
            tag = None
        self.manager = SessionManager(envs, max_sessions, idle_timeout_s, tag, retry_after_s)
        # One thread per possible session, so every session can step at the same time.
        self.pool = ThreadPoolExecutor(max_workers=max_sessions + 4, thread_name_prefix="env")
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap, args=(reap_every_s,), daemon=True)
        self._reaper.start()

    def _reap(self, every: float) -> None:
        while not self._stop.wait(every):
            n = self.manager.reap_idle()
            if n:
                log.info("closed %d idle sessions", n)

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # Handle API (also what the HTTP routes call).
    async def list_envs(self) -> Dict[str, Any]:
        return self.manager.list_envs()

    async def create_session(self, env: str, task_id: Union[str, int]) -> Dict[str, Any]:
        return await self._run(self.manager.create, env, task_id)

    async def step(self, session_id: str, action: str) -> Dict[str, Any]:
        return await self._run(self.manager.step, session_id, action)

    async def expert_action(self, session_id: str) -> Dict[str, Any]:
        return await self._run(self.manager.expert, session_id)

    async def close_session(self, session_id: str) -> Dict[str, Any]:
        return await self._run(self.manager.close, session_id)

    # HTTP routes.
    @app.get("/health")
    async def http_health(self) -> Dict[str, Any]:
        """Liveness without a key (probes); the rest of the API needs it when one is set."""
        return {"status": "ok", "sessions": len(self.manager.sessions)}

    @app.get("/envs")
    async def http_envs(self) -> Dict[str, Any]:
        return await self.list_envs()

    @app.post("/envs/{env}/sessions")
    async def http_create(self, env: str, body: CreateBody) -> Dict[str, Any]:
        return await self.create_session(env, body.task_id)

    @app.post("/sessions/{session_id}/step")
    async def http_step(self, session_id: str, body: StepBody) -> Dict[str, Any]:
        return await self.step(session_id, body.action)

    @app.get("/sessions/{session_id}/expert")
    async def http_expert(self, session_id: str) -> Dict[str, Any]:
        return await self.expert_action(session_id)

    @app.delete("/sessions/{session_id}")
    async def http_close(self, session_id: str) -> Dict[str, Any]:
        return await self.close_session(session_id)

    def __del__(self) -> None:
        self._stop.set()
        self.manager.shutdown()
        self.pool.shutdown(wait=False, cancel_futures=True)


def build_env_app(envs: EnvsConfig, serve_cfg: Optional[ServeConfig] = None):
    """The env server application from the ``envs`` config section (``serve_cfg``: its API key
    settings, ``api_key_env`` / ``api_key_file``, and the 429's ``retry_after_s``)."""
    srv = envs.server
    opts = placement(srv.num_replicas, srv.autoscaling, srv.max_ongoing_requests, srv.num_cpus)
    specs = {name: spec for name, spec in envs.tasks.items() if spec.enabled}
    from_serve = ({"api_key_env": serve_cfg.api_key_env, "api_key_file": serve_cfg.api_key_file,
             "retry_after_s": serve_cfg.retry_after_s} if serve_cfg else {})
    return EnvServer.options(**opts).bind(specs, srv.max_sessions, srv.idle_timeout_s, **from_serve)


def main(cfg) -> None:
    """``agenttuning envs CONFIG``: serve the environments until stopped."""

    envs, s = to_object(cfg.envs), to_object(cfg.serve)
    with ray_session():
        serve_until_stopped(s, [(build_env_app(envs, s), "envs", envs.server.route_prefix,
                                 f"environments {sorted(envs.tasks)} (GET /envs)")])


if __name__ == "__main__":
    from agenttuning.cli import run_job

    raise SystemExit(run_job("serve.env_server", __import__("sys").argv[1:]))
