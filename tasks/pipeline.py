"""The image-recognition pipeline on a mesh, driven through a client: which stage runs where.

``run_pipeline(client, size)`` runs the stages of ``tasks.vision`` on the mesh ``client``
talks to: make augmented digit shards, preprocess them where they were made, train the
two-headed CNN where its training shards are (the training shards in one group per torch
node, each made and kept as one object: one round per epoch, the groups' weights averaged
between rounds), turn every shard into CNN features where it lies, then fit an SVM,
a random forest (digit class) and a ridge regressor (rotation angle) side by side and score
them with the CNN's own predictions on the held-out shards. Shards and features stay on the
node that made them as references; only weights and small results travel.

Each stage is pinned to the node holding its input through a label only that node has (a
``LocalMesh`` node has ``name=NAME``; give your machines one the same way); on a mesh without
such labels the auctions place the stages, and bids favour the holders. Either way training
shards are made and preprocessed on nodes with torch (a ``libraries`` requirement), where
the CNN trains.

The ``Run`` it returns records where and when each task ran as the client saw it; ``placed``,
``traffic``, ``usage`` and ``write_timeline`` read it. A node's busy time is reconstructed
from what the client sees (when a task's inputs were ready, when its result arrived, and how
many slots its node has), so it includes queueing inside a slot's turn but not the wait for a
slot. No task is defined here: this is client code, and only the public client API is used.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from mesh.client import Client, TaskFuture
from mesh.errors import MeshError
from mesh.protocol.codec import dumps
from mesh.protocol.messages import ObjectRef
from tasks.vision import PipelineSize

STAGES: Final = (
    "make_shard",
    "preprocess",
    "train_cnn",
    "average_weights",
    "extract_features",
    "predict",
    "train_svm",
    "train_forest",
    "train_regressor",
    "evaluate",
)
COLOURS: Final = dict(zip(STAGES, [f"C{i}" for i in range(len(STAGES))], strict=True))


@dataclass(eq=False)
class Step:
    """One task of the pipeline as the client saw it (seconds since the pipeline began)."""

    stage: str
    refs: tuple[ObjectRef, ...]
    inline_in: int
    ready: float
    end: float = 0.0
    node: str = ""
    value: Any = None


@dataclass
class Run:
    """What one pipeline run produced, and where and when each task ran."""

    figures: dict[str, float]
    steps: list[Step]
    nodes: dict[str, dict[str, Any]]
    """Node id -> its peer record (slots, libraries) at the start."""
    initiator: str
    wall_s: float


def _refs(value: Any) -> list[ObjectRef]:
    if isinstance(value, ObjectRef):
        return [value]
    if isinstance(value, list | tuple):
        return [r for v in value for r in _refs(v)]
    if isinstance(value, dict):
        return [r for v in value.values() for r in _refs(v)]
    return []


def _inline(value: Any) -> int:
    """Bytes of the arrays carried inline (not as references) in ``value``."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, list | tuple):
        return sum(_inline(v) for v in value)
    if isinstance(value, dict):
        return sum(_inline(v) for v in value.values())
    return 0


def unique_labels(peers: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, str]]:
    """Node id -> one label only that node has: what pins a task to the node holding its
    inputs. Nodes without such a label are left to the auction."""
    seen = Counter(kv for p in peers for kv in p["capabilities"]["labels"].items())
    out: dict[str, dict[str, str]] = {}
    for p in peers:
        for k, v in sorted(p["capabilities"]["labels"].items()):
            if seen[(k, v)] == 1:
                out[p["id"]] = {k: v}
                break
    return out


