"""References that free themselves: who refers to which stored objects, and the leases
that keep them.

Two sides, both on every node:

- ``Holds``, on a node that refers to objects on someone's behalf: its client sessions
  (each reference a client holds; a client forgets one when its last ``ObjectRef`` is
  garbage-collected or released, and a session that ends lets go of all of them once
  ``session_ref_grace_s`` has passed), results handed out over JSON (for
  ``api_ref_ttl_s``), the node's own tasks waiting to run (their arguments), and copies of
  lost objects made again while the lost one is held (``node.lineage``). A key is whoever
  holds: an object is referenced while some key holds it.
- ``Leases``, on a node that stores objects: each result it stored is kept while some node's
  lease on it runs. A node renews its leases for everything it holds every third of
  ``object_lease_s``, and gives them up at once when nothing holds an object any more; an
  object whose every lease lapsed or was given up is freed.

Counts are never sent: a lease is a deadline per (object, node), so a lost renewal is made
good by the next one, a lost give-up lapses by itself, and a node that dies stops renewing.
A task's result starts with one lease, for the node that submitted the task, from the
moment it is stored. Lineage keeps recipes, not values: an object that only a recipe needs
is freed, and made again if a rebuild needs it (as in Ray).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable
from typing import Any

from mesh.protocol.args import find_in_call
from mesh.protocol.messages import NodeId, ObjectRef


class Holds:
    """Who refers to which objects through this node (pure: no I/O, no clock)."""

    def __init__(self) -> None:
        self._refs: dict[str, ObjectRef] = {}
        self._keys: dict[str, set[Hashable]] = {}
        """Object id -> the keys that hold it."""
        self._held: dict[Hashable, set[str]] = {}
        """Key -> the object ids it holds."""
        self._until: dict[Hashable, float] = {}
        """Keys that let go of everything at a deadline."""

    def __contains__(self, object_id: object) -> bool:
        return object_id in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def hold(self, key: Hashable, refs: Iterable[ObjectRef]) -> list[ObjectRef]:
        """``key`` holds ``refs`` too; the ones no key held before (to lease at once)."""
        new: list[ObjectRef] = []
        held = self._held.setdefault(key, set())
        for ref in refs:
            keys = self._keys.get(ref.id)
            if keys is None:
                keys = self._keys[ref.id] = set()
                self._refs[ref.id] = ref
                new.append(ref)
            keys.add(key)
            held.add(ref.id)
        if not held:
            del self._held[key]
        return new

    def drop(self, key: Hashable, ids: Iterable[str] | None = None) -> list[ObjectRef]:
        """``key`` lets go of ``ids`` (None: of everything); the objects no key holds now."""
        held = self._held.get(key)
        if held is None:
            return []
        gone = list(held) if ids is None else [i for i in ids if i in held]
        freed: list[ObjectRef] = []
        for oid in gone:
            held.discard(oid)
            keys = self._keys[oid]
            keys.discard(key)
            if not keys:
                del self._keys[oid]
                freed.append(self._refs.pop(oid))
        if not held:
            del self._held[key]
            self._until.pop(key, None)
        return freed

    def release_at(self, key: Hashable, when: float) -> None:
        """``key`` lets go of everything at ``when`` (``expire``)."""
        if key in self._held:
            self._until[key] = when

    def expire(self, now: float) -> list[ObjectRef]:
        """Keys past their deadline let go; the objects no key holds now."""
        freed: list[ObjectRef] = []
        for key in [k for k, t in self._until.items() if t <= now]:
            freed += self.drop(key)
        return freed

    def by_holder(self) -> dict[NodeId, list[str]]:
        """Every held object id, grouped by the node that stores it."""
        out: dict[NodeId, list[str]] = defaultdict(list)
        for oid, ref in self._refs.items():
            out[ref.holder].append(oid)
        return out


class Leases:
    """The leases on the objects this node stores: (object, node) -> deadline."""

    def __init__(self) -> None:
        self._leases: dict[str, dict[NodeId, float]] = {}

    def __contains__(self, object_id: object) -> bool:
        return object_id in self._leases

    def start(self, object_id: str, node: NodeId, until: float) -> None:
        self._leases[object_id] = {node: until}

    def renew(self, node: NodeId, ids: Iterable[str], until: float) -> int:
        """``node`` keeps ``ids`` (those leased here) until ``until``; how many it kept."""
        n = 0
        for oid in ids:
            leases = self._leases.get(oid)
            if leases is not None:
                leases[node] = max(until, leases.get(node, until))
                n += 1
        return n

    def give_up(self, node: NodeId, ids: Iterable[str]) -> list[str]:
        """``node`` lets go of ``ids``; those no lease keeps now (to free)."""
        out: list[str] = []
        for oid in ids:
            leases = self._leases.get(oid)
            if leases is not None and leases.pop(node, None) is not None and not leases:
                del self._leases[oid]
                out.append(oid)
        return out

    def lapsed(self, now: float) -> list[str]:
        """Objects whose every lease ran out (forgotten here: to free)."""
        out: list[str] = []
        for oid, leases in list(self._leases.items()):
            for node in [n for n, t in leases.items() if t <= now]:
                del leases[node]
            if not leases:
                del self._leases[oid]
                out.append(oid)
        return out

    def forget(self, object_id: str) -> None:
        self._leases.pop(object_id, None)


def refs_in(value: Any) -> list[ObjectRef]:
    """The ``ObjectRef``s inside a result value (the one walk of ``mesh.protocol.args``)."""
    found: list[ObjectRef] = find_in_call([value], {}, ObjectRef)
    return found
