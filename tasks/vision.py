"""The image-recognition pipeline: the reference workload of Mesh, one function per stage.

Stages, each a pure function of numpy arrays (nothing is pickled, nothing is read from disk):

``make_shard``
    Augmented handwritten digits from scikit-learn's bundled 8x8 set (no download), warped to
    28x28 with a random rotation (the regression target, degrees, counter-clockwise as shown),
    a random shift and Gaussian noise; ``uint8`` images. Deterministic from ``(seed, split,
    index)``. The ``"test"`` split draws only from base digits the ``"train"`` split never uses.
``preprocess``
    Median denoise, per-image contrast stretch and normalisation to zero mean and unit scale;
    ``float16`` images, which keep three significant digits at that scale (far finer than the
    8-bit source) at half the bytes to hold or move.
``train_cnn``
    A small two-headed CNN in torch (digit class and rotation angle), CUDA when present,
    deterministic under a seed. It returns its weights as a flat dict of ``float32`` arrays,
    and can start from given weights, so training can also be split into rounds whose weights
    are combined with ``average_weights``.
``extract_features`` / ``predict``
    The CNN's forward pass written in numpy from those weight arrays. Only training needs
    torch: a node without it still turns its own shards into features and predictions, so
    large arrays need not leave the node that made them.
``train_svm`` / ``train_forest`` / ``train_regressor``
    Classical heads on CNN features: an RBF SVM and a random forest for the digit class, a
    ridge regression on the features for the angle.
``evaluate``
    Accuracy and angle error against held-out shards.

A fitted scikit-learn model never leaves the call that fitted it. Each head takes the training
feature shards *and* the held-out shards it is to be judged on, fits, predicts and returns the
predictions with its training figures, all in one call. The alternative (a per-process model
cache keyed by a model id, with later predict calls pinned to the same node and process) would
tie correctness to placement and to worker lifetime, and would lose the model whenever a worker
is replaced; fitting and predicting together needs no state between tasks and no model on the
wire, and the heads' inputs (features) are small.

Images are validated on entry: a wrong shape or dtype raises ``ImageFormatError`` naming the
expected shape. torch and scikit-learn are imported only inside the functions that need them,
so importing this module costs numpy alone. This module never touches the network, the clock
of the mesh, or global random state (torch's generator is forked around seeding).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

from mesh.errors import MeshError
from tasks import task

SIDE: Final = 28
"""Images are SIDE x SIDE, the size of MNIST, which the CNN is shaped for."""

BOX: Final = 20.0
"""Side of the box the 8x8 digit is drawn into, leaving a margin so rotation and shift keep it
inside the frame (MNIST does the same with a 20x20 box in 28x28)."""

ANGLE_UNIT: Final = 45.0
"""The CNN's angle output is in units of this many degrees, so its target is of order one."""

FEATURES: Final = 64
"""Width of the CNN's feature layer: what the classical heads see."""

CLASSES: Final = 10

_NORM_MEAN: Final = 0.183
_NORM_STD: Final = 0.284
"""Mean and spread of contrast-stretched images, measured once over the default training set;
fixed constants so that every shard is normalised the same way without seeing the others."""

_SPLIT_SALT: Final = 0x5D16
_TEST_FRACTION: Final = 0.2

_TORCH: Final = {"torch": ">=2.2"}
_SKLEARN: Final = {"scikit-learn": ">=1.3"}

Array = npt.NDArray[Any]
Shard = dict[str, Array]
Weights = dict[str, Array]
Split = Literal["train", "test"]


class PipelineInputError(MeshError, ValueError):
    """A stage was called with an argument it cannot use (a user's mistake, not a peer's)."""


