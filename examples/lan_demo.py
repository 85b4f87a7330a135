"""The image-recognition pipeline on a mesh: the first thing to run.

::

    pip install -e ".[ml,fast]"
    python examples/lan_demo.py              # this machine's or the LAN's mesh, else 3 local nodes
    python examples/lan_demo.py --node http://10.0.0.5:7470 --key KEY
    python examples/lan_demo.py --small      # a few seconds of work (CI)

With no options it looks for a mesh of this machine's key (the key file that ``mesh-node
start`` creates): the node on this machine's default port, then nodes announced over mDNS.
If it finds none, it starts three nodes on 127.0.0.1 with a fresh key (``LocalMesh``), one of
them with ``--without torch``, and ends them when it is done (also on Ctrl-C or failure).

The pipeline itself (``tasks/pipeline.py``) makes digit shards, preprocesses them, trains a
CNN where its data lies, turns every shard into features there, and fits and scores three
classical heads, each stage pinned to the node holding its input. This script shows its
progress, its scores, the tasks each node ran and the bytes that moved, and draws a timeline.
Only the public API is used.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Final

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mesh import LocalMesh, MeshError
from mesh.client import DEFAULT_URL, Client, connect, key_bytes, resolve_key
from mesh.protocol.codec import key_fingerprint
from tasks.pipeline import STAGES, Run, node_name, run_pipeline, traffic, usage, write_timeline
from tasks.vision import PipelineSize

SERVICE: Final = "_mesh-node._tcp.local."


def browse_mdns(key: str, seconds: float = 2.0) -> list[str]:
    """URLs of nodes announced over mDNS whose mesh fingerprint matches ``key``."""
    from zeroconf import ServiceBrowser, Zeroconf

    want = key_fingerprint(key_bytes(key)).encode()
    names: list[str] = []
    zc = Zeroconf()
    try:
        browser = ServiceBrowser(zc, SERVICE, handlers=[lambda **kw: names.append(kw["name"])])
        time.sleep(seconds)
        browser.cancel()
        urls = []
        for name in dict.fromkeys(names):
            info = zc.get_service_info(SERVICE, name, timeout=1000)
            if info is not None and info.properties.get(b"mesh") == want:
                urls += [f"http://{a}:{info.port}" for a in info.parsed_addresses()]
        return urls
    finally:
        zc.close()


def find_mesh(node: str | None, key: str | None) -> Client | None:
    """A client of the node at ``node``, else of a node of this machine's mesh, else None."""
    if node:
        return connect(node, resolve_key(key))
    try:
        key = resolve_key(key)
    except MeshError:
        return None  # no key on this machine: no mesh of ours to find
    for url in [DEFAULT_URL, *browse_mdns(key)]:
        try:
            return connect(url, key, timeout=3.0)
        except MeshError:
            continue
    return None


def start_local_mesh(stack: ExitStack) -> Client:
    """Three fresh nodes on this machine, ended when ``stack`` closes: a client of the first."""
    # The nodes share this machine: split its cores between them. Each node then sizes its
    # workers' BLAS and torch threads by every slot on the machine, not its own.
    slots = max(1, (os.cpu_count() or 1) // 3)
    mesh = stack.enter_context(LocalMesh(slots=slots, args=["--grace", "5"]))
    mesh.start("demo-a")
    mesh.start("demo-b")
    mesh.start("demo-c", without=["torch"])
    mesh.wait_alive()
    return mesh.client()


def report(console: Console, run: Run, timeline: Path) -> None:
    f = run.figures
    console.print(
        f"\n[bold]Held-out accuracy[/]  SVM {f['accuracy_svm']:.4f}   forest "
        f"{f['accuracy_forest']:.4f}   CNN {f['accuracy_cnn']:.4f}\n"
        f"[bold]Rotation angle error[/]  {f['angle_mae_regressor_deg']:.2f} deg (regressor)   "
        f"{f['angle_mae_cnn_deg']:.2f} deg (CNN)"
    )
    nodes = sorted(run.nodes)
    table = Table(title="tasks run / busy seconds, per stage and node")
    table.add_column("stage")
    for n in nodes:
        table.add_column(node_name(run, n), justify="right")
    for stage, row in sorted(usage(run).items(), key=lambda kv: STAGES.index(kv[0])):
        cells = [f"{row[n][0]} / {row[n][1]:.1f}" if n in row else "-" for n in nodes]
        table.add_row(stage, *cells)
    console.print(table)
    moved, produced = traffic(run)
    console.print(
        f"Bytes moved between nodes: {moved / 1e6:.2f} MB of {produced / 1e6:.2f} MB produced "
        f"({moved / max(produced, 1):.3f})\nPipeline wall time: {run.wall_s:.1f} s over "
        f"{len(nodes)} nodes, {f['images']:.0f} training images\nTimeline: {timeline.resolve()}"
    )


# ---------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--node", help="URL of a node of the mesh to use")
    p.add_argument("--key", help="mesh key (default: $MESH_KEY, then the key file)")
    p.add_argument("--local", action="store_true", help="always start three local nodes")
    p.add_argument("--small", action="store_true", help="a small run, for CI")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeline", type=Path, default=Path("mesh-timeline.png"))
    args = p.parse_args(argv)
    size = PipelineSize.small(seed=args.seed) if args.small else PipelineSize(seed=args.seed)
    console = Console()
    # SIGTERM unwinds like Ctrl-C, so the local nodes are ended either way.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        with ExitStack() as stack:
            client = None if args.local else find_mesh(args.node, args.key)
            if client is None:
                console.print("No mesh found: starting three local nodes (one without torch)")
                client = start_local_mesh(stack)
            else:
                stack.callback(client.close)
            console.print(f"Mesh via {client.url}: {len(client.peers())} nodes")
            with Progress(
                TextColumn("{task.description:<17}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
            ) as bars:
                ids: dict[str, Any] = {}
                totals: Counter[str] = Counter()

                def planned(stage: str, n: int) -> None:
                    totals[stage] += n
                    if stage not in ids:
                        ids[stage] = bars.add_task(stage, total=totals[stage])
                    bars.update(ids[stage], total=totals[stage])

                run = run_pipeline(
                    client, size, on_planned=planned, on_done=lambda s: bars.advance(ids[s])
                )
            report(console, run, write_timeline(run, args.timeline))
    except MeshError as exc:
        console.print(f"[red]lan_demo: {exc}[/]")
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
