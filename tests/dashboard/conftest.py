"""Real ``mesh-node`` processes for the dashboard tests, and what talks to them.

``dash_mesh`` is three nodes (``local`` preset, two slots each) shared by a module;
``open_session`` asks a node for a one-time token with the mesh key, as ``mesh-node
dashboard`` does, and trades it for the session cookie, as a browser does.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mesh.client.local import LocalMesh
from mesh.runtime.auth import key_bytes
from mesh.runtime.http import node_id_at, request_json

REQUIRE_TOOLS = os.environ.get("MESH_REQUIRE_TOOLS") == "1"
"""Set by ``.ci/run``, which installs Chromium, promtool and tmux: their absence is then a
failure, not a skip."""


def need(present: bool, what: str) -> None:
    """Skip the calling test (fail it under ``MESH_REQUIRE_TOOLS``) unless ``present``."""
    if not present:
        (pytest.fail if REQUIRE_TOOLS else pytest.skip)(f"no {what}")


def new_mesh(directory: Path, n: int = 3) -> LocalMesh:
    return LocalMesh(
        n,
        preset="local",
        key=secrets.token_hex(16),
        slots=2,
        args=("--grace", "5"),
        env={"XDG_CONFIG_HOME": str(directory / "config")},
        workdir=directory,
        stop_grace_s=15,
    )


@pytest.fixture(scope="module")
def dash_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    mesh = new_mesh(tmp_path_factory.mktemp("dash"))
    with mesh:
        yield mesh


async def token_path(mesh: LocalMesh, name: str = "node-1") -> str:
    """``/dashboard?token=...`` from node ``name``, asked with the mesh key."""
    url = mesh.nodes[name].url
    key = key_bytes(mesh.key)
    async with aiohttp.ClientSession() as http:
        to = await node_id_at(http, key, url)
        reply: dict[str, Any] = await request_json(
            http, key, url, "POST", "/v1/dashboard/token", to=to
        )
    return str(reply["path"])


def token_url(mesh: LocalMesh, name: str = "node-1") -> str:
    """A URL with a fresh token, asked from a thread of its own (Playwright's sync API
    keeps an event loop in the calling thread)."""
    with ThreadPoolExecutor(1) as pool:
        path = pool.submit(asyncio.run, token_path(mesh, name)).result(timeout=60)
    return mesh.nodes[name].url + path


async def open_session(http: aiohttp.ClientSession, mesh: LocalMesh, name: str = "node-1") -> None:
    """Put a dashboard session cookie of node ``name`` into ``http``'s jar (which must
    accept cookies for IP addresses: ``aiohttp.CookieJar(unsafe=True)``)."""
    path = await token_path(mesh, name)
    async with http.get(mesh.nodes[name].url + path, allow_redirects=False) as resp:
        assert resp.status == 303, await resp.text()