class ImageFormatError(PipelineInputError):
    """An image array (or a shard around it) does not have the shape or dtype a stage needs."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PipelineSize:
    """How much data the pipeline makes and how long the CNN trains.

    The default is the reference run: 20,000 training images in 8 shards and 2,000 held-out
    images, three epochs, which reaches the accuracy and angle goals on a 2-core CPU in well
    under the demo's time budget (the CNN's three epochs take about half a minute there).
    """

    train_shards: int = 8
    test_shards: int = 2
    shard_size: int = 2500
    test_shard_size: int = 1000
    epochs: int = 3
    batch_size: int = 64
    max_angle: float = 45.0
    seed: int = 0
    feature_dtype: Literal["float32", "float16"] = "float16"
    """What ``extract_features`` returns: float16 halves the features' bytes (they travel to
    the heads on other nodes), and the heads score the same on either."""

    @classmethod
    def small(cls, *, seed: int = 0) -> PipelineSize:
        """For tests and CI: seconds, not minutes, and still far above chance.

        One epoch over 1,600 images is about a hundred steps at batch 16, the least that
        lets the CNN's features carry the SVM past 0.8 accuracy; fewer images or larger
        batches leave it near 0.7.
        """
        return cls(
            train_shards=2,
            test_shards=1,
            shard_size=800,
            test_shard_size=300,
            epochs=1,
            batch_size=16,
            seed=seed,
        )

    @property
    def train_images(self) -> int:
        return self.train_shards * self.shard_size


# ---------------------------------------------------------------------------------------------
# validation


def check_images(images: object, *, dtype: type[np.generic], what: str = "images") -> Array:
    """Return ``images`` if it is an ``(n, 28, 28)`` array of ``dtype``, else raise.

    The error names the expected shape and dtype and what was received, so a user who passed
    a flat or colour array sees at once what the stage wants.
    """
    expected = f"an array of shape (n, {SIDE}, {SIDE}) and dtype {np.dtype(dtype).name}"
    if not isinstance(images, np.ndarray):
        raise ImageFormatError(f"{what}: expected {expected}, got {type(images).__name__}")
    if images.ndim != 3 or images.shape[1:] != (SIDE, SIDE):
        raise ImageFormatError(f"{what}: expected {expected}, got shape {images.shape}")
    if images.dtype != np.dtype(dtype):
        raise ImageFormatError(f"{what}: expected {expected}, got dtype {images.dtype}")
    return images


def _get(shard: object, key: str, what: str) -> object:
    if not isinstance(shard, Mapping) or key not in shard:
        raise ImageFormatError(f"{what}: expected a shard (a mapping with {key!r})")
    value: object = shard[key]
    return value


def _images(shard: object, dtype: type[np.generic], what: str) -> Array:
    return check_images(_get(shard, "images", what), dtype=dtype, what=f"{what}: images")


def _field(shard: object, key: str, what: str) -> Array:
    value = _get(shard, key, what)
    if not isinstance(value, np.ndarray):
        raise ImageFormatError(f"{what}: {key!r} must be an array, got {type(value).__name__}")
    return value


def _labels(shard: Mapping[str, Array], n: int, what: str) -> tuple[Array, Array]:
    labels = _field(shard, "labels", what)
    angles = _field(shard, "angles", what)
    if labels.shape != (n,) or angles.shape != (n,):
        raise ImageFormatError(
            f"{what}: labels and angles must have shape ({n},), "
            f"got {labels.shape} and {angles.shape}"
        )
    return labels, angles


def _feature_shard(shard: Mapping[str, Array], what: str) -> tuple[Array, Array, Array]:
    features = _field(shard, "features", what)
    if features.ndim != 2 or features.dtype not in (np.float32, np.float16):
        raise ImageFormatError(
            f"{what}: expected features of shape (n, k) and dtype float32 or float16, "
            f"got shape {features.shape} dtype {features.dtype}"
        )
    labels, angles = _labels(shard, features.shape[0], what)
    return features, labels, angles


# ---------------------------------------------------------------------------------------------
# data


def _split_pool(n: int, split: Split, seed: int) -> Array:
    """Indices of the base digits a split may use; the two splits never share one."""
    order = np.random.default_rng([seed, _SPLIT_SALT]).permutation(n)
    n_test = round(n * _TEST_FRACTION)
    return np.sort(order[:n_test] if split == "test" else order[n_test:])


def _warp(base: Array, angles_deg: Array, shifts: Array) -> Array:
    """Draw each 8x8 image into the 28x28 frame, rotated and shifted, by bilinear sampling.

    One inverse mapping per output pixel, so upscaling, rotation and shift cost one resample
    and no detail is lost twice.
    """
    n, src = base.shape[0], base.shape[1]
    scale = BOX / src
    centre = (SIDE - 1) / 2.0
    ys, xs = np.meshgrid(np.arange(SIDE, dtype=np.float64), np.arange(SIDE, dtype=np.float64))
    ys, xs = ys.T, xs.T
    dy = ys[None] - centre - shifts[:, 0, None, None]
    dx = xs[None] - centre - shifts[:, 1, None, None]
    theta = np.deg2rad(angles_deg)[:, None, None]
    cos, sin = np.cos(theta), np.sin(theta)
    # Rows grow downwards, so a counter-clockwise turn on screen maps back with this sign.
    sx = (cos * dx - sin * dy) / scale + (src - 1) / 2.0
    sy = (sin * dx + cos * dy) / scale + (src - 1) / 2.0
    x0 = np.floor(sx).astype(np.int64)
    y0 = np.floor(sy).astype(np.int64)
    fx, fy = sx - x0, sy - y0
    padded = np.zeros((n, src + 2, src + 2), dtype=np.float64)
    padded[:, 1:-1, 1:-1] = base
    # Outside the source everything reads the zero border.
    x0c = np.clip(x0 + 1, 0, src + 1)
    x1c = np.clip(x0 + 2, 0, src + 1)
    y0c = np.clip(y0 + 1, 0, src + 1)
    y1c = np.clip(y0 + 2, 0, src + 1)
    idx = np.arange(n)[:, None, None]
    out: Array = (
        padded[idx, y0c, x0c] * (1 - fx) * (1 - fy)
        + padded[idx, y0c, x1c] * fx * (1 - fy)
        + padded[idx, y1c, x0c] * (1 - fx) * fy
        + padded[idx, y1c, x1c] * fx * fy
    )
    return out


@task("vision.make_shard", libraries=_SKLEARN, est_runtime_s=0.5)
def make_shard(
    index: int | Sequence[int],
    *,
    size: int = 2500,
    split: Split = "train",
    seed: int = 0,
    max_angle: float = 45.0,
    max_shift: float = 2.0,
    noise: float = 0.08,
) -> Shard:
    """Make one shard of augmented digits, or several as one.

    Returns ``{"images": uint8 (size, 28, 28), "labels": int64 (size,), "angles": float32
    (size,)}``. The same arguments always give the same shard; shards with different
    ``index`` or ``split`` are independent draws. A list of indices gives those shards one
    after another, as one shard of ``len(index) * size`` images: a group that stays
    together wherever it is made.
    """
    if split not in ("train", "test"):
        raise PipelineInputError(f"split must be 'train' or 'test', got {split!r}")
    indices: list[Any] = list(index) if isinstance(index, list | tuple) else [index]
    if not indices or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise PipelineInputError(f"index must be an integer or a list of them, got {index!r}")
    if size < 1 or min(indices) < 0:
        raise PipelineInputError(f"size must be >= 1 and index >= 0, got size={size} index={index}")
    if not 0.0 <= max_angle <= 180.0:
        raise PipelineInputError(f"max_angle must be within [0, 180] degrees, got {max_angle}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    base_images: Array = np.asarray(digits.images, dtype=np.float64) / 16.0
    targets: Array = np.asarray(digits.target, dtype=np.int64)
    pool = _split_pool(len(targets), split, seed)
    parts = []
    for i in indices:
        rng = np.random.default_rng([seed, 1 if split == "test" else 0, i])
        pick = rng.choice(pool, size=size)
        angles = rng.uniform(-max_angle, max_angle, size)
        shifts = rng.uniform(-max_shift, max_shift, (size, 2))
        images = _warp(base_images[pick], angles, shifts)
        images += rng.normal(0.0, noise, images.shape)
        np.clip(images, 0.0, 1.0, out=images)
        parts.append((np.rint(images * 255.0).astype(np.uint8), targets[pick], angles))
    return {
        "images": np.concatenate([p[0] for p in parts]),
        "labels": np.concatenate([p[1] for p in parts]),
        "angles": np.concatenate([p[2] for p in parts]).astype(np.float32),
    }


# ---------------------------------------------------------------------------------------------
# preprocessing


def _median3(images: Array) -> Array:
    """3x3 median filter with edge replication, in chunks to bound the window copy."""
    out = np.empty_like(images)
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1)), mode="edge")
    step = 512
    for start in range(0, images.shape[0], step):
        windows = np.lib.stride_tricks.sliding_window_view(
            padded[start : start + step], (3, 3), axis=(1, 2)
        )
        flat = windows.reshape(*windows.shape[:3], 9)
        # The median of nine is the fifth smallest; partition is cheaper than a sort.
        out[start : start + step] = np.partition(flat, 4, axis=-1)[..., 4]
    return out


@task("vision.preprocess", est_runtime_s=0.3)
def preprocess(shard: Mapping[str, Array]) -> Shard:
    """Denoise, contrast-stretch and normalise a raw shard.

    Takes a ``make_shard`` result (images ``uint8 (n, 28, 28)``) and returns the same labels
    and angles with images ``float16 (n, 28, 28)``.
    """
    images = _images(shard, np.uint8, "preprocess")
    labels, angles = _labels(shard, images.shape[0], "preprocess")
    x = _median3(images.astype(np.float32) / np.float32(255.0))
    flat = x.reshape(x.shape[0], -1)
    lo = np.percentile(flat, 1.0, axis=1, keepdims=True)
    hi = np.percentile(flat, 99.5, axis=1, keepdims=True)
    # A blank image has no contrast to stretch; the floor keeps it blank instead of dividing by 0.
    stretched = np.clip((flat - lo) / np.maximum(hi - lo, 1e-3), 0.0, 1.0)
    normal = (stretched - _NORM_MEAN) / _NORM_STD
    return {
        "images": normal.reshape(images.shape).astype(np.float16),
        "labels": np.array(labels, dtype=np.int64),
        "angles": np.array(angles, dtype=np.float32),
    }


# ---------------------------------------------------------------------------------------------
# the CNN: trained in torch, run in numpy

# Layer shapes, the single source for both the torch module and the numpy forward pass.
_SHAPES: Final[dict[str, tuple[int, ...]]] = {
    "conv1.weight": (16, 1, 5, 5),
    "conv1.bias": (16,),
    "conv2.weight": (32, 16, 3, 3),
    "conv2.bias": (32,),
    "fc.weight": (FEATURES, 32 * 7 * 7),
    "fc.bias": (FEATURES,),
    "cls.weight": (CLASSES, FEATURES),
    "cls.bias": (CLASSES,),
    "angle.weight": (1, FEATURES),
    "angle.bias": (1,),
}


def check_weights(weights: object) -> Weights:
    """Return ``weights`` if it holds every CNN layer with the right shape, else raise.

    A ``train_cnn`` result (a mapping whose ``"weights"`` entry holds the layers) is taken
    as its weights, so a reference to a training result can be passed on as it is, without
    the submitter fetching it to pick the weights out.
    """
    if not isinstance(weights, Mapping):
        raise ImageFormatError(f"weights: expected a mapping of arrays, got {type(weights)}")
    inner = weights.get("weights")
    if isinstance(inner, Mapping) and "conv1.weight" not in weights:
        weights = inner
    out: Weights = {}
    for name, shape in _SHAPES.items():
        value = weights.get(name)
        if not isinstance(value, np.ndarray) or value.shape != shape:
            got = value.shape if isinstance(value, np.ndarray) else type(value).__name__
            raise ImageFormatError(
                f"weights: {name!r} must be an array of shape {shape}, got {got}"
            )
        if not np.issubdtype(value.dtype, np.floating) or not np.isfinite(value).all():
            raise ImageFormatError(f"weights: {name!r} must hold finite floating-point numbers")
        out[name] = np.asarray(value, dtype=np.float32)
    return out


def _stack(shards: Sequence[Mapping[str, Array]], what: str) -> tuple[Array, Array, Array]:
    if not shards:
        raise PipelineInputError(f"{what}: needs at least one shard")
    images, labels, angles = [], [], []
    for i, shard in enumerate(shards):
        x = _images(shard, np.float16, f"{what} shard {i}")
        y, a = _labels(shard, x.shape[0], f"{what} shard {i}")
        images.append(x)
        labels.append(y)
        angles.append(a)
    return np.concatenate(images), np.concatenate(labels), np.concatenate(angles)


@contextmanager
def _seeded_torch(seed: int, cuda: bool) -> Iterator[None]:
    """Seed torch inside a forked generator state, so the caller's random state is untouched."""
    import torch

    devices = list(range(torch.cuda.device_count())) if cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
            yield