class Pipeline:
    """Runs the pipeline through ``client``; ``on_planned(stage, n)`` and ``on_done(stage)``
    (called from the client's thread) drive a progress display."""

    def __init__(
        self,
        client: Client,
        size: PipelineSize,
        *,
        pin: bool = True,
        on_planned: Callable[[str, int], None] = lambda stage, n: None,
        on_done: Callable[[str], None] = lambda stage: None,
        timeout: float = 900.0,
    ) -> None:
        self.client, self.size, self.pin = client, size, pin
        self.on_planned, self.on_done = on_planned, on_done
        self.deadline = time.monotonic() + timeout
        self.steps: list[Step] = []
        self.t0 = time.monotonic()
        self.labels: dict[str, dict[str, str]] = {}

    def _submit(
        self,
        stage: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None = None,
        at: Any = None,
        libraries: dict[str, str] | None = None,
    ) -> TaskFuture:
        """Submit ``vision.<stage>``; ``at`` (a node id or a reference) pins it there, and
        ``libraries`` keeps it to nodes that have them."""
        node = at.holder if isinstance(at, ObjectRef) else at
        labels = self.labels.get(node) if self.pin and isinstance(node, str) else None
        step = Step(stage, tuple(_refs([args, kwargs])), _inline([args, kwargs]), self._now())
        self.steps.append(step)
        fut = self.client.submit_with(
            f"vision.{stage}", args, kwargs or {}, labels=labels, libraries=libraries
        )

        def done(f: TaskFuture) -> None:
            step.end, step.node = self._now(), f.node
            if f.exception() is None:
                step.value = f.result()
            self.on_done(stage)

        fut.add_done_callback(done)  # type: ignore[arg-type]
        return fut

    def _now(self) -> float:
        return time.monotonic() - self.t0

    def _wait(self, stage: str, futures: Sequence[TaskFuture]) -> list[Any]:
        try:
            return self.client.gather(futures, timeout=max(0.0, self.deadline - time.monotonic()))
        except TimeoutError:
            raise MeshError(f"{stage}: no result before the pipeline's deadline") from None
        except MeshError as exc:
            raise MeshError(f"{stage}: {exc}") from exc

    def run(self) -> Run:
        size, seed = self.size, self.size.seed
        peers = [p for p in self.client.peers() if p["state"] == "alive"]
        nodes = {p["id"]: p for p in peers}
        initiator = next((p["id"] for p in peers if p.get("self")), "")
        self.labels = unique_labels(peers)
        torch_nodes = sorted(
            p["id"]
            for p in peers
            if "vision.train_cnn" in p["capabilities"]["tasks"]
            and "torch" in p["capabilities"]["libraries"]
        )
        others = sorted(set(nodes) - set(torch_nodes))
        # Training shards are made and preprocessed where they can be trained on (pinned, or
        # on any node with torch), held-out shards preferably on nodes that cannot train:
        # then the CNN trains where its data lies.
        trainable = {"torch": ""} if torch_nodes else None
        train_at = itertools.cycle(torch_nodes or sorted(nodes))
        test_at = itertools.cycle(others or torch_nodes or sorted(nodes))
        shard = {"seed": seed, "max_angle": size.max_angle}
        # The training shards are made in groups, one per torch node (each group is one
        # object, so it stays together wherever it is made or made again): see _train_cnn.
        count = max(1, min(len(torch_nodes), size.train_shards))
        groups = [list(range(g, size.train_shards, count)) for g in range(count)]
        plan: list[tuple[str, int, Any, int, str]] = [
            ("train", g, group, size.shard_size, next(train_at)) for g, group in enumerate(groups)
        ]
        plan += [
            ("test", i, i, size.test_shard_size, next(test_at)) for i in range(size.test_shards)
        ]
        self.on_planned("make_shard", len(plan))
        self.on_planned("preprocess", len(plan))
        made = {
            self._submit(
                "make_shard",
                (index,),
                {"size": n, "split": split, **shard},
                at=node,
                libraries=trainable if split == "train" else None,
            ): (split, i)
            for split, i, index, n, node in plan
        }
        pre: dict[tuple[str, int], TaskFuture] = {}
        try:
            for f in self.client.as_completed(made, timeout=self.deadline - time.monotonic()):
                raw = self._wait("make_shard", [f])[0]
                split = made[f][0]
                pre[made[f]] = self._submit(
                    "preprocess",
                    (raw,),
                    at=raw,
                    libraries=trainable if split == "train" else None,
                )
        except TimeoutError:
            raise MeshError("make_shard: no result before the pipeline's deadline") from None
        train = self._wait("preprocess", [pre["train", g] for g in range(len(groups))])
        test = self._wait("preprocess", [pre["test", i] for i in range(size.test_shards)])

        weights = self._train_cnn(train, [len(g) for g in groups])

        self.on_planned("extract_features", len(train) + len(test))
        self.on_planned("predict", len(test))
        dtype = {"dtype": size.feature_dtype}
        feats = [self._submit("extract_features", (weights, s), dtype, at=s) for s in train + test]
        preds = [self._submit("predict", (weights, s), at=s) for s in test]
        features = self._wait("extract_features", feats)
        train_f, test_f = features[: len(train)], features[len(train) :]
        cnn = self._wait("predict", preds)

        heads = ("train_svm", "train_forest", "train_regressor")
        for stage in (*heads, "evaluate"):
            self.on_planned(stage, 1)
        # The heads run side by side, one per node, the slowest (the forest) where most
        # feature bytes already are.
        fitters = [n for n, p in nodes.items() if "scikit-learn" in p["capabilities"]["libraries"]]
        held: Counter[str] = Counter({n: 0 for n in fitters})
        for r in _refs([train_f, test_f]):
            if r.holder in held:
                held[r.holder] += r.nbytes
        spots = itertools.cycle([n for n, _ in held.most_common()] or [None])
        fitted = {
            h: self._submit(h, (train_f, test_f), {"seed": seed}, at=next(spots))
            for h in ("train_forest", "train_svm", "train_regressor")
        }
        classes = np.concatenate([p["classes"] for p in cnn])
        angles = np.concatenate([p["angles"] for p in cnn])
        scored = self._submit("evaluate", (test_f,), {"classes": classes, "angles": angles})
        svm, forest, regressor = (
            r["info"] for r in self._wait("heads", [fitted[h] for h in heads])
        )
        scores = self._wait("evaluate", [scored])[0]
        figures = {
            "images": float(size.train_images),
            "accuracy_svm": float(svm["accuracy"]),
            "accuracy_forest": float(forest["accuracy"]),
            "accuracy_cnn": float(scores["accuracy"]),
            "angle_mae_cnn_deg": float(scores["angle_mae_deg"]),
            "angle_mae_regressor_deg": float(regressor["angle_mae_deg"]),
        }
        figures["angle_mae_deg"] = min(
            figures["angle_mae_cnn_deg"], figures["angle_mae_regressor_deg"]
        )
        return Run(figures, self.steps, nodes, initiator, self._now())

    def _train_cnn(self, train: list[Any], shards: list[int]) -> Any:
        """The CNN's weights (a reference), trained where its groups of shards are.

        ``train`` holds one group per torch node at the start of the run, ``shards`` the
        shards in each. With several groups and epochs, each group trains one epoch per
        round from the last round's average, weighted by images, on the node that holds
        it. A group is one object, made from its shard indices alone, so the model is the
        same whichever node made which group, and a group made again after its node died
        is the same group: a lost node moves work, never changes the model. A single
        group, or a single epoch (one average of models trained apart from the start is
        far worse than either), trains all epochs in one task where most of the images
        are, on the groups one after another (one group: shard order, as in one process).
        """
        size = self.size
        if len(train) == 1 or size.epochs == 1:
            most = max(range(len(train)), key=lambda g: shards[g])
            self.on_planned("train_cnn", 1)
            kwargs = {"seed": size.seed, "epochs": size.epochs, "batch_size": size.batch_size}
            return self._wait(
                "train_cnn", [self._submit("train_cnn", (train,), kwargs, at=train[most])]
            )[0]
        self.on_planned("train_cnn", size.epochs * len(train))
        self.on_planned("average_weights", size.epochs)
        weights: Any = None
        for r in range(size.epochs):
            kwargs = {"seed": size.seed + r, "epochs": 1, "batch_size": size.batch_size}
            if weights is not None:
                kwargs["init"] = weights
            trained = [self._submit("train_cnn", ([g],), kwargs, at=g) for g in train]
            results = self._wait("train_cnn", trained)
            weights = self._wait(
                "average_weights",
                [self._submit("average_weights", (results, shards), at=train[0])],
            )[0]
        return weights


