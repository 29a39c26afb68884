"""The ``--auth`` password check: constant-time comparison, and repeated failures slowed down per client."""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any


class LoginGuard:
    """The ``--auth`` check: user and password compared in constant time, repeated failures slowed down.

    Failures are counted per client (its address; behind a proxy on this machine, such as the share
    link's tunnel, the last X-Forwarded-For address). After ``free_failures`` wrong logins, each further
    attempt from that client first waits ``base_delay`` seconds after the last failure, doubling per
    failure up to ``max_delay``; a client gets one attempt at a time (another one meanwhile is refused
    without being checked), so guesses cannot be sent in parallel. A correct login clears the client's
    count, and ``forget_after`` seconds without a failure do too. Other clients never wait for these:
    the legitimate user is not held up by someone else's guesses.

    Gradio calls ``check`` (a coroutine: the delay does not hold up the server); the ASGI middleware
    ``LoginClient`` tells it the client through ``client``.
    """

    def __init__(self, user: str, password: str, *, free_failures: int = 5, base_delay: float = 1.0,
                 max_delay: float = 60.0, forget_after: float = 3600.0, max_clients: int = 10_000,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> None:
        self._user, self._password = _secret_bytes(user), _secret_bytes(password)
        self.free_failures, self.base_delay, self.max_delay = free_failures, base_delay, max_delay
        self.forget_after, self.max_clients = forget_after, max_clients
        self.clock, self.sleep = clock, sleep
        self.failures: dict[str, tuple[int, float]] = {}  # client -> (failures in a row, time of the last)
        self.busy: set[str] = set()  # clients with an attempt in progress
        self.client: ContextVar[str] = ContextVar(f"login_client_{id(self)}", default="unknown")

    def delay(self, client: str) -> float:
        """Seconds the client's next attempt waits before it is checked."""
        count, last = self._count(client)
        if count < self.free_failures:
            return 0.0
        wait = min(self.max_delay, self.base_delay * 2 ** (count - self.free_failures))
        return max(0.0, last + wait - self.clock())

    async def check(self, username: str, password: str) -> bool:
        client = self.client.get()
        if client in self.busy:
            return False  # a parallel guess: refused unchecked
        self.busy.add(client)
        try:
            wait = self.delay(client)
            if wait > 0:
                await self.sleep(wait)
            accepted = self.matches(username, password)
            self._record(client, accepted)
            return accepted
        finally:
            self.busy.discard(client)

    def matches(self, username: str, password: str) -> bool:
        user_ok = hmac.compare_digest(_secret_bytes(username), self._user)
        password_ok = hmac.compare_digest(_secret_bytes(password), self._password)
        return user_ok and password_ok

    def _count(self, client: str) -> tuple[int, float]:
        count, last = self.failures.get(client, (0, 0.0))
        return (0, 0.0) if count and self.clock() - last > self.forget_after else (count, last)

    def _record(self, client: str, accepted: bool) -> None:
        count, _ = self._count(client)
        self.failures.pop(client, None)  # re-inserted last: the dict stays ordered by the latest failure
        if not accepted:
            self.failures[client] = (count + 1, self.clock())
            while len(self.failures) > self.max_clients:
                self.failures.pop(next(iter(self.failures)))


def _secret_bytes(text: Any) -> bytes:
    return str(text).encode("utf-8", "surrogatepass")


LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


class LoginClient:
    """ASGI middleware: puts each request's client into ``guard.client`` for ``LoginGuard.check``."""

    def __init__(self, app, guard: LoginGuard) -> None:
        self.app, self.guard = app, guard

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = self.guard.client.set(client_key(scope))
        try:
            await self.app(scope, receive, send)
        finally:
            self.guard.client.reset(token)


def client_key(scope: dict) -> str:
    """The client's address; from a proxy on this machine, the last address it added to X-Forwarded-For
    (the earlier ones are whatever the client claimed)."""
    host = (scope.get("client") or ("unknown", 0))[0]
    if host in LOOPBACK:
        forwarded = [value for name, value in scope.get("headers") or [] if name == b"x-forwarded-for"]
        if forwarded:
            last = forwarded[-1].decode("latin-1").split(",")[-1].strip()
            return last[:100] or host
    return host


def login_options(guard: LoginGuard | None) -> dict[str, Any]:
    """``launch`` arguments for the password check (none without a password)."""
    if guard is None:
        return {"auth": None}
    from starlette.middleware import Middleware

    return {"auth": guard.check, "app_kwargs": {"middleware": [Middleware(LoginClient, guard=guard)]},
            "auth_message": f"After {guard.free_failures} wrong passwords, each further try from the same "
                            f"address waits longer (up to {guard.max_delay:g} s)."}
