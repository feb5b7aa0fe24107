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
    predictions (`list` of `int`): Predicted labels (lists of ints in the "multilabel" configuration).
    references (`list` of `int`): Ground truth labels, same shape as `predictions`.
    normalize (`bool`): If True (default), return the fraction of correct predictions; if False, their
        (weighted) count.
    sample_weight (`list` of `float`): Sample weights. Defaults to None (all ones).

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

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
        if self.config_name == "multilabel":
            correct = np.array([list(p) == list(r) for p, r in zip(predictions, references, strict=True)])
        else:
            correct = np.asarray(predictions) == np.asarray(references)
        weights = np.ones(len(correct)) if sample_weight is None else np.asarray(sample_weight, dtype=float)
        total = float(np.dot(correct.astype(float), weights))
        if normalize:
            total = total / float(weights.sum()) if len(correct) else 0.0
        return {"accuracy": total}