def _build_net() -> Any:
    from torch import nn

    class TwoHeadNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 16, 5, padding=2)
            self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
            self.fc = nn.Linear(32 * 7 * 7, FEATURES)
            self.cls = nn.Linear(FEATURES, CLASSES)
            self.angle = nn.Linear(FEATURES, 1)
            self.pool = nn.MaxPool2d(2)
            self.relu = nn.ReLU()

        def forward(self, x: Any) -> tuple[Any, Any]:
            x = self.pool(self.relu(self.conv1(x)))
            x = self.pool(self.relu(self.conv2(x)))
            f = self.relu(self.fc(x.flatten(1)))
            return self.cls(f), self.angle(f).squeeze(1)

    return TwoHeadNet()


@task("vision.train_cnn", libraries=_TORCH, est_runtime_s=30.0)
def train_cnn(
    shards: Sequence[Mapping[str, Array]],
    *,
    seed: int = 0,
    epochs: int = 3,
    batch_size: int = 64,
    lr: float = 3e-3,
    angle_weight: float = 1.0,
    init: Mapping[str, Array] | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Train the two-headed CNN on preprocessed shards; return weights and training figures.

    Returns ``{"weights": {layer: float32 array}, "info": {...}}``. Deterministic for a given
    seed, input and device. ``init`` starts from given weights (a later round of training).
    ``device`` defaults to CUDA when available, else CPU.
    """
    if epochs < 1 or batch_size < 1:
        raise PipelineInputError(
            f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}"
        )
    x_np, y_np, a_np = _stack(shards, "train_cnn")
    init_weights = check_weights(init) if init is not None else None
    import torch
    from torch.nn import functional

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t0 = time.perf_counter()
    with _seeded_torch(seed, dev.type == "cuda"):
        net = _build_net()
        if init_weights is not None:
            net.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in init_weights.items()})
        net.to(dev)
        x = torch.from_numpy(x_np.astype(np.float32)).unsqueeze(1).to(dev)
        y = torch.from_numpy(y_np.astype(np.int64)).to(dev)
        a = torch.from_numpy(a_np.astype(np.float32) / np.float32(ANGLE_UNIT)).to(dev)
        n = x.shape[0]
        steps = epochs * -(-n // batch_size)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
        gen = torch.Generator().manual_seed(seed)
        net.train()
        loss_sum, loss_n = 0.0, 0
        for epoch in range(epochs):
            order = torch.randperm(n, generator=gen).to(dev)
            for i in range(0, n, batch_size):
                batch = order[i : i + batch_size]
                logits, angle = net(x[batch])
                loss = functional.cross_entropy(logits, y[batch]) + angle_weight * (
                    functional.smooth_l1_loss(angle, a[batch], beta=0.1)
                )
                opt.zero_grad(set_to_none=True)
                torch.autograd.backward([loss])
                opt.step()
                sched.step()
                if epoch == epochs - 1:
                    loss_sum += float(loss.detach()) * len(batch)
                    loss_n += len(batch)
        weights = {
            k: v.detach().cpu().numpy().astype(np.float32) for k, v in net.state_dict().items()
        }
    return {
        "weights": weights,
        "info": {
            "images": int(n),
            "epochs": epochs,
            "device": dev.type,
            "seconds": time.perf_counter() - t0,
            "final_loss": loss_sum / max(loss_n, 1),
        },
    }


@task("vision.average_weights", est_runtime_s=0.0)
def average_weights(
    weights: Sequence[Mapping[str, Array]], counts: Sequence[int] | None = None
) -> Weights:
    """Average CNN weights trained on different shards, weighted by their image counts.

    Each entry may be a weights dict or a whole ``train_cnn`` result.
    """
    if not weights:
        raise PipelineInputError("average_weights: needs at least one set of weights")
    checked = [check_weights(w) for w in weights]
    share = np.asarray(counts if counts is not None else [1] * len(checked), dtype=np.float64)
    if share.shape != (len(checked),) or np.any(share <= 0):
        raise PipelineInputError(
            "average_weights: counts must be one positive number per set of weights"
        )
    share /= share.sum()
    return {
        name: sum(
            (s * w[name].astype(np.float64) for s, w in zip(share, checked, strict=True)),
            np.zeros(shape),
        ).astype(np.float32)
        for name, shape in _SHAPES.items()
    }


def _conv_relu_pool(x: Array, weight: Array, bias: Array) -> Array:
    """Same-padded convolution, ReLU and 2x2 max-pool, as im2col and one matrix product."""
    out_c, in_c, k, _ = weight.shape
    pad = k // 2
    n, _, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (k, k), axis=(2, 3))
    cols = windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * h * w, in_c * k * k)
    y = cols @ weight.reshape(out_c, -1).T + bias
    # Pool before moving channels first: the transpose then copies a quarter of the data.
    y = np.maximum(y, 0.0).reshape(n, h // 2, 2, w // 2, 2, out_c).max(axis=(2, 4))
    return np.ascontiguousarray(y.transpose(0, 3, 1, 2))


def _forward(weights: Weights, images: Array) -> tuple[Array, Array, Array]:
    """Features, class logits and angles (degrees) for float16 images, in float32 numpy."""
    feats, logits, angles = [], [], []
    # Chunks bound the im2col copy (25 floats per pixel for the first layer).
    step = 256
    for start in range(0, images.shape[0], step):
        x = images[start : start + step, None].astype(np.float32)
        x = _conv_relu_pool(x, weights["conv1.weight"], weights["conv1.bias"])
        x = _conv_relu_pool(x, weights["conv2.weight"], weights["conv2.bias"])
        f = np.maximum(x.reshape(x.shape[0], -1) @ weights["fc.weight"].T + weights["fc.bias"], 0)
        feats.append(f.astype(np.float32))
        logits.append(f @ weights["cls.weight"].T + weights["cls.bias"])
        angles.append((f @ weights["angle.weight"].T + weights["angle.bias"])[:, 0] * ANGLE_UNIT)
    return (
        np.concatenate(feats),
        np.concatenate(logits).astype(np.float32),
        np.concatenate(angles).astype(np.float32),
    )


@task("vision.extract_features", est_runtime_s=1.0)
def extract_features(
    weights: Mapping[str, Array],
    shard: Mapping[str, Array],
    *,
    dtype: Literal["float32", "float16"] = "float32",
) -> Shard:
    """CNN features of one preprocessed shard: ``{"features": (n, 64), labels, angles}``.

    Runs in numpy, so any node can turn the shards it holds into features. ``dtype`` is
    that of the features: ``"float16"`` halves what travels to the classical heads, which
    compute in float32 either way (ReLU activations need no more than float16's three
    significant digits).
    """
    if dtype not in ("float32", "float16"):
        raise PipelineInputError(
            f"extract_features: dtype must be float32 or float16, not {dtype!r}"
        )
    w = check_weights(weights)
    images = _images(shard, np.float16, "extract_features")
    labels, angles = _labels(shard, images.shape[0], "extract_features")
    features, _, _ = _forward(w, images)
    return {
        "features": features.astype(dtype, copy=False),
        "labels": np.array(labels, dtype=np.int64),
        "angles": np.array(angles, dtype=np.float32),
    }


@task("vision.predict", est_runtime_s=1.0)
def predict(weights: Mapping[str, Array], shard: Mapping[str, Array]) -> dict[str, Array]:
    """The CNN's own predictions for a preprocessed shard: ``{"classes": int64, "angles": f32}``."""
    w = check_weights(weights)
    images = _images(shard, np.float16, "predict")
    _, logits, angles = _forward(w, images)
    return {"classes": logits.argmax(axis=1).astype(np.int64), "angles": angles}


# ---------------------------------------------------------------------------------------------
# classical heads: fit and predict in one call, so a fitted model never has to travel


def _stack_features(shards: Sequence[Mapping[str, Array]], what: str) -> tuple[Array, Array, Array]:
    if not shards:
        raise PipelineInputError(f"{what}: needs at least one feature shard")
    parts = [_feature_shard(s, f"{what} shard {i}") for i, s in enumerate(shards)]
    widths = {p[0].shape[1] for p in parts}
    if len(widths) != 1:
        raise ImageFormatError(f"{what}: feature shards disagree on width: {sorted(widths)}")
    return (
        np.concatenate([p[0].astype(np.float32, copy=False) for p in parts]),
        np.concatenate([p[1] for p in parts]),
        np.concatenate([p[2] for p in parts]),
    )


def _subsample(n: int, limit: int | None, seed: int) -> Array:
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, 0x5B]).choice(n, size=limit, replace=False))


