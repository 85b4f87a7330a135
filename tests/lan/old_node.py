"""A node of an older protocol version, as far as mDNS shows it: registers one instance of
the mesh service with the given TXT values and then waits until killed. It serves nothing;
``mesh-node doctor`` is to name it from its announcement alone.

Run inside a test host: ``python -m tests.lan.old_node ADDRESS PORT ID MESH VERSION PKG``.
"""

from __future__ import annotations

import asyncio
import sys

from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from node.discovery import SERVICE_TYPE


async def main(address: str, port: int, node: str, mesh: str, version: str, pkg: str) -> None:
    info = AsyncServiceInfo(
        SERVICE_TYPE,
        f"{node}.{SERVICE_TYPE}",
        parsed_addresses=[address],
        port=port,
        properties={"id": node, "mesh": mesh, "v": version, "pkg": pkg},
        server=f"{node}.local.",
    )
    zc = AsyncZeroconf(interfaces=[address], ip_version=IPVersion.V4Only)
    try:
        await (await zc.async_register_service(info, cooperating_responders=True))
        print("announced", flush=True)
        await asyncio.Event().wait()
    finally:
        await zc.async_close()


if __name__ == "__main__":
    a = sys.argv[1:]
    asyncio.run(main(a[0], int(a[1]), a[2], a[3], a[4], a[5]))
