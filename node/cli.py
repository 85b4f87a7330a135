"""The ``mesh-node`` command line: start a node, and talk to one over its HTTP API.

::

    mesh-node start [--host ADDR] [--port N] [--name NAME] [--key KEY] [--join HOST:PORT]...
                    [--no-mdns] [--mdns-interface ADDR]... [--slots N]
                    [--resource NAME=AMOUNT]... [--label KEY=VALUE]... [--tasks MODULE]...
                    [--without LIB]... [--preset lan|local|test] [--grace S]
                    [--ready-file PATH] [--code CODE]
    mesh-node invite  [--minutes M] [--list] [--revoke NAMEPLATE] [--node URL] [--key KEY] [--json]
    mesh-node doctor  [--node URL] [--key KEY] [--json]
    mesh-node peers   [--node URL] [--key KEY] [--json]
    mesh-node submit TASK [ARGS] [--node URL] [--key KEY] [--timeout S] [--json]
    mesh-node status  [--node URL] [--key KEY] [--json]
    mesh-node why TASK_ID [--node URL] [--key KEY] [--json]
    mesh-node dashboard [--node URL] [--key KEY] [--no-browser] [--json]
    mesh-node top [--node URL] [--key KEY]

``mesh-node`` alone is ``mesh-node start``. The key comes from ``--key``, else
``$MESH_KEY``, else the key file (``start`` creates it on first run). Errors are one line on
stderr and a non-zero exit status; ``--json`` output is for scripts. ``start`` prints a banner
for people once it serves; a program starting a node passes ``--ready-file`` instead and waits
for that file (``mesh.client.local.ReadyRecord``), as ``mesh.LocalMesh`` does.

``invite`` asks the node for a one-time code (a number and three words, valid for minutes,
for one machine); ``start --code CODE`` on a machine without a key finds the inviter (mDNS,
or ``--join``), runs the exchange of ``node.join``, stores the key in the key file (0600)
and starts. ``doctor`` says why this machine does not see the mesh (``node.doctor``); its
exit status is 0 when all is well.

``dashboard`` asks the node for a one-time token and prints the page's URL with it (and opens
it on a desktop); ``top`` shows the mesh in the terminal until ``q`` (``node.dashboard``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Final

import aiohttp

from mesh.config import MeshConfig
from mesh.errors import MeshError
from mesh.runtime.auth import KEY_ENV, key_file, resolve_key
from mesh.runtime.auth import key_bytes as derive_key
from mesh.runtime.http import DEFAULT_PORT, node_id_at, normalise_url, request_json
from mesh.runtime.loop import event_loop

PRESETS: Final = {"lan": MeshConfig.lan, "local": MeshConfig.local, "test": MeshConfig.test}
PRESET_ENV: Final = "MESH_PRESET"
COMMANDS: Final = (
    "start",
    "peers",
    "submit",
    "status",
    "why",
    "dashboard",
    "top",
    "invite",
    "doctor",
)
JOIN_SEARCH_S: Final = 20.0
"""How long ``start --code`` looks for the inviter."""
JOIN_RETRY_S: Final = 2.0
"""Between rounds of asking: well under the inviter's budget of join requests."""
POLL_S: Final = 60.0
"""Longest single wait ``submit`` asks the node for (under ``NodeConfig.api_max_wait_s``)."""


def _pair(text: str, sep: str = "=") -> tuple[str, str]:
    key, found, value = text.partition(sep)
    if not found or not key:
        raise argparse.ArgumentTypeError(f"expected NAME{sep}VALUE, got {text!r}")
    return key, value


def _resource(text: str) -> tuple[str, float]:
    name, amount = _pair(text)
    try:
        return name, float(amount)
    except ValueError:
        raise argparse.ArgumentTypeError(f"resource amount must be a number: {text!r}") from None


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"seconds must be finite and >= 0: {text}")
    return seconds


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _bytes(text: str) -> int:
    """A size in bytes, with an optional binary unit: ``512M``, ``2G``."""
    number, unit = text.strip().upper().removesuffix("IB").removesuffix("B"), ""
    if number[-1:] in _UNITS:
        number, unit = number[:-1], number[-1]
    try:
        size = int(float(number) * _UNITS[unit])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r}") from None
    if size < 0:
        raise argparse.ArgumentTypeError(f"a size must be >= 0: {text}")
    return size


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range: {port}")
    return port