def _head(
    kind: str,
    train: Sequence[Mapping[str, Array]],
    held_out: Sequence[Mapping[str, Array]],
    *,
    seed: int,
    max_train: int | None,
    model: Any,
    target: Literal["class", "angle"],
) -> dict[str, Any]:
    x, y, a = _stack_features(train, f"train_{kind}")
    xe, ye, ae = _stack_features(held_out, f"train_{kind} held-out")
    if xe.shape[1] != x.shape[1]:
        raise ImageFormatError(
            f"train_{kind}: held-out features have width {xe.shape[1]}, training {x.shape[1]}"
        )
    keep = _subsample(x.shape[0], max_train, seed)
    t0 = time.perf_counter()
    model.fit(x[keep], (y if target == "class" else a)[keep])
    fit_s = time.perf_counter() - t0
    out = model.predict(xe)
    info: dict[str, Any] = {"model": kind, "train_images": int(keep.size), "fit_s": fit_s}
    if target == "class":
        predictions = np.asarray(out, dtype=np.int64)
        info["accuracy"] = float(np.mean(predictions == ye))
    else:
        predictions = np.asarray(out, dtype=np.float32)
        info["angle_mae_deg"] = float(np.mean(np.abs(predictions - ae)))
    return {"predictions": predictions, "info": info}


