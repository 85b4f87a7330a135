"""Matching a task's requirements against a node's capabilities.

One function, ``check``, decides whether a node can *ever* run a task; both sides of the
contract net use it (the initiator on gossiped capabilities to pick candidates, the
participant on its own to decide between bidding and refusing), so they never disagree
about what "capable" means. ``demand`` gives the resources one running task occupies.

This module is pure: no I/O, no clock, no caches. What a node has *now* (free slots) is the
contract core's business, not this module's: busy is not incapable.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from mesh.protocol.messages import Capabilities, Requirements

DEFAULT_CPU = 1.0
"""Slots a task occupies when its requirements do not say: every task runs somewhere."""

CPU_POOL_LABEL = "mesh.cpu-pool"
"""Capabilities label naming the pool of cores a node draws on: nodes whose values are
equal run on the same cores (several nodes on one host), whatever slots each declares."""
CPU_CORES_LABEL = "mesh.cpu-cores"
"""Capabilities label: how many cores the pool named by ``CPU_POOL_LABEL`` has."""


def demand(requirements: Requirements) -> dict[str, float]:
    """Resources one running instance of the task occupies (``cpu`` defaults to one slot)."""
    need = dict(requirements.resources)
    need.setdefault("cpu", DEFAULT_CPU)
    return need


def invalid(requirements: Requirements) -> str | None:
    """Why ``requirements`` are malformed (negative or non-finite amounts), or None."""
    if not requirements.task:
        return "empty task name"
    for name, amount in requirements.resources.items():
        if not math.isfinite(amount) or amount < 0:
            return f"resource {name} has amount {amount!r}"
    return None


def version_satisfies(installed: str, specifier: str) -> bool:
    """Whether version ``installed`` meets a PEP 440 ``specifier`` (``""``: any version).

    A specifier that does not parse is never met: a peer cannot make a node claim a library
    it cannot judge. An installed version that is not PEP 440 only meets ``==`` on the exact
    string, or the empty specifier.
    """
    spec = specifier.strip()
    if not spec:
        return True
    try:
        version = Version(installed)
    except InvalidVersion:
        return spec.replace(" ", "") in (f"=={installed}", f"==={installed}")
    try:
        specs = SpecifierSet(spec)
    except InvalidSpecifier:
        return False
    # What is installed is what runs: a pre-release the operator chose still counts.
    return specs.contains(version, prereleases=True)


def _join(items: list[str]) -> str:
    return ", ".join(sorted(items))


def check(requirements: Requirements, capabilities: Capabilities) -> dict[str, object]:
    """What ``capabilities`` lack to ever run a task with ``requirements``; empty if nothing.

    Keys, each present only when something is lacking (values name every culprit, sorted
    and comma-separated):

    - ``task``: the task is not installed on the node;
    - ``missing``: resources the node does not have enough of, even when idle (``gpu``);
    - ``library``: libraries absent or at a non-matching version (``torch>=2.2``);
    - ``label``: labels that do not match (``zone=eu``).
    """
    out: dict[str, object] = {}
    if requirements.task not in capabilities.tasks:
        out["task"] = requirements.task
    have = capabilities.resources
    short = [
        name
        for name, amount in demand(requirements).items()
        if amount > 0 and not have.get(name, 0.0) >= amount
    ]
    if short:
        out["missing"] = _join(short)
    bad_libs = []
    for lib, spec in requirements.libraries.items():
        installed = capabilities.libraries.get(lib)
        if installed is None or not version_satisfies(installed, spec):
            bad_libs.append(f"{lib}{spec.strip()}")
    if bad_libs:
        out["library"] = _join(bad_libs)
    bad_labels = [
        f"{key}={value}"
        for key, value in requirements.labels.items()
        if capabilities.labels.get(key) != value
    ]
    if bad_labels:
        out["label"] = _join(bad_labels)
    return out


def shared_cores(a: Capabilities, b: Capabilities) -> int | None:
    """Cores that two nodes both draw on when they name the same pool of cores (and its
    size) in their labels; None when they do not, or say nothing that parses."""
    pool = a.labels.get(CPU_POOL_LABEL)
    if not pool or pool != b.labels.get(CPU_POOL_LABEL):
        return None
    try:
        cores = min(int(a.labels.get(CPU_CORES_LABEL, "")), int(b.labels.get(CPU_CORES_LABEL, "")))
    except ValueError:
        return None
    return cores if cores > 0 else None


def merge_reasons(reasons: Iterable[Mapping[str, object]]) -> dict[str, object]:
    """Combine the refusal reasons of several nodes into one, for ``NoCapablePeerError``.

    Each key keeps every distinct value seen, so that "one node lacks a GPU, the other lacks
    torch" reads as both.
    """
    seen: dict[str, set[str]] = {}
    for reason in reasons:
        for key, value in reason.items():
            for part in str(value).split(", "):
                seen.setdefault(key, set()).add(part)
    return {key: _join(list(values)) for key, values in sorted(seen.items())}
