"""Tests for unitary_rnn.training.tasks: exact specs of copy memory, adding and pixel MNIST."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unitary_rnn.training.tasks import (
    AddingTask,
    CopyMemoryTask,
    PixelMNISTTask,
    TaskDataset,
    pixel_permutation,
)

# ----------------------------------------------------------------------------------------------------
# copy memory
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 5, 100, 1000])
def test_copy_memory_layout(T):
    task = CopyMemoryTask(delay=T)
    data = task.generate(50, seed=3)
    x, y = data["input_ids"], data["labels"]
    assert x.shape == y.shape == (50, T + 20) and x.dtype == y.dtype == torch.int64
    assert task.sequence_length == T + 20 and task.vocab_size == 10 and task.marker == 9 and task.num_labels == 9
    symbols = x[:, :10]
    assert symbols.min() >= 1 and symbols.max() <= 8
    assert (x[:, 10:T + 9] == 0).all()  # T - 1 blanks
    assert (x[:, T + 9] == 9).all()  # the marker
    assert (x[:, T + 10:] == 0).all()  # 10 blanks while the model answers
    assert (x == 9).sum() == 50  # exactly one marker per sequence
    assert (y[:, :T + 10] == 0).all()
    assert torch.equal(y[:, T + 10:], symbols)


def test_copy_memory_symbols_cover_alphabet():
    x = CopyMemoryTask(delay=10).generate(2000, seed=0)["input_ids"][:, :10]
    counts = torch.bincount(x.flatten(), minlength=10)
    assert counts[0] == 0 and counts[9] == 0
    assert (counts[1:9] > 2000 * 10 / 8 * 0.9).all()  # roughly uniform over 1..8


def test_copy_memory_determinism_per_seed():
    task = CopyMemoryTask(delay=50)
    a, b, c = task.generate(8, seed=1), task.generate(8, seed=1), task.generate(8, seed=2)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(a["input_ids"], c["input_ids"])


@pytest.mark.parametrize("T", [100, 1000])
def test_copy_memory_baseline(T):
    """10 ln 8 / (T + 20), and it is exactly the cross-entropy of the memoryless predictor on the data."""
    task = CopyMemoryTask(delay=T)
    assert task.baseline_loss == pytest.approx(10 * math.log(8) / (T + 20), rel=1e-15)
    y = task.generate(16, seed=0)["labels"]
    logits = torch.full((16, T + 20, task.num_labels), -torch.inf, dtype=torch.float64)
    logits[:, :T + 10, 0] = 0.0  # blank with probability 1
    logits[:, T + 10:, 1:] = 0.0  # uniform over the 8 symbols
    loss = F.cross_entropy(logits.reshape(-1, task.num_labels), y.reshape(-1))
    assert loss.item() == pytest.approx(task.baseline_loss, rel=1e-12)


def test_copy_memory_generalised_and_errors():
    task = CopyMemoryTask(delay=7, num_symbols=4, copy_length=3)
    x = task.generate(4, seed=0)["input_ids"]
    assert x.shape == (4, 13) and (x[:, 9] == 5).all() and task.baseline_loss == pytest.approx(3 * math.log(4) / 13)
    with pytest.raises(ValueError, match="CopyMemoryTask.delay"):
        CopyMemoryTask(delay=0)
    with pytest.raises(ValueError, match="num_samples"):
        task.generate(0)


# ----------------------------------------------------------------------------------------------------
# adding
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [2, 7, 200, 750])
def test_adding_layout(T):
    task = AddingTask(length=T)
    data = task.generate(300, seed=5)
    x, y = data["inputs_embeds"], data["labels"]
    assert x.shape == (300, T, 2) and x.dtype == torch.float32 and y.shape == (300,) and y.dtype == torch.float32
    values, mask = x[..., 0], x[..., 1]
    assert values.min() >= 0 and values.max() < 1
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    half = T // 2
    assert (mask[:, :half].sum(1) == 1).all() and (mask[:, half:].sum(1) == 1).all()
    torch.testing.assert_close(y, (values * mask).sum(1), rtol=0, atol=1e-6)


def test_adding_marker_positions_cover_each_half():
    mask = AddingTask(length=20).generate(4000, seed=0)["inputs_embeds"][..., 1]
    first, second = mask[:, :10].argmax(1), mask[:, 10:].argmax(1) + 10
    assert set(first.tolist()) == set(range(10)) and set(second.tolist()) == set(range(10, 20))


def test_adding_baseline_and_determinism():
    task = AddingTask(length=50)
    assert task.baseline_loss == pytest.approx(1 / 6) and round(task.baseline_loss, 3) == 0.167
    y = task.generate(100_000, seed=0)["labels"].double()
    mse_of_one = ((y - 1) ** 2).mean().item()
    # Var(U + U') = 1/6; the sample mean of (y-1)^2 has std sqrt((1/15 - 1/36) / n) ~ 6e-4: 2e-3 is 3 sigma
    assert abs(mse_of_one - 1 / 6) < 2e-3
    a, b = task.generate(5, seed=9), task.generate(5, seed=9)
    assert torch.equal(a["inputs_embeds"], b["inputs_embeds"]) and torch.equal(a["labels"], b["labels"])
    with pytest.raises(ValueError, match="AddingTask.length"):
        AddingTask(length=1)


# ----------------------------------------------------------------------------------------------------
# pixel MNIST
# ----------------------------------------------------------------------------------------------------


def _toy_images(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8), rng.integers(0, 10, size=n)


def test_pixel_permutation_is_reference():
    perm = pixel_permutation()
    assert np.array_equal(perm, np.random.RandomState(92916).permutation(784))
    assert sorted(perm.tolist()) == list(range(784))


@pytest.mark.parametrize("permuted", [False, True])
def test_pixel_mnist_sequences(permuted):
    images, labels = _toy_images()
    task = PixelMNISTTask(images, labels, permuted=permuted)
    data = task.generate()
    x = data["inputs_embeds"]
    assert x.shape == (6, 784, 1) and x.dtype == torch.float32 and task.sequence_length == 784 and task.input_size == 1
    flat = images.reshape(6, 784).astype(np.float64) / 255
    order = np.random.RandomState(92916).permutation(784) if permuted else np.arange(784)
    for i in range(6):
        for t in (0, 1, 100, 783):
            assert x[i, t, 0].item() == pytest.approx(flat[i, order[t]], abs=1e-7)
    assert torch.equal(data["labels"], torch.as_tensor(labels, dtype=torch.int64))


def test_pixel_mnist_subset_baseline_and_errors():
    images, _ = _toy_images(8)
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 3])
    task = PixelMNISTTask(images, labels)
    p = np.array([4, 2, 1, 1]) / 8
    assert task.baseline_loss == pytest.approx(-(p * np.log(p)).sum()) and task.baseline_accuracy == 0.5
    sub = task.generate(3, seed=1)
    assert sub["inputs_embeds"].shape == (3, 784, 1) and torch.equal(sub["labels"], task.generate(3, seed=1)["labels"])
    assert torch.equal(task.generate(3)["labels"], torch.tensor([0, 0, 0]))
    with pytest.raises(ValueError, match="exceeds"):
        task.generate(9)
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        PixelMNISTTask(images.astype(np.float32) - 1, labels)
    with pytest.raises(ValueError, match="labels must have shape"):
        PixelMNISTTask(images, labels[:3])


def test_pixel_mnist_from_a_datasets_dataset():
    import datasets

    images, labels = _toy_images(4)
    ds = datasets.Dataset.from_dict({"img": images, "digit": labels},
                                    features=datasets.Features({"img": datasets.Array2D((28, 28), "uint8"),
                                                                "digit": datasets.Value("int64")}))
    task = PixelMNISTTask.from_dataset(ds, image_column="img", label_column="digit", permuted=True)
    direct = PixelMNISTTask(images, labels, permuted=True).generate()
    assert torch.equal(task.generate()["inputs_embeds"], direct["inputs_embeds"])
    assert torch.equal(task.generate()["labels"], direct["labels"])
    with pytest.raises(ValueError, match="no column 'image'"):
        PixelMNISTTask.from_dataset(ds)


def test_the_package_reads_no_recipe_code():
    """``unitary_rnn`` is installable without the repository's recipes: importing its tasks imports none."""
    code = "import sys, unitary_rnn.training.tasks; print(sorted(m for m in sys.modules if m.split('.')[0] == 'recipes'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent)
    assert out.stdout.strip() == "[]", out.stdout