@task("vision.train_svm", libraries=_SKLEARN, est_runtime_s=2.0)
def train_svm(
    train: Sequence[Mapping[str, Array]],
    held_out: Sequence[Mapping[str, Array]],
    *,
    seed: int = 0,
    max_train: int | None = 8000,
    c: float = 10.0,
) -> dict[str, Any]:
    """Fit an RBF SVM for the digit class on feature shards; predict the held-out shards.

    Returns ``{"predictions": int64 (m,), "info": {"accuracy", "fit_s", ...}}``. An RBF SVM's
    fit grows with the square of its training set, so it keeps at most ``max_train`` images
    (a seeded subsample): on CNN features that costs nothing in accuracy.
    """
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    model = make_pipeline(StandardScaler(), SVC(C=c, gamma="scale", random_state=seed))
    return _head(
        "svm", train, held_out, seed=seed, max_train=max_train, model=model, target="class"
    )


@task("vision.train_forest", libraries=_SKLEARN, est_runtime_s=8.0)
def train_forest(
    train: Sequence[Mapping[str, Array]],
    held_out: Sequence[Mapping[str, Array]],
    *,
    seed: int = 0,
    max_train: int | None = None,
    trees: int = 100,
) -> dict[str, Any]:
    """Fit a random forest for the digit class on feature shards; predict the held-out shards."""
    from sklearn.ensemble import RandomForestClassifier

    model = RandomForestClassifier(n_estimators=trees, random_state=seed, n_jobs=1)
    return _head(
        "forest", train, held_out, seed=seed, max_train=max_train, model=model, target="class"
    )


