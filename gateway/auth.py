"""Bearer-token authentication and per-queue authorisation of the gateway's RPCs.

Tokens come from ``auth_tokens`` (an environment variable) and ``auth_tokens_file``, one per line
(``;`` also separates entries in the variable)::

    # name     token                              queues (optional: '*' or a comma list)
    billing    4f9c1e0b7a2d6e8f3a5c9b1d7e2f4a6c   invoices,refunds
    ops        9d3b7f1a5c2e8d4b6f0a3c7e1b5d9f2a   *

Clients send ``authorization: Bearer <token>``. Only SHA-256 digests of tokens are kept, every
configured digest is compared in constant time, and tokens are never logged: logs and metrics
name the token's ``name``. Health checks (``Check``) stay open so that orchestrators can probe the gateway.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from protocol.errors import PermissionDenied
from protocol.keys import QUEUE_RE

from .handlers import HandlerCache, rebuild

log = logging.getLogger(__name__)

MIN_TOKEN_CHARS = 16
# Health checks stay open for orchestrators' probes. Only Check: Watch is a stream, and strangers
# must not be able to hold streams open.
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check"})


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a token's name and the queues it may use (None: every queue)."""

    name: str
    queues: frozenset[str] | None = None

    @property
    def restricted(self) -> bool:
        return self.queues is not None

    def may_use(self, queue: str) -> bool:
        return self.queues is None or queue in self.queues

    def check(self, queue: str, field: str) -> None:
        """Raises PermissionDenied naming ``field`` unless this principal may use ``queue`` (a queue
        the caller named itself, so the message may repeat it)."""
        if not self.may_use(queue):
            raise PermissionDenied(f"{field}: token {self.name!r} may not use queue {queue!r}")

    def check_job(self, queue: str, job_id: str, field: str) -> None:
        """Raises PermissionDenied unless this principal may see a stored job of ``queue``; the
        message does not name the queue, which the caller may not know."""
        if not self.may_use(queue):
            raise PermissionDenied(f"{field}: job {job_id} is in a queue token {self.name!r} may not use")


ANYONE = Principal("anonymous")  # every caller, when authentication is off
_current: ContextVar[Principal] = ContextVar("jobgate_principal", default=ANYONE)


def current() -> Principal:
    """The principal of the RPC being handled (``ANYONE`` when authentication is off)."""
    return _current.get()


@dataclass(frozen=True, slots=True)
class Token:
    name: str
    digest: bytes
    queues: frozenset[str] | None


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_tokens(text: str, source: str, *, separator: str | None = None) -> list[Token]:
    """Token entries from ``text``, one per line (or per ``separator``). A ``#`` at the start of an
    entry or after whitespace starts a comment. Raises ValueError naming ``source`` and the entry's
    number, never its text (a token in the wrong column would be shown)."""
    entries = text.split(separator) if separator else text.splitlines()
    out: list[Token] = []
    for number, raw in enumerate(entries, start=1):
        line = re.split(r"(?:^|\s)#", raw, maxsplit=1)[0].strip()
        if not line:
            continue
        parts = line.split()
        where = f"{source}, entry {number}"
        if len(parts) not in (2, 3):
            raise ValueError(f"{where}: expected 'name token [queues]'")
        name, secret = parts[0], parts[1]
        if len(secret) < MIN_TOKEN_CHARS:
            raise ValueError(f"{where}: a token needs at least {MIN_TOKEN_CHARS} characters")
        queues: frozenset[str] | None = None
        if len(parts) == 3 and parts[2] != "*":
            queues = frozenset(q for q in parts[2].split(",") if q)
            if not queues or not all(QUEUE_RE.fullmatch(q) for q in queues):
                raise ValueError(f"{where}: bad queue names (a comma list of queue names, or '*')")
        out.append(Token(name, _digest(secret), queues))
    return out


def load_tokens(inline: str, path: str) -> list[Token]:
    """Tokens from the ``auth_tokens`` setting and the ``auth_tokens_file`` file. Raises ValueError."""
    tokens = parse_tokens(inline, "JOBGATE_AUTH_TOKENS", separator=";") if inline else []
    if path:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ValueError(f"auth_tokens_file: cannot read {path}: {exc.strerror}") from None
        tokens += parse_tokens(text, path)
    names = [t.name for t in tokens]
    if len(names) != len(set(names)):
        raise ValueError("auth tokens: each entry needs a name of its own")
    if len({t.digest for t in tokens}) != len(tokens):
        raise ValueError("auth tokens: the same token appears twice")
    if (path or inline) and not tokens:
        raise ValueError("auth tokens: the configured sources hold no token")
    return tokens


class Authenticator:
    """Maps call metadata to a Principal."""

    def __init__(self, tokens: Sequence[Token]) -> None:
        self._tokens = tuple(tokens)

    def replace(self, tokens: Sequence[Token]) -> None:
        """Swaps in a new set of tokens; calls from then on are checked against it."""
        self._tokens = tuple(tokens)

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal | None:
        """The caller's principal, or None without a valid ``authorization: Bearer`` header."""
        header = next((v for k, v in metadata or () if k == "authorization"), None)
        if not isinstance(header, str):
            return None
        scheme, _, secret = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not secret:
            return None
        digest = _digest(secret.strip())
        found: Token | None = None
        for token in self._tokens:  # no early exit: the time taken does not depend on which one matched
            if hmac.compare_digest(digest, token.digest):
                found = token
        return Principal(found.name, found.queues) if found else None


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses calls without a valid token (UNAUTHENTICATED) before their request is even parsed,
    and makes the caller's Principal available to the handler through :func:`current`."""

    def __init__(self, authenticator: Authenticator, on_denied: Callable[[str], None] | None = None) -> None:
        self.authenticator = authenticator
        self.on_denied = on_denied or (lambda method: None)
        self._built = HandlerCache()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method in OPEN_METHODS:
            return await continuation(details)
        principal = self.authenticator.authenticate(details.invocation_metadata)
        handler = await continuation(details)
        if handler is None:
            return None
        if principal is None:
            self.on_denied(details.method)
            log.debug("refused an unauthenticated call to %s", details.method)
            return self._built.get(handler, "refuse", lambda: rebuild(handler, _abort, _unparsed))
        return self._built.get(handler, principal, lambda: _as(handler, principal))


async def _abort(request: Any, context: grpc.aio.ServicerContext) -> None:
    """Answers UNAUTHENTICATED (the request is left as the bytes it arrived as)."""
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid 'authorization: Bearer <token>' header is required")


def _unparsed(data: bytes) -> bytes:
    return data


def _as(handler: grpc.RpcMethodHandler, principal: Principal) -> grpc.RpcMethodHandler:
    """The handler, run with ``principal`` as the current principal (each RPC runs in a task of its own)."""

    async def set_principal(request: Any, context: grpc.aio.ServicerContext) -> None:
        _current.set(principal)

    return rebuild(handler, set_principal)
