"""Membership at N = 10, 100 and 1000 in the simulator: convergence, detection, chaos.

Every figure comes from ``mesh.runtime.sim`` with a fixed seed, the LAN preset and 5% message
loss; bytes are real encoded message sizes. For each N:

* convergence: every node publishes a new load at the rate its record budget allows;
  for each published version, the time until every live node holds it (p99 over all
  changes), also in gossip rounds (``gossip_interval_s``). Bandwidth is all membership
  traffic sent per node per second over the same run.
* detection: nodes crash one after another; for each, the time until every live node
  has marked it dead (p50 and p99).
* chaos: a long run with 5% loss in which 5% of the nodes stall for 2 s each; any live
  node marked dead by anyone is a false death.

Prints a table, then as its last line one JSON list with one object per N.
Run: ``python benchmarks/sim_membership.py [--quick] [--seed S]``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

from mesh.config import MembershipConfig
from mesh.protocol.core import MemberState
from mesh.protocol.membership import MemberChanged, MemberDown, Membership, MemberUp
from mesh.protocol.messages import Address, Capabilities, Load, NodeId, NodeRecord, Wire
from mesh.runtime.sim import Simulation

LOSS = 0.05
LATENCY = (0.0002, 0.002)
"""One LAN hop: 0.2-2 ms, switches and a busy receiver's scheduling included."""
STALL_S = 2.0
STALL_FRACTION = 0.05

CAPS = Capabilities(
    resources={"cpu": 8.0, "gpu": 1.0, "memory": 16e9},
    libraries={"numpy": "1.26.4", "torch": "2.13.0", "scikit-learn": "1.5.2"},
    tasks=("vision.preprocess", "vision.features", "vision.train", "vision.infer"),
    labels={"room": "lab-2"},
)
"""A typical GPU worker: what each record carries (sizes are measured with it)."""


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    k = min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


@dataclass
class _Change:
    node: NodeId
    version: int
    t0: float
    reached: set[NodeId] = field(default_factory=set)
    done_at: float | None = None


class Mesh:
    """N membership cores in one simulation, bootstrapped with each other's records."""

    def __init__(self, n: int, seed: int, config: MembershipConfig) -> None:
        self.n = n
        self.config = config
        rng = random.Random(f"ids/{seed}/{n}")
        self.ids = [NodeId(f"{rng.getrandbits(64):016x}") for _ in range(n)]
        self.addresses = [Address(f"10.0.{i // 250}.{i % 250 + 1}:7340") for i in range(n)]
        load = Load(running=0, queued=0, backlog_s=0.0)
        records = [
            NodeRecord(node=i, address=a, incarnation=0, version=1, capabilities=CAPS, load=load)
            for i, a in zip(self.ids, self.addresses, strict=True)
        ]
        self.sim: Simulation[Membership] = Simulation(seed=seed, latency=LATENCY, loss=LOSS)
        self.crashed: set[NodeId] = set()

        def factory(node: NodeId, address: Address, now: float, rng: random.Random) -> Membership:
            m = Membership(
                node=node,
                address=address,
                config=config,
                rng=rng,
                now=now,
                capabilities=CAPS,
                load=load,
            )
            # A node started from a saved peer table: the mesh exists before measuring.
            m.learn((r for r in records if r.node != node), now)
            return m

        for node, address in zip(self.ids, self.addresses, strict=True):
            self.sim.add_node(node, address, factory)

    def core(self, node: NodeId) -> Membership:
        return self.sim.core(node)

    def live(self) -> list[NodeId]:
        return [n for n in self.ids if n not in self.crashed]

    def schedule_loads(self, start: float, end: float, rng: random.Random) -> None:
        """Each node publishes a new load as often as its record budget allows."""
        cfg = self.config
        period = max(cfg.record_min_interval_s, self.n / cfg.record_updates_per_s)
        for i, node in enumerate(self.ids):
            t = start + rng.random() * period
            k = 0
            while t < end:
                k += 1
                load = Load(running=k % 4, queued=k + 1000 * i, backlog_s=0.5 * k)
                self.sim.act(node, t, _set_load(load))
                t += period * (0.9 + 0.2 * rng.random())


