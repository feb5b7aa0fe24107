"""Accuracy metric for `evaluate`, shipped with lors_hf so it loads offline by path.

Load it with ``evaluate.load("<path to this directory>")`` or ``lors_hf.metrics.load_metric("accuracy")``.
One import per line: evaluate's import scanner misreads ``import a, b``.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy is the proportion of correct predictions among all predictions:
Accuracy = (TP + TN) / (TP + TN + FP + FN). In the multilabel configuration a prediction counts as
correct only if its whole label set matches the reference (subset accuracy).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): Predicted class ids, e.g. ``logits.argmax(-1)`` (lists of ints in the "multilabel"
        configuration). Floats with a fractional part are an error.
    references (`list` of `int`): Ground truth labels, same shape as `predictions`.
    normalize (`bool`): If True (default), return the fraction of correct predictions; if False, their
        (weighted) count.
    sample_weight (`list` of `float`): One finite weight >= 0 per prediction. Defaults to None (all ones).

Returns:
    accuracy (`float`): In [0, 1] when `normalize` is True, else the number of correct predictions.

Examples:
    >>> import lors_hf.metrics
    >>> metric = lors_hf.metrics.load_metric("accuracy")
    >>> metric.compute(references=[0, 1, 2, 0, 1, 2], predictions=[0, 1, 1, 2, 1, 0])
    {'accuracy': 0.5}
"""

_CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and Varoquaux, G. and Gramfort, A. and others},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""


def _check_labels(name, rows):
    """Refuse labels with a fractional part (probabilities, logits): the int32 feature would truncate them."""
    for row in rows:
        try:
            values = np.asarray(row.tolist() if hasattr(row, "tolist") else row)
        except ValueError:  # ragged rows (lists where ints belong): evaluate's own error names the format
            continue
        if values.dtype.kind != "f":
            continue
        wrong = values[~(np.isfinite(values) & (values == np.round(values)))]
        if wrong.size:
            raise ValueError(
                f"accuracy: {name} must be integer class labels, got {float(wrong.flat[0])}; take the argmax of "
                "scores or logits (logits.argmax(-1)), or threshold a binary probability ((probs > 0.5).astype(int))."
            )


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    """Fraction (or weighted count) of predictions equal to their references."""

    def _info(self) -> evaluate.MetricInfo:
        if self.config_name == "multilabel":
            features = datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int32")),
                    "references": datasets.Sequence(datasets.Value("int32")),
                }
            )
        else:
            features = datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            )
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=features,
            reference_urls=[
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"
            ],
        )

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add a batch of integer predictions and references (float labels are an error, not truncated)."""
        for name, values in (("predictions", predictions), ("references", references)):
            if values is not None:
                _check_labels(name, values if self.config_name == "multilabel" else [values])
        super().add_batch(predictions=predictions, references=references, **kwargs)

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Add one integer prediction and reference (a float label is an error, not truncated)."""
        for name, value in (("predictions", prediction), ("references", reference)):
            if value is not None:
                _check_labels(name, [value] if self.config_name == "multilabel" else [[value]])
        super().add(prediction=prediction, reference=reference, **kwargs)

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
        if self.config_name == "multilabel":
            correct = np.array([list(p) == list(r) for p, r in zip(predictions, references, strict=True)])
        else:
            correct = np.asarray(predictions) == np.asarray(references)
        weights = np.ones(len(correct)) if sample_weight is None else np.asarray(sample_weight, dtype=float)
        if weights.shape != correct.shape:
            raise ValueError(f"accuracy: sample_weight must hold one weight per prediction ({len(correct)}), "
                             f"got shape {weights.shape}.")
        if not np.all(np.isfinite(weights) & (weights >= 0)):
            raise ValueError("accuracy: sample_weight must hold finite weights >= 0.")
        if normalize and len(correct) and not weights.sum():
            raise ValueError("accuracy: sample_weight sums to zero, so there is no fraction to normalize; give some "
                             "prediction a positive weight, or pass normalize=False for the weighted count.")
        total = float(np.dot(correct.astype(float), weights))
        if normalize:
            total = total / float(weights.sum()) if len(correct) else 0.0
        return {"accuracy": total}
