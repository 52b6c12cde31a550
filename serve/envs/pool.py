"""Bounded pools of heavy per-episode backends (game engine, JVM, browser) shared by Env copies.

The rollout driver and the env server run each episode on ``env.spawn()``; a spawned copy shares
the pool of the environment it came from. An episode checks a backend out in ``start`` and
returns it in ``end_episode``, so a replica holds at most ``max_size`` backends however many
episodes it runs, reuses them across episodes, and replaces one that died or got stuck.
Used by every environment with a heavy backend (ALFWorld, ScienceWorld, MiniWoB++, ...).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable, Generic, List, Optional, TypeVar

log = logging.getLogger(__name__)

B = TypeVar("B")


class BackendTimeout(RuntimeError):
    """A backend call did not return in time; the backend is discarded."""


class PoolExhausted(RuntimeError):
    """Every backend is busy and the pool is at its cap."""


class BackendPool(Generic[B]):
    """Thread-safe pool: ``acquire()`` an idle backend (or start one under the cap), ``release`` it."""

    def __init__(self, name: str, factory: Callable[[], B], closer: Callable[[B], None],
                 alive: Callable[[B], bool] = lambda b: True, max_size: int = 4) -> None:
        if max_size < 1:
            raise ValueError(f"{name}: pool size must be >= 1, got {max_size}")
        self.name, self.factory, self.closer, self.alive = name, factory, closer, alive
        self.max_size = max_size
        self._idle: List[B] = []
        self._count = 0  # backends alive (idle + checked out)
        self._cond = threading.Condition()
        self.started = 0  # how many backends were ever started (tests check reuse with it)

    def acquire(self, wait_s: float = 120.0) -> B:
        """An idle, healthy backend; starts a new one while under the cap, else waits ``wait_s``."""
        with self._cond:
            while True:
                while self._idle:
                    backend = self._idle.pop()
                    if self._healthy(backend):
                        return backend
                    log.warning("%s: backend died while idle; replacing it", self.name)
                    self._discard_locked(backend)
                if self._count < self.max_size:
                    self._count += 1
                    break
                if not self._cond.wait(timeout=wait_s):
                    raise PoolExhausted(f"{self.name}: all {self.max_size} backends busy for {wait_s:.0f}s")
        try:
            backend = self.factory()
        except BaseException:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            raise
        self.started += 1
        return backend

    def release(self, backend: B, broken: bool = False) -> None:
        """Give a backend back; ``broken`` ones (stuck, crashed) are closed instead of reused."""
        with self._cond:
            if broken:
                self._discard_locked(backend)
            else:
                self._idle.append(backend)
            self._cond.notify()

    def close(self) -> None:
        """Close the idle backends (checked-out ones are closed when released broken or by GC)."""
        with self._cond:
            while self._idle:
                self._discard_locked(self._idle.pop())

    @property
    def size(self) -> int:
        return self._count

    def _healthy(self, backend: B) -> bool:
        try:
            return bool(self.alive(backend))
        except Exception:  # noqa: BLE001 — a failing health check means "dead"
            return False

    def _discard_locked(self, backend: B) -> None:
        self._count -= 1
        try:
            self.closer(backend)
        except Exception as exc:  # noqa: BLE001 — closing a dead backend may fail; nothing to do
            log.warning("%s: closing a backend failed: %s", self.name, exc)


_timeout_executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="env-call")


def call_with_timeout(fn: Callable[..., Any], *args: Any, timeout_s: Optional[float]) -> Any:
    """Run ``fn(*args)``, raising BackendTimeout after ``timeout_s`` (None: no limit).

    The stuck call keeps its worker thread until the caller kills the backend (it should).
    """
    if not timeout_s:
        return fn(*args)
    future = _timeout_executor.submit(fn, *args)
    try:
        return future.result(timeout=timeout_s)
    except FutureTimeout:
        raise BackendTimeout(f"backend call {getattr(fn, '__name__', fn)} took over {timeout_s:.0f}s") from None


class PooledBackendMixin:
    """Env mixin: one backend from ``self.pool`` per running episode (``self._backend``).

    ``_checkout()`` in ``start``; ``_call`` runs a backend call under ``step_timeout_s`` and marks
    the backend broken when it times out, so ``end_episode`` discards it instead of reusing it.
    Put it before ``Env`` in the bases so its ``end_episode``/``shutdown``/``spawn`` apply.
    """

    pool: BackendPool
    step_timeout_s: Optional[float] = None
    _backend: Any = None
    _broken: bool = False

    def _checkout(self) -> Any:
        self._backend, self._broken = self.pool.acquire(), False
        return self._backend

    def _call(self, fn: Callable[..., Any], *args: Any, timeout_s: Optional[float] = None) -> Any:
        try:
            return call_with_timeout(fn, *args, timeout_s=timeout_s or self.step_timeout_s)
        except BackendTimeout:
            self._broken = True  # the backend may still be busy: never reuse it
            raise

    def end_episode(self) -> None:
        if self._backend is not None:
            backend, self._backend = self._backend, None
            self.pool.release(backend, broken=self._broken)

    def shutdown(self) -> None:
        self.close()  # type: ignore[attr-defined]  # Env.close: end the running episode first
        self.pool.close()

    def spawn(self) -> Any:
        other = super().spawn()  # type: ignore[misc]
        other._backend, other._broken = None, False  # copies share the pool, not a checked-out backend
        return other
