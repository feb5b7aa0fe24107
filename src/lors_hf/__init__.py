"""lors_hf: LORS (Low-rank Residual Structure, CVPR 2024) for Hugging Face transformers.

The N stacked layers of a Transformer share one weight per projection while each layer keeps a small
private low-rank residual, ``W_i = W_shared + B_i @ A_i``::

    from lors_hf import LorsConfig, lorsify, merge_and_unload, parameter_report
    model = lorsify(model, LorsConfig(rank=32))
    print(parameter_report(model))

Importing lors_hf also teaches ``from_pretrained`` to rebuild LORS checkpoints (see `persistence`).
"""

from .config import LorsConfig
from .layer import LorsLinear, SharedWeight
from .optim import lors_parameter_groups
from .persistence import install as _install_hooks
from .persistence import load_lors_config, write_model_card
from .report import ParameterReport, parameter_report
from .surgery import get_lors_config, is_lorsified, lorsify, merge_and_unload

__version__ = "0.1.0"

_install_hooks()

__all__ = [
    "LorsConfig",
    "LorsLinear",
    "ParameterReport",
    "SharedWeight",
    "get_lors_config",
    "is_lorsified",
    "load_lors_config",
    "lors_parameter_groups",
    "lorsify",
    "merge_and_unload",
    "parameter_report",
    "write_model_card",
]
