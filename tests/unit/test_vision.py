"""The vision pipeline's stages in one process: shapes, determinism, accuracy, bad input."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from mesh.errors import MeshError
from mesh.protocol.codec import dumps, loads
from tasks import Registry
from tasks import vision as v

pytest.importorskip("torch")
pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def raw() -> v.Shard:
    return v.make_shard(0, size=120, seed=3)


@pytest.fixture(scope="module")
def pre(raw: v.Shard) -> v.Shard:
    return v.preprocess(raw)


@pytest.fixture(scope="module")
def weights(pre: v.Shard) -> v.Weights:
    result = v.train_cnn([pre], seed=1, epochs=1, batch_size=32)
    weights: v.Weights = result["weights"]
    return weights


@pytest.fixture(scope="module")
def small_run() -> dict[str, Any]:
    return v.run_sequential(v.PipelineSize.small())


# --- data ------------------------------------------------------------------------------------


def test_make_shard_shapes_dtypes_and_ranges(raw: v.Shard) -> None:
    assert set(raw) == {"images", "labels", "angles"}
    assert raw["images"].shape == (120, 28, 28)
    assert raw["images"].dtype == np.uint8
    assert raw["labels"].dtype == np.int64
    assert raw["angles"].dtype == np.float32
    assert set(np.unique(raw["labels"])) <= set(range(10))
    assert len(np.unique(raw["labels"])) >= 8
    assert np.all(np.abs(raw["angles"]) <= 45.0)
    # The augmentation really varies the angle, not a constant.
    assert raw["angles"].std() > 10.0


def test_make_shard_is_deterministic_and_shards_differ(raw: v.Shard) -> None:
    again = v.make_shard(0, size=120, seed=3)
    for key in raw:
        np.testing.assert_array_equal(raw[key], again[key])
    other = v.make_shard(1, size=120, seed=3)
    assert not np.array_equal(raw["images"], other["images"])
    test = v.make_shard(0, size=120, split="test", seed=3)
    assert not np.array_equal(raw["angles"], test["angles"])


def test_a_group_of_shards_is_its_shards_one_after_another(raw: v.Shard) -> None:
    group = v.make_shard([0, 2], size=120, seed=3)
    second = v.make_shard(2, size=120, seed=3)
    for key in raw:
        np.testing.assert_array_equal(group[key], np.concatenate([raw[key], second[key]]))
        assert group[key].dtype == raw[key].dtype
    # Preprocessing works image by image: a group preprocessed is its shards preprocessed.
    pre = v.preprocess(group)
    np.testing.assert_array_equal(pre["images"][:120], v.preprocess(raw)["images"])


def test_held_out_split_never_shares_a_base_digit() -> None:
    train = v._split_pool(1797, "train", 3)
    test = v._split_pool(1797, "test", 3)
    assert not set(train.tolist()) & set(test.tolist())
    assert len(train) + len(test) == 1797
    assert len(test) == 359


def test_rotation_angle_is_counter_clockwise_degrees() -> None:
    digits = np.zeros((1, 8, 8))
    digits[0, 1:7, 2] = 1.0  # a vertical bar left of centre
    digits[0, 1, 2:6] = 1.0  # and a top bar: no symmetry that could hide the direction
    upright = v._warp(digits, np.array([0.0]), np.zeros((1, 2)))
    turned = v._warp(digits, np.array([90.0]), np.zeros((1, 2)))
    np.testing.assert_allclose(turned[0], np.rot90(upright[0]), atol=1e-9)


def test_make_shard_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="split"):
        v.make_shard(0, size=4, split="validation")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="size"):
        v.make_shard(0, size=0)
    for index in ([], [0, -1], [0, "1"], [True], 1.5):
        with pytest.raises(ValueError, match="index"):
            v.make_shard(index, size=4)  # type: ignore[arg-type]


# --- preprocessing ---------------------------------------------------------------------------


def test_preprocess_shapes_and_normalisation(raw: v.Shard, pre: v.Shard) -> None:
    assert pre["images"].shape == (120, 28, 28)
    assert pre["images"].dtype == np.float16
    np.testing.assert_array_equal(pre["labels"], raw["labels"])
    np.testing.assert_array_equal(pre["angles"], raw["angles"])
    x = pre["images"].astype(np.float32)
    assert abs(float(x.mean())) < 0.3
    assert 0.7 < float(x.std()) < 1.3


def test_preprocess_removes_speckle_and_stretches_contrast() -> None:
    images = np.full((2, 28, 28), 100, dtype=np.uint8)
    images[0, 5, 5] = 255  # lone noise pixel on a flat field
    images[1, 8:20, 8:20] = 140  # a faint square: contrast 40 of 255
    shard: v.Shard = {
        "images": images,
        "labels": np.zeros(2, np.int64),
        "angles": np.zeros(2, np.float32),
    }
    out = v.preprocess(shard)["images"].astype(np.float32)
    assert np.ptp(out[0]) == 0.0  # the speckle is gone: the field is flat again
    low, high = out[1].min(), out[1].max()
    # Stretched to the full range: 0 and 1 before normalisation.
    np.testing.assert_allclose([low, high], [(0 - 0.183) / 0.284, (1 - 0.183) / 0.284], atol=1e-2)


def test_preprocess_does_not_write_to_its_input(raw: v.Shard) -> None:
    frozen = {k: a.copy() for k, a in raw.items()}
    for a in frozen.values():
        a.flags.writeable = False  # arrays decoded from the wire are read-only views
    v.preprocess(frozen)


# --- bad input -------------------------------------------------------------------------------


def _shard(images: Any, n: int = 4) -> dict[str, Any]:
    return {"images": images, "labels": np.zeros(n, np.int64), "angles": np.zeros(n, np.float32)}


@pytest.mark.parametrize(
    ("images", "detail"),
    [
        (np.zeros((4, 784), np.uint8), r"got shape \(4, 784\)"),
        (np.zeros((4, 28, 28, 3), np.uint8), r"got shape \(4, 28, 28, 3\)"),
        (np.zeros((4, 32, 32), np.uint8), r"got shape \(4, 32, 32\)"),
        (np.zeros((4, 28, 28), np.float64), "got dtype float64"),
        ([[0] * 28] * 28, "got list"),
    ],
)
def test_preprocess_names_the_expected_shape(images: Any, detail: str) -> None:
    with pytest.raises(v.ImageFormatError, match=r"shape \(n, 28, 28\) and dtype uint8") as info:
        v.preprocess(_shard(images))
    assert info.match(detail)
    assert isinstance(info.value, MeshError)
    assert isinstance(info.value, ValueError)


def test_cnn_stages_want_preprocessed_float16_images(weights: v.Weights) -> None:
    raw_images = np.zeros((4, 28, 28), np.uint8)
    with pytest.raises(v.ImageFormatError, match=r"\(n, 28, 28\) and dtype float16"):
        v.extract_features(weights, _shard(raw_images))
    with pytest.raises(v.ImageFormatError, match=r"\(n, 28, 28\) and dtype float16"):
        v.predict(weights, _shard(np.zeros((4, 27, 28), np.float16)))
    with pytest.raises(v.ImageFormatError, match=r"train_cnn shard 0.*dtype float16"):
        v.train_cnn([_shard(raw_images)], epochs=1)


def test_labels_must_match_the_images() -> None:
    shard = _shard(np.zeros((4, 28, 28), np.uint8))
    shard["labels"] = np.zeros(3, np.int64)
    with pytest.raises(v.ImageFormatError, match=r"shape \(4,\)"):
        v.preprocess(shard)
    with pytest.raises(v.ImageFormatError, match="'labels'"):
        v.preprocess({"images": np.zeros((4, 28, 28), np.uint8)})
    with pytest.raises(v.ImageFormatError, match="a shard"):
        v.preprocess([1, 2, 3])  # type: ignore[arg-type]


def test_bad_weights_are_refused(weights: v.Weights, pre: v.Shard) -> None:
    missing = {k: a for k, a in weights.items() if k != "fc.weight"}
    with pytest.raises(v.ImageFormatError, match=r"'fc.weight' must be an array of shape"):
        v.extract_features(missing, pre)
    wrong = dict(weights, **{"conv1.weight": np.zeros((16, 1, 3, 3), np.float32)})
    with pytest.raises(v.ImageFormatError, match=r"\(16, 1, 5, 5\)"):
        v.predict(wrong, pre)
    poisoned = dict(weights, **{"cls.bias": np.full(10, np.nan, np.float32)})
    with pytest.raises(v.ImageFormatError, match="finite"):
        v.predict(poisoned, pre)


def test_heads_refuse_mismatched_features(weights: v.Weights, pre: v.Shard) -> None:
    feats = v.extract_features(weights, pre)
    narrow = dict(feats, features=feats["features"][:, :10])
    with pytest.raises(v.ImageFormatError, match="width"):
        v.train_regressor([feats], [narrow])
    with pytest.raises(v.ImageFormatError, match="float32"):
        v.train_svm([dict(feats, features=feats["features"].astype(np.float64))], [feats])
    with pytest.raises(ValueError, match="at least one"):
        v.train_forest([], [feats])


def test_evaluate_checks_prediction_length(pre: v.Shard) -> None:
    with pytest.raises(ValueError, match=r"\(120,\)"):
        v.evaluate([pre], classes=np.zeros(5, np.int64))
    perfect = v.evaluate([pre], classes=pre["labels"], angles=pre["angles"])
    assert perfect == {"accuracy": 1.0, "angle_mae_deg": 0.0}


# --- the CNN ---------------------------------------------------------------------------------


def test_train_cnn_returns_float32_arrays_of_the_declared_shapes(weights: v.Weights) -> None:
    assert set(weights) == set(v._SHAPES)
    for name, shape in v._SHAPES.items():
        assert weights[name].shape == shape
        assert weights[name].dtype == np.float32


def test_train_cnn_is_deterministic_under_a_seed(pre: v.Shard, weights: v.Weights) -> None:
    import torch

    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    again = v.train_cnn([pre], seed=1, epochs=1, batch_size=32)["weights"]
    # Training forks torch's generator: the caller's random stream is left where it was.
    torch.testing.assert_close(torch.rand(3), expected_next)
    for name in v._SHAPES:
        np.testing.assert_array_equal(weights[name], again[name])
    other = v.train_cnn([pre], seed=2, epochs=1, batch_size=32)["weights"]
    assert not np.array_equal(weights["conv1.weight"], other["conv1.weight"])


def test_training_can_continue_from_given_weights(pre: v.Shard, weights: v.Weights) -> None:
    more = v.train_cnn([pre], seed=1, epochs=1, batch_size=32, init=weights)
    fresh = v.train_cnn([pre], seed=1, epochs=1, batch_size=32)
    assert more["info"]["final_loss"] < fresh["info"]["final_loss"]


def test_numpy_forward_matches_torch(pre: v.Shard, weights: v.Weights) -> None:
    import torch

    net = v._build_net()
    net.load_state_dict({k: torch.from_numpy(a.copy()) for k, a in weights.items()})
    net.eval()
    with torch.no_grad():
        logits, angle = net(torch.from_numpy(pre["images"].astype(np.float32)).unsqueeze(1))
    _, np_logits, np_angles = v._forward(weights, pre["images"])
    np.testing.assert_allclose(np_logits, logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(np_angles, angle.numpy() * v.ANGLE_UNIT, atol=1e-3)


def test_weights_and_features_travel_as_plain_arrays(pre: v.Shard, weights: v.Weights) -> None:
    wire = loads(dumps(weights))
    np.testing.assert_array_equal(
        v.predict(wire, pre)["classes"], v.predict(weights, pre)["classes"]
    )
    feats = v.extract_features(wire, loads(dumps(pre)))
    assert feats["features"].shape == (120, v.FEATURES)
    assert feats["features"].dtype == np.float32


def test_average_weights_weights_by_image_count(weights: v.Weights) -> None:
    doubled = {k: a * 2 for k, a in weights.items()}
    mean = v.average_weights([weights, doubled], [3, 1])
    for name in v._SHAPES:
        np.testing.assert_allclose(mean[name], weights[name] * 1.25, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="positive"):
        v.average_weights([weights], [0])


# --- heads and the whole pipeline -------------------------------------------------------------


def test_heads_return_predictions_and_figures_never_a_model(
    weights: v.Weights, pre: v.Shard
) -> None:
    feats = v.extract_features(weights, pre)
    held_out = v.extract_features(weights, v.preprocess(v.make_shard(0, size=50, split="test")))
    for head in (v.train_svm, v.train_forest, v.train_regressor):
        result = head([feats], [held_out])
        assert set(result) == {"predictions", "info"}
        assert result["predictions"].shape == (50,)
        # Everything in the result is wire-safe: no fitted estimator rides along.
        loads(dumps(result))
    assert v.train_svm([feats], [held_out])["predictions"].dtype == np.int64
    assert v.train_regressor([feats], [held_out])["predictions"].dtype == np.float32


def test_small_pipeline_is_far_above_chance(small_run: dict[str, Any]) -> None:
    assert small_run["images"] == 1600
    assert small_run["accuracy_svm"] >= 0.8
    assert max(small_run["accuracy_forest"], small_run["accuracy_cnn"]) > 0.5
    # Predicting 0 for angles uniform in [-45, 45] errs by 22.5 degrees on average.
    assert small_run["angle_mae_deg"] < 12.0
    assert set(small_run["stage_s"]) >= {"make_shard", "train_cnn", "train_svm", "evaluate"}


def test_tasks_are_registered_with_what_they_need() -> None:
    registry = Registry.load(["tasks.vision"], entry_points=False)
    assert registry.requirements("vision.train_cnn").libraries == {"torch": ">=2.2"}
    for name in ("vision.make_shard", "vision.train_svm", "vision.train_forest"):
        assert set(registry.requirements(name).libraries) == {"scikit-learn"}
    # The numpy stages run anywhere, so a node kept off torch still does its share.
    for name in ("vision.preprocess", "vision.extract_features", "vision.predict"):
        assert registry.requirements(name).libraries == {}
