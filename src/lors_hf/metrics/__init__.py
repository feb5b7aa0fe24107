"""Metric scripts shipped with lors_hf, loadable offline with :func:`evaluate.load` by path."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import evaluate

METRICS_DIR = Path(__file__).resolve().parent


def available_metrics() -> list[str]:
    """Names of the shipped metric scripts.

    Example:
        >>> "accuracy" in available_metrics()
        True
    """
    return sorted(p.parent.name for p in METRICS_DIR.glob("*/*.py") if p.stem == p.parent.name)


def metric_path(name: str) -> str:
    """Directory of the shipped metric script ``name`` (what ``evaluate.load`` accepts).

    Example:
        >>> metric_path("accuracy").endswith("accuracy")
        True
    """
    path = METRICS_DIR / name
    if not (path / f"{name}.py").is_file():
        raise ValueError(f"No shipped metric {name!r}; available: {available_metrics()}")
    return str(path)


def load_metric(name: str, **kwargs) -> evaluate.EvaluationModule:
    """Load a shipped metric offline: ``evaluate.load(<its directory>)``; ``kwargs`` go to ``evaluate.load``.

    Example:
        >>> load_metric("accuracy").compute(predictions=[0, 1, 1], references=[0, 1, 0])
        {'accuracy': 0.6666666666666666}
    """
    import evaluate

    return evaluate.load(metric_path(name), **kwargs)
