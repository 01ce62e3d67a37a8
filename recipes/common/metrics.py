"""Evaluation metrics for the recipes, through ``evaluate`` when possible, offline always.

``load_accuracy()`` loads the metric module shipped in ``recipes/metrics/accuracy`` with
``evaluate.load(path)`` (no network); if ``evaluate`` cannot load it (missing package, an
``evaluate`` version that refuses local scripts), it falls back to :class:`SimpleAccuracy`,
which computes the same number.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

ACCURACY_PATH = Path(__file__).resolve().parents[1] / "metrics" / "accuracy"
logger = logging.getLogger(__name__)


class SimpleAccuracy:
    """``add_batch`` / ``compute`` like an ``evaluate`` metric: accuracy = mean(prediction == reference)."""

    name = "accuracy"

    def __init__(self):
        self._pred: list[np.ndarray] = []
        self._ref: list[np.ndarray] = []

    def add_batch(self, *, predictions, references):
        self._pred.append(np.asarray(predictions).reshape(-1))
        self._ref.append(np.asarray(references).reshape(-1))

    def compute(self, *, predictions=None, references=None):
        if predictions is not None:
            self.add_batch(predictions=predictions, references=references)
        pred = np.concatenate(self._pred) if self._pred else np.zeros(0)
        ref = np.concatenate(self._ref) if self._ref else np.zeros(0)
        self._pred, self._ref = [], []
        if len(ref) == 0:
            raise ValueError("accuracy of zero examples is undefined: no batch was added")
        return {"accuracy": float((pred == ref).mean())}


def load_accuracy():
    """The project's offline ``evaluate`` accuracy module, or :class:`SimpleAccuracy` if it cannot be loaded."""
    try:
        import evaluate

        return evaluate.load(str(ACCURACY_PATH), keep_in_memory=True)  # no cache files shared by processes
    except Exception as err:  # evaluate missing or unable to load a local module: same metric, computed here
        logger.warning("evaluate could not load %s (%s); computing accuracy directly", ACCURACY_PATH, err)
        return SimpleAccuracy()
