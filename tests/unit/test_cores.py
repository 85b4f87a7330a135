"""Cores per worker: the pool a node measures (affinity, cgroup v1 and v2 quotas, kernel) and
the slots of the nodes sharing it, as membership reports them."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.protocol.core import MemberState, MemberView
from mesh.protocol.messages import Address, Capabilities, Load, NodeId
from node.capabilities import probe
from node.cores import (
    POOL_LABEL,
    CpuPool,
    HostSlots,
    cgroup_quota,
    local_pool,
    measure,
    slot_speed,
    threads_per_worker,
)

BOOT = "0b1d2c3e-0000-4000-8000-000000000001"


# --- threads per worker -------------------------------------------------------------------


def test_two_one_slot_nodes_on_two_cores_get_one_thread_each() -> None:
    assert threads_per_worker(2, 1 + 1) == 1


def test_a_node_alone_gets_its_cores_divided_by_its_slots() -> None:
    assert threads_per_worker(8, 2) == 4
    assert threads_per_worker(8, 3) == 2
    assert threads_per_worker(2, 1) == 2


def test_never_fewer_than_one_thread() -> None:
    assert threads_per_worker(2, 5) == 1
    assert threads_per_worker(1, 0) == 1


# --- measuring the pool -------------------------------------------------------------------


def fake_host(
    root: Path,
    *,
    cgroup: str,
    mountinfo: str,
    files: dict[str, str],
    boot: str = BOOT,
) -> Path:
    """A tree with what ``measure`` reads: /proc/self/{cgroup,mountinfo}, the boot id and
    cgroup files (paths relative to ``root``)."""
    (root / "proc/self").mkdir(parents=True, exist_ok=True)
    (root / "proc/sys/kernel/random").mkdir(parents=True, exist_ok=True)
    (root / "proc/self/cgroup").write_text(cgroup)
    (root / "proc/self/mountinfo").write_text(mountinfo)
    (root / "proc/sys/kernel/random/boot_id").write_text(boot + "\n")
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return root


V2_MOUNT = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
V1_MOUNTS = (
    "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755\n"
    "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
    "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
    "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
)
V1_GROUPS = "4:memory:/jobs/a\n2:cpu,cpuacct:/jobs/a\n0::/jobs/a\n"


def test_a_v2_quota_of_half_a_core_gives_one_core(tmp_path: Path) -> None:
    root = fake_host(
        tmp_path,
        cgroup="0::/app.slice/mesh.service\n",
        mountinfo=V2_MOUNT,
        files={"sys/fs/cgroup/app.slice/mesh.service/cpu.max": "50000 100000\n"},
    )
    pool = measure(root, affinity={0, 1, 2, 3})
    assert pool.quota == 0.5
    assert (pool.cpus, pool.cores) == (4, 1)
    assert threads_per_worker(pool.cores, 1) == 1


def test_the_tightest_quota_above_the_group_counts(tmp_path: Path) -> None:
    root = fake_host(
        tmp_path,
        cgroup="0::/app.slice/mesh.service\n",
        mountinfo=V2_MOUNT,
        files={
            "sys/fs/cgroup/app.slice/mesh.service/cpu.max": "max 100000\n",
            "sys/fs/cgroup/app.slice/cpu.max": "300000 100000\n",
            "sys/fs/cgroup/cpu.max": "max 100000\n",
        },
    )
    pool = measure(root, affinity=range(8))
    assert (pool.quota, pool.cores) == (3.0, 3)


def test_a_fractional_quota_rounds_down(tmp_path: Path) -> None:
    root = fake_host(
        tmp_path,
        cgroup="0::/\n",
        mountinfo=V2_MOUNT,
        files={"sys/fs/cgroup/cpu.max": "250000 100000\n"},
    )
    assert measure(root, affinity=range(8)).cores == 2


def test_a_v1_quota_is_read_through_the_cpu_controller_mount(tmp_path: Path) -> None:
    root = fake_host(
        tmp_path,
        cgroup=V1_GROUPS,
        mountinfo=V1_MOUNTS,
        files={
            "sys/fs/cgroup/cpu,cpuacct/jobs/a/cpu.cfs_quota_us": "150000\n",
            "sys/fs/cgroup/cpu,cpuacct/jobs/a/cpu.cfs_period_us": "100000\n",
            "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
            "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
        },
    )
    quota, group = cgroup_quota(root)
    assert quota == 1.5
    assert group
    assert measure(root, affinity={0, 1}).cores == 1


def test_no_quota_leaves_the_affinity(tmp_path: Path) -> None:
    root = fake_host(
        tmp_path,
        cgroup=V1_GROUPS,
        mountinfo=V1_MOUNTS,
        files={
            "sys/fs/cgroup/cpu,cpuacct/jobs/a/cpu.cfs_quota_us": "-1\n",
            "sys/fs/cgroup/cpu,cpuacct/jobs/a/cpu.cfs_period_us": "100000\n",
            "sys/fs/cgroup/unified/jobs/a/cpu.max": "max 100000\n",
        },
    )
    assert cgroup_quota(root) == (None, "")
    pool = measure(root, affinity={2, 3, 5})
    assert (pool.quota, pool.cpus, pool.cores) == (None, 3, 3)


def test_a_quota_larger_than_the_affinity_does_not_add_cores(tmp_path: Path) -> None:
    root = fake_host(
        tmp_path,
        cgroup="0::/\n",
        mountinfo=V2_MOUNT,
        files={"sys/fs/cgroup/cpu.max": "800000 100000\n"},
    )
    assert measure(root, affinity={0, 1}).cores == 2


def test_a_group_outside_the_mount_is_not_read(tmp_path: Path) -> None:
    # The hierarchy is mounted from /jobs (a container's view); the process sits elsewhere.
    root = fake_host(
        tmp_path,
        cgroup="0::/other/b\n",
        mountinfo="30 23 0:26 /jobs /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n",
        files={"sys/fs/cgroup/cpu.max": "50000 100000\n"},
    )
    assert cgroup_quota(root) == (None, "")


def test_a_nested_mount_root_maps_to_the_mount_point(tmp_path: Path) -> None:
    root = fake_host(
        tmp_path,
        cgroup="0::/jobs/a\n",
        mountinfo="30 23 0:26 /jobs /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n",
        files={"sys/fs/cgroup/a/cpu.max": "100000 100000\n"},
    )
    assert cgroup_quota(root)[0] == 1.0


def test_unreadable_or_missing_files_mean_no_quota(tmp_path: Path) -> None:
    assert cgroup_quota(tmp_path) == (None, "")
    root = fake_host(
        tmp_path,
        cgroup="0::/\n",
        mountinfo=V2_MOUNT,
        files={"sys/fs/cgroup/cpu.max": "garbage\n"},
    )
    assert cgroup_quota(root) == (None, "")


def test_pool_names_same_kernel_same_cpus_alike_else_apart(tmp_path: Path) -> None:
    def host(name: str, *, boot: str = BOOT, quota: str = "max 100000\n") -> Path:
        return fake_host(
            tmp_path / name,
            cgroup="0::/\n",
            mountinfo=V2_MOUNT,
            files={"sys/fs/cgroup/cpu.max": quota},
            boot=boot,
        )

    a = measure(host("a"), affinity={0, 1})
    assert measure(host("b"), affinity={1, 0}).name == a.name
    assert measure(host("c", boot=BOOT.replace("1", "2")), affinity={0, 1}).name != a.name
    assert measure(host("d"), affinity={0}).name != a.name
    assert measure(host("e", quota="100000 100000\n"), affinity={0, 1}).name != a.name


def test_this_machine_has_a_pool_and_the_probe_labels_it() -> None:
    pool = local_pool()
    assert pool.cores >= 1
    assert pool.cpus >= pool.cores
    assert probe(labels={"room": "lab"}).labels[POOL_LABEL] == pool.name
    assert probe(labels={POOL_LABEL: "by-hand"}).labels[POOL_LABEL] == "by-hand"


# --- slots on the host ----------------------------------------------------------------------


def view(node: str, *, slots: float, pool: str | None, state: str = "alive") -> MemberView:
    labels = {} if pool is None else {POOL_LABEL: pool}
    return MemberView(
        node=NodeId(node),
        address=Address(f"10.0.0.1:{len(node)}"),
        state=MemberState(state),
        incarnation=0,
        capabilities=Capabilities(
            resources={"cpu": slots, "memory": 1e9}, libraries={}, tasks=(), labels=labels
        ),
        load=Load(running=0, queued=0, backlog_s=0.0),
    )


class Peers:
    """What ``HostSlots`` reads of membership: one view per node."""

    def __init__(self, *views: MemberView) -> None:
        self.views = {v.node: v for v in views}
        self.scans = 0

    def members(self) -> list[MemberView]:
        self.scans += 1
        return list(self.views.values())

    def member(self, node: NodeId) -> MemberView | None:
        return self.views.get(node)

    def put(self, v: MemberView) -> NodeId:
        self.views[v.node] = v
        return v.node


ME = NodeId("me")


def test_alone_the_host_has_this_nodes_slots() -> None:
    peers = Peers(view("me", slots=2, pool="p"))
    assert HostSlots(peers, ME).observe([]) == 2


def test_nodes_in_the_pool_count_and_others_do_not() -> None:
    peers = Peers(
        view("me", slots=1, pool="p"),
        view("b", slots=1, pool="p"),
        view("elsewhere", slots=8, pool="q"),
        view("unlabelled", slots=8, pool=None),
    )
    host = HostSlots(peers, ME)
    slots = host.observe([NodeId("b")])
    assert slots == 2
    assert threads_per_worker(2, slots) == 1


def test_joins_and_leaves_update_the_count_without_rescanning() -> None:
    peers = Peers(view("me", slots=2, pool="p"))
    host = HostSlots(peers, ME)
    assert host.observe([]) == 2
    assert host.observe([peers.put(view("b", slots=1, pool="p"))]) == 3
    assert host.observe([peers.put(view("c", slots=3, pool="p", state="suspect"))]) == 6
    assert host.observe([peers.put(view("b", slots=1, pool="p", state="left"))]) == 5
    assert host.observe([peers.put(view("c", slots=3, pool="p", state="dead"))]) == 2
    del peers.views[NodeId("c")]  # purged
    assert host.observe([NodeId("c")]) == 2
    assert host.observe([peers.put(view("c", slots=4, pool="p"))]) == 6
    assert host.observe([peers.put(view("c", slots=4, pool="q"))]) == 2
    assert peers.scans == 1


def test_a_change_of_this_nodes_pool_or_slots_is_followed() -> None:
    peers = Peers(view("me", slots=2, pool="p"), view("b", slots=1, pool="q"))
    host = HostSlots(peers, ME)
    assert host.observe([]) == 2
    assert host.observe([peers.put(view("me", slots=3, pool="p"))]) == 3
    assert host.observe([peers.put(view("me", slots=3, pool="q"))]) == 4


def test_a_node_without_the_label_shares_with_nobody() -> None:
    peers = Peers(view("me", slots=2, pool=None), view("b", slots=1, pool=None))
    assert HostSlots(peers, ME).observe([NodeId("b")]) == 2


def test_absurd_slots_of_a_peer_leave_one_thread() -> None:
    peers = Peers(view("me", slots=2, pool="p"), view("b", slots=1e18, pool="p"))
    slots = HostSlots(peers, ME).observe([NodeId("b")])
    assert threads_per_worker(16, slots) == 1
    peers.put(view("b", slots=0, pool="p"))
    assert HostSlots(peers, ME).observe([]) == 2


def test_slot_speed_is_how_much_slower_a_busy_slot_runs_than_a_whole_core() -> None:
    def pool(cpus: int, quota: float | None) -> CpuPool:
        return CpuPool(
            name="p", cores=max(1, min(cpus, int(quota or cpus))), cpus=cpus, quota=quota
        )

    assert slot_speed(1, pool(2, None)) == 1.0  # a slot with a core to itself
    assert slot_speed(4, pool(2, None)) == 2.0  # four workers on two cores
    assert slot_speed(1, pool(2, 0.2)) == pytest.approx(5.0)  # held to a fifth of a core
    assert slot_speed(2, pool(8, 4.0)) == 1.0  # a quota above the slots costs nothing
    assert slot_speed(1, pool(1, 1e-9)) == 1e3  # bounded as the contract core requires
