"""The dashboard's routes on the node's one port.

Signed with the mesh key, like the rest of ``node.api`` (its middleware checks them):

- ``GET /v1/events?after=SEQ&epoch=E&wait=S``: this node's events after ``SEQ`` (all that
  are kept if ``E`` is not its current epoch), waiting up to ``S`` seconds for one, and its
  own figures (``stats``). What other nodes' hubs poll.
- ``POST /v1/dashboard/token``: a one-time token for the page (``mesh-node dashboard``).
- ``GET /v1/mesh/feed``: the hub's Server-Sent Events, for ``mesh-node top``.

For a browser, behind ``node.dashboard.access`` (Host, Origin, then the session cookie):

- ``GET /dashboard``: the page; with ``?token=`` it takes the token, sets the cookie and
  redirects to itself. Without a session: 401 and a page that asks for a token.
- ``GET /dashboard/feed``: the hub's Server-Sent Events (``node.dashboard.hub``).
- ``GET /dashboard/why?node=N&task=T``: task ``T``'s auction record, asked of the node that
  submitted it (``N``) if that is another node.
- ``GET /dashboard/static/NAME``: the page's script and style.

A feed connection gets a small kernel send buffer (``FEED_SNDBUF``) and each write at most
``WRITE_TIMEOUT_S``: a client that stops reading is dropped within seconds, whatever it holds.
"""

from __future__ import annotations

import asyncio
import html
import logging
import mimetypes
import socket
import time
from collections import Counter
from importlib import resources
from typing import Any, Final, Protocol
from urllib.parse import quote

import aiohttp
from aiohttp import web

from mesh import __version__
from mesh.config import NodeConfig
from mesh.errors import MeshError
from mesh.runtime.http import request_json
from node.dashboard.access import Access, Denied
from node.dashboard.events import EventLog
from node.dashboard.hub import WAIT_S, Batch, Hub

log = logging.getLogger(__name__)

PREFIX: Final = "/dashboard"
WRITE_TIMEOUT_S: Final = 10.0
HEARTBEAT_S: Final = 15.0
FEED_SNDBUF: Final = 64 * 1024
SLOW_READER: Final = "dashboard-slow-reader"
"""Reason counted for a feed client dropped for not reading."""
WHY_TIMEOUT_S: Final = 5.0

_STATIC = resources.files("node.dashboard") / "static"
STATIC_FILES: Final = frozenset(
    p.name for p in _STATIC.iterdir() if p.name.endswith((".js", ".css", ".html", ".svg"))
)

# The page loads only its own script and style, and talks only to its own node.
_PAGE_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class Source(Protocol):
    """What the dashboard needs of the daemon (part of ``node.api.Service``)."""

    config: NodeConfig
    events: EventLog

    @property
    def node_id(self) -> str: ...

    def peers(self) -> list[dict[str, Any]]: ...

    def why(self, task_id: str) -> dict[str, Any] | None: ...

    def node_stats(self) -> dict[str, Any]: ...