def _set_load(load: Load) -> Callable[[Membership, float], None]:
    def act(core: Membership, now: float) -> None:
        core.set_load(load, now)

    return act


def run_convergence(n: int, seed: int, duration: float, crashes: int) -> dict[str, float]:
    cfg = MembershipConfig.lan()
    cpu0 = time.process_time()
    mesh = Mesh(n, seed, cfg)
    sim = mesh.sim
    sim.run_until(0.0)  # every node boots and learns the others' records
    cpu_boot = time.process_time() - cpu0
    warmup = 5.0
    settle = 10.0
    mesh.schedule_loads(warmup, warmup + duration, random.Random(f"loads/{seed}/{n}"))
    changes: dict[NodeId, list[_Change]] = {}
    finished: list[_Change] = []
    last_version: dict[NodeId, int] = {}
    bytes_sent = 0
    window = (warmup, warmup + duration)
    crash_at: dict[NodeId, float] = {}
    dead_seen: dict[NodeId, set[NodeId]] = {}
    detected: dict[NodeId, float] = {}

    def on_send(now: float, src: NodeId, dst: Address, msg: Wire, size: int) -> None:
        nonlocal bytes_sent
        if window[0] <= now < window[1]:
            bytes_sent += size

    def on_step(now: float, node: NodeId) -> None:
        if not sim.is_up(node):
            return
        core = mesh.core(node)
        own = core.record.version
        if own != last_version.get(node, 1):
            last_version[node] = own
            if window[0] <= now < window[1]:
                changes.setdefault(node, []).append(_Change(node=node, version=own, t0=now))
        live_n = len(mesh.ids) - len(mesh.crashed)
        for ev in core.take_events():
            if isinstance(ev, MemberChanged | MemberUp):
                open_changes = changes.get(ev.node)
                if not open_changes:
                    continue
                rec = core.record_of(ev.node)
                if rec is None:
                    continue
                for c in open_changes:
                    if c.version <= rec.version and node not in c.reached:
                        c.reached.add(node)
                        if len(c.reached) >= live_n - 1:
                            c.done_at = now
                if any(c.done_at is not None for c in open_changes):
                    finished.extend(c for c in open_changes if c.done_at is not None)
                    changes[ev.node] = [c for c in open_changes if c.done_at is None]
            elif (
                isinstance(ev, MemberDown)
                and ev.state is MemberState.DEAD
                and ev.node in crash_at
                and ev.node not in detected
            ):
                seen = dead_seen.setdefault(ev.node, set())
                seen.add(node)
                if len(seen) >= live_n:
                    detected[ev.node] = now - crash_at[ev.node]

    sim.on_send.append(on_send)
    sim.on_step.append(on_step)
    cpu0 = time.process_time()
    sim.run_until(warmup + duration + settle)
    cpu_run = time.process_time() - cpu0
    unfinished = sum(len(v) for v in changes.values())

    # Detection: crash nodes one after another, each once the previous is settled.
    t = sim.now
    crng = random.Random(f"crash/{seed}/{n}")
    victims = crng.sample(mesh.ids, crashes)
    for victim in victims:
        mesh.crashed.add(victim)
        crash_at[victim] = t
        sim.crash(victim, t)
        sim.run_until(t + 20.0, stop=lambda: victim in detected)  # noqa: B023
        t = sim.now + 1.0
        sim.run_until(t)
    for live in mesh.live():
        mesh.core(live).take_events()

    conv = [c.done_at - c.t0 for c in finished if c.done_at is not None]
    det = [detected.get(v, math.inf) for v in victims]
    p99 = percentile(conv, 99)
    return {
        "changes": len(conv),
        "unconverged": unfinished,
        "convergence_s_p99": p99,
        "convergence_rounds_p99": p99 / cfg.gossip_interval_s,
        "convergence_s_p50": percentile(conv, 50),
        "detect_s_p50": percentile(det, 50),
        "detect_s_p99": percentile(det, 99),
        "bytes_per_node_per_s": bytes_sent / n / duration,
        "cpu_boot_s": cpu_boot,
        "cpu_run_s": cpu_run,
        "sim_s": warmup + duration + settle,
    }