def run_pipeline(client: Client, size: PipelineSize, **options: Any) -> Run:
    """Run the whole pipeline on the mesh ``client`` talks to; see ``Pipeline``."""
    return Pipeline(client, size, **options).run()


# ---------------------------------------------------------------------------------------
# What a run shows


def placed(run: Run) -> list[tuple[Step, float, int]]:
    """(step, start, slot) per finished task: each node's slots replayed in finishing order."""
    out = []
    by_node: dict[str, list[Step]] = defaultdict(list)
    for s in run.steps:
        if s.node:
            by_node[s.node].append(s)
    for node, steps in by_node.items():
        slots = int(
            run.nodes.get(node, {}).get("capabilities", {}).get("resources", {}).get("cpu", 1)
        )
        free = [0.0] * max(1, slots)
        for s in sorted(steps, key=lambda s: s.end):
            slot = min(range(len(free)), key=free.__getitem__)
            start = min(s.end, max(s.ready, free[slot]))
            free[slot] = s.end
            out.append((s, start, slot))
    return out


def traffic(run: Run) -> tuple[int, int]:
    """(bytes moved between nodes, bytes produced by tasks).

    Moved: referenced inputs a task fetched from another node, plus inline arrays carried
    between the submitting node and a different runner. Produced: every task's result.
    """
    moved = produced = 0
    for s in run.steps:
        size = s.value.nbytes if isinstance(s.value, ObjectRef) else len(dumps(s.value))
        produced += size
        moved += sum(r.nbytes for r in s.refs if r.holder != s.node)
        if s.node != run.initiator:
            moved += s.inline_in + (0 if isinstance(s.value, ObjectRef) else size)
    return moved, produced


