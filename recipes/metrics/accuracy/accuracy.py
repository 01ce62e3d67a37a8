"""Accuracy, as an offline ``evaluate`` metric module: ``evaluate.load("recipes/metrics/accuracy")``.

``evaluate.load("accuracy")`` fetches its script from the Hub; this module is the same metric
shipped with the project so that the recipes evaluate without network.

    accuracy = (1 / N) * sum_i [prediction_i == reference_i]      (weighted by sample_weight if given)
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy: the fraction of predictions equal to their references."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted class ids.
    references (list of int): true class ids.
    normalize (bool): return the fraction (True, default) or the count of correct predictions.
    sample_weight (list of float): optional per-sample weights.
Returns:
    accuracy (float).
Example:
    >>> m = evaluate.load("recipes/metrics/accuracy")
    >>> m.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        correct = np.asarray(predictions) == np.asarray(references)
        weights = np.ones(len(correct)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        total = float((correct * weights).sum())
        return {"accuracy": total / float(weights.sum()) if normalize else total}