def run_chaos(n: int, seed: int, duration: float) -> dict[str, float]:
    cfg = MembershipConfig.lan()
    mesh = Mesh(n, seed + 1, cfg)
    sim = mesh.sim
    warmup = 5.0
    rng = random.Random(f"chaos/{seed}/{n}")
    mesh.schedule_loads(warmup, warmup + duration, rng)
    stalled = rng.sample(mesh.ids, max(1, round(n * STALL_FRACTION)))
    for node in stalled:
        sim.stall(node, warmup + rng.random() * (duration - STALL_S - 10.0), STALL_S)
    false_dead: set[NodeId] = set()

    def on_step(now: float, node: NodeId) -> None:
        for ev in mesh.core(node).take_events():
            if isinstance(ev, MemberDown) and ev.state is MemberState.DEAD:
                false_dead.add(ev.node)

    sim.on_step.append(on_step)
    sim.run_until(warmup + duration)
    stats = [mesh.core(x).stats() for x in mesh.ids]
    return {
        "false_deaths": len(false_dead),
        "stalled": len(stalled),
        "suspicions": sum(s.suspicions for s in stats),
        "refutations": sum(s.refutations for s in stats),
        "chaos_s": duration,
    }


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small CI run: N = 10 and 100, short")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    if args.quick:
        plan = [(10, 30.0, 3, 60.0), (100, 30.0, 5, 60.0)]
    else:
        # (n, convergence seconds, crashes, chaos seconds): the N=1000 chaos run is
        # shortened to keep the whole benchmark within minutes of CPU.
        plan = [(10, 60.0, 5, 600.0), (100, 60.0, 10, 600.0), (1000, 60.0, 10, 120.0)]
    console = Console(width=200)
    results: list[dict[str, float | int]] = []
    table = Table(title=f"membership, simulated, LAN preset, {LOSS:.0%} loss, seed {args.seed}")
    for col in (
        "N",
        "changes",
        "conv p50 s",
        "conv p99 s",
        "conv p99 rounds",
        "detect p50 s",
        "detect p99 s",
        "crashes",
        "bytes/node/s",
        "kbps/node",
        "chaos s",
        "stalled",
        "false deaths",
        "refutations",
        "CPU s boot",
        "CPU s / 60 sim s",
    ):
        table.add_column(col, justify="right")
    for n, conv_s, crashes, chaos_s in plan:
        c = run_convergence(n, args.seed, conv_s, crashes)
        k = run_chaos(n, args.seed, chaos_s)
        table.add_row(
            str(n),
            f"{c['changes']:.0f} ({c['unconverged']:.0f} open)",
            f"{c['convergence_s_p50']:.3f}",
            f"{c['convergence_s_p99']:.3f}",
            f"{c['convergence_rounds_p99']:.1f}",
            f"{c['detect_s_p50']:.2f}",
            f"{c['detect_s_p99']:.2f}",
            str(crashes),
            f"{c['bytes_per_node_per_s']:.0f}",
            f"{c['bytes_per_node_per_s'] * 8 / 1000:.1f}",
            f"{k['chaos_s']:.0f}" + (" (short)" if k["chaos_s"] < 600 else ""),
            f"{k['stalled']:.0f}",
            f"{k['false_deaths']:.0f}",
            f"{k['refutations']:.0f}",
            f"{c['cpu_boot_s']:.1f}",
            f"{c['cpu_run_s'] / c['sim_s'] * 60:.1f}",
        )
        results.append(
            {
                "n": n,
                "convergence_rounds_p99": round(float(c["convergence_rounds_p99"]), 2),
                "convergence_s_p99": round(float(c["convergence_s_p99"]), 4),
                "detect_s_p50": round(float(c["detect_s_p50"]), 3),
                "detect_s_p99": round(float(c["detect_s_p99"]), 3),
                "false_deaths": int(k["false_deaths"]),
                "bytes_per_node_per_s": round(float(c["bytes_per_node_per_s"]), 1),
            }
        )
    console.print(table)
    if not args.quick:
        console.print(
            f"N=1000 chaos ran {plan[-1][3]:.0f} simulated s instead of 600 to bound CPU time."
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
