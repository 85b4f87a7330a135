"""How the pipeline groups training shards for federated averaging: a fixed number of
groups (one per torch node when the run began), each on a node that holds its shards."""

from __future__ import annotations

from mesh.protocol.messages import NodeId, ObjectRef
from tasks.pipeline import cnn_groups


def _shards(*holders: str) -> list[ObjectRef]:
    return [ObjectRef(id=f"s{i}", holder=NodeId(h), nbytes=100) for i, h in enumerate(holders)]


def _layout(groups: list[tuple[str | None, list[ObjectRef]]]) -> list[tuple[str | None, list[str]]]:
    return [(node, [s.id for s in shards]) for node, shards in groups]


def test_one_group_per_holder_when_every_torch_node_holds_shards() -> None:
    train = _shards("a", "b", "c", "a", "b", "c", "a", "b")
    assert _layout(cnn_groups(train, ["a", "b", "c"], epochs=3)) == [
        ("a", ["s0", "s3", "s6"]),
        ("b", ["s1", "s4", "s7"]),
        ("c", ["s2", "s5"]),
    ]


def test_a_lost_node_moves_its_group_and_keeps_the_count() -> None:
    # c died while shards were made: a and b made its shards again. Three groups still
    # train, the largest split on the node that holds it; no shard leaves its holder.
    train = _shards("a", "b", "a", "a", "b", "b", "a", "b")
    groups = cnn_groups(train, ["a", "b", "c"], epochs=3)
    assert len(groups) == 3
    assert sorted(len(shards) for _, shards in groups) == [2, 2, 4]
    assert all(s.holder == node for node, shards in groups for s in shards)
    assert sorted(s.id for _, shards in groups for s in shards) == sorted(s.id for s in train)


def test_shards_on_a_node_without_torch_join_the_smallest_group() -> None:
    train = _shards("a", "a", "b", "x")
    assert _layout(cnn_groups(train, ["a", "b"], epochs=2)) == [
        ("a", ["s0", "s1"]),
        ("b", ["s2", "s3"]),
    ]


def test_no_more_groups_than_shards() -> None:
    assert len(cnn_groups(_shards("a", "a"), ["a", "b", "c"], epochs=3)) == 2


def test_one_epoch_trains_every_shard_in_order_where_most_are() -> None:
    train = _shards("b", "a", "a", "b", "a")
    assert _layout(cnn_groups(train, ["a", "b"], epochs=1)) == [
        ("a", ["s0", "s1", "s2", "s3", "s4"])
    ]
