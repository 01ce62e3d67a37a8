"""Datasets, batching and the offline accuracy metric of the recipes."""

import gzip
import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from recipes.common import RecipeError
from recipes.common.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    ImageCollator,
    ImageSpec,
    load_fashion_mnist_arrays,
    load_image_dataset,
    load_mnist_5k_arrays,
    loader_view,
    read_idx,
    stratified_split,
)
from recipes.common.metrics import SimpleAccuracy, load_accuracy

needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST not installed: apt-get install -y dataset-fashion-mnist",
)


def _hashes(ds):
    return {hashlib.sha1(np.asarray(img, dtype=np.uint8).tobytes()).hexdigest() for img in ds.with_format("numpy")["image"]}


def test_mnist_5k_is_a_fixed_stratified_vtab_style_split():
    dsd = load_image_dataset("mnist_5k")
    assert {k: len(v) for k, v in dsd.items()} == {"train": 1000, "validation": 1000, "test": 3000}
    assert dsd["train"].features["label"].names == [str(i) for i in range(10)]
    assert np.bincount(np.asarray(dsd["train"]["label"])).tolist() == [100] * 10
    train, val, test = (_hashes(dsd[k]) for k in ("train", "validation", "test"))
    assert not (train & val) and not (train & test) and not (val & test)
    again = load_image_dataset("mnist-5k", seed=123)  # the split does not depend on the training seed
    assert _hashes(again["train"]) == train


def test_stratified_split_counts_and_errors():
    labels = np.repeat(np.arange(3), 10)
    parts = stratified_split(labels, {"a": 7, "b": 9}, seed=0)
    assert np.bincount(labels[parts["a"]]).tolist() == [3, 2, 2]
    assert np.bincount(labels[parts["b"]]).tolist() == [3, 3, 3]
    assert not set(parts["a"]) & set(parts["b"])
    with pytest.raises(RecipeError, match="too few"):
        stratified_split(labels, {"a": 40}, seed=0)


@needs_fashion_mnist
def test_fashion_mnist_arrays():
    x, y = load_fashion_mnist_arrays("test")
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8 and 0 < x.mean() < 255
    assert np.bincount(y).tolist() == [1000] * 10
    with pytest.raises(RecipeError, match="'train' and 'test'"):
        load_fashion_mnist_arrays("validation")


@needs_fashion_mnist
@pytest.mark.slow
def test_fashion_mnist_builtin_splits():
    dsd = load_image_dataset("fashion_mnist")
    assert {k: len(v) for k, v in dsd.items()} == {"train": 55000, "validation": 5000, "test": 10000}
    assert dsd["test"].features["label"].names == list(FASHION_MNIST_CLASSES)


def test_missing_fashion_mnist_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr("recipes.common.data.FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(RecipeError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist_arrays("train")


def _write_idx(path, array, gz):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_and_fashion_mnist_from_a_root(tmp_path, gz):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), rng.integers(0, 10, 5)
    suffix = ".gz" if gz else ""
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", images, gz)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", labels, gz)
    assert np.array_equal(read_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}"), images)
    x, y = load_fashion_mnist_arrays("test", root=tmp_path)
    assert np.array_equal(x, images) and np.array_equal(y, labels) and y.dtype == np.int64
    x[0, 0, 0] ^= 1  # writable


