"""The standard long-memory tasks of the unitary-RNN papers, as seeded offline generators.

- :class:`CopyMemoryTask` (``input_ids``, a label per step, for ``UnitaryRNNForTokenClassification``);
- :class:`AddingTask` (``inputs_embeds`` with 2 channels, a float label, for
  ``UnitaryRNNForSequenceClassification`` with ``num_labels=1``);
- :class:`PixelMNISTTask` (``inputs_embeds`` with 1 channel, 784 steps, optionally permuted, a class label),
  built from image and label arrays (or a ``datasets.Dataset`` of them); the package reads no files itself.

Each task gives a ``datasets.Dataset`` (:meth:`dataset`, torch format) or a torch dataset
(:meth:`torch_dataset`) whose columns are the models' keyword arguments, and exposes the loss of the best
memoryless predictor (``baseline_loss``), the level a model that remembers nothing stays at.
Same ``seed``, same data, on every platform (numpy's PCG64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

#: the permutation of the reference papers' permuted pixel MNIST
PERMUTATION_SEED = 92916


class TaskDataset(torch.utils.data.Dataset):
    """A map-style torch dataset over equal-length tensors; item ``i`` is ``{name: tensor[i]}``, so the
    default collate function gives the batch as the models' keyword arguments."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        lengths = {name: len(t) for name, t in tensors.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"all tensors must have the same first dimension, got {lengths}")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, index):
        return {name: t[index] for name, t in self.tensors.items()}


def _to_hf_dataset(tensors: dict[str, torch.Tensor]):
    """``datasets.Dataset`` with torch format from a dict of tensors (fixed-shape array features)."""
    import datasets

    features, columns = {}, {}
    for name, t in tensors.items():
        array = t.numpy()
        dtype = str(array.dtype)
        if array.ndim == 1:
            features[name] = datasets.Value(dtype)
        elif array.ndim == 2:
            features[name] = datasets.Sequence(datasets.Value(dtype), length=array.shape[1])
        elif array.ndim == 3:
            features[name] = datasets.Array2D(shape=array.shape[1:], dtype=dtype)
        else:
            raise ValueError(f"column {name!r} has {array.ndim} dimensions; at most 3 are supported")
        columns[name] = array
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features)).with_format("torch")


def _check_count(num_samples: int) -> int:
    if not (isinstance(num_samples, (int, np.integer)) and num_samples >= 1):
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    return int(num_samples)


class _Task:
    def generate(self, num_samples: int, seed: int = 0) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def dataset(self, num_samples: int, seed: int = 0):
        """``num_samples`` examples as a ``datasets.Dataset`` in torch format."""
        return _to_hf_dataset(self.generate(num_samples, seed))

    def torch_dataset(self, num_samples: int, seed: int = 0) -> TaskDataset:
        """``num_samples`` examples as a :class:`TaskDataset`."""
        return TaskDataset(self.generate(num_samples, seed))


# ----------------------------------------------------------------------------------------------------
# copy memory
# ----------------------------------------------------------------------------------------------------