@task("vision.train_regressor", libraries=_SKLEARN, est_runtime_s=0.5)
def train_regressor(
    train: Sequence[Mapping[str, Array]],
    held_out: Sequence[Mapping[str, Array]],
    *,
    seed: int = 0,
    max_train: int | None = None,
    alpha: float = 1.0,
) -> dict[str, Any]:
    """Fit a ridge regression for the rotation angle on feature shards; predict held-out angles.

    Returns ``{"predictions": float32 degrees (m,), "info": {"angle_mae_deg", ...}}``.
    """
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), Ridge(alpha=alpha))
    return _head(
        "regressor", train, held_out, seed=seed, max_train=max_train, model=model, target="angle"
    )


@task("vision.evaluate", est_runtime_s=0.0)
def evaluate(
    held_out: Sequence[Mapping[str, Array]],
    *,
    classes: Array | None = None,
    angles: Array | None = None,
) -> dict[str, float]:
    """Accuracy of ``classes`` and mean absolute error (degrees) of ``angles`` on held-out shards.

    Accepts raw, preprocessed or feature shards: only their labels and angles are read.
    """
    if not held_out:
        raise PipelineInputError("evaluate: needs at least one held-out shard")
    labels = np.concatenate([np.asarray(_field(s, "labels", "evaluate")) for s in held_out])
    truth = np.concatenate([np.asarray(_field(s, "angles", "evaluate")) for s in held_out])
    out: dict[str, float] = {}
    if classes is not None:
        if np.shape(classes) != labels.shape:
            raise PipelineInputError(f"evaluate: classes must have shape {labels.shape}")
        out["accuracy"] = float(np.mean(np.asarray(classes) == labels))
    if angles is not None:
        if np.shape(angles) != truth.shape:
            raise PipelineInputError(f"evaluate: angles must have shape {truth.shape}")
        out["angle_mae_deg"] = float(np.mean(np.abs(np.asarray(angles) - truth)))
    return out