def _seed(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    _port(port)
    return text


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mesh-node", description="A peer-to-peer compute mesh for the local network."
    )
    sub = p.add_subparsers(dest="command")

    s = sub.add_parser("start", help="run a node in the foreground")
    s.add_argument("--host", help="address to listen on and advertise (default: all, LAN IP)")
    s.add_argument("--port", type=_port, default=DEFAULT_PORT, help="0 picks a free port")
    s.add_argument("--name", help="node id (default: HOSTNAME-PORT)")
    s.add_argument("--key", help="mesh key (default: $MESH_KEY, then the key file)")
    s.add_argument("--join", action="append", default=[], type=_seed, metavar="HOST:PORT")
    s.add_argument("--no-mdns", action="store_true", help="find peers only through --join")
    s.add_argument(
        "--mdns-interface", action="append", default=[], metavar="ADDR", help="mDNS on ADDR"
    )
    s.add_argument("--slots", type=int, help="tasks run at once (default: CPU count)")
    s.add_argument("--resource", action="append", default=[], type=_resource, metavar="NAME=AMOUNT")
    s.add_argument("--label", action="append", default=[], type=_pair, metavar="KEY=VALUE")
    s.add_argument("--tasks", action="append", default=[], metavar="MODULE")
    s.add_argument(
        "--without",
        action="append",
        default=[],
        metavar="LIB",
        help="leave a library out (e.g. torch: keeps this machine off ML work)",
    )
    s.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=os.environ.get(PRESET_ENV, "lan"),
        help=f"timings: lan (default, or ${PRESET_ENV}), local, test",
    )
    s.add_argument("--grace", type=float, help="seconds running tasks get on SIGTERM")
    s.add_argument(
        "--worker-idle",
        type=_seconds,
        metavar="SECONDS",
        help="an idle worker process exits after this long (default 60)",
    )
    s.add_argument(
        "--store-memory",
        type=_bytes,
        metavar="BYTES",
        help="objects kept in memory (e.g. 2G); beyond it they spill (default: 1/4 of memory)",
    )
    s.add_argument("--spill-dir", metavar="DIR", help="where objects spill (~/.cache/mesh/spill)")
    s.add_argument(
        "--spill-limit",
        type=_bytes,
        metavar="BYTES",
        help="most bytes spilled (default: until the disk is full; 0: never spill)",
    )
    s.add_argument(
        "--unsealed",
        action="store_true",
        help="send peer frames and objects unencrypted (to measure what sealing costs);"
        " sealed nodes refuse such a node",
    )
    s.add_argument("--seed", type=int, help="seed the protocol's random choices")
    s.add_argument(
        "--ready-file",
        metavar="PATH",
        help="once serving, write one JSON object to PATH (id, address, pid, host_id, mesh,"
        " slots), atomically (temp file + rename): for programs that start nodes",
    )
    s.add_argument(
        "--code",
        metavar="CODE",
        help="join the mesh with a one-time code from `mesh-node invite` (no key needed)",
    )
    s.add_argument("-v", "--verbose", action="store_true")

    def client_args(c: argparse.ArgumentParser) -> None:
        c.add_argument("--node", help=f"node URL (default: http://127.0.0.1:{DEFAULT_PORT})")
        c.add_argument("--key", help="mesh key (default: $MESH_KEY, then the key file)")
        c.add_argument("--json", action="store_true", help="machine-readable output")

    client_args(sub.add_parser("peers", help="list the nodes this node knows"))
    st = sub.add_parser("status", help="this node's state")
    client_args(st)
    sb = sub.add_parser("submit", help="run a task and print its result")
    sb.add_argument("task")
    sb.add_argument("args", nargs="?", help="JSON array (positional) or object (keywords)")
    sb.add_argument("--timeout", type=float, help="seconds to wait (and to let it run)")
    client_args(sb)
    w = sub.add_parser("why", help="how a task was placed: asked, bids, refusals, winner")
    w.add_argument("task_id")
    client_args(w)
    d = sub.add_parser("dashboard", help="print (and open) the live dashboard's URL")
    d.add_argument("--no-browser", action="store_true", help="print the URL only")
    client_args(d)
    inv = sub.add_parser("invite", help="a one-time code another machine joins with")
    inv.add_argument("--minutes", type=float, default=10.0, help="how long it is valid (10)")
    inv.add_argument("--list", action="store_true", help="the codes issued: state, expiry")
    inv.add_argument("--revoke", metavar="NAMEPLATE", help="close an open code (its number)")
    client_args(inv)
    doc = sub.add_parser("doctor", help="why this machine does not see the mesh, and the fix")
    client_args(doc)
    t = sub.add_parser("top", help="the mesh in this terminal, live (q quits)")
    t.add_argument("--node", help=f"node URL (default: http://127.0.0.1:{DEFAULT_PORT})")
    t.add_argument("--key", help="mesh key (default: $MESH_KEY, then the key file)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or args_list[0] not in (*COMMANDS, "-h", "--help"):
        args_list.insert(0, "start")
    ns = parser().parse_args(args_list)
    try:
        if ns.command == "start":
            return _start(ns)
        if ns.command == "doctor":
            with asyncio.Runner(loop_factory=event_loop) as runner:
                return runner.run(_doctor(ns))
        with asyncio.Runner(loop_factory=event_loop) as runner:
            return runner.run(_client_command(ns))
    except MeshError as exc:
        print(f"mesh-node: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


# ---------------------------------------------------------------------------------------
# start
# ---------------------------------------------------------------------------------------


def _start(ns: argparse.Namespace) -> int:
    from node.daemon import NodeOptions, configure_logging, run_node

    configure_logging(ns.verbose)
    if ns.slots is not None and ns.slots < 1:
        raise MeshError(f"--slots must be at least 1, not {ns.slots}")
    if ns.ready_file is not None and not os.path.isdir(os.path.dirname(ns.ready_file) or "."):
        raise MeshError(f"--ready-file: no directory for {ns.ready_file}")
    joins = list(ns.join)
    if ns.code is not None:
        if ns.key or os.environ.get(KEY_ENV):
            raise MeshError("--code brings the key: leave out --key and $MESH_KEY")
        with asyncio.Runner(loop_factory=event_loop) as runner:
            key, inviter = runner.run(
                _join_with_code(ns.code, joins, ns.mdns_interface, mdns=not ns.no_mdns)
            )
        joins.append(inviter)
    else:
        key = resolve_key(ns.key, create=True)
    config = PRESETS[ns.preset]()
    node = config.node
    if ns.worker_idle is not None:
        node = replace(node, executor_idle_exit_s=ns.worker_idle)
    if ns.store_memory is not None:
        node = replace(node, store_memory_target_bytes=ns.store_memory)
    if ns.spill_dir is not None:
        node = replace(node, store_spill_dir=ns.spill_dir)
    if ns.spill_limit is not None:
        node = replace(node, store_spill_limit_bytes=ns.spill_limit)
    if ns.unsealed:
        node = replace(node, wire_sealed=False)
    config = replace(config, node=node)
    options = NodeOptions(
        key=key,
        host=ns.host,
        port=ns.port,
        name=ns.name,
        joins=tuple(joins),
        mdns=not ns.no_mdns,
        mdns_interfaces=tuple(ns.mdns_interface),
        slots=ns.slots,
        resources=dict(ns.resource),
        labels=dict(ns.label),
        task_modules=tuple(ns.tasks),
        without=tuple(ns.without),
        config=config,
        grace_s=ns.grace,
        seed=ns.seed,
        ready_file=ns.ready_file,
    )

    def out(line: str) -> None:
        print(line, flush=True)

    with asyncio.Runner(loop_factory=event_loop) as runner:
        return runner.run(run_node(options, out=out))


async def _join_with_code(
    code: str, seeds: Sequence[str], interfaces: Sequence[str], *, mdns: bool
) -> tuple[str, str]:
    """Find the node that issued ``code``, run the exchange, store the key: (key, inviter's
    address). A wrong code fails here, and the code is used."""
    import base64

    from node.discovery import browse
    from node.join import Joiner, store_key

    path = key_file()
    if path.exists():
        raise MeshError(f"this machine has a key already ({path}); remove it to join another mesh")
    joiner = Joiner(code)  # a typo fails here, before the one attempt is spent
    started = time.monotonic()
    tried: set[str] = set()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:

        async def has_invite(address: str) -> bool:
            try:
                async with http.get(f"http://{address}/v1/join/{joiner.nameplate}") as resp:
                    if resp.status == 410:
                        raise MeshError(
                            f"invite {joiner.nameplate} at {address} is used, revoked or "
                            "expired: ask for a new code (mesh-node invite)"
                        )
                    return resp.status == 200
            except (aiohttp.ClientError, TimeoutError):
                return False

        inviter = ""
        while not inviter and time.monotonic() - started < JOIN_SEARCH_S:
            for address in seeds:
                if await has_invite(address):
                    inviter = address
                    break
            if inviter:
                break
            if not mdns:
                await asyncio.sleep(JOIN_RETRY_S)
                continue
            found = await browse(
                2.0,
                interfaces=list(interfaces) or None,
                enough=lambda records: any(r.address not in tried for r in records),
            )
            for record in found.records:
                if record.address not in tried:
                    tried.add(record.address)
                    if await has_invite(record.address):
                        inviter = record.address
                        break
        if not inviter:
            raise MeshError(
                f"no node with open invite {joiner.nameplate} found in {JOIN_SEARCH_S:g} s "
                "(mDNS found nobody, or the code expired): pass --join HOST:PORT of the "
                "inviter, or run `mesh-node doctor`"
            )
        body = {"pake": base64.b64encode(joiner.message).decode()}
        try:
            async with http.post(f"http://{inviter}/v1/join/{joiner.nameplate}", json=body) as resp:
                reply = await resp.json()
                if not isinstance(reply, dict):
                    raise ValueError("not a JSON object")
                if resp.status != 200:
                    raise MeshError(f"the inviter refused: {reply.get('error', resp.status)}")
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise MeshError(f"the exchange with {inviter} failed: {exc}") from None
    try:
        pake = base64.b64decode(str(reply["pake"]), validate=True)
        sealed = base64.b64decode(str(reply["sealed"]), validate=True)
    except (KeyError, ValueError):
        raise MeshError(f"the node at {inviter} sent a malformed answer") from None
    key = joiner.finish(pake, sealed)
    store_key(path, key)
    print(
        f"joined the mesh of {reply.get('node', inviter)} in "
        f"{time.monotonic() - started:.1f} s; key stored in {path}",
        flush=True,
    )
    return key, inviter


async def _doctor(ns: argparse.Namespace) -> int:
    from node.doctor import as_json, diagnose, examine, report

    findings = diagnose(await examine(node_url=normalise_url(ns.node), key=ns.key))
    print(json.dumps(as_json(findings)) if ns.json else report(findings))
    return 1 if any(f.severity == "problem" for f in findings) else 0


# ---------------------------------------------------------------------------------------
# client commands
# ---------------------------------------------------------------------------------------


def _parse_task_args(text: str | None) -> tuple[list[Any], dict[str, Any]]:
    if text is None or not text.strip():
        return [], {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise MeshError(f"ARGS is not valid JSON: {exc}") from None
    if isinstance(value, list):
        return value, {}
    if isinstance(value, dict):
        return [], value
    raise MeshError("ARGS must be a JSON array (positional) or a JSON object (keywords)")


async def _client_command(ns: argparse.Namespace) -> int:
    base = normalise_url(ns.node)
    key = derive_key(resolve_key(ns.key))
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10)
    ) as session:
        to = await node_id_at(session, key, base)

        async def call(method: str, path: str, payload: Any = None) -> Any:
            return await request_json(session, key, base, method, path, payload, to=to)

        if ns.command == "peers":
            _print_peers(await call("GET", "/v1/peers"), ns.json)
            return 0
        if ns.command == "status":
            _print_mapping(await call("GET", "/v1/status"), ns.json)
            return 0
        if ns.command == "why":
            _print_why(await call("GET", f"/v1/tasks/{ns.task_id}/why"), ns.json)
            return 0
        if ns.command == "dashboard":
            return _open_dashboard(base, await call("POST", "/v1/dashboard/token"), ns)
        if ns.command == "invite":
            return await _invite(ns, call)
        if ns.command == "top":
            from node.dashboard.top import run_top

            return await run_top(base, key)
        args, kwargs = _parse_task_args(ns.args)
        # Without --timeout the command waits up to a day, in long polls the node allows.
        patience = ns.timeout if ns.timeout is not None else 86400.0
        deadline = time.monotonic() + patience

        def wait() -> float:
            return round(max(0.0, min(POLL_S, deadline - time.monotonic())), 3)

        body: dict[str, Any] = {"task": ns.task, "args": args, "kwargs": kwargs, "wait": wait()}
        if ns.timeout is not None:
            body["timeout"] = ns.timeout
        reply = await call("POST", "/v1/tasks", body)
        while "ok" not in reply and "task_id" in reply and wait() > 0:
            info = await call("GET", f"/v1/tasks/{reply['task_id']}?wait={wait()}")
            if info.get("state") in ("done", "failed"):
                reply = info
        if "ok" not in reply and "error" in reply:
            reply = {**reply, "error": f"no result within {patience:g} s"}
        return _print_result(reply, ns.json)


async def _invite(ns: argparse.Namespace, call: Any) -> int:
    if ns.list:
        listing = await call("GET", "/v1/invites")
        if ns.json:
            print(json.dumps(listing))
        for i in [] if ns.json else listing:
            print(f"{i['nameplate']:>4}  {i['state']:<8} expires in {i['expires_in_s']:.0f} s")
        return 0
    if ns.revoke:
        reply = await call("DELETE", f"/v1/invites/{ns.revoke}")
        print(json.dumps(reply) if ns.json else f"invite {ns.revoke} revoked")
        return 0
    reply = await call("POST", "/v1/invites", {"minutes": ns.minutes})
    if ns.json:
        print(json.dumps(reply))
        return 0
    print(f"On the new machine, within {ns.minutes:g} minutes (the code works once):")
    print(f"    mesh-node start --code {reply['code']}")
    return 0


def _open_dashboard(base: str, reply: dict[str, Any], ns: argparse.Namespace) -> int:
    url = base + str(reply["path"])
    if ns.json:
        print(json.dumps({"url": url}))
        return 0
    print("The mesh dashboard (the token works once, within 5 minutes):")
    print(f"    {url}")
    desktop = sys.platform in ("darwin", "win32") or bool(
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    )
    if desktop and not ns.no_browser:
        import webbrowser

        webbrowser.open(url)
    return 0


def _print_peers(peers: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(peers))
        return
    print(f"{'id':<24} {'address':<22} {'state':<8} {'running':>7} {'queued':>6}  resources")
    for p in peers:
        load = p.get("load", {})
        res = p.get("capabilities", {}).get("resources", {})
        shown = ", ".join(
            f"{k}={v:g}" for k, v in sorted(res.items()) if k in ("cpu", "gpu") or "mem" not in k
        )
        me = " *" if p.get("self") else ""
        print(
            f"{p['id'] + me:<24} {p['address']:<22} {p['state']:<8} "
            f"{load.get('running', 0):>7} {load.get('queued', 0):>6}  {shown}"
        )


def _print_mapping(value: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(value))
        return
    for k, v in value.items():
        print(f"{k:<18} {json.dumps(v) if isinstance(v, dict | list) else v}")


def _print_why(record: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(record))
        return
    print(f"task {record['task_id']} ({record['task']}): {record['state']}")
    if record.get("rebuilds"):
        print(f"  makes again the lost object {record['rebuilds']}")
    for r in record.get("reruns", []):
        print(f"  earlier run {r['task_id']}: {r['reason']}")
    for r in record.get("rounds", []):
        print(f"  call for proposals {r['cfp']}: asked {', '.join(r['asked']) or 'nobody'}")
        for node, cost in sorted(r.get("bids", {}).items(), key=lambda kv: kv[1]):
            print(f"    bid     {node:<24} {cost:.4f} s ({r['slots'].get(node, 1)} slots)")
        for node, reason in r.get("refusals", {}).items():
            detail = ", ".join(f"{k}: {v}" for k, v in reason.items())
            print(f"    refused {node:<24} {detail}")
        for node in r.get("silent", []):
            print(f"    silent  {node}")
    cost = record.get("cost_s")
    cost_text = f" at {cost:.4f} s" if isinstance(cost, int | float) else ""
    print(f"  winner: {record.get('winner') or 'none'}{cost_text}; {record.get('why', '')}")
    wait, est, transfer, run = (record.get(k) for k in ("wait_s", "est_s", "transfer_s", "run_s"))
    if isinstance(wait, float) and isinstance(est, float) and isinstance(transfer, float):
        print(f"  expected: queue wait {wait:.4f} s + run {est:.4f} s + transfer {transfer:.4f} s")
        if isinstance(run, float):
            ratio = f" ({run / est:.2f}x the estimate)" if est > 0 else ""
            print(f"  measured: run {run:.4f} s{ratio}")


def _print_result(reply: dict[str, Any], as_json: bool) -> int:
    if "ok" not in reply:
        print(
            f"mesh-node: task {reply.get('task_id')} did not finish: {reply.get('error', '')}",
            file=sys.stderr,
        )
        return 2
    if reply["ok"]:
        if as_json:
            print(json.dumps(reply))
        else:
            print(json.dumps(reply["result"]))
        return 0
    details = reply.get("details", {})
    kind = details.get("exc_type") or details.get("kind", "")
    message = reply.get("error", "task failed")
    if as_json:
        print(json.dumps(reply))
    where = f" on {reply['node']}" if reply.get("node") else ""
    print(f"mesh-node: task {reply['task_id']} failed{where}: {kind}: {message}", file=sys.stderr)
    return 1