def usage(run: Run) -> dict[str, dict[str, tuple[int, float]]]:
    """Stage -> node -> (tasks run, busy seconds)."""
    table: dict[str, dict[str, tuple[int, float]]] = defaultdict(dict)
    for s, start, _ in placed(run):
        n, busy = table[s.stage].get(s.node, (0, 0.0))
        table[s.stage][s.node] = (n + 1, busy + s.end - start)
    return table


def write_timeline(run: Run, path: Path) -> Path:
    """A PNG of tasks per node over time, coloured by stage."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.patches import Patch

    nodes = sorted(run.nodes)
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.9 * len(nodes)))
    for s, start, slot in placed(run):
        slots = int(
            run.nodes.get(s.node, {}).get("capabilities", {}).get("resources", {}).get("cpu", 1)
        )
        row = nodes.index(s.node) if s.node in nodes else len(nodes)
        height = 0.8 / max(1, slots)
        ax.broken_barh(
            [(start, max(s.end - start, 0.01))],
            (row - 0.4 + slot * height, height * 0.9),
            facecolors=COLOURS[s.stage],
            edgecolors="white",
            linewidth=0.5,
        )
    ax.set_yticks(range(len(nodes)), [node_name(run, n) for n in nodes])
    ax.set_xlabel("seconds since the pipeline began")
    ax.set_title("Tasks per node over time")
    used = [st for st in STAGES if any(s.stage == st for s in run.steps)]
    ax.legend(
        handles=[Patch(color=COLOURS[st], label=st) for st in used],
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        fontsize="small",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def node_name(run: Run, node: str) -> str:
    """``node``, marked where it lacks torch."""
    torch = "torch" in run.nodes.get(node, {}).get("capabilities", {}).get("libraries", {})
    return node if torch else f"{node} (no torch)"