# ---------------------------------------------------------------------------------------------
# the whole pipeline as plain sequential code, the baseline the mesh is measured against


def run_sequential(size: PipelineSize | None = None) -> dict[str, Any]:
    """Run every stage in this process, one after another; return the figures and timings.

    The same calls, arguments and seeds as the pipeline on the mesh, so the two give the same
    numbers and their wall times compare the same work. Returns ``{"accuracy_svm",
    "accuracy_forest", "accuracy_cnn", "angle_mae_deg" (the better of the CNN head and the
    regressor), "angle_mae_cnn_deg", "angle_mae_regressor_deg", "images", "stage_s"}``.
    """
    size = size or PipelineSize()
    stage_s: dict[str, float] = {}

    def timed(stage: str, start: float) -> None:
        stage_s[stage] = stage_s.get(stage, 0.0) + time.perf_counter() - start

    t = time.perf_counter()
    raw = [
        make_shard(i, size=size.shard_size, seed=size.seed, max_angle=size.max_angle)
        for i in range(size.train_shards)
    ]
    raw_test = [
        make_shard(
            i, size=size.test_shard_size, split="test", seed=size.seed, max_angle=size.max_angle
        )
        for i in range(size.test_shards)
    ]
    timed("make_shard", t)
    t = time.perf_counter()
    train = [preprocess(s) for s in raw]
    test = [preprocess(s) for s in raw_test]
    timed("preprocess", t)
    t = time.perf_counter()
    weights = train_cnn(train, seed=size.seed, epochs=size.epochs, batch_size=size.batch_size)[
        "weights"
    ]
    timed("train_cnn", t)
    t = time.perf_counter()
    train_f = [extract_features(weights, s, dtype=size.feature_dtype) for s in train]
    test_f = [extract_features(weights, s, dtype=size.feature_dtype) for s in test]
    timed("extract_features", t)
    t = time.perf_counter()
    cnn = [predict(weights, s) for s in test]
    timed("predict", t)
    heads: dict[str, dict[str, Any]] = {}
    for name, head in (
        ("svm", train_svm),
        ("forest", train_forest),
        ("regressor", train_regressor),
    ):
        t = time.perf_counter()
        heads[name] = head(train_f, test_f, seed=size.seed)
        timed(f"train_{name}", t)
    t = time.perf_counter()
    cnn_scores = evaluate(
        test,
        classes=np.concatenate([p["classes"] for p in cnn]),
        angles=np.concatenate([p["angles"] for p in cnn]),
    )
    timed("evaluate", t)
    angle_cnn = cnn_scores["angle_mae_deg"]
    angle_reg = float(heads["regressor"]["info"]["angle_mae_deg"])
    return {
        "images": size.train_images,
        "accuracy_svm": float(heads["svm"]["info"]["accuracy"]),
        "accuracy_forest": float(heads["forest"]["info"]["accuracy"]),
        "accuracy_cnn": cnn_scores["accuracy"],
        "angle_mae_deg": min(angle_cnn, angle_reg),
        "angle_mae_cnn_deg": angle_cnn,
        "angle_mae_regressor_deg": angle_reg,
        "stage_s": stage_s,
    }
