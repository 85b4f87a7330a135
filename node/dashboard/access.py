"""Who may read a node's dashboard: one-time tokens, session cookies, Host and Origin.

The dashboard shows task data, so it is closed like the rest of the API, but a browser
cannot sign requests with the mesh key. As in Jupyter, someone who holds the key asks the
node for a token (``mesh-node dashboard``, a signed ``POST /v1/dashboard/token``) and opens
the URL that carries it; the node takes the token once, within ``TOKEN_TTL_S``, and answers
with a session cookie (HttpOnly, SameSite=Strict, path ``/dashboard``) and a redirect to the
page without the token. Every dashboard request must then carry that cookie. The page and
its feed are read-only: nothing they serve can submit, cancel or change anything.

Two checks come before the cookie, against a page on another site reading the dashboard:

- the ``Host`` header must name this machine: an IP address, ``localhost``, this host's
  name (or ``NAME.local``). A name that an attacker's DNS points at this machine (DNS
  rebinding) is none of those, so the browser's same-origin rule cannot be turned;
- an ``Origin`` header, if the browser sends one, must be this very origin.

Tokens and sessions live in this process only (a restarted node asks for a new token); only
their SHA-256 is kept.
"""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
import socket
from collections import OrderedDict
from collections.abc import Mapping
from typing import Final

TOKEN_TTL_S: Final = 300.0
"""A token not used within this long is refused."""
SESSION_TTL_S: Final = 7 * 86400.0
"""A session cookie is refused this long after its token was taken."""
MAX_TOKENS: Final = 64
MAX_SESSIONS: Final = 256
"""Outstanding tokens and open sessions kept; the oldest is forgotten past these."""

BAD_HOST: Final = "dashboard-host"
BAD_ORIGIN: Final = "dashboard-origin"
NO_SESSION: Final = "dashboard-auth"
BAD_TOKEN: Final = "dashboard-token"


class Denied(Exception):
    """A dashboard request refused: ``status``, the ``reason`` counted, and a message."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def host_is_local_name(host: str, names: frozenset[str]) -> bool:
    """Whether the host part of a ``Host`` header (port stripped) is an address or one of
    ``names``."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(bare)
    except ValueError:
        return bare.lower().rstrip(".") in names
    return True


def split_host(header: str) -> str:
    """The host part of a ``Host`` header (``[v6]:port``, ``name:port``, ``name``)."""
    if header.startswith("["):
        return header[: header.find("]") + 1] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Access:
    """Tokens and sessions of one node's dashboard (module docstring)."""

    def __init__(self, *, node_id: str = "") -> None:
        name = socket.gethostname().lower()
        self.names = frozenset({"localhost", name, f"{name}.local"})
        self._tokens: OrderedDict[str, float] = OrderedDict()
        self._sessions: OrderedDict[str, float] = OrderedDict()
        self.cookie = "mesh-dashboard"
        self.set_node(node_id)

    def set_node(self, node_id: str) -> None:
        """Name the cookie after the node: two nodes on one host keep their own."""
        self.cookie = f"mesh-dashboard-{_digest(node_id)[:10]}"

    def new_token(self, now: float) -> str:
        token = secrets.token_urlsafe(32)
        self._tokens[_digest(token)] = now + TOKEN_TTL_S
        while len(self._tokens) > MAX_TOKENS:
            self._tokens.popitem(last=False)
        return token

    def redeem(self, token: str, now: float) -> str:
        """A new session for ``token``, which is used up; ``Denied`` (401) if it is
        unknown, used or expired."""
        expires = self._tokens.pop(_digest(token), None)
        if expires is None or now > expires:
            raise Denied(401, BAD_TOKEN, "the token is unknown, used or expired")
        session = secrets.token_urlsafe(32)
        self._sessions[_digest(session)] = now + SESSION_TTL_S
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return session

    def has_session(self, cookies: Mapping[str, str], now: float) -> bool:
        session = cookies.get(self.cookie)
        if not session:
            return False
        expires = self._sessions.get(_digest(session))
        return expires is not None and now <= expires

    def check_site(self, headers: Mapping[str, str]) -> None:
        """``Denied`` (403) for a ``Host`` that is not this machine, or an ``Origin``
        other than the page's own."""
        host = headers.get("Host", "")
        if not host or not host_is_local_name(split_host(host), self.names):
            raise Denied(403, BAD_HOST, "wrong Host header: use this node's address")
        origin = headers.get("Origin")
        if origin is not None and origin not in (f"http://{host}", f"https://{host}"):
            raise Denied(403, BAD_ORIGIN, "cross-site request refused (Origin is another site)")

    def check(self, headers: Mapping[str, str], cookies: Mapping[str, str], now: float) -> None:
        """``check_site``, then ``Denied`` (401) without a valid session cookie."""
        self.check_site(headers)
        if not self.has_session(cookies, now):
            raise Denied(
                401, NO_SESSION, "no dashboard session: open the URL mesh-node dashboard prints"
            )