def is_dashboard(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def _json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _int_param(request: web.Request, name: str, default: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or len(raw) > 18:
        raise ValueError(f"{name} must be a whole number")
    return int(raw)


class Dashboard:
    """The routes above, the ``Access`` they check and the ``Hub`` they feed from."""

    def __init__(self, source: Source, key: bytes, rejected: Counter[str]) -> None:
        self.source = source
        self.key = key
        self.rejected = rejected
        self.access = Access(node_id=source.node_id)
        self.hub = Hub(
            node_id=lambda: source.node_id,
            local=self._local,
            peers=lambda: source.peers(),  # looked up when watched, not at start
            since=lambda: source.events.since_by_peer,
            key=key,
            clock=time.time,
        )

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/v1/events", self._events)
        r.add_post("/v1/dashboard/token", self._token)
        r.add_get("/v1/mesh/feed", self._feed)
        r.add_get(PREFIX, self._page)
        r.add_get(PREFIX + "/feed", self._feed)
        r.add_get(PREFIX + "/why", self._why)
        r.add_get(PREFIX + "/static/{name}", self._static)

    def admit(self, request: web.Request) -> None:
        """Raise ``Denied`` for a dashboard request that may not be answered: a foreign
        Host or Origin, or (except for the page, which asks for a token) no session."""
        if request.path == PREFIX:
            self.access.check_site(request.headers)
        else:
            self.access.check(request.headers, request.cookies, time.time())

    async def close(self) -> None:
        await self.hub.close()

    # -- signed ---------------------------------------------------------------------------

    def batch(self, after: int, epoch: str, events: list[dict[str, Any]]) -> Batch:
        log_ = self.source.events
        return {
            "node": self.source.node_id,
            "epoch": log_.epoch,
            "seq": events[-1]["seq"] if events else min(after, log_.seq),
            "events": events,
            "stats": self.source.node_stats(),
        }

    async def _local(self, after: int, epoch: str) -> Batch:
        log_ = self.source.events
        if epoch != log_.epoch:
            after = 0
        return self.batch(after, epoch, await log_.wait(after, WAIT_S))

    async def _events(self, request: web.Request) -> web.Response:
        try:
            after = _int_param(request, "after", 0)
            wait = _int_param(request, "wait", 0)
        except ValueError as exc:
            return _json_error(400, str(exc))
        wait = min(wait, int(self.source.config.api_max_wait_s))
        log_ = self.source.events
        if request.query.get("epoch", "") != log_.epoch:
            after = 0
        events = await log_.wait(after, wait) if wait else log_.since(after)
        return web.json_response(self.batch(after, log_.epoch, events))

    async def _token(self, request: web.Request) -> web.Response:
        token = self.access.new_token(time.time())
        return web.json_response(
            {"token": token, "path": f"{PREFIX}?token={token}", "version": __version__}
        )

    # -- browser --------------------------------------------------------------------------

    async def _page(self, request: web.Request) -> web.StreamResponse:
        token = request.query.get("token")
        if token is not None:
            try:
                session = self.access.redeem(token, time.time())
            except Denied as exc:
                self.rejected[exc.reason] += 1
                return _login(str(exc))
            resp = web.Response(
                status=303, headers={"Location": PREFIX, "Cache-Control": "no-store"}
            )
            resp.set_cookie(
                self.access.cookie, session, path=PREFIX, httponly=True, samesite="Strict"
            )
            return resp
        if not self.access.has_session(request.cookies, time.time()):
            return _login("")
        body = (_STATIC / "index.html").read_bytes()
        return web.Response(body=body, content_type="text/html", headers=_PAGE_HEADERS)

    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC_FILES:
            return _json_error(404, f"no file {name}")
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        return web.Response(
            body=(_STATIC / name).read_bytes(),
            content_type=kind,
            headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
        )

    async def _why(self, request: web.Request) -> web.Response:
        node, task = request.query.get("node", ""), request.query.get("task", "")
        if not node or not task or len(task) > 256:
            return _json_error(400, "give node and task")
        if node == self.source.node_id:
            record = self.source.why(task)
        else:
            reachable = ("alive", "suspect")
            address = next(
                (
                    p["address"]
                    for p in self.source.peers()
                    if p["id"] == node and p["state"] in reachable
                ),
                None,
            )
            if address is None:
                return _json_error(404, f"node {node} is not reachable from here")
            timeout = aiohttp.ClientTimeout(total=WHY_TIMEOUT_S)
            path = f"/v1/tasks/{quote(task, safe='')}/why"
            try:
                async with aiohttp.ClientSession(timeout=timeout) as http:
                    record = await request_json(
                        http, self.key, f"http://{address}", "GET", path, to=node
                    )
            except (MeshError, TimeoutError) as exc:
                return _json_error(404, f"no auction record from {node}: {exc}")
        if record is None:
            return _json_error(404, f"no auction record for task {task}")
        return web.json_response(record)

    async def _feed(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Content-Type-Options": "nosniff",
            }
        )
        await resp.prepare(request)
        transport = request.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, FEED_SNDBUF)
        async with self.hub.subscribe() as sub:
            while data := await sub.take(HEARTBEAT_S):
                try:
                    async with asyncio.timeout(WRITE_TIMEOUT_S):
                        await resp.write(data)
                except TimeoutError:
                    sub.drop()
                    self.hub.dropped += 1
                    log.info("dropped a dashboard feed: no write for %g s", WRITE_TIMEOUT_S)
        if sub.dropped and transport is not None and not transport.is_closing():
            transport.abort()
        return resp


def _login(message: str) -> web.Response:
    note = f'<p class="error">{html.escape(message)}</p>' if message else ""
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Mesh dashboard: token needed</title></head>
<body>
<h1>Mesh dashboard</h1>{note}
<p>This page needs a token. Run <code>mesh-node dashboard</code> on a machine that holds the
mesh key, and open the URL it prints, or paste its token here.</p>
<form method="get" action="{PREFIX}"><input name="token" size="48" autofocus>
<button type="submit">Open</button></form>
</body></html>
"""
    return web.Response(text=page, status=401, content_type="text/html", headers=_PAGE_HEADERS)
