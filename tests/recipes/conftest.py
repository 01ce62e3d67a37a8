"""Recipe tests: the repository root on sys.path (``recipes`` is a folder of scripts, not installed)."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST not installed: apt-get install -y dataset-fashion-mnist",
)

# A ViT small enough for a training step in milliseconds: 28x28 grey images, 16 patches, width 32.
TINY_VIT = "vit_tiny_patch16_224"
TINY_VIT_KWARGS = '{"img_size": 28, "patch_size": 7, "embed_dim": 32, "depth": 2, "num_heads": 2, "in_chans": 1}'
