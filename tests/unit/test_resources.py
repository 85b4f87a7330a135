"""Requirements against capabilities: resources, libraries with specifiers, tasks, labels."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.protocol.messages import Capabilities, Requirements
from mesh.protocol.resources import check, demand, invalid, merge_reasons, version_satisfies


def caps(
    resources: dict[str, float] | None = None,
    libraries: dict[str, str] | None = None,
    tasks: tuple[str, ...] = ("train",),
    labels: dict[str, str] | None = None,
) -> Capabilities:
    return Capabilities(
        resources={"cpu": 8.0, "memory": 16e9} if resources is None else resources,
        libraries={"torch": "2.13.0", "numpy": "1.26.4"} if libraries is None else libraries,
        tasks=tasks,
        labels=labels or {},
    )


def req(
    resources: dict[str, float] | None = None,
    libraries: dict[str, str] | None = None,
    task: str = "train",
    labels: dict[str, str] | None = None,
) -> Requirements:
    return Requirements(
        task=task, resources=resources or {}, libraries=libraries or {}, labels=labels or {}
    )


def test_satisfied_is_empty() -> None:
    assert check(req({"cpu": 2, "memory": 8e9}, {"torch": ">=2.2"}), caps()) == {}


def test_missing_gpu_and_custom_resource_are_named() -> None:
    assert check(req({"gpu": 1}), caps()) == {"missing": "gpu"}
    assert check(req({"gpu": 1, "fpga": 1}), caps()) == {"missing": "fpga, gpu"}
    assert check(req({"memory": 32e9}), caps()) == {"missing": "memory"}
    fpga = caps({"cpu": 1.0, "fpga": 1.0})
    assert check(req({"fpga": 1}), fpga) == {}


def test_cpu_defaults_to_one_slot() -> None:
    assert demand(req()) == {"cpu": 1.0}
    assert check(req(), caps({"cpu": 0.0})) == {"missing": "cpu"}
    assert check(req({"cpu": 0}), caps({"cpu": 0.0})) == {}


def test_task_library_label_reasons() -> None:
    assert check(req(task="infer"), caps()) == {"task": "infer"}
    assert check(req(libraries={"torch": ">=3"}), caps()) == {"library": "torch>=3"}
    assert check(req(libraries={"jax": ""}), caps()) == {"library": "jax"}
    assert check(req(labels={"zone": "eu"}), caps(labels={"zone": "us"})) == {"label": "zone=eu"}
    assert check(req(labels={"zone": "eu"}), caps(labels={"zone": "eu"})) == {}
    everything = check(req({"gpu": 1}, {"torch": "<2"}, task="x", labels={"a": "b"}), caps())
    assert everything == {"task": "x", "missing": "gpu", "library": "torch<2", "label": "a=b"}


@pytest.mark.parametrize(
    ("installed", "spec", "ok"),
    [
        ("2.13.0", ">=2.2", True),
        ("2.1.9", ">=2.2", False),
        ("1.3", "==1.3", True),
        ("1.3.0", "==1.3", True),
        ("1.3.1", "==1.3", False),
        ("1.3.1", "==1.3.*", True),
        ("2.2.5", "~=2.2", True),
        ("3.0", "~=2.2", False),
        ("2.2.5", "~=2.2.0", True),
        ("2.3.0", "~=2.2.0", False),
        ("1.26.4", "!=1.26.4", False),
        ("1.26.4", ">=1.20, <2, !=1.26.0", True),
        ("2.0.0", ">=1.20,<2", False),
        ("2.13.0+cpu", ">=2.2", True),
        ("2.14.0.dev20250101", ">=2.13", True),
        ("whatever", "", True),
        ("weird-build", "==weird-build", True),
        ("weird-build", ">=1", False),
        ("1.0", ">>1", False),
    ],
)
def test_version_specifiers(installed: str, spec: str, ok: bool) -> None:
    assert version_satisfies(installed, spec) is ok


releases = st.tuples(*(st.integers(0, 30) for _ in range(3)))


def _v(t: tuple[int, int, int]) -> str:
    return ".".join(map(str, t))


@given(releases, releases)
def test_ordering_matches_release_tuples(a: tuple[int, int, int], b: tuple[int, int, int]) -> None:
    assert version_satisfies(_v(a), f">={_v(b)}") is (a >= b)
    assert version_satisfies(_v(a), f"<{_v(b)}") is (a < b)
    assert version_satisfies(_v(a), f"=={_v(b)}") is (a == b)
    assert version_satisfies(_v(a), f"!={_v(b)}") is (a != b)
    assert version_satisfies(_v(a), f">={_v(b)},<{_v(b)}") is False


amounts = st.dictionaries(
    st.sampled_from(["cpu", "gpu", "memory", "fpga"]), st.floats(0, 64), max_size=4
)


@given(amounts, amounts, amounts)
def test_more_resources_never_hurt(
    need: dict[str, float], have: dict[str, float], extra: dict[str, float]
) -> None:
    r = req(need)
    bigger = {k: have.get(k, 0.0) + extra.get(k, 0.0) for k in have.keys() | extra.keys()}
    if not check(r, caps(have)):
        assert not check(r, caps(bigger))
    # A node with exactly what the task needs (cpu implied) can run it.
    assert check(r, caps(demand(r))) == {}


@given(amounts)
def test_missing_names_exactly_the_short_resources(have: dict[str, float]) -> None:
    need = {"cpu": 2.0, "gpu": 1.0, "fpga": 1.0}
    out = check(req(need), caps(have))
    short = sorted(k for k, v in need.items() if have.get(k, 0.0) < v)
    assert out.get("missing", "") == ", ".join(short)


def test_invalid_requirements() -> None:
    assert invalid(req({"cpu": 1})) is None
    assert invalid(req({"cpu": -1})) is not None
    assert invalid(req({"gpu": float("nan")})) is not None
    assert invalid(req(task="")) is not None


def test_merge_reasons_keeps_every_cause() -> None:
    merged = merge_reasons(
        [{"missing": "gpu"}, {"library": "torch>=2.2"}, {"missing": "fpga, gpu"}]
    )
    assert merged == {"library": "torch>=2.2", "missing": "fpga, gpu"}