# ----------------------------------------------------------------------------------------------------
# datasets: HF and torch
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task,columns", [
    (CopyMemoryTask(delay=30), {"input_ids": (50,), "labels": (50,)}),
    (AddingTask(length=40), {"inputs_embeds": (40, 2), "labels": ()}),
    (PixelMNISTTask(*_toy_images(6)), {"inputs_embeds": (784, 1), "labels": ()}),
])
def test_hf_and_torch_datasets(task, columns):
    seed = 0
    raw = task.generate(6, seed)
    hf = task.dataset(6, seed)
    assert set(hf.column_names) == set(columns) and len(hf) == 6
    for name, shape in columns.items():
        assert tuple(hf[0][name].shape) == shape
        assert torch.equal(hf[:][name], raw[name])
    loader = torch.utils.data.DataLoader(task.torch_dataset(6, seed), batch_size=4)
    batch = next(iter(loader))
    assert set(batch) == set(columns)
    for name in columns:
        assert torch.equal(batch[name], raw[name][:4])


def test_task_dataset_length_check():
    with pytest.raises(ValueError, match="same first dimension"):
        TaskDataset({"a": torch.zeros(3), "b": torch.zeros(4)})


# ----------------------------------------------------------------------------------------------------
# the columns feed the project's models as keyword arguments
# ----------------------------------------------------------------------------------------------------


def test_batches_feed_the_models():
    from unitary_rnn import UnitaryRNNConfig, UnitaryRNNForSequenceClassification, UnitaryRNNForTokenClassification

    copy = CopyMemoryTask(delay=6)
    model = UnitaryRNNForTokenClassification(UnitaryRNNConfig(hidden_size=8, vocab_size=copy.vocab_size, num_labels=copy.num_labels))
    out = model(**next(iter(torch.utils.data.DataLoader(copy.torch_dataset(4), batch_size=4))))
    assert out.logits.shape == (4, copy.sequence_length, copy.num_labels) and torch.isfinite(out.loss)

    adding = AddingTask(length=12)
    model = UnitaryRNNForSequenceClassification(UnitaryRNNConfig(hidden_size=8, input_size=2, num_labels=1))
    out = model(**adding.dataset(4)[:])
    assert out.logits.shape[0] == 4 and torch.isfinite(out.loss)

    pixels = PixelMNISTTask(*_toy_images(3), permuted=True)
    model = UnitaryRNNForSequenceClassification(UnitaryRNNConfig(hidden_size=4, input_size=1, num_labels=10))
    out = model(**pixels.generate())
    assert out.logits.shape == (3, 10) and torch.isfinite(out.loss)
