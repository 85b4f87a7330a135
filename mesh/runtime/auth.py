"""The mesh key, and the proof of it that every request to a node carries.

The key is found once per process (``resolve_key``: an argument, ``$MESH_KEY`` or the key
file) and derived into the 32 bytes every frame and request is authenticated with
(``key_bytes``). A request proves knowledge of the key without sending it: an HMAC-SHA256
over the method, the path, a hash of the body, a timestamp, a nonce and the id of the node
it is for (``sign_request``); the node recomputes it (``request_mac``) before it reads the
body, and checks the body against the signed hash afterwards.

This module does no I/O beyond reading (and on a first start creating) the key file.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Final

from mesh.errors import LocalProtocolError, MeshError

KEY_ENV: Final = "MESH_KEY"

HEADER_TIME: Final = "X-Mesh-Time"
HEADER_NONCE: Final = "X-Mesh-Nonce"
HEADER_SIGNATURE: Final = "X-Mesh-Signature"
HEADER_BODY: Final = "X-Mesh-Body-SHA256"
"""Hex SHA-256 of the request body: the signature covers it, so a node can check the proof
before reading the body, and the body against it afterwards."""
HEADER_TO: Final = "X-Mesh-To"
"""The id of the node a request is for: a request captured on one node is refused by others."""


def key_file() -> Path:
    """Where the key lives when neither ``--key`` nor ``MESH_KEY`` gives it."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "mesh" / "key"


def resolve_key(key: str | None = None, *, create: bool = False) -> str:
    """The mesh key: ``key``, else ``$MESH_KEY``, else the key file.

    With ``create`` a missing key file is made (mode 0600, 32 random bytes as hex), which
    is what ``mesh-node start`` does on a machine's first run.
    """
    if key:
        return key
    env = os.environ.get(KEY_ENV)
    if env:
        return env
    path = key_file()
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        text = ""
    if text:
        return text
    if not create:
        raise MeshError(
            f"no mesh key: pass --key, set {KEY_ENV}, or start a node once to create {path}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    text = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    return text


def key_bytes(key: str) -> bytes:
    """The 32 bytes every node and client derives from the key text.

    Hashing lets an operator type a passphrase of any length while the codec always gets a
    full-strength HMAC key; every party derives the same bytes.
    """
    if not key:
        raise LocalProtocolError("the mesh key is empty")
    return hashlib.sha256(b"mesh-key\x00" + key.encode()).digest()


def sign_request(
    key: bytes,
    method: str,
    path: str,
    body: bytes,
    now: float,
    *,
    to: str,
    nonce: str | None = None,
) -> dict[str, str]:
    """Headers proving ``key`` for one request to node ``to``; ``path`` includes the query
    string. The node checks them before it reads the body, then the body against them."""
    stamp = f"{now:.3f}"
    nonce = nonce or secrets.token_hex(12)
    digest = hashlib.sha256(body).hexdigest()
    return {
        HEADER_TIME: stamp,
        HEADER_NONCE: nonce,
        HEADER_BODY: digest,
        HEADER_TO: to,
        HEADER_SIGNATURE: request_mac(key, method, path, digest, stamp, nonce, to),
    }


def request_mac(
    key: bytes, method: str, path: str, body_sha256: str, stamp: str, nonce: str, to: str
) -> str:
    """The signature a node expects for a request (hex)."""
    text = "\n".join((method.upper(), path, body_sha256, stamp, nonce, to)).encode()
    return hmac.new(key, text, hashlib.sha256).hexdigest()
