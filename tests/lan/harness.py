"""Hosts on a private LAN inside one machine, for tests that need a real network.

Each host is a Linux network namespace with one interface ``eth0`` (``10.77.0.<i>/24``),
joined to the others by a bridge living in a "switch" namespace; the root namespace is
never touched. Multicast DNS, TCP, crashes, loss (nftables ``numgen``) and partitions
(bridge-family nftables at the switch) are then all real. Derived from
``shared/lan/netns_lan.sh``.

Safety rules this module enforces:
- every process it starts runs inside one of its namespaces, and only after checking that
  the namespace has no default route, so no test traffic can leave the machine;
- it ends only what it started (by pid) and what lives in its own namespaces;
- namespaces carry a per-run prefix, so concurrent runs and leftovers never collide, and
  ``down`` removes everything also when a test failed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

SUBNET = "10.77.0"


def unavailable_reason() -> str | None:
    """Why LAN tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "LAN tests need root (network namespaces)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"LAN tests need '{tool}' (apt-get install iproute2 nftables)"
    probe = f"meshprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"network namespaces are not available: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _ns(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv], check=check, capture_output=True, text=True
    )


@dataclass
class Host:
    """One host: a namespace and its address on the test LAN."""

    index: int
    ns: str
    address: str


@dataclass
class Lan:
    """N hosts on one bridge. Use as a context manager: leaving it tears everything down."""

    n: int
    prefix: str = field(default_factory=lambda: f"m{os.getpid() % 100000}")
    hosts: list[Host] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"{self.prefix}sw"

    def __enter__(self) -> Lan:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> None:
        sw = self.switch
        _ip("netns", "add", sw)
        _ip("-n", sw, "link", "set", "lo", "up")
        _ip(
            "-n",
            sw,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
            "mcast_snooping",
            "0",
        )
        _ip("-n", sw, "link", "set", "br0", "up")
        _ns(sw, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
        for i in range(1, self.n + 1):
            self.add_host(i)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            ports = _ns(sw, "ip", "-br", "link", "show", "master", "br0").stdout
            if ports and all(" UP " in line for line in ports.strip().splitlines()):
                break
            time.sleep(0.05)

    def add_host(self, i: int) -> Host:
        sw, ns = self.switch, f"{self.prefix}h{i}"
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", sw, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("-n", sw, "link", "set", f"v{i}", "master", "br0")
        _ip("-n", sw, "link", "set", f"v{i}", "up")
        _ns(ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
        _ns(ns, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
        address = f"{SUBNET}.{i}"
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "address", f"02:77:00:00:00:{i:02x}")
        _ip("-n", ns, "link", "set", "eth0", "up")
        # Without a default route, sendto(224.0.0.251) needs an explicit multicast route.
        _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0")
        host = Host(index=i, ns=ns, address=address)
        self.hosts.append(host)
        return host

    def host(self, i: int) -> Host:
        return self.hosts[i - 1]

    def _check_no_default_route(self, host: Host) -> None:
        routes = _ns(host.ns, "cat", "/proc/net/route").stdout.splitlines()[1:]
        for line in routes:
            cols = line.split()
            if len(cols) > 1 and cols[1] == "00000000":
                raise RuntimeError(f"{host.ns} has a default route; refusing to start a client")

    def spawn(self, host: Host, argv: Sequence[str], **popen: object) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside ``host``; it is ended by ``down`` if still running."""
        self._check_no_default_route(host)
        proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            ["ip", "netns", "exec", host.ns, *argv], start_new_session=True, **popen
        )
        self.procs.append(proc)
        return proc

    def run(
        self, host: Host, argv: Sequence[str], timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside ``host`` to completion."""
        self._check_no_default_route(host)
        return subprocess.run(
            ["ip", "netns", "exec", host.ns, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    # --- faults -------------------------------------------------------------------------

    def partition(self, host: Host) -> None:
        """Cut ``host`` off at the switch, both directions."""
        sw = self.switch
        _ns(sw, "nft", "add", "table", "bridge", "part")
        _ns(
            sw,
            "nft",
            "add chain bridge part cut { type filter hook forward priority 0; policy accept; }",
        )
        _ns(sw, "nft", "add", "rule", "bridge", "part", "cut", "iifname", f"v{host.index}", "drop")
        _ns(sw, "nft", "add", "rule", "bridge", "part", "cut", "oifname", f"v{host.index}", "drop")

    def heal(self) -> None:
        _ns(self.switch, "nft", "delete", "table", "bridge", "part", check=False)

    def drop(self, host: Host, table: str, hook: str, *match: str) -> None:
        """Drop what ``match`` selects on ``host``'s ``hook`` (input or output), in a table of
        its own that ``undrop`` removes."""
        _ns(host.ns, "nft", "add", "table", "inet", table)
        chain = f"{{ type filter hook {hook} priority 0; policy accept; }}"
        _ns(host.ns, "nft", f"add chain inet {table} {hook} {chain}")
        _ns(host.ns, "nft", "add", "rule", "inet", table, hook, *match, "drop")

    def undrop(self, host: Host, table: str) -> None:
        _ns(host.ns, "nft", "delete", "table", "inet", table, check=False)

    def lossy(self, host: Host, percent: int) -> None:
        """Drop ``percent`` % of the packets leaving ``host`` (no netem in this kernel)."""
        loss = ("numgen", "random", "mod", "100", "lt", str(percent))
        self.drop(host, "loss", "output", "oifname", "eth0", *loss)

    def clean(self, host: Host) -> None:
        self.undrop(host, "loss")

    def block_mdns(self, host: Host) -> None:
        """Drop multicast DNS (UDP 5353) in and out of ``host``."""
        _ns(host.ns, "nft", "add", "table", "inet", "nomdns")
        for hook in ("input", "output"):
            _ns(
                host.ns,
                "nft",
                f"add chain inet nomdns {hook} "
                f"{{ type filter hook {hook} priority 0; policy accept; }}",
            )
            _ns(
                host.ns,
                "nft",
                "add",
                "rule",
                "inet",
                "nomdns",
                hook,
                "udp",
                "dport",
                "5353",
                "drop",
            )

    # --- teardown -----------------------------------------------------------------------

    def kill(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        if proc.poll() is None:
            proc.send_signal(sig)

    def down(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 5
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        names = [h.ns for h in self.hosts] + [self.switch]
        for ns in names:
            # Whatever still lives in our own namespaces was started by this run.
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            for pid in pids.stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.hosts.clear()
        self.procs.clear()