def test_read_idx_errors(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(RecipeError, match="not an unsigned-byte idx file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + bytes(9))
    with pytest.raises(RecipeError, match=r"header says \(10,\) but the file holds 9 bytes"):
        read_idx(tmp_path / "short")


@pytest.mark.slow
def test_mnist_5k_arrays():
    images, labels = load_mnist_5k_arrays()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [500] * 10 and images.max() == 255
    images[:] = 0  # a copy: the next call is intact
    assert load_mnist_5k_arrays()[0].max() == 255


def _write_images(folder, n, size=(9, 7), mode="RGB", seed=0):
    rng = np.random.RandomState(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
        Image.fromarray(rng.randint(0, 255, shape, dtype=np.uint8), mode).save(folder / f"{i}.png")


def test_imagefolder_gets_labels_and_missing_splits(tmp_path):
    for cls in ("cat", "dog"):
        _write_images(tmp_path / "train" / cls, 10)
    dsd = load_image_dataset(str(tmp_path))
    assert set(dsd) == {"train", "validation", "test"}
    assert dsd["train"].features["label"].names == ["cat", "dog"]
    assert sum(len(v) for v in dsd.values()) == 20
    pixels, labels = ImageCollator(ImageSpec(1, 28, 28))([dsd["train"][i] for i in range(3)])
    assert pixels.shape == (3, 1, 28, 28) and labels.dtype == torch.long


def test_imagefolder_without_classes_has_no_label_column(tmp_path):
    _write_images(tmp_path, 4)
    with pytest.raises(RecipeError, match="no label column .*--label_column"):
        load_image_dataset(str(tmp_path))


def test_dataset_not_found_is_one_clear_line():
    with pytest.raises(RecipeError) as err:
        load_image_dataset("no-such-owner-hh/no-such-dataset")
    msg = str(err.value)
    assert "could not be loaded" in msg and "mnist_5k" in msg and "\n" not in msg
    with pytest.raises(RecipeError, match="does not exist"):
        load_image_dataset("./no/such/folder")


def test_collator_channels_resize_and_normalisation():
    white = {"image": np.full((28, 28), 255, dtype=np.uint8), "label": 3}
    rgb = {"image": Image.new("RGB", (10, 6), (255, 0, 0)), "label": 1}
    pixels, labels = ImageCollator(ImageSpec(3, 14, 14, (0.5,), (0.5,)))([white, rgb])
    assert pixels.shape == (2, 3, 14, 14) and labels.tolist() == [3, 1]
    torch.testing.assert_close(pixels[0], torch.ones(3, 14, 14))  # (1 - 0.5) / 0.5
    torch.testing.assert_close(pixels[1, 0], torch.ones(14, 14))
    torch.testing.assert_close(pixels[1, 1], -torch.ones(14, 14))
    grey, _ = ImageCollator(ImageSpec(1, 6, 10, (0.0,), (1.0,)))([rgb])
    torch.testing.assert_close(grey, torch.full((1, 1, 6, 10), 0.299))  # ITU-R 601 luma of pure red


def test_loader_view_is_a_tensor_view_of_array_datasets():
    dsd = load_image_dataset("mnist_5k")
    view = loader_view(dsd["validation"])
    row = view[5]
    assert row["image"].dtype == torch.uint8 and row["image"].shape == (28, 28)
    np.testing.assert_array_equal(row["image"].numpy(), np.asarray(dsd["validation"].with_format("numpy")[5]["image"]))
    assert int(row["label"]) == dsd["validation"][5]["label"]


def test_offline_accuracy_metric_matches_the_fallback():
    metric = load_accuracy()
    assert not isinstance(metric, SimpleAccuracy), "the shipped evaluate module should load offline"
    rng = np.random.RandomState(0)
    pred, ref = rng.randint(0, 4, 101), rng.randint(0, 4, 101)
    metric.add_batch(predictions=pred[:50], references=ref[:50])
    metric.add_batch(predictions=pred[50:], references=ref[50:])
    expected = float((pred == ref).mean())
    assert metric.compute()["accuracy"] == pytest.approx(expected, abs=1e-12)
    assert SimpleAccuracy().compute(predictions=pred, references=ref)["accuracy"] == pytest.approx(expected, abs=1e-12)
    weighted = metric.compute(predictions=[1, 0], references=[1, 1], sample_weight=[3.0, 1.0])
    assert weighted["accuracy"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="zero examples"):
        SimpleAccuracy().compute()
