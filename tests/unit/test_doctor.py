"""``mesh-node doctor``'s judgement (``node.doctor.diagnose``) on observations made by hand:
each fault is named, with a fix, and a healthy machine gets one ``all-well``."""

from __future__ import annotations

from node.discovery import PROTOCOL_VERSION, Record
from node.doctor import Finding, Hello, Observations, PeerView, diagnose, report

MINE = "aaaaaaaaaaaaaaaa"
OTHER = "bbbbbbbbbbbbbbbb"
IFACES = [("eth0", "10.0.0.4")]


def record(node: str, address: str, mesh: str = MINE, version: str = PROTOCOL_VERSION) -> Record:
    return Record(
        instance=f"{node}._mesh-node._tcp.local.",
        node=node,
        mesh=mesh,
        version=version,
        package="0.1.0",
        addresses=(address,),
        port=7700,
    )


def hello(node: str, address: str, instance: str, mesh: str = MINE, **kw: object) -> Hello:
    return Hello(address=address, id=node, mesh=mesh, version="0.1.0", instance=instance, **kw)  # type: ignore[arg-type]


def healthy() -> Observations:
    me = hello("h4", "10.0.0.4:7700", "i4")
    return Observations(
        key_file="/k",
        key_file_mode=0o600,
        fingerprint=MINE,
        node_url="http://10.0.0.4:7700",
        local=me,
        local_address="10.0.0.4:7700",
        local_mdns=True,
        local_peers=[("h1", "10.0.0.1:7700", "alive")],
        interfaces=IFACES,
        records=[record("h1", "10.0.0.1"), record("h4", "10.0.0.4")],
        hellos=[hello("h1", "10.0.0.1:7700", "i1"), me],
        views=[PeerView(id="h1", address="10.0.0.1:7700", hears_us=True, reaches_us=True)],
    )


def names(findings: list[Finding], severity: str = "problem") -> set[str]:
    return {f.name for f in findings if f.severity == severity}


def test_healthy_machine_is_all_well() -> None:
    findings = diagnose(healthy())
    assert names(findings) == set()
    assert [f.name for f in findings] == ["all-well"]
    assert "all is well" in report(findings)


def test_multicast_neither_received_nor_sent_names_the_interface() -> None:
    obs = healthy()
    obs.records = []
    obs.views = [PeerView(id="h1", address="10.0.0.1:7700", hears_us=False, reaches_us=True)]
    findings = diagnose(obs)
    assert names(findings) == {"multicast-not-received", "multicast-not-sent"}
    assert all("eth0 (10.0.0.4)" in f.message for f in findings if f.severity == "problem")
    assert all(f.fix for f in findings if f.severity == "problem")


def test_port_blocked_is_seen_from_a_peer() -> None:
    obs = healthy()
    obs.views = [
        PeerView(id="h1", address="10.0.0.1:7700", hears_us=True, reaches_us=False, error="timeout")
    ]
    findings = diagnose(obs)
    assert names(findings) == {"port-blocked"}
    blocked = next(f for f in findings if f.name == "port-blocked")
    assert "h1 cannot connect" in blocked.message
    assert "7700" in blocked.fix


def test_nodes_of_another_mesh_are_counted() -> None:
    obs = healthy()
    obs.records += [record("x1", "10.0.0.8", OTHER), record("x2", "10.0.0.9", OTHER)]
    findings = diagnose(obs)
    other = next(f for f in findings if f.name == "other-mesh")
    assert "found 2 nodes with a different key" in other.message
    assert other.severity == "note"  # this machine sees its own mesh too
    alone = Observations(**{**_fields(obs), "records": obs.records[2:], "local_peers": []})
    assert "other-mesh" in names(diagnose(alone))


def _fields(obs: Observations) -> dict[str, object]:
    return {k: getattr(obs, k) for k in Observations.__slots__}  # type: ignore[attr-defined]


def test_two_nodes_with_one_id() -> None:
    obs = healthy()
    obs.records.append(record("h1", "10.0.0.6"))
    obs.hellos.append(hello("h1", "10.0.0.6:7700", "other-process"))
    findings = diagnose(obs)
    assert names(findings) == {"duplicate-id"}
    dup = next(f for f in findings if f.name == "duplicate-id")
    assert "10.0.0.1:7700" in dup.message
    assert "10.0.0.6:7700" in dup.message


def test_one_node_on_two_addresses_is_no_duplicate() -> None:
    obs = healthy()
    obs.hellos.append(hello("h1", "192.168.1.1:7700", "i1"))
    assert names(diagnose(obs)) == set()


def test_a_peer_of_an_old_protocol_version() -> None:
    obs = healthy()
    obs.records.append(record("h9", "10.0.0.9", version="0"))
    findings = diagnose(obs)
    assert names(findings) == {"incompatible-version"}
    assert "v0" in findings[0].message
    assert f"v{PROTOCOL_VERSION}" in findings[0].message


def test_a_clock_far_off() -> None:
    obs = healthy()
    obs.hellos[0] = hello("h1", "10.0.0.1:7700", "i1", clock_offset_s=-400.0)
    findings = diagnose(obs)
    assert names(findings) == {"clock-off"}
    assert "400 s behind" in findings[0].message


def test_loose_key_file_and_no_key() -> None:
    obs = healthy()
    obs.key_file_mode = 0o644
    findings = diagnose(obs)
    assert names(findings) == {"key-file-permissions"}
    assert findings[0].fix == "chmod 600 /k"
    obs.fingerprint = None
    assert "no-key" in names(diagnose(obs))


def test_no_node_here() -> None:
    obs = healthy()
    obs.local = None
    assert "no-local-node" in names(diagnose(obs))


def test_announced_but_unreachable_peer() -> None:
    obs = healthy()
    obs.hellos[0] = Hello(address="10.0.0.1:7700", error="timeout")
    assert names(diagnose(obs)) == {"peer-unreachable"}


def test_hearing_only_itself_while_peers_are_alive_is_multicast_not_received() -> None:
    obs = healthy()
    obs.records = [record("h4", "10.0.0.4")]
    findings = diagnose(obs)
    assert names(findings) == {"multicast-not-received"}
    assert "h1" in findings[0].message
    assert "eth0 (10.0.0.4)" in findings[0].message


def test_a_lone_first_node_gets_a_note_only() -> None:
    obs = healthy()
    obs.records = [record("h4", "10.0.0.4")]
    obs.local_peers = []
    obs.hellos = obs.hellos[1:]
    obs.views = []
    findings = diagnose(obs)
    assert names(findings) == set()
    assert names(findings, "note") == {"multicast-not-received"}