@dataclass
class CopyMemoryTask(_Task):
    """Copy memory (Hochreiter & Schmidhuber 1997; Arjovsky et al. 2016), sequence length ``T + 2L``:

        input:  L symbols from {1..K}, T-1 blanks (0), the marker K+1, L blanks
        target: T+L blanks, then the L symbols

    with ``T = delay``, ``L = copy_length = 10``, ``K = num_symbols = 8`` by default (marker 9, vocabulary
    of 10). The marker sits at position ``T + L - 1``. The best memoryless predictor outputs blanks, then
    a uniform guess over the K symbols, with mean cross-entropy per step ``L ln K / (T + 2L)``.
    """

    delay: int = 1000
    num_symbols: int = 8
    copy_length: int = 10

    def __post_init__(self):
        for name in ("delay", "num_symbols", "copy_length"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"CopyMemoryTask.{name} must be a positive int, got {value!r}")

    @property
    def blank(self) -> int:
        return 0

    @property
    def marker(self) -> int:
        return self.num_symbols + 1

    @property
    def vocab_size(self) -> int:
        return self.num_symbols + 2

    @property
    def num_labels(self) -> int:
        """Output classes: blank and the K symbols (the marker is never a target)."""
        return self.num_symbols + 1

    @property
    def sequence_length(self) -> int:
        return self.delay + 2 * self.copy_length

    @property
    def baseline_loss(self) -> float:
        """``L ln K / (T + 2L)``: 10 ln 8 / (T + 20) for the standard task."""
        return self.copy_length * math.log(self.num_symbols) / self.sequence_length

    def generate(self, num_samples: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """``{"input_ids": (n, T+2L) int64, "labels": (n, T+2L) int64}``."""
        n, T, L = _check_count(num_samples), self.delay, self.copy_length
        rng = np.random.default_rng(seed)
        symbols = rng.integers(1, self.num_symbols + 1, size=(n, L))  # (n, L)
        inputs = np.zeros((n, T + 2 * L), dtype=np.int64)
        inputs[:, :L] = symbols
        inputs[:, T + L - 1] = self.marker
        labels = np.zeros((n, T + 2 * L), dtype=np.int64)
        labels[:, T + L:] = symbols
        return {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(labels)}


# ----------------------------------------------------------------------------------------------------
# adding
# ----------------------------------------------------------------------------------------------------


@dataclass
class AddingTask(_Task):
    """The adding problem (Hochreiter & Schmidhuber 1997; Arjovsky et al. 2016), length ``T``:

        inputs_embeds[:, t, 0] ~ U(0, 1)
        inputs_embeds[:, t, 1] = 1 at one t in [0, T//2) and one t in [T//2, T), else 0
        labels = the sum of the two marked values

    MSE; always predicting 1 (the mean) scores Var(U + U') = 1/6 = 0.167, the memoryless baseline.
    """

    length: int = 200

    def __post_init__(self):
        if not (isinstance(self.length, int) and self.length >= 2):
            raise ValueError(f"AddingTask.length must be an int >= 2, got {self.length!r}")

    @property
    def sequence_length(self) -> int:
        return self.length

    @property
    def input_size(self) -> int:
        return 2

    @property
    def baseline_loss(self) -> float:
        """``1/6``: the MSE of predicting 1."""
        return 1.0 / 6.0

    def generate(self, num_samples: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """``{"inputs_embeds": (n, T, 2) float32, "labels": (n,) float32}``."""
        n, T = _check_count(num_samples), self.length
        half = T // 2
        rng = np.random.default_rng(seed)
        values = rng.random((n, T), dtype=np.float64)
        first = rng.integers(0, half, size=n)
        second = rng.integers(half, T, size=n)
        mask = np.zeros((n, T), dtype=np.float64)
        rows = np.arange(n)
        mask[rows, first] = 1.0
        mask[rows, second] = 1.0
        labels = values[rows, first] + values[rows, second]
        inputs = np.stack([values, mask], axis=-1).astype(np.float32)  # (n, T, 2)
        return {"inputs_embeds": torch.from_numpy(inputs), "labels": torch.from_numpy(labels.astype(np.float32))}


# ----------------------------------------------------------------------------------------------------
# pixel / permuted pixel MNIST
# ----------------------------------------------------------------------------------------------------


def pixel_permutation(seed: int = PERMUTATION_SEED, size: int = 784) -> np.ndarray:
    """``numpy.random.RandomState(seed).permutation(size)``, the reference papers' pixel order."""
    return np.random.RandomState(seed).permutation(size)


class PixelMNISTTask(_Task):
    """Pixel-by-pixel image classification (Le et al. 2015): each image is a sequence of its pixels / 255
    in row-major order (784 steps for 28 x 28), ``inputs_embeds`` of shape ``(784, 1)``; with
    ``permuted=True`` the steps follow :func:`pixel_permutation` (``RandomState(92916)``).

    ``images``: ``(n, 28, 28)`` or ``(n, 784)`` with values in [0, 255] (uint8 or float); ``labels``: ``(n,)``
    integer classes. :meth:`generate` takes the first ``num_samples`` examples, or a seeded random subset
    when ``seed`` is not None. ``baseline_loss`` is the entropy of the label frequencies (the cross-entropy
    of the best constant predictor): ln 10 for balanced 10-class data. The package reads no image files: give
    arrays from any loader, or a ``datasets.Dataset`` to :meth:`from_dataset`.
    """

    def __init__(self, images, labels, permuted: bool = False, permutation_seed: int = PERMUTATION_SEED):
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.ndim == 3:
            images = images.reshape(len(images), -1)
        if images.ndim != 2:
            raise ValueError(f"images must have shape (n, H, W) or (n, H*W), got {images.shape}")
        if labels.shape != (len(images),):
            raise ValueError(f"labels must have shape ({len(images)},), got {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(f"labels must be integer classes, got dtype {labels.dtype}")
        if images.size and (images.min() < 0 or images.max() > 255):
            raise ValueError(f"pixel values must lie in [0, 255], got range [{images.min()}, {images.max()}]")
        self.images = images  # (n, P)
        self.labels = labels.astype(np.int64)
        self.permuted = permuted
        self.permutation = pixel_permutation(permutation_seed, images.shape[1]) if permuted else None

    @classmethod
    def from_dataset(cls, dataset, image_column: str = "image", label_column: str = "label",
                     permuted: bool = False, permutation_seed: int = PERMUTATION_SEED) -> "PixelMNISTTask":
        """The task over a ``datasets.Dataset`` of images (arrays or PIL images, one channel) and integer labels,
        e.g. ``datasets.load_dataset("mnist", split="train")``."""
        for column in (image_column, label_column):
            if column not in dataset.column_names:
                raise ValueError(f"the dataset has no column {column!r} (columns: {', '.join(dataset.column_names)})")
        rows = dataset.with_format("numpy")[:]
        return cls(np.stack([np.asarray(image) for image in rows[image_column]]), np.asarray(rows[label_column]),
                   permuted=permuted, permutation_seed=permutation_seed)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def sequence_length(self) -> int:
        return self.images.shape[1]

    @property
    def input_size(self) -> int:
        return 1

    @property
    def num_labels(self) -> int:
        return int(self.labels.max()) + 1

    @property
    def baseline_loss(self) -> float:
        """``-sum_c p_c ln p_c`` over the label frequencies ``p_c``."""
        p = np.bincount(self.labels) / len(self.labels)
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    @property
    def baseline_accuracy(self) -> float:
        """Accuracy of always predicting the most frequent class."""
        return float(np.bincount(self.labels).max() / len(self.labels))

    def generate(self, num_samples: int | None = None, seed: int | None = None) -> dict[str, torch.Tensor]:
        """``{"inputs_embeds": (n, 784, 1) float32, "labels": (n,) int64}``; all examples when ``num_samples``
        is None."""
        total = len(self.labels)
        n = total if num_samples is None else _check_count(num_samples)
        if n > total:
            raise ValueError(f"num_samples={n} exceeds the {total} images available")
        index = np.arange(n) if seed is None else np.sort(np.random.default_rng(seed).choice(total, n, replace=False))
        pixels = self.images[index].astype(np.float32) / np.float32(255.0)  # (n, P)
        if self.permutation is not None:
            pixels = pixels[:, self.permutation]
        return {"inputs_embeds": torch.from_numpy(np.ascontiguousarray(pixels[:, :, None])),
                "labels": torch.from_numpy(self.labels[index])}

    def dataset(self, num_samples: int | None = None, seed: int | None = None):
        return _to_hf_dataset(self.generate(num_samples, seed))

    def torch_dataset(self, num_samples: int | None = None, seed: int | None = None) -> TaskDataset:
        return TaskDataset(self.generate(num_samples, seed))
